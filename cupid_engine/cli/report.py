"""``cupid-engine report``: write the influence explorer (a static site) of one run."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` command to the CLI dispatcher."""
    p = subparsers.add_parser(
        "report",
        help="write the influence explorer: a static site of rollouts, demos and their influences",
        description="Write a self-contained static site (open OUT/index.html; no server): an overview with "
                    "score distributions and filtered-set composition per label, a page per rollout with its "
                    "frames, the influence over its steps and its top demos aligned at the steps that carry "
                    "the influence, and a page per demo with its scores and the rollouts it influenced most.",
    )
    p.add_argument("--store", required=True, help="gradient store path or URL")
    p.add_argument("--run", required=True, action="append",
                   help="run name (repeat for a checkpoint ensemble)")
    p.add_argument("--scores", action="append", default=[], metavar="[NAME=]PATH",
                   help="score table (Parquet); repeatable; NAME defaults to the table's method")
    p.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="dataset holding demos or rollouts (for frames); repeatable; any supported format")
    p.add_argument("--audit", default=None, help="audit.json of `cupid-engine audit` to show its decisions")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--top", type=int, default=5, help="influencing demos per rollout page")
    p.add_argument("--fraction", type=float, default=0.3,
                   help="fraction of lowest-scoring training demos whose composition is plotted")
    p.add_argument("--frames", choices=("shown", "all", "none"), default="shown",
                   help="which episodes get filmstrips: rollouts and the demos they show (default), all, none")
    p.add_argument("--camera", default=None, help="camera key of the frames (default: first in sorted order)")
    p.add_argument("--page-size", type=int, default=200, help="rows per list page")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(handler=_run)


def _scores(specs: list[str]) -> dict[str, str]:
    from cupid_engine.scorers.table import read_table

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            meta = read_table(path).schema.metadata or {}
            name = meta.get(b"cupid.method", b"").decode() or path
        if name in out:
            raise ValueError(f"--scores: method name {name!r} given twice (use NAME=PATH)")
        out[name] = path
    return out


def _run(args: argparse.Namespace) -> int:
    from cupid_engine.explorer import build_site

    index = build_site(args.store, args.run if len(args.run) > 1 else args.run[0], args.out,
                       scores=_scores(args.scores), data=args.data, audit=args.audit, top=args.top,
                       fraction=args.fraction, frames=args.frames, camera=args.camera, page_size=args.page_size,
                       title=args.title)
    print(f"wrote {index} (open it in a browser; no server needed)")
    return 0
