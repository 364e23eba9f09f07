"""``cupid-engine demo``: the whole loop on the built-in robosuite benchmark (small sizes)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end demo on the built-in Lift benchmark")
    p.add_argument("--out", default="demo_out", help="output folder (stages are cached there)")
    p.add_argument("--task", default="lift")
    p.add_argument("--demos-per-tier", type=int, default=20)
    p.add_argument("--rollouts", type=int, default=30)
    p.add_argument("--workers", type=int, default=1, help="rollout workers (>1 starts local Ray)")
    p.add_argument("--policy", default="mlp", choices=["mlp", "diffusion"])
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--output", default="energy", choices=["energy", "loss", "logprob", "square"],
                   help="output function of the features (see DemoConfig.output)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    from cupid_engine.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        task=args.task,
        demos_per_tier=args.demos_per_tier,
        rollouts=args.rollouts,
        workers=args.workers,
        policy=args.policy,
        train_steps=args.train_steps,
        k=args.k,
        output=args.output,
        seed=args.seed,
    )
    run_demo(cfg, args.out)
    return 0
