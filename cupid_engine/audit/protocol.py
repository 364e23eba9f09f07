"""The audit protocol: configuration, the ``Learner`` protocol and the resumable runner.

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

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cupid_engine.audit.results import FULL, HELDOUT, LENGTH, PRIMARY, RANDOM, AuditData, Condition
from cupid_engine.config import Config, check, field

logger = logging.getLogger(__name__)

CACHE_SCHEMA = 1
"""Version of the cache layout; part of every key so a layout change never reuses entries."""

_STREAM_RANDOM_PRUNE = 5001
_STREAM_TIEBREAK = 5002
# Private hash streams of the audit (seeded generators, one per random quantity), so that
# adding a condition never changes which episodes random pruning removes.

BUILTIN_RULES = (RANDOM, LENGTH)
"""Rules the runner computes itself from ``episode_info`` (never asked of the learner)."""


@runtime_checkable
class Learner(Protocol):
    """Everything model-specific the audit needs; the runner holds no model code.

    Contract (the runner relies on each point):

    * ``fingerprint()`` -- a short string that changes whenever the learner would produce
      different numbers for the same call (dataset content, code version, planted
      effects ...). It is part of every cache key.
    * ``episode_info()`` -- the training episodes: a mapping (or ``pyarrow.Table``) with
      columns ``episode_id`` (str), ``length`` (steps) and ``tier`` (``better``/``okay``/
      ``worse`` or empty when unknown). Its order is irrelevant.
    * ``train(episode_ids, seed, workdir)`` -- train a policy *from scratch* on exactly
      ``episode_ids`` with training seed ``seed`` and the same optimisation budget
      (number of gradient steps, not epochs) whatever the subset size, and write the
      checkpoint into the existing empty directory ``workdir``. Files must reference
      each other by relative paths: the runner renames ``workdir`` into the cache when
      ``train`` returns, which is what makes the checkpoint count as finished.
    * ``score(model_dir, method, seed)`` -- score every training episode with
      ``method`` (any name except the built-ins ``random`` and ``length``) using the
      policy saved in ``model_dir``; return ``{episode_id: score}`` with **higher =
      keep**. Must be deterministic given its arguments (the resume check relies on it).
    * ``evaluate(model_dir, seed, rollouts)`` -- closed-loop success rate in ``[0, 1]``
      of the saved policy over ``rollouts`` rollouts whose initial states derive from
      ``seed`` only (so two policies of the same seed see the same initial states).

    With ``workers > 1`` the runner calls one learner from several threads (one seed per
    thread); a learner that is not thread-safe must be run with ``workers = 1``.
    """

    def fingerprint(self) -> str: ...

    def episode_info(self) -> Any: ...

    def train(self, episode_ids: Sequence[str], seed: int, workdir: Path) -> None: ...

    def score(self, model_dir: Path, method: str, seed: int) -> Mapping[str, float]: ...

    def evaluate(self, model_dir: Path, seed: int, rollouts: int) -> float: ...


def _tuple_of(kind: type, values: Any) -> tuple:
    return tuple(kind(v) for v in values)


@dataclasses.dataclass(frozen=True)
class AuditConfig(Config):
    """Declarative description of one audit (loadable from TOML, see :meth:`from_toml`)."""

    task: str = field(help="task name (lift, can, square ...), passed to the learner")
    dataset: str = field(help="dataset identifier or path, interpreted by the learner")
    methods: tuple[str, ...] = field(help="pruning methods under audit (e.g. cupid, qoq)")
    seeds: tuple[int, ...] = field(help="primary seed block (gates 1, 2)")
    policy: dict = field(
        default_factory=dict, help="policy: {'type': 'mlp'|'diffusion', ...train config}"
    )
    baselines: tuple[str, ...] = field(
        default=(LENGTH, "loss", "tracin"), help="cheap baselines for gate 2 (length is built in)"
    )
    prune_ratios: tuple[float, ...] = field(default=(0.1,), help="fractions of episodes pruned")
    heldout_seeds: tuple[int, ...] = field(default=(), help="held-out seed block (gate 3)")
    rollouts: int = field(default=50, help="evaluation rollouts per condition")
    workers: int = field(default=1, help="seeds run concurrently (threads; learner must be thread-safe)")
    cache_dir: str = field(default="audit_cache", help="cache of checkpoints, scores and evaluations")
    alpha: float = field(default=0.05, help="one-sided significance level of every gate")
    permutations: int = field(default=50_000, help="sign-flip permutation draws")
    bootstrap: int = field(default=10_000, help="bootstrap resamples of the mean delta")
    stats_seed: int = field(default=0, help="seed of the permutation and bootstrap streams")
    noninferiority_margin: float = field(
        default=0.0, help="gate 2: a baseline whose mean success exceeds the method's by more wins"
    )
    length_jaccard_flag: float = field(
        default=0.7, help="gate 4: flag when Jaccard(method, length pruned sets) >= this"
    )
    length_spearman_flag: float = field(
        default=0.8, help="gate 4: flag when |Spearman(score, length)| >= this"
    )
    learner_options: dict = field(default_factory=dict, help="free options for the learner")

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", _tuple_of(str, self.methods))
        object.__setattr__(self, "baselines", _tuple_of(str, self.baselines))
        object.__setattr__(self, "seeds", _tuple_of(int, self.seeds))
        object.__setattr__(self, "heldout_seeds", _tuple_of(int, self.heldout_seeds))
        object.__setattr__(self, "prune_ratios", _tuple_of(float, self.prune_ratios))
        check(bool(self.task), "task must be non-empty")
        check(len(self.methods) > 0, "at least one method is required")
        check(RANDOM not in self.methods and RANDOM not in self.baselines,
              "random is the matched comparator of every rule; do not list it")
        check(FULL not in self.methods and FULL not in self.baselines, f"'{FULL}' is reserved")
        check(len(set(self.methods)) == len(self.methods), "methods must be unique")
        check(len(set(self.baselines)) == len(self.baselines), "baselines must be unique")
        check(len(self.seeds) > 0, "at least one primary seed is required")
        check(len(set(self.seeds) | set(self.heldout_seeds)) == len(self.seeds) + len(self.heldout_seeds),
              "seeds and heldout_seeds must be distinct")
        check(len(self.prune_ratios) > 0, "at least one prune ratio is required")
        check(all(0.0 < r < 1.0 for r in self.prune_ratios), "prune ratios must be in (0, 1)")
        check(len(set(self.prune_ratios)) == len(self.prune_ratios), "prune ratios must be unique")
        check(self.rollouts >= 1, "rollouts must be >= 1")
        check(self.workers >= 1, "workers must be >= 1")
        check(0.0 < self.alpha < 0.5, "alpha must be in (0, 0.5)")
        check(self.permutations >= 1 and self.bootstrap >= 1, "permutations and bootstrap must be >= 1")
        check(self.noninferiority_margin >= 0.0, "noninferiority_margin must be >= 0")
        check(0.0 < self.length_jaccard_flag <= 1.0, "length_jaccard_flag must be in (0, 1]")
        check(0.0 < self.length_spearman_flag <= 1.0, "length_spearman_flag must be in (0, 1]")
        check(isinstance(self.policy, dict), "policy must be a table")
        check(not self.policy or "type" in self.policy, "policy needs a 'type' (mlp, diffusion ...)")

    @property
    def rules(self) -> tuple[str, ...]:
        """Methods then baselines, without duplicates (a rule listed in both runs once)."""
        return tuple(dict.fromkeys(self.methods + self.baselines))

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "AuditConfig":
        """Load a config from TOML.

        Top-level keys are the field names; ``[policy]`` and ``[learner_options]`` are
        tables. ``keep_ratios = [...]`` may replace ``prune_ratios`` (``prune = 1 -
        keep``). A relative ``cache_dir`` is made absolute against the current working
        directory (like ``--out``), so the config records where its cache lives.
        """
        path = Path(path)
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        data = dict(data.get("audit", data))
        if "keep_ratios" in data:
            check("prune_ratios" not in data, "give prune_ratios or keep_ratios, not both")
            data["prune_ratios"] = [round(1.0 - float(k), 12) for k in data.pop("keep_ratios")]
        cache = Path(data.get("cache_dir", "audit_cache"))
        if not cache.is_absolute():
            cache = cache.resolve()
        data["cache_dir"] = str(cache)
        for key in ("methods", "baselines", "seeds", "heldout_seeds", "prune_ratios"):
            if key in data:
                data[key] = tuple(data[key])
        return cls.from_dict(data)


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


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class AuditCache:
    """On-disk cache of checkpoints (dirs), score tables (Parquet) and evaluations (JSON).

    Layout under ``root``: ``train/<key>/{meta.json, checkpoint/}``,
    ``scores/<key>.parquet`` and ``evals/<key>.json``. An entry exists only once it is
    complete: each is built under a ``.tmp-*`` sibling and renamed into place. A process
    killed by a signal can leave such a sibling behind; it is never read (only final
    names are) and may be deleted at any time.
    """

    def __init__(self, root: str | os.PathLike, subset: Mapping[str, Any]):
        self.root = Path(root)
        self.subset = dict(subset)
        for sub in ("train", "scores", "evals"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def key(self, kind: str, **parts: Any) -> str:
        """Cache key: hash of (schema, kind, config subset, parts)."""
        return _digest({"schema": CACHE_SCHEMA, "kind": kind, "subset": self.subset, **parts})

    # -- checkpoints
    def train_dir(self, key: str) -> Path:
        return self.root / "train" / key

    def has_train(self, key: str) -> bool:
        return (self.train_dir(key) / "meta.json").is_file()

    def train_meta(self, key: str) -> dict[str, Any]:
        with open(self.train_dir(key) / "meta.json") as fh:
            return json.load(fh)

    def commit_train(self, key: str, tmp: Path, meta: Mapping[str, Any]) -> Path:
        """Write ``meta.json`` into ``tmp`` and rename it to the final entry."""
        _write_json_atomic(tmp / "meta.json", dict(meta))
        final = self.train_dir(key)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another worker finished the same condition first; its entry is equivalent.
            if not self.has_train(key):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def new_tmp(self, key: str) -> Path:
        tmp = self.root / "train" / f".{key}.tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        return tmp

    # -- scores
    def load_scores(self, key: str) -> dict[str, float] | None:
        path = self.root / "scores" / f"{key}.parquet"
        if not path.is_file():
            return None
        import pyarrow.parquet as pq

        t = pq.read_table(path).to_pydict()
        return {e: float(s) for e, s in zip(t["episode_id"], t["score"])}

    def save_scores(self, key: str, scores: Mapping[str, float]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = sorted(scores)
        table = pa.table({"episode_id": ids, "score": [float(scores[e]) for e in ids]})
        path = self.root / "scores" / f"{key}.parquet"
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    # -- evaluations
    def load_eval(self, key: str) -> dict[str, Any] | None:
        path = self.root / "evals" / f"{key}.json"
        if not path.is_file():
            return None
        with open(path) as fh:
            return json.load(fh)

    def save_eval(self, key: str, record: Mapping[str, Any]) -> None:
        _write_json_atomic(self.root / "evals" / f"{key}.json", dict(record))


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
    def _trained(self, seed: int, method: str, ratio: float, kept: list[str]) -> Path:
        key = self.cache.key("train", seed=seed, method=method, ratio=ratio)
        kept_hash = _digest(sorted(kept))
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
                             kept_hash=_digest(sorted(kept)))
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

    def run_data(self) -> AuditData:
        """Run or resume every condition and return the raw :class:`AuditData`."""
        jobs = [(s, PRIMARY) for s in self.config.seeds] + [(s, HELDOUT) for s in self.config.heldout_seeds]
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
