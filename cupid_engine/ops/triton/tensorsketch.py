"""Triton kernel of the CountSketch stage of ``ops.tensorsketch``.

``countsketch_pair`` sketches ``delta [B, T, O]`` (stream ``TS_OUT``) and ``x [B, T, I]``
(stream ``TS_IN``) into ``[B, T, k]`` each; the FFT stage is
``spectral.circular_convolve_sum`` (``torch.fft``), exactly as on the CPU backend.

The factor hashes are the host tables of ``reference.countsketch_buckets`` (a random
injection when ``n <= k``), grouped by bucket (``cuda_backend.countsketch_csr``).
``_countsketch_kernel`` gathers instead of scattering: a program owns an output tile
``[BLOCK_R, BLOCK_K]`` and each bucket adds ``sign * x[coordinate]`` over its own
coordinates in increasing order. No atomics, ``O(rows * (n + k))`` work, and the same
order of additions as the CPU kernel, so float32 results are bit-identical to it and
bit-reproducible.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cupid_engine import constants as C
from cupid_engine.ops import spectral
from cupid_engine.ops.cuda_backend import countsketch_csr
from cupid_engine.ops.triton.projection import _acc_dtype, _check_input, _tl_dtype


def _countsketch_config(dtype: torch.dtype, rows: int, k: int) -> dict:
    """Launch configuration of ``_countsketch_kernel`` (a pure function of dtype and shapes)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BLOCK_R=4, BLOCK_K=64, num_warps=1)
    return dict(BLOCK_R=8, BLOCK_K=256, num_warps=4)


@triton.jit
def _countsketch_kernel(
    x_ptr,
    order_ptr,
    sign_ptr,
    offsets_ptr,
    out_ptr,
    R,
    D,
    K,
    MAX_BUCKET,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_r = tl.program_id(0)  # rows (B * T) on axis 0: the only axis allowed > 65535 programs
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < R
    col_ok = cols < K
    start = tl.load(offsets_ptr + cols, mask=col_ok, other=0)
    stop = tl.load(offsets_ptr + cols + 1, mask=col_ok, other=0)
    x_row = x_ptr + rows.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC_DTYPE)
    for e in range(0, MAX_BUCKET):
        idx = start + e
        ok = idx < stop
        coord = tl.load(order_ptr + idx, mask=ok, other=0)
        neg = tl.load(sign_ptr + idx, mask=ok, other=1) < 0
        xv = tl.load(x_row + coord[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0).to(ACC_DTYPE)
        acc += tl.where(neg[None, :], -xv, xv)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def _countsketch(x: torch.Tensor, k: int, seed: int, stream: int) -> torch.Tensor:
    """CountSketch of ``x [R, D]`` (contiguous) into ``[R, k]`` with the tables of ``stream``."""
    R, D = x.shape
    out = torch.empty(R, k, dtype=_acc_dtype(x.dtype), device=x.device)
    if R == 0:
        return out
    order, sign, offsets, longest = countsketch_csr(seed, stream, D, k, str(x.device))
    cfg = _countsketch_config(x.dtype, R, k)
    grid = (triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _countsketch_kernel[grid](
        x,
        order,
        sign,
        offsets,
        out,
        R,
        D,
        k,
        longest,
        BLOCK_R=cfg["BLOCK_R"],
        BLOCK_K=cfg["BLOCK_K"],
        ACC_DTYPE=_tl_dtype(_acc_dtype(x.dtype)),
        num_warps=cfg["num_warps"],
    )
    return out


def countsketch_pair(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 of tensorsketch: ``CS1(delta) [B, T, k]`` and ``CS2(x) [B, T, k]``."""
    delta = _check_input(delta, "delta").contiguous()
    x = _check_input(x, "x").contiguous()
    if delta.dim() != 3 or x.dim() != 3 or delta.shape[:2] != x.shape[:2]:
        raise ValueError(f"triton backend: need delta [B, T, O] and x [B, T, I], got {tuple(delta.shape)}, {tuple(x.shape)}")
    if delta.device != x.device or delta.dtype != x.dtype:
        raise ValueError(f"triton backend: delta ({delta.dtype}, {delta.device}) and x ({x.dtype}, {x.device}) differ")
    B, T, O = delta.shape
    I = x.shape[2]
    cs1 = _countsketch(delta.view(B * T, O), k, seed, C.STREAM_TS_OUT)
    cs2 = _countsketch(x.view(B * T, I), k, seed, C.STREAM_TS_IN)
    return cs1.view(B, T, k), cs2.view(B, T, k)


def tensorsketch(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``[B, T, O], [B, T, I] -> [B, k]`` (inputs validated by ``ops.tensorsketch``)."""
    cs1, cs2 = countsketch_pair(delta, x, k, seed)
    return spectral.circular_convolve_sum(cs1, cs2, k)
