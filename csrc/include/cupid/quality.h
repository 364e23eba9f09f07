// CUPID-Quality fused kernel: segmented GEMM with a min/max epilogue.
//
// Pointers travel as integers (uintptr_t); the Python wrapper (quality_minmax in
// cupid_engine/ops/cpu_backend.py, behind cupid_engine/ops/quality.py) has checked dtype,
// contiguity, shapes and offsets.
#pragma once

#include <cstdint>

namespace cupid {

// Calls of fewer flops (2 x rollout rows x demo rows x k) run on one thread (cupid/parallel.h):
// ~1 ms on one core at the ~89 GFLOP/s measured, against a 7-12 ms wait for the second core
// under load. Measured (2026-12-06 11:54 UTC, load 2.5-2.8, nice 10, medians of 6 interleaved
// calls, 1 vs 2 threads): 0.02 GFLOP 0.52 vs 0.32 ms, 0.5 GFLOP 5.7 vs 6.2 ms, 4.1 GFLOP 51 vs
// 57 ms, 16 GFLOP 166 vs 231 ms, 82 GFLOP 1127 vs 1147 ms: under that load the second core
// gained nothing above 0.02 GFLOP, so the threshold is set by the idle-machine case, where it
// halves large calls and a region costs microseconds.
constexpr int64_t kSerialQualityFlops = 100'000'000;

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
