"""Metagradient datamodel estimator for policies (DataMIL §4.1, App. B.3).

Each cluster ``c`` gets a loss weight ``w_c``; training with ``w`` gives θ_T(w), and the
score of cluster c is ``dM̂(θ_T(w))/dw_c`` at ``w = 1``: the exact influence of
up-weighting the cluster, computed by reverse mode through the whole training run
(:func:`~cupid_engine.datamodels.functional.reverse_metagradient`).

The training run mirrors :func:`cupid_engine.policies.train_policy` at ``w = 1``: the
same initialisation (``seed``), normaliser (fitted on all training samples and then held
fixed: ``w`` scales losses, it does not refit statistics), epoch order (a
``torch.Generator`` seeded with ``seed``, ``randperm`` per epoch) and batch loss
``mean_b(w_b·l_b)``. The policy is called functionally (``torch.func.functional_call``
through :func:`~cupid_engine.policies.outputs.functional_output`), and optimisers are
the functional ones of this subpackage. Diffusion noise is not drawn from a stateful
generator (the backward pass recomputes segments, so update ``t`` must redraw exactly
the same noise): each sample's (ε, t) comes from the policies' counter-based hash of
(per-update seed, episode key, step).

``last_k``: DataMIL's recipe for large policies (after Engstrom et al.'s metagradient
descent): of the ``T`` updates, the first ``T - K`` are ordinary (no graph) and the last
``K`` use one *injected batch* holding ``inject_per_cluster`` samples of every cluster
(drawn with a seeded generator) weighted by ``w``; only those ``K`` updates are
differentiated. Costs K second-order steps instead of T, and every cluster gets a
gradient signal even when T is far below an epoch; the scores are the clusters' effect
at the end of training.

Not supported (raise): EMA (the returned policy would be an average of iterates) and
gradient clipping (non-smooth in w).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import torch

from cupid_engine.config import Config, check, field
from cupid_engine.policies.base import Policy, PolicyConfig
from cupid_engine.policies.outputs import functional_output
from cupid_engine.policies.registry import build_policy
from cupid_engine.policies.samples import SampleSet
from cupid_engine.policies.training import TrainConfig, resolve_config
from cupid_engine.datamodels.clusters import Clusters
from cupid_engine.datamodels.functional import (
    FunctionalOptimizer,
    functional_train,
    make_optimizer,
    reverse_metagradient,
)
from cupid_engine.datamodels.metrics import ProxyMetric

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Odd 64-bit multiplier mixing (train seed, update index) into a per-update noise seed.
_STEP_SEED_MIX = 0x9E3779B97F4A7C15


@dataclasses.dataclass(frozen=True)
class MetagradientConfig(Config):
    """Options of the metagradient estimator (optimiser settings come from TrainConfig)."""

    segments: int = field(8, help="checkpoint segments S: memory is S states plus one segment's graph")
    mode: str = field("checkpoint", help="checkpoint (segmented recompute) or unroll (one graph, reference)")
    last_k: int | None = field(None, help="differentiate only K final updates on an injected batch; None: all")
    inject_per_cluster: int = field(4, help="samples per cluster in the injected batch (last_k mode)")
    momentum: float = field(0.0, help="SGD momentum (TrainConfig has none; torch's SGD default is 0)")
    betas: tuple[float, float] = field((0.9, 0.999), help="Adam betas (torch defaults)")
    eps: float = field(1e-8, help="Adam epsilon (torch default)")
    dtype: str = field("float32", help="arithmetic of the unrolled training: float32 or float64")

    def __post_init__(self) -> None:
        check(self.segments >= 1, "segments must be >= 1")
        check(self.mode in ("checkpoint", "unroll"), f"mode must be checkpoint or unroll, got {self.mode!r}")
        check(self.last_k is None or self.last_k >= 1, "last_k must be >= 1")
        check(self.inject_per_cluster >= 1, "inject_per_cluster must be >= 1")
        check(self.momentum >= 0, "momentum must be >= 0")
        check(self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}")


@dataclasses.dataclass
class MetagradientResult:
    """Scores of the metagradient estimator.

    Attributes:
        scores: ``[C]`` float64 dM̂/dw_c at w = 1 (higher = up-weighting helps).
        metric: M̂ of the trained policy.
        policy: The trained policy (parameters θ_T at w = 1, in the estimator's dtype).
        info: Step counts and memory accounting (see ``MetagradientOutput.info``).
    """

    scores: np.ndarray
    metric: float
    policy: Policy
    info: dict


def epoch_schedule(n: int, batch_size: int, total_steps: int, seed: int) -> list[torch.Tensor]:
    """The index batches train_policy uses: ``randperm`` per epoch from a seeded generator.

    Returns:
        ``total_steps`` int64 index tensors (the last batch of an epoch may be smaller).
    """
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < total_steps:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            if len(out) >= total_steps:
                break
            out.append(perm[start: start + batch_size])
    return out


def injected_batch(clusters: Clusters, per_cluster: int, seed: int) -> torch.Tensor:
    """Sample indices of the injected batch: ``per_cluster`` samples of every cluster
    (all of a smaller cluster), drawn without replacement with a seeded generator."""
    rng = np.random.default_rng(seed)
    parts = []
    for c in range(clusters.num_clusters):
        members = clusters.members(c)
        k = min(per_cluster, len(members))
        parts.append(np.sort(rng.choice(members, size=k, replace=False)))
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def step_seed(seed: int, t: int) -> int:
    """Noise seed of update ``t``: fresh (ε, t) draws every update, reproducible on recompute."""
    return ((seed + 1) * _STEP_SEED_MIX + t) % 2**63


@dataclasses.dataclass
class _Problem:
    """The training run as pure functions of (params, w): what reverse mode differentiates."""

    policy: Policy
    names: list[str]
    step_loss: Callable
    metric_fn: Callable
    optimizer: FunctionalOptimizer
    params0: list[torch.Tensor]
    total: int
    start_step: int

    def metric_at(self, w: torch.Tensor) -> float:
        """M̂ after plain training with weights ``w`` (finite differences, checks)."""
        params = functional_train(self.step_loss, self.params0, self.optimizer, w, self.total)
        return float(self.metric_fn(params))


def _functional_problem(
    policy_config: PolicyConfig,
    samples: SampleSet,
    clusters: Clusters,
    metric: ProxyMetric,
    tc: TrainConfig,
    mc: MetagradientConfig,
) -> _Problem:
    if tc.ema_decay is not None or tc.grad_clip is not None:
        raise ValueError("the metagradient estimator supports neither EMA nor gradient clipping")
    if len(clusters.ids) != len(samples):
        raise ValueError(f"clusters cover {len(clusters.ids)} samples, the SampleSet has {len(samples)}")
    dtype = DTYPES[mc.dtype]
    device = torch.device(tc.device)
    cfg = resolve_config(policy_config, samples)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        policy = build_policy(cfg)
    policy.normalizer.fit(samples.obs, samples.action)
    policy.to(device=device, dtype=dtype)
    policy.train()
    data = policy.make_batch(samples)
    data = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in data.items()}
    cl = torch.from_numpy(clusters.ids).to(device)

    n = len(samples)
    per_epoch = math.ceil(n / tc.batch_size)
    total = tc.steps if tc.steps is not None else tc.epochs * per_epoch
    k = mc.last_k or 0
    if k >= total:
        raise ValueError(f"last_k={k} must be smaller than the {total} training updates")
    schedule = epoch_schedule(n, tc.batch_size, total - k, tc.seed)
    if k:
        inject = injected_batch(clusters, mc.inject_per_cluster, tc.seed).to(device)
        schedule += [inject] * k
    names = [name for name, p in policy.named_parameters() if p.requires_grad]

    def step_loss(params, w, t):
        idx = schedule[t]
        batch = {key: v[idx] for key, v in data.items()}
        losses = functional_output(policy, dict(zip(names, params)), batch, "loss", seed=step_seed(tc.seed, t),
                                   draws=1)
        return (w[cl[idx]].to(losses.dtype) * losses).mean()

    target_batch = metric.prepare(policy)

    def metric_fn(params):
        value = metric.functional(policy, dict(zip(names, params)), batch=target_batch)
        # Several targets are pooled with equal weight: one backward pass, one score.
        return value.mean() if value.dim() else value

    optimizer = make_optimizer(tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay, momentum=mc.momentum,
                               betas=mc.betas, eps=mc.eps)
    params_by_name = dict(policy.named_parameters())
    params0 = [params_by_name[nm].detach().clone() for nm in names]
    return _Problem(policy=policy, names=names, step_loss=step_loss, metric_fn=metric_fn, optimizer=optimizer,
                    params0=params0, total=len(schedule), start_step=total - k if k else 0)


def metagradient_scores(
    policy_config: PolicyConfig,
    samples: SampleSet,
    clusters: Clusters,
    metric: ProxyMetric,
    train_config: TrainConfig | None = None,
    config: MetagradientConfig | None = None,
    *,
    progress: bool = False,
) -> MetagradientResult:
    """Per-cluster metagradient scores ``dM̂(A(w))/dw`` at ``w = 1``.

    Args:
        policy_config: Policy to train (dims inferred from ``samples``).
        samples: Training samples ``[N]``.
        clusters: Cluster of each sample (``clusters.ids [N]``).
        metric: The differentiable proxy metric (pooled over targets when per_episode).
        train_config: Steps/epochs, batch size, lr, optimiser, weight decay, seed.
        config: Estimator options.
        progress: tqdm bars.

    Returns:
        The :class:`MetagradientResult`.
    """
    tc = train_config or TrainConfig()
    mc = config or MetagradientConfig()
    prob = _functional_problem(policy_config, samples, clusters, metric, tc, mc)
    out = reverse_metagradient(prob.step_loss, prob.metric_fn, prob.params0, prob.optimizer, num_steps=prob.total,
                               num_weights=clusters.num_clusters, start_step=prob.start_step,
                               segments=mc.segments, mode=mc.mode, progress=progress)
    policy = prob.policy
    params_by_name = dict(policy.named_parameters())
    with torch.no_grad():
        for nm, p in zip(prob.names, out.params):
            params_by_name[nm].copy_(p)
    policy.eval()
    out.info.update(steps=prob.total, num_samples=len(samples), num_clusters=clusters.num_clusters)
    log.info("metagradient: %d updates (%d differentiated), %d clusters, M̂ = %.6g",
             prob.total, out.info["differentiated_steps"], clusters.num_clusters, out.metric)
    return MetagradientResult(scores=out.grad.double().cpu().numpy(), metric=out.metric, policy=policy,
                              info=out.info)
