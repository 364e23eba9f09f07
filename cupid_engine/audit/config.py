"""``AuditConfig``: the declarative description of one audit, loadable from TOML."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from cupid_engine.audit.results import FULL, LENGTH, RANDOM
from cupid_engine.config import Config, check, field


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
