"""The policy protocol: what the engine needs to featurise, store, score and query a policy.

In the spirit of kronfluence's ``Task``, the engine never needs to know a policy's class.
A *task* tells it two things about any ``torch.nn.Module`` (the *model*, whose
parameters are attributed):

* ``build_batch(episodes) -> batch``: the model-ready batch of **one row per step** of
  the given episodes, in episode then step order (so ``sum(ep.length)`` rows). A batch
  is a flat ``dict`` of tensors, each with that many rows along dim 0; what else it
  holds (state windows, ``uint8 [B, n_obs, H, W, C]`` camera frames under keys of the
  task's choice, token ids, action chunks, ``episode_key``/``step`` for seeded noise)
  is the task's business. The engine only slices rows (``v[a:b]``) and moves tensors to
  the model's device.
* ``output(model, batch, name, *, seed, draws) -> [B]``: the output function
  ``f(z; theta)`` whose per-sample gradient is projected (DESIGN §1), one value per row.
  ``name`` is one of the task's ``supported_outputs``; ``seed`` and ``draws`` drive
  seeded Monte-Carlo outputs (diffusion noise draws) and are ignored by deterministic
  ones (``uses_noise_draws = False``).

Contract that makes a task featurisable (checked where it can be, documented where not):

1. **Rows are independent**: row b's output depends only on row b's inputs (and the
   seed), never on the batch's composition, size or order; no BatchNorm on batch
   statistics (refused by name), no cross-row attention.
2. **Rows stay contiguous inside the model**: a tracked module called on a tensor whose
   leading dimension is ``m * B`` holds sample b's rows at ``b*m .. (b+1)*m - 1`` (e.g.
   ``x.repeat_interleave(draws, 0)`` or ``x.reshape(B * T, D)``; *not* a sequence-first
   ``[T, B, D]`` layout). The hook path relies on it; the torch.func path does not.
3. **Parameters are used through their modules**: the hook path captures module calls;
   a tracked parameter used outside its module's ``forward`` (``F.linear(x,
   emb.weight)``, ``nn.MultiheadAttention.out_proj``) cannot be captured.

Layer types the hooks have no formula for are refused by name when the featuriser is
built; 2 and 3 (and determinism given the seed) are checked on the first batch: the
captured per-sample gradients of its first and last sample must equal autograd on that
sample alone (``Featurizer(verify=True)``, the default), else the featuriser refuses,
naming the modules.

The engine's own :class:`~cupid_engine.policies.base.Policy` classes are their own task
(``model is task``). A policy the engine did not write is featurised by passing a task
object beside it (``featurize(..., task=task, model=module)``); nothing needs to be
subclassed. :func:`resolve_task` turns what a caller passes into a ``(model, task)``
pair and checks the protocol with messages that name what is missing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from cupid_engine.data.episode import Episode

__all__ = ["PolicyTask", "batch_rows", "load_task_spec", "resolve_task", "task_hash", "task_uses_draws"]

Batch = dict[str, torch.Tensor]


@runtime_checkable
class PolicyTask(Protocol):
    """What the engine needs from a policy (see the module docstring).

    Attributes:
        supported_outputs: Output function names this task defines (e.g. ``("loss",)``).
        uses_noise_draws: Whether the outputs depend on ``seed``/``draws`` (recorded in
            the run's featuriser description only then). Optional; False when absent.
    """

    supported_outputs: tuple[str, ...]

    def build_batch(self, episodes: Sequence[Episode]) -> Batch:
        """Model-ready batch: one row per step of ``episodes``, in episode then step order."""
        ...

    def output(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], name: str, *, seed: int = 0, draws: int = 64
    ) -> torch.Tensor:
        """Output function ``name`` evaluated on ``batch``: ``[B]``."""
        ...


def task_uses_draws(task: Any) -> bool:
    """Whether ``task``'s outputs depend on the noise seed and draw count."""
    return bool(getattr(task, "uses_noise_draws", False))


def resolve_task(policy: Any = None, *, task: Any = None, model: nn.Module | None = None) -> tuple[nn.Module, Any]:
    """``(model, task)`` from what a caller passed.

    Accepted forms: ``policy`` = a module that is its own task (the engine's policies);
    ``task`` + ``model``; ``task`` alone when it is itself an ``nn.Module``; ``task``
    alone with a ``model`` attribute that is an ``nn.Module``.

    Raises:
        TypeError: naming the missing method/attribute or the wrong type.
    """
    if policy is not None and task is not None:
        raise TypeError("pass either policy= (a module that is its own task) or task= (+ model=), not both")
    if task is None:
        task = policy
        if model is None:
            model = policy
    if task is None:
        raise TypeError("no policy or task given")
    if model is None:
        if isinstance(task, nn.Module):
            model = task
        elif isinstance(getattr(task, "model", None), nn.Module):
            model = task.model
        else:
            raise TypeError(
                f"task {type(task).__name__} is not an nn.Module and has no nn.Module 'model' attribute: "
                "pass model= beside it"
            )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    missing = [m for m in ("build_batch", "output") if not callable(getattr(task, m, None))]
    if missing:
        raise TypeError(
            f"{type(task).__name__} does not implement the policy protocol (cupid_engine.policies.PolicyTask): "
            f"missing method(s) {missing}"
        )
    outs = getattr(task, "supported_outputs", None)
    if not isinstance(outs, (tuple, list)) or not outs or not all(isinstance(o, str) for o in outs):
        raise TypeError(
            f"{type(task).__name__}.supported_outputs must be a non-empty tuple of output names, got {outs!r}"
        )
    return model, task


def batch_rows(batch: Mapping[str, Any], *, where: str = "batch") -> int:
    """The common leading dimension of every tensor of ``batch``.

    Raises:
        ValueError: an empty batch, a non-tensor value or unequal leading dimensions
            (naming the fields).
    """
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError(f"{where}: a batch must be a non-empty dict of tensors, got {type(batch).__name__}")
    rows: dict[str, int] = {}
    for key, v in batch.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            raise ValueError(f"{where}: field {key!r} must be a tensor with a leading row dimension, got "
                             f"{type(v).__name__}{'' if not isinstance(v, torch.Tensor) else ' (0-d)'}")
        rows[key] = int(v.shape[0])
    if len(set(rows.values())) != 1:
        raise ValueError(f"{where}: fields have different numbers of rows: {rows}")
    return next(iter(rows.values()))


def task_hash(model: nn.Module, task: Any) -> str:
    """Content hash of a (model, task) pair: the engine's checkpoint hash for its own
    policies; otherwise sha256 over the class names, the task's ``describe()`` (when it
    has one) and every state tensor (name, dtype, shape, bytes) in sorted order."""
    from cupid_engine.policies.base import Policy

    if isinstance(model, Policy) and task is model:
        from cupid_engine.policies.checkpoint import compute_policy_hash

        return compute_policy_hash(model)
    h = hashlib.sha256()
    meta = {
        # Class names without their module: the same code imported as "pkg.mod" or loaded
        # from "file.py" (cupid-engine featurize --policy file.py:factory) hashes the same.
        "model_class": type(model).__qualname__,
        "task_class": type(task).__qualname__,
        "task": task.describe() if callable(getattr(task, "describe", None)) else None,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def is_task_spec(spec: str) -> bool:
    """Whether ``spec`` reads as ``module:factory`` (or ``path/to/file.py:factory``) rather
    than a checkpoint path."""
    if not isinstance(spec, str) or ":" not in spec or os.path.exists(spec):
        return False
    mod, _, fn = spec.rpartition(":")
    return bool(mod) and fn.isidentifier() and "://" not in spec


def load_task_spec(spec: str) -> tuple[nn.Module, Any]:
    """``(model, task)`` from ``"module:factory"`` or ``"path/to/file.py:factory"``.

    ``factory()`` is called without arguments and returns a module that is its own task,
    a ``(model, task)`` pair, or a task with a ``model`` attribute (see
    :func:`resolve_task`).

    Raises:
        ValueError: a malformed spec, a module or file that does not import, a missing
            or non-callable factory (each named).
        TypeError: what the factory returned does not implement the protocol.
    """
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name.isidentifier():
        raise ValueError(f"policy spec {spec!r} is not 'module:factory' or 'file.py:factory'")
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise FileNotFoundError(mod_name)
            name = "_cupid_task_" + hashlib.sha1(os.path.abspath(mod_name).encode()).hexdigest()[:12]
            spec_obj = importlib.util.spec_from_file_location(name, mod_name)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[name] = module  # dataclasses and pickling look classes up here
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except Exception as exc:  # the user's module: any failure is reported with its cause
        raise ValueError(f"policy spec {spec!r}: cannot import {mod_name!r} ({type(exc).__name__}: {exc})") from exc
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise ValueError(f"policy spec {spec!r}: {mod_name!r} has no callable {fn_name!r}")
    made = factory()
    if isinstance(made, tuple) and len(made) == 2:
        return resolve_task(task=made[1], model=made[0])
    return resolve_task(task=made)
