"""``cupid-engine bench NAME [ARGS]``: runs ``benchmarks/bench_NAME.py`` from the source checkout.

Benchmarks live beside the package (not inside it) so they can import peers (traker,
dattri) that the engine itself never needs. Each exposes ``run(args) -> dict`` and either
``build_parser()`` or ``add_arguments(parser)``; every one accepts ``--json PATH``. The
module is imported only when its benchmark runs, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

NAMES = ("projection", "store", "featurize", "query", "pipeline", "gpu", "fidelity")


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
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark (this engine vs peers vs the hardware limit)",
        description="Run benchmarks/bench_NAME.py; arguments after NAME go to the benchmark "
        "(try `cupid-engine bench projection --help`).",
    )
    p.add_argument("bench_name", choices=NAMES, metavar="NAME", help=" | ".join(NAMES))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="benchmark arguments (e.g. --quick --json out.json)")
    p.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    module = _load(args.bench_name)
    if hasattr(module, "build_parser"):
        parser = module.build_parser()
    else:
        parser = argparse.ArgumentParser(prog=f"cupid-engine bench {args.bench_name}")
        module.add_arguments(parser)
    parser.prog = f"cupid-engine bench {args.bench_name}"
    module.run(parser.parse_args(args.bench_args))
    return 0
