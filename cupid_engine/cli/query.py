"""``cupid-engine query``: the demonstrations (and steps) that most influence one rollout.

The rollout must already be featurised into the run (split ``rollout``); the FAISS
index over the run's training demos is built on first use and saved beside the store.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``query`` command to the CLI dispatcher."""
    p = subparsers.add_parser("query", help="top influencing demonstrations of one rollout", description=__doc__)
    p.add_argument("--store", required=True, help="gradient store path or URL")
    p.add_argument("--run", required=True, action="append",
                   help="run name (repeat for a checkpoint ensemble)")
    p.add_argument("--episode", required=True, help="rollout episode id")
    p.add_argument("--top", type=int, default=10, help="number of demonstrations (default 10)")
    p.add_argument("--kind", choices=("flat", "hnsw"), default="flat", help="exact (flat) or HNSW index")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (recall/latency)")
    p.add_argument("--sign", type=float, default=None,
                   help="R(τ) override (default from the rollout's success: +1/-1)")
    p.add_argument("--damping", type=float, default=1e-3, help="relative damping λ (default 1e-3)")
    p.add_argument("--steps", type=int, default=3, help="top steps shown per demo")
    p.add_argument("--rebuild", action="store_true", help="rebuild the index even if a valid one is saved")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=_query)


def _query(args: argparse.Namespace) -> int:
    import dataclasses

    from cupid_engine.index import open_index, top_influencers
    from cupid_engine.store import open_store

    store = open_store(args.store)
    runs = args.run[0] if len(args.run) == 1 else args.run
    params = {} if args.ef_search is None else {"ef_search": args.ef_search}
    index = open_index(store, runs, kind=args.kind, damping=args.damping, rebuild=args.rebuild, **params)
    res = top_influencers(store, runs, args.episode, k=args.top, sign=args.sign, damping=args.damping,
                          steps=args.steps, index=index)
    if args.json:
        print(json.dumps({"rollout": res.rollout, "sign": res.sign, "results": res.table.to_pylist(),
                          "steps": [dataclasses.asdict(s) for s in res.steps]}, indent=2))
    else:
        print(res)
    return 0
