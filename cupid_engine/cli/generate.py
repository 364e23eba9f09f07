"""``cupid-engine generate``: scripted mixed-quality demonstrations as a dataset.

Owns argument parsing and progress output only; the work is done by
:func:`cupid_engine.sim.generate.generate_episodes` and
:func:`cupid_engine.data.lerobot.write_dataset` (both imported lazily so ``--help`` never
imports robosuite).
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` command to the CLI dispatcher."""
    p = subparsers.add_parser(
        "generate",
        help="generate scripted demonstrations with quality tiers (robosuite)",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, help="lift, can (PickPlaceCan) or square (NutAssemblySquare)")
    p.add_argument("--demos", type=int, default=None, help="total demonstrations, split evenly over the tiers")
    p.add_argument(
        "--demos-per-tier", type=int, default=None, help="demonstrations per tier (instead of --demos)"
    )
    p.add_argument("--tiers", default="better,okay,worse", help="comma-separated quality tiers")
    p.add_argument("--out", required=True, help="output dataset folder (LeRobot v3 layout)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the whole dataset")
    p.add_argument("--keep-failures", action="store_true", help="keep failed attempts (success=False)")
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KNOB=LO:HI",
        help="per-episode environment variation, repeatable: mass_scale, friction_scale, "
        "size_scale (lift only), placement_scale; e.g. --vary mass_scale=0.5:2",
    )
    p.add_argument("--horizon", type=int, default=None, help="step limit per episode (default per task)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cupid_engine.data.lerobot import write_dataset
    from cupid_engine.sim.generate import generate_episodes
    from cupid_engine.sim.tasks import CONTROL_FREQ, canonical_task, parse_variation

    tiers = tuple(t.strip() for t in args.tiers.split(",") if t.strip())
    if not tiers:
        raise SystemExit("generate: --tiers is empty")
    if (args.demos is None) == (args.demos_per_tier is None):
        raise SystemExit("generate: give exactly one of --demos and --demos-per-tier")
    if args.demos_per_tier is not None:
        per_tier = {t: args.demos_per_tier for t in tiers}
    else:
        base, extra = divmod(args.demos, len(tiers))
        # The remainder goes to the first tiers, so exactly --demos episodes are written.
        per_tier = {t: base + (i < extra) for i, t in enumerate(tiers)}
    try:
        task = canonical_task(args.task)
        variation = parse_variation(args.vary)
    except ValueError as e:
        raise SystemExit(f"generate: {e}") from None
    total = sum(per_tier.values())
    bar = tqdm(total=total, desc=f"generate {task}", unit="demo")
    n_success = 0

    def stream():
        nonlocal n_success
        for ep in generate_episodes(
            task,
            demos_per_tier=per_tier,
            tiers=tiers,
            seed=args.seed,
            keep_failures=args.keep_failures,
            horizon=args.horizon,
            variation=variation,
        ):
            n_success += bool(ep.success)
            bar.update(1)
            bar.set_postfix(tier=ep.tier, success=f"{n_success}/{bar.n}")
            yield ep

    try:
        out = write_dataset(args.out, stream(), fps=CONTROL_FREQ, overwrite=args.overwrite)
    finally:
        bar.close()
    logger.info("wrote %d episodes (%d successful) to %s", total, n_success, out)
    return 0
