// Host launchers of the CUDA kernels in csrc/cuda/projection.cu (bound in bindings.cpp
// under CUPID_WITH_CUDA).
//
// Pointers and the stream travel as integers (uintptr_t): the Python wrapper
// (cupid_engine/ops/cuda_backend.py) owns the tensors and has checked device, dtype,
// contiguity and shape. `device` is the CUDA ordinal of the tensors; `stream` is a
// cudaStream_t on that device (torch.cuda.current_stream().cuda_stream). Launches are
// asynchronous on `stream`; launch errors throw std::runtime_error.
#pragma once

#include <cstdint>

namespace cupid {

// out[B, k] = P x for x[B, dim] (row stride x_stride elements, unit column stride) on the
// GPU. `method` is a Method, `dtype` a DType (kernels.h). out must be contiguous,
// zero-filled, float32 (float64 for float64 input).
void project_cuda(uintptr_t x_ptr, uintptr_t out_ptr, int64_t batch, int64_t dim, int64_t x_stride, int64_t k,
                  int method, int dtype, uint64_t seed, int64_t s, int device, uintptr_t stream);

// Tensorsketch stage 1 on the GPU: cs_delta[rows, k] = CS1(delta[rows, O]),
// cs_x[rows, k] = CS2(x[rows, I]). Each factor's hash tables come grouped by bucket
// (CSR, int32 on the device): order[n] (coordinates sorted by bucket, increasing within
// a bucket), sign[n] (±1, same order), offsets[k + 1]. Inputs contiguous; outputs
// contiguous, float32 (float64 for float64 inputs); every output element is written.
void countsketch_pair_cuda(uintptr_t delta_ptr, uintptr_t x_ptr, uintptr_t order1_ptr, uintptr_t sign1_ptr,
                           uintptr_t offsets1_ptr, uintptr_t order2_ptr, uintptr_t sign2_ptr, uintptr_t offsets2_ptr,
                           uintptr_t cs_delta_ptr, uintptr_t cs_x_ptr, int64_t rows, int64_t out_dim, int64_t in_dim,
                           int64_t k, int dtype, int device, uintptr_t stream);

}  // namespace cupid
