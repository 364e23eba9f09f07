// Spectral stage of tensorsketch on the CPU: fixed-order, thread-count independent.
//
// Why a kernel for a multiply-accumulate torch could do: torch's complex multiply takes a
// vectorised path for most elements and a scalar path for a tensor's tail (and for the
// tail of every chunk it gives a thread), and the two round differently (one contracts
// a*c - b*d into an FMA). Which path an element takes depends on the tensor's length and
// on the thread count, so a sample's features changed with the batch split and the number
// of threads (measured: 1 vs 2 torch threads differed in ~5% of store rows at the last
// bit). Here every output element is computed by one thread, by the same expression, in
// a fixed order, and this file is compiled with -ffp-contract=off (CMakeLists.txt): the
// vectorised and scalar code round the same way, whatever the row count or thread.
//
// The kernels are serial: callers split rows over threads (featurize/hooks.py runs row
// blocks on a thread pool) and release the GIL through the binding.
// Also stated here, so the file keeps its meaning if compiled with other flags.
#pragma GCC optimize("fp-contract=off")

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cupid/spectral.h"

namespace cupid {
namespace {

// acc[r, f] (=, or += when accumulate) sum_t a[r, t, f] * b[r, t, f], t ascending.
// Complex numbers interleaved (re, im); product (ar br - ai bi, ar bi + ai br).
template <typename T>
void mac_typed(const T* a, const T* b, T* acc, int64_t rows, int64_t steps, int64_t freqs, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    T* o = acc + 2 * r * freqs;
    if (!accumulate) {
      for (int64_t j = 0; j < 2 * freqs; ++j) o[j] = T(0);
    }
    for (int64_t t = 0; t < steps; ++t) {
      const T* ar = a + 2 * (r * steps + t) * freqs;
      const T* br = b + 2 * (r * steps + t) * freqs;
      // Real and imaginary parts in separate loops: GCC's vectoriser recognises the fused
      // complex product in one loop and emits vfmaddsub even under -ffp-contract=off.
      for (int64_t f = 0; f < freqs; ++f) o[2 * f] += ar[2 * f] * br[2 * f] - ar[2 * f + 1] * br[2 * f + 1];
      for (int64_t f = 0; f < freqs; ++f) o[2 * f + 1] += ar[2 * f] * br[2 * f + 1] + ar[2 * f + 1] * br[2 * f];
    }
  }
}

// out[r, f] = sum_j v[r, j] * table[j, f], j ascending (v real, table and out complex).
template <typename T>
void dft_typed(const T* v, const T* table, T* out, int64_t rows, int64_t n, int64_t freqs) {
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + 2 * r * freqs;
    const T* vr = v + r * n;
    for (int64_t f = 0; f < 2 * freqs; ++f) o[f] = T(0);
    for (int64_t j = 0; j < n; ++j) {
      const T c = vr[j];
      const T* tj = table + 2 * j * freqs;
      for (int64_t f = 0; f < 2 * freqs; ++f) o[f] += c * tj[f];
    }
  }
}

void check(int64_t rows, int64_t inner, int64_t freqs, int dtype) {
  if (rows < 0 || inner <= 0 || freqs <= 0)
    throw std::invalid_argument("cupid._C: spectral kernels need rows >= 0, a positive inner size and freqs > 0");
  if (dtype != 0 && dtype != 3)
    throw std::invalid_argument("cupid._C: spectral kernels take float32 (0) or float64 (3), got " +
                                std::to_string(dtype));
}

}  // namespace

void spectral_mac_cpu(uintptr_t a_ptr, uintptr_t b_ptr, uintptr_t acc_ptr, int64_t rows, int64_t steps,
                      int64_t freqs, int dtype, bool accumulate) {
  check(rows, steps, freqs, dtype);
  if (dtype == 0)
    mac_typed(reinterpret_cast<const float*>(a_ptr), reinterpret_cast<const float*>(b_ptr),
              reinterpret_cast<float*>(acc_ptr), rows, steps, freqs, accumulate);
  else
    mac_typed(reinterpret_cast<const double*>(a_ptr), reinterpret_cast<const double*>(b_ptr),
              reinterpret_cast<double*>(acc_ptr), rows, steps, freqs, accumulate);
}

void dft_spectrum_cpu(uintptr_t v_ptr, uintptr_t table_ptr, uintptr_t out_ptr, int64_t rows, int64_t n, int64_t freqs,
                      int dtype) {
  check(rows, n, freqs, dtype);
  if (dtype == 0)
    dft_typed(reinterpret_cast<const float*>(v_ptr), reinterpret_cast<const float*>(table_ptr),
              reinterpret_cast<float*>(out_ptr), rows, n, freqs);
  else
    dft_typed(reinterpret_cast<const double*>(v_ptr), reinterpret_cast<const double*>(table_ptr),
              reinterpret_cast<double*>(out_ptr), rows, n, freqs);
}

}  // namespace cupid
