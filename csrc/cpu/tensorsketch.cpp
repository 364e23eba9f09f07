// Tensorsketch on the CPU with its own FFT, W samples per SIMD lane group.
//
// Why not torch.fft: with T steps per sample the FFT route pays 2T real FFTs of length k
// per sample, and torch's CPU FFT ran at ~15 us per 4096-point transform here, plus a
// zero-fill and a scatter pass over [B, T, k] count-sketch buffers in memory (at T = 16,
// B = 256, k = 4096: 128 MiB written, then read by the FFT). Here each thread takes W
// samples (one per lane of a 512-bit vector) and, per layer and step, scatters the W
// factor rows straight into its FFT input buffer (cache-resident), transforms all W at
// once (every instruction works on W transforms, no shuffles), and multiply-accumulates
// the spectra in place; one inverse FFT per group at the end. Nothing of size [B, T, k]
// ever exists. W is the build's vector width (16 float32 with AVX-512, 8 with AVX, 4 with
// SSE; half as many float64).
//
// Transforms. A real FFT of length k is a complex FFT of length m = k/2 on
// z[n] = v[2n] + i v[2n+1] followed by the usual split step, and the inverse likewise.
// The complex FFT is four-step (m = m1 m2, see Plan) over radix-4 Stockham autosort
// sub-transforms (no bit reversal; ping-pong buffers), with a radix-2 last stage when the
// sub-length's log2 is odd. Twiddles are computed in double with cos/sin of the exact
// angle (not by recurrence) and rounded once to the working type. The spectra of the two
// factors are never formed: see the step sums P1, P2 in tensorsketch_typed.
//
// Determinism. Lanes never mix: a sample's features depend on its own inputs only, not on
// which group or lane it landed in (padding lanes hold zeros) or on the thread count.
// They differ from torch.fft (pocketfft) by float rounding (a different FFT algorithm):
// tests/ops/test_tensorsketch_routes.py compares them with the definition in float64
// (1e-12) and float32, and checks batch-split, lane and thread independence bit for bit.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "cupid/parallel.h"
#include "cupid/tensorsketch.h"

namespace cupid {
namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;

// fn(begin, end) over [0, n) in contiguous chunks on up to omp_get_max_threads() threads
// (the count _C.set_num_threads sets). Each item is computed by one thread, so results do
// not depend on the count or on which thread runs a chunk.
//
// Where: an OpenMP region on the process's pool, except in a forked child. The pool is the
// one torch's own ops run on (the module links libgomp.so.1, the copy torch has loaded),
// and its workers keep spinning for a while after torch's last region: on the hook path
// this call follows the capture's backward at once, and per-call std::threads then shared
// the two cores with a spinning worker (sketch 13.2 ms after a capture vs 11.1 ms with
// GOMP_SPINCOUNT=10000, MLP B = 1024, k = 4096, 2 threads, issue 19); in the pool that
// worker takes its chunk instead. A forked child keeps per-call std::threads: libgomp's pool
// does not survive fork() (a child forked after the parent ran a region hung in its first
// one, see cupid/parallel.h), and a per-call thread is safe there at ~tens of microseconds.
template <typename F>
void parallel_chunks(int64_t n, int64_t min_per_thread, F&& fn) {
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), n / std::max<int64_t>(1, min_per_thread)));
  if (want <= 1 || n <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::exception_ptr> errors(want);
  // Chunk t of `parts`, its exception kept for the caller's thread.
  auto chunk = [&](int64_t t, int64_t parts) {
    try {
      fn(n * t / parts, n * (t + 1) / parts);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  if (!in_forked_child()) {
    // The team may be smaller than asked (nested inside another region: one thread);
    // chunks follow the team actually started, so every item is still covered once.
#pragma omp parallel num_threads(static_cast<int>(want))
    chunk(omp_get_thread_num(), omp_get_num_threads());
  } else {
    std::vector<std::thread> threads;
    threads.reserve(want - 1);
    for (int64_t t = 1; t < want; ++t) threads.emplace_back(chunk, t, want);
    chunk(0, want);
    for (auto& th : threads) th.join();
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// One SIMD register of the widest vector ISA the build targets: a lane group is that many
// samples (GCC splits wider generic vectors into several registers, but it scalarised
// them in an AVX2 build, 13x slower; so the vector is never wider than the ISA).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct Lanes {
  typedef T V __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / static_cast<int>(sizeof(T));
};

// Stockham twiddles of one complex transform length m.
template <typename T>
struct Stock {
  int64_t m = 0;
  // Per radix-4 stage (lengths n = m, m/4, ... >= 4): for p < n/4, w^p, w^2p, w^3p with
  // w = exp(-2 pi i / n), concatenated stage after stage.
  std::vector<T> w1r, w1i, w2r, w2i, w3r, w3i;

  explicit Stock(int64_t m_ = 1) : m(m_) {
    for (int64_t n = m; n >= 4; n /= 4) {
      for (int64_t p = 0; p < n / 4; ++p) {
        for (int r = 1; r <= 3; ++r) {
          // Reduce the angle index modulo n exactly before converting to radians.
          const double a = kTwoPi * static_cast<double>((r * p) % n) / static_cast<double>(n);
          auto& vr = r == 1 ? w1r : r == 2 ? w2r : w3r;
          auto& vi = r == 1 ? w1i : r == 2 ? w2i : w3i;
          vr.push_back(static_cast<T>(std::cos(a)));
          vi.push_back(static_cast<T>(-std::sin(a)));
        }
      }
    }
  }
};

// A complex FFT of length m = k / 2 as m1 x m2 (four-step: m2 column FFTs of length m1,
// twiddles exp(-2 pi i n2 k1 / m), m1 row FFTs of length m2), each sub-transform run in an
// L1-sized local buffer: two passes over the L2-resident [m] vectors instead of one pass per
// radix-4 stage. Small m (<= kDirectMax) is one Stockham transform.
constexpr int64_t kDirectMax = 64;

// Layouts. The FFT input z holds element n = m2 n1 + n2 at zpos(n) = n1 ld + n2 with
// ld = m2 + 1: a column (fixed n2) is then strided by ld vectors, not by a power of two
// (a 2 KiB stride maps every column load to the same two L1 sets). Spectra (za and the
// step sums) hold frequency f = k1 + m1 k2 at spos(f) = k1 m2 + k2, the order in which the
// row pass produces them, so those writes are contiguous too.
template <typename T>
struct Plan {
  int64_t m = 0, k = 0, m1 = 0, m2 = 0, ld = 1, zsize = 0;
  int lg1 = 0;
  Stock<T> full, s1, s2;
  std::vector<T> tr, ti;  // [m2][m1] four-step twiddles
  std::vector<T> sr, si;  // split step: exp(-2 pi i f / k), f <= m

  explicit Plan(int64_t k_) : m(k_ / 2), k(k_) {
    if (m <= kDirectMax) {
      full = Stock<T>(m);
      m1 = m;
      m2 = 1;
      ld = 1;
      zsize = m;
    } else {
      int lg = 0;
      while ((int64_t{1} << lg) < m) ++lg;
      m2 = int64_t{1} << (lg / 2);
      m1 = m / m2;
      lg1 = lg - lg / 2;
      ld = m2 + 1;
      zsize = m1 * ld;
      s1 = Stock<T>(m1);
      s2 = Stock<T>(m2);
      for (int64_t n2 = 0; n2 < m2; ++n2)
        for (int64_t k1 = 0; k1 < m1; ++k1) {
          const double a = kTwoPi * static_cast<double>((n2 * k1) % m) / static_cast<double>(m);
          tr.push_back(static_cast<T>(std::cos(a)));
          ti.push_back(static_cast<T>(-std::sin(a)));
        }
    }
    for (int64_t f = 0; f <= m; ++f) {
      const double a = kTwoPi * static_cast<double>(f) / static_cast<double>(k);
      sr.push_back(static_cast<T>(std::cos(a)));
      si.push_back(static_cast<T>(-std::sin(a)));
    }
  }
  int64_t zpos(int64_t n) const { return m2 == 1 ? n : (n / m2) * ld + (n % m2); }
  int64_t spos(int64_t f) const { return m2 == 1 ? f : (f & (m1 - 1)) * m2 + (f >> lg1); }
};

// Complex FFT of length st.m on W lanes of (xr, xi) [m] vectors with scratch (yr, yi); the
// result is left in (xr, xi) or in (yr, yi): the returned flag says which (true: y).
// Forward: X[f] = sum_n x[n] exp(-2 pi i f n / m); inverse (Inv): exp(+...), unnormalised.
// ir != nullptr: the input is ir/ii[e * is] (e < m, strided, e.g. a four-step column read
// straight from its buffer) instead of (xr, xi), which are then scratch: the first radix-4
// stage reads it there (the same butterflies, so the same values as copying the column
// into (xr, xi) first). m >= 4 with a strided input.
// out (not nullptr): the last stage hands each output X[f] to out(f, re, im) instead of
// storing it (the same values; the return value is then meaningless).
template <typename T, bool Inv, typename Out = std::nullptr_t>
bool cfft(typename Lanes<T>::V* xr, typename Lanes<T>::V* xi, typename Lanes<T>::V* yr, typename Lanes<T>::V* yi,
          const Stock<T>& plan, const typename Lanes<T>::V* ir = nullptr, const typename Lanes<T>::V* ii = nullptr,
          int64_t is = 1, Out&& out = nullptr) {
  constexpr bool kOut = !std::is_same_v<std::decay_t<Out>, std::nullptr_t>;
  using V = typename Lanes<T>::V;
  const int64_t m = plan.m;
  V *ar = xr, *ai = xi, *br = yr, *bi = yi;
  int64_t n = m, s = 1;
  size_t tw = 0;
  // One radix-4 stage from (in_r, in_i) into (br, bi). Strided: the first stage (s = 1),
  // element e at in[e * st].
  auto stage = [&](auto strided, auto emit, const V* in_r, const V* in_i, int64_t st) {
    const int64_t n1 = n / 4, n2 = n / 2, n3 = n1 + n2;
    for (int64_t p = 0; p < n1; ++p) {
      const T w1r = plan.w1r[tw + p], w2r = plan.w2r[tw + p], w3r = plan.w3r[tw + p];
      const T w1i = Inv ? -plan.w1i[tw + p] : plan.w1i[tw + p];
      const T w2i = Inv ? -plan.w2i[tw + p] : plan.w2i[tw + p];
      const T w3i = Inv ? -plan.w3i[tw + p] : plan.w3i[tw + p];
      const V* a_r = strided ? in_r + st * p : in_r + s * p;
      const V* a_i = strided ? in_i + st * p : in_i + s * p;
      // input element offsets of the butterfly's four points (q = 0 when strided: s = 1)
      const int64_t e1 = strided ? st * n1 : s * n1, e2 = strided ? st * n2 : s * n2, e3 = strided ? st * n3 : s * n3;
      V* o_r = br + s * 4 * p;
      V* o_i = bi + s * 4 * p;
      // p = 0: every twiddle is 1 (a quarter of the butterflies at n = 16, all at n = 4).
      const bool one = p == 0;
      for (int64_t q = 0; q < s; ++q) {
        const V pr = a_r[q], pi = a_i[q];
        const V qr = a_r[q + e1], qi = a_i[q + e1];
        const V cr = a_r[q + e2], ci = a_i[q + e2];
        const V dr = a_r[q + e3], di = a_i[q + e3];
        const V apc_r = pr + cr, apc_i = pi + ci, amc_r = pr - cr, amc_i = pi - ci;
        const V bpd_r = qr + dr, bpd_i = qi + di, bmd_r = qr - dr, bmd_i = qi - di;
        // u1 = amc - j*bmd (forward) / amc + j*bmd (inverse); u3 the other sign.
        V u1r, u1i, u3r, u3i;
        if (Inv) {
          u1r = amc_r - bmd_i; u1i = amc_i + bmd_r;
          u3r = amc_r + bmd_i; u3i = amc_i - bmd_r;
        } else {
          u1r = amc_r + bmd_i; u1i = amc_i - bmd_r;
          u3r = amc_r - bmd_i; u3i = amc_i + bmd_r;
        }
        const V u2r = apc_r - bpd_r, u2i = apc_i - bpd_i;
        if constexpr (decltype(emit)::value) {  // the last stage (n = 4: p = 0, no twiddles)
          if constexpr (kOut) {
            out(q, apc_r + bpd_r, apc_i + bpd_i);
            out(q + s, u1r, u1i);
            out(q + 2 * s, u2r, u2i);
            out(q + 3 * s, u3r, u3i);
          }
          continue;
        }
        o_r[q] = apc_r + bpd_r;
        o_i[q] = apc_i + bpd_i;
        if (one) {
          o_r[q + s] = u1r;
          o_i[q + s] = u1i;
          o_r[q + 2 * s] = u2r;
          o_i[q + 2 * s] = u2i;
          o_r[q + 3 * s] = u3r;
          o_i[q + 3 * s] = u3i;
        } else {
          o_r[q + s] = u1r * w1r - u1i * w1i;
          o_i[q + s] = u1r * w1i + u1i * w1r;
          o_r[q + 2 * s] = u2r * w2r - u2i * w2i;
          o_i[q + 2 * s] = u2r * w2i + u2i * w2r;
          o_r[q + 3 * s] = u3r * w3r - u3i * w3i;
          o_i[q + 3 * s] = u3r * w3i + u3i * w3r;
        }
      }
    }
  };
  auto advance = [&] {
    tw += static_cast<size_t>(n / 4);
    std::swap(ar, br);
    std::swap(ai, bi);
    n /= 4;
    s *= 4;
  };
  if (ir != nullptr) {
    if (kOut && n == 4)
      stage(std::true_type{}, std::bool_constant<kOut>{}, ir, ii, is);
    else
      stage(std::true_type{}, std::false_type{}, ir, ii, is);
    advance();
  }
  while (n >= 4) {
    if (kOut && n == 4)
      stage(std::false_type{}, std::bool_constant<kOut>{}, ar, ai, int64_t{1});
    else
      stage(std::false_type{}, std::false_type{}, ar, ai, int64_t{1});
    advance();
  }
  if (n == 2) {  // radix-2 last stage, into (xr, xi)
    for (int64_t q = 0; q < s; ++q) {
      const V pr = ar[q], pi = ai[q], qr = ar[q + s], qi = ai[q + s];
      if constexpr (kOut) {
        out(q, pr + qr, pi + qi);
        out(q + s, pr - qr, pi - qi);
        continue;
      }
      xr[q] = pr + qr;
      xi[q] = pi + qi;
      xr[q + s] = pr - qr;
      xi[q + s] = pi - qi;
    }
    return false;
  }
  return ar != xr;
}

// Complex FFT of length plan.m of (zr, zi); each output X[f] is handed to sink(f, re, im)
// exactly once. loc: 4 * max(m1, m2) local vectors.
// Single Stockham transform (m2 == 1): in place, and (zr, zi) are left all zero.
// Four-step: the column pass reads (zr, zi) and writes its output to (yr, yi) (the same
// layout), the row pass works in place there. (zr, zi) are not written (unless they are
// (yr, yi)): a caller that scattered a count sketch into them zeroes just the scattered
// slots afterwards (zero_slots), instead of the whole buffer being zeroed row by row (one
// 2 KiB memset per row: ~1.4 ms of an MLP call of ~23 ms, one thread).
// live (four-step only; nullptr: all): live[n2] == 0 promises that input column n2 (elements
// n = m2 n1 + n2) is all zero. Its column FFT and twiddle pass are skipped and the column
// of (yr, yi) is set to the zeros they would have written, so the row pass reads the same
// values (a count sketch with few buckets, e.g. a 7-wide output layer's factor, fills 5 of
// the 32 columns at k = 4096).
template <typename T, bool Inv, typename Sink>
void fft_m(typename Lanes<T>::V* zr, typename Lanes<T>::V* zi, typename Lanes<T>::V* yr, typename Lanes<T>::V* yi,
           typename Lanes<T>::V* loc, const Plan<T>& plan, const uint8_t* live, Sink&& sink) {
  using V = typename Lanes<T>::V;
  const int64_t m = plan.m;
  if (plan.m2 == 1) {
    const bool in_y = cfft<T, Inv>(zr, zi, loc, loc + m, plan.full);
    const V* rr = in_y ? loc : zr;
    const V* ri = in_y ? loc + m : zi;
    for (int64_t f = 0; f < m; ++f) sink(f, rr[f], ri[f]);
    std::memset(static_cast<void*>(zr), 0, sizeof(V) * m);
    std::memset(static_cast<void*>(zi), 0, sizeof(V) * m);
    return;
  }
  const int64_t m1 = plan.m1, m2 = plan.m2;
  V* ar = loc;
  V* ai = loc + m1;
  V* br = loc + 2 * m1;
  V* bi = loc + 3 * m1;
  const int64_t ld = plan.ld;
  // Columns: c[n1] = z[m2 n1 + n2] -> FFT_m1 -> * w_m^(n2 k1) -> y[m2 k1 + n2] (at row k1 of ld).
  for (int64_t n2 = 0; n2 < m2; ++n2) {
    if (live != nullptr && !live[n2]) {
      for (int64_t k1 = 0; k1 < m1; ++k1) {
        yr[ld * k1 + n2] = V{};
        yi[ld * k1 + n2] = V{};
      }
      continue;
    }
    // The column c[n1] = z[ld n1 + n2] is read in place by the first stage (no copy), and
    // the last stage's outputs go straight to y, times the four-step twiddles.
    const T* twr = plan.tr.data() + n2 * m1;
    const T* twi = plan.ti.data() + n2 * m1;
    if (n2 == 0) {  // twiddles of column 0 are all 1
      cfft<T, Inv>(ar, ai, br, bi, plan.s1, zr + n2, zi + n2, ld, [&](int64_t k1, const V& cr, const V& ci) {
        yr[ld * k1] = cr;
        yi[ld * k1] = ci;
      });
      continue;
    }
    cfft<T, Inv>(ar, ai, br, bi, plan.s1, zr + n2, zi + n2, ld, [&](int64_t k1, const V& cr, const V& ci) {
      const T wr = twr[k1], wi = Inv ? -twi[k1] : twi[k1];
      yr[ld * k1 + n2] = cr * wr - ci * wi;
      yi[ld * k1 + n2] = cr * wi + ci * wr;
    });
  }
  // Rows: r[n2] = y[m2 k1 + n2] (contiguous) -> FFT_m2 -> X[k1 + m1 k2].
  for (int64_t k1 = 0; k1 < m1; ++k1) {
    V* rr = yr + ld * k1;
    V* ri = yi + ld * k1;
    const bool in_y = cfft<T, Inv>(rr, ri, br, bi, plan.s2);
    const V* xr = in_y ? br : rr;
    const V* xi = in_y ? bi : ri;
    for (int64_t k2 = 0; k2 < m2; ++k2) sink(k1 + m1 * k2, xr[k2], xi[k2]);
  }
}

// After a four-step fft_m of a scattered count sketch: zero the n slots it was scattered
// into (flat lane-0 offsets idx, see flat_offsets), leaving z all zero for the next scatter.
// A single Stockham transform zeroed all of z itself.
template <typename T>
void zero_slots(typename Lanes<T>::V* z, const Plan<T>& plan, const int64_t* idx, int64_t n) {
  constexpr int W = Lanes<T>::W;
  if (plan.m2 == 1) return;
  for (int64_t j = 0; j < n; ++j) z[idx[j] / W] = typename Lanes<T>::V{};
}

// With AVX-512 and offsets that fit 32 bits: calls f(j, v) for j = 0 .. n-1 in order, v the
// vector of src[l * sb + j] for l < lanes (0 in the other lanes), fetched by one masked
// gather, and returns true; otherwise returns false without calling f (the caller's scalar
// path). One gather setup for scatter_rows and gather_rows.
template <typename T, typename F>
bool for_each_gathered(const T* src, int64_t sb, int lanes, int64_t n, F&& f) {
#ifdef __AVX512F__
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  if (sb * (W - 1) >= (int64_t{1} << 31) / static_cast<int64_t>(sizeof(T))) return false;
  constexpr int64_t kAhead = 64;
  alignas(64) int32_t off[16];
  for (int l = 0; l < 16; ++l) off[l] = static_cast<int32_t>(l < W ? l * sb : 0);
  const __m512i vindex = _mm512_load_si512(reinterpret_cast<const void*>(off));
  if constexpr (std::is_same_v<T, float>) {
    const __mmask16 mask = static_cast<__mmask16>((uint32_t{1} << lanes) - 1);
    for (int64_t j = 0; j < n; ++j) {
      if ((j & 15) == 0 && j + kAhead < n)  // the rows' lines kAhead coordinates on
        for (int l = 0; l < lanes; ++l) __builtin_prefetch(src + l * sb + j + kAhead);
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, vindex, src + j, 4);
      f(j, reinterpret_cast<const V&>(v));
    }
  } else {
    const __mmask8 mask = static_cast<__mmask8>((uint32_t{1} << lanes) - 1);
    const __m256i vi = _mm512_castsi512_si256(vindex);
    for (int64_t j = 0; j < n; ++j) {
      const __m512d v = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), mask, vi, src + j, 8);
      f(j, reinterpret_cast<const V&>(v));
    }
  }
  return true;
#else
  (void)src, (void)sb, (void)lanes, (void)n, (void)f;
  return false;
#endif
}

// z[idx[j] / W] lane l += sg[j] * src[l * sb + j] for l < lanes, j ascending. With AVX-512 the
// W values of one j are fetched by one masked gather and added as one vector (the lanes of
// one bucket are one 64-byte vector); otherwise lane by lane. Same sums, same order per lane.
template <typename T>
void scatter_rows(const T* src, int64_t sb, int lanes, int64_t n, const int64_t* idx, const T* sg,
                  typename Lanes<T>::V* z) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  if (for_each_gathered<T>(src, sb, lanes, n, [&](int64_t j, const V& v) { z[idx[j] / W] += sg[j] * v; })) return;
  T* flat = reinterpret_cast<T*>(z);
  for (int l = 0; l < lanes; ++l) {
    const T* row = src + l * sb;
    T* base = flat + l;
    for (int64_t j = 0; j < n; ++j) base[idx[j]] += sg[j] * row[j];
  }
}

// dst[j] lane l = sg[j] * src[l * sb + j] for l < lanes (0 in the other lanes), j < n: the
// W samples' factor values of one coordinate as one vector (the direct route's operands).
template <typename T>
void gather_rows(const T* src, int64_t sb, int lanes, int64_t n, const T* sg, typename Lanes<T>::V* dst) {
  using V = typename Lanes<T>::V;
  if (for_each_gathered<T>(src, sb, lanes, n, [&](int64_t j, const V& v) { dst[j] = sg[j] * v; })) return;
  for (int64_t j = 0; j < n; ++j) {
    V v = {};
    for (int l = 0; l < lanes; ++l) v[l] = src[l * sb + j];
    dst[j] = sg[j] * v;
  }
}

// 1 in the first `lanes` lanes, 0 in the others: a stored 1 gathered by gather_rows/scatter_rows.
template <typename T>
typename Lanes<T>::V lane_ones(int lanes) {
  typename Lanes<T>::V v = {};
  for (int l = 0; l < lanes; ++l) v[l] = T(1);
  return v;
}

// Per-thread buffers of one lane group ([m] complex vectors each, re then im).
template <typename T>
struct Work {
  using V = typename Lanes<T>::V;
  // z: FFT input (count sketches scattered in, all zero between them); y: the four-step
  // transforms' work buffer (and the inverse's input); za: spectrum Z of the packed first
  // factor; p1, p2: the step sums sum_t Za[f] Zb[f] and sum_t Za[f] conj(Zb[m - f]); loc:
  // sub-transform buffers.
  std::vector<V> z, y, za, p1, p2, loc;
  explicit Work(const Plan<T>& p)
      : z(2 * p.zsize), y(2 * p.zsize), za(2 * p.m), p1(2 * p.m), p2(2 * p.m), loc(4 * std::max(p.m1, p.m2)) {}
};

// z (all zero: fresh, or left so by fft_m) += the packed count sketch
// z[n] = CS(v)[2n] + i CS(v)[2n + 1] of W factor rows.
template <typename T>
void pack_factor(const T* src, int64_t sb, int lanes, int64_t n, const int64_t* idx, const T* sg, Work<T>& w) {
  scatter_rows<T>(src, sb, lanes, n, idx, sg, w.z.data());
}

template <typename T>
struct Layer {
  const T* delta;
  const T* x;
  int64_t steps, O, I, d_sb, d_st, x_sb, x_st;
  std::vector<int64_t> idx1, idx2;  // flat lane-0 offsets into z of each bucket
  std::vector<T> sg1, sg2;
  std::vector<uint8_t> live1, live2;  // four-step input columns a factor's buckets reach (fft_m)
  bool direct = false;                // the direct route (time domain, no FFT): see tensorsketch_typed
  bool x_one = false;                 // x's last coordinate (I - 1) is a constant 1 not in memory (a bias)
  std::vector<int64_t> h1, h2;        // raw buckets in [0, k) (direct route)
  // Direct route, products in bucket-block order (empty: the (o, i) loop): entry
  // o | i << 16 | bucket << 32 for every (o, i), stably sorted by bucket / kDirectBlock.
  std::vector<uint64_t> prods;
};

// Buckets per block of the direct route's product order: 128 lane vectors (8 KiB of td) stay
// in L1 while the block's products are added, instead of each product's random
// read-modify-write of the k-vector td going to L2 (256 KiB at k = 4096).
constexpr int64_t kDirectBlock = 128;
// Largest O * I laid out as a product list (8 bytes per product); wider layers (forced onto
// the direct route) keep the (o, i) loop.
constexpr int64_t kDirectListMax = int64_t{1} << 20;

// The direct route's products (o ascending, then i) stably sorted by bucket block: the
// products of one bucket keep their (o, i) order, so every td[j] receives the same additions
// in the same order as the (o, i) loop, bit for bit.
inline std::vector<uint64_t> direct_products(const std::vector<int64_t>& h1, const std::vector<int64_t>& h2,
                                             int64_t k) {
  const int64_t O = static_cast<int64_t>(h1.size()), I = static_cast<int64_t>(h2.size());
  if (O > 65536 || I > 65536 || O * I > kDirectListMax || k > (int64_t{1} << 31)) return {};
  const int64_t nb = (k + kDirectBlock - 1) / kDirectBlock;
  std::vector<int64_t> start(static_cast<size_t>(nb) + 1, 0);
  auto bucket = [&](int64_t o, int64_t i) {
    int64_t j = h1[o] + h2[i];
    return j - (j >= k ? k : 0);
  };
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i) ++start[static_cast<size_t>(bucket(o, i) / kDirectBlock) + 1];
  for (int64_t b = 0; b < nb; ++b) start[b + 1] += start[b];
  std::vector<uint64_t> out(static_cast<size_t>(O * I));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i) {
      const int64_t j = bucket(o, i);
      out[static_cast<size_t>(start[j / kDirectBlock]++)] =
          static_cast<uint64_t>(o) | static_cast<uint64_t>(i) << 16 | static_cast<uint64_t>(j) << 32;
    }
  return out;
}

// live[n2] = 1 for the four-step input columns n2 that buckets b fill (element b / 2 of the
// packed z sits in column (b / 2) mod m2); empty (all live) for a single Stockham transform.
template <typename T>
std::vector<uint8_t> live_columns(const int64_t* b, int64_t n, const Plan<T>& plan) {
  if (plan.m2 == 1) return {};
  std::vector<uint8_t> live(static_cast<size_t>(plan.m2), 0);
  for (int64_t j = 0; j < n; ++j) live[static_cast<size_t>((b[j] >> 1) % plan.m2)] = 1;
  return live;
}

template <typename T>
std::vector<int64_t> flat_offsets(const int64_t* b, int64_t n, const Plan<T>& plan) {
  constexpr int W = Lanes<T>::W;
  std::vector<int64_t> idx(n);
  // Bucket h holds v[h] of z[h / 2] = v[2n] + i v[2n + 1]: the real part for even h, the
  // imaginary part (stored after the zsize real vectors) for odd h.
  for (int64_t j = 0; j < n; ++j)
    idx[j] = ((b[j] & 1) ? plan.zsize : 0) * W + plan.zpos(b[j] >> 1) * W;
  return idx;
}

#ifdef __AVX512F__
// rows[l][j] = v[j][l] for a 16 x 16 float block: unpack pairs of floats, then of doubles,
// then 128-bit lanes twice (64 shuffles).
inline void transpose16(const __m512* v, __m512* rows) {
  __m512 t[16], u[16], w[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  // u[4q + c]: within each 128-bit lane j, element 4j + c of rows 4q .. 4q + 3.
  for (int q = 0; q < 4; ++q) {
    const __m512d a = _mm512_castps_pd(t[4 * q]), b = _mm512_castps_pd(t[4 * q + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * q + 1]), d = _mm512_castps_pd(t[4 * q + 3]);
    u[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {
    // w[4c]: columns c, 8 + c of rows 0-7; w[4c + 1]: columns 4 + c, 12 + c of rows 0-7;
    // w[4c + 2], w[4c + 3]: the same of rows 8-15.
    w[4 * c] = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    w[4 * c + 1] = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    w[4 * c + 2] = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    w[4 * c + 3] = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    rows[c] = _mm512_shuffle_f32x4(w[4 * c], w[4 * c + 2], 0x88);
    rows[8 + c] = _mm512_shuffle_f32x4(w[4 * c], w[4 * c + 2], 0xdd);
    rows[4 + c] = _mm512_shuffle_f32x4(w[4 * c + 1], w[4 * c + 3], 0x88);
    rows[12 + c] = _mm512_shuffle_f32x4(w[4 * c + 1], w[4 * c + 3], 0xdd);
  }
}
#endif

// Why two step sums instead of the spectra. With Z = FFT_m of the packed factor
// (z[n] = v[2n] + i v[2n+1]), the rfft is X[f] = E[f] + w^f O[f] with
// E = (Z[f] + conj Z[m-f]) / 2, O = (Z[f] - conj Z[m-f]) / 2i, w = exp(-2 pi i / k). The
// product of two such spectra expands into four sums over the steps, S1 = sum Za[f] Zb[f],
// S2 = sum Za[f] conj Zb[m-f], S3 = conj S2[m-f], S4 = conj S1[m-f]:
//   C[f] = (S1 + S2 + S3 + S4) / 4 + w^f (S1 - S4) / 2i - w^2f (S1 - S2 - S3 + S4) / 4,
// so per step only P1 = S1 and P2 = S2 are accumulated (two complex multiply-adds per
// frequency, fed straight from the second factor's FFT), and the split is done once per
// group instead of twice per step.
//
// The direct route (Layer::direct). A layer with a narrow factor (the MLP's 41-wide input
// layer, its 7-wide action head) costs two full transforms on the FFT route, but its
// sketch is only T O I hashed products: CS(vec G)[(h1(o) + h2(i)) mod k] += s1(o) s2(i)
// delta_t[o] x_t[i]. Those are accumulated in the time domain, W lanes per vector, into td
// [k] (t, then o, then i ascending), and td is added to the inverse FFT's output (or is the
// output when no layer takes the FFT route). Exact, like the others; which route a layer
// takes changes the float rounding of its contribution only (the caller's cost model picks
// it from the shapes, so a call always rounds the same way). Without direct layers the
// kernel runs exactly as before (same instructions, same bytes).
//
// sums (nullptr: none): sums[b] = the sum of row b of out (lane-vector sums over the
// lane-major result, in a fixed order), for the caller's NaN/Inf check without another pass
// over the [B, k] output.
template <typename T>
void tensorsketch_typed(const std::vector<Layer<T>>& layers, const Plan<T>& plan, T* out, int64_t batch, int64_t k,
                        T* sums) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const int64_t m = plan.m;
  const int64_t groups = (batch + W - 1) / W;
  bool any_fft = false, any_direct = false;
  int64_t max_o = 0, max_i = 0;
  for (const Layer<T>& L : layers) {
    if (L.direct) {
      any_direct = true;
      max_o = std::max(max_o, L.O);
      max_i = std::max(max_i, L.I);
    } else {
      any_fft = true;
    }
  }
  // Non-temporal output stores need every row 64-byte aligned and whole 16-float pieces
  // (W = 16 float32 lanes, m * W * 2 floats addressable by int32 gather offsets).
  const bool streamed = std::is_same_v<T, float> && W == 16 && k % 16 == 0 && m * W * 2 < (int64_t{1} << 31) &&
                        reinterpret_cast<uintptr_t>(out) % 64 == 0;
  (void)streamed;
  // Groups are handed out one at a time (an atomic counter), not in fixed halves: on a
  // shared machine a thread that waits for a core leaves its groups to the one that runs.
  // A group's result does not depend on the thread that computes it.
  // The first FFT layer with a step (-1: none): its step 0 initialises the step sums.
  int64_t first_fft = -1;
  for (size_t li = 0; li < layers.size() && first_fft < 0; ++li)
    if (!layers[li].direct && layers[li].steps > 0) first_fft = static_cast<int64_t>(li);
  std::atomic<int64_t> next_group{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), groups));
  parallel_chunks(nthreads, 1, [&](int64_t, int64_t) {
    Work<T> w(plan);
    // Direct route: time-domain accumulator (k vectors) and the gathered factor values.
    std::vector<V> td(any_direct ? k : 0), dv(static_cast<size_t>(max_o)), xv(static_cast<size_t>(max_i));
    V* zr = w.z.data();
    V* zi = zr + plan.zsize;
    V* yr = w.y.data();
    V* yi = yr + plan.zsize;
    V* ar = w.za.data();
    V* ai = ar + m;
    V* p1r = w.p1.data();
    V* p1i = p1r + m;
    V* p2r = w.p2.data();
    V* p2i = p2r + m;
    // A zero the optimiser cannot see through: `zero + x` is then evaluated like `p + x`
    // with p a stored zero (not folded to x: that would flip a -0 to +0 differently).
    V zero = {};
    asm volatile("" : "+v"(zero));
    for (int64_t g = next_group.fetch_add(1); g < groups; g = next_group.fetch_add(1)) {
      const int64_t b0 = g * W;
      const int lanes = static_cast<int>(std::min<int64_t>(W, batch - b0));
      // The step sums start at zero: the group's first FFT step writes 0 + its products
      // (opaque zero, see below) instead of adding them to a cleared buffer; only when no
      // FFT layer has a step are they cleared (C[f] = 0).
      if (any_fft && first_fft < 0) {
        std::memset(static_cast<void*>(w.p1.data()), 0, sizeof(V) * 2 * m);
        std::memset(static_cast<void*>(w.p2.data()), 0, sizeof(V) * 2 * m);
      }
      for (size_t li = 0; li < layers.size(); ++li) {
        const Layer<T>& L = layers[li];
        if (L.direct) {
          V* acc = td.data();
          const int64_t* h2 = L.h2.data();
          for (int64_t t = 0; t < L.steps; ++t) {
            gather_rows<T>(L.delta + b0 * L.d_sb + t * L.d_st, L.d_sb, lanes, L.O, L.sg1.data(), dv.data());
            const int64_t nx = L.x_one ? L.I - 1 : L.I;
            gather_rows<T>(L.x + b0 * L.x_sb + t * L.x_st, L.x_sb, lanes, nx, L.sg2.data(), xv.data());
            if (L.x_one) xv[nx] = L.sg2[nx] * lane_ones<T>(lanes);
            if (!L.prods.empty()) {  // block by block (see direct_products)
              const V* dvp = dv.data();
              const V* xvp = xv.data();
              for (const uint64_t e : L.prods)
                acc[e >> 32] += dvp[e & 0xffff] * xvp[(e >> 16) & 0xffff];
              continue;
            }
            for (int64_t o = 0; o < L.O; ++o) {
              const V a = dv[o];
              const int64_t base = L.h1[o];
              for (int64_t i = 0; i < L.I; ++i) {
                int64_t j = base + h2[i];
                j -= j >= k ? k : 0;
                acc[j] += a * xv[i];
              }
            }
          }
          continue;
        }
        for (int64_t t = 0; t < L.steps; ++t) {
          const bool first = static_cast<int64_t>(li) == first_fft && t == 0;
          pack_factor<T>(L.delta + b0 * L.d_sb + t * L.d_st, L.d_sb, lanes, L.O, L.idx1.data(), L.sg1.data(), w);
          fft_m<T, false>(zr, zi, yr, yi, w.loc.data(), plan, L.live1.empty() ? nullptr : L.live1.data(), [&](int64_t f, const V& re, const V& im) {
            const int64_t sf = plan.spos(f);
            ar[sf] = re;
            ai[sf] = im;
          });
          zero_slots<T>(zr, plan, L.idx1.data(), L.O);
          // The constant 1 goes last, as the stored column would (same sums, same order).
          const int64_t nx = L.x_one ? L.I - 1 : L.I;
          pack_factor<T>(L.x + b0 * L.x_sb + t * L.x_st, L.x_sb, lanes, nx, L.idx2.data(), L.sg2.data(), w);
          if (L.x_one) w.z[L.idx2[nx] / W] += L.sg2[nx] * lane_ones<T>(lanes);
          // P1[f] += Za[f] Zb[f]; P2[m-f] += Za[m-f] conj(Zb[f]) (indices mod m). On the
          // group's first step the old sums are the opaque zero `zero` (same expression, so
          // the same contraction and rounding as adding to a cleared buffer: 0 + x = x).
          auto mac = [&](auto first_step) {
            fft_m<T, false>(zr, zi, yr, yi, w.loc.data(), plan, L.live2.empty() ? nullptr : L.live2.data(), [&](int64_t f, const V& br, const V& bi) {
              const int64_t sf = plan.spos(f);
              const int64_t g2 = plan.spos((m - f) & (m - 1));
              const V o1r = first_step ? zero : p1r[sf], o1i = first_step ? zero : p1i[sf];
              p1r[sf] = o1r + (ar[sf] * br - ai[sf] * bi);
              p1i[sf] = o1i + (ar[sf] * bi + ai[sf] * br);
              const V o2r = first_step ? zero : p2r[g2], o2i = first_step ? zero : p2i[g2];
              p2r[g2] = o2r + (ar[g2] * br + ai[g2] * bi);
              p2i[g2] = o2i + (ai[g2] * br - ar[g2] * bi);
            });
          };
          if (first)
            mac(std::true_type{});
          else
            mac(std::false_type{});
          zero_slots<T>(zr, plan, L.idx2.data(), L.I);
        }
      }
      if (any_fft) {
        // C[f] for f = 0..m, then the inverse split Z'[f] = E'[f] + i O'[f] with
        // E' = (C[f] + conj C[m-f]) / 2, O' = w^-f (C[f] - conj C[m-f]) / 2, for f < m.
        // C[m-f] is needed beside C[f]: compute both from the sums at f and m - f.
        auto spectrum = [&](int64_t f, V& cr, V& ci) {
          const int64_t fm = plan.spos(f & (m - 1)), gm = plan.spos((m - f) & (m - 1));
          const V s1r = p1r[fm], s1i = p1i[fm], s2r = p2r[fm], s2i = p2i[fm];
          const V s3r = p2r[gm], s3i = -p2i[gm], s4r = p1r[gm], s4i = -p1i[gm];
          const T q = T(0.25), h = T(0.5);
          const V er = (s1r + s2r + s3r + s4r) * q, ei = (s1i + s2i + s3i + s4i) * q;
          // (S1 - S4) / 2i = (Im, -Re) / 2
          const V dr = (s1i - s4i) * h, di = (s4r - s1r) * h;
          const V fr = (s1r - s2r - s3r + s4r) * q, fi = (s1i - s2i - s3i + s4i) * q;
          const T w1r = plan.sr[f], w1i = plan.si[f];
          // w^2f = exp(-2 pi i 2f / k) = exp(-2 pi i f / m): the split table at 2f mod k, folded.
          const int64_t f2 = (2 * f) % k;
          const T w2r = f2 <= m ? plan.sr[f2] : plan.sr[k - f2];
          const T w2i = f2 <= m ? plan.si[f2] : -plan.si[k - f2];
          cr = er + (dr * w1r - di * w1i) - (fr * w2r - fi * w2i);
          ci = ei + (dr * w1i + di * w1r) - (fr * w2i + fi * w2r);
        };
        const T half = T(0.5);
        for (int64_t f = 0; f <= m / 2; ++f) {
          const int64_t f2 = m - f;
          V cfr, cfi, cgr, cgi;
          spectrum(f, cfr, cfi);
          spectrum(f2, cgr, cgi);
          // Z'[f] from C[f], C[m-f]; Z'[m-f] from C[m-f], C[f] (f = 0 pairs C[0] with C[m]).
          for (int side = 0; side < 2; ++side) {
            const int64_t ff = side == 0 ? f : f2;
            if (ff == m || (side == 1 && f2 == f)) continue;
            const V ar_ = side == 0 ? cfr : cgr, ai_ = side == 0 ? cfi : cgi;
            const V br_ = side == 0 ? cgr : cfr, bi_ = side == 0 ? cgi : cfi;
            const V er = (ar_ + br_) * half, ei = (ai_ - bi_) * half;
            const V dr = (ar_ - br_) * half, di = (ai_ + bi_) * half;
            const T cr = plan.sr[ff], ci = -plan.si[ff];  // w^-f
            const V orr = dr * cr - di * ci, oi = dr * ci + di * cr;
            const int64_t zp = plan.zpos(ff);  // the inverse's input goes to y (z stays zero)
            yr[zp] = er - oi;
            yi[zp] = ei + orr;
          }
        }
        // The inverse's outputs go unscaled into za (free by now) in the order the row pass
        // produces them (position spos(n), contiguous); the finishing pass below reads them
        // back in row order n. Storing them in row order from the sink wrote a stride of m1
        // vectors (4 KiB at k = 4096: one L1 set), and so did the direct layers' td reads.
        fft_m<T, true>(yr, yi, yr, yi, w.loc.data(), plan, nullptr, [&](int64_t n, const V& re, const V& im) {
          const int64_t sn = plan.spos(n);
          ar[sn] = re;
          ai[sn] = im;
        });
      }
      // Output element 2n + r of the group's rows: re/im of the inverse's n-th value times
      // 1/m, plus the direct layers' td[2n + r] (td left zero for the next group); td alone
      // when no layer takes the FFT route. `v * scale + td` is one expression, as before the
      // change (contracted to one fused multiply-add, the same rounding), and the empty asm
      // keeps the rounded value from being fused into the row sums' additions.
      const T scale = T(1) / static_cast<T>(m);
      auto finish = [&](int64_t n, V& re, V& im) {
        if (!any_fft) {
          re = td[2 * n];
          im = td[2 * n + 1];
        } else {
          const int64_t sn = plan.spos(n);
          if (any_direct) {
            re = ar[sn] * scale + td[2 * n];
            im = ai[sn] * scale + td[2 * n + 1];
          } else {
            re = ar[sn] * scale;
            im = ai[sn] * scale;
          }
        }
        if (any_direct) {
          td[2 * n] = V{};
          td[2 * n + 1] = V{};
        }
        asm("" : "+v"(re), "+v"(im));
      };
      V sr_ = {}, si_ = {};  // row sums: n ascending, as the values are finished
#ifdef __AVX512F__
      // float32, k a multiple of 16 and 64-byte aligned rows: 8 finished values (16 vectors,
      // re/im interleaved as in the row) are transposed in registers into 16 pieces of 16
      // floats, one per sample, each written by a non-temporal store (the [B, k] output is
      // far larger than the caches and is not read here again; a normal store first reads
      // each line for ownership). Data movement only: the same values as the loop below.
      if constexpr (std::is_same_v<T, float>) {
        if (streamed) {
          for (int64_t n0 = 0; n0 < m; n0 += 8) {
            __m512 v[16];
            for (int i = 0; i < 8; ++i) {
              V re, im;
              finish(n0 + i, re, im);
              if (sums != nullptr) {
                sr_ += re;
                si_ += im;
              }
              v[2 * i] = reinterpret_cast<const __m512&>(re);
              v[2 * i + 1] = reinterpret_cast<const __m512&>(im);
            }
            __m512 rows[16];
            transpose16(v, rows);
            for (int l = 0; l < lanes; ++l) _mm512_stream_ps(out + (b0 + l) * k + 2 * n0, rows[l]);
          }
          if (sums != nullptr) {
            const V tot = sr_ + si_;
            for (int l = 0; l < lanes; ++l) sums[b0 + l] = tot[l];
          }
          continue;
        }
      }
#endif
      // Elsewhere: finished values lane-major into p1 (free by now: the step sums were
      // consumed by the split), then each sample's row written contiguously, tile by tile.
      for (int64_t n = 0; n < m; ++n) {
        V re, im;
        finish(n, re, im);
        if (sums != nullptr) {
          sr_ += re;
          si_ += im;
        }
        p1r[n] = re;
        p1i[n] = im;
      }
      if (sums != nullptr) {
        const V tot = sr_ + si_;
        for (int l = 0; l < lanes; ++l) sums[b0 + l] = tot[l];
      }
      constexpr int64_t kTile = 16;  // vectors per tile: 2 KiB of values stays in L1 across the lanes
      for (int64_t n0 = 0; n0 < m; n0 += kTile) {
        const int64_t n1 = std::min(m, n0 + kTile);
        for (int l = 0; l < lanes; ++l) {
          T* o = out + (b0 + l) * k;
          const T* sr = reinterpret_cast<const T*>(p1r) + l;
          const T* si = reinterpret_cast<const T*>(p1i) + l;
          for (int64_t n = n0; n < n1; ++n) {
            o[2 * n] = sr[n * W];
            o[2 * n + 1] = si[n * W];
          }
        }
      }
    }
#ifdef __AVX512F__
    if (streamed) _mm_sfence();  // order the non-temporal stores before this thread is joined
#endif
  });
}

template <typename T>
void hash_typed(const T* g, const int64_t* b1, const int64_t* s1, const int64_t* b2, const int64_t* s2, T* out,
                int64_t batch, int64_t O, int64_t I, int64_t k, bool accumulate) {
  std::vector<int64_t> bb2(b2, b2 + I);
  std::vector<T> ss2(I);
  for (int64_t i = 0; i < I; ++i) ss2[i] = static_cast<T>(s2[i]);
  // Rows handed out in blocks of 4 by an atomic counter (see tensorsketch_typed). Below 2^20
  // hashed entries (~2 ms on one core) the call runs on the calling thread alone: a started
  // thread is joined even when it finds no work left, and on a loaded machine its first time
  // slice can come several ms late (the hook path hashes a stride-1 Conv1d tap by tap, five
  // calls of 0.06-1 M entries per UNet layer).
  constexpr int64_t kRows = 4;
  constexpr int64_t kSerialEntries = int64_t{1} << 20;
  std::atomic<int64_t> next_row{0};
  const int64_t nthreads = batch * O * I < kSerialEntries
                               ? 1
                               : std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), batch / kRows));
  parallel_chunks(nthreads, 1, [&](int64_t, int64_t) {
  for (int64_t b0 = next_row.fetch_add(kRows); b0 < batch; b0 = next_row.fetch_add(kRows))
  for (int64_t b = b0; b < std::min(batch, b0 + kRows); ++b) {
    T* o = out + b * k;
    if (!accumulate) std::fill(o, o + k, T(0));
    const T* gb = g + b * O * I;
    for (int64_t r = 0; r < O; ++r) {
      const T sr = static_cast<T>(s1[r]);
      const int64_t base = b1[r];
      const T* row = gb + r * I;
      for (int64_t i = 0; i < I; ++i) {
        int64_t j = base + bb2[i];
        j -= j >= k ? k : 0;
        o[j] += (sr * ss2[i]) * row[i];
      }
    }
  }
  });
}

void check_table(const int64_t* b, const int64_t* s, int64_t n, int64_t k) {
  for (int64_t i = 0; i < n; ++i) {
    if (b[i] < 0 || b[i] >= k) throw std::invalid_argument("cupid._C: tensorsketch bucket table out of range");
    if (s[i] != 1 && s[i] != -1) throw std::invalid_argument("cupid._C: tensorsketch sign table must hold +-1");
  }
}

template <typename T>
void run_fft(const std::vector<uintptr_t>& delta_ptrs, const std::vector<uintptr_t>& x_ptrs,
             const std::vector<int64_t>& steps, const std::vector<int64_t>& out_dims, const std::vector<int64_t>& in_dims,
             const std::vector<int64_t>& d_sb, const std::vector<int64_t>& d_st, const std::vector<int64_t>& x_sb,
             const std::vector<int64_t>& x_st, const std::vector<uintptr_t>& b1_ptrs,
             const std::vector<uintptr_t>& s1_ptrs, const std::vector<uintptr_t>& b2_ptrs,
             const std::vector<uintptr_t>& s2_ptrs, const std::vector<int64_t>& direct,
             const std::vector<int64_t>& x_ones, T* out, int64_t batch, int64_t k, T* sums) {
  const Plan<T> plan(k);
  std::vector<Layer<T>> layers;
  for (size_t l = 0; l < delta_ptrs.size(); ++l) {
    Layer<T> L;
    L.delta = reinterpret_cast<const T*>(delta_ptrs[l]);
    L.x = reinterpret_cast<const T*>(x_ptrs[l]);
    L.steps = steps[l];
    L.O = out_dims[l];
    L.I = in_dims[l];
    L.d_sb = d_sb[l];
    L.d_st = d_st[l];
    L.x_sb = x_sb[l];
    L.x_st = x_st[l];
    if (L.steps < 0 || L.O <= 0 || L.I <= 0) throw std::invalid_argument("cupid._C: tensorsketch needs T >= 0, O, I > 0");
    const auto* b1 = reinterpret_cast<const int64_t*>(b1_ptrs[l]);
    const auto* s1 = reinterpret_cast<const int64_t*>(s1_ptrs[l]);
    const auto* b2 = reinterpret_cast<const int64_t*>(b2_ptrs[l]);
    const auto* s2 = reinterpret_cast<const int64_t*>(s2_ptrs[l]);
    check_table(b1, s1, L.O, k);
    check_table(b2, s2, L.I, k);
    L.idx1 = flat_offsets<T>(b1, L.O, plan);
    L.idx2 = flat_offsets<T>(b2, L.I, plan);
    L.live1 = live_columns<T>(b1, L.O, plan);
    L.live2 = live_columns<T>(b2, L.I, plan);
    L.sg1.assign(s1, s1 + L.O);
    L.sg2.assign(s2, s2 + L.I);
    if (!x_ones.empty() && x_ones[l]) {
      if (L.I < 1) throw std::invalid_argument("cupid._C: tensorsketch x_ones needs I >= 1");
      L.x_one = true;
    }
    if (!direct.empty() && direct[l]) {
      L.direct = true;
      L.h1.assign(b1, b1 + L.O);
      L.h2.assign(b2, b2 + L.I);
      L.prods = direct_products(L.h1, L.h2, k);
    }
    layers.push_back(std::move(L));
  }
  tensorsketch_typed<T>(layers, plan, out, batch, k, sums);
}

}  // namespace

int tensorsketch_lanes(int dtype) {
  if (dtype == 0) return Lanes<float>::W;
  if (dtype == 3) return Lanes<double>::W;
  throw std::invalid_argument("cupid._C: tensorsketch kernels take float32 (0) or float64 (3), got " +
                              std::to_string(dtype));
}

void tensorsketch_fft_cpu(const std::vector<uintptr_t>& delta_ptrs, const std::vector<uintptr_t>& x_ptrs,
                          const std::vector<int64_t>& steps, const std::vector<int64_t>& out_dims,
                          const std::vector<int64_t>& in_dims, const std::vector<int64_t>& d_sb,
                          const std::vector<int64_t>& d_st, const std::vector<int64_t>& x_sb,
                          const std::vector<int64_t>& x_st, const std::vector<uintptr_t>& b1_ptrs,
                          const std::vector<uintptr_t>& s1_ptrs, const std::vector<uintptr_t>& b2_ptrs,
                          const std::vector<uintptr_t>& s2_ptrs, uintptr_t out_ptr, int64_t batch, int64_t k,
                          int dtype, const std::vector<int64_t>& direct, const std::vector<int64_t>& x_ones,
                          uintptr_t sums_ptr) {
  const size_t n = delta_ptrs.size();
  if (!direct.empty() && direct.size() != n)
    throw std::invalid_argument("cupid._C: tensorsketch_fft_cpu: direct flags differ in length from the layers");
  if (!x_ones.empty() && x_ones.size() != n)
    throw std::invalid_argument("cupid._C: tensorsketch_fft_cpu: x_ones flags differ in length from the layers");
  for (const auto* v : {&x_ptrs, &b1_ptrs, &s1_ptrs, &b2_ptrs, &s2_ptrs})
    if (v->size() != n) throw std::invalid_argument("cupid._C: tensorsketch_fft_cpu: per-layer lists differ in length");
  for (const auto* v : {&steps, &out_dims, &in_dims, &d_sb, &d_st, &x_sb, &x_st})
    if (v->size() != n) throw std::invalid_argument("cupid._C: tensorsketch_fft_cpu: per-layer lists differ in length");
  if (n == 0) throw std::invalid_argument("cupid._C: tensorsketch_fft_cpu needs at least one layer");
  if (batch < 0) throw std::invalid_argument("cupid._C: batch must be >= 0");
  if (k < 8 || (k & (k - 1)) != 0)
    throw std::invalid_argument("cupid._C: tensorsketch_fft_cpu needs k a power of two >= 8, got " + std::to_string(k));
  tensorsketch_lanes(dtype);
  if (batch == 0) return;
  if (dtype == 0)
    run_fft<float>(delta_ptrs, x_ptrs, steps, out_dims, in_dims, d_sb, d_st, x_sb, x_st, b1_ptrs, s1_ptrs, b2_ptrs,
                   s2_ptrs, direct, x_ones, reinterpret_cast<float*>(out_ptr), batch, k,
                   reinterpret_cast<float*>(sums_ptr));
  else
    run_fft<double>(delta_ptrs, x_ptrs, steps, out_dims, in_dims, d_sb, d_st, x_sb, x_st, b1_ptrs, s1_ptrs, b2_ptrs,
                    s2_ptrs, direct, x_ones, reinterpret_cast<double*>(out_ptr), batch, k,
                    reinterpret_cast<double*>(sums_ptr));
}

void hash_gradient_cpu(uintptr_t g_ptr, uintptr_t b1_ptr, uintptr_t s1_ptr, uintptr_t b2_ptr, uintptr_t s2_ptr,
                       uintptr_t out_ptr, int64_t batch, int64_t out_dim, int64_t in_dim, int64_t k, int dtype,
                       bool accumulate) {
  if (batch < 0 || out_dim <= 0 || in_dim <= 0 || k <= 0)
    throw std::invalid_argument("cupid._C: hash_gradient_cpu needs batch >= 0 and O, I, k > 0");
  const auto* b1 = reinterpret_cast<const int64_t*>(b1_ptr);
  const auto* s1 = reinterpret_cast<const int64_t*>(s1_ptr);
  const auto* b2 = reinterpret_cast<const int64_t*>(b2_ptr);
  const auto* s2 = reinterpret_cast<const int64_t*>(s2_ptr);
  check_table(b1, s1, out_dim, k);
  check_table(b2, s2, in_dim, k);
  tensorsketch_lanes(dtype);
  if (dtype == 0)
    hash_typed(reinterpret_cast<const float*>(g_ptr), b1, s1, b2, s2, reinterpret_cast<float*>(out_ptr), batch,
               out_dim, in_dim, k, accumulate);
  else
    hash_typed(reinterpret_cast<const double*>(g_ptr), b1, s1, b2, s2, reinterpret_cast<double*>(out_ptr), batch,
               out_dim, in_dim, k, accumulate);
}

}  // namespace cupid

// ---------------------------------------------------------------- im2col for the hook path
//
// Why: torch evaluates the same copy (a strided window view permuted into [R, L, C*kh*kw])
// with an innermost loop of kw = 3..5 elements, 2.3-4.3 ns per element here; the capture of
// conv layers spent about half its time in it (bench_hooks_conv profile). One pass in
// output order, bounds checked per row segment instead of padding the input first.
namespace cupid {
namespace {

template <typename T>
void im2col_typed(const T* x, T* out, int64_t R, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                  int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t ph, int64_t pw, int64_t Ho, int64_t Wo,
                  bool one) {
  const int64_t n = C * kh * kw, ld = n + (one ? 1 : 0);
  // Rows per thread: at least ~64k output values each, else one thread.
  const int64_t per_row = std::max<int64_t>(1, Ho * Wo * ld);
  parallel_chunks(R, std::max<int64_t>(1, (int64_t{1} << 16) / per_row), [&](int64_t r_begin, int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* xr = x + r * C * H * W;
    T* orow = out + r * Ho * Wo * ld;
    for (int64_t ho = 0; ho < Ho; ++ho) {
      for (int64_t wo = 0; wo < Wo; ++wo) {
        T* o = orow + (ho * Wo + wo) * ld;
        const int64_t w0 = wo * sw - pw;
        const bool inside_w = w0 >= 0 && w0 + (kw - 1) * dw < W;
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t i = 0; i < kh; ++i) {
            T* oo = o + (c * kh + i) * kw;
            const int64_t h = ho * sh + i * dh - ph;
            if (h < 0 || h >= H) {
              for (int64_t j = 0; j < kw; ++j) oo[j] = T(0);
              continue;
            }
            const T* xrow = xr + (c * H + h) * W + w0;
            if (inside_w) {
              for (int64_t j = 0; j < kw; ++j) oo[j] = xrow[j * dw];
            } else {
              for (int64_t j = 0; j < kw; ++j) {
                const int64_t w = w0 + j * dw;
                oo[j] = (w >= 0 && w < W) ? xrow[j * dw] : T(0);
              }
            }
          }
        }
        if (one) o[n] = T(1);
      }
    }
  }
  });
}

}  // namespace

void im2col_cpu(uintptr_t x_ptr, uintptr_t out_ptr, int64_t rows, int64_t channels, int64_t height, int64_t width,
                int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t ph, int64_t pw,
                int64_t out_h, int64_t out_w, bool append_one, int dtype) {
  if (rows < 0 || channels <= 0 || height <= 0 || width <= 0 || kh <= 0 || kw <= 0 || sh <= 0 || sw <= 0 ||
      dh <= 0 || dw <= 0 || ph < 0 || pw < 0 || out_h < 0 || out_w < 0)
    throw std::invalid_argument("cupid._C: im2col_cpu: sizes must be positive (paddings and outputs >= 0)");
  if (dtype == 0)
    im2col_typed(reinterpret_cast<const float*>(x_ptr), reinterpret_cast<float*>(out_ptr), rows, channels, height,
                 width, kh, kw, sh, sw, dh, dw, ph, pw, out_h, out_w, append_one);
  else if (dtype == 3)
    im2col_typed(reinterpret_cast<const double*>(x_ptr), reinterpret_cast<double*>(out_ptr), rows, channels, height,
                 width, kh, kw, sh, sw, dh, dw, ph, pw, out_h, out_w, append_one);
  else
    throw std::invalid_argument("cupid._C: im2col_cpu takes float32 (0) or float64 (3), got " + std::to_string(dtype));
}

}  // namespace cupid
