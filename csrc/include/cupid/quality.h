// CUPID-Quality fused kernel: segmented GEMM with a min/max epilogue.
//
// Pointers travel as integers (uintptr_t); the Python wrapper (quality_minmax in
// cupid_engine/ops/cpu_backend.py, behind cupid_engine/ops/quality.py) has checked dtype,
// contiguity, shapes and offsets.
#pragma once

#include <cstdint>

namespace cupid {

// For every (rollout t, demo d) pair, with A = R[t-rows] D[d-rows]^T:
//   maxmin[t, d] = max_i min_j A[i, j],  minmax[t, d] = min_i max_j A[i, j].
// r[rows_r, k], d[rows_d, k] row-major (float32 if dtype == 0, float64 if dtype == 3);
// r_off[m + 1], d_off[n + 1] int64 segment offsets (non-empty segments);
// maxmin, minmax [m, n] row-major in the input dtype, fully written by the kernel.
// A is never stored: a blocked, packed GEMM folds each finished register tile into
// per-(row, demo) running minima/maxima (see quality.cpp). Every dot product is summed
// in ascending k with FMA, so results do not depend on the blocking or the thread count.
void quality_minmax_cpu(uintptr_t r_ptr, uintptr_t r_off_ptr, int64_t m, uintptr_t d_ptr, uintptr_t d_off_ptr,
                        int64_t n, int64_t k, uintptr_t maxmin_ptr, uintptr_t minmax_ptr, int dtype);

}  // namespace cupid
