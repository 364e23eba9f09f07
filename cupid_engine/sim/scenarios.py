"""Scenarios with a known answer: which demonstrations make the robot fail under a shift.

A *brittle-strategy* scenario (the CUPID paper's "TuckBox" type, §6.2 and appendix A)
mixes two scripted strategies 2:1. Both succeed at training conditions; under a physical
shift applied only at rollout time the majority strategy fails and the minority keeps
working. A curation method that links failures to the demonstrations behind them should
rank the majority demonstrations lowest. The ground truth (which strategy each
demonstration used) is written to the episode metadata (``scenario``, ``scenario_label``
= ``majority``/``minority``, ``strategy_name``) and to nothing a featuriser or scorer
reads: episodes carry no tier, every episode has the same length (the scenario horizon;
the demonstrator holds its final pose until then), and success is judged at the final
step, so neither length nor ``success`` reveals the strategy.

Scenarios (all on robosuite Lift, the cheapest task, ≈150–220 steps/s):

===============  ================================================================  =========
scenario         strategies (majority 2 : minority 1)                              shift
===============  ================================================================  =========
``lift-grasp``   identical approach, lift and hold; they differ only in the final   ``heavy``
                 centimetres of the descent: the majority closes the fingers 1.6 cm
                 above the cube centre (a shallow grasp of the cube's top edge), the
                 minority at the centre. Short-phase difference.
``lift-sweep``   differ over most of the episode: the majority hovers 12 cm above   ``heavy``
                 the cube, grasps shallow and carries the cube in a fast
                 side-to-side sweep (±6 cm) until the end; the minority hovers
                 8 cm above, grasps at the centre, lifts slowly and holds still.
                 (A side approach was tried first: it knocked the cube in 55% of
                 unshifted episodes, so it was dropped.)
``lift-carry``   ``lift-sweep``'s strategies with a lighter shift, so that a        ``heavy30``
                 *learned* centre grasp holds the cube (``lift-sweep``'s learned
                 oracle drops the ×40 cube): the majority grasps 1.8 cm above the
                 centre (``lift-sweep``: 1.6 cm; at 1.6 cm no mass up to × 30
                 broke the sweep carry often enough), the rest is as
                 ``lift-sweep``. The sweep's speed and width did not matter in
                 the scripted scans (docs/fidelity.md §2d): grasp depth against
                 mass decides.
===============  ================================================================  =========

A *spurious-correlate* scenario (the paper's "Bookshelf" type, §6.3 and appendix A)
adds an episode *context*: a causal variable C that decides which strategy works, seen by
the policy only through a weak, noisy cue, and a spurious variable B, seen cleanly, that
co-occurs with C in the demonstrations but carries no causal weight:

===============  ================================================================  ===============
scenario         subsets (shares of the demonstrations)                            shift
===============  ================================================================  ===============
``lift-cue``     (a) 1/2 light cube, WHITE background, shallow grasp (known-bad);  ``white-mixed``
                 (b) 1/6 heavy cube, white, centre grasp; (c) 1/3 heavy, DARK,
                 centre grasp. Demos of each subset run under their own physics.
===============  ================================================================  ===============

Context: the cube is light (stock mass) or heavy (mass × 40, the ``heavy`` shift's
physics). The observation gains two keys (:data:`CONTEXT_OBS_KEYS`): ``context_weight`` =
1 (heavy) / 0 (light) plus a per-episode Gaussian offset of std ``cue_noise`` (a badly
calibrated load sensor: constant within the episode, so it carries a fixed, small amount of
information), and ``context_background`` = 1 (white) / 0 (dark), clean. In the demos the
background predicts the grasp (white: 3 shallow to 1 centre; dark: centre only) better
than the noisy weight does. Shift ``white-mixed`` (rollout only): background always white,
cube heavy with probability 1/2 per episode (drawn from the episode seed). A policy that
follows the background grasps shallow under white and drops the heavy cube; removing the
(a) demos leaves only centre grasps, which hold light and heavy cubes alike (the paper's
oracle: remove the horizontal pulls with a white background). The context of every demo
and rollout is recorded in its metadata (``context`` for demos, ``env_knobs`` for
rollouts: ``context_heavy``, ``context_white``), never in anything a featuriser reads
besides the two cue keys the policy is meant to see.

Shift ``heavy``: cube mass × 40 (0.07 kg → ≈2.8 kg), applied only at rollout time
(``cupid-engine rollout --shift heavy``). A shallow grasp holds a 70 g cube but not a
2.8 kg one; a centre grasp holds both. (Friction changes do not separate the strategies
on Lift: MuJoCo takes the larger friction of a contact pair, and the Panda finger pads'
friction, 2.0, dominates the cube's.)

Shift ``heavy30``: cube mass × 30 (≈2.1 kg), ``lift-carry``'s shift: the lightest scanned
mass at which its majority meets the ≤ 20% target (× 25: 10/40 succeed).

Measured scripted success (``docs/fidelity.md``, :func:`scripted_success`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from cupid_engine.config import Config, check, field
from cupid_engine.sim.tasks import ACTION_DIM, CONTROL_FREQ, SimEnv, Variation, obs_keys

LABEL_KEY = "scenario_label"
"""Episode-metadata key of the ground-truth label (``majority`` / ``minority``)."""

SUCCESS_MODES = ("first", "any", "final")
"""How an episode's success is judged: ``first`` stops at the first successful step (the
built-in tasks' default); ``any`` runs to the horizon and succeeds if any step did;
``final`` runs to the horizon and takes the last step's success."""


@dataclasses.dataclass(frozen=True)
class LiftStrategy(Config):
    """One scripted way of lifting the cube (a phase machine: hover, descend, close, lift)."""

    hover_offset: tuple[float, float, float] = field(
        (0.0, 0.0, 0.08), help="hover waypoint relative to the cube centre, metres"
    )
    grasp_dz: float = field(0.0, help="height of the grasp point above the cube centre, metres")
    close_steps: int = field(12, help="steps the gripper closes in place before lifting")
    lift_height: float = field(0.15, help="lift target above the grasp height, metres")
    lift_speed: float = field(1.0, help="max |action| per axis while lifting (1.0 = 5 cm/step)")
    sweep_amp: float = field(0.0, help="amplitude (m) of a side-to-side y sweep while carrying")
    sweep_period: int = field(16, help="period (steps) of the carrying sweep")
    noise_std: float = field(0.02, help="std of Gaussian noise on the position actions")

    def __post_init__(self) -> None:
        object.__setattr__(self, "hover_offset", tuple(float(v) for v in self.hover_offset))
        check(len(self.hover_offset) == 3, "hover_offset must have 3 entries")
        check(self.close_steps >= 1, "close_steps must be >= 1")
        check(0 < self.lift_speed <= 1, "lift_speed must be in (0, 1]")
        check(self.sweep_amp >= 0 and self.sweep_period >= 2, "sweep_amp >= 0 and sweep_period >= 2")
        check(self.noise_std >= 0, "noise_std must be >= 0")


class LiftStrategyDemonstrator:
    """Stateful scripted demonstrator of one :class:`LiftStrategy` on Lift.

    Args:
        strategy: The strategy.
        rng: Source of the action noise.
    """

    def __init__(self, strategy: LiftStrategy, rng: np.random.Generator):
        self.s = strategy
        self.rng = rng
        self.phase = "hover"
        self._t = 0
        self._grip = -1.0
        self._z0: float | None = None
        self._y0: float | None = None
        self.phases: list[str] = []

    def _goto(self, eef: np.ndarray, target: np.ndarray, speed: float = 1.0) -> np.ndarray:
        return np.clip(10.0 * (target - eef), -speed, speed)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One ``[7]`` action for ``obs`` (advances the phase machine)."""
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        cube = np.asarray(obs["cube_pos"], np.float64)
        a = np.zeros(ACTION_DIM)
        self._t += 1
        self.phases.append(self.phase)
        s = self.s
        if self.phase == "hover":
            tgt = cube + np.asarray(s.hover_offset)
            a[:3] = self._goto(eef, tgt)
            if np.linalg.norm(tgt - eef) < 0.015 or self._t > 40:
                self.phase, self._t = "descend", 0
        elif self.phase == "descend":
            tgt = cube + np.array([0.0, 0.0, s.grasp_dz])
            a[:3] = self._goto(eef, tgt)
            if np.linalg.norm(tgt - eef) < 0.006 or self._t > 30:
                self.phase, self._t = "close", 0
        elif self.phase == "close":
            self._grip = 1.0
            if self._t >= s.close_steps:
                self.phase, self._t = "lift", 0
                self._z0, self._y0 = float(eef[2]), float(eef[1])
        else:  # lift, then carry/hold until the horizon
            tgt = np.array([eef[0], eef[1], self._z0 + s.lift_height])
            if s.sweep_amp > 0:
                tgt[1] = self._y0 + s.sweep_amp * math.sin(2 * math.pi * self._t / s.sweep_period)
            a[:3] = self._goto(eef, tgt, s.lift_speed)
        if s.noise_std > 0:
            a[:3] += self.rng.normal(scale=s.noise_std, size=3)
        a[6] = self._grip
        return np.clip(a, -1.0, 1.0)


CONTEXT_OBS_KEYS = ("context_weight", "context_background")
"""Observation keys a context scenario adds (each ``[1]``): the noisy weight cue and the
clean background cue."""


@dataclasses.dataclass(frozen=True)
class Context(Config):
    """One episode context of a spurious-correlate scenario."""

    heavy: bool = field(False, help="cube mass x HEAVY_MASS (the causal variable)")
    white: bool = field(True, help="white (True) or dark (False) background (the spurious cue)")


@dataclasses.dataclass(frozen=True)
class ContextShift(Config):
    """Rollout-time context distribution: cube heavy with probability ``p_heavy``, the
    background fixed."""

    p_heavy: float = field(0.5, help="probability that an episode's cube is heavy")
    white: bool = field(True, help="background of every episode")

    def __post_init__(self) -> None:
        check(0.0 <= self.p_heavy <= 1.0, "p_heavy must be in [0, 1]")

    def mix(self) -> tuple[tuple[float, Context], ...]:
        """``(weight, context)`` components (weights sum to 1)."""
        return ((1.0 - self.p_heavy, Context(heavy=False, white=self.white)),
                (self.p_heavy, Context(heavy=True, white=self.white)))


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A known-answer curation scenario.

    Attributes:
        name: Scenario name (``cupid-engine generate --scenario NAME``).
        task: Simulator task.
        kind: ``brittle`` (a majority strategy fails under the shift).
        description: One line for reports.
        strategies: Label -> strategy (labels ``majority``, ``minority``).
        ratio: Label -> share of the demonstrations.
        shift: Name of the rollout-time shift (:data:`SHIFTS`).
        known_bad: Label of the demonstrations a method should rank lowest.
        horizon: Fixed episode length (demos and rollouts).
        success_mode: One of :data:`SUCCESS_MODES`.
        contexts: Spurious-correlate scenarios only: label -> the :class:`Context` its
            demonstrations run in (None: no context, no cue keys).
        cue_noise: Std of the per-episode Gaussian offset on ``context_weight``.
    """

    name: str
    task: str
    kind: str
    description: str
    strategies: dict[str, LiftStrategy]
    ratio: dict[str, float]
    shift: str
    known_bad: str
    horizon: int
    success_mode: str = "final"
    contexts: dict[str, Context] | None = None
    cue_noise: float = 0.0

    @property
    def obs_keys(self) -> tuple[str, ...]:
        """Ordered observation keys of the scenario's episodes (and policies): the task's
        fixed vector, plus :data:`CONTEXT_OBS_KEYS` when the scenario has contexts."""
        return obs_keys(self.task) + (CONTEXT_OBS_KEYS if self.contexts else ())

    def counts(self, n: int) -> dict[str, int]:
        """Demonstrations per label for ``n`` in total (rounded, summing to ``n``)."""
        labels = list(self.ratio)
        out = {lab: int(math.floor(n * self.ratio[lab] + 1e-9)) for lab in labels}
        out[labels[0]] += n - sum(out.values())
        return out


SHIFTS: dict[str, Variation] = {
    "heavy": Variation(mass_scale=(40.0, 40.0)),
    "heavy30": Variation(mass_scale=(30.0, 30.0)),
}
"""Rollout-time shifts by name (``cupid-engine rollout --shift NAME``)."""

CONTEXT_SHIFTS: dict[str, ContextShift] = {
    "white-mixed": ContextShift(p_heavy=0.5, white=True),
}
"""Rollout-time context shifts of the spurious-correlate scenarios by name: they change
the episode's context (and so its cue observations), not a physics knob range."""

HEAVY_MASS = 40.0
"""Mass multiplier of a heavy context (the ``heavy`` shift's physics)."""

_SHALLOW = 0.016
# lift-carry's majority: at 1.6 cm the sweep carry still held 13/20 at mass x25 and 7/20 at x30;
# at 1.8 cm it holds 5/40 at x30 and still succeeds unshifted 39/40 (2.0 cm does not: 2/10).
_SHALLOWER = 0.018


def _sweep_pair(grasp_dz: float) -> dict[str, LiftStrategy]:
    """The long-phase pair of ``lift-sweep``/``lift-carry``: a high hover, a grasp ``grasp_dz``
    above the centre and a fast ±6 cm side-to-side carry (majority) against a low hover, a centre
    grasp and a slow lift held still (minority)."""
    return {
        "majority": LiftStrategy(hover_offset=(0.0, 0.0, 0.12), grasp_dz=grasp_dz, lift_speed=1.0, sweep_amp=0.06),
        "minority": LiftStrategy(hover_offset=(0.0, 0.0, 0.08), grasp_dz=0.0, lift_speed=0.3),
    }


SCENARIOS: dict[str, Scenario] = {
    "lift-grasp": Scenario(
        name="lift-grasp",
        task="lift",
        kind="brittle",
        description="2:1 shallow (majority) vs centre (minority) grasp; identical approach/lift; shift: cube mass x40",
        strategies={
            "majority": LiftStrategy(grasp_dz=_SHALLOW),
            "minority": LiftStrategy(grasp_dz=0.0),
        },
        ratio={"majority": 2 / 3, "minority": 1 / 3},
        shift="heavy",
        known_bad="majority",
        horizon=100,
    ),
    "lift-sweep": Scenario(
        name="lift-sweep",
        task="lift",
        kind="brittle",
        description="2:1 high hover + shallow grasp + fast side-to-side carry (majority) vs low hover + centre "
        "grasp + slow lift, held still (minority); shift: cube mass x40",
        strategies=_sweep_pair(_SHALLOW),
        ratio={"majority": 2 / 3, "minority": 1 / 3},
        shift="heavy",
        known_bad="majority",
        horizon=100,
    ),
    "lift-carry": Scenario(
        name="lift-carry",
        task="lift",
        kind="brittle",
        description="2:1 high hover + shallower (1.8 cm) grasp + fast side-to-side carry (majority) vs low hover + "
        "centre grasp + slow lift, held still (minority); shift: cube mass x30",
        strategies=_sweep_pair(_SHALLOWER),
        ratio={"majority": 2 / 3, "minority": 1 / 3},
        shift="heavy30",
        known_bad="majority",
        horizon=100,
    ),
    "lift-cue": Scenario(
        name="lift-cue",
        task="lift",
        kind="spurious",
        description="Bookshelf type: 1/2 light cube + white background + shallow grasp (known-bad), 1/6 heavy + "
        "white + centre grasp, 1/3 heavy + dark + centre grasp; weight cue noisy (std 1), background cue clean; "
        "shift: background always white, cube heavy (mass x40) with p = 1/2",
        strategies={
            "light-white": LiftStrategy(grasp_dz=_SHALLOW),
            "heavy-white": LiftStrategy(grasp_dz=0.0),
            "heavy-dark": LiftStrategy(grasp_dz=0.0),
        },
        ratio={"light-white": 1 / 2, "heavy-white": 1 / 6, "heavy-dark": 1 / 3},
        shift="white-mixed",
        known_bad="light-white",
        horizon=100,
        contexts={
            "light-white": Context(heavy=False, white=True),
            "heavy-white": Context(heavy=True, white=True),
            "heavy-dark": Context(heavy=True, white=False),
        },
        cue_noise=1.0,
    ),
}
"""Built-in known-answer scenarios by name."""


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
    """
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {sorted(SCENARIOS)}")
    return SCENARIOS[name]


def get_shift(name: str) -> Variation:
    """The rollout-time variation of shift ``name`` (or of scenario ``name``'s shift).

    Raises:
        ValueError: For an unknown name, or a context shift (those change the episode's
            context, not a knob range: roll out with :func:`rollout_options`).
    """
    if name in SCENARIOS:
        name = SCENARIOS[name].shift
    if name in CONTEXT_SHIFTS:
        owner = [sc.name for sc in SCENARIOS.values() if sc.shift == name]
        raise ValueError(
            f"shift {name!r} is a context shift of scenario {', '.join(owner) or '?'}: it sets the episode's context "
            "and cue observations, not a physics knob; roll out with the scenario (rollout --scenario NAME --shift "
            "NAME; in Python: sim.scenarios.rollout_options)"
        )
    if name not in SHIFTS:
        raise ValueError(
            f"unknown shift {name!r}; expected one of {sorted(SHIFTS) + sorted(CONTEXT_SHIFTS)} or a scenario name"
        )
    return SHIFTS[name]


def scenario_of_shift(name: str) -> Scenario | None:
    """The context scenario whose shift is ``name`` (a shift or scenario name), else None."""
    if name in SCENARIOS:
        return SCENARIOS[name] if SCENARIOS[name].contexts else None
    for sc in SCENARIOS.values():
        if sc.contexts and sc.shift == name:
            return sc
    return None


class ContextEnv:
    """A task environment with an episode context (the user-env protocol of
    :mod:`cupid_engine.sim.rollout`, so ``run_rollouts(..., env=factory)`` runs it).

    Each :meth:`reset` draws the context from the episode seed (component ``i`` of ``mix``
    with probability ``weight_i``), sets the cube mass (× :data:`HEAVY_MASS` when heavy),
    and adds :data:`CONTEXT_OBS_KEYS` to every observation: ``context_weight`` = heavy + a
    per-episode ``N(0, cue_noise²)`` offset, ``context_background`` = 1 white / 0 dark.

    Args:
        task: Task name.
        mix: ``(weight, Context)`` components; weights ≥ 0, summing to 1.
        cue_noise: Std of the weight cue's offset.
        horizon: Step limit of the inner :class:`SimEnv` (when built here).
        sim: A :class:`SimEnv` to wrap (its variation is restored by :meth:`close`);
            None builds one.

    Attributes:
        context: The :class:`Context` of the current episode.
        knobs: The inner env's knobs plus ``context_heavy``, ``context_white`` and
            ``context_weight_cue`` (rollouts store them in ``env_knobs``).
    """

    action_dim = ACTION_DIM

    def __init__(
        self,
        task: str,
        mix: tuple[tuple[float, Context], ...],
        *,
        cue_noise: float,
        horizon: int = 1000,
        sim: SimEnv | None = None,
    ):
        self.mix = tuple((float(w), c) for w, c in mix)
        weights = np.array([w for w, _ in self.mix])
        if not self.mix or np.any(weights < 0) or abs(weights.sum() - 1.0) > 1e-9:
            raise ValueError(f"context mix weights must be >= 0 and sum to 1, got {weights.tolist()}")
        if cue_noise < 0:
            raise ValueError(f"cue_noise must be >= 0, got {cue_noise}")
        self.cue_noise = float(cue_noise)
        self._own = sim is None
        self.sim = SimEnv(task, horizon=horizon) if sim is None else sim
        self._variation = self.sim.variation
        self.task = self.sim.task
        self.obs_keys = tuple(self.sim.obs_keys) + CONTEXT_OBS_KEYS
        self.context: Context | None = None
        self.knobs: dict[str, float] = {}
        self._cue: dict[str, np.ndarray] = {}

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        """Draw the context and start the episode; both depend only on ``seed``."""
        ctx_ss, sim_ss = np.random.SeedSequence(int(seed)).spawn(2)
        rng = np.random.default_rng(ctx_ss)
        u, z = float(rng.random()), float(rng.normal())  # always two draws: streams stay aligned
        cum, ctx = 0.0, self.mix[-1][1]
        for w, c in self.mix:
            cum += w
            if u < cum:
                ctx = c
                break
        m = HEAVY_MASS if ctx.heavy else 1.0
        self.sim.variation = Variation(mass_scale=(m, m))
        obs = self.sim.reset(int(sim_ss.generate_state(1)[0]))
        cue = float(ctx.heavy) + self.cue_noise * z
        self.context = ctx
        self._cue = {
            "context_weight": np.array([cue], np.float32),
            "context_background": np.array([1.0 if ctx.white else 0.0], np.float32),
        }
        self.knobs = {
            **self.sim.knobs,
            "context_heavy": float(ctx.heavy),
            "context_white": float(ctx.white),
            "context_weight_cue": float(self._cue["context_weight"][0]),
        }
        return {**obs, **self._cue}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool]:
        """One step of the inner env; the cue keys stay constant within the episode."""
        obs, reward, success = self.sim.step(action)
        return {**obs, **self._cue}, reward, success

    def close(self) -> None:
        """Close the inner env when built here; otherwise restore its variation."""
        if self._own:
            self.sim.close()
        else:
            self.sim.variation = self._variation


def context_mix(name: str, *, shifted: bool) -> tuple[tuple[float, Context], ...]:
    """Context components of scenario ``name``'s rollouts: its shift's, or the training
    mixture (each label's context at the label's share) when not ``shifted``."""
    sc = get_scenario(name)
    if not sc.contexts:
        raise ValueError(f"scenario {name!r} has no contexts")
    if shifted:
        return CONTEXT_SHIFTS[sc.shift].mix()
    return tuple((float(sc.ratio[lab]), sc.contexts[lab]) for lab in sc.strategies)


def make_context_env(name: str, shifted: bool = True) -> ContextEnv:
    """Rollout environment of context scenario ``name`` (a module-level factory, so
    ``functools.partial(make_context_env, name)`` pickles to workers)."""
    sc = get_scenario(name)
    return ContextEnv(sc.task, context_mix(name, shifted=shifted), cue_noise=sc.cue_noise, horizon=sc.horizon)


def rollout_options(name: str, *, shifted: bool = True) -> dict[str, Any]:
    """Keyword arguments of :func:`~cupid_engine.sim.rollout.run_rollouts` for scenario
    ``name``'s rollouts: horizon, success mode, and the shift (a ``variation`` for physics
    shifts, an ``env`` factory for context scenarios, whose episodes need the cue keys
    with or without the shift)."""
    sc = get_scenario(name)
    opts: dict[str, Any] = {"horizon": sc.horizon, "success_mode": sc.success_mode}
    if sc.contexts:
        opts["env"] = functools.partial(make_context_env, sc.name, bool(shifted))
    elif shifted:
        opts["variation"] = get_shift(sc.shift)
    return opts


def label_seed(seed: int, label: str, index: int) -> int:
    """Episode seed of demonstration ``index`` of ``label`` (a 63-bit int, derived, never drawn)."""
    code = sum(ord(c) * 31**i for i, c in enumerate(label)) % (1 << 31)
    state = np.random.SeedSequence([int(seed), code, int(index)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def judge(successes: list[bool], mode: str) -> bool:
    """Episode success from per-step successes under ``mode`` (:data:`SUCCESS_MODES`)."""
    if mode not in SUCCESS_MODES:
        raise ValueError(f"success mode must be one of {SUCCESS_MODES}, got {mode!r}")
    if not successes:
        return False
    return bool(successes[-1]) if mode == "final" else bool(any(successes))


def run_strategy(
    env: SimEnv, strategy: LiftStrategy, seed: int, *, horizon: int, success_mode: str = "final"
) -> tuple[dict[str, np.ndarray], np.ndarray, bool, list[str]]:
    """One scripted episode of ``strategy`` for exactly ``horizon`` steps (unless ``first``).

    Returns:
        ``(observations key -> [T, d], actions [T, 7], success, phase per step)``.
    """
    env_ss, demo_ss = np.random.SeedSequence(int(seed)).spawn(2)
    obs = env.reset(int(env_ss.generate_state(1)[0]))
    demo = LiftStrategyDemonstrator(strategy, np.random.default_rng(demo_ss))
    rows: dict[str, list[np.ndarray]] = {k: [] for k in env.obs_keys}
    actions, succ = [], []
    for _ in range(int(horizon)):
        a = demo.act(obs)
        for k in env.obs_keys:
            rows[k].append(obs[k])
        actions.append(a.astype(np.float32))
        obs, _, s = env.step(a)
        succ.append(s)
        if s and success_mode == "first":
            break
    observations = {k: np.stack(v).astype(np.float32) for k, v in rows.items()}
    return observations, np.stack(actions), judge(succ, success_mode), demo.phases


def generate_scenario(
    name: str,
    *,
    demos: int,
    seed: int = 0,
    max_attempts_factor: float = 3.0,
    env: SimEnv | None = None,
) -> Iterator[Any]:
    """Yield the demonstrations of scenario ``name`` (training conditions: no shift).

    Only successful attempts are kept (every strategy succeeds ≥ 90% unshifted, see
    :func:`scripted_success`). Ids are ``{scenario}_{index:04d}`` with the labels
    interleaved (majority, majority, minority, ...) so that ids reveal nothing.

    Args:
        name: Scenario name.
        demos: Total demonstrations (split by the scenario's ratio).
        seed: Base seed.
        max_attempts_factor: Give up on a label after ``factor · n + 10`` attempts.
        env: A reusable environment of the scenario's task without variation.

    Yields:
        :class:`~cupid_engine.data.episode.Episode` s, split ``train``, tier None, with
        metadata ``scenario``, ``scenario_label`` and ``strategy_name`` (ground truth for
        benchmarks only), the strategy parameters and the seed; context scenarios add
        ``context`` (``heavy``, ``white``) and ``env_knobs`` (as rollouts record them), and
        their observations the :data:`CONTEXT_OBS_KEYS`.
    """
    sc = get_scenario(name)
    counts = sc.counts(int(demos))
    env = env or SimEnv(sc.task, horizon=sc.horizon)
    # Context scenarios: each label's demos run in its own context (physics and cue keys).
    envs: dict[str, Any] = {lab: env for lab in counts}
    if sc.contexts:
        envs = {
            lab: ContextEnv(sc.task, ((1.0, sc.contexts[lab]),), cue_noise=sc.cue_noise, sim=env) for lab in counts
        }
    try:
        yield from _scenario_episodes(sc, counts, envs, seed, max_attempts_factor)
    finally:
        for e in envs.values():
            if isinstance(e, ContextEnv):
                e.close()  # restores the shared env's variation


def _scenario_episodes(
    sc: Scenario, counts: dict[str, int], envs: dict[str, Any], seed: int, max_attempts_factor: float
) -> Iterator[Any]:
    from cupid_engine.data.episode import Episode

    name = sc.name
    # Interleave labels deterministically by share, so ids carry no block structure.
    order: list[str] = []
    pos = {lab: 0 for lab in counts}
    total = sum(counts.values())
    for i in range(total):
        lab = max(
            (lab for lab in counts if pos[lab] < counts[lab]),
            key=lambda lab: (counts[lab] * (i + 1) / total - pos[lab], -list(counts).index(lab)),
        )
        order.append(lab)
        pos[lab] += 1
    # Each label has its own attempt sequence (seeds depend on label and attempt only), so
    # generating in interleaved order streams episodes without changing any of them.
    attempts = {lab: 0 for lab in counts}
    kept = {lab: 0 for lab in counts}
    for i, lab in enumerate(order):
        while True:
            if attempts[lab] >= int(max_attempts_factor * counts[lab]) + 10:
                raise RuntimeError(f"{name}/{lab}: only {kept[lab]} of {attempts[lab]} attempts succeeded")
            ep_seed = label_seed(seed, lab, attempts[lab])
            obs, act, ok, _ = run_strategy(
                envs[lab], sc.strategies[lab], ep_seed, horizon=sc.horizon, success_mode=sc.success_mode
            )
            attempts[lab] += 1
            if ok:
                break
        kept[lab] += 1
        attempt = attempts[lab] - 1
        extra: dict[str, Any] = {}
        if sc.contexts:
            ctx = envs[lab].context
            extra = {"context": {"heavy": bool(ctx.heavy), "white": bool(ctx.white)},
                     "env_knobs": dict(envs[lab].knobs)}
        yield Episode(
            episode_id=f"{name}_{i:04d}",
            observations=obs,
            actions=act,
            split="train",
            source=f"sim:{sc.task}",
            task=sc.task,
            success=True,
            return_=1.0,
            tier=None,
            metadata={
                "scenario": name,
                LABEL_KEY: lab,
                "strategy_name": lab,
                "strategy": sc.strategies[lab].to_dict(),
                "seed": int(seed),
                "attempt": int(attempt),
                "episode_seed": int(ep_seed),
                "fps": CONTROL_FREQ,
                "controller": "BASIC",
                "obs_keys": list(envs[lab].obs_keys),
                "horizon": sc.horizon,
                "success_mode": sc.success_mode,
                **extra,
            },
        )


def scripted_success(name: str, *, episodes: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Success rate of each scripted strategy of ``name`` without and with its shift.

    Returns:
        ``{"train": {label: rate}, "shift": {label: rate}}`` over ``episodes`` episodes
        each (seeds disjoint from :func:`generate_scenario`'s). Context scenarios: "train"
        runs each label in its own context; "shift-heavy" and "shift-light" run every
        label's strategy in the shift's heavy and light context (``episodes`` each), and
        "shift" is their mixture at the shift's ``p_heavy``.
    """
    sc = get_scenario(name)
    if sc.contexts:
        return _scripted_success_contexts(sc, episodes=episodes, seed=seed)
    out: dict[str, dict[str, float]] = {}
    for cond, var in (("train", None), ("shift", get_shift(sc.shift))):
        env = SimEnv(sc.task, variation=var, horizon=sc.horizon)
        try:
            out[cond] = {
                lab: float(
                    np.mean(
                        [
                            run_strategy(
                                env, st, label_seed(seed + 7919, lab, i), horizon=sc.horizon,
                                success_mode=sc.success_mode,
                            )[2]
                            for i in range(int(episodes))
                        ]
                    )
                )
                for lab, st in sc.strategies.items()
            }
        finally:
            env.close()
    return out


def _scripted_success_contexts(sc: Scenario, *, episodes: int, seed: int) -> dict[str, dict[str, float]]:
    shift = CONTEXT_SHIFTS[sc.shift]
    sim = SimEnv(sc.task, horizon=sc.horizon)
    try:
        conds: dict[str, dict[str, Context]] = {
            "train": dict(sc.contexts),
            "shift-heavy": {lab: Context(heavy=True, white=shift.white) for lab in sc.strategies},
            "shift-light": {lab: Context(heavy=False, white=shift.white) for lab in sc.strategies},
        }
        out: dict[str, dict[str, float]] = {}
        for cond, ctxs in conds.items():
            out[cond] = {}
            for lab, st in sc.strategies.items():
                env = ContextEnv(sc.task, ((1.0, ctxs[lab]),), cue_noise=sc.cue_noise, sim=sim)
                try:
                    out[cond][lab] = float(np.mean([
                        run_strategy(env, st, label_seed(seed + 7919, lab, i), horizon=sc.horizon,
                                     success_mode=sc.success_mode)[2]
                        for i in range(int(episodes))
                    ]))
                finally:
                    env.close()
        p = shift.p_heavy
        out["shift"] = {lab: p * out["shift-heavy"][lab] + (1 - p) * out["shift-light"][lab] for lab in sc.strategies}
        return out
    finally:
        sim.close()
