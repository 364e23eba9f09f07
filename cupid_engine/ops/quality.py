"""The CUPID-Quality op: a segmented GEMM with a min/max epilogue (DESIGN §1, Eq. 6).

:func:`quality_minmax` returns, for every (rollout τ, demo ξ) pair with A = Ψ_τ Ψ_ξᵀ
(whitened step features), ``max_{z'∈τ} min_{z∈ξ} A`` and ``min_{z'∈τ} max_{z∈ξ} A``
without ever storing A, neither per pair nor for all steps. The scorer
(``scorers/quality.py``) turns the two into Ψ_qual.

Backends, dispatched through the ops registry (``ops/registry.py``) like ``project``:

- ``torch``: ``ops/reference_quality.py``, the readable spec (blockwise matmul plus
  ``scatter_reduce``), any device; the test oracle.
- ``cpu``: the C++ kernel (``csrc/cpu/quality.cpp``): a blocked, packed GEMM whose
  epilogue folds each finished register tile into per-row running minima/maxima;
  OpenMP over row blocks × demo chunks; the CPU default when the extension is built.
- ``triton``: ``ops/triton/quality.py``, one program per (rollout, demo) pair (GPU
  float32; CPU under ``TRITON_INTERPRET=1`` in tests only, never chosen by ``auto``).

``backend="auto"`` picks the highest-priority available backend for the input's device
and logs it once (``cpu`` on CPU, ``triton`` on CUDA, else ``torch``); an explicit
backend that is missing raises. All backends agree to float rounding; in float64 they
agree with the brute-force double loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cupid_engine.ops import reference_quality, registry

__all__ = [
    "BACKENDS",
    "OP",
    "check_quality_inputs",
    "quality_minmax",
    "quality_minmax_naive",
    "quality_minmax_reference",
]

OP = "quality_minmax"
# Every registered backend implementing the op (registration happens in ops/__init__.py,
# which always runs before this module).
BACKENDS = ("auto",) + tuple(name for name in registry.names() if registry.get(name).supports(OP))


def _offsets(off: Any, rows: int, name: str) -> torch.Tensor:
    o = torch.as_tensor(np.asarray(off.cpu() if isinstance(off, torch.Tensor) else off), dtype=torch.int64)
    o = o.contiguous()
    if o.ndim != 1 or o.numel() < 2:
        raise ValueError(f"{name} offsets must be [S + 1] with S >= 1")
    if int(o[0]) != 0 or int(o[-1]) != rows:
        raise ValueError(f"{name} offsets must start at 0 and end at {rows} rows, got {int(o[0])}..{int(o[-1])}")
    if bool((o[1:] <= o[:-1]).any()):
        raise ValueError(f"{name} offsets have an empty segment (every episode needs >= 1 step)")
    return o


def check_quality_inputs(
    r: Any, r_off: Any, d: Any, d_off: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the op's inputs once for every backend.

    Returns:
        ``(r, r_off, d, d_off)``: contiguous features, int64 CPU offsets.
    """
    r, d = torch.as_tensor(r), torch.as_tensor(d)
    if r.ndim != 2 or d.ndim != 2 or r.shape[1] != d.shape[1]:
        raise ValueError(f"need R [Mr, K] and D [Nd, K] with equal K, got {tuple(r.shape)} and {tuple(d.shape)}")
    if r.shape[1] == 0:
        raise ValueError("R and D have K = 0 features")
    if r.dtype != d.dtype or r.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"R and D must share dtype float32 or float64, got {r.dtype} and {d.dtype}")
    if r.device != d.device:
        raise ValueError(f"R is on {r.device} but D is on {d.device}")
    return r.contiguous(), _offsets(r_off, r.shape[0], "rollout"), d.contiguous(), _offsets(d_off, d.shape[0], "demo")


def quality_minmax(
    r: Any, r_off: Any, d: Any, d_off: Any, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (rollout, demo) ``max_i min_j A`` and ``min_i max_j A`` without storing A.

    Args:
        r: ``[Mr, K]`` rollout step features (float32 or float64), rollouts concatenated.
        r_off: ``[m + 1]`` int offsets of the rollouts in ``r`` (0 first, ``Mr`` last,
            no empty rollout).
        d: ``[Nd, K]`` demo step features, demos concatenated; same dtype and device.
        d_off: ``[N + 1]`` int offsets of the demos in ``d``.
        backend: ``"auto"`` or one of :data:`BACKENDS`.

    Returns:
        ``(maxmin [m, N], minmax [m, N])`` in the dtype and on the device of ``r``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    r, ro, d, do = check_quality_inputs(r, r_off, d, d_off)
    impl = registry.resolve(backend, r.device.type, OP).impl()
    return impl.quality_minmax(r, ro, d, do)


def quality_minmax_reference(
    r: Any, r_off: Any, d: Any, d_off: Any, *, block_elems: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference on checked inputs (``block_elems``: see ``reference_quality``)."""
    r, ro, d, do = check_quality_inputs(r, r_off, d, d_off)
    return reference_quality.quality_minmax(r, ro, d, do, block_elems=block_elems)


def quality_minmax_naive(r: Any, r_off: Any, d: Any, d_off: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One matmul per (rollout, demo) pair on checked inputs (the benchmark's baseline)."""
    r, ro, d, do = check_quality_inputs(r, r_off, d, d_off)
    return reference_quality.quality_minmax_naive(r, ro, d, do)
