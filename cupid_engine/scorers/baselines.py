"""Cheap baselines the influence scores must beat (DESIGN §1, audit gate 2).

- ``random``: a uniform score hashed from (seed, episode id), so it never depends on
  the order episodes are listed in;
- ``length``: shorter demos score higher by default (long demos are the hesitant,
  detouring ones in mixed-quality datasets); ``prefer="long"`` flips it;
- ``loss``: −mean per-step behaviour-cloning loss (lower loss scores higher), from an
  array/mapping supplied by the caller or a catalog column / metadata key;
- ``success-sim``: −mean L2 state distance to the successful rollouts, with the
  distance from a demo ξ to a rollout τ defined as mean_{z∈ξ} min_{z'∈τ} ||s_z − s_z'||
  (nearest state, so episodes of different lengths compare without time alignment);
  states are supplied by the caller (the gradient store holds no states);
- ``oracle``: ground truth from any label the catalog holds (a column or a key of the
  episode metadata): tiers better > okay > worse by default; ``bad=``/``good=`` name the
  values that score 0 / 1 for any other label (e.g. ``label="strategy", bad="majority"``);
  a numeric label without them is its own score. An error when an episode lacks it.

:func:`bc_losses` and :func:`episode_states` compute, from a policy and episodes, the
inputs ``loss`` and ``success-sim`` need (the gradient store holds neither), so the
command line can run both from a dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from cupid_engine.config import Config, check, field
from cupid_engine.constants import TIERS
from cupid_engine.errors import ConfigError
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.scorers.table import make_table

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader

TIER_VALUE = {"better": 2.0, "okay": 1.0, "worse": 0.0}
assert set(TIER_VALUE) == set(TIERS)


def random_scores(ids: Sequence[str], seed: int) -> np.ndarray:
    """``[N]`` uniform [0, 1) scores, each a hash of (seed, id)."""
    out = np.empty(len(ids), np.float64)
    for i, e in enumerate(ids):
        h = hashlib.blake2b(f"{seed}\x00{e}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2.0**64
    return out


def success_similarity_scores(
    demo_states: Sequence[np.ndarray], rollout_states: Sequence[np.ndarray], *, block: int = 4096
) -> np.ndarray:
    """−mean_τ mean_{z∈ξ} min_{z'∈τ} ||s_z − s_z'||₂ for each demo.

    Args:
        demo_states: ``N`` arrays ``[T_i, D]``.
        rollout_states: ``M`` arrays ``[T_j, D]`` of successful rollouts.
        block: Demo states per distance block (memory O(block × max |τ|)).

    Returns:
        ``[N]`` float64 (higher = closer to success).
    """
    if not rollout_states:
        raise ValueError("success-sim needs at least one successful rollout")
    lens = np.asarray([len(s) for s in demo_states])
    if (lens == 0).any():
        raise ValueError(f"demo {int(np.flatnonzero(lens == 0)[0])} has no states")
    all_demo = torch.as_tensor(np.concatenate(demo_states, 0), dtype=torch.float64)
    seg = torch.as_tensor(np.repeat(np.arange(len(demo_states)), lens))
    total = torch.zeros(len(demo_states), dtype=torch.float64)
    for rs in rollout_states:
        rt = torch.as_tensor(np.asarray(rs), dtype=torch.float64)
        if rt.shape[-1] != all_demo.shape[-1]:
            raise ValueError(f"state dims differ: demos {all_demo.shape[-1]}, rollout {rt.shape[-1]}")
        near = torch.cat([torch.cdist(all_demo[i : i + block], rt).amin(1) for i in range(0, len(all_demo), block)])
        total += torch.zeros_like(total).index_add_(0, seg, near) / torch.as_tensor(lens, dtype=torch.float64)
    return -(total / len(rollout_states)).numpy()


def _table(scorer: Scorer, store: StoreReader, ids: list[str], scores: np.ndarray) -> pa.Table:
    splits, meta = _inputs.metadata_columns(store.catalog(), ids)
    return make_table(ids, scores, method=scorer.name, splits=splits, config=scorer.config, metadata=meta)


@dataclasses.dataclass(frozen=True)
class RandomConfig(Config):
    """Options of the random baseline."""

    seed: int = field(0, help="seed of the per-episode hash")
    episodes: str = field("train", help="episodes to score")


@register
class RandomScorer(Scorer):
    """Seeded random scores (order-independent)."""

    name = "random"
    config_cls = RandomConfig

    def score(self, store: StoreReader, run: str | None = None, **inputs: Any) -> pa.Table:
        ids = _inputs.resolve_episodes(store.catalog(), self.config.episodes, default="train")
        return _table(self, store, ids, random_scores(ids, self.config.seed))


@dataclasses.dataclass(frozen=True)
class LengthConfig(Config):
    """Options of the length baseline."""

    prefer: str = field("short", help="'short' (shorter demos score higher) or 'long'")
    episodes: str = field("train", help="episodes to score")

    def __post_init__(self) -> None:
        check(self.prefer in ("short", "long"), "prefer must be 'short' or 'long'")


@register
class LengthScorer(Scorer):
    """Episode length from the catalog."""

    name = "length"
    config_cls = LengthConfig

    def score(self, store: StoreReader, run: str | None = None, **inputs: Any) -> pa.Table:
        cat = store.catalog()
        ids = _inputs.resolve_episodes(cat, self.config.episodes, default="train")
        rows = _inputs.catalog_dict(cat)
        lengths = np.asarray([rows[e]["length"] for e in ids], np.float64)
        return _table(self, store, ids, -lengths if self.config.prefer == "short" else lengths)


@dataclasses.dataclass(frozen=True)
class LossConfig(Config):
    """Options of the BC-loss baseline."""

    column: str = field("bc_loss", help="catalog column or metadata key holding the mean per-step BC loss")
    episodes: str = field("train", help="episodes to score")


@register
class LossScorer(Scorer):
    """−mean per-step behaviour-cloning loss (``loss=`` mapping/array, else the catalog)."""

    name = "loss"
    config_cls = LossConfig

    def score(self, store: StoreReader, run: str | None = None, *, loss: Mapping[str, float] | Sequence[float] | None = None,
              **inputs: Any) -> pa.Table:
        cat = store.catalog()
        ids = _inputs.resolve_episodes(cat, self.config.episodes, default="train")
        if loss is None:
            rows = _inputs.catalog_dict(cat)
            vals = [_inputs.metadata_value(rows[e], self.config.column) for e in ids]
            missing = [e for e, v in zip(ids, vals) if v is None]
            if missing:
                raise ConfigError(
                    f"loss: no {self.config.column!r} for episode {missing[0]!r} in the catalog",
                    hint="compute it from the policy: `score loss --checkpoint DIR --data PATH` (Python: loss=)",
                )
        elif isinstance(loss, Mapping):
            missing = [e for e in ids if e not in loss]
            if missing:
                raise ValueError(f"loss= has no value for episode {missing[0]!r}")
            vals = [loss[e] for e in ids]
        else:
            vals = list(loss)
            if len(vals) != len(ids):
                raise ValueError(f"loss= has {len(vals)} values for {len(ids)} episodes")
        return _table(self, store, ids, -np.asarray(vals, np.float64))


@dataclasses.dataclass(frozen=True)
class SuccessSimConfig(Config):
    """Options of the success-similarity baseline."""

    rollouts: str = field("rollout", help="rollouts whose successes are compared against")
    episodes: str = field("train", help="episodes to score")


@register
class SuccessSimScorer(Scorer):
    """−mean nearest-state L2 distance to successful rollouts (``states=`` required)."""

    name = "success-sim"
    config_cls = SuccessSimConfig

    def score(self, store: StoreReader, run: str | None = None, *, states: Mapping[str, np.ndarray] | None = None,
              **inputs: Any) -> pa.Table:
        if states is None:
            raise ConfigError(
                "success-sim needs the episodes' states; the gradient store holds none",
                hint="`score success-sim --data PATH` reads them from the dataset (Python: states=)",
            )
        cat = store.catalog()
        ids = _inputs.resolve_episodes(cat, self.config.episodes, default="train")
        ro = _inputs.resolve_episodes(cat, self.config.rollouts, default="rollout")
        good = [e for e, s in zip(ro, _inputs.returns_of(cat, ro, "01")) if s == 1.0]
        missing = [e for e in ids + good if e not in states]
        if missing:
            raise ValueError(f"states= has no states for episode {missing[0]!r}")
        return _table(self, store, ids, success_similarity_scores([states[e] for e in ids], [states[e] for e in good]))


@dataclasses.dataclass(frozen=True)
class OracleConfig(Config):
    """Options of the oracle baseline."""

    episodes: str = field("train", help="episodes to score")
    label: str = field("tier", help="catalog column or metadata key holding the ground truth (e.g. 'strategy')")
    bad: str = field("", help="comma-separated label values that score 0 (the rest score 1)")
    good: str = field("", help="comma-separated label values that score 1 (the rest score 0)")

    def __post_init__(self) -> None:
        check(bool(self.label.strip()), "label must be a column or metadata key name")
        overlap = set(_values(self.bad)) & set(_values(self.good))
        check(not overlap, f"values {sorted(overlap)} are both bad and good")


def _values(spec: str) -> list[str]:
    return [v.strip() for v in str(spec).split(",") if v.strip()]


def oracle_scores(ids: Sequence[str], labels: Sequence[Any], *, label: str = "tier", bad: str = "",
                  good: str = "") -> np.ndarray:
    """Ground-truth scores from per-episode labels (see :class:`OracleConfig`).

    Args:
        ids: ``N`` episode ids (named in errors).
        labels: ``N`` label values (None when an episode has none).
        label: The label's name.
        bad: Comma-separated values scoring 0.
        good: Comma-separated values scoring 1.

    Returns:
        ``[N]`` float64 scores (higher = better).
    """
    missing = [e for e, v in zip(ids, labels) if v is None]
    if missing:
        raise ConfigError(
            f"oracle: episode {missing[0]!r} has no {label!r} label ({len(missing)} of {len(ids)} lack it)"
        )
    bad_set, good_set = set(_values(bad)), set(_values(good))
    text = [str(v) for v in labels]
    if bad_set or good_set:
        present = sorted(set(text))
        unknown = (bad_set | good_set) - set(present)
        if unknown:
            raise ConfigError(f"oracle: no episode has {label}={sorted(unknown)}; values present: {present}")
        if bad_set and good_set:
            neither = [(e, t) for e, t in zip(ids, text) if t not in bad_set | good_set]
            if neither:
                raise ConfigError(f"oracle: episode {neither[0][0]!r} has {label}={neither[0][1]!r}, "
                                 "in neither the good nor the bad values")
        return np.asarray([0.0 if t in bad_set else 1.0 if (t in good_set or not good_set) else 0.0 for t in text])
    if label == "tier":
        bad_tier = [(e, t) for e, t in zip(ids, labels) if t not in TIER_VALUE]
        if bad_tier:
            raise ConfigError(f"oracle needs tier labels in {TIERS}; episode {bad_tier[0][0]!r} has {bad_tier[0][1]!r}")
        return np.asarray([TIER_VALUE[t] for t in labels])
    try:
        values = np.asarray([float(v) for v in labels], np.float64)
    except (TypeError, ValueError):
        raise ConfigError(
            f"oracle: label {label!r} is not numeric (values: {sorted(set(text))[:10]}); "
            "say which values are bad or good (--bad VALUE / --good VALUE)"
        ) from None
    return values


@register
class OracleScorer(Scorer):
    """Ground truth from a label: tiers by default, any column/metadata key with bad/good values."""

    name = "oracle"
    config_cls = OracleConfig

    def score(self, store: StoreReader, run: str | None = None, **inputs: Any) -> pa.Table:
        cfg = self.config
        cat = store.catalog()
        ids = _inputs.resolve_episodes(cat, cfg.episodes, default="train")
        rows = _inputs.catalog_dict(cat, ids)
        labels = [_inputs.metadata_value(rows[e], cfg.label) for e in ids]
        return _table(self, store, ids, oracle_scores(ids, labels, label=cfg.label, bad=cfg.bad, good=cfg.good))


def _episode_batches(policy: Any, episode: Any, batch_size: int):
    from cupid_engine.policies.samples import build_samples

    c = policy.config
    samples = build_samples([episode], n_obs_steps=c.n_obs_steps, horizon=c.horizon, obs_keys=c.obs_keys)
    for start in range(0, len(samples), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(samples)))
        yield policy.make_batch(samples, idx)


@torch.no_grad()
def bc_losses(policy: Any, episodes: Iterable[Any], *, batch_size: int = 1024) -> dict[str, float]:
    """Mean per-step behaviour-cloning loss of each episode under ``policy``.

    One sample per step (the policy's observation window and action chunk); the
    diffusion loss uses its seeded per-sample (ε, t) draw, so the value does not depend on
    batching.

    Args:
        policy: A trained :class:`~cupid_engine.policies.base.Policy` (eval mode).
        episodes: Episodes with the policy's observation keys.
        batch_size: Samples per forward pass.

    Returns:
        ``episode id -> mean loss``.
    """
    out = {}
    for ep in episodes:
        total, count = 0.0, 0
        for batch in _episode_batches(policy, ep, batch_size):
            losses = policy.per_sample_loss(batch).double()
            total += float(losses.sum())
            count += int(losses.numel())
        if count == 0:
            raise ValueError(f"episode {ep.episode_id!r} has no samples")
        out[ep.episode_id] = total / count
    return out


def episode_states(episodes: Iterable[Any], obs_keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``episode id -> [T, D]`` states: the observation keys (default: all, sorted) concatenated."""
    out = {}
    for ep in episodes:
        keys = list(obs_keys) if obs_keys else sorted(ep.observations)
        missing = [k for k in keys if k not in ep.observations]
        if missing:
            raise ValueError(f"episode {ep.episode_id!r} lacks observation key(s) {missing}")
        out[ep.episode_id] = np.concatenate([np.asarray(ep.observations[k], np.float64) for k in keys], axis=1)
    return out
