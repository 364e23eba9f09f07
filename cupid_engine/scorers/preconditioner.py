"""The Gauss-Newton preconditioner in projected space and feature whitening.

H = G/n + λ·(tr(G/n)/k)·I with G = Σ φφᵀ accumulated in float64 over the **training
split only** (DESIGN §1). λ is a *relative* damping (default 1e-3): it scales with the
mean eigenvalue of G/n, so it means the same thing for every projection size and
output function; λ = 0 is allowed only when passed explicitly. H = LLᵀ (Cholesky, in
float64) and the whitened feature is ψ = L⁻¹φ, so that every influence the engine
computes is a plain inner product, a(z', z) = φ(z')ᵀH⁻¹φ(z) = ψ(z')ᵀψ(z), and
episode sums can be whitened after summing (whitening is linear).

Checkpoint (or seed) ensembles concatenate per-checkpoint whitened features scaled by
1/√C, so that one inner product is the ensemble *average* of the per-checkpoint
influences. Each checkpoint keeps its own H⁻¹: rescaling each inverse by its mean (a
pitfall of some reference code) would change the relative weight of checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from cupid_engine.config import Config, check, field

DEFAULT_DAMPING = 1e-3


@dataclasses.dataclass(frozen=True)
class PreconditionerConfig(Config):
    """How the curvature is damped."""

    damping: float = field(
        DEFAULT_DAMPING,
        help="relative damping λ: H = G/n + λ·(tr(G/n)/k)·I; 0 only when asked for explicitly",
    )

    def __post_init__(self) -> None:
        check(
            isinstance(self.damping, (int, float)) and np.isfinite(self.damping) and self.damping >= 0,
            f"damping must be a finite number >= 0, got {self.damping!r}",
        )


class Preconditioner:
    """H = LLᵀ from a training-split Gram; whitens features ψ = L⁻¹φ.

    Args:
        gram: ``[K, K]`` Σ φφᵀ over the training steps (symmetric, float64 preferred).
        count: Number of steps n that entered ``gram``.
        damping: Relative damping λ (see module docstring).

    Raises:
        ValueError: If the Gram is empty, not finite, or H is not positive definite.
    """

    def __init__(self, gram: np.ndarray | torch.Tensor, count: int, *, damping: float = DEFAULT_DAMPING) -> None:
        self.config = PreconditionerConfig(damping=float(damping))
        g = torch.as_tensor(np.asarray(gram) if not isinstance(gram, torch.Tensor) else gram).to(torch.float64)
        if g.ndim != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"gram must be [K, K], got {tuple(g.shape)}")
        if count <= 0:
            raise ValueError("the Gram was accumulated over 0 training steps: is the train split empty?")
        if not torch.isfinite(g).all():
            raise ValueError("the Gram matrix contains NaN/Inf: some training step features are not finite")
        self.k = int(g.shape[0])
        self.count = int(count)
        h = (g + g.T) / (2.0 * count)  # symmetrise: accumulated sums drift by rounding
        scale = float(torch.trace(h)) / self.k
        if scale <= 0:
            raise ValueError("the Gram matrix has zero trace: all training features are zero")
        self.ridge = self.config.damping * scale
        h = h + self.ridge * torch.eye(self.k, dtype=torch.float64)
        self.hessian = h
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0:
            raise ValueError(
                f"H = G/n + λ·(tr/k)·I is not positive definite (λ = {self.config.damping:g}, "
                f"Cholesky failed at column {int(info)}); the Gram is rank-deficient (fewer training "
                "steps than k, or degenerate features): increase the damping"
            )
        self.chol = chol  # [K, K] lower-triangular, float64

    @classmethod
    def from_run(cls, run: Any, *, damping: float = DEFAULT_DAMPING) -> "Preconditioner":
        """Build from a store run (``run.gram()``, ``run.gram_count``).

        Raises:
            ValueError: If the run's Gram was accumulated over anything but the train split.
        """
        splits = tuple(getattr(getattr(run, "config", None), "gram_splits", ("train",)))
        if splits != ("train",):
            raise ValueError(
                f"run {getattr(run, 'name', '?')!r} accumulated its Gram over splits {splits}; "
                "the preconditioner must use the training split only (holdout rows would leak)"
            )
        return cls(run.gram(), int(run.gram_count), damping=damping)

    @classmethod
    def from_features(cls, steps: np.ndarray | torch.Tensor, *, damping: float = DEFAULT_DAMPING) -> "Preconditioner":
        """Build from ``[n, K]`` training step features (Gram accumulated in float64)."""
        x = torch.as_tensor(steps).to(torch.float64)
        return cls(x.T @ x, int(x.shape[0]), damping=damping)

    def whiten(self, features: np.ndarray | torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """ψ = L⁻¹φ for a batch.

        Args:
            features: ``[B, K]`` (or ``[K]``) features or episode sums.
            dtype: Output dtype (the solve itself is float64).

        Returns:
            ``[B, K]`` (or ``[K]``) whitened features.
        """
        x = torch.as_tensor(features).to(torch.float64)
        squeeze = x.ndim == 1
        x = x.reshape(1, -1) if squeeze else x
        if x.shape[-1] != self.k:
            raise ValueError(f"features have width {x.shape[-1]}, the preconditioner k = {self.k}")
        # L⁻¹ Xᵀ via one triangular solve over the whole batch.
        psi = torch.linalg.solve_triangular(self.chol, x.T, upper=False).T
        psi = psi.to(dtype)
        return psi[0] if squeeze else psi

    def iter_whiten(
        self, blocks: Iterable[tuple[Sequence[str], np.ndarray]], *, dtype: torch.dtype = torch.float64
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Whiten a stream of ``(ids, [b, K])`` blocks, one block in memory at a time."""
        for ids, x in blocks:
            yield list(ids), self.whiten(x, dtype=dtype)

    def inverse_apply(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        """H⁻¹x for ``[B, K]`` or ``[K]`` (float64), via the Cholesky factor."""
        x = torch.as_tensor(features).to(torch.float64)
        squeeze = x.ndim == 1
        x = x.reshape(-1, 1) if squeeze else x.T
        y = torch.cholesky_solve(x, self.chol, upper=False)
        return y[:, 0] if squeeze else y.T


def concat_checkpoints(whitened: Sequence[torch.Tensor | np.ndarray]) -> torch.Tensor:
    """Concatenate per-checkpoint whitened features scaled by 1/√C.

    Args:
        whitened: ``C`` arrays ``[B, K_c]`` of the same rows, one per checkpoint/seed.

    Returns:
        ``[B, Σ K_c]``; the inner product of two such rows is the mean over checkpoints
        of the per-checkpoint influences.
    """
    if not whitened:
        raise ValueError("no checkpoints to concatenate")
    parts = [torch.as_tensor(w) for w in whitened]
    rows = {p.shape[0] for p in parts}
    if len(rows) != 1:
        raise ValueError(f"checkpoint features have different row counts {sorted(rows)}")
    return torch.cat(parts, dim=-1) / float(np.sqrt(len(parts)))
