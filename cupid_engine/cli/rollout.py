"""``cupid-engine rollout``: roll a trained policy out in robosuite, with success labels.

Owns argument parsing and progress output only; the work is done by
:func:`cupid_engine.sim.rollout.run_rollouts` (on Ray actors when ``--workers`` > 1) and
the result is written by :func:`cupid_engine.data.lerobot.write_dataset` as split
``rollout``. Heavy imports happen inside the handler.

Known-answer scenarios (:mod:`cupid_engine.sim.scenarios`): ``--scenario NAME`` takes the
task, the fixed horizon and the success criterion (``final``: judged at the last step) from
the scenario; ``--shift NAME`` applies a rollout-time physical shift (``heavy``, or a
scenario name for that scenario's shift). A spurious-correlate scenario (``lift-cue``) rolls
out in its own context environment (the cue observations its policies read): without
``--shift`` in the training mixture of contexts, with ``--shift white-mixed`` (or
``--shift lift-cue``, which implies ``--scenario lift-cue``) under its context shift; each
rollout's context is in its ``env_knobs`` metadata. Rollouts run to the horizon unless
``--success first`` (the default for plain tasks) asks to stop at the first success.

``--env package.module:factory`` rolls out in your own environment: the factory takes no
arguments and returns an object with ``obs_keys``, ``reset(seed) -> obs dict`` and
``step(action) -> (obs dict, reward, success)`` (the full protocol is in
:mod:`cupid_engine.sim.rollout`); give ``--horizon`` and ``--success any|final|first``.
"""

from __future__ import annotations

import argparse
import logging

from cupid_engine.cli._sim_args import add_task_arguments

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``rollout`` command to the CLI dispatcher."""
    p = subparsers.add_parser(
        "rollout",
        help="roll a policy out in simulation and store the episodes",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--policy", required=True, help="policy checkpoint folder (cupid-engine train --out)")
    add_task_arguments(p)
    p.add_argument("--env", default=None, metavar="MODULE:FACTORY", help="your own environment (see description)")
    p.add_argument("--scenario", default=None, help="known-answer scenario: task, horizon and success criterion")
    p.add_argument("--shift", default=None, help="rollout-time shift: heavy (cube mass x40), white-mixed (lift-cue's context shift) or a scenario name")
    p.add_argument(
        "--success",
        choices=("first", "any", "final"),
        default=None,
        help="first: stop at the first successful step; any/final: run to the horizon and judge any step / "
        "the last step (default: first for tasks, the scenario's criterion for --scenario)",
    )
    p.add_argument("--episodes", type=int, required=True, help="number of rollouts")
    p.add_argument("--workers", type=int, default=1, help="parallel Ray actors (1 = in-process)")
    p.add_argument("--out", required=True, help="output dataset folder (LeRobot v3 layout)")
    p.add_argument("--seed", type=int, default=0, help="base seed; rollout i depends only on (seed, i)")
    p.add_argument(
        "--repeats", type=int, default=1, metavar="R",
        help="policy draws per initial state: rollout i starts from initial state i // R with draw i %% R "
        "(--episodes a multiple of R); R >= 2 enables score cupid --set baseline=initial-state",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of a local instance")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.set_defaults(handler=_rollout)


def _rollout(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cupid_engine.data.lerobot import write_dataset
    from cupid_engine.distributed import executor_for
    from cupid_engine.sim.rollout import run_rollouts
    from cupid_engine.sim.tasks import CONTROL_FREQ, canonical_task, parse_variation

    from cupid_engine.sim.scenarios import get_scenario, get_shift, rollout_options, scenario_of_shift

    if args.episodes < 1:
        raise SystemExit("rollout: --episodes must be >= 1")
    if args.repeats < 1 or args.episodes % args.repeats:
        raise SystemExit(f"rollout: --repeats must be >= 1 and divide --episodes ({args.episodes}), got {args.repeats}")
    horizon, success_mode = args.horizon, args.success or "first"
    user_env, context = args.env, False
    try:
        context_sc = scenario_of_shift(args.shift) if args.shift is not None else None
        if args.scenario is None and context_sc is not None and args.env is None:
            args.scenario = context_sc.name  # a context shift needs its scenario's cue observations
        if args.scenario is not None and get_scenario(args.scenario).contexts:
            sc = get_scenario(args.scenario)
            if args.task is not None and canonical_task(args.task) != sc.task:
                raise ValueError(f"--task {args.task} contradicts scenario {sc.name} (task {sc.task})")
            if args.env is not None or args.vary:
                raise ValueError(f"scenario {sc.name} sets the episode context itself: --env/--vary cannot be combined")
            if args.shift is not None and scenario_of_shift(args.shift) is not sc:
                raise ValueError(f"scenario {sc.name} takes its own shift ({sc.shift} or {sc.name}), got {args.shift!r}")
            opts = rollout_options(sc.name, shifted=args.shift is not None)
            task, user_env, context = sc.task, opts["env"], True
            horizon, success_mode = horizon or opts["horizon"], args.success or opts["success_mode"]
            variation = None
        elif args.scenario is not None:
            sc = get_scenario(args.scenario)
            if args.task is not None and canonical_task(args.task) != sc.task:
                raise ValueError(f"--task {args.task} contradicts scenario {sc.name} (task {sc.task})")
            task, horizon, success_mode = sc.task, horizon or sc.horizon, args.success or sc.success_mode
        elif args.env is not None:
            if args.shift is not None or args.vary:
                raise ValueError("--shift/--vary apply to built-in tasks; configure your own env in its factory")
            if args.horizon is None:
                raise ValueError("--env needs --horizon")
            task = args.task or args.env.partition(":")[2]
        elif args.task is None:
            raise ValueError("give --task, --scenario or --env")
        else:
            task = canonical_task(args.task)
        if not context:  # physics shifts and --vary (a context scenario sets its own)
            variation = parse_variation(args.vary)
            if args.shift is not None:
                if variation is not None:
                    raise ValueError("--shift and --vary cannot be combined (both set the physics knobs)")
                variation = get_shift(args.shift)
        executor = executor_for(args.workers, args.ray_address)
    except ValueError as e:
        raise SystemExit(f"rollout: {e}") from None
    bar = tqdm(total=args.episodes, desc=f"rollout {task}", unit="ep")
    n_success = 0

    def tick(ep) -> None:
        nonlocal n_success
        n_success += bool(ep.success)
        bar.update(1)
        bar.set_postfix(success=f"{n_success}/{bar.n}")

    try:
        episodes = run_rollouts(
            args.policy,
            task,
            episodes=args.episodes,
            seed=args.seed,
            executor=executor,
            horizon=horizon,
            success_mode=success_mode,
            env=user_env,
            variation=variation,
            progress=tick,
            repeats=args.repeats,
        )
    finally:
        bar.close()
    out = write_dataset(args.out, episodes, fps=CONTROL_FREQ, overwrite=args.overwrite)
    rate = n_success / max(len(episodes), 1)
    print(f"{len(episodes)} rollouts, success rate {rate:.3f} ({n_success}/{len(episodes)}) -> {out}")
    return 0
