// CUPID-Quality fused kernel on the CPU (see csrc/include/cupid/quality.h).
//
// A = R D^T is computed as a blocked, packed GEMM (Goto/BLIS style) whose epilogue folds
// every finished register tile into per-(rollout row, demo) running minima/maxima, so A
// is never stored:
//
// * Register tile: kMV vectors of rollout rows (with AVX-512: MR = 4 x 16 floats = 64
//   rows, 32 doubles) by kNR = 6 demo columns: 24 accumulators, plus 4 row vectors and one
//   broadcast, fit the 32 AVX-512 registers (GCC/Clang vector extensions; with AVX2 or SSE
//   a 2-vector x 6 tile for their 16 registers, the same arithmetic). Rows run along the
//   vector lanes so that the min over a demo's columns is a lane-wise min: no horizontal
//   reductions per tile.
// * Packing: the rollout rows of a block are packed once as [MR-row panel][k][MR] and the
//   demo columns of a tile as [NR-column panel][k][NR] (zero-padded), so every load in the
//   inner loop is contiguous.
// * K-blocking: for one row panel the k range is cut into kKC slices; the row panel's
//   slice (kKC x MR, 32 KiB) stays in L1 while the tile's demo panels stream from L2.
//   Partial sums of the register tiles live in a buffer of MR x (tile columns) between
//   slices; only after the last slice, with the full-K sum in registers, is the min/max
//   epilogue applied. Every dot product is one FMA chain in ascending k (the buffer holds
//   the chain's running value), so results depend neither on the blocking nor on the
//   thread count.
// * Threads: work items are (rollout row block) x (column chunk of whole demos); OpenMP
//   takes them dynamically. Each item writes the outputs of the rollouts wholly inside
//   its row block directly (columns of its own demos: no two items share an output); a
//   rollout cut by a row-block boundary gets per-block partial results that are folded
//   after the parallel region. min/max are exact, so the fold order does not matter.
//
// Extra memory per thread: the packed row block (MC x k), the packed tile (NC x k), the
// partial-sum buffer (MR x NC) and running minima/maxima (tile demos x MC).
#include "cupid/quality.h"

#include "cupid/parallel.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

namespace cupid {
namespace {

// Register tile: kMV row vectors x kNR demo columns of accumulators, plus kMV row vectors
// and one broadcast, must fit the vector registers: 32 with AVX-512, 16 otherwise.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kMV = 4;  // 24 accumulators + 5 of 32 registers
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kMV = 2;  // 12 accumulators + 3 of 16 registers
#else
constexpr int kVecBytes = 16;
constexpr int kMV = 2;
#endif
constexpr int kNR = 6;                // demo columns per register tile
constexpr int64_t kKC = 128;          // k slice: MR x kKC row panel (32 KiB) stays in L1
constexpr int64_t kNC = 240;          // demo columns per packed tile (a multiple of kNR)
constexpr int64_t kMaxMC = 512;       // rollout rows per block (packed once per work item)
constexpr int64_t kBlockElems = 1 << 19;  // bound on the packed row block (rows x k)

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / sizeof(T);
};

template <typename T>
constexpr int64_t mr() {
  return Vec<T>::lanes * kMV;
}

template <typename T>
inline typename Vec<T>::type vmin(typename Vec<T>::type a, typename Vec<T>::type b) {
  return a < b ? a : b;  // x86 min semantics: a NaN in the new value is not taken
}

template <typename T>
inline typename Vec<T>::type vmax(typename Vec<T>::type a, typename Vec<T>::type b) {
  return a > b ? a : b;
}

// One register tile: c[v][j] (+)= sum_{kk < kc} a[kk][v-th vector] * b[kk][j].
// kLoad: start from the partial sums in cbuf (else from zero). kFinish: the k range is
// complete, so fold the tile into the running minima/maxima of its demos (cd[j]: local
// demo of column j, -1 for padding); else store the partial sums back to cbuf.
// rmin/rmax point at this row panel's first row of local demo 0; rstride: per demo.
template <typename T, bool kLoad, bool kFinish>
inline void tile(const T* __restrict a, const T* __restrict b, int64_t kc, T* __restrict cbuf, const int32_t* cd,
                 T* __restrict rmin, T* __restrict rmax, int64_t rstride) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  constexpr int MR = L * kMV;
  V c[kMV][kNR];
  if constexpr (kLoad) {
    for (int j = 0; j < kNR; ++j)
      for (int v = 0; v < kMV; ++v) std::memcpy(&c[v][j], cbuf + j * MR + v * L, sizeof(V));
  } else {
    for (int j = 0; j < kNR; ++j)
      for (int v = 0; v < kMV; ++v) c[v][j] = V{};
  }
  for (int64_t kk = 0; kk < kc; ++kk) {
    V av[kMV];
    for (int v = 0; v < kMV; ++v) std::memcpy(&av[v], a + kk * MR + v * L, sizeof(V));
    const T* bk = b + kk * kNR;
    for (int j = 0; j < kNR; ++j) {
      const T x = bk[j];
      for (int v = 0; v < kMV; ++v) c[v][j] += av[v] * x;
    }
  }
  if constexpr (!kFinish) {
    for (int j = 0; j < kNR; ++j)
      for (int v = 0; v < kMV; ++v) std::memcpy(cbuf + j * MR + v * L, &c[v][j], sizeof(V));
  } else {
    // Columns are sorted by demo: first == last means the whole tile is one demo, the
    // common case, reduced across columns in registers before touching memory.
    if (cd[0] >= 0 && cd[0] == cd[kNR - 1]) {
      T* mn = rmin + cd[0] * rstride;
      T* mx = rmax + cd[0] * rstride;
      for (int v = 0; v < kMV; ++v) {
        V lo = c[v][0], hi = c[v][0];
        for (int j = 1; j < kNR; ++j) {
          lo = vmin<T>(c[v][j], lo);
          hi = vmax<T>(c[v][j], hi);
        }
        V m0, m1;
        std::memcpy(&m0, mn + v * L, sizeof(V));
        std::memcpy(&m1, mx + v * L, sizeof(V));
        m0 = vmin<T>(lo, m0);
        m1 = vmax<T>(hi, m1);
        std::memcpy(mn + v * L, &m0, sizeof(V));
        std::memcpy(mx + v * L, &m1, sizeof(V));
      }
    } else {
      for (int j = 0; j < kNR; ++j) {
        if (cd[j] < 0) continue;
        T* mn = rmin + cd[j] * rstride;
        T* mx = rmax + cd[j] * rstride;
        for (int v = 0; v < kMV; ++v) {
          V m0, m1;
          std::memcpy(&m0, mn + v * L, sizeof(V));
          std::memcpy(&m1, mx + v * L, sizeof(V));
          m0 = vmin<T>(c[v][j], m0);
          m1 = vmax<T>(c[v][j], m1);
          std::memcpy(mn + v * L, &m0, sizeof(V));
          std::memcpy(mx + v * L, &m1, sizeof(V));
        }
      }
    }
  }
}

// One row panel against one packed tile: all k slices, the epilogue after the last.
template <typename T>
void panel_times_tile(const T* apan, const T* btile, int64_t k, int64_t npanels, T* cbuf, const int32_t* cd,
                      T* rmin, T* rmax, int64_t rstride) {
  constexpr int64_t MR = mr<T>();
  const int64_t nslices = (k + kKC - 1) / kKC;
  for (int64_t s = 0; s < nslices; ++s) {
    const int64_t k0 = s * kKC, kc = std::min(kKC, k - k0);
    const T* a = apan + k0 * MR;
    const bool first = s == 0, last = s == nslices - 1;
    for (int64_t q = 0; q < npanels; ++q) {
      const T* b = btile + (q * k + k0) * kNR;
      T* cb = cbuf + q * kNR * MR;
      const int32_t* cq = cd + q * kNR;
      if (first && last) tile<T, false, true>(a, b, kc, cb, cq, rmin, rmax, rstride);
      else if (first) tile<T, false, false>(a, b, kc, cb, cq, rmin, rmax, rstride);
      else if (last) tile<T, true, true>(a, b, kc, cb, cq, rmin, rmax, rstride);
      else tile<T, true, false>(a, b, kc, cb, cq, rmin, rmax, rstride);
    }
  }
}

// Where a row block's rows fold their results: one destination per rollout segment.
template <typename T>
struct Segment {
  int64_t row0, row1;  // local rows of the block
  T* mm;               // maxmin destination of demo 0 (row of the output or of an edge buffer)
  T* xm;
};

template <typename T>
void run_quality(const T* r, const int64_t* r_off, int64_t m, const T* d, const int64_t* d_off, int64_t n,
                 int64_t k, T* maxmin, T* minmax) {
  constexpr int64_t MR = mr<T>();
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t rows_r = r_off[m];

  std::fill(maxmin, maxmin + m * n, -inf);
  std::fill(minmax, minmax + m * n, inf);

  // Row blocks: whole MR panels, MC rows (fewer for large k so the packed block stays small).
  const int64_t mc = std::max<int64_t>(MR, std::min<int64_t>(kMaxMC, kBlockElems / k / MR * MR));
  const int64_t nblocks = (rows_r + mc - 1) / mc;

  // Column chunks of whole demos: enough items to balance the threads, each at least a
  // few tiles wide so the row block is packed once per many tiles.
  const int threads = omp_threads(2 * rows_r * d_off[n] * k, kSerialQualityFlops);
  const int64_t want_chunks = std::max<int64_t>(1, (4 * threads + nblocks - 1) / nblocks);
  const int64_t cols_total = d_off[n];
  const int64_t target = std::max<int64_t>(2 * kNC, (cols_total + want_chunks - 1) / want_chunks);
  std::vector<int64_t> chunk{0};
  for (int64_t e = 0; e < n; ++e)
    if (e > chunk.back() && d_off[e] - d_off[chunk.back()] >= target) chunk.push_back(e);
  chunk.push_back(n);
  const int64_t nchunks = static_cast<int64_t>(chunk.size()) - 1;

  // Rollouts cut by a row-block boundary: per block, slot 0 for the rollout crossing its
  // start, slot 1 for the one crossing its end (a rollout spanning the block uses slot 1).
  std::vector<T> edge_mm(static_cast<size_t>(nblocks * 2 * n), -inf), edge_xm(edge_mm.size(), inf);
  std::vector<int64_t> edge_t(static_cast<size_t>(nblocks * 2), -1);
  std::vector<std::vector<Segment<T>>> segments(static_cast<size_t>(nblocks));
  {
    int64_t t = 0;
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t i0 = b * mc, i1 = std::min(rows_r, i0 + mc);
      while (r_off[t + 1] <= i0) ++t;
      for (int64_t u = t; u < m && r_off[u] < i1; ++u) {
        const int64_t a0 = std::max(r_off[u], i0), a1 = std::min(r_off[u + 1], i1);
        int slot = -1;
        if (r_off[u + 1] > i1) slot = 1;
        else if (r_off[u] < i0) slot = 0;
        Segment<T> seg{a0 - i0, a1 - i0, maxmin + u * n, minmax + u * n};
        if (slot >= 0) {
          edge_t[b * 2 + slot] = u;
          seg.mm = edge_mm.data() + (b * 2 + slot) * n;
          seg.xm = edge_xm.data() + (b * 2 + slot) * n;
        }
        segments[b].push_back(seg);
      }
    }
  }

  const int64_t nitems = nblocks * nchunks;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<T> apack, bpack, cbuf, rmin, rmax;
    std::vector<int32_t> cd;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < nitems; ++item) {
      const int64_t b = item / nchunks, ch = item % nchunks;
      const int64_t i0 = b * mc, rows = std::min(rows_r, i0 + mc) - i0;
      const int64_t apanels = (rows + MR - 1) / MR;
      const int64_t rpad = apanels * MR;
      // Pack the row block: [panel][k][MR], rows past the block zero.
      apack.assign(static_cast<size_t>(rpad * k), T(0));
      for (int64_t p = 0; p < apanels; ++p)
        for (int64_t a = 0; a < MR && p * MR + a < rows; ++a) {
          const T* src = r + (i0 + p * MR + a) * k;
          T* dst = apack.data() + p * k * MR + a;
          for (int64_t kk = 0; kk < k; ++kk) dst[kk * MR] = src[kk];
        }
      const int64_t e_begin = chunk[ch], e_end = chunk[ch + 1];
      const int64_t c_begin = d_off[e_begin], c_end = d_off[e_end];
      // Running minima/maxima, [local demo][rpad]; local demo 0 of a tile may be the demo
      // continued from the previous tile (its values are carried over). Tiles are kNC
      // columns regardless of demo boundaries, so a long demo never needs a long tile.
      int64_t e_first = e_begin;  // demo holding the tile's first column
      bool carried = false;       // whether it began in the previous tile
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kNC) {
        const int64_t c1 = std::min(c_end, c0 + kNC), cols = c1 - c0;
        const int64_t bpanels = (cols + kNR - 1) / kNR;
        int64_t e_last = e_first;
        while (d_off[e_last + 1] < c1) ++e_last;
        const int64_t nd = e_last - e_first + 1;
        cd.assign(static_cast<size_t>(bpanels * kNR), -1);
        for (int64_t e = e_first; e <= e_last; ++e)
          for (int64_t c = std::max(d_off[e], c0); c < std::min(d_off[e + 1], c1); ++c)
            cd[c - c0] = static_cast<int32_t>(e - e_first);
        bpack.assign(static_cast<size_t>(bpanels * kNR * k), T(0));
        for (int64_t q = 0; q < bpanels; ++q) {
          T* dst = bpack.data() + q * k * kNR;
          const int64_t jn = std::min<int64_t>(kNR, cols - q * kNR);
          for (int64_t j = 0; j < jn; ++j) {
            const T* src = d + (c0 + q * kNR + j) * k;
            for (int64_t kk = 0; kk < k; ++kk) dst[kk * kNR + j] = src[kk];
          }
        }
        // Running values: demo 0 keeps the carried ones if it continues; the rest start at +-inf.
        if (!carried) {
          rmin.assign(static_cast<size_t>(nd * rpad), inf);
          rmax.assign(static_cast<size_t>(nd * rpad), -inf);
        } else {
          rmin.resize(static_cast<size_t>(nd * rpad));
          rmax.resize(static_cast<size_t>(nd * rpad));
          std::fill(rmin.begin() + rpad, rmin.end(), inf);
          std::fill(rmax.begin() + rpad, rmax.end(), -inf);
        }
        cbuf.resize(static_cast<size_t>(bpanels * kNR * MR));
        for (int64_t p = 0; p < apanels; ++p)
          panel_times_tile<T>(apack.data() + p * k * MR, bpack.data(), k, bpanels, cbuf.data(), cd.data(),
                              rmin.data() + p * MR, rmax.data() + p * MR, rpad);
        // Fold every demo that ends in this tile into its rollouts; carry the one that goes on.
        const bool last_open = d_off[e_last + 1] > c1;
        const int64_t nfold = last_open ? nd - 1 : nd;
        for (const Segment<T>& seg : segments[b])
          for (int64_t l = 0; l < nfold; ++l) {
            const T* mn = rmin.data() + l * rpad;
            const T* mx = rmax.data() + l * rpad;
            T best_mm = seg.mm[e_first + l], best_xm = seg.xm[e_first + l];
            for (int64_t i = seg.row0; i < seg.row1; ++i) {
              best_mm = std::max(best_mm, mn[i]);
              best_xm = std::min(best_xm, mx[i]);
            }
            seg.mm[e_first + l] = best_mm;
            seg.xm[e_first + l] = best_xm;
          }
        if (last_open) {
          if (nd > 1) {
            std::copy(rmin.begin() + (nd - 1) * rpad, rmin.begin() + nd * rpad, rmin.begin());
            std::copy(rmax.begin() + (nd - 1) * rpad, rmax.begin() + nd * rpad, rmax.begin());
          }
        }
        e_first = last_open ? e_last : e_last + 1;
        carried = last_open;
      }
    }
  }
  // Rollouts cut by block boundaries: fold each block's partial results.
  for (int64_t s = 0; s < nblocks * 2; ++s) {
    const int64_t t = edge_t[s];
    if (t < 0) continue;
    for (int64_t e = 0; e < n; ++e) {
      maxmin[t * n + e] = std::max(maxmin[t * n + e], edge_mm[s * n + e]);
      minmax[t * n + e] = std::min(minmax[t * n + e], edge_xm[s * n + e]);
    }
  }
}

}  // namespace

void quality_minmax_cpu(uintptr_t r_ptr, uintptr_t r_off_ptr, int64_t m, uintptr_t d_ptr, uintptr_t d_off_ptr,
                        int64_t n, int64_t k, uintptr_t maxmin_ptr, uintptr_t minmax_ptr, int dtype) {
  if (m <= 0 || n <= 0 || k <= 0) throw std::invalid_argument("quality_minmax_cpu: m, n and k must be positive");
  const auto* r_off = reinterpret_cast<const int64_t*>(r_off_ptr);
  const auto* d_off = reinterpret_cast<const int64_t*>(d_off_ptr);
  if (r_off[0] != 0 || d_off[0] != 0) throw std::invalid_argument("quality_minmax_cpu: offsets must start at 0");
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
