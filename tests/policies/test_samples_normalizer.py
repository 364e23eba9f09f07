"""Sample building (padding convention, keys, errors) and the normaliser's clamp."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from cupid_engine.data.episode import Episode
from cupid_engine.policies.normalizer import Normalizer
from cupid_engine.policies.samples import build_samples, episode_key, window_indices


def test_window_indices_pad_like_diffusion_policy():
    obs_idx, act_idx = window_indices(4, n_obs_steps=2, horizon=3)
    # Observation windows repeat the first obs; action chunks repeat the last action.
    np.testing.assert_array_equal(obs_idx, [[0, 0], [0, 1], [1, 2], [2, 3]])
    np.testing.assert_array_equal(act_idx, [[0, 1, 2], [1, 2, 3], [2, 3, 3], [3, 3, 3]])


def test_build_samples_shapes_and_ids(episodes):
    s = build_samples(episodes, n_obs_steps=2, horizon=4)
    n = sum(e.length for e in episodes)
    assert len(s) == n
    assert s.obs.shape == (n, 2, 6) and s.action.shape == (n, 4, 3)
    assert s.obs_keys == ("pos", "quat")  # sorted keys of the first episode
    assert s.episode_ids == [e.episode_id for e in episodes]
    first = episodes[1]
    rows = s.episode_slices()[first.episode_id]
    assert rows.numel() == first.length
    np.testing.assert_array_equal(s.step[rows].numpy(), np.arange(first.length))
    np.testing.assert_allclose(s.obs[rows[0], 0].numpy(), first.obs_vector(["pos", "quat"])[0])
    np.testing.assert_allclose(s.action[rows[-1]].numpy(), np.repeat(first.actions[-1:], 4, 0))
    assert s.episode_index[rows].unique().tolist() == [1]


def test_episode_key_is_stable_31_bit():
    expected = int.from_bytes(hashlib.sha256(b"demo_7").digest()[:4], "little") & 0x7FFFFFFF
    assert episode_key("demo_7") == expected
    assert 0 <= expected < 2**31


def test_build_samples_obs_keys_order(episodes):
    s = build_samples(episodes[:2], obs_keys=["quat", "pos"])
    assert s.obs_keys == ("quat", "pos")
    np.testing.assert_allclose(s.obs[0, 0, 0].item(), episodes[0].observations["quat"][0, 0])


def test_build_samples_mismatched_dims_name_episode_and_field(episodes):
    bad = Episode("odd_one", {"pos": np.zeros((5, 4)), "quat": np.zeros((5, 1))}, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"odd_one.*observation\.pos.*dim 4, expected 5"):
        build_samples([episodes[0], bad])
    bad_act = Episode("odd_act", {"pos": np.zeros((5, 5)), "quat": np.zeros((5, 1))}, np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"odd_act.*'action' has dim 2"):
        build_samples([episodes[0], bad_act])
    missing = Episode("no_quat", {"pos": np.zeros((5, 5))}, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"no_quat.*observation\.quat"):
        build_samples([episodes[0], missing])
    with pytest.raises(ValueError, match="no episodes"):
        build_samples([])
    with pytest.raises(ValueError, match="appears twice"):
        build_samples([episodes[0], episodes[0]])


@pytest.mark.parametrize("mode", ["gaussian", "minmax"])
def test_normalizer_clamps_near_constant_dims(episodes, mode):
    s = build_samples(episodes)
    norm = Normalizer(s.obs_dim, s.action_dim, mode=mode, min_spread=1e-2).fit(s.obs, s.action)
    x = norm.normalize_obs(s.obs)
    # Column 5 is the near-constant "quat" (std ~1e-6): clamped, so it stays ~0, not noise.
    assert x[..., 5].abs().max() < 1e-2
    assert norm.obs_scale[5].item() == pytest.approx(1e-2 if mode == "gaussian" else 5e-3)
    if mode == "gaussian":
        torch.testing.assert_close(x[..., :5].reshape(-1, 5).mean(0), torch.zeros(5), atol=1e-4, rtol=0)
        torch.testing.assert_close(x[..., :5].reshape(-1, 5).std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    else:
        a = norm.normalize_action(s.action)
        assert a.min() >= -1 - 1e-5 and a.max() <= 1 + 1e-5
        torch.testing.assert_close(a.amax(dim=(0, 1)), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.unnormalize_action(norm.normalize_action(s.action)), s.action, atol=1e-5, rtol=1e-5)


def test_normalizer_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        Normalizer(3, 2, mode="zscore")
    with pytest.raises(ValueError, match="obs dim 3"):
        Normalizer(3, 2).fit(torch.zeros(4, 1, 5), torch.zeros(4, 1, 2))
