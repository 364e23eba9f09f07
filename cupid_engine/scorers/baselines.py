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
- ``oracle``: ground-truth tiers, better > okay > worse; an error when a tier is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cupid_engine.config import Config, check, field
from cupid_engine.constants import TIERS
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.scorers.table import make_table

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


def _table(scorer: Scorer, store: Any, ids: list[str], scores: np.ndarray) -> pa.Table:
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

    def score(self, store: Any, run: str | None = None, **inputs: Any) -> pa.Table:
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

    def score(self, store: Any, run: str | None = None, **inputs: Any) -> pa.Table:
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

    def score(self, store: Any, run: str | None = None, *, loss: Mapping[str, float] | Sequence[float] | None = None,
              **inputs: Any) -> pa.Table:
        cat = store.catalog()
        ids = _inputs.resolve_episodes(cat, self.config.episodes, default="train")
        if loss is None:
            rows = _inputs.catalog_dict(cat)
            vals = [_inputs.metadata_value(rows[e], self.config.column) for e in ids]
            missing = [e for e, v in zip(ids, vals) if v is None]
            if missing:
                raise ValueError(
                    f"no {self.config.column!r} for episode {missing[0]!r}: pass loss= or add the column/metadata key"
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

    def score(self, store: Any, run: str | None = None, *, states: Mapping[str, np.ndarray] | None = None,
              **inputs: Any) -> pa.Table:
        if states is None:
            raise ValueError("success-sim needs states= (episode id -> [T, D] states); the store holds none")
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


@register
class OracleScorer(Scorer):
    """Ground-truth tiers: better (2) > okay (1) > worse (0)."""

    name = "oracle"
    config_cls = OracleConfig

    def score(self, store: Any, run: str | None = None, **inputs: Any) -> pa.Table:
        cat = store.catalog()
        ids = _inputs.resolve_episodes(cat, self.config.episodes, default="train")
        rows = _inputs.catalog_dict(cat)
        tiers = [rows[e].get("tier") for e in ids]
        bad = [(e, t) for e, t in zip(ids, tiers) if t not in TIER_VALUE]
        if bad:
            raise ValueError(f"oracle needs tier labels in {TIERS}; episode {bad[0][0]!r} has {bad[0][1]!r}")
        return _table(self, store, ids, np.asarray([TIER_VALUE[t] for t in tiers]))
