"""Image rollouts: an image policy sees live camera frames; episodes keep them; seeded."""

from __future__ import annotations

import numpy as np
import pytest

from cupid_engine.data.episode import Episode

pytestmark = pytest.mark.sim

SIZE = 32  # the tiny encoder (3 stages) leaves a 2x2 feature map


def _synthetic_episodes(rng: np.random.Generator, n: int = 2, T: int = 10) -> list[Episode]:
    from cupid_engine.sim.tasks import OBS_KEYS

    eps = []
    for i in range(n):
        obs = {k: rng.normal(size=(T, d)).astype(np.float32) for k, d in OBS_KEYS["lift"]}
        eps.append(Episode(
            episode_id=f"syn{i}", observations=obs, actions=rng.uniform(-1, 1, (T, 7)).astype(np.float32),
            images={"agentview": rng.integers(0, 256, (T, SIZE, SIZE, 3), dtype=np.uint8)}, task="lift",
        ))
    return eps


@pytest.fixture(scope="module")
def image_policy_path(tmp_path_factory):
    """A tiny diffusion-image checkpoint trained for one step (so its normaliser is fitted)."""
    pytest.importorskip("robosuite")
    from cupid_engine.policies import TrainConfig, save_policy, train_policy
    from cupid_engine.policies.diffusion_image import DiffusionImagePolicyConfig
    from cupid_engine.sim.tasks import obs_keys

    cfg = DiffusionImagePolicyConfig.tiny(obs_keys=tuple(obs_keys("lift")), image_keys=("agentview",))
    policy = train_policy(cfg, _synthetic_episodes(np.random.default_rng(0)), TrainConfig(steps=1, batch_size=4, seed=0),
                          progress=False)
    return str(save_policy(policy, tmp_path_factory.mktemp("img_policy") / "policy"))


def test_image_rollouts_carry_frames_and_are_seeded(image_policy_path):
    from cupid_engine.distributed import executor_for
    from cupid_engine.sim.rollout import policy_cameras, run_rollouts

    assert policy_cameras(image_policy_path) == ("agentview",)
    seen = []
    one = run_rollouts(image_policy_path, "lift", episodes=2, seed=5, horizon=9, progress=seen.append)
    two = run_rollouts(image_policy_path, "lift", episodes=2, seed=5, executor=executor_for(2), horizon=9)
    assert len(seen) == 2 and [e.episode_id for e in one] == ["lift_rollout_0000", "lift_rollout_0001"]
    for a, b in zip(one, two):
        frames = a.images["agentview"]
        assert frames.dtype == np.uint8 and frames.shape == (9, SIZE, SIZE, 3)
        assert a.length == 9 and a.actions.shape == (9, 7) and not a.success
        # A drawn scene, not a blank buffer, and it changes as the arm moves.
        assert frames.std() > 5 and np.abs(frames[-1].astype(int) - frames[0]).sum() > 0
        assert a.metadata["render"]["cameras"] == ["agentview"] and a.metadata["render"]["size"] == SIZE
        assert a.metadata["policy_queries"] == 3  # tiny preset: 4 actions per query, 9 steps
        # Same seed -> same episode, with 1 or 2 worker processes.
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(frames, b.images["agentview"])
        for k in a.observations:
            np.testing.assert_array_equal(a.observations[k], b.observations[k])
    # Different episode seeds: different scenes (object placement) and noise.
    assert not np.array_equal(one[0].images["agentview"][0], one[1].images["agentview"][0])
    assert not np.array_equal(one[0].actions, one[1].actions)


def test_image_policy_object_without_egl_is_refused(image_policy_path, monkeypatch):
    from cupid_engine.policies import load_policy
    from cupid_engine.sim.rollout import run_rollouts

    monkeypatch.setenv("MUJOCO_GL", "disable")
    with pytest.raises(TypeError, match="MUJOCO_GL=egl.*cannot render.*pass a checkpoint path"):
        run_rollouts(load_policy(image_policy_path), "lift", episodes=1, horizon=4)


def test_live_renderer_names_a_mujoco_imported_without_gl(sim_env, monkeypatch):
    """robosuite rewrites MUJOCO_GL=egl after mujoco read 'disable': the error says so."""
    import mujoco

    from cupid_engine.sim.render import CameraRenderer, RenderUnavailable

    env = sim_env("lift")
    if hasattr(mujoco, "GLContext"):
        pytest.skip("this test process imported mujoco with a GL backend")
    monkeypatch.setenv("MUJOCO_GL", "egl")
    with pytest.raises(RenderUnavailable, match="first imported in this process without a GL backend"):
        CameraRenderer(env, ("agentview",), SIZE)
