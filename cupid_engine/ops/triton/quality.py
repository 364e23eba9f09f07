"""Triton kernel of the CUPID-Quality reductions (GPU; CPU under ``TRITON_INTERPRET=1``).

The ``triton`` backend of ``cupid_engine.ops.quality.quality_minmax``; same contract as
the spec ``cupid_engine.ops.reference_quality.quality_minmax``:
for every (rollout τ, demo ξ) pair, ``maxmin = max_{z'} min_{z} A`` and
``minmax = min_{z'} max_{z} A`` with A = Ψ_τ Ψ_ξᵀ, never storing A.

``_quality_minmax_kernel``: one program per (rollout, demo) pair. It walks the rollout's
steps in ``BLOCK_I`` tiles and, for each, the demo's steps in ``BLOCK_J`` tiles,
accumulating the ``[BLOCK_I, BLOCK_J]`` tile of A over ``BLOCK_K`` slices with ``tl.dot``
(``input_precision="ieee"``: fp32 products, so the numbers do not depend on whether the
GPU has TF32), then folds the tile into per-row running minima/maxima and those into
the pair's two values. Segment bounds are read from the offset arrays at run time, so
ragged lengths never trigger a recompile. No atomics: each output is written once,
bit-reproducible. Launch sizes come from :func:`_config` (shapes only, no timed
autotuning, which could change the rounding between processes).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _quality_minmax_kernel(
    r_ptr, r_off_ptr, d_ptr, d_off_ptr, maxmin_ptr, minmax_ptr, n_demos, K,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    e = tl.program_id(1)
    r0 = tl.load(r_off_ptr + t)
    r1 = tl.load(r_off_ptr + t + 1)
    d0 = tl.load(d_off_ptr + e)
    d1 = tl.load(d_off_ptr + e + 1)
    inf = float("inf")
    best_maxmin = tl.full([BLOCK_I], -inf, tl.float32)
    best_minmax = tl.full([BLOCK_I], inf, tl.float32)
    for i0 in range(r0, r1, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        row_ok = rows < r1
        row_min = tl.full([BLOCK_I], inf, tl.float32)
        row_max = tl.full([BLOCK_I], -inf, tl.float32)
        for j0 in range(d0, d1, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            col_ok = cols < d1
            acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                a = tl.load(r_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(d_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            row_min = tl.minimum(row_min, tl.min(tl.where(col_ok[None, :], acc, inf), axis=1))
            row_max = tl.maximum(row_max, tl.max(tl.where(col_ok[None, :], acc, -inf), axis=1))
        best_maxmin = tl.maximum(best_maxmin, tl.where(row_ok, row_min, -inf))
        best_minmax = tl.minimum(best_minmax, tl.where(row_ok, row_max, inf))
    tl.store(maxmin_ptr + t * n_demos + e, tl.max(best_maxmin, axis=0))
    tl.store(minmax_ptr + t * n_demos + e, tl.min(best_minmax, axis=0))


def _config(k: int) -> dict[str, int]:
    """Launch sizes from the shapes; small tiles keep the interpreter fast in tests."""
    if _interpret():
        return {"BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_K": 16, "num_warps": 1}
    return {"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_K": 32 if k >= 32 else 16, "num_warps": 4}


def quality_minmax(
    r: torch.Tensor, r_off: torch.Tensor, d: torch.Tensor, d_off: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maxmin [m, N], minmax [m, N])`` float32 for R ``[Mr, K]``, D ``[Nd, K]`` (float32).

    Inputs as checked by ``ops.quality.check_quality_inputs`` (contiguous features,
    ``[m + 1]`` / ``[N + 1]`` int64 offsets: 0 first, row count last, no empty segment).
    Features must be on a CUDA device, or anywhere under the interpreter.
    """
    r, d = r.contiguous(), d.contiguous()
    if r.dtype != torch.float32 or d.dtype != torch.float32:
        raise TypeError(
            f"triton quality kernel takes float32 features, got {r.dtype}; use backend='torch' for float64 on GPU"
        )
    if not _interpret() and (r.device.type != "cuda" or d.device.type != "cuda"):
        raise ValueError("triton backend: R and D must be CUDA tensors (or set TRITON_INTERPRET=1 before importing triton)")
    if r.device != d.device:
        raise ValueError(f"R is on {r.device}, D on {d.device}")
    ro, do = r_off.to(r.device, torch.int64), d_off.to(r.device, torch.int64)
    m, n, k = ro.numel() - 1, do.numel() - 1, r.shape[1]
    maxmin = torch.empty(m, n, dtype=torch.float32, device=r.device)
    minmax = torch.empty(m, n, dtype=torch.float32, device=r.device)
    cfg = _config(k)
    _quality_minmax_kernel[(m, n)](
        r, ro, d, do, maxmin, minmax, n, k,
        BLOCK_I=cfg["BLOCK_I"], BLOCK_J=cfg["BLOCK_J"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
    )
    return maxmin, minmax
