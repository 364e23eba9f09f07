"""torch.func per-sample gradients: the explicit path for dense/sparse/signshift projections.

``vmap(grad(f))`` over single-sample batches gives every sample's full gradient over the
tracked parameters; the gradients are flattened in a fixed, documented order and
projected with ``ops.project``. This path exists because the flat projections need the
flat gradient, and because it is the readable definition that the hook path is tested
against. Its memory is ``B * P`` floats per chunk, so batches are split into chunks of at
most :data:`MAX_CHUNK_BYTES`.

Flattening order (the coordinate order ``ops.project`` sees): tracked parameters in
``policies.tracked_parameters`` order, i.e. modules in ``named_modules`` order and, inside
a module, its parameters in ``named_parameters`` order (``weight`` then ``bias``); each
parameter's per-sample gradient flattened row-major.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import functional_call, grad, vmap

from typing import Any

from torch import nn

__all__ = ["MAX_CHUNK_BYTES", "per_sample_grads", "flatten_grads"]

MAX_CHUNK_BYTES = 256 << 20
"""Largest ``[B_chunk, P]`` gradient block materialised at once."""


class _TaskCall(nn.Module):
    """``forward(batch) = task.output(model, batch, name, seed=, draws=)`` with the model as
    submodule ``model``: lets ``functional_call`` substitute the model's parameters for a
    task whose output is not the model's ``forward``."""

    def __init__(self, task: Any, model: nn.Module, name: str, seed: int, draws: int):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_task", task)  # not a submodule, even when it is an nn.Module
        self._call = (name, seed, draws)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        name, seed, draws = self._call
        return self._task.output(self.model, batch, name, seed=seed, draws=draws)


def per_sample_grads(
    policy: nn.Module,
    params: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    output: str,
    *,
    seed: int = 0,
    draws: int = 64,
    task: Any = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of ``output`` w.r.t. ``params``.

    Args:
        policy: The model (parameters not in ``params`` and buffers are taken from it).
        params: Name -> tracked parameter (``policies.tracked_parameters``).
        batch: Batch of B samples (the task's).
        output: Output function name.
        seed: Noise seed of the diffusion draws.
        draws: Draws per sample.
        task: The policy-protocol task; None (or ``policy`` itself) for an engine policy,
            whose ``forward(batch, output=, seed=, draws=)`` evaluates its outputs.

    Returns:
        Name -> ``[B, *param.shape]`` gradients.
    """
    detached = {n: p.detach() for n, p in params.items()}
    if task is None or (task is policy and _forward_is_output(policy)):
        module, prefix, kwargs = policy, "", {"output": output, "seed": seed, "draws": draws}
    else:
        module, prefix, kwargs = _TaskCall(task, policy, output, seed, draws), "model.", {}

    def f(p: dict[str, torch.Tensor], sample: dict[str, torch.Tensor]) -> torch.Tensor:
        one = {key: v.unsqueeze(0) for key, v in sample.items()}  # vmap strips the batch dim
        named = {prefix + n: t for n, t in p.items()} if prefix else p
        return functional_call(module, named, (one,), kwargs).sum()

    # grad() ignores an outer no_grad (it is a function transform), while no_grad stops the
    # result from being tied, through untracked parameters, into a useless outer graph.
    with torch.no_grad():
        return vmap(grad(f), in_dims=(None, 0))(detached, dict(batch))


def _forward_is_output(policy: nn.Module) -> bool:
    from cupid_engine.policies.base import Policy

    return isinstance(policy, Policy)


def flatten_grads(grads: Mapping[str, torch.Tensor], order: list[str]) -> torch.Tensor:
    """``[B, P]``: the gradients of ``order`` flattened and concatenated (see module doc)."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in order], dim=1)
