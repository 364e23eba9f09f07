"""Tasks: fixed observation vectors, seed-only resets, variation knobs."""

from __future__ import annotations

import numpy as np
import pytest

from cupid_engine.sim.tasks import (
    ACTION_DIM,
    OBS_KEYS,
    TASKS,
    SimEnv,
    Variation,
    canonical_task,
    obs_dim,
    obs_keys,
    obs_vector,
    parse_variation,
)

pytestmark = pytest.mark.sim


def test_task_names_and_dims():
    assert canonical_task("PickPlaceCan") == "can"
    assert canonical_task("NutAssemblySquare") == "square"
    assert canonical_task("Lift") == "lift"
    with pytest.raises(ValueError, match="unknown task"):
        canonical_task("stack")
    for task in TASKS:
        assert obs_dim(task) == 19
        assert obs_keys(task)[:3] == ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")


@pytest.mark.parametrize("task", TASKS, ids=list(TASKS))
def test_reset_and_step_fixed_obs_vector(sim_env, task):
    env = sim_env(task)
    obs = env.reset(0)
    assert tuple(obs) == obs_keys(task)
    for key, dim in OBS_KEYS[task]:
        assert obs[key].shape == (dim,) and obs[key].dtype == np.float32
    vec = obs_vector(obs, env.obs_keys)
    assert vec.shape == (obs_dim(task),) and np.all(np.isfinite(vec))
    action = np.zeros(ACTION_DIM)
    action[0] = 0.5
    for _ in range(3):
        obs, reward, success = env.step(action)
    assert obs_vector(obs, env.obs_keys).shape == (obs_dim(task),)
    assert isinstance(reward, float) and success is False
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full(ACTION_DIM, np.nan))


def test_reset_depends_only_on_seed(sim_env):
    env = sim_env("lift")
    action = np.array([0.3, -0.2, -0.1, 0.0, 0.0, 0.1, 1.0])

    def roll(seed):
        obs = [env.reset(seed)]
        obs += [env.step(action)[0] for _ in range(5)]
        return np.stack([obs_vector(o, env.obs_keys) for o in obs])

    a = roll(7)
    roll(8)  # an unrelated episode in between must not leak state
    b = roll(7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], roll(9)[0])


def test_variation_knobs_applied_and_recorded():
    var = Variation(mass_scale=(2.0, 2.0), friction_scale=(0.5, 1.5), size_scale=(1.1, 1.1), placement_scale=(0.0, 0.0))
    env = SimEnv("lift", variation=var)
    try:
        model = env.env.sim.model
        base_mass = float(env._default_mass)
        first = env.reset(3)
        assert env.knobs["mass_scale"] == 2.0 and env.knobs["size_scale"] == pytest.approx(1.1)
        assert 0.5 <= env.knobs["friction_scale"] <= 1.5
        assert float(model.body_mass[env._obj_body]) == pytest.approx(2.0 * base_mass)
        np.testing.assert_allclose(model.geom_size[env._obj_geoms], env._default_size * 1.1, rtol=1e-6)
        # placement range collapsed to its centre: the cube always starts at the same x/y
        second = env.reset(4)
        np.testing.assert_allclose(first["cube_pos"][:2], second["cube_pos"][:2], atol=1e-6)
    finally:
        env.close()
    with pytest.raises(ValueError, match="mesh"):
        SimEnv("can", variation=Variation(size_scale=(0.9, 1.1)))
    with pytest.raises(ValueError):
        Variation(mass_scale=(2.0, 1.0))
    assert Variation.from_dict(var.to_dict()) == var


def test_parse_variation():
    var = parse_variation(["mass_scale=0.5:2", "placement_scale=1.5"])
    assert var.mass_scale == (0.5, 2.0) and var.placement_scale == (1.5, 1.5)
    assert var.friction_scale == (1.0, 1.0)
    assert parse_variation([]) is None
    with pytest.raises(ValueError, match="KNOB"):
        parse_variation(["weight=2"])
    with pytest.raises(ValueError, match="numbers"):
        parse_variation(["mass_scale=a:b"])


def test_make_env_returns_reset_env():
    from cupid_engine.sim.tasks import make_env

    env = make_env("PickPlaceCan", seed=5)
    try:
        assert env.task == "can"
        first = env.observation
        np.testing.assert_array_equal(env.reset(5)["Can_pos"], first["Can_pos"])
    finally:
        env.close()
