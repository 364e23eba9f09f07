"""``cupid-engine demo``: the whole loop on the built-in robosuite benchmark (small sizes)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end demo on the built-in Lift benchmark")
    p.add_argument("--out", default="demo_out", help="output folder (stages are cached there)")
    p.add_argument("--obs", default="state", choices=["state", "image"],
                   help="state: low-dim policy (make demo); image: 64x64 agentview frames, tiny diffusion-image "
                        "policy, image rollouts (DemoConfig.image); the options below override either preset")
    p.add_argument("--task", default=None, help="robosuite task (default lift)")
    p.add_argument("--demos-per-tier", type=int, default=None, help="default: state 20, image 6")
    p.add_argument("--rollouts", type=int, default=None, help="default: state 30, image 8")
    p.add_argument("--workers", type=int, default=None,
                   help="rollout workers (state: >1 starts local Ray; image: rendering processes, default 2)")
    p.add_argument("--policy", default=None, choices=["mlp", "diffusion", "diffusion-image"],
                   help="default: state mlp, image diffusion-image")
    p.add_argument("--policy-size", default=None, choices=["tiny", "default", "large"],
                   help="policy preset (default: state default, image tiny)")
    p.add_argument("--train-steps", type=int, default=None, help="default: state 3000, image 1000")
    p.add_argument("--k", type=int, default=None, help="projection dimension (default: state 1024, image 256)")
    p.add_argument("--output", default=None, choices=["energy", "loss", "logprob", "square"],
                   help="output function of the features (default: state energy, image square; see DemoConfig.output)")
    p.add_argument("--draws", type=int, default=None, help="noise draws per sample of diffusion outputs (image: 4)")
    p.add_argument("--image-size", type=int, default=None, help="--obs image: frame size in pixels (default 64)")
    p.add_argument("--cameras", default=None, help="--obs image: comma-separated robosuite cameras (default agentview)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    from cupid_engine.demo import DemoConfig, run_demo

    given = {
        "task": args.task,
        "demos_per_tier": args.demos_per_tier,
        "rollouts": args.rollouts,
        "workers": args.workers,
        "policy": args.policy,
        "policy_size": args.policy_size,
        "train_steps": args.train_steps,
        "k": args.k,
        "output": args.output,
        "draws": args.draws,
        "image_size": args.image_size,
        "cameras": tuple(c.strip() for c in args.cameras.split(",") if c.strip()) if args.cameras else None,
        "seed": args.seed,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.obs == "state" and ("image_size" in overrides or "cameras" in overrides):
        raise SystemExit("demo: --image-size and --cameras apply to --obs image only")
    cfg = DemoConfig.image(**overrides) if args.obs == "image" else DemoConfig(**overrides)
    run_demo(cfg, args.out)
    return 0
