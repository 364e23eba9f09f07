// Quantised inner-product scan (see csrc/include/cupid/scan.h).
//
// The scan is memory-bound when the arithmetic keeps up with one byte per coordinate:
// both sides are int8 (the query is quantised once per call), products are summed in
// int32, which is exact and associative, so the compiler vectorises the loop freely
// (sign-extend + multiply-add pairs) and every score is the same whatever the thread
// count or vector width. Rows are split over OpenMP threads in static blocks, each score
// computed by one thread, so a serial and a parallel scan give the same bytes.
#include "cupid/scan.h"

#include <omp.h>

#include <stdexcept>
#include <vector>

#include "cupid/parallel.h"

namespace cupid {
namespace {

// Exact: |c|, |q| <= 127 so each product fits in 15 bits and k < 2^17 terms fit in int32.
// The query arrives widened to int16 so that GCC emits 16-bit dot-product instructions
// (vpdpwssd / vpmaddwd) after one sign-extension of the codes, instead of widening both
// sides to 32 bits and multiplying there (measured 2x slower).
inline int32_t row_dot(const int8_t* __restrict c, const int16_t* __restrict q, int64_t k) {
  int32_t acc = 0;
  for (int64_t j = 0; j < k; ++j) acc += static_cast<int32_t>(static_cast<int16_t>(c[j])) * static_cast<int32_t>(q[j]);
  return acc;
}

}  // namespace

void scan_int8_cpu(uintptr_t codes_ptr, uintptr_t scales_ptr, int64_t n, int64_t k, uintptr_t q_ptr,
                   float q_scale, uintptr_t scores_ptr) {
  if (n < 0 || k <= 0) throw std::invalid_argument("scan_int8_cpu: need n >= 0 and k > 0");
  if (k >= (int64_t{1} << 17)) throw std::invalid_argument("scan_int8_cpu: k must be < 2^17 (int32 sums)");
  const auto* codes = reinterpret_cast<const int8_t*>(codes_ptr);
  const auto* scales = reinterpret_cast<const float*>(scales_ptr);
  const auto* q8 = reinterpret_cast<const int8_t*>(q_ptr);
  std::vector<int16_t> q(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) q[j] = q8[j];
  auto* scores = reinterpret_cast<float*>(scores_ptr);
  const int nt = omp_threads(n * k, kSerialScanBytes);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < n; ++i)
    scores[i] = scales[i] * q_scale * static_cast<float>(row_dot(codes + i * k, q.data(), k));
}

}  // namespace cupid
