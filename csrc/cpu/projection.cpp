// CPU projection kernels: dense (Rademacher), sparse (CountSketch, s non-zeros) and
// signshift, plus the CountSketch stage of tensorsketch.
//
// Parallel layout. The coordinate axis is cut into a fixed number of superblocks that
// depends only on (P, k), never on the thread count; each superblock is one OpenMP work
// item that streams its coordinates for a group of rows into its own partial output, and
// partials are reduced in superblock order. Hash values (signs, buckets, shifts) are
// computed once per coordinate tile and reused for every row of the group. Every output
// element is therefore summed in the same order whatever the thread count or batch
// split, and results are bit-identical across both (and whether a region runs serially:
// small calls and forked children do, see cupid/parallel.h).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cupid/hash.h"
#include "cupid/kernels.h"
#include "cupid/parallel.h"

namespace cupid {
namespace {

// Stream ids: cupid/hash.h.

constexpr int64_t kRowGroup = 32;      // rows sharing one set of hashed tiles
constexpr int64_t kMaxSuperblocks = 16;  // fixed partition of the coordinate axis
constexpr int64_t kMinSuperblock = 1 << 15;
constexpr int64_t kSparseTile = 4096;
constexpr int64_t kDenseTile = 16;

struct Half {
  _Float16 v;
};
struct BF16 {
  uint16_t v;
};

inline float load(const float* p) { return *p; }
inline double load(const double* p) { return *p; }
inline float load(const Half* p) { return static_cast<float>(p->v); }
inline float load(const BF16* p) {
  const uint32_t bits = static_cast<uint32_t>(p->v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename In>
using AccOf = std::conditional_t<std::is_same_v<In, double>, double, float>;

struct Plan {
  Method method;
  int64_t P, k, s, ld;
  uint64_t seed;
  int64_t sb_size, nsb;
};

Plan make_plan(Method method, int64_t P, int64_t k, int64_t s, int64_t ld, uint64_t seed) {
  Plan p{method, P, k, s, ld, seed, 0, 0};
  int64_t sb = std::max<int64_t>(kMinSuperblock, (P + kMaxSuperblocks - 1) / kMaxSuperblocks);
  if (method == Method::kSignShift) sb = (sb + k - 1) / k * k;  // chunk-aligned superblocks
  p.sb_size = sb;
  p.nsb = std::max<int64_t>(1, (P + sb - 1) / sb);
  return p;
}

// XOR the sign bit of v with `bit` (0 or 1): a branch-free, vectorisable sign flip.
inline float flip(float v, uint32_t bit) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u ^= bit << 31;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
inline double flip(double v, uint32_t bit) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  u ^= static_cast<uint64_t>(bit) << 63;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// Signshift over coordinates [c0, c1) (c0 chunk aligned) for `rows` rows into acc[rows, k].
// Chunk offset j lands in bucket j + shift (first k - shift offsets) or j + shift - k
// (the rest). Sign words are hashed once per superblock and shared by the row group; the
// inner loop handles whole 32-lane sign words, and the one word per chunk that straddles
// the wrap point goes element by element.
template <typename In, typename Acc>
void signshift_range(const In* x, Acc* acc, int64_t rows, const Plan& p, int64_t c0, int64_t c1) {
  const int64_t k = p.k;
  const uint32_t key_sign = stream_key(p.seed, kStreamSignShiftSign);
  const uint32_t key_shift = stream_key(p.seed, kStreamSignShiftShift);
  const int64_t w0 = c0 >> 5, nw = ((c1 - 1) >> 5) - w0 + 1;
  std::vector<uint32_t> words(nw);
  for (int64_t w = 0; w < nw; ++w) words[w] = hash32(key_sign, static_cast<uint32_t>(w0 + w));
  const int64_t nchunks = (c1 - c0 + k - 1) / k;
  std::vector<uint32_t> shifts(nchunks);
  for (int64_t c = 0; c < nchunks; ++c)
    shifts[c] = fastrange(hash32(key_shift, static_cast<uint32_t>(c0 / k + c)), static_cast<uint32_t>(k));
  const bool aligned = (k % 32) == 0;  // every chunk starts on a sign word
  for (int64_t r = 0; r < rows; ++r) {
    const In* xr = x + r * p.ld;
    Acc* o = acc + r * k;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t base = c0 + c * k, len = std::min(k, c1 - base);
      const int64_t shift = shifts[c], seg1 = k - shift;
      const In* xc = xr + base;
      auto bit_of = [&](int64_t j) { return (words[((base + j) >> 5) - w0] >> ((base + j) & 31)) & 1u; };
      auto dest = [&](int64_t j) { return j < seg1 ? o + shift + j : o + (j - seg1); };
      if (aligned) {
        const uint32_t* wd = words.data() + ((base >> 5) - w0);
        const int64_t full = len / 32;
        for (int64_t jw = 0; jw < full; ++jw) {
          const int64_t j0 = jw * 32;
          const In* xb = xc + j0;
          if (j0 < seg1 && j0 + 32 > seg1) {  // the word straddling the wrap point
            for (int64_t b = 0; b < 32; ++b) *dest(j0 + b) += flip(static_cast<Acc>(load(xb + b)), (wd[jw] >> b) & 1u);
            continue;
          }
          const uint32_t w = wd[jw];
          Acc* ob = dest(j0);
#pragma omp simd
          for (int64_t b = 0; b < 32; ++b) ob[b] += flip(static_cast<Acc>(load(xb + b)), (w >> b) & 1u);
        }
        for (int64_t j = full * 32; j < len; ++j) *dest(j) += flip(static_cast<Acc>(load(xc + j)), bit_of(j));
      } else {
        for (int64_t j = 0; j < len; ++j) *dest(j) += flip(static_cast<Acc>(load(xc + j)), bit_of(j));
      }
    }
  }
}

template <typename In, typename Acc>
void sparse_range(const In* x, Acc* acc, int64_t rows, const Plan& p, int64_t c0, int64_t c1) {
  const int64_t k = p.k, s = p.s, block = p.k / p.s;
  std::vector<uint32_t> keys(s);
  for (int64_t r = 0; r < s; ++r) keys[r] = stream_key(p.seed, kStreamSparse + static_cast<uint32_t>(r));
  std::vector<uint32_t> bucket(s * kSparseTile);
  std::vector<Acc> sg(s * kSparseTile);
  for (int64_t t0 = c0; t0 < c1; t0 += kSparseTile) {
    const int64_t len = std::min(kSparseTile, c1 - t0);
    for (int64_t r = 0; r < s; ++r) {
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t h = hash32(keys[r], static_cast<uint32_t>(t0 + j));
        bucket[r * kSparseTile + j] = static_cast<uint32_t>(r * block) + fastrange(h, static_cast<uint32_t>(block));
        sg[r * kSparseTile + j] = (h & 1u) ? Acc(-1) : Acc(1);
      }
    }
    for (int64_t row = 0; row < rows; ++row) {
      const In* xr = x + row * p.ld + t0;
      Acc* o = acc + row * k;
      for (int64_t r = 0; r < s; ++r) {
        const uint32_t* bk = bucket.data() + r * kSparseTile;
        const Acc* sr = sg.data() + r * kSparseTile;
        for (int64_t j = 0; j < len; ++j) o[bk[j]] += sr[j] * static_cast<Acc>(load(xr + j));
      }
    }
  }
}

template <typename In, typename Acc>
void dense_range(const In* x, Acc* acc, int64_t rows, const Plan& p, int64_t c0, int64_t c1) {
  const int64_t k = p.k, words = (k + 31) / 32;
  const uint32_t key = stream_key(p.seed, kStreamDense);
  std::vector<Acc> S(kDenseTile * k);
  for (int64_t t0 = c0; t0 < c1; t0 += kDenseTile) {
    const int64_t len = std::min(kDenseTile, c1 - t0);
    for (int64_t i = 0; i < len; ++i) {
      const uint32_t row_key = hash32(key, static_cast<uint32_t>(t0 + i));
      Acc* Si = S.data() + i * k;
      for (int64_t w = 0; w < words; ++w) {
        const uint32_t h = hash32(row_key, static_cast<uint32_t>(w));
        const int64_t lim = std::min<int64_t>(32, k - w * 32);
        for (int64_t b = 0; b < lim; ++b) Si[w * 32 + b] = ((h >> b) & 1u) ? Acc(-1) : Acc(1);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const In* xr = x + r * p.ld + t0;
      Acc* o = acc + r * k;
      for (int64_t i = 0; i < len; ++i) {
        const Acc xi = static_cast<Acc>(load(xr + i));
        const Acc* Si = S.data() + i * k;
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) o[j] += xi * Si[j];
      }
    }
  }
}

template <typename In>
void project_typed(const In* x, AccOf<In>* out, int64_t B, const Plan& p) {
  using Acc = AccOf<In>;
  const int64_t k = p.k;
  const int64_t group = std::min(B, kRowGroup);
  const int64_t width = k;
  std::vector<Acc> partial(static_cast<size_t>(p.nsb) * group * width);
  for (int64_t g0 = 0; g0 < B; g0 += kRowGroup) {
    const int64_t rows = std::min(kRowGroup, B - g0);
    std::fill(partial.begin(), partial.end(), Acc(0));
    // One superblock is one work item: a second thread would only wait.
    const int nt_sb = p.nsb < 2                     ? 1
                      : p.method == Method::kDense ? omp_threads(1, 0)
                                                   : omp_threads(rows * p.P * static_cast<int64_t>(sizeof(In)),
                                                                 kSerialProjectBytes);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt_sb) if (nt_sb > 1)
    for (int64_t sb = 0; sb < p.nsb; ++sb) {
      const int64_t c0 = sb * p.sb_size, c1 = std::min(p.P, c0 + p.sb_size);
      Acc* acc = partial.data() + sb * group * width;
      const In* xg = x + g0 * p.ld;
      switch (p.method) {
        case Method::kSignShift: signshift_range<In, Acc>(xg, acc, rows, p, c0, c1); break;
        case Method::kSparse: sparse_range<In, Acc>(xg, acc, rows, p, c0, c1); break;
        case Method::kDense: dense_range<In, Acc>(xg, acc, rows, p, c0, c1); break;
      }
    }
    // Fixed-order reduction over superblocks, parallel over rows.
    const Acc scale = p.method == Method::kDense   ? Acc(1) / std::sqrt(static_cast<Acc>(k))
                      : p.method == Method::kSparse ? Acc(1) / std::sqrt(static_cast<Acc>(p.s))
                                                    : Acc(1);
    const int nt_red = omp_threads(rows * p.nsb * k * static_cast<int64_t>(sizeof(Acc)), kSerialProjectBytes);
#pragma omp parallel for schedule(static) num_threads(nt_red) if (nt_red > 1)
    for (int64_t r = 0; r < rows; ++r) {
      Acc* o = out + (g0 + r) * k;
      for (int64_t sb = 0; sb < p.nsb; ++sb) {
        const Acc* a = partial.data() + (sb * group + r) * width;
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) o[j] += a[j];
      }
      if (scale != Acc(1)) {
        for (int64_t j = 0; j < k; ++j) o[j] *= scale;
      }
    }
  }
}

template <typename In>
void countsketch_typed(const In* delta, const In* x, const int64_t* b1, const int64_t* s1, const int64_t* b2,
                       const int64_t* s2, AccOf<In>* cs_d, AccOf<In>* cs_x, int64_t rows, int64_t O, int64_t I,
                       int64_t k) {
  using Acc = AccOf<In>;
  // Signs as floating point once, shared by every row.
  std::vector<Acc> f1(O), f2(I);
  for (int64_t i = 0; i < O; ++i) f1[i] = static_cast<Acc>(s1[i]);
  for (int64_t i = 0; i < I; ++i) f2[i] = static_cast<Acc>(s2[i]);
  const int nt = omp_threads(rows * (O * static_cast<int64_t>(sizeof(In)) + I * static_cast<int64_t>(sizeof(In)) +
                                     2 * k * static_cast<int64_t>(sizeof(Acc))),
                             kSerialProjectBytes);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const In* dr = delta + r * O;
    Acc* od = cs_d + r * k;
    for (int64_t i = 0; i < O; ++i) od[b1[i]] += f1[i] * static_cast<Acc>(load(dr + i));
    const In* xr = x + r * I;
    Acc* ox = cs_x + r * k;
    for (int64_t i = 0; i < I; ++i) ox[b2[i]] += f2[i] * static_cast<Acc>(load(xr + i));
  }
}

void check_common(int64_t batch, int64_t dim, int64_t k) {
  if (batch < 0 || dim <= 0 || k <= 0) throw std::invalid_argument("cupid._C: batch >= 0, dim > 0 and k > 0 required");
  if (dim > 0xFFFFFFFFll) throw std::invalid_argument("cupid._C: dim must be < 2^32");
}

}  // namespace

bool has_cuda() {
#ifdef CUPID_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int num_threads() { return omp_get_max_threads(); }

void set_num_threads(int n) {
  if (n <= 0) throw std::invalid_argument("cupid._C: set_num_threads needs n > 0");
  omp_set_num_threads(n);
}

void project_cpu(uintptr_t x_ptr, uintptr_t out_ptr, int64_t batch, int64_t dim, int64_t x_stride, int64_t k,
                 int method, int dtype, uint64_t seed, int64_t s) {
  check_common(batch, dim, k);
  if (method < 0 || method > 2) throw std::invalid_argument("cupid._C: unknown projection method " + std::to_string(method));
  const Method m = static_cast<Method>(method);
  if (m == Method::kSparse && (s <= 0 || k % s != 0)) throw std::invalid_argument("cupid._C: sparse needs s > 0 dividing k");
  if (x_stride < dim) throw std::invalid_argument("cupid._C: x_stride < dim");
  const Plan p = make_plan(m, dim, k, s, x_stride, seed);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      project_typed(reinterpret_cast<const float*>(x_ptr), reinterpret_cast<float*>(out_ptr), batch, p);
      break;
    case DType::kFloat64:
      project_typed(reinterpret_cast<const double*>(x_ptr), reinterpret_cast<double*>(out_ptr), batch, p);
      break;
    case DType::kFloat16:
      project_typed(reinterpret_cast<const Half*>(x_ptr), reinterpret_cast<float*>(out_ptr), batch, p);
      break;
    case DType::kBFloat16:
      project_typed(reinterpret_cast<const BF16*>(x_ptr), reinterpret_cast<float*>(out_ptr), batch, p);
      break;
    default:
      throw std::invalid_argument("cupid._C: unsupported dtype " + std::to_string(dtype));
  }
}

void countsketch_pair_cpu(uintptr_t delta_ptr, uintptr_t x_ptr, uintptr_t b1_ptr, uintptr_t s1_ptr, uintptr_t b2_ptr,
                          uintptr_t s2_ptr, uintptr_t cs_delta_ptr, uintptr_t cs_x_ptr, int64_t rows, int64_t out_dim,
                          int64_t in_dim, int64_t k, int dtype) {
  check_common(rows, std::max(out_dim, in_dim), k);
  if (out_dim <= 0 || in_dim <= 0) throw std::invalid_argument("cupid._C: out_dim and in_dim must be > 0");
  const auto* b1 = reinterpret_cast<const int64_t*>(b1_ptr);
  const auto* s1 = reinterpret_cast<const int64_t*>(s1_ptr);
  const auto* b2 = reinterpret_cast<const int64_t*>(b2_ptr);
  const auto* s2 = reinterpret_cast<const int64_t*>(s2_ptr);
  for (int64_t i = 0; i < out_dim; ++i)
    if (b1[i] < 0 || b1[i] >= k) throw std::invalid_argument("cupid._C: bucket table out of range");
  for (int64_t i = 0; i < in_dim; ++i)
    if (b2[i] < 0 || b2[i] >= k) throw std::invalid_argument("cupid._C: bucket table out of range");
#define CUPID_CS(IN, ACC)                                                                                       \
  countsketch_typed(reinterpret_cast<const IN*>(delta_ptr), reinterpret_cast<const IN*>(x_ptr), b1, s1, b2, s2, \
                    reinterpret_cast<ACC*>(cs_delta_ptr), reinterpret_cast<ACC*>(cs_x_ptr), rows, out_dim, in_dim, k)
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: CUPID_CS(float, float); break;
    case DType::kFloat64: CUPID_CS(double, double); break;
    case DType::kFloat16: CUPID_CS(Half, float); break;
    case DType::kBFloat16: CUPID_CS(BF16, float); break;
    default: throw std::invalid_argument("cupid._C: unsupported dtype " + std::to_string(dtype));
  }
#undef CUPID_CS
}

}  // namespace cupid
