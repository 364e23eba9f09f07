"""``cupid-engine curate filter|select``: turn a score table into a curated episode list.

``filter`` removes the k lowest-scoring training demos; ``select`` adds the k
highest-scoring holdout demos. The result is a score table (the kept/selected rows)
written as Parquet; the removed/added ids are printed (and written with ``--ids-out``).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``curate`` command to the CLI dispatcher."""
    p = subparsers.add_parser("curate", help="filter or select demonstrations from a score table",
                              description=__doc__)
    p.add_argument("mode", choices=("filter", "select"), help="filter: drop k lowest train; select: add k best holdout")
    p.add_argument("--scores", required=True, help="score table (Parquet) from `cupid-engine score`")
    p.add_argument("--k", type=int, required=True, help="number of demos to remove/add")
    p.add_argument("--out", required=True, help="output Parquet of the curated rows")
    p.add_argument("--ids-out", help="also write the removed/added episode ids, one per line")
    p.set_defaults(handler=_curate)


def _curate(args: argparse.Namespace) -> int:
    from cupid_engine.scorers import curation
    from cupid_engine.scorers.table import write_table

    fn = curation.filter_k if args.mode == "filter" else curation.select_k
    table, ids = fn(args.scores, args.k)
    write_table(table, args.out)
    if args.ids_out:
        with open(args.ids_out, "w") as f:
            f.writelines(f"{e}\n" for e in ids)
    verb = "removed" if args.mode == "filter" else "added"
    print(f"{args.mode}: {verb} {len(ids)} episodes, {table.num_rows} rows -> {args.out}")
    if ids:
        print(f"{verb}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
    return 0
