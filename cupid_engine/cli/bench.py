"""``cupid-engine bench NAME``: runs ``benchmarks/bench_NAME.py`` from the source checkout.

Benchmarks live beside the package (not inside it) so they can import peers (traker,
dattri) that the engine itself never needs. Every benchmark exposes
``add_arguments(parser)`` and ``run(args) -> dict`` and accepts ``--json PATH``.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

NAMES = ("projection", "store", "featurize", "query", "pipeline")


def _bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    path = _bench_dir() / f"bench_{name}.py"
    if not path.exists():
        raise SystemExit(f"benchmark {name!r} not found at {path}: run from a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"cupid_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark (this engine vs peers vs the hardware limit)")
    sub = p.add_subparsers(dest="bench_name", required=True, metavar="NAME")
    for name in NAMES:
        sp = sub.add_parser(name, help=f"benchmarks/bench_{name}.py")
        if (_bench_dir() / f"bench_{name}.py").exists():
            _load(name).add_arguments(sp)
        else:
            sp.add_argument("--json", default=None)
        sp.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    _load(args.bench_name).run(args)
    return 0
