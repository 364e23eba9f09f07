"""Selection with datamodel scores and the co-training recipe (DataMIL §4.3).

Keep the top ``x%`` of clusters by score (``D_sel``), then train the final policy on
``D_target ∪ D_sel`` where every element of every batch comes from the target set with
probability ``α`` (default 0.5) and from the selected set otherwise, uniformly within
each: the two sets are mixed at a fixed ratio whatever their sizes, so a small target
set is not drowned by a large selection.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cupid_engine.policies.base import Policy, PolicyConfig
from cupid_engine.policies.registry import build_policy
from cupid_engine.policies.samples import SampleSet
from cupid_engine.policies.training import Optimization, TrainConfig, resolve_config
from cupid_engine.datamodels.clusters import Clusters

log = logging.getLogger(__name__)


def select_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the top ``fraction`` of items by score (at least one), best first.

    Ties are broken by index so the selection is deterministic.

    Args:
        scores: ``[C]`` scores (higher = better).
        fraction: In (0, 1].

    Returns:
        ``[k]`` int64 indices, ``k = max(1, round(fraction · C))``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * len(s))))
    order = np.lexsort((np.arange(len(s)), -s))
    return order[:k].astype(np.int64)


def selected_samples(samples: SampleSet, clusters: Clusters, chosen: np.ndarray) -> SampleSet:
    """The samples of the chosen clusters."""
    keep = np.isin(clusters.ids, np.asarray(chosen, dtype=np.int64))
    return samples.subset(torch.from_numpy(np.flatnonzero(keep)))


def concat_samples(a: SampleSet, b: SampleSet) -> SampleSet:
    """One SampleSet holding ``a`` then ``b`` (episode ids must not collide)."""
    if (a.n_obs_steps, a.horizon, a.obs_keys) != (b.n_obs_steps, b.horizon, b.obs_keys):
        raise ValueError("sample sets differ in window sizes or observation keys")
    clash = set(a.episode_ids) & set(b.episode_ids)
    if clash:
        raise ValueError(f"episode ids in both sample sets: {sorted(clash)[:5]}")
    return SampleSet(
        obs=torch.cat([a.obs, b.obs]), action=torch.cat([a.action, b.action]),
        episode_index=torch.cat([a.episode_index, b.episode_index + len(a.episode_ids)]),
        episode_key=torch.cat([a.episode_key, b.episode_key]), step=torch.cat([a.step, b.step]),
        episode_ids=list(a.episode_ids) + list(b.episode_ids), obs_keys=a.obs_keys,
    )


class CoTrainSampler:
    """Batches over ``[target; selected]`` with each element from target w.p. ``alpha``.

    Batch ``t`` depends only on ``(seed, t)``, never on earlier batches.

    Args:
        num_target: Target samples (indices ``0..num_target-1``).
        num_selected: Selected samples (indices ``num_target..``).
        batch_size: Elements per batch.
        alpha: Probability that an element comes from the target set.
        seed: Seed.
    """

    def __init__(self, num_target: int, num_selected: int, batch_size: int, *, alpha: float = 0.5,
                 seed: int = 0) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if (alpha > 0 and num_target < 1) or (alpha < 1 and num_selected < 1):
            raise ValueError("a set sampled with non-zero probability is empty")
        self.num_target, self.num_selected = int(num_target), int(num_selected)
        self.batch_size, self.alpha, self.seed = int(batch_size), float(alpha), int(seed)

    def batch(self, t: int) -> torch.Tensor:
        """``[batch_size]`` int64 indices of batch ``t``."""
        rng = np.random.default_rng([self.seed, t])
        from_target = rng.random(self.batch_size) < self.alpha
        idx = np.where(
            from_target,
            rng.integers(0, max(self.num_target, 1), self.batch_size),
            self.num_target + rng.integers(0, max(self.num_selected, 1), self.batch_size),
        )
        return torch.from_numpy(idx.astype(np.int64))


def cotrain_policy(
    policy_config: PolicyConfig,
    target: SampleSet,
    selected: SampleSet,
    train_config: TrainConfig | None = None,
    *,
    alpha: float = 0.5,
    progress: bool = False,
) -> Policy:
    """Train the final policy on target ∪ selected, sampling target with probability ``alpha``.

    Initialisation, optimiser, gradient clipping and EMA follow :func:`train_policy`; the
    normaliser is fitted on the union. ``steps`` (or ``epochs`` passes over the union)
    sets the number of updates.

    Args:
        policy_config: Policy to train.
        target: Target samples.
        selected: Selected prior samples.
        train_config: Training settings.
        alpha: Co-training ratio α.
        progress: tqdm bar.

    Returns:
        The trained policy (eval mode) with ``train_info``.
    """
    tc = train_config or TrainConfig()
    union = concat_samples(target, selected)
    config = resolve_config(policy_config, union)
    device = torch.device(tc.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        policy = build_policy(config)
    policy.normalizer.fit(union.obs, union.action)
    policy.to(device)
    data = policy.make_batch(union)
    data = {k: v.to(device) for k, v in data.items()}
    optim = Optimization(policy, tc)
    total = tc.steps if tc.steps is not None else tc.epochs * -(-len(union) // tc.batch_size)
    sampler = CoTrainSampler(len(target), len(selected), tc.batch_size, alpha=alpha, seed=tc.seed)
    noise_gen = torch.Generator().manual_seed((tc.seed + 1) % 2**63)

    from tqdm.auto import tqdm

    losses = []
    policy.train()
    for t in tqdm(range(total), desc="co-train", disable=not progress, leave=False):
        idx = sampler.batch(t).to(device)
        loss = policy.compute_loss({k: v[idx] for k, v in data.items()}, generator=noise_gen)
        losses.append(optim.step(loss, t))
    optim.finish()
    policy.eval()
    policy.train_info = {"step_losses": losses, "steps": total, "num_target": len(target),
                         "num_selected": len(selected), "alpha": alpha, "train_config": tc.to_dict()}
    return policy
