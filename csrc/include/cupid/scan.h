// Quantised inner-product scan of the query index (int8 codes with a per-row scale).
//
// Pointers travel as integers (uintptr_t); the Python wrapper in
// cupid_engine/index/quantized.py has checked dtype, contiguity and shapes.
#pragma once

#include <cstdint>

namespace cupid {

// scores[i] = scales[i] * sum_j codes[i, j] * q[j] for i < n.
// codes [n, k] int8 row-major, scales [n] float32, q [k] float32, scores [n] float32.
// Each row's dot product is summed in a fixed lane order, so the scores do not depend
// on the thread count. Reads n*k bytes: a quarter of an fp32 scan.
void scan_int8_cpu(uintptr_t codes_ptr, uintptr_t scales_ptr, int64_t n, int64_t k, uintptr_t q_ptr,
                   uintptr_t scores_ptr);

}  // namespace cupid
