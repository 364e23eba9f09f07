"""Simulated benchmark: robosuite tasks, scripted demonstrators and policy rollouts.

This subpackage owns every use of robosuite (and MuJoCo) in cupid_engine. Keeping the
simulator behind one boundary means the engine core, the featuriser and the scorers import
and test without robosuite, MuJoCo or numba installed, and that robosuite's quirks (its
pins, its global logging, its soft-reset semantics) are handled in exactly one place.
Rollouts run on the executor their caller gives (``cupid_engine.executor``; Ray actors
with ``cupid_engine.distributed.RayExecutor``), each worker a
:class:`~cupid_engine.sim.rollout.RolloutWorker`.

Modules:

* ``tasks``: headless Lift / PickPlaceCan / NutAssemblySquare with fixed low-dimensional
  observation vectors, per-episode variation knobs and seed-only-dependent resets.
* ``demonstrators``: scripted operators with quality tiers ``better``/``okay``/``worse``.
* ``generate``: mixed-quality demonstration datasets (``cupid-engine generate``).
* ``rollout``: seeded policy rollouts with success labels (``cupid-engine rollout``),
  success judged at the first, any or the final step, in a built-in task or your own
  environment (``--env module:factory``; ``point_env`` is the reference example).
* ``scenarios``: known-answer curation scenarios (brittle-strategy: two strategies mixed
  2:1, one brittle under a rollout-time shift; spurious-correlate: subsets whose clean
  background cue co-occurs with a strategy that fails in the test context;
  ``generate --scenario``, ``rollout --shift``).
* ``scripted_policy``: a memoryless scripted Lift policy behind the learned-policy
  interface (reference policy for rollouts).

Importing this package does not import robosuite; building an environment does.
"""

from cupid_engine.sim.demonstrators import (
    EXPECTED_SUCCESS,
    TIERS,
    DemoParams,
    ScriptedDemonstrator,
    make_demonstrator,
)
from cupid_engine.sim.generate import DEFAULT_HORIZON, attempt_seed, generate_episodes, run_demo
from cupid_engine.sim.rollout import RolloutWorker, episode_seed, resolve_policy, run_rollouts
from cupid_engine.sim.scripted_policy import ScriptedLiftPolicy
from cupid_engine.sim.tasks import (
    ACTION_DIM,
    CONTROL_FREQ,
    OBS_KEYS,
    ROBOSUITE_ENV,
    TASKS,
    SimEnv,
    Variation,
    canonical_task,
    make_env,
    obs_dim,
    obs_keys,
    obs_vector,
    parse_variation,
)

__all__ = [
    "ACTION_DIM",
    "CONTROL_FREQ",
    "DEFAULT_HORIZON",
    "EXPECTED_SUCCESS",
    "OBS_KEYS",
    "ROBOSUITE_ENV",
    "TASKS",
    "TIERS",
    "DemoParams",
    "RolloutWorker",
    "ScriptedDemonstrator",
    "ScriptedLiftPolicy",
    "SimEnv",
    "Variation",
    "attempt_seed",
    "canonical_task",
    "episode_seed",
    "generate_episodes",
    "make_demonstrator",
    "make_env",
    "obs_dim",
    "obs_keys",
    "obs_vector",
    "parse_variation",
    "resolve_policy",
    "run_demo",
    "run_rollouts",
]
