// Quantised inner-product scan of the query index (int8 codes with a per-row scale).
//
// Pointers travel as integers (uintptr_t); the Python wrapper in
// cupid_engine/index/quantized.py has checked dtype, contiguity and shapes.
#pragma once

#include <cstdint>

namespace cupid {

// scores[i] = scales[i] * q_scale * sum_j codes[i, j] * q[j] for i < n, the sum exact in int32.
// codes [n, k] int8 row-major, scales [n] float32, q [k] int8 (the quantised query),
// scores [n] float32; k < 2^17. Integer sums make the scores independent of the thread
// count and vector width. Reads n*k bytes: a quarter of an fp32 scan.
void scan_int8_cpu(uintptr_t codes_ptr, uintptr_t scales_ptr, int64_t n, int64_t k, uintptr_t q_ptr,
                   float q_scale, uintptr_t scores_ptr);

}  // namespace cupid
