"""Target metrics M(π) a datamodel predicts.

* :class:`ProxyMetric`: DataMIL's rollout-free, differentiable proxy (Eq. 4 / App. C.1)
  ``M̂ = −(1/|T|) Σ_{z∈T} w(z)·ℓ(z)`` over target demonstrations T, with optional
  per-step weights ``w`` (e.g. 2 on pre-grasp steps). It evaluates on a fitted policy
  (``__call__``, for the regression estimator) and as a function of a parameter dict
  (``functional``, for the metagradient estimator). With ``per_episode=True`` it returns
  one value per target demonstration (one *target* each, for LDS).

  Units. A policy's loss lives in *its own* normalised action space, and a policy trained
  on a subset fits its normaliser on that subset, so raw losses of two subset policies
  are in different units. With ``action_scale`` (a fixed per-dimension scale, e.g. the
  full training set's), the MLP losses are re-expressed in that fixed space exactly:
  MSE elements are multiplied by ``(s_policy / s_ref)²`` and Gaussian NLL elements get
  ``+ log(s_policy / s_ref)`` (the change-of-variables term). The diffusion ε-loss is a
  noise-prediction error with no action units, so it is used as is.
* :class:`RolloutMetric`: any ``metric(policy) -> float``, e.g. a success rate from
  simulated rollouts (:func:`sim_success_metric` wraps ``cupid_engine.sim.run_rollouts``,
  imported only when called, so the datamodel code never depends on the simulator).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cupid_engine.data.episode import Episode
from cupid_engine.executor import Executor, InProcess
from cupid_engine.policies.base import Policy
from cupid_engine.policies.mlp import MLPPolicy
from cupid_engine.policies.outputs import functional_output
from cupid_engine.policies.samples import SampleSet, build_samples

StepWeightFn = Callable[[str, int], float]


class ProxyMetric:
    """Negative weighted mean BC loss on target demonstrations.

    Args:
        target: Target episodes, or a SampleSet already cut with the policy's window
            sizes. Episodes are cut lazily with the evaluated policy's config.
        step_weights: None (all 1), a ``[N_target]`` array aligned with the target
            samples (episode order, then step), or a callable ``(episode_id, step) ->
            weight``.
        per_episode: Return one value per target episode (``[n_targets]``) instead of
            the pooled mean over all target samples.
        draws: Noise draws per sample for diffusion policies (the ``loss`` output with
            per-sample seeded draws, so the metric does not depend on batch layout).
        seed: Seed of those draws.
        action_scale: ``[A]`` fixed action scale to measure MLP losses in (see Units);
            None: each policy's own normalised space.
    """

    def __init__(
        self,
        target: Sequence[Episode] | SampleSet,
        *,
        step_weights: np.ndarray | Sequence[float] | StepWeightFn | None = None,
        per_episode: bool = False,
        draws: int = 16,
        seed: int = 0,
        action_scale: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        self.target = target if isinstance(target, SampleSet) else list(target)
        if not isinstance(self.target, SampleSet) and not self.target:
            raise ValueError("ProxyMetric needs at least one target episode")
        self.step_weights = step_weights
        self.per_episode = bool(per_episode)
        self.draws = int(draws)
        self.seed = int(seed)
        self.action_scale = None if action_scale is None else torch.as_tensor(
            np.asarray(action_scale, dtype=np.float64))
        if self.action_scale is not None and (self.action_scale.dim() != 1 or (self.action_scale <= 0).any()):
            raise ValueError("action_scale must be a positive [A] vector")
        self._cache: dict[tuple, tuple[SampleSet, torch.Tensor]] = {}

    # -- data -------------------------------------------------------------------------
    def samples_for(self, policy: Policy) -> tuple[SampleSet, torch.Tensor]:
        """Target samples cut for ``policy`` and their ``[N_target]`` float64 weights."""
        c = policy.config
        key = (c.n_obs_steps, c.horizon, tuple(c.obs_keys) if c.obs_keys else None)
        if key not in self._cache:
            if isinstance(self.target, SampleSet):
                samples = self.target
            else:
                samples = build_samples(self.target, n_obs_steps=c.n_obs_steps, horizon=c.horizon,
                                        obs_keys=c.obs_keys)
            self._cache[key] = (samples, self._weights(samples))
        return self._cache[key]

    def _weight_values(self, ids: list[str], index: np.ndarray, step: np.ndarray) -> np.ndarray:
        n = len(step)
        sw = self.step_weights
        if sw is None:
            w = np.ones(n)
        elif callable(sw):
            w = np.array([float(sw(ids[int(e)], int(s))) for e, s in zip(index, step)], dtype=np.float64)
        else:
            w = np.asarray(sw, dtype=np.float64)
            if w.shape != (n,):
                raise ValueError(f"step_weights must be [N_target={n}], got {w.shape}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("step_weights must be finite and >= 0")
        return w

    def _weights(self, samples: SampleSet) -> torch.Tensor:
        w = self._weight_values(list(samples.episode_ids), samples.episode_index.numpy(), samples.step.numpy())
        return torch.from_numpy(w)

    @property
    def num_targets(self) -> int:
        """Values returned per evaluation: target episodes (per_episode) or 1."""
        if not self.per_episode:
            return 1
        if isinstance(self.target, SampleSet):
            return len(torch.unique(self.target.episode_index))
        return len(self.target)

    def with_action_scale(self, action_scale: torch.Tensor | np.ndarray) -> ProxyMetric:
        """A copy measuring MLP losses in units of a fixed ``[A]`` action scale."""
        return ProxyMetric(self.target, step_weights=self.step_weights, per_episode=self.per_episode,
                           draws=self.draws, seed=self.seed, action_scale=action_scale)

    def _step_index(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(episode ids, ``[N]`` episode index, ``[N]`` step) of every target sample; one
        sample per step whatever the window sizes, so this needs no policy."""
        if isinstance(self.target, SampleSet):
            return (list(self.target.episode_ids), self.target.episode_index.numpy(), self.target.step.numpy())
        ids = [ep.episode_id for ep in self.target]
        index = np.concatenate([np.full(ep.length, i) for i, ep in enumerate(self.target)])
        step = np.concatenate([np.arange(ep.length) for ep in self.target])
        return ids, index, step

    def fingerprint(self) -> str:
        """Stable hash of the target data, the evaluated step weights and the options
        (part of subset-cache keys: a different metric never reuses a cached training)."""
        h = hashlib.sha256()
        h.update(json.dumps({"per_episode": self.per_episode, "draws": self.draws, "seed": self.seed}).encode())
        if isinstance(self.target, SampleSet):
            h.update(self.target.obs.numpy().tobytes())
            h.update(self.target.action.numpy().tobytes())
        else:
            for ep in self.target:
                h.update(ep.episode_id.encode())
                for k in sorted(ep.observations):
                    h.update(k.encode())
                    h.update(np.ascontiguousarray(ep.observations[k]).tobytes())
                h.update(np.ascontiguousarray(ep.actions).tobytes())
        if self.action_scale is not None:
            h.update(b"scale" + self.action_scale.numpy().tobytes())
        if self.step_weights is not None:
            # Callables are hashed by their values on every target step, not by identity.
            ids, index, step = self._step_index()
            h.update(self._weight_values(ids, index, step).tobytes())
        return h.hexdigest()[:16]

    # -- evaluation -------------------------------------------------------------------
    def functional(self, policy: Policy, params: dict[str, torch.Tensor], *, batch: dict | None = None) -> torch.Tensor:
        """M̂ as a differentiable function of ``params``.

        Args:
            policy: The policy module (fitted normaliser; its buffers are used).
            params: Parameter dict (as ``named_parameters``), possibly requiring grad.
            batch: Pre-built normalised target batch (from :meth:`prepare`), else built.

        Returns:
            Scalar, or ``[n_targets]`` when ``per_episode``.
        """
        if batch is None:
            batch = self.prepare(policy)
        w = batch["__weight"]
        b = {k: v for k, v in batch.items() if not k.startswith("__")}
        if self.action_scale is not None and isinstance(policy, MLPPolicy):
            losses = torch.func.functional_call(_ReferenceLoss(policy), {f"policy.{k}": v for k, v in params.items()},
                                                (b, self.action_scale))
        else:
            losses = functional_output(policy, params, b, "loss", seed=self.seed, draws=self.draws)
        wl = w.to(losses.dtype) * losses
        if not self.per_episode:
            return -wl.mean()
        group = batch["__group"]
        n_groups = int(batch["__num_groups"])
        sums = wl.new_zeros(n_groups).index_add(0, group, wl)
        counts = torch.bincount(group, minlength=n_groups).to(wl.dtype)
        return -sums / counts

    def prepare(self, policy: Policy) -> dict[str, torch.Tensor]:
        """The normalised target batch on the policy's device and dtype, with weights."""
        samples, w = self.samples_for(policy)
        ref = next(policy.parameters())
        batch = policy.make_batch(samples)
        batch = {k: (v.to(ref.device, ref.dtype) if v.is_floating_point() else v.to(ref.device))
                 for k, v in batch.items()}
        _, group = torch.unique(samples.episode_index, return_inverse=True)
        batch["__weight"] = w.to(ref.device, ref.dtype)
        batch["__group"] = group.to(ref.device)
        batch["__num_groups"] = torch.tensor(int(group.max()) + 1)
        return batch

    @torch.no_grad()
    def __call__(self, policy: Policy) -> float | np.ndarray:
        """Evaluate on a trained policy: a float, or ``[n_targets]`` when per_episode."""
        params = dict(policy.named_parameters())
        value = self.functional(policy, params)
        if self.per_episode:
            return value.double().cpu().numpy()
        return float(value)


class _ReferenceLoss(torch.nn.Module):
    """Per-sample MLP loss in the units of a fixed action scale (a module, so that
    ``functional_call`` can swap the wrapped policy's parameters)."""

    def __init__(self, policy: MLPPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, torch.Tensor], ref_scale: torch.Tensor) -> torch.Tensor:
        p = self.policy
        mean, log_std = p.distribution_params(batch["obs"])
        # [A] -> broadcast over [B, H, A]: ratio of the policy's scale to the reference one.
        ratio = (p.normalizer.action_scale.to(mean.dtype) / ref_scale.to(mean.device, mean.dtype))
        if log_std is None:
            return ((mean - batch["action"]) * ratio).square().flatten(1).mean(1)
        z = (batch["action"] - mean) * torch.exp(-log_std)
        nll = 0.5 * z.square() + log_std + 0.5 * math.log(2 * math.pi) + torch.log(ratio)
        return nll.flatten(1).mean(1)


class RolloutMetric:
    """A pluggable true metric: ``fn(policy) -> float`` (e.g. rollout success rate).

    Args:
        fn: Picklable callable evaluating a trained policy.
        name: A stable name for cache keys (two different metrics must not share it).
    """

    per_episode = False
    num_targets = 1

    def __init__(self, fn: Callable[[Policy], float], *, name: str) -> None:
        self.fn = fn
        self.name = name

    def fingerprint(self) -> str:
        return hashlib.sha256(f"rollout:{self.name}".encode()).hexdigest()[:16]

    def __call__(self, policy: Policy) -> float:
        return float(self.fn(policy))


class _SimSuccess:
    """Picklable success-rate evaluator over ``cupid_engine.sim.run_rollouts`` on ``executor``."""

    def __init__(self, task: str, episodes: int, seed: int, executor: Executor | None = None,
                 horizon: int | None = None) -> None:
        self.task, self.episodes, self.seed, self.horizon = task, episodes, seed, horizon
        self.executor = executor or InProcess()

    def __call__(self, policy: Policy) -> float:
        from cupid_engine.sim import run_rollouts  # the simulator only when asked for

        kw = dict(episodes=self.episodes, seed=self.seed, executor=self.executor, horizon=self.horizon)
        if self.executor.in_process:
            rollouts = run_rollouts(policy, self.task, **kw)
        else:
            import tempfile
            from pathlib import Path

            from cupid_engine.policies.checkpoint import save_policy

            # Models are never pickled to rollout workers: they load a checkpoint of this one.
            with tempfile.TemporaryDirectory(prefix="cupid-sim-metric-") as tmp:
                rollouts = run_rollouts(str(save_policy(policy, Path(tmp) / "policy")), self.task, **kw)
        return float(np.mean([bool(ep.success) for ep in rollouts]))


def sim_success_metric(task: str, *, episodes: int = 50, seed: int = 0, horizon: int | None = None,
                       executor: Executor | None = None) -> RolloutMetric:
    """Rollout success rate of a policy on a simulated task (robosuite via ``cupid_engine.sim``).

    Args:
        task: ``lift``, ``can`` or ``square``.
        episodes: Rollouts per evaluated policy.
        seed: Base seed of the rollouts (the same episodes for every policy).
        horizon: Step limit per rollout (None: the task's default).
        executor: Where the rollouts run (default: in the calling process, e.g. the subset
            training's worker). An out-of-process executor must be on this machine: each
            evaluated policy is saved to a local temporary checkpoint its workers load.
            The value does not depend on the executor (nor does the cache key).

    Raises:
        ValueError: An executor that is not on this machine.
    """
    if executor is not None and not executor.local:
        raise ValueError(f"sim_success_metric rolls out on this machine's workers (temporary checkpoints), not {executor!r}")
    name = f"sim:{task}:{episodes}:{seed}" + (f":h{int(horizon)}" if horizon is not None else "")
    return RolloutMetric(_SimSuccess(task, episodes, seed, executor, horizon), name=name)


def metric_values(metric: Callable[[Policy], Any], policy: Policy) -> np.ndarray:
    """Evaluate any metric and return ``[n_targets]`` float64."""
    return np.atleast_1d(np.asarray(metric(policy), dtype=np.float64)).reshape(-1)
