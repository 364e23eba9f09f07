"""``cupid-engine train``: train an MLP or diffusion policy on a LeRobot dataset.

Owns only argument parsing and printing; the work is done by
:func:`cupid_engine.policies.training.train_policy` and
:func:`cupid_engine.policies.checkpoint.save_policy`, imported inside the handler so that
``cupid-engine --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command to the CLI dispatcher."""
    p = subparsers.add_parser(
        "train",
        help="train a policy (mlp or diffusion) by behaviour cloning",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="PATH", help="LeRobot dataset folder or fsspec URL")
    p.add_argument("--policy", required=True, choices=("mlp", "diffusion"), help="policy kind")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--split", default="train", help="train on episodes of this split ('all': every split)")
    p.add_argument("--obs-keys", default=None, metavar="K1,K2", help="observation keys (default: all, sorted)")
    p.add_argument("--size", default="default", choices=("tiny", "default", "large"),
                   help="model size preset (large: ~8.5M-param MLP; diffusion has tiny/default only)")
    p.add_argument("--head", default=None, choices=("deterministic", "gaussian"), help="MLP action head")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: TrainConfig's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: TrainConfig's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: TrainConfig's)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay of the weights (off by default)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and noise")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from cupid_engine.data.lerobot import open_dataset
    from cupid_engine.policies.checkpoint import compute_policy_hash, save_policy
    from cupid_engine.policies.diffusion import DiffusionPolicyConfig
    from cupid_engine.policies.mlp import MLPPolicyConfig
    from cupid_engine.policies.training import TrainConfig, train_policy

    dataset = open_dataset(args.data)
    obs_keys = tuple(k.strip() for k in args.obs_keys.split(",") if k.strip()) if args.obs_keys else None
    if obs_keys:
        unknown = sorted(set(obs_keys) - set(dataset.obs_keys))
        if unknown:
            raise SystemExit(f"error: unknown --obs-keys {unknown}; the dataset has {dataset.obs_keys}")
    fields: dict = {"obs_keys": obs_keys or tuple(dataset.obs_keys)}
    if args.policy == "mlp":
        if args.head:
            fields["head"] = args.head
        maker = {"tiny": MLPPolicyConfig.tiny, "default": MLPPolicyConfig, "large": MLPPolicyConfig.large}[args.size]
    else:
        if args.head:
            raise SystemExit("error: --head applies to --policy mlp only")
        if args.size == "large":
            raise SystemExit("error: --size large exists for --policy mlp only")
        maker = DiffusionPolicyConfig.tiny if args.size == "tiny" else DiffusionPolicyConfig
    policy_config = maker(**fields)

    overrides = {
        "epochs": args.epochs, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "ema_decay": args.ema_decay,
    }
    train_config = TrainConfig(
        seed=args.seed, device=args.device, **{k: v for k, v in overrides.items() if v is not None}
    )
    split = None if args.split == "all" else args.split
    episodes = list(dataset.episodes(split=split))
    if not episodes:
        raise SystemExit(f"error: no episodes of split {args.split!r} in {args.data}")
    policy = train_policy(policy_config, episodes, train_config, progress=not args.no_progress)
    path = save_policy(policy, args.out, overwrite=args.overwrite)
    info = policy.train_info
    print(json.dumps({
        "out": str(path),
        "policy": args.policy,
        "parameters": policy.num_parameters(),
        "episodes": len(episodes),
        "samples": info["num_samples"],
        "steps": info["steps"],
        "final_loss": info["step_losses"][-1],
        "content_hash": compute_policy_hash(policy),
    }, indent=2))
    return 0
