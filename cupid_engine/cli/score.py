"""``cupid-engine score [METHOD]``: score a store run's episodes and write a Parquet score table.

Without a METHOD it runs the project default, ``cupid-quality`` (``constants.DEFAULT_SCORER``).

Every baseline runs from what the store and the dataset hold: ``loss`` takes the policy
checkpoint (``--checkpoint``) and the dataset (``--data``) and computes each episode's
mean BC loss; ``success-sim`` reads the demos' and the successful rollouts' states from
``--data`` (and ``--rollout-data`` when the rollouts are another dataset); ``oracle``
scores any label (``--label strategy --bad majority``). A warning says when one score
value ties most episodes (e.g. ``length`` at a fixed horizon).

Owns argument parsing only; the scorers live in :mod:`cupid_engine.scorers` (imported
inside the handler so ``--help`` stays instant).
"""

from __future__ import annotations

import argparse
import json
import sys

from cupid_engine.constants import DEFAULT_SCORER

METHODS_HELP = "cupid-quality, cupid, qoq, trak-traj, tracin, datamodel, random, length, loss, success-sim, oracle"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``score`` command to the CLI dispatcher."""
    p = subparsers.add_parser("score", help="score demonstrations with an influence method or baseline",
                              description=__doc__)
    p.add_argument("method", metavar="METHOD", nargs="?", default=None,
                   help=f"scoring method: {METHODS_HELP} (default: {DEFAULT_SCORER}, the scorer that found the "
                        "known-bad demos best across the known-answer scenarios, docs/fidelity.md §3g)")
    p.add_argument("--store", required=True, help="gradient store path or URL")
    p.add_argument("--run", required=True, help="run name in the store")
    p.add_argument("--rollouts", help="rollouts: a split name (default 'rollout') or comma-separated episode ids")
    p.add_argument("--target", help="target/validation episodes: a split name (default 'target') or ids")
    p.add_argument("--episodes", help="episodes to score: split(s) joined by '+' (default 'train') or ids")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config field of the method (VALUE parsed as JSON when possible), repeatable")
    p.add_argument("--out", required=True, help="output Parquet path")
    b = p.add_argument_group("baseline inputs (loss, success-sim, oracle)")
    b.add_argument("--checkpoint", metavar="DIR",
                   help="loss: policy checkpoint whose mean per-step BC loss scores each episode (with --data)")
    b.add_argument("--rollout-data", metavar="PATH",
                   help="success-sim: dataset holding the rollouts when --data holds only the demos")
    b.add_argument("--obs-keys", metavar="K1,K2",
                   help="success-sim: observation keys forming the state (default: all, sorted)")
    b.add_argument("--label", help="oracle: catalog column or metadata key with the ground truth (default tier)")
    b.add_argument("--bad", metavar="V1,V2", help="oracle: label values that score 0 (the rest score 1)")
    b.add_argument("--good", metavar="V1,V2", help="oracle: label values that score 1 (the rest score 0)")
    from cupid_engine.cli._datamodel_args import add_arguments as _datamodel_arguments

    _datamodel_arguments(p)
    p.set_defaults(handler=_score)


def parse_options(pairs: list[str]) -> dict:
    """``["alpha=0.5", "weighting=official"]`` -> ``{"alpha": 0.5, "weighting": "official"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            from cupid_engine.errors import ConfigError

            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _score(args: argparse.Namespace) -> int:
    import dataclasses

    from cupid_engine.errors import ConfigError
    from cupid_engine.scorers import get_scorer, score, write_table

    if args.method is None:
        args.method = DEFAULT_SCORER
        print(f"score: no METHOD given, using the default {DEFAULT_SCORER} (docs/fidelity.md §3g)", file=sys.stderr)
    if args.method == "datamodel":
        from cupid_engine.cli._datamodel_args import cli_score

        return cli_score(args)
    try:
        cls = get_scorer(args.method)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    options = parse_options(args.options)
    for name in ("rollouts", "target", "episodes", "label", "bad", "good"):
        value = getattr(args, name)
        if value is None:
            continue
        if name not in fields:
            raise ConfigError(f"{args.method} takes no --{name}")
        options[name] = value
    unknown = set(options) - fields
    if unknown:
        raise ConfigError(f"{args.method} has no option(s) {sorted(unknown)}", hint=f"options: {sorted(fields)}")
    for flag, used_by in (("checkpoint", "loss"), ("rollout_data", "success-sim"), ("obs_keys", "success-sim")):
        if getattr(args, flag) is not None and args.method != used_by:
            raise ConfigError(f"--{flag.replace('_', '-')} applies to `score {used_by}` only")
    inputs = _baseline_inputs(args, options)
    table = score(args.method, store=args.store, run=args.run, **options, **inputs)
    write_table(table, args.out)
    best = table.sort_by([("rank", "ascending")]).slice(0, 5)
    print(f"{args.method}: scored {table.num_rows} episodes -> {args.out}")
    for row in best.to_pylist():
        print(f"  #{row['rank']:<4} {row['episode_id']:<24} {row['score']:.6g}")
    warn_ties(table, args.method)
    return 0


def warn_ties(table, what: str) -> None:
    """Print a warning when one score value is shared by most rows of a score table."""
    from cupid_engine.scorers.table import tie_summary

    value, count = tie_summary(table)
    n = table.num_rows
    if n >= 3 and count * 2 > n:
        print(f"warning: {what}: {count} of {n} episodes ({100 * count / n:.0f}%) share the score {value:.6g}; "
              "the score cannot order them (e.g. lengths at a fixed horizon), so curating among them follows "
              "episode-id order, not the data", file=sys.stderr)


def _open_sources(paths: list[str]):
    from cupid_engine.data.sources import open_source

    return [open_source(p) for p in paths]


def _read_episodes(paths: list[str], ids: list[str], *, what: str) -> list:
    """The episodes ``ids`` from the first dataset in ``paths`` holding each; unknown ids are an error."""
    from cupid_engine.errors import DataError

    sources = _open_sources(paths)
    left, found = list(ids), {}
    for src in sources:
        have = set(src.catalog().column("episode_id").to_pylist())
        mine = [e for e in left if e in have]
        for ep in src.episodes(ids=mine):
            found[ep.episode_id] = ep
        left = [e for e in left if e not in found]
    if left:
        raise DataError(f"{len(left)} {what} episode(s) are not in {', '.join(paths)} (first: {left[:3]})",
                        hint="pass the dataset(s) the store was featurised from (--data, --rollout-data)")
    return [found[e] for e in ids]


def _baseline_inputs(args: argparse.Namespace, options: dict) -> dict:
    """``loss=`` / ``states=`` for the baselines that need data the store does not hold."""
    from cupid_engine.errors import ConfigError

    if args.method not in ("loss", "success-sim"):
        return {}
    from cupid_engine.scorers import _inputs
    from cupid_engine.store import open_store

    cat = open_store(args.store).catalog()
    demos = _inputs.resolve_episodes(cat, options.get("episodes"), default="train")
    if args.method == "loss":
        if args.checkpoint is None and args.data is None:
            return {}  # the catalog's bc_loss column/metadata (the scorer says when it is missing)
        if args.checkpoint is None or args.data is None:
            raise ConfigError("score loss needs both --checkpoint DIR and --data PATH (or neither, to read the "
                              "catalog's 'bc_loss')")
        from cupid_engine.policies import load_policy
        from cupid_engine.scorers.baselines import bc_losses

        policy = load_policy(args.checkpoint)
        print(f"loss: mean per-step BC loss of each episode under {args.checkpoint}", file=sys.stderr)
        return {"loss": bc_losses(policy, _read_episodes([args.data], demos, what="scored"))}
    if args.data is None:
        raise ConfigError("score success-sim needs the states of the demos and rollouts: --data PATH "
                          "(and --rollout-data PATH when the rollouts are another dataset)")
    from cupid_engine.scorers.baselines import episode_states

    rollouts = _inputs.resolve_episodes(cat, options.get("rollouts"), default="rollout")
    good = [e for e, r in zip(rollouts, _inputs.returns_of(cat, rollouts, "01")) if r == 1.0]
    if not good:
        raise ConfigError(f"success-sim: none of the {len(rollouts)} rollouts succeeded",
                          hint="it compares demos with successful rollouts")
    keys = [k.strip() for k in args.obs_keys.split(",") if k.strip()] if args.obs_keys else None
    paths = [args.data] + ([args.rollout_data] if args.rollout_data else [])
    episodes = _read_episodes(paths, list(dict.fromkeys(demos + good)), what="demo/rollout")
    return {"states": episode_states(episodes, keys)}
