"""``cupid-engine store info|verify PATH``: inspect and check a gradient store.

Owns only argument parsing and printing; the work is done by
:class:`cupid_engine.store.GradientStore` (imported lazily so ``--help`` stays instant).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``store`` command family to the CLI dispatcher."""
    p = subparsers.add_parser(
        "store",
        help="inspect or verify a gradient store",
        description="Inspect a gradient store (episodes, runs) or verify every chunk checksum.",
    )
    sub = p.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")

    info = sub.add_parser("info", help="episodes per split, runs with k/dtype/completion/size")
    info.add_argument("path", metavar="PATH", help="store directory or fsspec URL")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(handler=_info)

    verify = sub.add_parser("verify", help="read every chunk; exit 1 if any is corrupt")
    verify.add_argument("path", metavar="PATH", help="store directory or fsspec URL")
    verify.add_argument("--json", action="store_true", help="print machine-readable JSON")
    verify.set_defaults(handler=_verify)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def _info(args: argparse.Namespace) -> int:
    from cupid_engine.store.gradient_store import open_store

    info = open_store(args.path, mode="r").info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"store {info['url']}  (schema v{info['schema_version']}, chunk_rows={info['chunk_rows']})")
    print(f"episodes: {info['episodes']}  steps: {info['steps']}  shards: {info['shards']}")
    for split, n in sorted(info["splits"].items()):
        print(f"  {split:<12} {n}")
    print(f"runs: {len(info['runs'])}")
    for r in info["runs"]:
        state = "complete" if r["complete"] else f"{r['shards_done']}/{r['shards_total']} shards"
        fin = ", finalized" if r["finalized"] else ""
        print(
            f"  {r['name']:<16} k={r['k']} dtype={r['dtype']} compressor={r['compressor']} "
            f"{state}{fin}  steps {_human(r['steps_bytes'])} ({_human(r['steps_bytes_stored'])} on disk)"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cupid_engine.store.gradient_store import open_store

    report = open_store(args.path, mode="r").verify()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for p in report.problems:
            print(f"CORRUPT {p.describe()}")
        status = "OK" if report.ok else f"{len(report.problems)} corrupt chunk(s)"
        print(f"checked {report.chunks_checked} chunks: {status}")
    return 0 if report.ok else 1
