"""The ``torch`` backend: the reference itself, on any device torch supports."""

from __future__ import annotations

import torch

from cupid_engine.ops import reference


def project(x: torch.Tensor, k: int, method: str, seed: int, s: int) -> torch.Tensor:
    return reference.project(x, k=k, method=method, seed=seed, s=s)


def tensorsketch(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    return reference.tensorsketch(delta, x, k=k, seed=seed)
