// CUPID-Quality fused kernel on the CPU (see csrc/include/cupid/quality.h).
//
// Work split: demos are grouped into tiles of whole demos (~kTileCols steps); OpenMP
// threads take tiles dynamically, so each output column is written by exactly one
// thread (no atomics) and the result does not depend on the thread count. Within a
// tile the demo rows are packed transposed in column panels of two 512-bit vectors, so
// the micro-kernel is an outer-product update of an 8-row x 2-vector accumulator block
// held in registers (GCC/Clang vector extensions: AVX-512, AVX2 or SSE as -march
// allows); every dot product is accumulated in k order, deterministic. Rollout rows are
// processed kRowBlock at a time; the epilogue folds each dot product into per-(row,
// demo) running min/max, then folds rows into their rollout segment. Extra memory per
// thread: one packed tile plus kRowBlock x (demos in tile) minima/maxima, independent
// of the rollout count.
#include "cupid/quality.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

namespace cupid {
namespace {

constexpr int64_t kTileCols = 256;  // demo steps per tile (whole demos; a longer demo is its own tile)
constexpr int64_t kRowBlock = 64;   // rollout rows per block (a multiple of kMicro)
constexpr int kMicro = 8;           // rollout rows sharing one panel load
constexpr int kVecBytes = 64;       // one 512-bit vector (two 256-bit halves without AVX-512)
constexpr int kPanelVecs = 2;       // vectors per panel row: 8 x 2 accumulators stay in registers

// GCC/Clang vector extensions: the micro-kernel is written once for float and double and
// the compiler emits AVX-512, AVX2 or SSE code, whichever -march allows.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / sizeof(T);
};

template <typename T>
constexpr int panel_width() {
  return Vec<T>::lanes * kPanelVecs;
}

// acc[a][j] = sum_kk rows[a][kk] * pan[kk][j] for kMicro rows and one panel of P columns.
// Sums run in kk order, so results do not depend on tiling or thread count.
template <typename T>
inline void micro_kernel(const T* const* rows, const T* pan, int64_t k, T* acc) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V c[kMicro][kPanelVecs];
  for (int a = 0; a < kMicro; ++a)
    for (int v = 0; v < kPanelVecs; ++v) c[a][v] = V{};
  for (int64_t kk = 0; kk < k; ++kk) {
    V p[kPanelVecs];
    for (int v = 0; v < kPanelVecs; ++v) std::memcpy(&p[v], pan + (kk * kPanelVecs + v) * L, sizeof(V));
    for (int a = 0; a < kMicro; ++a) {
      const T x = rows[a][kk];
      for (int v = 0; v < kPanelVecs; ++v) c[a][v] += x * p[v];
    }
  }
  for (int a = 0; a < kMicro; ++a)
    for (int v = 0; v < kPanelVecs; ++v) std::memcpy(acc + (a * kPanelVecs + v) * L, &c[a][v], sizeof(V));
}

template <typename T>
void run_quality(const T* r, const int64_t* r_off, int64_t m, const T* d, const int64_t* d_off, int64_t n,
                 int64_t k, T* maxmin, T* minmax) {
  constexpr int P = panel_width<T>();
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t rows_r = r_off[m];

  // Rollout segment of every rollout row (small: one int per row).
  std::vector<int64_t> row_seg(rows_r);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t i = r_off[t]; i < r_off[t + 1]; ++i) row_seg[i] = t;

  // Tiles of whole demos.
  std::vector<int64_t> tile_start{0};
  for (int64_t e = 0; e < n; ++e) {
    const int64_t first = tile_start.back();
    if (e > first && d_off[e + 1] - d_off[first] > kTileCols) tile_start.push_back(e);
  }
  tile_start.push_back(n);
  const int64_t n_tiles = static_cast<int64_t>(tile_start.size()) - 1;

  for (int64_t t = 0; t < m; ++t)
    for (int64_t e = 0; e < n; ++e) {
      maxmin[t * n + e] = -inf;
      minmax[t * n + e] = inf;
    }

#pragma omp parallel
  {
    std::vector<T> packed;      // [panels][k][P]
    std::vector<int32_t> col_demo;  // local demo index of each packed column
    std::vector<T> rmin, rmax;  // [kRowBlock][demos in tile]
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      const int64_t e0 = tile_start[tile], e1 = tile_start[tile + 1];
      const int64_t c0 = d_off[e0], c1 = d_off[e1];
      const int64_t cols = c1 - c0, nd = e1 - e0;
      const int64_t panels = (cols + P - 1) / P;
      packed.assign(static_cast<size_t>(panels * k * P), T(0));
      col_demo.assign(static_cast<size_t>(panels * P), -1);  // -1: padding column
      for (int64_t e = e0; e < e1; ++e)
        for (int64_t c = d_off[e]; c < d_off[e + 1]; ++c) col_demo[c - c0] = static_cast<int32_t>(e - e0);
      for (int64_t c = 0; c < cols; ++c) {
        const T* src = d + (c0 + c) * k;
        T* dst = packed.data() + (c / P) * k * P + (c % P);
        for (int64_t kk = 0; kk < k; ++kk) dst[kk * P] = src[kk];
      }
      rmin.resize(static_cast<size_t>(kRowBlock * nd));
      rmax.resize(static_cast<size_t>(kRowBlock * nd));

      for (int64_t i0 = 0; i0 < rows_r; i0 += kRowBlock) {
        const int64_t ib = std::min(kRowBlock, rows_r - i0);
        std::fill(rmin.begin(), rmin.begin() + ib * nd, inf);
        std::fill(rmax.begin(), rmax.begin() + ib * nd, -inf);
        for (int64_t p = 0; p < panels; ++p) {
          const T* pan = packed.data() + p * k * P;
          const int32_t* pdemo = col_demo.data() + p * P;
          for (int64_t ii = 0; ii < ib; ii += kMicro) {
            const int mr = static_cast<int>(std::min<int64_t>(kMicro, ib - ii));
            T acc[kMicro][P];
            const T* rows[kMicro];
            // A partial block repeats its last row: computed, never folded in.
            for (int a = 0; a < kMicro; ++a) rows[a] = r + (i0 + ii + std::min(a, mr - 1)) * k;
            micro_kernel<T>(rows, pan, k, &acc[0][0]);
            for (int a = 0; a < mr; ++a) {
              T* mn = rmin.data() + (ii + a) * nd;
              T* mx = rmax.data() + (ii + a) * nd;
              for (int j = 0; j < P; ++j) {
                const int32_t e = pdemo[j];
                if (e < 0) continue;
                mn[e] = std::min(mn[e], acc[a][j]);
                mx[e] = std::max(mx[e], acc[a][j]);
              }
            }
          }
        }
        // Fold rows into their rollout: max over rows of the row minima, min of the maxima.
        for (int64_t ii = 0; ii < ib; ++ii) {
          const int64_t t = row_seg[i0 + ii];
          T* out_mm = maxmin + t * n + e0;
          T* out_xm = minmax + t * n + e0;
          const T* mn = rmin.data() + ii * nd;
          const T* mx = rmax.data() + ii * nd;
          for (int64_t e = 0; e < nd; ++e) {
            out_mm[e] = std::max(out_mm[e], mn[e]);
            out_xm[e] = std::min(out_xm[e], mx[e]);
          }
        }
      }
    }
  }
}

}  // namespace

void quality_minmax_cpu(uintptr_t r_ptr, uintptr_t r_off_ptr, int64_t m, uintptr_t d_ptr, uintptr_t d_off_ptr,
                        int64_t n, int64_t k, uintptr_t maxmin_ptr, uintptr_t minmax_ptr, int dtype) {
  if (m <= 0 || n <= 0 || k <= 0) throw std::invalid_argument("quality_minmax_cpu: m, n and k must be positive");
  const auto* r_off = reinterpret_cast<const int64_t*>(r_off_ptr);
  const auto* d_off = reinterpret_cast<const int64_t*>(d_off_ptr);
  for (int64_t t = 0; t < m; ++t)
    if (r_off[t + 1] <= r_off[t]) throw std::invalid_argument("quality_minmax_cpu: empty or unsorted rollout segment");
  for (int64_t e = 0; e < n; ++e)
    if (d_off[e + 1] <= d_off[e]) throw std::invalid_argument("quality_minmax_cpu: empty or unsorted demo segment");
  if (dtype == 0) {
    run_quality<float>(reinterpret_cast<const float*>(r_ptr), r_off, m, reinterpret_cast<const float*>(d_ptr), d_off,
                       n, k, reinterpret_cast<float*>(maxmin_ptr), reinterpret_cast<float*>(minmax_ptr));
  } else if (dtype == 3) {
    run_quality<double>(reinterpret_cast<const double*>(r_ptr), r_off, m, reinterpret_cast<const double*>(d_ptr),
                        d_off, n, k, reinterpret_cast<double*>(maxmin_ptr), reinterpret_cast<double*>(minmax_ptr));
  } else {
    throw std::invalid_argument("quality_minmax_cpu: dtype must be 0 (float32) or 3 (float64)");
  }
}

}  // namespace cupid
