// CUDA projection kernels: dense (Rademacher), sparse (CountSketch, s non-zeros),
// signshift, and the CountSketch stage of tensorsketch. Same math and hash as
// cupid_engine/ops/reference.py (the spec) and csrc/cpu/projection.cpp.
//
// Determinism.
// * dense, signshift: the coordinate axis is cut into splits that depend only on (P, k)
//   (never on the batch, the device or the SM count). A thread owns output elements and
//   sums its split's coordinates in order into a per-split partial; partials are reduced
//   in split order (over blocks of rows that bound the partials' memory). No atomics:
//   bit-reproducible across runs and batch splits.
//   signshift gathers instead of scattering: bucket j of chunk c reads coordinate
//   c*k + ((j - shift_c) mod k), so reads stay contiguous.
// * countsketch (tensorsketch stage 1): the factor hashes are host tables
//   (reference.countsketch_buckets) passed grouped by bucket (CSR, coordinates
//   increasing). A thread owns a bucket for a few rows and gathers its coordinates: no
//   atomics, and the same order of additions as the CPU kernel (bit-identical float32).
// * sparse: a thread hashes one coordinate for a few rows and scatters with atomicAdd.
//   Float atomics commit in hardware order, so results may differ run to run in the last
//   bits (well inside the float32 tolerance); buckets and signs are exact.
#ifndef CUPID_CUDA_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cupid/cuda_kernels.h"
#include "cupid/hash.h"
#include "cupid/kernels.h"

// Every launch goes through CUPID_LAUNCH so that tests/ops/test_cuda_build.py can compile
// this file as plain C++ against a host emulation of the CUDA runtime (threads and a
// barrier per block) and check the kernels against the reference without a GPU.
#ifndef CUPID_LAUNCH
#define CUPID_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif
// Split sizes can be shrunk at compile time for the emulated tests.
#ifndef CUPID_CUDA_MIN_SPLIT
#define CUPID_CUDA_MIN_SPLIT (1 << 16)
#endif
#ifndef CUPID_CUDA_PARTIAL_BYTES
#define CUPID_CUDA_PARTIAL_BYTES (int64_t{256} << 20)
#endif

namespace cupid {
namespace {

// Stream ids and kMaxSparseS: cupid/hash.h.

constexpr int64_t kMaxSplits = 32;
constexpr int64_t kMinSplit = CUPID_CUDA_MIN_SPLIT;
constexpr int64_t kSplitAlign = 256;
constexpr int64_t kPartialBytes = CUPID_CUDA_PARTIAL_BYTES;  // bound on the split partials of one launch

// dense tiles
constexpr int kDenseThreads = 128;  // one output column per thread
constexpr int kDenseRows = 8;
constexpr int kDenseTileP = 32;
constexpr int kDenseWords = kDenseThreads / 32;
// signshift
constexpr int kShiftThreads = 256;
constexpr int kShiftRows = 4;
// sparse
constexpr int kSparseThreads = 256;
constexpr int kSparseRows = 4;
constexpr int kSparseSmemRows = 2;
constexpr int64_t kSparseSmemMaxK = 4096;  // 2 x 4096 floats: 32 KiB of static shared memory
constexpr int64_t kSparseSmemChunk = 1 << 15;  // coordinates per block
// countsketch
constexpr int kCsThreads = 128;  // buckets per block
constexpr int kCsRows = 8;

struct SparseKeys {
  uint32_t key[kMaxSparseS];
};

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename In>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("cupid._C (cuda): ") + what + ": " + cudaGetErrorString(e));
}

void check_call(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("cupid._C (cuda): ") + what + ": " + cudaGetErrorString(e));
}

CUPID_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
CUPID_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Coordinates per split: a function of P (and the alignment) only.
int64_t split_size(int64_t P, int64_t align) {
  const int64_t size = std::max(kMinSplit, cdiv(P, kMaxSplits));
  return cdiv(size, align) * align;
}

// ---------------------------------------------------------------------------- dense

// Block (column tile of 128, row tile of 8, split). Sign (p, j) is bit (j & 31) of
// hash32(hash32(key, p), j >> 5): the block hashes one word per 32 columns per coordinate.
template <typename In, typename Acc>
__global__ void dense_kernel(const In* __restrict__ x, Acc* __restrict__ part, int64_t B, int64_t P, int64_t k,
                             int64_t ld, int64_t split, uint32_t key, Acc scale) {
  __shared__ Acc xs[kDenseRows][kDenseTileP];
  __shared__ uint32_t words[kDenseTileP][kDenseWords];
  const int tid = threadIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kDenseThreads + tid;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kDenseRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * split;
  const int64_t c1 = imin(P, c0 + split);
  const int64_t n_words = (k + 31) / 32;
  Acc acc[kDenseRows];
#pragma unroll
  for (int r = 0; r < kDenseRows; ++r) acc[r] = Acc(0);
  for (int64_t t0 = c0; t0 < c1; t0 += kDenseTileP) {
    for (int idx = tid; idx < kDenseRows * kDenseTileP; idx += kDenseThreads) {
      const int r = idx / kDenseTileP, i = idx % kDenseTileP;
      const int64_t p = t0 + i, b = b0 + r;
      xs[r][i] = (b < B && p < c1) ? static_cast<Acc>(load(x + b * ld + p)) : Acc(0);
    }
    for (int idx = tid; idx < kDenseTileP * kDenseWords; idx += kDenseThreads) {
      const int i = idx / kDenseWords, w = idx % kDenseWords;
      const int64_t gw = static_cast<int64_t>(blockIdx.x) * kDenseWords + w;
      const int64_t p = t0 + i;
      words[i][w] = (gw < n_words && p < c1)
                        ? hash32(hash32(key, static_cast<uint32_t>(p)), static_cast<uint32_t>(gw))
                        : 0u;
    }
    __syncthreads();
    const int wl = tid >> 5, bit = tid & 31;
    // Two-level sum: a tile's 32 terms first, then the tile into the split's running sum.
    // One running sum over a whole split (~23k terms at P = 70k) drifted 1.2e-5 from the
    // float64 reference on an H100; the rounding chain is now ~32 + split/32 additions.
    Acc tile[kDenseRows];
#pragma unroll
    for (int r = 0; r < kDenseRows; ++r) tile[r] = Acc(0);
#pragma unroll 4
    for (int i = 0; i < kDenseTileP; ++i) {
      const bool neg = (words[i][wl] >> bit) & 1u;
#pragma unroll
      for (int r = 0; r < kDenseRows; ++r) tile[r] += neg ? -xs[r][i] : xs[r][i];
    }
#pragma unroll
    for (int r = 0; r < kDenseRows; ++r) acc[r] += tile[r];
    __syncthreads();
  }
  if (j < k) {
    Acc* out = part + static_cast<int64_t>(blockIdx.z) * B * k;
#pragma unroll
    for (int r = 0; r < kDenseRows; ++r)
      if (b0 + r < B) out[(b0 + r) * k + j] = acc[r] * scale;
  }
}

// ---------------------------------------------------------------------------- signshift

template <typename In, typename Acc>
__global__ void signshift_kernel(const In* __restrict__ x, Acc* __restrict__ part, int64_t B, int64_t P, int64_t k,
                                 int64_t ld, int64_t chunks_per_split, uint32_t key_sign, uint32_t key_shift) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kShiftThreads + threadIdx.x;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kShiftRows;
  if (j >= k) return;
  const int64_t n_chunks = cdiv(P, k);
  const int64_t ch0 = static_cast<int64_t>(blockIdx.z) * chunks_per_split;
  const int64_t ch1 = imin(ch0 + chunks_per_split, n_chunks);
  Acc acc[kShiftRows];
#pragma unroll
  for (int r = 0; r < kShiftRows; ++r) acc[r] = Acc(0);
  for (int64_t c = ch0; c < ch1; ++c) {
    const int64_t shift = fastrange(hash32(key_shift, static_cast<uint32_t>(c)), static_cast<uint32_t>(k));
    int64_t m = j - shift;
    if (m < 0) m += k;
    const int64_t i = c * k + m;  // the coordinate of chunk c that lands in bucket j
    if (i >= P) continue;
    const bool neg = (hash32(key_sign, static_cast<uint32_t>(i >> 5)) >> (i & 31)) & 1u;
#pragma unroll
    for (int r = 0; r < kShiftRows; ++r) {
      if (b0 + r < B) {
        const Acc v = static_cast<Acc>(load(x + (b0 + r) * ld + i));
        acc[r] += neg ? -v : v;
      }
    }
  }
  Acc* out = part + static_cast<int64_t>(blockIdx.z) * B * k;
#pragma unroll
  for (int r = 0; r < kShiftRows; ++r)
    if (b0 + r < B) out[(b0 + r) * k + j] = acc[r];
}

// ---------------------------------------------------------------------------- sparse

template <typename In, typename Acc>
__global__ void sparse_kernel(const In* __restrict__ x, Acc* __restrict__ out, int64_t B, int64_t P, int64_t k,
                              int64_t ld, int s, SparseKeys keys) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kSparseThreads + threadIdx.x;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kSparseRows;
  if (p >= P) return;
  Acc v[kSparseRows];
#pragma unroll
  for (int r = 0; r < kSparseRows; ++r) v[r] = (b0 + r < B) ? static_cast<Acc>(load(x + (b0 + r) * ld + p)) : Acc(0);
  const uint32_t block = static_cast<uint32_t>(k / s);
  for (int t = 0; t < s; ++t) {
    const uint32_t h = hash32(keys.key[t], static_cast<uint32_t>(p));
    const int64_t bucket = static_cast<int64_t>(t) * block + fastrange(h, block);
    const bool neg = h & 1u;
#pragma unroll
    for (int r = 0; r < kSparseRows; ++r)
      if (b0 + r < B) atomicAdd(out + (b0 + r) * k + bucket, neg ? -v[r] : v[r]);
  }
}

// Shared-memory variant (float accumulation, k <= kSparseSmemMaxK): a block owns a chunk
// of coordinates for kSparseSmemRows rows, scatters into a shared-memory copy of those
// rows' k buckets, then adds the non-zero buckets to `out` with one global atomic each.
// Global float atomics on 4096 random addresses ran at ~0.1 of HBM bandwidth on an H100;
// shared-memory atomics take the per-element traffic off L2.
template <typename In>
__global__ void sparse_smem_kernel(const In* __restrict__ x, float* __restrict__ out, int64_t B, int64_t P, int64_t k,
                                   int64_t ld, int s, SparseKeys keys) {
  __shared__ float hist[kSparseSmemRows][kSparseSmemMaxK];
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kSparseSmemRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kSparseSmemChunk;
  const int64_t c1 = imin(P, c0 + kSparseSmemChunk);
  for (int64_t i = threadIdx.x; i < kSparseSmemRows * k; i += kSparseThreads) hist[i / k][i % k] = 0.f;
  __syncthreads();
  const uint32_t block = static_cast<uint32_t>(k / s);
  for (int64_t p = c0 + threadIdx.x; p < c1; p += kSparseThreads) {
    float v[kSparseSmemRows];
#pragma unroll
    for (int r = 0; r < kSparseSmemRows; ++r) v[r] = (b0 + r < B) ? static_cast<float>(load(x + (b0 + r) * ld + p)) : 0.f;
    for (int t = 0; t < s; ++t) {
      const uint32_t h = hash32(keys.key[t], static_cast<uint32_t>(p));
      const int64_t bucket = static_cast<int64_t>(t) * block + fastrange(h, block);
      const bool neg = h & 1u;
#pragma unroll
      for (int r = 0; r < kSparseSmemRows; ++r) atomicAdd(&hist[r][bucket], neg ? -v[r] : v[r]);
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < kSparseSmemRows * k; i += kSparseThreads) {
    const int64_t r = i / k, j = i % k;
    const float h = hist[r][j];
    if (b0 + r < B && h != 0.f) atomicAdd(out + (b0 + r) * k + j, h);
  }
}

// ---------------------------------------------------------------------------- countsketch

// Block (row tile of 8, bucket tile of 128): thread j gathers the coordinates of bucket j
// from the CSR tables (order/sign grouped by bucket, coordinates increasing) and adds
// sign * x in that order, like the CPU kernel's sequential scatter.
template <typename In, typename Acc>
__global__ void countsketch_kernel(const In* __restrict__ x, const int32_t* __restrict__ order,
                                   const int32_t* __restrict__ sign, const int32_t* __restrict__ offsets,
                                   Acc* __restrict__ out, int64_t R, int64_t D, int64_t k) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kCsRows;  // rows (B * T) may exceed 65535 tiles
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kCsThreads + threadIdx.x;
  if (j >= k) return;
  Acc acc[kCsRows];
#pragma unroll
  for (int r = 0; r < kCsRows; ++r) acc[r] = Acc(0);
  const int32_t e1 = offsets[j + 1];
  for (int32_t e = offsets[j]; e < e1; ++e) {
    const int64_t d = order[e];
    const bool neg = sign[e] < 0;
#pragma unroll
    for (int r = 0; r < kCsRows; ++r) {
      if (r0 + r < R) {
        const Acc v = static_cast<Acc>(load(x + (r0 + r) * D + d));
        acc[r] += neg ? -v : v;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kCsRows; ++r)
    if (r0 + r < R) out[(r0 + r) * k + j] = acc[r];
}

// ---------------------------------------------------------------------------- reduce / scale

template <typename Acc>
__global__ void reduce_splits_kernel(const Acc* __restrict__ part, Acc* __restrict__ out, int64_t n, int64_t n_split) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n) return;
  Acc a = Acc(0);
  for (int64_t sidx = 0; sidx < n_split; ++sidx) a += part[sidx * n + e];  // split order
  out[e] = a;
}

template <typename Acc>
__global__ void scale_kernel(Acc* __restrict__ out, int64_t n, Acc scale) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < n) out[e] *= scale;
}

// ---------------------------------------------------------------------------- host

struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    check_call(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != device) check_call(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

// Runs launch(r0, rows, part) over blocks of rows; part is [n_split, rows, k] (row
// stride k), reduced into out in split order. Rows are blocked so the partials stay under
// kPartialBytes (a row's result never depends on its block); with one split the kernel
// writes straight into `out`.
template <typename Acc, typename Launch>
void with_partials(Acc* out, int64_t B, int64_t k, int64_t n_split, cudaStream_t stream, Launch launch) {
  if (n_split == 1) {
    launch(int64_t{0}, B, out);
    check_launch("projection kernel");
    return;
  }
  const int64_t rows_per = std::max<int64_t>(1, std::min<int64_t>(B, kPartialBytes / (n_split * k * int64_t(sizeof(Acc)))));
  void* part = nullptr;
  check_call(cudaMallocAsync(&part, sizeof(Acc) * rows_per * k * n_split, stream), "cudaMallocAsync (split partials)");
  cudaError_t err = cudaSuccess;
  for (int64_t r0 = 0; r0 < B && err == cudaSuccess; r0 += rows_per) {
    const int64_t rows = std::min(rows_per, B - r0), n = rows * k;
    launch(r0, rows, static_cast<Acc*>(part));
    err = cudaGetLastError();
    if (err != cudaSuccess) break;
    auto* kernel = &reduce_splits_kernel<Acc>;
    CUPID_LAUNCH(kernel, static_cast<unsigned>(cdiv(n, 256)), 256, stream, static_cast<const Acc*>(part), out + r0 * k,
                 n, n_split);
    err = cudaGetLastError();
  }
  cudaFreeAsync(part, stream);
  check_call(err, "projection kernel");
}

template <typename In>
void project_typed(const In* x, typename AccOf<In>::type* out, int64_t B, int64_t P, int64_t ld, int64_t k, Method m,
                   uint64_t seed, int64_t s, cudaStream_t stream) {
  using Acc = typename AccOf<In>::type;
  const int64_t n = B * k;
  switch (m) {
    case Method::kDense: {
      const int64_t split = split_size(P, kSplitAlign);
      const int64_t n_split = cdiv(P, split);
      const uint32_t key = stream_key(seed, kStreamDense);
      const Acc scale = Acc(1) / std::sqrt(static_cast<Acc>(k));
      with_partials<Acc>(out, B, k, n_split, stream, [&](int64_t r0, int64_t rows, Acc* part) {
        const dim3 grid(static_cast<unsigned>(cdiv(k, kDenseThreads)), static_cast<unsigned>(cdiv(rows, kDenseRows)),
                        static_cast<unsigned>(n_split));
        auto* kernel = &dense_kernel<In, Acc>;
        CUPID_LAUNCH(kernel, grid, kDenseThreads, stream, x + r0 * ld, part, rows, P, k, ld, split, key, scale);
      });
      break;
    }
    case Method::kSignShift: {
      const int64_t n_chunks = cdiv(P, k);
      const int64_t per_split = cdiv(split_size(P, k), k);
      const int64_t n_split = cdiv(n_chunks, per_split);
      const uint32_t key_sign = stream_key(seed, kStreamSignShiftSign);
      const uint32_t key_shift = stream_key(seed, kStreamSignShiftShift);
      with_partials<Acc>(out, B, k, n_split, stream, [&](int64_t r0, int64_t rows, Acc* part) {
        const dim3 grid(static_cast<unsigned>(cdiv(k, kShiftThreads)), static_cast<unsigned>(cdiv(rows, kShiftRows)),
                        static_cast<unsigned>(n_split));
        auto* kernel = &signshift_kernel<In, Acc>;
        CUPID_LAUNCH(kernel, grid, kShiftThreads, stream, x + r0 * ld, part, rows, P, k, ld, per_split, key_sign,
                     key_shift);
      });
      break;
    }
    case Method::kSparse: {
      SparseKeys keys{};
      for (int64_t t = 0; t < s; ++t) keys.key[t] = stream_key(seed, kStreamSparse + static_cast<uint32_t>(t));
      bool done = false;
      if constexpr (std::is_same_v<Acc, float>) {
        if (k <= kSparseSmemMaxK && cdiv(B, kSparseSmemRows) <= 65535) {
          const dim3 grid(static_cast<unsigned>(cdiv(P, kSparseSmemChunk)), static_cast<unsigned>(cdiv(B, kSparseSmemRows)));
          auto* kernel = &sparse_smem_kernel<In>;
          CUPID_LAUNCH(kernel, grid, kSparseThreads, stream, x, out, B, P, k, ld, static_cast<int>(s), keys);
          check_launch("sparse kernel (shared memory)");
          done = true;
        }
      }
      if (!done) {
        const dim3 grid(static_cast<unsigned>(cdiv(P, kSparseThreads)), static_cast<unsigned>(cdiv(B, kSparseRows)));
        auto* kernel = &sparse_kernel<In, Acc>;
        CUPID_LAUNCH(kernel, grid, kSparseThreads, stream, x, out, B, P, k, ld, static_cast<int>(s), keys);
        check_launch("sparse kernel");
      }
      if (s > 1) {
        auto* scale = &scale_kernel<Acc>;
        CUPID_LAUNCH(scale, static_cast<unsigned>(cdiv(n, 256)), 256, stream, out, n,
                     Acc(1) / std::sqrt(static_cast<Acc>(s)));
        check_launch("sparse scale kernel");
      }
      break;
    }
  }
}

template <typename In>
void countsketch_one(const In* x, const int32_t* order, const int32_t* sign, const int32_t* offsets,
                     typename AccOf<In>::type* out, int64_t R, int64_t D, int64_t k, cudaStream_t stream) {
  using Acc = typename AccOf<In>::type;
  const dim3 grid(static_cast<unsigned>(cdiv(R, kCsRows)), static_cast<unsigned>(cdiv(k, kCsThreads)));
  auto* kernel = &countsketch_kernel<In, Acc>;
  CUPID_LAUNCH(kernel, grid, kCsThreads, stream, x, order, sign, offsets, out, R, D, k);
  check_launch("countsketch kernel");
}

template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: f(static_cast<const float*>(nullptr)); break;
    case DType::kFloat64: f(static_cast<const double*>(nullptr)); break;
    case DType::kFloat16: f(static_cast<const __half*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<const __nv_bfloat16*>(nullptr)); break;
    default: throw std::invalid_argument("cupid._C (cuda): unsupported dtype " + std::to_string(dtype));
  }
}

void check_shapes(int64_t batch, int64_t dim, int64_t k) {
  if (batch < 0 || dim <= 0 || k <= 0) throw std::invalid_argument("cupid._C (cuda): batch >= 0, dim > 0 and k > 0 required");
  if (dim > 0xFFFFFFFFll) throw std::invalid_argument("cupid._C (cuda): dim must be < 2^32");
  if (k >= (1ll << 31)) throw std::invalid_argument("cupid._C (cuda): k must be < 2^31");
}

}  // namespace

void project_cuda(uintptr_t x_ptr, uintptr_t out_ptr, int64_t batch, int64_t dim, int64_t x_stride, int64_t k,
                  int method, int dtype, uint64_t seed, int64_t s, int device, uintptr_t stream_ptr) {
  check_shapes(batch, dim, k);
  if (method < 0 || method > 2) throw std::invalid_argument("cupid._C (cuda): unknown projection method " + std::to_string(method));
  const Method m = static_cast<Method>(method);
  if (m == Method::kSparse && (s <= 0 || s > kMaxSparseS || k % s != 0))
    throw std::invalid_argument("cupid._C (cuda): sparse needs 0 < s <= 64 dividing k");
  if (x_stride < dim) throw std::invalid_argument("cupid._C (cuda): x_stride < dim");
  if ((batch + kSparseRows - 1) / kSparseRows > 65535 || (k + kDenseThreads - 1) / kDenseThreads > 65535 ||
      (dim + kSparseThreads - 1) / kSparseThreads > 0x7FFFFFFF)
    throw std::invalid_argument("cupid._C (cuda): batch > 262140 rows or k too large for one launch; split the batch");
  if (batch == 0) return;
  DeviceGuard guard(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  dispatch_dtype(dtype, [&](auto tag) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    using Acc = typename AccOf<In>::type;
    project_typed<In>(reinterpret_cast<const In*>(x_ptr), reinterpret_cast<Acc*>(out_ptr), batch, dim, x_stride, k, m,
                      seed, s, stream);
  });
}

void countsketch_pair_cuda(uintptr_t delta_ptr, uintptr_t x_ptr, uintptr_t order1_ptr, uintptr_t sign1_ptr,
                           uintptr_t offsets1_ptr, uintptr_t order2_ptr, uintptr_t sign2_ptr, uintptr_t offsets2_ptr,
                           uintptr_t cs_delta_ptr, uintptr_t cs_x_ptr, int64_t rows, int64_t out_dim, int64_t in_dim,
                           int64_t k, int dtype, int device, uintptr_t stream_ptr) {
  check_shapes(rows, std::max(out_dim, in_dim), k);
  if (out_dim <= 0 || in_dim <= 0) throw std::invalid_argument("cupid._C (cuda): out_dim and in_dim must be > 0");
  if (out_dim >= (1ll << 31) || in_dim >= (1ll << 31)) throw std::invalid_argument("cupid._C (cuda): out_dim and in_dim must be < 2^31");
  if ((k + kCsThreads - 1) / kCsThreads > 65535) throw std::invalid_argument("cupid._C (cuda): k too large for countsketch");
  if (rows == 0) return;
  DeviceGuard guard(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  auto i32 = [](uintptr_t p) { return reinterpret_cast<const int32_t*>(p); };
  dispatch_dtype(dtype, [&](auto tag) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    using Acc = typename AccOf<In>::type;
    countsketch_one<In>(reinterpret_cast<const In*>(delta_ptr), i32(order1_ptr), i32(sign1_ptr), i32(offsets1_ptr),
                        reinterpret_cast<Acc*>(cs_delta_ptr), rows, out_dim, k, stream);
    countsketch_one<In>(reinterpret_cast<const In*>(x_ptr), i32(order2_ptr), i32(sign2_ptr), i32(offsets2_ptr),
                        reinterpret_cast<Acc*>(cs_x_ptr), rows, in_dim, k, stream);
  });
}

}  // namespace cupid
