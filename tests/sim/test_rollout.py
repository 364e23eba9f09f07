"""Rollouts: seeded, order-independent, identical with 1 or 2 Ray workers; failures labelled."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from cupid_engine.distributed import RayExecutor
from cupid_engine.sim.rollout import RolloutWorker, episode_seed, run_rollouts
from cupid_engine.sim.scripted_policy import ScriptedLiftPolicy

pytestmark = pytest.mark.sim


class ZeroPolicy:
    """Never moves: every rollout must fail."""

    def predict_action(self, obs_window, *, generator=None):
        return np.zeros((4, 7), np.float32)


class RecordingPolicy:
    """Records the windows it sees; actions drawn from the generator (stochastic policy)."""

    class config:  # noqa: N801 - mimics a policy config
        n_obs_steps = 3
        obs_keys = None
        obs_dim = 19

    def __init__(self):
        self.windows = []

    def predict_action(self, obs_window, *, generator=None):
        self.windows.append(np.array(obs_window))
        return generator.uniform(-0.2, 0.2, size=(5, 7)).astype(np.float32)


def _same(a, b):
    assert a.episode_id == b.episode_id and a.success == b.success and a.metadata == b.metadata
    np.testing.assert_array_equal(a.actions, b.actions)
    for k in a.observations:
        np.testing.assert_array_equal(a.observations[k], b.observations[k])


def test_rollouts_reproducible_and_order_independent():
    worker = RolloutWorker("lift", ScriptedLiftPolicy(noise_std=0.1), horizon=120)
    try:
        s1, s2 = episode_seed(0, 0), episode_seed(0, 1)
        a = worker.run([s1, s2], ["a", "b"])
        b = worker.run([s2, s1], ["b", "a"])
        _same(a[0], b[1])
        _same(a[1], b[0])
        assert all(e.success for e in a) and all(e.split == "rollout" for e in a)
        assert not np.array_equal(a[0].actions[:20], a[1].actions[:20])
        assert a[0].return_ == 1.0 and a[0].metadata["episode_seed"] == s1
    finally:
        worker.close()


def test_failed_rollout_labelled_and_chunking():
    eps = run_rollouts(ZeroPolicy(), "lift", episodes=1, horizon=10)
    assert eps[0].success is False and eps[0].return_ == 0.0 and eps[0].length == 10
    assert eps[0].episode_id == "lift_rollout_0000"
    policy = RecordingPolicy()
    ep = run_rollouts(policy, "lift", episodes=1, horizon=12, seed=5)[0]
    # 12 steps at 5 actions per query: 3 queries; windows [3, 19], padded with the first obs
    assert ep.length == 12 and len(policy.windows) == 3 and ep.metadata["policy_queries"] == 3
    assert policy.windows[0].shape == (3, 19)
    np.testing.assert_array_equal(policy.windows[0][0], policy.windows[0][2])
    keys = sorted(ep.observations)  # obs_keys None: sorted task keys
    np.testing.assert_array_equal(policy.windows[1][-1], ep.obs_vector(keys)[5])
    np.testing.assert_array_equal(policy.windows[1][-2], ep.obs_vector(keys)[4])
    again = run_rollouts(RecordingPolicy(), "lift", episodes=1, horizon=12, seed=5)[0]
    _same(ep, again)


def test_repeats_share_initial_states_and_keep_draw_zero():
    plain = run_rollouts(RecordingPolicy(), "lift", episodes=2, horizon=10, seed=5)
    rep = run_rollouts(RecordingPolicy(), "lift", episodes=4, horizon=10, seed=5, repeats=2)
    keys = sorted(rep[0].observations)
    for j in range(2):
        a, b = rep[2 * j], rep[2 * j + 1]
        np.testing.assert_array_equal(a.obs_vector(keys)[0], b.obs_vector(keys)[0])  # same start
        assert not np.array_equal(a.actions, b.actions)  # another policy draw
        assert a.metadata["episode_seed"] == b.metadata["episode_seed"] == episode_seed(5, j)
        assert (a.metadata["policy_draw"], b.metadata["policy_draw"]) == (0, 1)
        # Draw 0 of initial state j is episode j of the plain run, bit for bit (ids aside).
        np.testing.assert_array_equal(a.actions, plain[j].actions)
        np.testing.assert_array_equal(a.obs_vector(keys), plain[j].obs_vector(keys))
    assert not np.array_equal(rep[0].obs_vector(keys)[0], rep[2].obs_vector(keys)[0])
    assert [e.episode_id for e in rep] == [f"lift_rollout_{i:04d}" for i in range(4)]
    with pytest.raises(ValueError, match="repeats must be >= 1 and divide episodes"):
        run_rollouts(RecordingPolicy(), "lift", episodes=3, horizon=10, repeats=2)


def test_policy_object_refused_for_ray_workers():
    with pytest.raises(TypeError, match="checkpoint path"):
        run_rollouts(ZeroPolicy(), "lift", episodes=2, executor=RayExecutor(2), horizon=5)


@pytest.mark.ray
def test_one_and_two_ray_workers_identical():
    pytest.importorskip("ray")
    factory = functools.partial(ScriptedLiftPolicy, noise_std=0.1)
    one = run_rollouts(factory, "lift", episodes=3, seed=11, horizon=40)
    two = run_rollouts(factory, "lift", episodes=3, seed=11, horizon=40, executor=RayExecutor(2))
    assert [e.episode_id for e in two] == ["lift_rollout_0000", "lift_rollout_0001", "lift_rollout_0002"]
    for a, b in zip(one, two):
        _same(a, b)


def _untrained_mlp(path, obs_dim: int, action_dim: int) -> str:
    """A tiny (untrained) MLP checkpoint: a policy that loads in any worker."""
    import torch

    from cupid_engine.policies import MLPPolicy, MLPPolicyConfig, save_policy

    torch.manual_seed(0)
    config = MLPPolicyConfig.tiny(obs_dim=obs_dim, action_dim=action_dim, n_obs_steps=2, horizon=4, n_action_steps=4)
    return str(save_policy(MLPPolicy(config), path))


@pytest.mark.ray
def test_ray_rollouts_carry_success_mode_shift_and_user_env(tmp_path):
    """``--workers 2`` with ``--success final --shift heavy`` (and with ``--env``) gives the
    in-process episodes: the success criterion, the shift and the env spec reach the workers."""
    ray = pytest.importorskip("ray")
    from cupid_engine.data.lerobot import open_dataset
    from cupid_engine.distributed._ray import ensure_ray
    from cupid_engine.sim.scenarios import get_shift
    from cupid_engine.sim.tasks import OBS_KEYS

    from .helpers import run_cli

    heavy = get_shift("heavy")
    lift_ckpt = _untrained_mlp(tmp_path / "lift", sum(d for _, d in OBS_KEYS["lift"]), 7)
    point_ckpt = _untrained_mlp(tmp_path / "point", 4, 2)
    started = ensure_ray(None, 2)  # one local instance for the three maps below
    try:
        factory = functools.partial(ScriptedLiftPolicy, noise_std=0.1)
        kw = dict(episodes=2, seed=7, horizon=30, success_mode="final", variation=heavy)
        local = run_rollouts(factory, "lift", **kw)
        remote = run_rollouts(factory, "lift", executor=RayExecutor(2), **kw)
        for a, b in zip(local, remote):
            _same(a, b)
            assert b.metadata["success_mode"] == "final" and b.length == 30
            assert b.metadata["env_knobs"]["mass_scale"] == heavy.mass_scale[0]

        cases = [
            (lift_ckpt, ["--task", "lift", "--horizon", "12", "--success", "final", "--shift", "heavy"],
             dict(task="lift", horizon=12, success_mode="final", variation=heavy)),
            (point_ckpt, ["--env", "cupid_engine.sim.point_env:PointReach", "--horizon", "15", "--success", "any"],
             dict(task="PointReach", horizon=15, success_mode="any", env="cupid_engine.sim.point_env:PointReach")),
        ]
        for i, (ckpt, args, local_kw) in enumerate(cases):
            out = tmp_path / f"rollouts{i}"
            argv = ["rollout", "--policy", ckpt, "--episodes", "2", "--seed", "3", "--workers", "2", *args]
            assert run_cli("rollout", argv + ["--out", str(out)]) == 0
            remote = sorted(open_dataset(out).episodes(), key=lambda e: e.episode_id)
            task = local_kw.pop("task")
            local = run_rollouts(ckpt, task, episodes=2, seed=3, **local_kw)
            assert [e.episode_id for e in remote] == [e.episode_id for e in local]
            for a, b in zip(local, remote):
                np.testing.assert_array_equal(a.actions, b.actions)
                assert a.success == b.success and a.length == b.length == local_kw["horizon"]
                assert b.metadata["success_mode"] == local_kw["success_mode"]
                assert b.metadata["env_knobs"] == a.metadata["env_knobs"]
    finally:
        if started:
            ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_rollout_cli_with_trained_checkpoint(tmp_path):
    """End to end: generate → train a tiny MLP → ``cupid-engine rollout`` on 2 workers."""
    policies = pytest.importorskip("cupid_engine.policies")
    lerobot = pytest.importorskip("cupid_engine.data.lerobot")
    from .helpers import run_cli
    from cupid_engine.sim.generate import generate_episodes

    demos = list(generate_episodes("lift", demos_per_tier=2, tiers=("better",)))
    config = policies.MLPPolicyConfig.tiny(n_obs_steps=2, horizon=4, n_action_steps=4)
    policy = policies.train_policy(config, demos, policies.TrainConfig(steps=20), progress=False)
    ckpt = policies.save_policy(policy, tmp_path / "policy")
    out = tmp_path / "rollouts"
    argv = ["rollout", "--policy", str(ckpt), "--task", "lift", "--episodes", "3", "--horizon", "20"]
    assert run_cli("rollout", argv + ["--workers", "2", "--out", str(out)]) == 0
    eps = sorted(lerobot.open_dataset(out).episodes(), key=lambda e: e.episode_id)
    assert [e.episode_id for e in eps] == [f"lift_rollout_{i:04d}" for i in range(3)]
    assert all(e.split == "rollout" and e.success is not None and e.length <= 20 for e in eps)
    local = run_rollouts(ckpt, "lift", episodes=3, horizon=20)
    for a, b in zip(local, eps):
        np.testing.assert_allclose(a.actions, b.actions)
        assert a.success == b.success
