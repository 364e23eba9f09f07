"""``cupid-engine score METHOD``: score a store run's episodes and write a Parquet score table.

Owns argument parsing only; the scorers live in :mod:`cupid_engine.scorers` (imported
inside the handler so ``--help`` stays instant).
"""

from __future__ import annotations

import argparse
import json

METHODS_HELP = "cupid, cupid-quality, qoq, trak-traj, tracin, datamodel, random, length, loss, success-sim, oracle"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``score`` command to the CLI dispatcher."""
    p = subparsers.add_parser("score", help="score demonstrations with an influence method or baseline",
                              description=__doc__)
    p.add_argument("method", metavar="METHOD", help=f"scoring method: {METHODS_HELP}")
    p.add_argument("--store", required=True, help="gradient store path or URL")
    p.add_argument("--run", required=True, help="run name in the store")
    p.add_argument("--rollouts", help="rollouts: a split name (default 'rollout') or comma-separated episode ids")
    p.add_argument("--target", help="target/validation episodes: a split name (default 'target') or ids")
    p.add_argument("--episodes", help="episodes to score: split(s) joined by '+' (default 'train') or ids")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config field of the method (VALUE parsed as JSON when possible), repeatable")
    p.add_argument("--out", required=True, help="output Parquet path")
    from cupid_engine.cli._datamodel_args import add_arguments as _datamodel_arguments

    _datamodel_arguments(p)
    p.set_defaults(handler=_score)


def parse_options(pairs: list[str]) -> dict:
    """``["alpha=0.5", "weighting=official"]`` -> ``{"alpha": 0.5, "weighting": "official"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _score(args: argparse.Namespace) -> int:
    import dataclasses

    from cupid_engine.scorers import get_scorer, score, write_table

    if args.method == "datamodel":
        from cupid_engine.scorers.datamodel.scorer import cli_score

        return cli_score(args)
    cls = get_scorer(args.method)
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    options = parse_options(args.options)
    for name in ("rollouts", "target", "episodes"):
        value = getattr(args, name)
        if value is None:
            continue
        if name not in fields:
            raise SystemExit(f"{args.method} takes no --{name}")
        options[name] = value
    unknown = set(options) - fields
    if unknown:
        raise SystemExit(f"{args.method} has no option(s) {sorted(unknown)}; options: {sorted(fields)}")
    table = score(args.method, store=args.store, run=args.run, **options)
    write_table(table, args.out)
    best = table.sort_by([("rank", "ascending")]).slice(0, 5)
    print(f"{args.method}: scored {table.num_rows} episodes -> {args.out}")
    for row in best.to_pylist():
        print(f"  #{row['rank']:<4} {row['episode_id']:<24} {row['score']:.6g}")
    return 0
