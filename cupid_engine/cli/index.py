"""``cupid-engine index``: build (or check) the query index of a run's training demos ahead of time.

``query`` builds the index on first use; this command does it up front (e.g. after
featurising a large run) and says which kind it is and why: by default (``--kind auto``)
the exact fp32 scan below 8 MiB of fp32 vectors and the int8 scan with a certified exact
re-rank (``sq8``) from there on (``AUTO_SQ8_MIN_BYTES``, measured in benchmarks/RESULTS.md);
both give exact top demos and exact scores. A saved index that still matches the run is
reopened, not rebuilt (``--rebuild`` forces it).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``index`` command to the CLI dispatcher."""
    p = subparsers.add_parser("index", help="build the query index of a run's training demos", description=__doc__)
    p.add_argument("--store", required=True, help="gradient store path or URL")
    p.add_argument("--run", required=True, action="append", help="run name (repeat for a checkpoint ensemble)")
    p.add_argument("--kind", choices=("auto", "flat", "hnsw", "sq8"), default="auto",
                   help="auto (default: flat or sq8 by the size of the index), flat, hnsw or sq8")
    p.add_argument("--damping", type=float, default=1e-3, help="relative damping λ (default 1e-3)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if a valid index is saved")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=_index)


def _index(args: argparse.Namespace) -> int:
    import os
    import time
    import urllib.parse

    from cupid_engine.index import open_index
    from cupid_engine.index.faiss_index import saved_folders
    from cupid_engine.index.query import INDEX_DIR, remote_cache_folder, store_folder
    from cupid_engine.store import open_store

    store = open_store(args.store)
    runs = args.run[0] if len(args.run) == 1 else args.run
    t = time.perf_counter()
    index = open_index(store, runs, kind=args.kind, damping=args.damping, rebuild=args.rebuild)
    seconds = time.perf_counter() - t
    folder = store_folder(store) or remote_cache_folder(store, index.meta)
    sub = urllib.parse.quote("+".join(args.run), safe="")
    where = saved_folders(os.path.join(folder, INDEX_DIR, sub), index.kind) if folder else []
    info = dict(index.choice, rows=len(index), dim=index.dim, seconds=seconds, saved=where)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"index {index.kind} over {info['rows']} training demos x {index.dim} ({index.choice['reason']})")
        print(f"saved in {', '.join(where)}" if where else "not saved (no local folder for this store)")
    return 0
