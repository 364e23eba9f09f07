"""``cupid-engine eval lds``: how well do scores predict retraining? (linear datamodeling score)

Trains one policy per random subset (a fixed fraction of the training demonstrations,
identical budget each), measures the proxy metric on every target demonstration, and
reports for every score the Spearman correlation between the predicted metric (sum of
the scores of the episodes in the subset) and the measured one, per target and averaged,
with a bootstrap confidence interval. The subset trainings are shared by all scores
compared in one call, and cached (``--cache``), so an interrupted evaluation resumes and
a later one reuses every finished training.

Scores come from Parquet tables (``--scores [NAME=]PATH``, repeatable) and/or are
computed here (``--methods cupid,trak-traj,tracin,datamodel,random``) from the dataset:
a base training with checkpoints, gradient features in a store, the engine's scorers
(:mod:`cupid_engine.datamodels.compare`). Example on the simulated benchmark::

    cupid-engine generate --task lift --demos 30 --out data/lift30
    cupid-engine eval lds --data data/lift30 --holdout-targets 6 --target-tier better \\
        --methods cupid,trak-traj,tracin,datamodel,random --subsets 16 --fraction 0.5 \\
        --steps 300 --workdir runs/lds --out runs/lds/lds.json

Heavy imports happen inside the handler so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` command family to the CLI dispatcher."""
    p = subparsers.add_parser("eval", help="evaluate scores (linear datamodeling score)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    q = sub.add_parser("lds", help="linear datamodeling score of score tables / methods, side by side",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = q.add_argument_group("what to evaluate")
    g.add_argument("--scores", action="append", default=[], metavar="[NAME=]PATH",
                   help="score table (Parquet: episode_id, score), repeatable; NAME defaults to its method column")
    g.add_argument("--methods", default=None,
                   help="compute these methods' scores here, comma-separated: "
                   "cupid, trak-traj, tracin, datamodel, random")
    d = q.add_argument_group("episodes")
    d.add_argument("--data", help="dataset holding the episodes (default: the 'data' recorded in a score table)")
    d.add_argument("--store", default=None, help="gradient store whose catalog names the train/target episodes "
                   "(default: the dataset's own catalog)")
    d.add_argument("--run", default=None, help="run name the score tables came from (recorded in the result)")
    d.add_argument("--episodes", default=None, help="training episodes: split(s) joined by '+' or ids (default train)")
    d.add_argument("--target", default=None, help="target demonstrations: a split or ids (default target)")
    d.add_argument("--holdout-targets", type=int, default=None, metavar="N",
                   help="instead of --target: hold out N of the training episodes as targets (seeded by --seed)")
    d.add_argument("--target-tier", default=None, help="with --holdout-targets: draw the targets from this tier only")
    t = q.add_argument_group("subset trainings")
    t.add_argument("--subsets", type=int, default=64, help="number of random subsets S (default 64)")
    t.add_argument("--fraction", type=float, default=0.5, help="fraction of training demos per subset (default 0.5)")
    t.add_argument("--policy", default="mlp", choices=("mlp", "diffusion"), help="policy kind (default mlp)")
    t.add_argument("--size", default="tiny", choices=("tiny", "default", "large"), help="size preset (default tiny)")
    t.add_argument("--policy-config", metavar="JSON",
                   help="policy config file (to_dict JSON); overrides --policy/--size")
    t.add_argument("--steps", type=int, default=500, help="optimizer steps per training (default 500)")
    t.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    t.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd"), help="optimizer (default adam)")
    t.add_argument("--seed", type=int, default=0, help="seed of training, the subsets and target hold-out (default 0)")
    t.add_argument("--subset-normalizer", action="store_true",
                   help="refit the normaliser on each subset (default: the full training set's, less noise)")
    t.add_argument("--metric", default="proxy", choices=("proxy", "success"),
                   help="target metric: proxy = -BC loss per target demo (default); success = rollout success "
                   "rate in the simulator (needs --task; one target)")
    t.add_argument("--task", default=None, help="--metric success: simulated task (lift, can, square)")
    t.add_argument("--metric-episodes", type=int, default=20, help="--metric success: rollouts per policy (default 20)")
    t.add_argument("--workers", type=int, default=1, help="parallel trainings; > 1 uses Ray actors (default 1)")
    t.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local instance)")
    t.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1: tiny models)")
    t.add_argument("--cache", default=None, help="cache folder of finished trainings (default with --methods: "
                   "WORKDIR/subsets)")
    m = q.add_argument_group("--methods options")
    m.add_argument("--workdir", default="lds_work", help="checkpoints, store and score tables (default ./lds_work)")
    m.add_argument("--checkpoints", type=int, default=3,
                   help="base-training checkpoints for tracin/trak-traj (default 3)")
    m.add_argument("--k", type=int, default=512, help="feature dimension (default 512)")
    m.add_argument("--datamodel-subsets", type=int, default=32, help="datamodel estimator trainings (default 32)")
    m.add_argument("--datamodel-estimator", default="regression", choices=("regression", "metagradient"),
                   help="datamodel estimator (default regression)")
    o = q.add_argument_group("output")
    o.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CI (default 1000)")
    o.add_argument("--random-seeds", type=int, default=100,
                   help="also report the LDS spread of this many random score vectors (0: off; default 100)")
    o.add_argument("--out", default=None, help="write the result as JSON here")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars")
    q.set_defaults(handler=_lds)


def _policy_config(args: argparse.Namespace, obs_keys: tuple[str, ...] | None):
    from cupid_engine.policies.diffusion import DiffusionPolicyConfig
    from cupid_engine.policies.mlp import MLPPolicyConfig
    from cupid_engine.datamodels.scorer import make_policy_config

    if args.policy_config:
        with open(args.policy_config, encoding="utf-8") as f:
            data = json.load(f)
        classes = {c.__name__: c for c in (MLPPolicyConfig, DiffusionPolicyConfig)}
        name = data.get("__class__")
        if name not in classes:
            raise SystemExit(f"error: {args.policy_config}: '__class__' must be one of {sorted(classes)}, got {name!r}")
        return classes[name].from_dict(data)
    return make_policy_config(args.policy, args.size, obs_keys=obs_keys)


def _holdout(catalog, train_ids: list[str], n: int, tier: str | None, seed: int) -> tuple[list[str], list[str]]:
    """Split ``n`` targets off the training ids (seeded; optionally one tier only)."""
    import numpy as np

    from cupid_engine.scorers._inputs import catalog_dict

    rows = catalog_dict(catalog)
    pool = [e for e in train_ids if tier is None or rows[e].get("tier") == tier]
    if not 0 < n < len(train_ids) or n > len(pool):
        raise SystemExit(f"error: cannot hold out {n} targets from {len(pool)} candidate(s) "
                         f"({len(train_ids)} training episodes)")
    picked = set(np.random.default_rng([seed, 0x7A6]).choice(len(pool), size=n, replace=False).tolist())
    targets = [e for i, e in enumerate(pool) if i in picked]
    chosen = set(targets)
    return [e for e in train_ids if e not in chosen], targets


def _score_specs(specs: list[str]) -> list[tuple[str | None, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        # "name=path" unless the '=' belongs to the path itself (a path has a separator or suffix).
        if sep and name and "/" not in name and not name.endswith(".parquet"):
            out.append((name, path))
        else:
            out.append((None, spec))
    return out


def _lds(args: argparse.Namespace) -> int:
    import torch

    from cupid_engine.policies.training import TrainConfig
    from cupid_engine.scorers._inputs import resolve_episodes
    from cupid_engine.datamodels.compare import LDS_METHODS, CompareConfig, method_score_tables
    from cupid_engine.datamodels.lds import format_lds_table, measure_subsets, random_reference
    from cupid_engine.datamodels.scorer import _load
    from cupid_engine.scorers.table import read_table, table_config

    start = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    methods = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
    unknown = [m for m in methods if m not in LDS_METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; --methods takes {', '.join(LDS_METHODS)}")
    if not methods and not args.scores:
        raise SystemExit("error: give --scores and/or --methods")
    tables = {}
    for name, path in _score_specs(args.scores):
        table = read_table(path)
        name = name or (table.column("method")[0].as_py() if table.num_rows else path)
        if name in tables or name in methods:
            raise SystemExit(f"error: two scores are named {name!r}; name them with --scores NAME=PATH")
        tables[name] = (table, path)
    data = args.data
    if not data:
        recorded = {(table_config(t) or {}).get("data") for t, _ in tables.values()} - {None, ""}
        if len(recorded) != 1:
            raise SystemExit("error: --data is required (the score tables record no single dataset)")
        data = recorded.pop()
    if args.store:
        from cupid_engine.store import open_store

        store = open_store(args.store)
        if args.run and args.run not in store.runs():
            log.warning("run %r is not in %s (only its catalog is used)", args.run, args.store)
        catalog = store.catalog()
    else:
        from cupid_engine.data.sources import open_source

        catalog = open_source(data).catalog()
    train_ids = resolve_episodes(catalog, args.episodes, default="train")
    if args.holdout_targets is not None:
        if args.target is not None:
            raise SystemExit("error: give --target or --holdout-targets, not both")
        train_ids, target_ids = _holdout(catalog, train_ids, args.holdout_targets, args.target_tier, args.seed)
    else:
        target_ids = resolve_episodes(catalog, args.target, default="target")
    for name, (table, path) in tables.items():
        scored = set(table.column("episode_id").to_pylist())
        missing = [i for i in train_ids if i not in scored]
        if missing:
            raise SystemExit(f"error: {len(missing)} training episode(s) have no score in {path}, e.g. {missing[:3]}")
    train = _load(data, train_ids)
    target = _load(data, target_ids)
    policy_config = _policy_config(args, None)
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                               seed=args.seed)
    cache = args.cache
    if cache is None and methods:
        import os

        cache = os.path.join(args.workdir, "subsets")
    metric = None
    if args.metric == "success":
        if not args.task:
            raise SystemExit("error: --metric success needs --task")
        from cupid_engine.datamodels.metrics import sim_success_metric

        metric = sim_success_metric(args.task, episodes=args.metric_episodes, seed=args.seed)
    progress = not args.no_progress
    scores = {name: table for name, (table, _) in tables.items()}
    sources = {name: path for name, (_, path) in tables.items()}
    compare_info = None
    if methods:
        cfg = CompareConfig(checkpoints=args.checkpoints, k=args.k, datamodel_subsets=args.datamodel_subsets,
                            datamodel_estimator=args.datamodel_estimator, random_seed=args.seed)
        computed, compare_info = method_score_tables(methods, train, target, policy_config, train_config,
                                                     args.workdir, config=cfg, seed=args.seed, cache_dir=cache,
                                                     workers=args.workers, address=args.ray_address,
                                                     metric=metric, progress=progress)
        for name, table in computed.items():
            scores[name] = table
            sources[name] = f"{compare_info['folder']}/scores/{name}.parquet"
    subsets = measure_subsets(policy_config, train, target, train_config, num_subsets=args.subsets,
                              fraction=args.fraction, seed=args.seed, metric=metric, cache_dir=cache,
                              workers=args.workers, address=args.ray_address,
                              full_normalizer=not args.subset_normalizer, progress=progress)
    results = {name: subsets.evaluate(table, bootstrap=args.bootstrap, seed=args.seed)
               for name, table in scores.items()}
    reference = random_reference(subsets, args.random_seeds) if args.random_seeds > 0 else None
    seconds = time.perf_counter() - start
    print(format_lds_table(results))
    if reference is not None and reference["num_seeds"]:
        print(f"random score vectors, {reference['num_seeds']} seeds: LDS {reference['mean']:+.3f} ± "
              f"{reference['sd']:.3f} (95% of seeds in [{reference['q025']:+.3f}, {reference['q975']:+.3f}])")
    what = (f"{len(target_ids)} target demos (proxy -BC loss each)" if args.metric == "proxy"
            else f"rollout success rate on {args.task} ({args.metric_episodes} episodes)")
    print(f"{len(train_ids)} training demos, {what}, {args.subsets} subsets of "
          f"{args.fraction:g}: {subsets.info['trained']} trained now, {subsets.info['cached']} from the cache; "
          f"{seconds:.0f} s")
    summary = {
        "data": data, "store": args.store, "run": args.run, "metric": args.metric,
        "num_subsets": args.subsets, "fraction": args.fraction, "num_train": len(train_ids),
        "targets": subsets.targets if subsets.targets is not None else target_ids,
        "trained": subsets.info["trained"], "cached": subsets.info["cached"],
        "policy": policy_config.to_dict(), "train": train_config.to_dict(), "seconds": round(seconds, 1),
        "compare": compare_info, "random_reference": reference,
        "results": [{"method": name, "scores": sources[name],
                     **{k: v for k, v in r.to_dict().items() if k not in ("targets", "trained", "cached", "fraction",
                                                                          "num_train")}}
                    for name, r in results.items()],
    }
    if args.out:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0
