// Declarations of every host entry point bound in bindings.cpp.
//
// Pointers travel as integers (uintptr_t): the Python wrappers own the tensors and have
// already checked device, dtype, contiguity and shape.
#pragma once

#include <cstdint>

namespace cupid {

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
