"""``cupid-engine generate``: scripted mixed-quality demonstrations as a dataset.

``--scenario NAME`` instead generates a known-answer scenario
(:mod:`cupid_engine.sim.scenarios`, e.g. ``lift-grasp``): two scripted strategies mixed
2:1, the ground-truth label in each episode's metadata (``scenario_label``), to be rolled
out under the scenario's shift with ``cupid-engine rollout --shift NAME``. ``lift-cue``
(the spurious-correlate type) mixes three context subsets 1/2 : 1/6 : 1/3 instead, each
demo's context (``context`` metadata) and cue observations recorded with it.

Owns argument parsing and progress output only; the work is done by
:func:`cupid_engine.sim.generate.generate_episodes` and
:func:`cupid_engine.data.lerobot.write_dataset` (both imported lazily so ``--help`` never
imports robosuite).
"""

from __future__ import annotations

import argparse
import logging

from cupid_engine.cli._sim_args import add_task_arguments

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` command to the CLI dispatcher."""
    p = subparsers.add_parser(
        "generate",
        help="generate scripted demonstrations with quality tiers (robosuite)",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_task_arguments(p)
    p.add_argument(
        "--scenario",
        default=None,
        help="known-answer scenario instead of tiers (brittle strategies: lift-grasp, lift-sweep, lift-carry; "
        "spurious correlate: lift-cue); needs --demos",
    )
    p.add_argument("--demos", type=int, default=None, help="total demonstrations, split evenly over the tiers")
    p.add_argument(
        "--demos-per-tier", type=int, default=None, help="demonstrations per tier (instead of --demos)"
    )
    p.add_argument("--tiers", default="better,okay,worse", help="comma-separated quality tiers")
    p.add_argument("--out", required=True, help="output dataset folder (LeRobot v3 layout)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the whole dataset")
    p.add_argument("--keep-failures", action="store_true", help="keep failed attempts (success=False)")
    p.add_argument(
        "--obs",
        default="state",
        choices=("state", "image"),
        help="image: also render camera images (offscreen, CPU, MUJOCO_GL=egl) by replaying the recorded "
        "states in --render-workers processes; the low-dimensional state is kept beside them",
    )
    p.add_argument("--cameras", default="agentview,robot0_eye_in_hand", help="--obs image: robosuite camera names")
    p.add_argument("--image-size", type=int, default=84, help="--obs image: image height and width in pixels")
    p.add_argument("--render-workers", type=int, default=2, help="--obs image: rendering processes")
    p.add_argument(
        "--image-format",
        default="png",
        choices=("png", "video"),
        help="--obs image: PNG frames in the Parquet files (lossless) or MP4 video per camera (H.264, lossy)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cupid_engine.data.lerobot import write_dataset
    from cupid_engine.sim.generate import generate_episodes
    from cupid_engine.sim.tasks import CONTROL_FREQ, canonical_task, parse_variation

    if args.scenario is not None:
        if args.obs != "state":
            raise SystemExit("generate --scenario: --obs image is not available for scenarios yet (use --task)")
        return _generate_scenario(args)
    if args.task is None:
        raise SystemExit("generate: give --task (or --scenario)")
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
    make = generate_episodes
    if args.obs == "image":
        import functools

        from cupid_engine.sim.render import check_egl, generate_image_episodes

        check_egl()  # one line naming the Debian packages when Mesa's EGL is missing
        cameras = tuple(c.strip() for c in args.cameras.split(",") if c.strip())
        make = functools.partial(
            generate_image_episodes, cameras=cameras, size=args.image_size, workers=args.render_workers
        )

    def stream():
        nonlocal n_success
        for ep in make(
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
        out = write_dataset(
            args.out, stream(), fps=CONTROL_FREQ, overwrite=args.overwrite, image_format=args.image_format
        )
    finally:
        bar.close()
    logger.info("wrote %d episodes (%d successful) to %s", total, n_success, out)
    return 0


def _generate_scenario(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cupid_engine.data.lerobot import write_dataset
    from cupid_engine.sim.scenarios import LABEL_KEY, generate_scenario, get_scenario
    from cupid_engine.sim.tasks import CONTROL_FREQ

    try:
        sc = get_scenario(args.scenario)
    except ValueError as e:
        raise SystemExit(f"generate: {e}") from None
    if args.demos is None or args.demos_per_tier is not None:
        raise SystemExit("generate --scenario: give --demos (total; split by the scenario's ratio)")
    ignored = [
        name
        for name, given in (
            ("--task", args.task is not None and args.task != sc.task),
            ("--vary", bool(args.vary)),
            ("--horizon", args.horizon is not None and args.horizon != sc.horizon),
            ("--keep-failures", args.keep_failures),
        )
        if given
    ]
    if ignored:
        raise SystemExit(
            f"generate --scenario {sc.name}: {', '.join(ignored)} cannot be combined with a scenario "
            f"(task {sc.task}, horizon {sc.horizon}, no variation at training time)"
        )
    bar = tqdm(total=args.demos, desc=f"generate {sc.name}", unit="demo")
    labels: dict[str, int] = {}

    def stream():
        for ep in generate_scenario(sc.name, demos=args.demos, seed=args.seed):
            lab = ep.metadata[LABEL_KEY]
            labels[lab] = labels.get(lab, 0) + 1
            bar.update(1)
            yield ep

    try:
        out = write_dataset(args.out, stream(), fps=CONTROL_FREQ, overwrite=args.overwrite)
    finally:
        bar.close()
    print(
        f"{args.demos} demonstrations of scenario {sc.name} ({labels}) -> {out}; "
        f"roll out under the shift with: cupid-engine rollout --shift {sc.shift} --scenario {sc.name} ..."
        + (f" (the policy must read the context cue keys {list(sc.obs_keys[-2:])}: train on all observation keys)"
           if sc.contexts else "")
    )
    return 0
