// Quantised inner-product scan of the query index (int8 codes with a per-row scale).
//
// Pointers travel as integers (uintptr_t); the Python wrapper in
// cupid_engine/index/quantized.py has checked dtype, contiguity and shapes.
#pragma once

#include <cstdint>

namespace cupid {

// Scans of fewer code bytes (n * k) than this run on one thread (cupid/parallel.h). Measured
// (2026-12-06 11:50 UTC, 2 cores shared with other agents, load 2.9, the process at nice 10,
// k = 1024, medians of 14 interleaved queries through index.quantized.scan): 1 vs 2 threads
// 0.17 vs 7.8 ms at 1 MiB of codes, 0.86 vs 11.1 ms at 4 MiB, 1.1 vs 7.0 ms at 8 MiB, 2.3 vs
// 9.7 ms at 16 MiB, 8.9 vs 10.5 ms at 32 MiB (where they cross), 24.5 vs 18.1 at 64 MiB,
// 45.6 vs 29.3 at 128 MiB. Half the loaded crossover: below it a serial scan takes at most
// ~2.3 ms, so an idle machine loses at most about half of that by not using the second core,
// while a loaded one saves the ~7-12 ms wait for it.
constexpr int64_t kSerialScanBytes = int64_t{16} << 20;

// scores[i] = scales[i] * q_scale * sum_j codes[i, j] * q[j] for i < n, the sum exact in int32.
// codes [n, k] int8 row-major, scales [n] float32, q [k] int8 (the quantised query),
// scores [n] float32; k < 2^17. Integer sums make the scores independent of the thread
// count and vector width. Reads n*k bytes: a quarter of an fp32 scan.
void scan_int8_cpu(uintptr_t codes_ptr, uintptr_t scales_ptr, int64_t n, int64_t k, uintptr_t q_ptr,
                   float q_scale, uintptr_t scores_ptr);

}  // namespace cupid
