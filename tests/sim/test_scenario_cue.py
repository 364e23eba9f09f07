"""The spurious-correlate scenario ``lift-cue``: subsets, contexts, cue keys, the shift,
and the brittle-strategy scenarios left unchanged by it."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest

from cupid_engine.sim.scenarios import (
    CONTEXT_OBS_KEYS,
    CONTEXT_SHIFTS,
    LABEL_KEY,
    SCENARIOS,
    Context,
    ContextShift,
    context_mix,
    generate_scenario,
    get_scenario,
    get_shift,
    rollout_options,
    scenario_of_shift,
)
from cupid_engine.sim.tasks import obs_keys


def test_counts_follow_the_papers_subsets():
    sc = get_scenario("lift-cue")
    assert sc.counts(60) == {"light-white": 30, "heavy-white": 10, "heavy-dark": 20}
    assert sc.counts(120) == {"light-white": 60, "heavy-white": 20, "heavy-dark": 40}  # the paper's 120
    for n in (3, 7, 13):
        assert sum(sc.counts(n).values()) == n
    assert sc.known_bad == "light-white" and sc.kind == "spurious"
    # The known-bad subset is the only shallow grasp, and the only light cube.
    assert [lab for lab, st in sc.strategies.items() if st.grasp_dz > 0] == ["light-white"]
    assert [lab for lab, c in sc.contexts.items() if not c.heavy] == ["light-white"]


def test_obs_keys_add_the_cues_only_for_context_scenarios():
    assert SCENARIOS["lift-cue"].obs_keys == obs_keys("lift") + CONTEXT_OBS_KEYS
    for name in ("lift-grasp", "lift-sweep", "lift-carry"):
        assert SCENARIOS[name].obs_keys == obs_keys("lift")


def test_shift_names_and_options():
    with pytest.raises(ValueError, match="context shift of scenario lift-cue"):
        get_shift("lift-cue")
    with pytest.raises(ValueError, match="context shift"):
        get_shift("white-mixed")
    assert scenario_of_shift("white-mixed") is SCENARIOS["lift-cue"]
    assert scenario_of_shift("lift-cue") is SCENARIOS["lift-cue"]
    assert scenario_of_shift("heavy") is None and scenario_of_shift("lift-grasp") is None
    assert CONTEXT_SHIFTS["white-mixed"].mix() == (
        (0.5, Context(heavy=False, white=True)),
        (0.5, Context(heavy=True, white=True)),
    )
    with pytest.raises(ValueError, match="p_heavy"):
        ContextShift(p_heavy=1.5)
    assert ContextShift.from_dict(ContextShift().to_dict()) == ContextShift()
    # Training mixture: each label's context at its share.
    mix = context_mix("lift-cue", shifted=False)
    assert [w for w, _ in mix] == [1 / 2, 1 / 6, 1 / 3]
    # Physics scenarios: a variation when shifted, nothing when not; context scenarios an env factory either way.
    assert rollout_options("lift-grasp") == {"horizon": 100, "success_mode": "final", "variation": get_shift("heavy")}
    assert "variation" not in rollout_options("lift-grasp", shifted=False)
    opts = rollout_options("lift-cue")
    assert set(opts) == {"horizon", "success_mode", "env"}
    assert pickle.loads(pickle.dumps(opts["env"])).args == ("lift-cue", True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["rollout", "--policy", "P", "--scenario", "lift-cue", "--shift", "heavy", "--episodes", "1", "--out", "X"],
         "takes its own shift"),
        (["rollout", "--policy", "P", "--scenario", "lift-cue", "--vary", "mass_scale=2", "--episodes", "1",
          "--out", "X"], "cannot be combined"),
        (["rollout", "--policy", "P", "--shift", "white-mixed", "--task", "can", "--episodes", "1", "--out", "X"],
         "contradicts"),
        (["rollout", "--policy", "P", "--task", "lift", "--shift", "nope", "--episodes", "1", "--out", "X"],
         "white-mixed"),
    ],
)
def test_cli_context_errors_are_one_line(argv, message, tmp_path, capsys):
    from cupid_engine.cli import main

    argv = [str(tmp_path / "x") if a == "X" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert message in capsys.readouterr().err + str(e.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.sim
def test_generated_subsets_contexts_and_cues(sim_env):
    """Six demos: 3 light/white/shallow, 1 heavy/white/centre, 2 heavy/dark/centre, each
    run under its own physics, cue keys constant per episode, the shared env restored."""
    env = sim_env("lift")
    before = env.variation
    sc = SCENARIOS["lift-cue"]
    eps = list(generate_scenario("lift-cue", demos=6, seed=0, env=env))
    assert env.variation == before
    assert [e.episode_id for e in eps] == [f"lift-cue_{i:04d}" for i in range(6)]
    labels = [e.metadata[LABEL_KEY] for e in eps]
    assert sorted(labels) == sorted(["light-white"] * 3 + ["heavy-white"] + ["heavy-dark"] * 2)
    grasp = {}
    for e, lab in zip(eps, labels):
        ctx = sc.contexts[lab]
        assert e.metadata["context"] == {"heavy": ctx.heavy, "white": ctx.white}
        assert e.metadata["env_knobs"]["mass_scale"] == (40.0 if ctx.heavy else 1.0)
        assert e.metadata["env_knobs"]["context_heavy"] == float(ctx.heavy)
        assert e.metadata["obs_keys"] == list(sc.obs_keys)
        assert set(e.observations) == set(sc.obs_keys)
        assert e.length == sc.horizon and e.tier is None and e.success is True
        w, b = e.observations["context_weight"], e.observations["context_background"]
        assert w.shape == (sc.horizon, 1) and np.all(w == w[0]) and np.all(b == float(ctx.white))
        assert w[0, 0] == pytest.approx(e.metadata["env_knobs"]["context_weight_cue"])
        closing = np.flatnonzero(e.actions[:, 6] > 0)[0]
        grasp.setdefault(lab, []).append(
            e.observations["robot0_eef_pos"][closing, 2] - e.observations["cube_pos"][closing, 2]
        )
    assert min(grasp["light-white"]) > max(grasp["heavy-white"] + grasp["heavy-dark"]) + 0.005
    # The noise is per episode, not a constant: the cues of the light demos differ.
    cues = [e.observations["context_weight"][0, 0] for e, lab in zip(eps, labels) if lab == "light-white"]
    assert len(set(np.round(cues, 6))) == 3


@pytest.mark.sim
def test_shift_is_seeded_white_and_mixes_heavy(sim_env):
    """The context and cue depend only on the episode seed; the background is always white;
    the heavy mass is applied to the simulation."""
    from cupid_engine.sim.scenarios import HEAVY_MASS, ContextEnv

    sim = sim_env("lift")
    sc = SCENARIOS["lift-cue"]
    env = ContextEnv("lift", context_mix("lift-cue", shifted=True), cue_noise=sc.cue_noise, sim=sim)
    try:
        model = sim.env.sim.model
        body = model.body_name2id("cube_main")
        seen = []
        for seed in range(16):
            obs = env.reset(seed)
            assert obs["context_background"][0] == 1.0 and env.context.white
            assert model.body_mass[body] == pytest.approx(sim._default_mass * (HEAVY_MASS if env.context.heavy else 1.0))
            seen.append((env.context.heavy, float(obs["context_weight"][0]), obs["cube_pos"].tobytes()))
        heavy = [h for h, _, _ in seen]
        assert 3 <= sum(heavy) <= 13  # p = 1/2 over 16 seeds
        for seed in (3, 11, 0):  # revisiting a seed gives the same context, cue and initial state
            obs = env.reset(seed)
            assert (env.context.heavy, float(obs["context_weight"][0]), obs["cube_pos"].tobytes()) == seen[seed]
        obs2, _, _ = env.step(np.zeros(7))
        assert obs2["context_weight"][0] == obs["context_weight"][0]
    finally:
        env.close()
    assert sim.variation == type(sim.variation)()  # the shared env is stock again


class _Hold:
    """A policy that reads the scenario's keys (cue keys included) and holds still."""

    class config:  # noqa: N801 - duck-typed policy config
        n_obs_steps = 2
        obs_keys = SCENARIOS["lift-cue"].obs_keys

    def predict_action(self, window, *, generator=None):
        assert window.shape == (2, 21)
        return np.zeros((4, 7), np.float32)


@pytest.mark.sim
def test_rollouts_record_their_context_deterministically():
    from cupid_engine.sim import run_rollouts

    opts = dict(rollout_options("lift-cue"), horizon=6)
    a = run_rollouts(_Hold(), "lift", episodes=4, seed=7, **opts)
    b = run_rollouts(_Hold(), "lift", episodes=4, seed=7, **opts)
    for x, y in zip(a, b):
        assert x.metadata["env_knobs"] == y.metadata["env_knobs"]
        np.testing.assert_array_equal(x.observations["cube_pos"], y.observations["cube_pos"])
        assert x.metadata["env_knobs"]["context_white"] == 1.0
        assert set(x.observations) == set(SCENARIOS["lift-cue"].obs_keys) and x.length == 6


def _digest(episodes) -> str:
    """sha256 of ids, observations and actions rounded to 1e-5 (robust to last-ulp float
    differences between builds, not to any change of the generator) and metadata."""
    h = hashlib.sha256()
    for ep in episodes:
        h.update(ep.episode_id.encode())
        for k in sorted(ep.observations):
            h.update(k.encode())
            h.update(np.round(ep.observations[k].astype(np.float64), 5).tobytes())
        h.update(np.round(ep.actions.astype(np.float64), 5).tobytes())
        h.update(json.dumps(ep.metadata, sort_keys=True).encode())
    return h.hexdigest()


# Recorded with the generator as it was before lift-cue was added (3 demos, seed 0, the pinned
# robosuite/MuJoCo): adding context scenarios must not change the brittle ones.
_BRITTLE_DIGESTS = {
    "lift-grasp": "a4f66302563c0c591d5506610e159f45479bcc05976bd326834e146d5bd0dfdd",
    "lift-sweep": "5c7447382c71f3d0fa48d55d6f4839c0a985489abd77caae14a1c5d3c9d1d2ed",
    # Added with the scenario (session 8); its recorded run is docs/fidelity.md §2d.
    "lift-carry": "1d71085c3ab1e7bf52f473762d4b229c5a0f183fcf0be1a25ca8f29efe2d66b7",
}


@pytest.mark.sim
@pytest.mark.parametrize("name", ["lift-grasp", "lift-sweep", "lift-carry"])
def test_brittle_scenarios_unchanged(sim_env, name):
    assert _digest(generate_scenario(name, demos=3, seed=0, env=sim_env("lift"))) == _BRITTLE_DIGESTS[name]


def test_bench_summary_judges_spurious_scenarios_against_the_baselines():
    from cupid_engine.cli.bench import _load

    bf = _load("fidelity")

    def result(aurocs):
        return {"scenario": "lift-cue", "kind": "spurious",
                "per_seed": [{"scorers": {n: {"auroc": a, "removed_bad": 1} for n, a in aurocs.items()}}]}

    good = bf.summarise([result({"cupid": 0.7, "length": 0.5, "random": 0.52, "cupid-quality": 0.4})], "cupid")
    (row,) = good["acceptance"]
    assert row["beats_baselines"] is True and row["auroc_pass"] is False
    bad = bf.summarise([result({"cupid": 0.7, "length": 0.5, "random": 0.52, "cupid-quality": 0.75})], "cupid")
    assert bad["acceptance"][0]["beats_baselines"] is False
    missing = bf.summarise([result({"cupid": 0.7, "random": 0.5})], "cupid")
    assert missing["acceptance"][0]["beats_baselines"] is False  # a baseline not run is not beaten
    brittle = bf.summarise([dict(result({"cupid": 0.9, "random": 0.5}), kind="brittle")], "cupid")
    assert "beats_baselines" not in brittle["acceptance"][0]
