"""The audit protocol: the resumable runner and its pruning rules.

For every seed (primary block and held-out block) and every prune ratio the
:class:`AuditRunner`:

1. trains the base policy on every episode (condition ``"full"``) and evaluates it;
2. scores every episode with each configured method and baseline, using the base policy;
3. prunes the lowest-scoring ``round(ratio * N)`` episodes per rule, and the same number
   at random with a generator seeded by ``(seed, ratio)`` (matched random pruning);
4. retrains each pruned set from scratch with the same seed and budget and evaluates it
   with ``rollouts`` rollouts on the same rollout seed (common random numbers, so the
   paired deltas compare policies, not initial states).

Every trained policy, score table and evaluation is cached under ``cache_dir`` keyed by
a hash of (learner fingerprint, task, dataset, policy, seed, method, ratio), written
atomically (a temporary sibling, then ``os.rename``), so a killed audit resumes where it
stopped and never retrains a finished condition.

The runner never sees model code: everything model-specific sits behind the small
:class:`Learner` protocol (the synthetic learner in :mod:`cupid_engine.audit.synthetic`
for tests, a robosuite learner in ``cupid_engine.audit.sim_learner`` for real audits).
A learner module used by ``cupid-engine audit --learner sim`` must define
``make_learner(config: AuditConfig) -> Learner``; it receives ``config.task``,
``config.dataset``, ``config.policy`` and ``config.learner_options``.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cupid_engine.audit.cache import CACHE_SCHEMA, AuditCache, digest
from cupid_engine.audit.config import AuditConfig
from cupid_engine.audit.learner import Learner
from cupid_engine.audit.results import FULL, HELDOUT, LENGTH, PRIMARY, RANDOM, AuditData, Condition
from cupid_engine.config import check

__all__ = [
    "BUILTIN_RULES",
    "CACHE_SCHEMA",
    "AuditCache",
    "AuditConfig",
    "AuditRunner",
    "Learner",
    "episode_table",
    "n_pruned",
    "prune_lowest",
    "prune_random",
]

logger = logging.getLogger(__name__)

_STREAM_RANDOM_PRUNE = 5001
_STREAM_TIEBREAK = 5002
# Private hash streams of the audit (seeded generators, one per random quantity), so that
# adding a condition never changes which episodes random pruning removes.

BUILTIN_RULES = (RANDOM, LENGTH)
"""Rules the runner computes itself from ``episode_info`` (never asked of the learner)."""


# ---------------------------------------------------------------------------- helpers
def episode_table(info: Any) -> tuple[list[str], np.ndarray, list[str]]:
    """Normalise a learner's ``episode_info()`` to ``(ids, lengths [N], tiers)``."""
    if hasattr(info, "to_pydict"):  # pyarrow.Table
        info = info.to_pydict()
    check(isinstance(info, Mapping), "episode_info() must return a mapping or a pyarrow.Table")
    for col in ("episode_id", "length"):
        check(col in info, f"episode_info() lacks column {col!r}")
    ids = [str(e) for e in info["episode_id"]]
    lengths = np.asarray(info["length"], dtype=np.float64)
    tiers = [("" if t is None else str(t)) for t in info.get("tier", [None] * len(ids))]
    check(len(ids) == lengths.size == len(tiers), "episode_info() columns differ in length")
    check(len(set(ids)) == len(ids), "episode_info() has duplicate episode ids")
    check(len(ids) >= 2, "an audit needs at least two episodes")
    return ids, lengths, tiers


def n_pruned(ratio: float, n: int) -> int:
    """Episodes pruned at ``ratio`` of ``n``: ``round(ratio * n)``, at least 1, at most n-1."""
    return int(min(max(round(ratio * n), 1), n - 1))


def prune_lowest(scores: Mapping[str, float], ids: Sequence[str], k: int, seed: int) -> list[str]:
    """Ids of the ``k`` lowest-scoring episodes (higher score = keep).

    Ties are broken by a permutation seeded with ``seed`` rather than by id order,
    because generated datasets often number episodes tier by tier and an id-order
    tie-break would then prune by tier without the score saying so.
    """
    missing = [e for e in ids if e not in scores]
    if missing:
        raise ValueError(f"score table lacks {len(missing)} episodes, e.g. {missing[:3]}")
    s = np.asarray([float(scores[e]) for e in ids], dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("score table has non-finite scores")
    tiebreak = np.random.default_rng([seed, _STREAM_TIEBREAK]).permutation(len(ids))
    order = np.lexsort((tiebreak, s))  # last key is primary: score ascending
    return sorted(ids[i] for i in order[:k])


def prune_random(ids: Sequence[str], k: int, seed: int, ratio: float) -> list[str]:
    """Matched random pruning: ``k`` ids drawn with a generator seeded by ``(seed, ratio)``."""
    rng = np.random.default_rng([seed, _STREAM_RANDOM_PRUNE, int(round(ratio * 1_000_000))])
    pick = rng.permutation(len(ids))[:k]
    return sorted(ids[i] for i in pick)


# ---------------------------------------------------------------------------- runner
class AuditRunner:
    """Runs (or resumes) every condition of an :class:`AuditConfig` with a :class:`Learner`.

    Args:
        config: The audit.
        learner: Model-specific training, scoring and evaluation.

    Example:
        >>> runner = AuditRunner(AuditConfig.from_toml("audit.toml"), learner)
        >>> result = runner.run()          # an AuditResult (data + gates + decisions)
    """

    def __init__(self, config: AuditConfig, learner: Learner):
        if not isinstance(learner, Learner):
            raise TypeError(f"{type(learner).__name__} does not implement the Learner protocol")
        self.config = config
        self.learner = learner
        subset = {
            "learner": str(learner.fingerprint()),
            "task": config.task,
            "dataset": config.dataset,
            "policy": config.policy,
        }
        self.cache = AuditCache(config.cache_dir, subset)
        self.ids, self.lengths, self.tiers = episode_table(learner.episode_info())
        self.counts = {"train": 0, "score": 0, "evaluate": 0, "cached": 0}
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:  # seeds may run on several threads
            self.counts[what] += 1

    # -- one cached step each
    def _train_key(self, seed: int, method: str, ratio: float) -> str:
        return self.cache.key("train", seed=seed, method=method, ratio=ratio)

    def cached_checkpoint(self, seed: int, method: str, ratio: float) -> Path | None:
        """The cached checkpoint folder of one condition, or None if it was never trained."""
        key = self._train_key(seed, method, ratio)
        return self.cache.train_dir(key) / "checkpoint" if self.cache.has_train(key) else None

    def _trained(self, seed: int, method: str, ratio: float, kept: list[str]) -> Path:
        key = self._train_key(seed, method, ratio)
        kept_hash = digest(sorted(kept))
        if self.cache.has_train(key):
            meta = self.cache.train_meta(key)
            if meta.get("kept_hash") != kept_hash:
                raise RuntimeError(
                    f"cached policy {self.cache.train_dir(key)} (seed {seed}, {method}, ratio "
                    f"{ratio}) was trained on a different episode subset: the learner's scores are "
                    "not deterministic or its fingerprint missed a change; delete that entry to retrain"
                )
            self._count("cached")
            return self.cache.train_dir(key) / "checkpoint"
        tmp = self.cache.new_tmp(key)
        (tmp / "checkpoint").mkdir()
        logger.info("train seed=%d method=%s ratio=%g on %d episodes", seed, method, ratio, len(kept))
        try:
            self.learner.train(list(kept), seed, tmp / "checkpoint")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._count("train")
        meta = {"seed": seed, "method": method, "ratio": ratio, "kept_hash": kept_hash,
                "n_kept": len(kept), "subset": self.cache.subset}
        return self.cache.commit_train(key, tmp, meta) / "checkpoint"

    def _scores(self, seed: int, method: str, model_dir: Path) -> dict[str, float]:
        if method == LENGTH:
            # Shorter is kept: the cheap rule of the audit paper, no model needed.
            return {e: -float(l) for e, l in zip(self.ids, self.lengths)}
        key = self.cache.key("score", seed=seed, method=method)
        cached = self.cache.load_scores(key)
        if cached is not None:
            return cached
        scores = {str(k): float(v) for k, v in self.learner.score(model_dir, method, seed).items()}
        self._count("score")
        self.cache.save_scores(key, scores)
        return scores

    def _evaluated(self, seed: int, method: str, ratio: float, model_dir: Path, kept: list[str]) -> float:
        # The kept set is part of the key so that an evaluation never outlives the
        # checkpoint it measured (e.g. after a stale entry was deleted and retrained).
        key = self.cache.key("eval", seed=seed, method=method, ratio=ratio, rollouts=self.config.rollouts,
                             kept_hash=digest(sorted(kept)))
        cached = self.cache.load_eval(key)
        if cached is not None:
            return float(cached["success"])
        success = float(self.learner.evaluate(model_dir, seed, self.config.rollouts))
        if not 0.0 <= success <= 1.0:
            raise ValueError(f"learner.evaluate returned success rate {success}, outside [0, 1]")
        self._count("evaluate")
        self.cache.save_eval(key, {"success": success, "rollouts": self.config.rollouts,
                                   "seed": seed, "method": method, "ratio": ratio})
        return success

    def _run_seed(self, seed: int, block: str) -> tuple[list[Condition], dict]:
        cfg = self.config
        conds: list[Condition] = []
        scores: dict[tuple[int, str], dict[str, float]] = {}
        base = self._trained(seed, FULL, 0.0, list(self.ids))
        conds.append(Condition(seed, block, FULL, 0.0, self._evaluated(seed, FULL, 0.0, base, list(self.ids)),
                               cfg.rollouts, []))
        for rule in cfg.rules:
            scores[(seed, rule)] = self._scores(seed, rule, base)
        for ratio in cfg.prune_ratios:
            k = n_pruned(ratio, len(self.ids))
            pruned_sets = {RANDOM: prune_random(self.ids, k, seed, ratio)}
            for rule in cfg.rules:
                pruned_sets[rule] = prune_lowest(scores[(seed, rule)], self.ids, k, seed)
            for rule, pruned in pruned_sets.items():
                drop = set(pruned)
                kept = [e for e in self.ids if e not in drop]
                model = self._trained(seed, rule, ratio, kept)
                success = self._evaluated(seed, rule, ratio, model, kept)
                conds.append(Condition(seed, block, rule, ratio, success, cfg.rollouts, pruned))
        return conds, scores

    def run_data(self, only_seeds: Sequence[int] | None = None) -> AuditData:
        """Run or resume the conditions and return the raw :class:`AuditData`.

        Args:
            only_seeds: Run just these seeds of the config (primary or held-out). Several
                processes given disjoint seeds and the same ``cache_dir`` fill one cache
                side by side (each entry is renamed into place when complete); a final run
                without ``only_seeds`` then finds every condition cached. The data of a
                partial run covers only its seeds, so do not apply the gates to it.

        Raises:
            ValueError: a seed in ``only_seeds`` is not one of the config's.
        """
        jobs = [(s, PRIMARY) for s in self.config.seeds] + [(s, HELDOUT) for s in self.config.heldout_seeds]
        if only_seeds is not None:
            known = {s for s, _ in jobs}
            unknown = sorted(set(only_seeds) - known)
            if unknown:
                raise ValueError(f"seeds {unknown} are not in the config (seeds + heldout_seeds: {sorted(known)})")
            wanted = set(only_seeds)
            jobs = [j for j in jobs if j[0] in wanted]
        data = AuditData(list(self.ids), [float(x) for x in self.lengths], list(self.tiers))
        if self.config.workers > 1:
            with ThreadPoolExecutor(max_workers=self.config.workers) as pool:
                outs = list(pool.map(lambda j: self._run_seed(*j), jobs))
        else:
            outs = [self._run_seed(*j) for j in jobs]
        for conds, scores in outs:
            data.conditions.extend(conds)
            data.scores.update(scores)
        logger.info("audit done: %s", self.counts)
        return data

    def run(self):
        """Run or resume the audit and apply the gates.

        Returns:
            An :class:`~cupid_engine.audit.gates.AuditResult`.
        """
        from cupid_engine.audit.gates import evaluate_audit

        return evaluate_audit(self.run_data(), self.config)
