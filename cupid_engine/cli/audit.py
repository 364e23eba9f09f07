"""``cupid-engine audit``: run (or resume) the four-gate pruning audit and write the report.

Example::

    cupid-engine audit --config audit.toml --out report/ [--learner synthetic|sim]
    cupid-engine audit --config audit.toml --only-seeds 10,13   # one share, cache only

The ``sim`` learner lives in ``cupid_engine.audit.sim_learner`` (robosuite) and is
imported only when asked for, so this command never imports robosuite otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import logging

logger = logging.getLogger(__name__)

LEARNERS = ("synthetic", "sim")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``audit`` command."""
    p = subparsers.add_parser(
        "audit",
        help="four-gate pruning audit (matched random, cheap baselines, held-out, mechanism)",
        description="Train, prune, retrain and evaluate every condition of an audit config "
        "(resuming from its cache), apply the four gates and write an HTML/PNG/JSON report.",
    )
    p.add_argument("--config", required=True, help="audit TOML (see cupid_engine/audit/examples/)")
    p.add_argument("--out", default=None,
                   help="report folder (index.html, *.png, audit.json); required unless --only-seeds is given")
    p.add_argument(
        "--only-seeds", default=None, metavar="S1,S2",
        help="run just these seeds of the config into its cache and write no report: start one process per "
        "share of the seeds (same config), then run once without this option to gate and report from the cache",
    )
    p.add_argument(
        "--learner", choices=LEARNERS, default="sim",
        help="sim: robosuite learner from cupid_engine.audit.sim_learner; "
        "synthetic: planted-effect learner for smoke tests (default: sim)",
    )
    p.set_defaults(handler=run)


def make_learner(kind: str, config):
    """Build the learner named ``kind`` for ``config``.

    Raises:
        RuntimeError: ``sim`` was asked for but ``cupid_engine.audit.sim_learner`` is not
            available (not yet written, or robosuite missing).
    """
    if kind == "synthetic":
        from cupid_engine.audit.synthetic import SyntheticLearner

        return SyntheticLearner(config.learner_options)
    if kind == "sim":
        try:
            mod = importlib.import_module("cupid_engine.audit.sim_learner")
        except ModuleNotFoundError as exc:
            if exc.name == "cupid_engine.audit.sim_learner":
                raise RuntimeError(
                    "the simulation learner (cupid_engine.audit.sim_learner) is not available in this "
                    "installation; use --learner synthetic for a smoke run"
                ) from exc
            raise RuntimeError(
                f"cupid_engine.audit.sim_learner needs {exc.name!r}: install the simulation extra "
                "(pip install 'cupid_engine[sim]' and robosuite --no-deps)"
            ) from exc
        factory = getattr(mod, "make_learner", None)
        if factory is None:
            raise RuntimeError("cupid_engine.audit.sim_learner defines no make_learner(config)")
        return factory(config)
    raise ValueError(f"unknown learner {kind!r}; choose one of {LEARNERS}")


def run(args: argparse.Namespace) -> int:
    """Handler of ``cupid-engine audit``."""
    from cupid_engine.audit.protocol import AuditConfig, AuditRunner
    from cupid_engine.audit.report import write_report

    import sys

    config = AuditConfig.from_toml(args.config)
    only = None
    if args.only_seeds is not None:
        if args.out is not None:
            print("cupid-engine audit: error: --only-seeds writes no report, so --out would be ignored; "
                  "give one of them", file=sys.stderr)
            return 2
        try:
            only = [int(x) for x in args.only_seeds.split(",") if x.strip()]
        except ValueError:
            print(f"cupid-engine audit: error: --only-seeds takes integers separated by commas, got "
                  f"{args.only_seeds!r}", file=sys.stderr)
            return 2
    elif args.out is None:
        print("cupid-engine audit: error: --out is required (only a run with --only-seeds writes no report)",
              file=sys.stderr)
        return 2
    try:
        learner = make_learner(args.learner, config)
    except RuntimeError as exc:
        # A missing learner is a usage error, not a crash: say what to do, exit 2.
        print(f"cupid-engine audit: error: {exc}", file=sys.stderr)
        return 2
    runner = AuditRunner(config, learner)
    if only is not None:
        try:
            data = runner.run_data(only_seeds=only)
        except ValueError as exc:
            print(f"cupid-engine audit: error: {exc}", file=sys.stderr)
            return 2
        # A share of the seeds is not an audit: no gates, no report, and the output says so.
        print(f"cached {len(data.conditions)} conditions of seeds {only} in {config.cache_dir}; no report written. "
              f"When every share is done: cupid-engine audit --config {args.config} --out REPORT_DIR")
        return 0
    result = runner.run()
    index = write_report(result, args.out)
    for d in result.decisions:
        logger.info("%s @ ratio %g: %s -- %s", d.method, d.ratio, d.verdict, d.reason)
    print(index)
    return 0
