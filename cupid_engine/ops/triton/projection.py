"""Triton kernels of ``ops.project``: dense (Rademacher), sparse (CountSketch) and signshift.

Same math and hash as ``ops/reference.py`` (the spec) and ``csrc/cpu/projection.cpp``:
signs and buckets are bit-identical, sums agree to float rounding.

Kernels and their determinism:

* ``_dense_kernel``: each program owns an output tile ``[BLOCK_B, BLOCK_K]`` of one
  coordinate split and walks its coordinates in ``BLOCK_P`` tiles: the ±1 tile is
  generated from one hash per 32 entries and multiplied with ``tl.dot`` (half inputs run
  on tensor cores with float32 accumulation: exact products, since the signs are ±1;
  float32/float64 use ``input_precision="ieee"``). No atomics: bit-reproducible.
* ``_signshift_kernel``: gather instead of scatter. A program owns a block of output
  buckets ``j`` and loops over the chunks ``c`` of its split, reading coordinate
  ``c*k + ((j - shift_c) mod k)`` (two contiguous runs per chunk). No atomics:
  bit-reproducible.
* ``_sparse_kernel``: a program hashes a tile of coordinates once for ``BLOCK_B`` rows and
  scatters with ``tl.atomic_add``. Float atomics commit in hardware order, so on a GPU
  the result can differ run to run in the last bits (well within the float32
  tolerance); under the interpreter the order is sequential. The buckets and signs
  themselves are exact.

The coordinate axis is cut into a fixed number of splits, a pure function of ``(P, k)``
(never of the batch, the device or the SM count), each written into its own partial;
partials are summed in split order by ``_reduce_splits_kernel``, over blocks of rows that
bound the partials' memory. So dense and signshift rows are bit-identical whatever the
batch they come in.

Launch configurations are chosen by the ``_*_config`` functions from the dtype and
shapes (one fixed configuration under the interpreter), not by timing-based
autotuning: a timed pick can differ between processes, and a different tile shape can
change the rounding of ``tl.dot``. float32 inputs use ``input_precision="ieee"`` (CUDA
cores): TF32 would cost ~1e-3 relative error, far outside the float32 tolerance.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from cupid_engine import constants as C
from cupid_engine.ops import hashing as H
from cupid_engine.ops.triton import _hash

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_SPLITS = 32  # most partials per output; more adds a reduction pass for little gain
_MIN_SPLIT = 1 << 16  # fewest coordinates per split
_SPLIT_ALIGN = 256  # split boundaries are multiples of every BLOCK_P used below
_PARTIAL_BYTES = 256 << 20  # bound on the split partials of one launch


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }[dtype]


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of ``tl.dot``: the accumulation dtype (float32 for half inputs).

    Half operands would put the dot on the tensor cores, whose float32 accumulation drifts
    over long sums: on an H100, float16 inputs at P = 100k came out 3.1e-5 from the
    reference (float32 operands: < 1e-5). Widening is exact (±1 signs, half values), so
    every dtype gets the float32 kernel's accuracy; ``dense`` is the slow method anyway.
    """
    return _tl_dtype(_acc_dtype(dtype))


def _check_input(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.device.type != "cuda" and not (_interpret() and x.device.type == "cpu"):
        raise ValueError(f"triton backend: {name} is on {x.device}, expected a CUDA tensor (or CPU under TRITON_INTERPRET=1)")
    if x.dtype not in _DTYPES:
        raise TypeError(f"triton backend: {name} has dtype {x.dtype}, expected one of {list(_DTYPES)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _split_size(P: int, align: int) -> int:
    """Coordinates per split: a function of ``P`` (and the alignment) only."""
    size = max(_MIN_SPLIT, -(-P // _MAX_SPLITS))
    return -(-size // align) * align


def _dense_config(dtype: torch.dtype, B: int, k: int) -> dict:
    """Launch configuration of ``_dense_kernel`` (a pure function of dtype and shapes)."""
    if _interpret():
        return dict(BLOCK_B=16, BLOCK_K=32 if k <= 32 else 64, BLOCK_P=32, num_warps=1)
    # BLOCK_B does not follow B: the tile shape of tl.dot may change its rounding, and a
    # row's result must not depend on the batch it came in.
    block_k = 64 if k <= 64 else 128
    return dict(BLOCK_B=32, BLOCK_K=block_k, BLOCK_P=32, num_warps=4)


def _signshift_config(dtype: torch.dtype, B: int, k: int) -> dict:
    if _interpret():
        return dict(BLOCK_B=4, BLOCK_J=64, num_warps=1)
    return dict(BLOCK_B=min(8, triton.next_power_of_2(B)), BLOCK_J=min(512, triton.next_power_of_2(k)), num_warps=4)


def _sparse_config(dtype: torch.dtype, B: int, P: int) -> dict:
    if _interpret():
        return dict(BLOCK_B=4, BLOCK_P=128, num_warps=1)
    return dict(BLOCK_B=min(4, triton.next_power_of_2(B)), BLOCK_P=1024, num_warps=4)


@triton.jit
def _dense_kernel(
    x_ptr,
    part_ptr,
    B,
    P,
    K,
    stride_xb,
    split_size,
    key,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    # Sign (p, j) is bit (j & 31) of word hash32(hash32(key, p), j >> 5): hash one word
    # per 32 columns, then broadcast its bits.
    words = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    bit = tl.arange(0, 32)
    c0 = pid_s.to(tl.int64) * split_size
    c1 = tl.minimum(c0 + split_size, P)
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC_DTYPE)
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xb
    for t in range(0, tl.cdiv(c1 - c0, BLOCK_P)):
        p = c0 + t * BLOCK_P + tl.arange(0, BLOCK_P)  # int64 coordinates
        p_ok = p < c1
        xt = tl.load(x_row + p[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0)
        row_key = _hash.hash32(key, p)  # [BLOCK_P]
        w = _hash.hash32(row_key[:, None], words[None, :])  # [BLOCK_P, BLOCK_K // 32]
        bits = (w[:, :, None] >> bit[None, None, :].to(tl.uint32)) & 1
        bits = tl.reshape(bits, (BLOCK_P, BLOCK_K))
        sgn = (1 - 2 * bits.to(tl.int32)).to(DOT_DTYPE)  # rows past c1 meet zeros of xt
        acc += tl.dot(xt.to(DOT_DTYPE), sgn, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    out = part_ptr + pid_s.to(tl.int64) * B * K + rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def _signshift_kernel(
    x_ptr,
    part_ptr,
    B,
    P,
    K,
    stride_xb,
    chunks_per_split,
    key_sign,
    key_shift,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    row_ok = rows < B
    j_ok = j < K
    n_chunks = tl.cdiv(P, K)
    ch0 = pid_s * chunks_per_split
    ch1 = tl.minimum(ch0 + chunks_per_split, n_chunks)
    acc = tl.zeros((BLOCK_B, BLOCK_J), dtype=ACC_DTYPE)
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xb
    for c in range(ch0, ch1):
        shift = _hash.fastrange(_hash.hash32(key_shift, c), K)
        m = j - shift
        m = tl.where(m < 0, m + K, m)  # offset inside chunk c that lands in bucket j
        i = tl.cast(c, tl.int64) * K + m
        ok = j_ok & (i < P)
        word = _hash.hash32(key_sign, i >> 5)
        neg = ((word >> (i & 31).to(tl.uint32)) & 1) != 0
        xv = tl.load(x_row + i[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0).to(ACC_DTYPE)
        acc += tl.where(neg[None, :], -xv, xv)
    out = part_ptr + pid_s.to(tl.int64) * B * K + rows.to(tl.int64)[:, None] * K + j[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & j_ok[None, :])


@triton.jit
def _sparse_kernel(
    x_ptr,
    out_ptr,
    B,
    P,
    K,
    S,
    stride_xb,
    seed_key,
    stream0,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_p = tl.program_id(0)  # coordinates on axis 0: the only axis allowed > 65535 programs
    pid_b = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < B
    p_ok = p < P
    mask = row_ok[:, None] & p_ok[None, :]
    xv = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xb + p[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    block = K // S
    out_row = out_ptr + rows.to(tl.int64)[:, None] * K
    for r in range(0, S):
        # stream_key(seed, STREAM_SPARSE + r) = hash32(hash32(seed_lo, seed_hi), stream):
        # seed_key is the inner hash, computed on the host.
        key = _hash.hash32(seed_key, stream0 + r)
        h = _hash.hash32(key, p)
        bucket = r * block + _hash.fastrange(h, block)
        neg = (h & 1) != 0
        tl.atomic_add(out_row + bucket[None, :], tl.where(neg[None, :], -xv, xv), mask=mask, sem="relaxed")


@triton.jit
def _reduce_splits_kernel(part_ptr, out_ptr, N, N_SPLIT, BLOCK: tl.constexpr):
    """``out[e] = sum_s part[s, e]``, summed in split order (a fixed order, unlike a tree)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for sidx in range(1, N_SPLIT):
        acc += tl.load(part_ptr + tl.cast(sidx, tl.int64) * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


def _by_row_blocks(x: torch.Tensor, k: int, n_split: int, launch) -> torch.Tensor:
    """Run ``launch(x_rows, part)`` over blocks of rows and reduce the partials in split order.

    ``part`` is ``[n_split, rows, k]``; rows are blocked so that it stays under
    ``_PARTIAL_BYTES`` (a row's result never depends on its block). With one split the
    kernel writes straight into the output.
    """
    B = x.shape[0]
    acc = _acc_dtype(x.dtype)
    out = torch.empty(B, k, dtype=acc, device=x.device)
    if n_split == 1:
        launch(x, out.view(1, B, k))
        return out
    item = torch.finfo(acc).bits // 8
    rows = max(1, min(B, _PARTIAL_BYTES // (n_split * k * item)))
    for r0 in range(0, B, rows):
        xr = x[r0 : r0 + rows]
        part = torch.empty(n_split, xr.shape[0], k, dtype=acc, device=x.device)
        launch(xr, part)
        o = out[r0 : r0 + rows]
        n = o.numel()
        block = 1024
        _reduce_splits_kernel[(triton.cdiv(n, block),)](part, o, n, n_split, BLOCK=block)
    return out


def _dense(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    B, P = x.shape
    cfg = _dense_config(x.dtype, B, k)
    split = _split_size(P, _SPLIT_ALIGN)
    n_split = triton.cdiv(P, split)
    key = H.stream_key(seed, C.STREAM_DENSE)

    def launch(xr: torch.Tensor, part: torch.Tensor) -> None:
        grid = (triton.cdiv(xr.shape[0], cfg["BLOCK_B"]), triton.cdiv(k, cfg["BLOCK_K"]), n_split)
        _dense_kernel[grid](
            xr,
            part,
            xr.shape[0],
            P,
            k,
            xr.stride(0),
            split,
            key,
            BLOCK_B=cfg["BLOCK_B"],
            BLOCK_K=cfg["BLOCK_K"],
            BLOCK_P=cfg["BLOCK_P"],
            DOT_DTYPE=_dot_dtype(x.dtype),
            ACC_DTYPE=_tl_dtype(_acc_dtype(x.dtype)),
            PRECISION="ieee",
            num_warps=cfg["num_warps"],
        )

    # The 1/sqrt(k) scale is applied here, in the output dtype: a Python float passed to a
    # Triton kernel is float32, which cost float64 outputs 5e-8 relative (H100).
    return _by_row_blocks(x, k, n_split, launch).mul_(1.0 / math.sqrt(k))


def _signshift(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    B, P = x.shape
    cfg = _signshift_config(x.dtype, B, k)
    n_chunks = triton.cdiv(P, k)
    per_split = triton.cdiv(_split_size(P, k), k)
    n_split = triton.cdiv(n_chunks, per_split)
    key_sign = H.stream_key(seed, C.STREAM_SIGNSHIFT_SIGN)
    key_shift = H.stream_key(seed, C.STREAM_SIGNSHIFT_SHIFT)

    def launch(xr: torch.Tensor, part: torch.Tensor) -> None:
        grid = (triton.cdiv(xr.shape[0], cfg["BLOCK_B"]), triton.cdiv(k, cfg["BLOCK_J"]), n_split)
        _signshift_kernel[grid](
            xr,
            part,
            xr.shape[0],
            P,
            k,
            xr.stride(0),
            per_split,
            key_sign,
            key_shift,
            BLOCK_B=cfg["BLOCK_B"],
            BLOCK_J=cfg["BLOCK_J"],
            ACC_DTYPE=_tl_dtype(_acc_dtype(x.dtype)),
            num_warps=cfg["num_warps"],
        )

    return _by_row_blocks(x, k, n_split, launch)


def _sparse(x: torch.Tensor, k: int, seed: int, s: int) -> torch.Tensor:
    B, P = x.shape
    acc = _acc_dtype(x.dtype)
    cfg = _sparse_config(x.dtype, B, P)
    out = torch.zeros(B, k, dtype=acc, device=x.device)
    lo, hi = seed & H.MASK32, (seed >> 32) & H.MASK32
    grid = (triton.cdiv(P, cfg["BLOCK_P"]), triton.cdiv(B, cfg["BLOCK_B"]))
    _sparse_kernel[grid](
        x,
        out,
        B,
        P,
        k,
        s,
        x.stride(0),
        H.hash32_int(lo, hi),
        C.STREAM_SPARSE,
        BLOCK_B=cfg["BLOCK_B"],
        BLOCK_P=cfg["BLOCK_P"],
        ACC_DTYPE=_tl_dtype(acc),
        num_warps=cfg["num_warps"],
    )
    if s > 1:
        out.mul_(1.0 / math.sqrt(s))
    return out


def project(x: torch.Tensor, k: int, method: str, seed: int, s: int = 1) -> torch.Tensor:
    """``[B, P] -> [B, k]`` projection (inputs validated by ``ops.project``).

    Returns float32 (float64 for float64 input), on ``x.device``.
    """
    x = _check_input(x, "x")
    if x.dim() != 2:
        raise ValueError(f"triton backend: x must be [B, P], got {tuple(x.shape)}")
    B, P = x.shape
    if B == 0:
        return torch.zeros(0, k, dtype=_acc_dtype(x.dtype), device=x.device)
    if method == "dense":
        return _dense(x, k, seed)
    if method == "signshift":
        return _signshift(x, k, seed)
    if method == "sparse":
        if s <= 0 or k % s:
            raise ValueError(f"triton backend: sparse needs s > 0 dividing k, got s={s}, k={k}")
        return _sparse(x, k, seed, s)
    raise ValueError(f"triton backend: unknown method {method!r}")
