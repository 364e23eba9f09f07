"""``cupid-engine curate filter|select|keep``: turn a score table into a curated episode list.

``filter`` removes the k lowest-scoring training demos; ``select`` adds the k
highest-scoring holdout demos to the training demos; ``keep`` keeps the k
highest-scoring demos of any split (``--split`` to restrict). The result is a score
table (the kept/selected rows) written as Parquet, which ``cupid-engine train --keep``
trains on; the removed/added ids are printed (and written with ``--ids-out``, which
``train --exclude`` reads after a ``filter``).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``curate`` command to the CLI dispatcher."""
    p = subparsers.add_parser("curate", help="filter, select or keep demonstrations from a score table",
                              description=__doc__)
    p.add_argument("mode", choices=("filter", "select", "keep"),
                   help="filter: drop k lowest train; select: add k best holdout; keep: the k best of any split")
    p.add_argument("--scores", required=True, help="score table (Parquet) from `cupid-engine score`")
    p.add_argument("--k", type=int, required=True, help="number of demos to remove (filter), add (select) or keep")
    p.add_argument("--split", default=None, metavar="S1,S2",
                   help="keep: only rows of these splits (default: every row of the table)")
    p.add_argument("--out", required=True, help="output Parquet of the curated rows")
    p.add_argument("--ids-out", help="also write the removed/added/dropped episode ids, one per line")
    p.set_defaults(handler=_curate)


def _curate(args: argparse.Namespace) -> int:
    from cupid_engine.cli.score import warn_ties
    from cupid_engine.errors import ConfigError
    from cupid_engine.scorers import curation
    from cupid_engine.scorers.table import read_table, write_table

    if args.split is not None and args.mode != "keep":
        raise ConfigError(f"--split applies to `curate keep` only ({args.mode} works on "
                          f"{'training' if args.mode == 'filter' else 'holdout'} demos)")
    scores = read_table(args.scores)
    if args.mode == "filter":
        table, ids = curation.filter_k(scores, args.k)
        verb = "removed"
    elif args.mode == "select":
        table, ids = curation.select_k(scores, args.k)
        verb = "added"
    else:
        splits = [s.strip() for s in args.split.split(",") if s.strip()] if args.split else None
        table, ids = curation.keep_k(scores, args.k, splits=splits)
        verb = "dropped"
    warn_ties(scores, f"scores {args.scores}")
    write_table(table, args.out)
    if args.ids_out:
        with open(args.ids_out, "w") as f:
            f.writelines(f"{e}\n" for e in ids)
    print(f"{args.mode}: {verb} {len(ids)} episodes, {table.num_rows} rows -> {args.out}")
    if ids:
        print(f"{verb}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
    return 0
