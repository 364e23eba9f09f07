"""``cupid-engine query``: the demonstrations (and steps) that most influence one rollout.

By default the answer is "which demos made this rollout do what it did": the training
demos ranked by their influence a(τ, ξ) on the rollout, i.e. those whose upweighting most
pushes the policy toward this rollout's behaviour. For a failed rollout these are the
likely causes of the failure (the demos CUPID scores lowest for it); for a successful one,
the demos it owes its success to. ``--oppose`` ranks the demos that push hardest
*against* the rollout instead, and ``--sign`` sets the multiplier explicitly. The sign
used is printed in words.

The rollout must already be featurised into the run (split ``rollout``; other episodes
only with ``--any-episode``); the FAISS index over the run's training demos is built on
first use and saved beside the store. By default (``--kind auto``) the index is the exact
fp32 scan for small runs and the int8 scan with a certified exact re-rank (``sq8``) from
8 MiB of fp32 vectors on (``AUTO_SQ8_MIN_BYTES``), where it was measured faster; both
return the exact top demos and exact scores. The kind used and why is logged when the index is built
or reopened (stderr) and given as ``index`` in ``--json``.
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
    p.add_argument("--top", type=int, default=10, help="number of demonstrations (default 10, at least 1)")
    p.add_argument("--kind", choices=("auto", "flat", "hnsw", "sq8"), default="auto",
                   help="auto (default: flat or sq8 by the size of the index, from bench query's measured "
                        "crossover), exact (flat), HNSW (approximate), or sq8 (int8 scan of 1/4 the bytes, "
                        "candidates re-ranked exactly until the top is certified exact)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (recall/latency)")
    p.add_argument("--rerank", type=int, default=None,
                   help="sq8: candidates re-ranked before the exactness certificate adds any it needs (default 256)")
    p.add_argument("--oppose", action="store_true",
                   help="rank the demos that push hardest against the rollout's behaviour (sign -1)")
    p.add_argument("--sign", type=float, default=None,
                   help="explicit multiplier of the rollout direction (default +1: the demos that drove the rollout)")
    p.add_argument("--any-episode", action="store_true",
                   help="allow an episode outside the 'rollout' split (e.g. a holdout demo)")
    p.add_argument("--damping", type=float, default=1e-3, help="relative damping λ (default 1e-3)")
    p.add_argument("--steps", type=int, default=3, help="top steps shown per demo")
    p.add_argument("--rebuild", action="store_true", help="rebuild the index even if a valid one is saved")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=_query)


def _query(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from cupid_engine.errors import ConfigError
    from cupid_engine.index import open_index, top_influencers
    from cupid_engine.index.query import _catalog_rows
    from cupid_engine.scorers import _inputs
    from cupid_engine.store import open_store

    if args.top < 1:
        raise ConfigError(f"--top must be a positive number of demonstrations, got {args.top}")
    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    if args.oppose and args.sign is not None:
        raise ConfigError("--oppose and --sign both set the sign", hint="give one of them")
    store = open_store(args.store)
    if args.sign is not None and args.sign == 0:
        raise ConfigError("--sign 0 multiplies every influence by 0: nothing to rank", hint="use +1 or -1")
    try:
        row = _catalog_rows(store, [args.episode]).to_pylist()[0]
    except ValueError:
        raise ConfigError(f"episode {args.episode!r} is not in the store's catalog", where=args.store) from None
    split = row.get("split")
    if split != "rollout" and not args.any_episode:
        raise ConfigError(
            f"episode {args.episode!r} is a {split!r} episode, not a rollout",
            hint="query a rollout, or pass --any-episode to rank the demos' influence on it anyway",
        )
    n_train = len(_inputs.ids_in_split(store.catalog(), "train"))
    top = args.top
    if top > n_train:
        print(f"query: --top {top} exceeds the {n_train} training demos; showing all {n_train}", file=sys.stderr)
        top = n_train
    sign = -1.0 if args.oppose else (1.0 if args.sign is None else float(args.sign))
    runs = args.run[0] if len(args.run) == 1 else args.run
    if args.rerank is not None and args.rerank < 1:
        raise ConfigError(f"--rerank must be a positive number of candidates, got {args.rerank}")
    params = {} if args.ef_search is None else {"ef_search": args.ef_search}
    if args.rerank is not None:
        params["rerank"] = args.rerank
    # The kind built or reopened and why is logged (stderr); --json also gives it as "index".
    index = open_index(store, runs, kind=args.kind, damping=args.damping, rebuild=args.rebuild, **params)
    # A training demo queried with --any-episode is in the index itself: leave it out.
    itself = split == "train"
    res = top_influencers(store, runs, args.episode, k=min(top + itself, n_train), sign=sign,
                          damping=args.damping, steps=args.steps, index=index)
    meaning = sign_in_words(sign, row.get("success"), split)
    if itself:
        res = _without(res, args.episode, top)
        meaning += f"; {args.episode} itself (a training demo) is left out of the ranking"
    if args.json:
        print(json.dumps({"rollout": res.rollout, "sign": res.sign, "meaning": meaning, "index": res.index,
                          "results": res.table.to_pylist(),
                          "steps": [dataclasses.asdict(s) for s in res.steps]}, indent=2))
    else:
        print(meaning)
        print(res)
    return 0


def _without(res, episode: str, top: int):
    """``res`` without ``episode``, the first ``top`` others re-ranked from 1."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pc.not_equal(res.table.column("episode_id"), episode)
    table = res.table.filter(keep).slice(0, top)
    table = table.set_column(table.column_names.index("rank"), "rank", pa.array(range(1, table.num_rows + 1)))
    steps = [s for s in res.steps if s.episode_id != episode][:top]
    return type(res)(rollout=res.rollout, sign=res.sign, table=table, steps=steps, index=res.index)


def sign_in_words(sign: float, success: bool | None, split: str | None = "rollout") -> str:
    """What a ranking by ``sign·a(τ, ξ)`` answers, in words, for this episode's outcome."""
    what = {True: "succeeded", False: "failed"}.get(success, "has no success label")
    subject = f"this {'rollout' if split == 'rollout' else split + ' episode'} ({what})"
    if sign > 0:
        why = {True: "the demos it owes its success to",
               False: "the demos that most likely made it fail"}.get(success, "the demos that drove it")
        return (f"sign {sign:+g}: demos ranked by how much they push the policy toward what {subject} did, "
                f"i.e. {why} (--oppose: those that push against it)")
    if sign < 0:
        why = {True: "the demos working against its success",
               False: "the demos that pushed against this failure"}.get(success, "the demos that opposed it")
        return (f"sign {sign:+g}: demos ranked by how much they push the policy away from what {subject} did, "
                f"i.e. {why} (default: those that drove it)")
    return "sign 0: every influence is multiplied by 0, so the ranking is arbitrary"
