"""``cupid-engine eval lds``: how well do scores predict retraining? (linear datamodeling score)

Trains one policy per random subset (a fixed fraction of the training demonstrations,
identical budget each), measures the proxy metric on every target demonstration, and
reports the Spearman correlation between the predicted metric (sum of the scores of the
episodes in the subset) and the measured one, per target and averaged, with a bootstrap
confidence interval. Trainings are cached (``--cache``), so an interrupted evaluation
resumes, and a later one with more subsets reuses the finished ones.

Heavy imports happen inside the handler so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` command family to the CLI dispatcher."""
    p = subparsers.add_parser("eval", help="evaluate scores (linear datamodeling score)", description=__doc__)
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    q = sub.add_parser("lds", help="linear datamodeling score of a score table", description=__doc__)
    q.add_argument("--store", required=True, help="gradient store whose catalog names the train/target episodes")
    q.add_argument("--run", required=True, help="run name the scores came from (recorded in the result)")
    q.add_argument("--scores", required=True, help="score table (Parquet) with episode_id and score")
    q.add_argument("--subsets", type=int, default=64, help="number of random subsets S (default 64)")
    q.add_argument("--fraction", type=float, default=0.5, help="fraction of training demos per subset (default 0.5)")
    q.add_argument("--data", help="dataset holding the episodes (default: the 'data' recorded in the score table)")
    q.add_argument("--episodes", default=None, help="training episodes: split(s) joined by '+' or ids (default train)")
    q.add_argument("--target", default=None, help="target demonstrations: a split or ids (default target)")
    q.add_argument("--policy", default="mlp", choices=("mlp", "diffusion"), help="policy kind (default mlp)")
    q.add_argument("--size", default="tiny", choices=("tiny", "default", "large"), help="size preset (default tiny)")
    q.add_argument("--policy-config", metavar="JSON", help="policy config file (to_dict JSON); overrides --policy/--size")
    q.add_argument("--steps", type=int, default=500, help="optimizer steps per training (default 500)")
    q.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    q.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    q.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd"), help="optimizer (default adam)")
    q.add_argument("--seed", type=int, default=0, help="seed of training and of the subsets (default 0)")
    q.add_argument("--workers", type=int, default=1, help="parallel trainings; > 1 uses Ray actors (default 1)")
    q.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local instance)")
    q.add_argument("--cache", default=None, help="cache folder of finished trainings (resume / reuse)")
    q.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CI (default 1000)")
    q.add_argument("--out", default=None, help="write the result as JSON here")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")
    q.set_defaults(handler=_lds)


def _policy_config(args: argparse.Namespace, obs_keys: tuple[str, ...] | None):
    from cupid_engine.policies.diffusion import DiffusionPolicyConfig
    from cupid_engine.policies.mlp import MLPPolicyConfig
    from cupid_engine.scorers.datamodel.scorer import make_policy_config

    if args.policy_config:
        with open(args.policy_config, encoding="utf-8") as f:
            data = json.load(f)
        classes = {c.__name__: c for c in (MLPPolicyConfig, DiffusionPolicyConfig)}
        name = data.get("__class__")
        if name not in classes:
            raise SystemExit(f"error: {args.policy_config}: '__class__' must be one of {sorted(classes)}, got {name!r}")
        return classes[name].from_dict(data)
    return make_policy_config(args.policy, args.size, obs_keys=obs_keys)


def _lds(args: argparse.Namespace) -> int:
    from cupid_engine.policies.training import TrainConfig
    from cupid_engine.scorers._inputs import resolve_episodes
    from cupid_engine.scorers.datamodel.lds import run_lds
    from cupid_engine.scorers.datamodel.scorer import _load
    from cupid_engine.scorers.table import read_table, table_config
    from cupid_engine.store import open_store

    store = open_store(args.store)
    if args.run not in store.runs():
        log.warning("run %r is not in %s (only its catalog is used)", args.run, args.store)
    catalog = store.catalog()
    train_ids = resolve_episodes(catalog, args.episodes, default="train")
    target_ids = resolve_episodes(catalog, args.target, default="target")
    table = read_table(args.scores)
    data = args.data or (table_config(table) or {}).get("data")
    if not data:
        raise SystemExit("error: --data is required (the score table records no dataset)")
    scored = set(table.column("episode_id").to_pylist())
    missing = [i for i in train_ids if i not in scored]
    if missing:
        raise SystemExit(f"error: {len(missing)} training episode(s) have no score in {args.scores}, e.g. {missing[:3]}")
    train = _load(data, train_ids)
    target = _load(data, target_ids)
    policy_config = _policy_config(args, None)
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                               seed=args.seed)
    result = run_lds(table, policy_config, train, target, train_config, num_subsets=args.subsets,
                     fraction=args.fraction, seed=args.seed, cache_dir=args.cache, workers=args.workers,
                     address=args.ray_address, bootstrap=args.bootstrap, progress=not args.no_progress)
    method = table.column("method")[0].as_py() if table.num_rows else None
    summary = {"method": method, "run": args.run, "scores": args.scores, **result.to_dict()}
    text = json.dumps(summary, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0
