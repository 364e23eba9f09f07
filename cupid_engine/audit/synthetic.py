"""A synthetic :class:`~cupid_engine.audit.protocol.Learner` with planted ground truth.

It exists so that the audit machinery (runner, cache, gates, report) can be tested end
to end in milliseconds, and so that the gates can be checked against a known answer:

* each episode has a tier (better/okay/worse), a length and a planted *quality effect*
  ``q_i`` (positive for better, negative for worse);
* "training" on a subset ``K`` gives a policy whose true success probability is
  ``p = clip(base + sum_{i in K} q_i + u_seed + e_(seed, K), 0.01, 0.99)``, where
  ``u_seed`` is a per-seed offset shared by every condition of that seed (seed-level
  difficulty) and ``e`` is training noise of the particular run;
* evaluation draws ``rollouts`` uniforms from the seed alone and counts those below
  ``p`` (a Binomial(rollouts, p) draw with common random numbers across conditions,
  the analogue of evaluating every policy of a seed on the same initial states);
* ``score(method)`` returns ``signal[method] * z(q) + N(0, 1)`` noise seeded by
  ``(seed, method)``: a signal of 0 is a null (random) score, a large signal a
  helpful one. ``length`` and ``random`` are built into the runner.

Nothing here is a result about robots; it is a fixture with a known answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cupid_engine.constants import TIERS

_STREAM_DATA = 6001
_STREAM_SEED_OFFSET = 6002
_STREAM_TRAIN = 6003
_STREAM_EVAL = 6004
_STREAM_SCORE = 6005

DEFAULTS: dict[str, Any] = {
    "episodes": 60,
    "tier_fractions": [0.4, 0.3, 0.3],  # better, okay, worse
    "tier_effects": [0.004, 0.0, -0.012],  # mean planted quality effect per tier
    "effect_sd": 0.002,
    "tier_lengths": [120.0, 140.0, 160.0],  # mean length per tier
    "length_sd": 40.0,
    "base": 0.55,
    "seed_sd": 0.03,
    "train_sd": 0.01,
    "signal": {"cupid": 3.0, "qoq": 2.0, "loss": 0.5, "tracin": 0.5},
    "data_seed": 0,
}
"""Default planted world; every key can be overridden through ``learner_options``."""


def _stable_int(*parts: Any) -> int:
    # numpy seeds must be ints; a string (method name, kept-set hash) is hashed stably
    # (Python's hash() is salted per process and would break reproducibility).
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little")


class SyntheticLearner:
    """Planted-effect learner (see the module docstring).

    Args:
        options: Overrides of :data:`DEFAULTS`.
        fail_after_train: Raise ``RuntimeError`` when ``train`` is called this many
            times more (0 = never); used to simulate a killed audit.

    Attributes:
        train_calls: ``[(seed, kept-set hash)]`` of every finished ``train`` call.
    """

    def __init__(self, options: Mapping[str, Any] | None = None, *, fail_after_train: int = 0):
        opts = dict(DEFAULTS)
        unknown = set(options or {}) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown synthetic learner options: {sorted(unknown)}")
        opts.update(options or {})
        self.options = opts
        self.fail_after_train = int(fail_after_train)
        self.train_calls: list[tuple[int, str]] = []
        n = int(opts["episodes"])
        rng = np.random.default_rng([int(opts["data_seed"]), _STREAM_DATA])
        frac = np.asarray(opts["tier_fractions"], dtype=np.float64)
        counts = np.floor(frac / frac.sum() * n).astype(int)
        counts[0] += n - counts.sum()
        tier_idx = np.repeat(np.arange(3), counts)
        self.tiers = [TIERS[i] for i in tier_idx]
        self.ids = [f"ep_{i:04d}" for i in range(n)]
        self.quality = np.asarray(opts["tier_effects"], dtype=np.float64)[tier_idx] + rng.normal(
            0.0, float(opts["effect_sd"]), n
        )
        self.lengths = np.maximum(
            10.0,
            np.round(np.asarray(opts["tier_lengths"])[tier_idx] + rng.normal(0.0, float(opts["length_sd"]), n)),
        )
        self._q = dict(zip(self.ids, self.quality))

    # -- Learner protocol
    def fingerprint(self) -> str:
        return "synthetic:" + hashlib.sha256(json.dumps(self.options, sort_keys=True).encode()).hexdigest()[:16]

    def episode_info(self) -> dict[str, list]:
        return {"episode_id": list(self.ids), "length": self.lengths.tolist(), "tier": list(self.tiers)}

    def true_success(self, episode_ids: Sequence[str], seed: int) -> float:
        """The planted success probability of a policy trained on ``episode_ids``."""
        kept = sorted(episode_ids)
        o = self.options
        u = np.random.default_rng([seed, _STREAM_SEED_OFFSET]).normal(0.0, float(o["seed_sd"]))
        e = np.random.default_rng([seed, _STREAM_TRAIN, _stable_int(kept)]).normal(0.0, float(o["train_sd"]))
        p = float(o["base"]) + sum(self._q[k] for k in kept) + u + e
        return float(np.clip(p, 0.01, 0.99))

    def train(self, episode_ids: Sequence[str], seed: int, workdir: Path) -> None:
        if self.fail_after_train and len(self.train_calls) >= self.fail_after_train:
            raise RuntimeError("simulated kill during training")
        unknown = set(episode_ids) - set(self._q)
        if unknown:
            raise ValueError(f"unknown episodes {sorted(unknown)[:3]}")
        p = self.true_success(episode_ids, seed)
        kept = sorted(episode_ids)
        with open(Path(workdir) / "model.json", "w") as fh:
            json.dump({"seed": seed, "kept": kept, "p": p}, fh)
        self.train_calls.append((seed, hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16]))

    def score(self, model_dir: Path, method: str, seed: int) -> dict[str, float]:
        signal = self.options["signal"]
        if method not in signal:
            raise KeyError(f"synthetic learner has no planted score {method!r}; known: {sorted(signal)}")
        z = (self.quality - self.quality.mean()) / self.quality.std()
        noise = np.random.default_rng([seed, _STREAM_SCORE, _stable_int(method)]).normal(0.0, 1.0, z.size)
        return dict(zip(self.ids, (float(signal[method]) * z + noise).tolist()))

    def evaluate(self, model_dir: Path, seed: int, rollouts: int) -> float:
        with open(Path(model_dir) / "model.json") as fh:
            p = float(json.load(fh)["p"])
        u = np.random.default_rng([seed, _STREAM_EVAL]).random(rollouts)
        return float(np.count_nonzero(u < p)) / rollouts
