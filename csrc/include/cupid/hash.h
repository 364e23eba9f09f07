// Counter-based hash shared by the C++ and CUDA kernels.
//
// Bit-for-bit mirror of cupid_engine/ops/hashing.py, which is the normative definition:
// the same (seed, stream, counter) gives the same 32-bit value on every backend, so a
// projection never depends on the device, thread count or batch split.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CUPID_HD __host__ __device__ __forceinline__
#else
#define CUPID_HD inline
#endif

namespace cupid {

constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kMixM1 = 0x7FEB352Du;
constexpr uint32_t kMixM2 = 0x846CA68Bu;

// Hash-stream ids, the one C++/CUDA definition. Each random quantity of a projection draws
// from its own stream, key = stream_key(seed, kStream*), so changing one never perturbs
// another. Python mirror: cupid_engine/constants.py (STREAM_*, MAX_SPARSE_S);
// tests/ops/test_hash_streams.py checks both agree through _C.hash_streams().
constexpr uint32_t kStreamDense = 1;
constexpr uint32_t kStreamSparse = 2;  // + r for the r-th non-zero of a coordinate (r < kMaxSparseS)
constexpr uint32_t kStreamSignShiftSign = 1001;
constexpr uint32_t kStreamSignShiftShift = 1002;
constexpr uint32_t kStreamTsOut = 2001;        // tensorsketch h1/s1 over output rows (delta)
constexpr uint32_t kStreamTsIn = 2002;         // tensorsketch h2/s2 over input columns (x)
constexpr uint32_t kStreamTsSignOffset = 100;  // sign stream of a tensorsketch factor = bucket stream + this
constexpr int kMaxSparseS = 64;

// "lowbias32" integer finaliser.
CUPID_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixM1;
  x ^= x >> 15;
  x *= kMixM2;
  x ^= x >> 16;
  return x;
}

// Weyl sequence through the finaliser.
CUPID_HD uint32_t hash32(uint32_t key, uint32_t counter) { return mix32(counter * kGolden + key); }

// Bucket in [0, n) from a 32-bit hash without a division (Lemire's fastrange on 31 bits).
CUPID_HD uint32_t fastrange(uint32_t h, uint32_t n) {
  return static_cast<uint32_t>((static_cast<uint64_t>(h >> 1) * n) >> 31);
}

// Host-side key of one stream of one seed (seed in [0, 2^63)).
inline uint32_t stream_key(uint64_t seed, uint32_t stream) {
  const uint32_t lo = static_cast<uint32_t>(seed & 0xFFFFFFFFull);
  const uint32_t hi = static_cast<uint32_t>(seed >> 32);
  return hash32(hash32(lo, hi), stream);
}

}  // namespace cupid
