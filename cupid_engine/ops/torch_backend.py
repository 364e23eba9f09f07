"""The ``torch`` backend: the reference itself, on any device torch supports."""

from __future__ import annotations

import torch

from cupid_engine.ops import reference, reference_quality


def project(x: torch.Tensor, k: int, method: str, seed: int, s: int) -> torch.Tensor:
    return reference.project(x, k=k, method=method, seed=seed, s=s)


STRATEGIES = ("auto", "fft", "dense")


def tensorsketch(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int, strategy: str = "auto") -> torch.Tensor:
    """``fft``: ``reference.tensorsketch``; ``dense``: ``reference.tensorsketch_materialized``
    (the definition: ``[B, O, I]`` in memory); ``auto`` by ``ops.tensorsketch_plan``."""
    from cupid_engine.ops import tensorsketch_plan

    B, T, O = delta.shape
    if tensorsketch_plan.choose(strategy, B, T, O, x.shape[2], k) == "dense":
        return reference.tensorsketch_materialized(delta, x, k=k, seed=seed)
    return reference.tensorsketch(delta, x, k=k, seed=seed)


def quality_minmax(
    r: torch.Tensor, r_off: torch.Tensor, d: torch.Tensor, d_off: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference_quality.quality_minmax(r, r_off, d, d_off)
