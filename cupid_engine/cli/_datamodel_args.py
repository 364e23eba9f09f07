"""Flags of ``cupid-engine score datamodel``, kept free of heavy imports.

The ``score`` parser is built for every ``cupid-engine`` invocation (even ``--help``), so
the flags cannot live in ``datamodels.scorer``, whose package imports torch and
every scorer. ``datamodels.scorer`` re-exports them.
"""

from __future__ import annotations

import argparse
import json

from cupid_engine.constants import CLUSTER_MODES
from cupid_engine.constants import DATAMODEL_ESTIMATORS as ESTIMATORS

CLI_FIELDS = {  # flag -> config field (flags the score command does not already have)
    "estimator": "estimator", "data": "data", "policy": "policy", "size": "size", "cluster": "cluster",
    "window": "window", "steps": "steps", "batch_size": "batch_size", "lr": "lr", "seed": "seed",
    "subsets": "num_subsets", "workers": "workers", "ray_address": "address", "cache": "cache_dir",
    "segments": "segments", "last_k": "last_k",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the datamodel flags (an argument group) to the ``score`` parser; all default to
    None so that only flags given on the command line override the config defaults."""
    g = parser.add_argument_group("datamodel options (METHOD datamodel)")
    g.add_argument("--estimator", choices=ESTIMATORS, help="datamodel estimator (default regression)")
    g.add_argument("--data", help="dataset holding the episodes (path or URL)")
    g.add_argument("--policy", choices=("mlp", "diffusion"), help="policy trained on subsets (default mlp)")
    g.add_argument("--size", choices=("tiny", "default", "large"), help="policy size preset (default tiny)")
    g.add_argument("--cluster", choices=CLUSTER_MODES, help="clusters (default trajectory)")
    g.add_argument("--window", type=int, help="sub-trajectory length h (default 15)")
    g.add_argument("--steps", type=int, help="optimizer steps per training (default 500)")
    g.add_argument("--batch-size", type=int, help="batch size (default 64)")
    g.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    g.add_argument("--seed", type=int, help="seed (default 0)")
    g.add_argument("--subsets", type=int, help="regression: subset trainings (default 64)")
    g.add_argument("--workers", type=int, help="regression: parallel trainings; > 1 uses Ray actors")
    g.add_argument("--ray-address", help="regression: Ray cluster address")
    g.add_argument("--cache", help="regression: cache folder of finished trainings (resumes a killed run)")
    g.add_argument("--segments", type=int, help="metagradient: checkpoint segments (default 8)")
    g.add_argument("--last-k", type=int, help="metagradient: differentiate only the last K updates")




def config_from_args(args: argparse.Namespace, extra: dict | None = None):
    """A :class:`~cupid_engine.datamodels.scorer.DatamodelConfig` from parsed flags
    (+ ``--set`` options, + target/episodes)."""
    from cupid_engine.datamodels.scorer import DatamodelConfig

    fields = dict(extra or {})
    for flag, name in CLI_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            fields[name] = value
    for name in ("target", "episodes"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    return DatamodelConfig.from_options(**fields)


def cli_score(args: argparse.Namespace) -> int:
    """Handler body of ``cupid-engine score datamodel``: score and write ``args.out``."""
    from cupid_engine.datamodels.scorer import DatamodelScorer
    from cupid_engine.scorers.table import write_table
    from cupid_engine.store import open_store

    extra = {}
    for pair in getattr(args, "options", None) or []:
        key, _, value = pair.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    cfg = config_from_args(args, extra)
    table = DatamodelScorer(cfg).score(open_store(args.store), args.run)
    write_table(table, args.out)
    print(f"datamodel ({cfg.estimator}): scored {table.num_rows} episodes -> {args.out}")
    return 0
