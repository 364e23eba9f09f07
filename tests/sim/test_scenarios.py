"""Known-answer scenarios: data contract, hidden labels, shifts, success modes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cupid_engine.sim.scenarios import (
    LABEL_KEY,
    SCENARIOS,
    generate_scenario,
    get_scenario,
    get_shift,
    judge,
    run_strategy,
)


def test_counts_are_two_to_one_and_sum():
    sc = get_scenario("lift-grasp")
    for n in (3, 6, 7, 60):
        c = sc.counts(n)
        assert sum(c.values()) == n
        assert c["majority"] >= 2 * c["minority"] - 1
    assert sc.counts(60) == {"majority": 40, "minority": 20}


def test_unknown_names_are_named():
    with pytest.raises(ValueError, match="lift-grasp"):
        get_scenario("nope")
    with pytest.raises(ValueError, match="heavy"):
        get_shift("nope")
    assert get_shift("lift-sweep") == get_shift("heavy")
    assert get_shift("heavy").mass_scale == (40.0, 40.0)
    assert get_shift("lift-carry") == get_shift("heavy30")
    assert get_shift("heavy30").mass_scale == (30.0, 30.0)


def test_lift_carry_is_lift_sweep_with_a_shallower_grasp_and_a_lighter_shift():
    """lift-carry changes only the majority's grasp height and the shift mass; lift-sweep and
    heavy stay as recorded (docs/fidelity.md §2d)."""
    carry, sweep = get_scenario("lift-carry"), get_scenario("lift-sweep")
    assert carry.kind == "brittle" and carry.known_bad == "majority" and carry.horizon == 100
    assert carry.ratio == sweep.ratio and carry.success_mode == sweep.success_mode == "final"
    assert carry.strategies["minority"] == sweep.strategies["minority"]
    assert carry.strategies["majority"] == sweep.strategies["majority"].replace(grasp_dz=0.018)
    assert sweep.strategies["majority"].grasp_dz == 0.016 and sweep.shift == "heavy"
    assert carry.shift == "heavy30" and carry.counts(60) == {"majority": 40, "minority": 20}
    assert get_shift(carry.shift).mass_scale[0] < get_shift(sweep.shift).mass_scale[0]


def test_judge_modes():
    assert judge([False, True, False], "any") and not judge([False, True, False], "final")
    assert judge([False, False, True], "final") and not judge([], "any")
    with pytest.raises(ValueError, match="success mode"):
        judge([True], "last")


@pytest.mark.sim
def test_generated_demos_hide_the_label(sim_env):
    """Fixed length, no tier, interleaved ids; the label lives only in the metadata."""
    env = sim_env("lift")
    eps = list(generate_scenario("lift-grasp", demos=3, seed=0, env=env))
    sc = SCENARIOS["lift-grasp"]
    assert [e.episode_id for e in eps] == ["lift-grasp_0000", "lift-grasp_0001", "lift-grasp_0002"]
    assert sorted(e.metadata[LABEL_KEY] for e in eps) == ["majority", "majority", "minority"]
    for e in eps:
        assert e.length == sc.horizon and e.actions.shape == (sc.horizon, 7)
        assert e.tier is None and e.success is True and e.split == "train"
    # The strategies differ where intended: grasp height relative to the cube at closing.
    grip = {}
    for e in eps:
        closing = np.flatnonzero(e.actions[:, 6] > 0)[0]
        rel = e.observations["robot0_eef_pos"][closing, 2] - e.observations["cube_pos"][closing, 2]
        grip.setdefault(e.metadata[LABEL_KEY], []).append(rel)
    assert min(grip["majority"]) > max(grip["minority"]) + 0.005


@pytest.mark.sim
@pytest.mark.parametrize("name, seed", [("lift-grasp", 3), ("lift-carry", 0)])
def test_shift_breaks_the_majority_only(sim_env, name, seed):
    """One seed per strategy under the scenario's shift (measured rates: docs/fidelity.md)."""
    from cupid_engine.sim.tasks import SimEnv

    sc = SCENARIOS[name]
    env = SimEnv("lift", variation=get_shift(sc.shift), horizon=sc.horizon)
    try:
        _, _, maj, _ = run_strategy(env, sc.strategies["majority"], seed, horizon=sc.horizon)
        _, _, mino, phases = run_strategy(env, sc.strategies["minority"], seed, horizon=sc.horizon)
    finally:
        env.close()
    assert (maj, mino) == (False, True)
    assert phases[0] == "hover" and phases[-1] == "lift"
    _, _, ok, _ = run_strategy(sim_env("lift"), sc.strategies["majority"], seed, horizon=sc.horizon)
    assert ok  # the same strategy and seed succeed without the shift


@pytest.mark.sim
def test_rollout_success_modes(sim_env):
    from cupid_engine.sim import ScriptedLiftPolicy, run_rollouts

    first = run_rollouts(ScriptedLiftPolicy(), "lift", episodes=1, seed=0, horizon=120)
    full = run_rollouts(ScriptedLiftPolicy(), "lift", episodes=1, seed=0, horizon=120, success_mode="any")
    assert first[0].success and first[0].length < 120
    assert full[0].success and full[0].length == 120
    assert full[0].metadata["success_mode"] == "any"
    np.testing.assert_array_equal(full[0].actions[: first[0].length], first[0].actions)


def test_scores_ignore_the_label_metadata(tmp_path):
    """Featurise + score twice: labels present vs swapped/removed -> identical features and scores."""
    from cupid_engine.data import write_dataset
    from cupid_engine.data.episode import Episode
    from cupid_engine.featurize import FeaturizeConfig, featurize
    from cupid_engine.policies import MLPPolicyConfig, TrainConfig, save_policy, train_policy
    from cupid_engine.scorers import score
    from cupid_engine.store import GradientStore

    rng = np.random.default_rng(0)

    def eps(meta_fn):
        out = []
        for i in range(9):
            split = "train" if i < 6 else "rollout"
            out.append(
                Episode(
                    episode_id=f"e{i}",
                    observations={"x": rng_obs[i]},
                    actions=rng_act[i],
                    split=split,
                    success=(i % 2 == 0) if split == "rollout" else True,
                    return_=1.0,
                    metadata=meta_fn(i),
                )
            )
        return out

    rng_obs = [rng.standard_normal((5, 4)).astype(np.float32) for _ in range(9)]
    rng_act = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(9)]
    labelled = eps(lambda i: {"scenario": "lift-grasp", LABEL_KEY: "majority" if i % 3 else "minority"})
    swapped = eps(lambda i: {"scenario": "other", LABEL_KEY: "minority" if i % 3 else "majority"})
    bare = eps(lambda i: {})
    # The spurious-correlate scenario's ground truth: subset label and context (the cue
    # observations are what the policy may see; the metadata is not).
    cue = eps(lambda i: {"scenario": "lift-cue", LABEL_KEY: ("light-white", "heavy-white", "heavy-dark")[i % 3],
                         "context": {"heavy": i % 3 > 0, "white": i % 3 < 2},
                         "env_knobs": {"context_heavy": float(i % 3 > 0), "context_white": float(i % 3 < 2)}})
    policy = train_policy(MLPPolicyConfig.tiny(), labelled[:6], TrainConfig(steps=5, batch_size=8), progress=False)
    ckpt = save_policy(policy, tmp_path / "policy")
    cfg = FeaturizeConfig.for_method(k=16, dtype="float32", output="energy")
    results = []
    for name, data in (("a", labelled), ("b", swapped), ("c", bare), ("d", cue)):
        ds = write_dataset(tmp_path / f"data_{name}", data)
        store = GradientStore.create(str(tmp_path / f"{name}.zarr"))
        featurize(str(ds), store, "base", policy=str(ckpt), config=cfg, progress=False)
        run = store.run("base")
        feats = np.concatenate([run.step_features(f"e{i}") for i in range(9)])
        scores = {m: score(m, store=store, run="base")["score"].to_numpy() for m in ("cupid", "cupid-step")}
        results.append((feats, scores))
    for feats, scores in results[1:]:
        np.testing.assert_array_equal(feats, results[0][0])
        for m in scores:
            np.testing.assert_array_equal(scores[m], results[0][1][m])


def test_strategy_config_roundtrip():
    st = SCENARIOS["lift-sweep"].strategies["majority"]
    assert type(st).from_dict(st.to_dict()) == st
    with pytest.raises(ValueError):
        dataclasses.replace(st, lift_speed=0.0)


class _GoToGoal:
    """A policy for PointReach (sorted keys: goal, pos)."""

    def predict_action(self, window, *, generator=None):
        obs = np.asarray(window)[-1]
        return np.clip(10 * (obs[:2] - obs[2:4]), -1, 1)[None].astype(np.float32)


@pytest.mark.parametrize("mode", ["first", "any", "final"])
def test_user_env_protocol(mode):
    from cupid_engine.sim import run_rollouts

    eps = run_rollouts(_GoToGoal(), "point", episodes=3, seed=0, horizon=40, success_mode=mode,
                       env="cupid_engine.sim.point_env:PointReach")
    assert all(e.success for e in eps)
    assert all((e.length < 40) == (mode == "first") for e in eps)
    assert eps[0].actions.shape[1] == 2 and set(eps[0].observations) == {"goal", "pos"}
    again = run_rollouts(_GoToGoal(), "point", episodes=3, seed=0, horizon=40, success_mode=mode,
                         env="cupid_engine.sim.point_env:PointReach")
    np.testing.assert_array_equal(eps[2].actions, again[2].actions)


def test_user_env_errors():
    from cupid_engine.sim import run_rollouts
    from cupid_engine.sim.rollout import make_user_env

    with pytest.raises(ValueError, match="module:factory"):
        make_user_env("nocolon")
    with pytest.raises(ValueError, match="cannot load"):
        make_user_env("cupid_engine.sim.point_env:Nope")
    with pytest.raises(ValueError, match="lacks"):
        make_user_env(lambda: object())
    with pytest.raises(ValueError, match="horizon"):
        run_rollouts(_GoToGoal(), "point", episodes=1, env="cupid_engine.sim.point_env:PointReach")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--scenario", "nope", "--demos", "3", "--out", "X"], "unknown scenario"),
        (["generate", "--scenario", "lift-grasp", "--demos", "3", "--vary", "mass_scale=2", "--out", "X"],
         "--vary cannot be combined"),
        (["generate", "--scenario", "lift-grasp", "--demos-per-tier", "3", "--out", "X"], "give --demos"),
        (["rollout", "--policy", "P", "--scenario", "lift-grasp", "--shift", "nope", "--episodes", "1", "--out", "X"],
         "unknown shift"),
        (["rollout", "--policy", "P", "--scenario", "lift-grasp", "--task", "can", "--episodes", "1", "--out", "X"],
         "contradicts"),
        (["rollout", "--policy", "P", "--env", "a:b", "--shift", "heavy", "--horizon", "5", "--episodes", "1",
          "--out", "X"], "configure your own env"),
        (["rollout", "--policy", "P", "--env", "a:b", "--episodes", "1", "--out", "X"], "--env needs --horizon"),
        (["rollout", "--policy", "P", "--task", "lift", "--episodes", "5", "--repeats", "2", "--out", "X"],
         "--repeats must be >= 1 and divide --episodes (5)"),
    ],
)
def test_cli_scenario_errors_are_one_line(argv, message, tmp_path, capsys):
    from cupid_engine.cli import main

    argv = [str(tmp_path / "x") if a == "X" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err + str(e.value)
    assert message in err
    assert not (tmp_path / "x").exists()
