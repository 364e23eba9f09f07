"""Triton kernel of the CountSketch stage of ``ops.tensorsketch``.

``countsketch_pair`` hashes ``delta [B, T, O]`` (stream ``TS_OUT``) and ``x [B, T, I]``
(stream ``TS_IN``) into ``[B, T, k]`` each; the FFT stage is
``reference.circular_convolve_sum`` (``torch.fft``), exactly as on the CPU backend.

``_countsketch_kernel`` is deterministic without atomics: the CountSketch of a row is
the product of the row with the one-hot matrix ``S [D, k]`` (``S[i, h(i)] = s(i)``), so
each program owns an output tile ``[BLOCK_R, BLOCK_K]``, rebuilds its ``[BLOCK_D,
BLOCK_K]`` slice of ``S`` from the hash (one compare per entry) and accumulates with
``tl.dot``. Products with 0/±1 are exact, so the result is the bucket sums up to the
order of float32 additions, with a fixed order. The cost is ``O(rows * D * k)``
multiply-adds instead of a scatter's ``O(rows * D)``: a good trade while ``D`` (one
layer's width) and ``k`` are in the thousands, since it runs on tensor cores for half
inputs and never contends on an output bucket.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cupid_engine import constants as C
from cupid_engine.ops import hashing as H
from cupid_engine.ops import reference
from cupid_engine.ops.triton import _hash
from cupid_engine.ops.triton.projection import _acc_dtype, _check_input, _dot_dtype, _tl_dtype


def _countsketch_config(dtype: torch.dtype, rows: int, k: int) -> dict:
    """Launch configuration of ``_countsketch_kernel`` (a pure function of dtype and shapes)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BLOCK_R=16, BLOCK_K=32 if k <= 32 else 64, BLOCK_D=32, num_warps=1)
    half = dtype in (torch.float16, torch.bfloat16)
    # BLOCK_R does not follow the row count, so a row never depends on its batch.
    return dict(BLOCK_R=32, BLOCK_K=128 if k > 64 else 64, BLOCK_D=64 if half else 32, num_warps=4)


@triton.jit
def _countsketch_kernel(
    x_ptr,
    out_ptr,
    R,
    D,
    K,
    key,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < R
    x_row = x_ptr + rows.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xt = tl.load(x_row + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        h = _hash.hash32(key, d)
        bucket = _hash.fastrange(h, K)
        sgn = tl.where((h & 1) != 0, -1.0, 1.0)
        hit = (bucket[:, None] == cols[None, :]) & d_ok[:, None]
        onehot = tl.where(hit, sgn[:, None], 0.0).to(DOT_DTYPE)
        acc += tl.dot(xt.to(DOT_DTYPE), onehot, input_precision="ieee", out_dtype=ACC_DTYPE)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], acc, mask=row_ok[:, None] & (cols < K)[None, :])


def _countsketch(x: torch.Tensor, k: int, key: int) -> torch.Tensor:
    """CountSketch of ``x [R, D]`` (contiguous) into ``[R, k]`` with stream key ``key``."""
    R, D = x.shape
    acc = _acc_dtype(x.dtype)
    out = torch.empty(R, k, dtype=acc, device=x.device)
    if R == 0:
        return out
    cfg = _countsketch_config(x.dtype, R, k)
    grid = (triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _countsketch_kernel[grid](
        x,
        out,
        R,
        D,
        k,
        key,
        BLOCK_R=cfg["BLOCK_R"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_D=cfg["BLOCK_D"],
        DOT_DTYPE=_dot_dtype(x.dtype),
        ACC_DTYPE=_tl_dtype(acc),
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
    cs1 = _countsketch(delta.view(B * T, O), k, H.stream_key(seed, C.STREAM_TS_OUT))
    cs2 = _countsketch(x.view(B * T, I), k, H.stream_key(seed, C.STREAM_TS_IN))
    return cs1.view(B, T, k), cs2.view(B, T, k)


def tensorsketch(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``[B, T, O], [B, T, I] -> [B, k]`` (inputs validated by ``ops.tensorsketch``)."""
    cs1, cs2 = countsketch_pair(delta, x, k, seed)
    return reference.circular_convolve_sum(cs1, cs2, k)
