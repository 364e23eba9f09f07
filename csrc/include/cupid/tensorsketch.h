// Tensorsketch on the CPU without torch.fft (csrc/cpu/tensorsketch.cpp).
//
// Two exact evaluations of the same sketch, the CountSketch of vec(sum_t delta_t x_t^T)
// with bucket (h1(o) + h2(i)) mod k and sign s1(o) s2(i):
//
// * tensorsketch_fft_cpu: sum over layers and steps of rfft(CS1(delta_t)) * rfft(CS2(x_t)),
//   one irfft per sample. The FFTs run W samples at a time, one per SIMD lane (W = 16
//   float32 / 8 float64 on 512-bit vectors): every lane executes the same instructions,
//   so a sample's result depends on its own data only (not on the batch, its position
//   in a group, or the thread count). k must be a power of two >= 8.
// * hash_gradient_cpu: hash a materialised per-sample gradient G [B, O, I] with the
//   combined hashes (the "dense" route for many steps: G from one batched GEMM).
//
// Pointers travel as integers; cupid_engine/ops/cpu_backend.py checks shapes and dtypes.
// dtype 0 = float32, 3 = float64 (inputs and output of that dtype).
#pragma once

#include <cstdint>
#include <vector>

namespace cupid {

// out[B, k] = sum_l sum_t irfft(rfft(CS1_l(delta_l[b, t])) * rfft(CS2_l(x_l[b, t]))).
// Per layer l: delta_l at delta_ptrs[l] with element (b, t, o) at b*d_sb + t*d_st + o,
// x_l likewise with x_sb, x_st; bucket tables b1 [O] int64 in [0, k), signs s1 [O] int64
// (+-1), b2/s2 [I]. Layers are accumulated in the given order, t ascending, o / i ascending.
// direct (empty, or one flag per layer): a flagged layer is evaluated in the time domain
// (its T O I hashed products accumulated per lane group and added to the inverse FFT's
// output) instead of by two FFTs per step: exact, a different float rounding.
// x_ones (empty, or one flag per layer): a flagged layer's x holds I - 1 columns in memory and
// its last coordinate is a constant 1 (a bias input; the same sums as a stored column of ones).
// sums_ptr (0: none): [B] of the dtype, receives each output row's sum (for a NaN/Inf check).
void tensorsketch_fft_cpu(const std::vector<uintptr_t>& delta_ptrs, const std::vector<uintptr_t>& x_ptrs,
                          const std::vector<int64_t>& steps, const std::vector<int64_t>& out_dims,
                          const std::vector<int64_t>& in_dims, const std::vector<int64_t>& d_sb,
                          const std::vector<int64_t>& d_st, const std::vector<int64_t>& x_sb,
                          const std::vector<int64_t>& x_st, const std::vector<uintptr_t>& b1_ptrs,
                          const std::vector<uintptr_t>& s1_ptrs, const std::vector<uintptr_t>& b2_ptrs,
                          const std::vector<uintptr_t>& s2_ptrs, uintptr_t out_ptr, int64_t batch, int64_t k,
                          int dtype, const std::vector<int64_t>& direct = {},
                          const std::vector<int64_t>& x_ones = {}, uintptr_t sums_ptr = 0);

// out[b, (b1[o] + b2[i]) mod k] (+)= s1[o] s2[i] g[b, o, i], o then i ascending; out is
// overwritten unless accumulate. g row-major [B, O, I] contiguous.
void hash_gradient_cpu(uintptr_t g_ptr, uintptr_t b1_ptr, uintptr_t s1_ptr, uintptr_t b2_ptr, uintptr_t s2_ptr,
                       uintptr_t out_ptr, int64_t batch, int64_t out_dim, int64_t in_dim, int64_t k, int dtype,
                       bool accumulate);

// SIMD lanes (samples per group) of tensorsketch_fft_cpu for a dtype.
int tensorsketch_lanes(int dtype);

}  // namespace cupid

namespace cupid {

// im2col of a zero-padded convolution input, written in one pass:
// out[r, ho * Wo + wo, (c * kh + i) * kw + j] = x[r, c, ho*sh + i*dh - ph, wo*sw + j*dw - pw]
// (0 outside the input), plus a last column of ones when append_one. x is [R, C, H, W]
// contiguous (a Conv1d input is H = 1, kh = 1); out is [R, Ho * Wo, C * kh * kw (+1)].
// A pure copy: the values equal torch's unfold + permute copy bit for bit.
void im2col_cpu(uintptr_t x_ptr, uintptr_t out_ptr, int64_t rows, int64_t channels, int64_t height, int64_t width,
                int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t ph, int64_t pw,
                int64_t out_h, int64_t out_w, bool append_one, int dtype);

}  // namespace cupid
