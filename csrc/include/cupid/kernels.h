// Declarations of every host entry point bound in bindings.cpp.
//
// Pointers travel as integers (uintptr_t): the Python wrappers own the tensors and have
// already checked device, dtype, contiguity and shape.
#pragma once

#include <cstdint>

namespace cupid {

// Row groups reading fewer input bytes (rows x P x element size) than this run their
// superblocks on one thread (cupid/parallel.h); so do the superblock reduction and the
// count sketch below the same number of bytes. Measured (2026-12-06 11:53 UTC, load 2.5-2.7,
// nice 10, k = 4096, medians of 8 interleaved calls, 1 vs 2 threads): signshift B = 8, P =
// 262144 (8 MiB) 1.4 vs 22.6 ms, B = 32, P = 131072 (16 MiB) 2.7 vs 27.3 ms, B = 32, P =
// 524288 (64 MiB) 31.7 vs 44.2 ms, B = 32, P = 2^21 (256 MiB) 92.8 vs 71.6 ms; sparse (s = 4)
// B = 1, P = 2^20 (4 MiB) 13.9 vs 24.2 ms, B = 8, P = 262144 (8 MiB) 22.3 vs 23.2 ms, B = 32,
// P = 131072 (16 MiB) 41.9 vs 39.0 ms, B = 32, P = 524288 (64 MiB) 147 vs 109 ms. Dense
// costs k multiply-adds per coordinate, so its superblocks stay parallel (P > 32768 for
// two of them: >= 10^8 flops each).
constexpr int64_t kSerialProjectBytes = int64_t{16} << 20;

// Projection variants, dispatched by enum (never by function-name mangling).
enum class Method : int { kDense = 0, kSparse = 1, kSignShift = 2 };

// Element type of the input; outputs are float32, or float64 for float64 inputs.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

bool has_cuda();
int num_threads();
void set_num_threads(int n);

// out[B, k] = P x for x[B, dim] with row stride x_stride (elements). out must be
// zero-filled and contiguous.
void project_cpu(uintptr_t x_ptr, uintptr_t out_ptr, int64_t batch, int64_t dim, int64_t x_stride, int64_t k,
                 int method, int dtype, uint64_t seed, int64_t s);

// Tensorsketch stage 1: cs_delta[rows, k] = CS1(delta[rows, O]), cs_x[rows, k] = CS2(x[rows, I])
// from host-computed int64 bucket/sign tables b1,s1 [O] and b2,s2 [I] (see ops/reference.py).
// Outputs zero-filled, contiguous, float32 (float64 for float64 inputs).
void countsketch_pair_cpu(uintptr_t delta_ptr, uintptr_t x_ptr, uintptr_t b1_ptr, uintptr_t s1_ptr, uintptr_t b2_ptr,
                          uintptr_t s2_ptr, uintptr_t cs_delta_ptr, uintptr_t cs_x_ptr, int64_t rows, int64_t out_dim,
                          int64_t in_dim, int64_t k, int dtype);

}  // namespace cupid
