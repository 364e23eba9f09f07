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
// ever exists.
//
// Transforms. A real FFT of length k is a complex FFT of length m = k/2 on
// z[n] = v[2n] + i v[2n+1] followed by the usual split step, and the inverse likewise.
// The complex FFT is a radix-4 Stockham autosort (no bit reversal; ping-pong buffers),
// with a radix-2 last stage when log2(m) is odd. Twiddles are computed in double with
// cos/sin of the exact angle (not by recurrence) and rounded once to the working type.
//
// Determinism. Lanes never mix: a sample's features depend on its own inputs only, not on
// which group or lane it landed in (padding lanes hold zeros) or on the thread count.
// They differ from torch.fft (pocketfft) by float rounding (a different FFT algorithm):
// tests/ops/test_tensorsketch_kernel.py compares them in float64 (~1e-13) and float32.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cupid/tensorsketch.h"

namespace cupid {
namespace {

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(64)));
  static constexpr int W = 8;
};

// Twiddles of one transform length m (= k / 2), shared read-only by all threads.
template <typename T>
struct Plan {
  int64_t m = 0, k = 0;
  // Per radix-4 stage (lengths n = m, m/4, ... >= 4): for p < n/4, w^p, w^2p, w^3p with
  // w = exp(-2 pi i / n), concatenated stage after stage.
  std::vector<T> w1r, w1i, w2r, w2i, w3r, w3i;
  // Split step: exp(-2 pi i f / k), f <= m.
  std::vector<T> sr, si;

  explicit Plan(int64_t k_) : m(k_ / 2), k(k_) {
    const double two_pi = 6.283185307179586476925286766559;
    for (int64_t n = m; n >= 4; n /= 4) {
      for (int64_t p = 0; p < n / 4; ++p) {
        for (int r = 1; r <= 3; ++r) {
          // Reduce the angle index modulo n exactly before converting to radians.
          const double a = two_pi * static_cast<double>((r * p) % n) / static_cast<double>(n);
          auto& vr = r == 1 ? w1r : r == 2 ? w2r : w3r;
          auto& vi = r == 1 ? w1i : r == 2 ? w2i : w3i;
          vr.push_back(static_cast<T>(std::cos(a)));
          vi.push_back(static_cast<T>(-std::sin(a)));
        }
      }
    }
    for (int64_t f = 0; f <= m; ++f) {
      const double a = two_pi * static_cast<double>(f) / static_cast<double>(k);
      sr.push_back(static_cast<T>(std::cos(a)));
      si.push_back(static_cast<T>(-std::sin(a)));
    }
  }
};

// In-place complex FFT of length m on W lanes: data (xr, xi) [m] vectors, scratch (yr, yi).
// Forward: X[f] = sum_n x[n] exp(-2 pi i f n / m); inverse (Inv): exp(+...), unnormalised.
template <typename T, bool Inv>
void cfft(typename Lanes<T>::V* xr, typename Lanes<T>::V* xi, typename Lanes<T>::V* yr, typename Lanes<T>::V* yi,
          const Plan<T>& plan) {
  using V = typename Lanes<T>::V;
  const int64_t m = plan.m;
  V *ar = xr, *ai = xi, *br = yr, *bi = yi;
  int64_t n = m, s = 1;
  size_t tw = 0;
  while (n >= 4) {
    const int64_t n1 = n / 4, n2 = n / 2, n3 = n1 + n2;
    for (int64_t p = 0; p < n1; ++p) {
      const T w1r = plan.w1r[tw + p], w2r = plan.w2r[tw + p], w3r = plan.w3r[tw + p];
      const T w1i = Inv ? -plan.w1i[tw + p] : plan.w1i[tw + p];
      const T w2i = Inv ? -plan.w2i[tw + p] : plan.w2i[tw + p];
      const T w3i = Inv ? -plan.w3i[tw + p] : plan.w3i[tw + p];
      const V* a_r = ar + s * p;
      const V* a_i = ai + s * p;
      V* o_r = br + s * 4 * p;
      V* o_i = bi + s * 4 * p;
      for (int64_t q = 0; q < s; ++q) {
        const V pr = a_r[q], pi = a_i[q];
        const V qr = a_r[q + s * n1], qi = a_i[q + s * n1];
        const V cr = a_r[q + s * n2], ci = a_i[q + s * n2];
        const V dr = a_r[q + s * n3], di = a_i[q + s * n3];
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
        o_r[q] = apc_r + bpd_r;
        o_i[q] = apc_i + bpd_i;
        o_r[q + s] = u1r * w1r - u1i * w1i;
        o_i[q + s] = u1r * w1i + u1i * w1r;
        o_r[q + 2 * s] = u2r * w2r - u2i * w2i;
        o_i[q + 2 * s] = u2r * w2i + u2i * w2r;
        o_r[q + 3 * s] = u3r * w3r - u3i * w3i;
        o_i[q + 3 * s] = u3r * w3i + u3i * w3r;
      }
    }
    tw += static_cast<size_t>(n1);
    std::swap(ar, br);
    std::swap(ai, bi);
    n /= 4;
    s *= 4;
  }
  // The result must end in (xr, xi).
  if (n == 2) {
    for (int64_t q = 0; q < s; ++q) {
      const V pr = ar[q], pi = ai[q], qr = ar[q + s], qi = ai[q + s];
      xr[q] = pr + qr;
      xi[q] = pi + qi;
      xr[q + s] = pr - qr;
      xi[q + s] = pi - qi;
    }
  } else if (ar != xr) {
    std::memcpy(xr, ar, sizeof(V) * m);
    std::memcpy(xi, ai, sizeof(V) * m);
  }
}

// Per-thread buffers of one lane group.
template <typename T>
struct Work {
  using V = typename Lanes<T>::V;
  std::vector<V> z, y, spec, acc;  // z: [2m] (re then im), y: [2m] scratch, spec/acc: [2(m+1)]
  explicit Work(int64_t m) : z(2 * m), y(2 * m), spec(2 * (m + 1)), acc(2 * (m + 1)) {}
};

// Scatter W factor rows (row l at src + l * sb, n values) into the zero-filled z with
// precomputed flat offsets idx[j] (lane-0 slot) and signs sg[j], forward-transform, split
// into the rfft spectrum X[f], f <= m, of each lane, and either store it in (sr_, si_)
// (Mac = false) or multiply it by (sr_, si_) into the accumulator (ar_, ai_) (Mac = true).
template <typename T, bool Mac>
void factor_spectrum(const T* src, int64_t sb, int lanes, int64_t n, const int64_t* idx, const T* sg, Work<T>& w,
                     const Plan<T>& plan, typename Lanes<T>::V* sr_, typename Lanes<T>::V* si_,
                     typename Lanes<T>::V* ar_, typename Lanes<T>::V* ai_) {
  using V = typename Lanes<T>::V;
  const int64_t m = plan.m;
  std::memset(static_cast<void*>(w.z.data()), 0, sizeof(V) * 2 * m);
  T* flat = reinterpret_cast<T*>(w.z.data());
  for (int l = 0; l < lanes; ++l) {
    const T* row = src + l * sb;
    T* base = flat + l;
    for (int64_t j = 0; j < n; ++j) base[idx[j]] += sg[j] * row[j];
  }
  V* zr = w.z.data();
  V* zi = zr + m;
  cfft<T, false>(zr, zi, w.y.data(), w.y.data() + m, plan);
  // Split: X[f] = E[f] + w^f O[f], E = (Z[f] + conj Z[m-f]) / 2, O = (Z[f] - conj Z[m-f]) / 2i,
  // with Z[m] = Z[0]; X[0] and X[m] are real.
  const T half = T(0.5);
  for (int64_t f = 0; f <= m; ++f) {
    const int64_t fa = f == m ? 0 : f;
    const int64_t g = f == 0 ? 0 : m - f;
    const V er = (zr[fa] + zr[g]) * half, ei = (zi[fa] - zi[g]) * half;
    const V orr = (zi[fa] + zi[g]) * half, oi = (zr[g] - zr[fa]) * half;
    const T cr = plan.sr[f], ci = plan.si[f];
    const V xr = er + (orr * cr - oi * ci);
    const V xi = ei + (orr * ci + oi * cr);
    if (Mac) {
      ar_[f] += sr_[f] * xr - si_[f] * xi;
      ai_[f] += sr_[f] * xi + si_[f] * xr;
    } else {
      sr_[f] = xr;
      si_[f] = xi;
    }
  }
}

template <typename T>
struct Layer {
  const T* delta;
  const T* x;
  int64_t steps, O, I, d_sb, d_st, x_sb, x_st;
  std::vector<int64_t> idx1, idx2;  // flat lane-0 offsets into z of each bucket
  std::vector<T> sg1, sg2;
};

template <typename T>
std::vector<int64_t> flat_offsets(const int64_t* b, int64_t n, int64_t m) {
  constexpr int W = Lanes<T>::W;
  std::vector<int64_t> idx(n);
  // Bucket h holds v[h] of z[h / 2] = v[2n] + i v[2n + 1]: the real part for even h, the
  // imaginary part (stored after the m real vectors) for odd h.
  for (int64_t j = 0; j < n; ++j) idx[j] = ((b[j] & 1) ? m + (b[j] >> 1) : (b[j] >> 1)) * W;
  return idx;
}

template <typename T>
void tensorsketch_typed(const std::vector<Layer<T>>& layers, T* out, int64_t batch, int64_t k) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const Plan<T> plan(k);
  const int64_t m = plan.m;
  const int64_t groups = (batch + W - 1) / W;
#pragma omp parallel if (groups > 1)
  {
    Work<T> w(m);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b0 = g * W;
      const int lanes = static_cast<int>(std::min<int64_t>(W, batch - b0));
      V* acc_r = w.acc.data();
      V* acc_i = acc_r + (m + 1);
      V* sp_r = w.spec.data();
      V* sp_i = sp_r + (m + 1);
      std::memset(static_cast<void*>(w.acc.data()), 0, sizeof(V) * 2 * (m + 1));
      for (const Layer<T>& L : layers) {
        for (int64_t t = 0; t < L.steps; ++t) {
          factor_spectrum<T, false>(L.delta + b0 * L.d_sb + t * L.d_st, L.d_sb, lanes, L.O, L.idx1.data(),
                                    L.sg1.data(), w, plan, sp_r, sp_i, nullptr, nullptr);
          factor_spectrum<T, true>(L.x + b0 * L.x_sb + t * L.x_st, L.x_sb, lanes, L.I, L.idx2.data(), L.sg2.data(),
                                   w, plan, sp_r, sp_i, acc_r, acc_i);
        }
      }
      // Inverse split: Z[f] = E[f] + i O[f], E = (C[f] + conj C[m-f]) / 2,
      // O = w^-f (C[f] - conj C[m-f]) / 2, then z = icfft(Z) / m, v[2n] = Re z[n], v[2n+1] = Im z[n].
      V* zr = w.z.data();
      V* zi = zr + m;
      const T half = T(0.5);
      for (int64_t f = 0; f < m; ++f) {
        const int64_t g2 = m - f;
        const V er = (acc_r[f] + acc_r[g2]) * half, ei = (acc_i[f] - acc_i[g2]) * half;
        const V dr = (acc_r[f] - acc_r[g2]) * half, di = (acc_i[f] + acc_i[g2]) * half;
        const T cr = plan.sr[f], ci = -plan.si[f];  // w^-f
        const V orr = dr * cr - di * ci, oi = dr * ci + di * cr;
        zr[f] = er - oi;
        zi[f] = ei + orr;
      }
      cfft<T, true>(zr, zi, w.y.data(), w.y.data() + m, plan);
      const T scale = T(1) / static_cast<T>(m);
      const T* fr = reinterpret_cast<const T*>(zr);
      const T* fi = reinterpret_cast<const T*>(zi);
      for (int l = 0; l < lanes; ++l) {
        T* o = out + (b0 + l) * k;
        for (int64_t n = 0; n < m; ++n) {
          o[2 * n] = fr[n * W + l] * scale;
          o[2 * n + 1] = fi[n * W + l] * scale;
        }
      }
    }
  }
}

template <typename T>
void hash_typed(const T* g, const int64_t* b1, const int64_t* s1, const int64_t* b2, const int64_t* s2, T* out,
                int64_t batch, int64_t O, int64_t I, int64_t k, bool accumulate) {
  std::vector<int64_t> bb2(b2, b2 + I);
  std::vector<T> ss2(I);
  for (int64_t i = 0; i < I; ++i) ss2[i] = static_cast<T>(s2[i]);
#pragma omp parallel for schedule(static) if (batch > 1)
  for (int64_t b = 0; b < batch; ++b) {
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
             const std::vector<uintptr_t>& s2_ptrs, T* out, int64_t batch, int64_t k) {
  const int64_t m = k / 2;
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
    L.idx1 = flat_offsets<T>(b1, L.O, m);
    L.idx2 = flat_offsets<T>(b2, L.I, m);
    L.sg1.assign(s1, s1 + L.O);
    L.sg2.assign(s2, s2 + L.I);
    layers.push_back(std::move(L));
  }
  tensorsketch_typed<T>(layers, out, batch, k);
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
                          int dtype) {
  const size_t n = delta_ptrs.size();
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
                   s2_ptrs, reinterpret_cast<float*>(out_ptr), batch, k);
  else
    run_fft<double>(delta_ptrs, x_ptrs, steps, out_dims, in_dims, d_sb, d_st, x_sb, x_st, b1_ptrs, s1_ptrs, b2_ptrs,
                    s2_ptrs, reinterpret_cast<double*>(out_ptr), batch, k);
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
