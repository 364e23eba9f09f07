"""Camera images by state replay (sim/render.py): shapes, determinism, drift detection, EGL errors."""

from __future__ import annotations

import numpy as np
import pytest

from cupid_engine.errors import is_user_error


def test_missing_egl_is_one_line_naming_the_packages(monkeypatch):
    from cupid_engine.sim import render

    def no_lib(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(render.ctypes, "CDLL", no_lib)
    with pytest.raises(render.RenderUnavailable) as info:
        render.check_egl()
    msg = str(info.value)
    assert "\n" not in msg and "libEGL.so.1 is missing" in msg and "libegl-mesa0 libgl1-mesa-dri" in msg
    assert is_user_error(info.value)


@pytest.mark.sim
def test_replayed_states_render_both_cameras():
    pytest.importorskip("robosuite")
    from cupid_engine.sim.generate import generate_episodes
    from cupid_engine.sim.render import StateRecordingEnv, render_episodes

    env = StateRecordingEnv("lift", horizon=50)
    recs = []
    try:
        # Failed 8-step attempts are enough: the arm moves from the first step.
        for ep in generate_episodes("lift", demos_per_tier=2, tiers=("better",), keep_failures=True, horizon=8, env=env):
            recs.append((ep, env.episode_states(ep.length)))
    finally:
        env.close()
    (ep0, s0), (ep1, _s1) = recs
    assert s0.shape[0] == ep0.length == 8
    # The second episode paired with the first one's states: the replay must refuse it.
    jobs = [(ep0, s0), (ep0, s0), (ep1, s0[: ep1.length])]
    out = render_episodes(jobs, task="lift", horizon=50, size=24, workers=1)
    a, b = next(out), next(out)
    for cam in ("agentview", "robot0_eye_in_hand"):
        frames = a.images[cam]
        assert frames.shape == (8, 24, 24, 3) and frames.dtype == np.uint8
        np.testing.assert_array_equal(frames, b.images[cam])  # deterministic
        assert frames.std() > 5  # not a blank image
    assert np.abs(a.images["robot0_eye_in_hand"][0].astype(int) - a.images["robot0_eye_in_hand"][-1]).mean() > 1  # the wrist moved
    np.testing.assert_array_equal(a.actions, ep0.actions)
    assert a.metadata["render"]["cameras"] == ["agentview", "robot0_eye_in_hand"]
    with pytest.raises(RuntimeError, match=r"episode 'lift_better_0001', step 0: the replayed state puts the object"):
        next(out)


@pytest.mark.sim
def test_live_renderer_needs_egl_in_this_process(sim_env, monkeypatch):
    from cupid_engine.sim.render import CameraRenderer, RenderUnavailable

    monkeypatch.setenv("MUJOCO_GL", "disable")
    with pytest.raises(RenderUnavailable, match="needs MUJOCO_GL=egl in this process .*'disable'"):
        CameraRenderer(sim_env("lift"))
    with pytest.raises(ValueError, match=r"no camera \['frontcam'\]"):
        CameraRenderer(sim_env("lift"), cameras=("frontcam",))


@pytest.mark.slow
@pytest.mark.sim
def test_cli_generate_obs_image(tmp_path):
    pytest.importorskip("robosuite")
    from cupid_engine.cli import main
    from cupid_engine.data import open_dataset

    common = ["generate", "--task", "lift", "--demos", "1", "--tiers", "okay", "--horizon", "6", "--keep-failures"]
    assert main([*common, "--out", str(tmp_path / "state")]) == 0
    assert main([*common, "--obs", "image", "--image-size", "20", "--render-workers", "1",
                 "--image-format", "video", "--out", str(tmp_path / "image")]) == 0
    state, image = open_dataset(tmp_path / "state"), open_dataset(tmp_path / "image")
    assert image.image_keys == ["agentview", "robot0_eye_in_hand"] and state.image_keys == []
    assert image.image_shapes["agentview"] == (20, 20, 3)
    a, b = next(state.episodes()), next(image.episodes())
    np.testing.assert_array_equal(a.actions, b.actions)  # the same demonstration, plus frames
    assert b.image_array("robot0_eye_in_hand").shape == (6, 20, 20, 3)


def test_missing_egl_vendor_is_named(monkeypatch):
    from cupid_engine.sim import render

    def only_dispatcher(name, *a, **k):
        if name != "libEGL.so.1":
            raise OSError(name)

    monkeypatch.setattr(render.ctypes, "CDLL", only_dispatcher)
    with pytest.raises(render.RenderUnavailable, match="libEGL_mesa.so.0 is missing.*libegl-mesa0 libgl1-mesa-dri"):
        render.check_egl()
