// Tensorsketch spectral stage on the CPU (csrc/cpu/spectral.cpp): fixed summation order,
// no FMA contraction, so results do not depend on row count, batch split or threads.
//
// Pointers travel as integers (uintptr_t); the wrapper in cupid_engine/ops/spectral.py
// checks device, dtype, contiguity and shapes. Complex tensors are interleaved (re, im);
// dtype 0 = float32 (complex64), 3 = float64 (complex128).
#pragma once

#include <cstdint>

namespace cupid {

// acc[rows, freqs] = (accumulate ? acc : 0) + sum_{t ascending} a[rows, steps, freqs] * b[rows, steps, freqs].
void spectral_mac_cpu(uintptr_t a_ptr, uintptr_t b_ptr, uintptr_t acc_ptr, int64_t rows, int64_t steps,
                      int64_t freqs, int dtype, bool accumulate);

// out[rows, freqs] = sum_{j ascending} v[rows, n] (real) * table[n, freqs] (complex).
void dft_spectrum_cpu(uintptr_t v_ptr, uintptr_t table_ptr, uintptr_t out_ptr, int64_t rows, int64_t n, int64_t freqs,
                      int dtype);

}  // namespace cupid
