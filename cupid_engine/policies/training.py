"""Training policies with per-sample or per-cluster loss weights.

Determinism: parameters are initialised from ``seed``; the epoch order comes from a
``torch.Generator`` seeded with ``seed`` and diffusion noise from a second generator,
both on the CPU, so a run is reproducible bit for bit on the same device and thread
count.

Weights. Each sample gets ``w = sample_weight * cluster_weight[cluster]``; the batch
loss is ``mean_b(w_b * l_b)`` (see :meth:`Policy.compute_loss`). Samples with ``w = 0``
are **dropped before anything else** (the normaliser fit, the epoch order, the step
count): training with weight 0 on a cluster is then *identical* to training on the data
without that cluster. A weighted mean inside fixed batches could not give that: the
removed samples would still occupy batch slots and shift the order of the others. The
test suite checks the equality parameter for parameter. (``normalizer=`` replaces the
fit with given statistics, e.g. the full training set's for subset trainings.)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cupid_engine.config import Config, check, field
from cupid_engine.data.episode import Episode
from cupid_engine.policies.base import Policy, PolicyConfig
from cupid_engine.policies.normalizer import Normalizer
from cupid_engine.policies.registry import build_policy
from cupid_engine.policies.samples import SampleSet, build_samples

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
# Offset of the noise generator's seed from the data-order seed: two independent streams.
_NOISE_SEED_OFFSET = 0x5DEECE66D


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """How a policy is trained."""

    epochs: int = field(100, help="passes over the (kept) training samples; ignored when steps is set")
    steps: int | None = field(None, help="optimizer steps (overrides epochs when set)")
    batch_size: int = field(256, help="samples per optimizer step (the last batch of an epoch may be smaller)")
    lr: float = field(1e-3, help="learning rate")
    weight_decay: float = field(0.0, help="weight decay (decoupled for adamw)")
    optimizer: str = field("adamw", help=f"one of {OPTIMIZERS}")
    seed: int = field(0, help="seed of the initialisation, the data order and the diffusion noise")
    ema_decay: float | None = field(None, help="EMA of the weights (returned policy holds the EMA); None: off")
    grad_clip: float | None = field(None, help="max global grad norm; None: no clipping")
    device: str = field("cpu", help="torch device to train on")

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay must be >= 0")
        check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check(0 <= self.seed < 2**63, "seed must be in [0, 2**63)")
        check(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay must be in (0, 1)")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0")


def _as_samples(config: PolicyConfig, data: SampleSet | Iterable[Episode]) -> SampleSet:
    # Image/language policy configs cut their own samples (frames, text tokens).
    build = getattr(config, "build_samples", None)
    if build is not None:
        data = build(data)
    if isinstance(data, SampleSet):
        if (data.n_obs_steps, data.horizon) != (config.n_obs_steps, config.horizon):
            raise ValueError(
                f"samples have n_obs_steps={data.n_obs_steps}, horizon={data.horizon}; the policy config "
                f"wants {config.n_obs_steps}, {config.horizon}"
            )
        if config.obs_keys is not None and tuple(config.obs_keys) != tuple(data.obs_keys):
            raise ValueError(f"samples use obs_keys {data.obs_keys}, the config {config.obs_keys}")
        return data
    return build_samples(data, n_obs_steps=config.n_obs_steps, horizon=config.horizon, obs_keys=config.obs_keys)


def resolve_config(config: PolicyConfig, samples: SampleSet) -> PolicyConfig:
    """Fill ``obs_dim``, ``action_dim`` and ``obs_keys`` from the samples; mismatches raise."""
    for name, value in (("obs_dim", samples.obs_dim), ("action_dim", samples.action_dim)):
        have = getattr(config, name)
        if have not in (0, value):
            raise ValueError(f"config {name}={have} but the samples have {value}")
    resolved = config.replace(obs_dim=samples.obs_dim, action_dim=samples.action_dim, obs_keys=tuple(samples.obs_keys))
    # Image policy configs also take their camera keys and image shape from the samples.
    resolve_samples = getattr(resolved, "resolve_samples", None)
    return resolved if resolve_samples is None else resolve_samples(samples)


def sample_weight_vector(
    samples: SampleSet,
    *,
    sample_weights: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    cluster_weights: Mapping[Any, float] | Sequence[float] | np.ndarray | torch.Tensor | None = None,
    clusters: Sequence[int] | np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample weights ``[N]`` float64: ``sample_weight * cluster_weight[cluster]``.

    Args:
        samples: The training samples.
        sample_weights: ``[N]`` non-negative weights, or None (all 1).
        cluster_weights: Weight per cluster: a sequence/tensor indexed by cluster id, or a
            mapping cluster -> weight (clusters not in the mapping keep weight 1). With
            ``clusters=None`` the clusters are the episodes and a mapping may be keyed by
            episode id (str) or episode index (int).
        clusters: ``[N]`` int64 cluster id of each sample; default: its episode index.

    Returns:
        ``[N]`` float64 weights.
    """
    n = len(samples)
    w = torch.ones(n, dtype=torch.float64)
    if sample_weights is not None:
        sw = torch.as_tensor(np.asarray(sample_weights, dtype=np.float64))
        if sw.shape != (n,):
            raise ValueError(f"sample_weights must be [N={n}], got {tuple(sw.shape)}")
        w = w * sw
    if cluster_weights is None:
        if clusters is not None:
            raise ValueError("clusters given without cluster_weights")
    else:
        if clusters is None:
            cl = samples.episode_index
            names: dict[Any, int] = {eid: i for i, eid in enumerate(samples.episode_ids)}
        else:
            cl = torch.as_tensor(np.asarray(clusters, dtype=np.int64))
            if cl.shape != (n,):
                raise ValueError(f"clusters must be [N={n}], got {tuple(cl.shape)}")
            if (cl < 0).any():
                raise ValueError("cluster ids must be >= 0")
            names = {}
        num_clusters = int(cl.max()) + 1
        if isinstance(cluster_weights, Mapping):
            cw = torch.ones(num_clusters, dtype=torch.float64)
            for key, value in cluster_weights.items():
                idx = names.get(key, key) if isinstance(key, str) else int(key)
                if isinstance(idx, str) or not 0 <= idx < num_clusters:
                    raise ValueError(f"cluster_weights has unknown cluster {key!r}")
                cw[idx] = float(value)
        else:
            cw = torch.as_tensor(np.asarray(cluster_weights, dtype=np.float64))
            if cw.dim() != 1 or cw.shape[0] < num_clusters:
                raise ValueError(f"cluster_weights must have one weight per cluster ({num_clusters}), got {tuple(cw.shape)}")
        w = w * cw[cl]
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("sample/cluster weights must be finite and >= 0")
    return w


def train_policy(
    policy_config: PolicyConfig,
    samples_or_episodes: SampleSet | Iterable[Episode],
    train_config: TrainConfig | None = None,
    *,
    sample_weights: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    cluster_weights: Mapping[Any, float] | Sequence[float] | np.ndarray | torch.Tensor | None = None,
    clusters: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    normalizer: Normalizer | None = None,
    progress: bool = True,
    init: Callable[[Policy], Any] | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[int, Policy], Any] | None = None,
) -> Policy:
    """Train a policy from scratch by behaviour cloning.

    Args:
        policy_config: MLP or diffusion config; ``obs_dim``/``action_dim`` 0 are inferred.
        samples_or_episodes: A SampleSet or Episodes (cut with the config's window sizes).
        train_config: Optimisation settings (default ``TrainConfig()``).
        sample_weights: ``[N]`` per-sample loss weights.
        cluster_weights: Per-cluster loss weights (see :func:`sample_weight_vector`).
        clusters: ``[N]`` cluster id per sample (default: episode).
        normalizer: A fitted :class:`Normalizer` whose statistics the policy takes
            instead of fitting its own on the kept samples (e.g. the full training set's,
            so that policies trained on subsets share one normalised space).
        progress: Show a tqdm progress bar.
        init: Called on the freshly initialised policy before training, e.g. to load
            encoder weights from a local file (``DiffusionImagePolicy.load_encoder_weights``).
        checkpoint_every: Every this many optimizer steps (below the total: the last one is
            the returned policy) ``on_checkpoint`` receives an intermediate checkpoint, e.g.
            for checkpoint ensembles of CUPID/TRAK or for TracIn.
        on_checkpoint: ``(step, policy)``: an eval-mode copy of the weights after ``step``
            optimizer steps (the EMA weights when ``ema_decay`` is set), with ``train_info``.
            Taking a checkpoint draws no random numbers, so the run is bit-identical with
            or without them.

    Returns:
        The trained policy in eval mode on ``train_config.device``, with the normaliser fitted
        on the kept (non-zero-weight) samples (or copied from ``normalizer``) and ``policy.train_info`` (dict: ``losses`` per
        epoch, ``step_losses``, ``steps``, ``num_samples``, ``num_kept``, ``train_config``).
    """
    cfg = train_config or TrainConfig()
    samples = _as_samples(policy_config, samples_or_episodes)
    config = resolve_config(policy_config, samples)
    w = sample_weight_vector(samples, sample_weights=sample_weights, cluster_weights=cluster_weights, clusters=clusters)
    kept = torch.nonzero(w > 0, as_tuple=False).flatten()
    if kept.numel() == 0:
        raise ValueError("every sample has weight 0: nothing to train on")
    kept_w = w[kept]
    uniform = bool((kept_w == 1).all())
    device = torch.device(cfg.device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        policy = build_policy(config)
    if init is not None:
        init(policy)
    if normalizer is None:
        policy.normalizer.fit(samples.obs[kept], samples.action[kept])
    else:
        _copy_normalizer(policy.normalizer, normalizer)
    policy.to(device)
    data = policy.normalizer.normalize_batch(samples.batch(kept))
    weights = None if uniform else kept_w.to(device=device, dtype=torch.float32)

    optim = Optimization(policy, cfg)

    n = kept.numel()
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
    marks: list[int] = []
    if checkpoint_every is not None:
        if checkpoint_every < 1 or on_checkpoint is None:
            raise ValueError(f"checkpoint_every must be >= 1 and needs on_checkpoint (got {checkpoint_every})")
        marks = list(range(checkpoint_every, total, checkpoint_every))
    order_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator().manual_seed((cfg.seed + _NOISE_SEED_OFFSET) % 2**63)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"train {type(policy).__name__}", unit="step", disable=not progress, leave=False)
    step_losses: list[float] = []
    epoch_losses: list[float] = []
    policy.train()
    step = 0
    try:
        while step < total:
            perm = torch.randperm(n, generator=order_gen).to(device)
            epoch_sum, epoch_count = 0.0, 0
            for start in range(0, n, cfg.batch_size):
                if step >= total:
                    break
                idx = perm[start : start + cfg.batch_size]
                batch = {k: v[idx] for k, v in data.items()}
                loss = policy.compute_loss(
                    batch, None if weights is None else weights[idx], generator=noise_gen
                )
                value = optim.step(loss, step)
                step_losses.append(value)
                epoch_sum += value * idx.numel()
                epoch_count += idx.numel()
                step += 1
                if marks and step == marks[0]:
                    marks.pop(0)
                    on_checkpoint(step, _checkpoint_copy(policy, optim, cfg, step, len(samples), int(n)))
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
            epoch_losses.append(epoch_sum / max(epoch_count, 1))
    finally:
        bar.close()
    optim.finish()
    policy.eval()
    policy.train_info = {
        "losses": epoch_losses,
        "step_losses": step_losses,
        "steps": step,
        "num_samples": len(samples),
        "num_kept": int(n),
        "train_config": cfg.to_dict(),
    }
    log.info("trained %s for %d steps on %d/%d samples, final loss %.4g",
             type(policy).__name__, step, n, len(samples), step_losses[-1])
    return policy


class Optimization:
    """The optimiser, gradient clipping and weight EMA of a :class:`TrainConfig` over a
    policy's trainable parameters: the update of every training loop (:func:`train_policy`,
    the datamodels' co-training), so they train alike.

    Args:
        policy: The policy being trained (on its training device already).
        config: ``optimizer``, ``lr``, ``weight_decay``, ``grad_clip`` and ``ema_decay``.
    """

    def __init__(self, policy: Policy, config: TrainConfig) -> None:
        self.policy, self.config = policy, config
        self.params = [p for p in policy.parameters() if p.requires_grad]
        kw = dict(lr=config.lr, weight_decay=config.weight_decay)
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(self.params, **kw)
        elif config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(self.params, **kw)
        else:
            self.optimizer = torch.optim.SGD(self.params, **kw)
        self.ema = copy.deepcopy(policy).requires_grad_(False) if config.ema_decay is not None else None

    def step(self, loss: torch.Tensor, step: int) -> float:
        """One update from the scalar ``loss`` of the 0-based optimiser step ``step``
        (zero the gradients, backward, clip, step, EMA); returns the loss value."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            ema_update(self.ema, self.policy, self.config.ema_decay, step)
        return float(loss.detach())

    def finish(self) -> None:
        """Load the EMA weights into the policy (the returned policy holds the EMA)."""
        if self.ema is not None:
            self.policy.load_state_dict(self.ema.state_dict())


def _checkpoint_copy(policy: Policy, optim: Optimization, cfg: TrainConfig, step: int,
                     num_samples: int, num_kept: int) -> Policy:
    """An eval-mode copy of the weights after ``step`` steps (the EMA's when kept), leaving
    the training policy, its mode and every generator untouched."""
    copy_ = copy.deepcopy(optim.ema if optim.ema is not None else policy)
    copy_.eval()
    copy_.train_info = {"steps": step, "num_samples": num_samples, "num_kept": num_kept,
                        "train_config": cfg.to_dict()}
    return copy_


@torch.no_grad()
def _copy_normalizer(dst: Normalizer, src: Normalizer) -> None:
    if not bool(src.fitted):
        raise ValueError("the given normalizer is not fitted")
    if (src.mode, src.min_spread) != (dst.mode, dst.min_spread):
        raise ValueError(f"normalizer mode/min_spread {src.mode!r}/{src.min_spread} differ from the policy's "
                         f"{dst.mode!r}/{dst.min_spread}")
    for name, buf in dst.named_buffers():
        other = getattr(src, name)
        if other.shape != buf.shape:
            raise ValueError(f"normalizer {name} has shape {tuple(other.shape)}, the policy needs {tuple(buf.shape)}")
        buf.copy_(other)


@torch.no_grad()
def ema_update(ema: Policy, model: Policy, max_decay: float, step: int) -> None:
    """One EMA step of ``ema`` towards ``model`` (in place), as :func:`train_policy` does it.

    Args:
        ema: The averaged copy (updated in place).
        model: The policy being trained.
        max_decay: The configured ``TrainConfig.ema_decay``.
        step: The 0-based optimizer step just taken (sets the warm-up decay).
    """
    # Warm-up (1 + k) / (10 + k): early EMA weights are not dominated by the random init.
    decay = min(max_decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)
