"""Generate mixed-quality demonstration datasets from the scripted demonstrators.

Each demonstration is one episode of a :class:`~.demonstrators.ScriptedDemonstrator` in a
reused :class:`~.tasks.SimEnv`. Seeds are derived, never drawn: attempt ``a`` of tier
``t`` under base seed ``s`` has seed ``SeedSequence([s, t, a])``, so a dataset is a pure
function of its arguments and adding a tier never changes another tier's episodes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from cupid_engine.data.episode import Episode
from cupid_engine.sim.demonstrators import TIERS, DemoParams, make_demonstrator
from cupid_engine.sim.tasks import CONTROL_FREQ, SimEnv, Variation, canonical_task

logger = logging.getLogger(__name__)

DEFAULT_HORIZON = {"lift": 400, "can": 800, "square": 800}
"""Default episode step limit per task for demonstrations and rollouts."""

_TIER_INDEX = {"better": 0, "okay": 1, "worse": 2}


def attempt_seed(seed: int, tier: str, attempt: int) -> int:
    """The environment/demonstrator seed of one demonstration attempt (a 63-bit int)."""
    ss = np.random.SeedSequence([int(seed), _TIER_INDEX[tier], int(attempt)])
    return int(ss.generate_state(2, np.uint32).astype(np.uint64) @ np.array([1 << 31, 1], np.uint64))


def run_demo(
    env: SimEnv,
    tier_or_params: str | DemoParams,
    seed: int,
    *,
    horizon: int,
) -> tuple[dict[str, np.ndarray], np.ndarray, bool, float, dict]:
    """Run one scripted demonstration.

    Args:
        env: A reusable environment (it is reset here with ``seed``).
        tier_or_params: Tier name or explicit strategy parameters.
        seed: Episode seed: env reset and every demonstrator draw.
        horizon: Step limit.

    Returns:
        ``(observations, actions, success, reward_sum, info)``: observations key ->
        ``[T, d]``, actions ``[T, 7]``; the episode stops at the first successful step.
    """
    env_seed, demo_seed = np.random.SeedSequence(int(seed)).spawn(2)
    obs = env.reset(int(env_seed.generate_state(1)[0]))
    demo = make_demonstrator(env, tier_or_params, np.random.default_rng(demo_seed))
    keys = env.obs_keys
    rows: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    actions = []
    success, reward_sum = False, 0.0
    for _ in range(int(horizon)):
        action = demo.act(obs)
        for k in keys:
            rows[k].append(obs[k])
        actions.append(action.astype(np.float32))
        obs, reward, success = env.step(action)
        reward_sum += reward
        if success:
            break
    observations = {k: np.stack(v).astype(np.float32) for k, v in rows.items()}
    return observations, np.stack(actions), success, reward_sum, dict(demo.info)


def generate_episodes(
    task: str,
    *,
    demos_per_tier: Mapping[str, int] | int,
    tiers: Sequence[str] = ("better", "okay", "worse"),
    seed: int = 0,
    keep_failures: bool = False,
    variation: Variation | None = None,
    horizon: int | None = None,
    max_attempts_factor: float = 5.0,
    env: SimEnv | None = None,
) -> Iterator[Episode]:
    """Yield scripted demonstrations, tier by tier.

    Args:
        task: ``lift``, ``can`` or ``square`` (robosuite names accepted).
        demos_per_tier: Episodes to keep per tier (an int for every tier, or a mapping).
        tiers: Tiers to generate, in order (``better``, ``okay``, ``worse``).
        seed: Base seed of the whole dataset.
        keep_failures: Keep failed attempts too (then exactly ``demos_per_tier`` attempts
            are run per tier); otherwise attempts continue until that many succeed.
        variation: Per-episode environment knob ranges.
        horizon: Step limit per episode (default :data:`DEFAULT_HORIZON`).
        max_attempts_factor: Without ``keep_failures``, give up on a tier after
            ``factor · n + 10`` attempts.
        env: An existing environment of the same task to reuse (else one is built); it
            carries its own variation.

    Yields:
        Episodes with ids ``{task}_{tier}_{index:04d}``, split ``train``, source
        ``sim:{task}``, ``tier``, ``success``, ``return_`` (1.0/0.0) and metadata holding
        the seed, the strategy parameters, the demonstrator's draws and the env knobs.

    Raises:
        RuntimeError: When a tier cannot reach its count within the attempt budget.
    """
    task = canonical_task(task)
    horizon = int(horizon or DEFAULT_HORIZON[task])
    for t in tiers:
        if t not in TIERS:
            raise ValueError(f"unknown tier {t!r}; expected one of {tuple(TIERS)}")
    counts = (
        {t: int(demos_per_tier) for t in tiers}
        if isinstance(demos_per_tier, int)
        else {t: int(demos_per_tier.get(t, 0)) for t in tiers}
    )
    if env is None:
        env = SimEnv(task, variation=variation, horizon=horizon)
    elif env.task != task:
        raise ValueError(f"env is for task {env.task!r}, not {task!r}")
    elif variation is not None:
        raise ValueError("pass variation to the SimEnv given as env, not to generate_episodes")
    for tier in tiers:
        n = counts[tier]
        kept, attempt = 0, 0
        max_attempts = n if keep_failures else int(max_attempts_factor * n) + 10
        while kept < n:
            if attempt >= max_attempts:
                raise RuntimeError(
                    f"{task}/{tier}: only {kept} of {attempt} attempts succeeded; "
                    f"could not collect {n} demonstrations"
                )
            ep_seed = attempt_seed(seed, tier, attempt)
            obs, actions, success, reward_sum, info = run_demo(env, tier, ep_seed, horizon=horizon)
            attempt += 1
            if not success and not keep_failures:
                logger.debug("%s/%s attempt %d failed", task, tier, attempt - 1)
                continue
            yield Episode(
                episode_id=f"{task}_{tier}_{kept:04d}",
                observations=obs,
                actions=actions,
                split="train",
                source=f"sim:{task}",
                task=task,
                success=bool(success),
                return_=1.0 if success else 0.0,
                tier=tier,
                metadata={
                    "seed": int(seed),
                    "attempt": attempt - 1,
                    "episode_seed": ep_seed,
                    "fps": CONTROL_FREQ,
                    "controller": "BASIC",
                    "obs_keys": list(env.obs_keys),
                    "strategy": TIERS[tier].to_dict(),
                    "demonstrator": info,
                    "env_knobs": dict(env.knobs),
                    "reward_sum": float(reward_sum),
                },
            )
            kept += 1
