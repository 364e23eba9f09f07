"""CUPID-Quality (Agia et al., Eq. 6; DESIGN §1) and its fused min/max kernel.

For a rollout τ and a demo ξ with A = Ψ_τ Ψ_ξᵀ (whitened step features, |τ|×|ξ|):

  Ψ_qual(ξ) = (1/m) Σ_τ [ max_{z'∈τ} min_{z∈ξ} A − min_{z'∈τ} max_{z∈ξ} A ].

Ψ_qual ignores rollout outcomes: as in the reference implementation, only Ψ_π carries
the rollout sign R(τ). The combined score is α·norm(Ψ_π) + (1−α)·norm(Ψ_qual) with
min-max normalisation over the scored set (α = 1 is CUPID, α = 1/2 CUPID-Quality);
``weighting="official"`` reproduces the official notebook instead:
0.5·norm(Ψ_π) + 0.25·norm(−Σ_τ minmax) + 0.25·norm(Σ_τ maxmin).

The per-pair reductions come from :func:`quality_minmax`, a segmented GEMM with a
min/max epilogue over all rollout steps R ``[Mr, K]`` and demo steps D ``[Nd, K]``:
A is never stored, neither per pair nor for all steps. Backends:

- ``torch``: the readable reference; multiplies R by a block of demo columns at a time
  (memory O(Mr × block)) and reduces with ``scatter_reduce``. Also the test oracle.
- ``cpu``: the C++ kernel (``csrc/cpu/quality.cpp``): OpenMP over tiles of whole
  demos, packed panels, per-row running min/max; extra memory O(tile) per thread.
- ``triton``: ``cupid_engine/ops/triton/quality.py``, one program per (rollout, demo)
  pair, tiled over steps and k (GPU; runs under ``TRITON_INTERPRET=1`` in tests).

``backend="auto"`` picks ``triton`` for CUDA tensors and ``cpu`` for CPU tensors when the
extension is built (else ``torch``) and logs the choice once; an explicit backend that is missing raises. All backends agree to float
rounding; in float64 they agree with the brute-force double loop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cupid_engine.config import Config, check, field
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.scorers.cupid import CupidConfig, CupidScorer, episode_lengths
from cupid_engine.scorers.preconditioner import DEFAULT_DAMPING, Preconditioner
from cupid_engine.scorers.table import make_table

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cpu", "triton")
WEIGHTINGS = ("alpha", "official")
_CPU_DTYPES = {torch.float32: 0, torch.float64: 3}


def _offsets(off: Any, rows: int, name: str) -> torch.Tensor:
    o = torch.as_tensor(np.asarray(off), dtype=torch.int64).contiguous()
    if o.ndim != 1 or o.numel() < 2:
        raise ValueError(f"{name} offsets must be [S + 1] with S >= 1")
    if int(o[0]) != 0 or int(o[-1]) != rows:
        raise ValueError(f"{name} offsets must start at 0 and end at {rows} rows, got {int(o[0])}..{int(o[-1])}")
    if bool((o[1:] <= o[:-1]).any()):
        raise ValueError(f"{name} offsets have an empty segment (every episode needs >= 1 step)")
    return o


def check_quality_inputs(
    r: torch.Tensor, r_off: Any, d: torch.Tensor, d_off: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes/dtypes/offsets shared by every backend; returns contiguous tensors."""
    r, d = torch.as_tensor(r), torch.as_tensor(d)
    if r.ndim != 2 or d.ndim != 2 or r.shape[1] != d.shape[1]:
        raise ValueError(f"need R [Mr, K] and D [Nd, K] with equal K, got {tuple(r.shape)} and {tuple(d.shape)}")
    if r.dtype != d.dtype or r.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"R and D must share dtype float32 or float64, got {r.dtype} and {d.dtype}")
    return r.contiguous(), _offsets(r_off, r.shape[0], "rollout"), d.contiguous(), _offsets(d_off, d.shape[0], "demo")


def quality_minmax_reference(
    r: torch.Tensor, r_off: Any, d: torch.Tensor, d_off: Any, *, block_elems: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: per (rollout, demo) max-min and min-max of A, blockwise.

    Args:
        r: ``[Mr, K]`` all rollout step features (rollouts concatenated).
        r_off: ``[m + 1]`` rollout offsets into ``r``.
        d: ``[Nd, K]`` all demo step features.
        d_off: ``[N + 1]`` demo offsets into ``d``.
        block_elems: Bound on Mr × (demo columns per block), i.e. on the A block held.

    Returns:
        ``(maxmin [m, N], minmax [m, N])`` in the input dtype.
    """
    r, ro, d, do = check_quality_inputs(r, r_off, d, d_off)
    m, n, rows = ro.numel() - 1, do.numel() - 1, r.shape[0]
    row_seg = torch.repeat_interleave(torch.arange(m), ro[1:] - ro[:-1])  # [Mr]
    col_seg = torch.repeat_interleave(torch.arange(n), do[1:] - do[:-1])  # [Nd]
    maxmin = torch.empty(m, n, dtype=r.dtype)
    minmax = torch.empty(m, n, dtype=r.dtype)
    cols_per_block = max(1, block_elems // max(rows, 1))
    e0 = 0
    while e0 < n:
        # Whole demos per block; at least one even if it is longer than the budget.
        e1 = e0 + 1
        while e1 < n and int(do[e1 + 1] - do[e0]) <= cols_per_block:
            e1 += 1
        c0, c1 = int(do[e0]), int(do[e1])
        a = r @ d[c0:c1].T  # [Mr, cols] — one block of A, never the whole
        idx = (col_seg[c0:c1] - e0).expand(rows, -1)
        inf = torch.full((rows, e1 - e0), float("inf"), dtype=r.dtype)
        row_min = inf.scatter_reduce(1, idx, a, "amin", include_self=True)  # min over z ∈ ξ
        row_max = (-inf).scatter_reduce(1, idx, a, "amax", include_self=True)  # max over z ∈ ξ
        ridx = row_seg[:, None].expand(-1, e1 - e0)
        big = torch.full((m, e1 - e0), float("inf"), dtype=r.dtype)
        maxmin[:, e0:e1] = (-big).scatter_reduce(0, ridx, row_min, "amax", include_self=True)
        minmax[:, e0:e1] = big.scatter_reduce(0, ridx, row_max, "amin", include_self=True)
        e0 = e1
    return maxmin, minmax


def quality_minmax_naive(r: torch.Tensor, r_off: Any, d: torch.Tensor, d_off: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair materialisation of A via torch matmul (the baseline the benchmark beats)."""
    r, ro, d, do = check_quality_inputs(r, r_off, d, d_off)
    m, n = ro.numel() - 1, do.numel() - 1
    maxmin = torch.empty(m, n, dtype=r.dtype)
    minmax = torch.empty(m, n, dtype=r.dtype)
    for t in range(m):
        rt = r[int(ro[t]) : int(ro[t + 1])]
        for e in range(n):
            a = rt @ d[int(do[e]) : int(do[e + 1])].T
            maxmin[t, e] = a.amin(1).amax()
            minmax[t, e] = a.amax(1).amin()
    return maxmin, minmax


def cpu_available() -> bool:
    """Whether the C++ extension with the quality kernel is importable."""
    try:
        from cupid_engine import _C  # noqa: F401
    except ImportError:
        return False
    return hasattr(_C, "quality_minmax_cpu")


def quality_minmax_cpu(r: torch.Tensor, r_off: Any, d: torch.Tensor, d_off: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ fused kernel; same contract as :func:`quality_minmax_reference`."""
    r, ro, d, do = check_quality_inputs(r, r_off, d, d_off)
    if r.device.type != "cpu" or d.device.type != "cpu":
        raise ValueError("cpu backend: R and D must be CPU tensors")
    if not cpu_available():
        raise ImportError(
            "the C++ quality kernel is not built: run `pip install --no-build-isolation -e .` in the repo"
        )
    from cupid_engine import _C

    m, n = ro.numel() - 1, do.numel() - 1
    maxmin = torch.empty(m, n, dtype=r.dtype)
    minmax = torch.empty(m, n, dtype=r.dtype)
    _C.quality_minmax_cpu(
        r.data_ptr(), ro.data_ptr(), m, d.data_ptr(), do.data_ptr(), n, r.shape[1],
        maxmin.data_ptr(), minmax.data_ptr(), _CPU_DTYPES[r.dtype],
    )
    return maxmin, minmax


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _log_auto_choice(choice: str) -> None:
    log.info("cupid-quality: backend='auto' uses %r", choice)


def quality_minmax(
    r: torch.Tensor, r_off: Any, d: torch.Tensor, d_off: Any, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (rollout, demo) ``max_i min_j A`` and ``min_i max_j A`` without storing A.

    Args:
        r: ``[Mr, K]`` rollout step features, rollouts concatenated.
        r_off: ``[m + 1]`` int offsets of the rollouts in ``r``.
        d: ``[Nd, K]`` demo step features, demos concatenated.
        d_off: ``[N + 1]`` int offsets of the demos in ``d``.
        backend: ``auto``, ``torch``, ``cpu`` or ``triton``.

    Returns:
        ``(maxmin [m, N], minmax [m, N])`` in the dtype of ``r``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if torch.as_tensor(r).device.type == "cuda":
            backend = "triton" if _triton_importable() else "torch"
        else:
            backend = "cpu" if cpu_available() else "torch"
        _log_auto_choice(backend)
    if backend == "torch":
        return quality_minmax_reference(r, r_off, d, d_off)
    if backend == "cpu":
        return quality_minmax_cpu(r, r_off, d, d_off)
    from cupid_engine.ops.triton.quality import quality_minmax_triton

    return quality_minmax_triton(r, r_off, d, d_off)


def minmax_normalize(x: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] over the scored set (a constant vector maps to 0)."""
    x = np.asarray(x, np.float64)
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)


def combine_quality(
    performance: np.ndarray, maxmin: np.ndarray, minmax: np.ndarray, *, alpha: float = 0.5, weighting: str = "alpha"
) -> np.ndarray:
    """Combine Ψ_π with the per-pair reductions into the CUPID-Quality score.

    Args:
        performance: ``[N]`` Ψ_π.
        maxmin: ``[m, N]`` max_{z'} min_{z} A per (rollout, demo).
        minmax: ``[m, N]`` min_{z'} max_{z} A per (rollout, demo).
        alpha: Weight of norm(Ψ_π) for ``weighting="alpha"``.
        weighting: ``alpha`` or ``official`` (see module docstring).

    Returns:
        ``[N]`` combined scores.
    """
    maxmin, minmax = np.asarray(maxmin, np.float64), np.asarray(minmax, np.float64)
    if weighting == "alpha":
        qual = (maxmin - minmax).mean(0)
        return alpha * minmax_normalize(performance) + (1 - alpha) * minmax_normalize(qual)
    if weighting == "official":
        return (
            0.5 * minmax_normalize(performance)
            + 0.25 * minmax_normalize(-minmax.sum(0))
            + 0.25 * minmax_normalize(maxmin.sum(0))
        )
    raise ValueError(f"weighting must be one of {WEIGHTINGS}")


@dataclasses.dataclass(frozen=True)
class CupidQualityConfig(Config):
    """Options of the CUPID-Quality scorer."""

    alpha: float = field(0.5, help="weight of norm(Ψ_π); 1 is CUPID, 1/2 CUPID-Quality")
    weighting: str = field("alpha", help="'alpha' or 'official' (0.5/0.25/0.25 notebook weighting)")
    normalization: str = field("sum", help="Ψ_π normalisation: 'sum' or 'mean'")
    returns: str = field("pm1", help="R(τ) for Ψ_π: 'pm1', '01' or 'real' (Ψ_qual ignores outcomes)")
    damping: float = field(DEFAULT_DAMPING, help="relative damping λ of the preconditioner")
    rollouts: str = field("rollout", help="rollouts τ: a split name or comma-separated episode ids")
    episodes: str = field("train", help="episodes to score: split(s) joined by '+' or comma-separated ids")
    backend: str = field("auto", help=f"fused kernel backend: {BACKENDS}")
    dtype: str = field("float32", help="dtype of whitened step features in the kernel: float32 or float64")
    block_steps: int = field(65536, help="demo steps whitened and scored per block (memory bound)")

    def __post_init__(self) -> None:
        check(0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]")
        check(self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}")
        check(self.backend in BACKENDS, f"backend must be one of {BACKENDS}")
        check(self.dtype in ("float32", "float64"), "dtype must be float32 or float64")
        check(self.block_steps > 0, "block_steps must be positive")
        CupidConfig(normalization=self.normalization, returns=self.returns, damping=self.damping)


def whitened_steps(run: Any, pre: Preconditioner, ids: list[str], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """Concatenated whitened step features ``[rows, K]`` and offsets ``[len(ids) + 1]``."""
    feats = [np.asarray(run.step_features(e)) for e in ids]
    off = np.zeros(len(ids) + 1, np.int64)
    off[1:] = np.cumsum([f.shape[0] for f in feats])
    return pre.whiten(np.concatenate(feats, 0), dtype=dtype), off


@register
class CupidQualityScorer(Scorer):
    """CUPID-Quality: Ψ_π combined with the max-min/min-max quality term."""

    name = "cupid-quality"
    config_cls = CupidQualityConfig

    def reductions(self, store: Any, run: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(demo ids, maxmin [m, N], minmax [m, N])``, demos streamed in step blocks."""
        cfg = self.config
        r = store.run(run)
        cat = store.catalog()
        pre = Preconditioner.from_run(r, damping=cfg.damping)
        dtype = torch.float32 if cfg.dtype == "float32" else torch.float64
        rollouts = _inputs.resolve_episodes(cat, cfg.rollouts, default="rollout")
        demos = _inputs.resolve_episodes(cat, cfg.episodes, default="train")
        rs, r_off = whitened_steps(r, pre, rollouts, dtype)
        lengths = episode_lengths(cat, demos, r)
        maxmin = np.empty((len(rollouts), len(demos)), np.float64)
        minmax = np.empty_like(maxmin)
        start = 0
        while start < len(demos):
            # Whole demos per block, about block_steps steps: memory stays O(block).
            stop, steps = start, 0
            while stop < len(demos) and (stop == start or steps + lengths[stop] <= cfg.block_steps):
                steps += lengths[stop]
                stop += 1
            ds, d_off = whitened_steps(r, pre, demos[start:stop], dtype)
            mm, xm = quality_minmax(rs, r_off, ds, d_off, backend=cfg.backend)
            maxmin[:, start:stop], minmax[:, start:stop] = mm.double().numpy(), xm.double().numpy()
            start = stop
        return demos, maxmin, minmax

    def score(self, store: Any, run: str, **inputs: Any) -> pa.Table:
        cfg = self.config
        ids, maxmin, minmax = self.reductions(store, run)
        perf_ids, perf = CupidScorer(
            normalization=cfg.normalization, returns=cfg.returns, damping=cfg.damping,
            rollouts=cfg.rollouts, episodes=cfg.episodes,
        ).raw_scores(store, run)
        assert perf_ids == ids
        scores = combine_quality(perf, maxmin, minmax, alpha=cfg.alpha, weighting=cfg.weighting)
        splits, meta = _inputs.metadata_columns(store.catalog(), ids)
        meta = dict(meta, cupid=perf.tolist(), quality=(maxmin - minmax).mean(0).tolist())
        return make_table(ids, scores, method=self.name, splits=splits, config=self.config, metadata=meta)
