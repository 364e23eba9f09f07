// Quantised inner-product scan (see csrc/include/cupid/scan.h).
//
// The scan is memory-bound: one int8 per coordinate is read once and widened in
// registers (sign-extend, convert, multiply-add against the fp32 query held in L1).
// Rows are split over OpenMP threads in static blocks; within a row, 16 lanes
// accumulate in a fixed order and are reduced pairwise, so every score is the same
// bit pattern whatever the thread count. The multiply and add are kept separate
// (-ffp-contract=off for this file) so the vector body and the scalar tail round alike.
#include "cupid/scan.h"

#include <omp.h>

#include <cstring>
#include <stdexcept>

namespace cupid {
namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int8_t vi8 __attribute__((vector_size(kLanes)));

inline float row_dot(const int8_t* c, const float* q, int64_t k) {
  vf acc = vf{};
  int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes) {
    vi8 ci;
    vf qv;
    std::memcpy(&ci, c + j, sizeof(ci));
    std::memcpy(&qv, q + j, sizeof(qv));
    acc += __builtin_convertvector(ci, vf) * qv;
  }
  float lanes[kLanes];
  std::memcpy(lanes, &acc, sizeof(acc));
  for (int64_t t = 0; j < k; ++j, ++t) lanes[t % kLanes] += static_cast<float>(c[j]) * q[j];
  // Pairwise reduction in a fixed order.
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int t = 0; t < w; ++t) lanes[t] += lanes[t + w];
  return lanes[0];
}

}  // namespace

void scan_int8_cpu(uintptr_t codes_ptr, uintptr_t scales_ptr, int64_t n, int64_t k, uintptr_t q_ptr,
                   uintptr_t scores_ptr) {
  if (n < 0 || k <= 0) throw std::invalid_argument("scan_int8_cpu: need n >= 0 and k > 0");
  const auto* codes = reinterpret_cast<const int8_t*>(codes_ptr);
  const auto* scales = reinterpret_cast<const float*>(scales_ptr);
  const auto* q = reinterpret_cast<const float*>(q_ptr);
  auto* scores = reinterpret_cast<float*>(scores_ptr);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) scores[i] = scales[i] * row_dot(codes + i * k, q, k);
}

}  // namespace cupid
