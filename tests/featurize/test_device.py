"""``featurize(device=...)``: where the policy runs is a runtime choice, not part of the run.

A store may mix shards featurised on CPUs and GPUs, so the device is validated up front
(a missing GPU raises with a hint) and a CUDA run must reproduce the CPU run's features
to float32 rounding (``gpu`` test, skipped without a GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupid_engine.data import write_dataset
from cupid_engine.featurize import FeaturizeConfig, featurize
from cupid_engine.featurize.pipeline import check_device
from cupid_engine.policies import MLPPolicyConfig, TrainConfig, save_policy, train_policy
from cupid_engine.store import GradientStore

from fz_helpers import make_episodes


@pytest.fixture
def setup(tmp_path):
    episodes = make_episodes(n=7, length=5)
    data = write_dataset(tmp_path / "data", episodes, episodes_per_file=3)
    policy = train_policy(MLPPolicyConfig.tiny(), episodes, TrainConfig(steps=5, batch_size=16), progress=False)
    return episodes, data, save_policy(policy, tmp_path / "policy"), tmp_path


def _features(store_path, episodes):
    run = GradientStore.open(store_path).run("base")
    return np.concatenate([run.step_features(e.episode_id) for e in episodes])


def _cfg():
    return FeaturizeConfig.for_method(k=64, shard_size=3, dtype="float32", batch_size=5, output="loss")


def test_explicit_cpu_equals_default(setup):
    episodes, data, ckpt, tmp = setup
    featurize(str(data), tmp / "a.zarr", "base", policy=str(ckpt), config=_cfg(), progress=False)
    featurize(str(data), tmp / "b.zarr", "base", policy=str(ckpt), config=_cfg(), progress=False, device="cpu")
    np.testing.assert_array_equal(_features(tmp / "a.zarr", episodes), _features(tmp / "b.zarr", episodes))


def test_bad_devices_raise_before_anything_is_written(setup):
    _, data, ckpt, tmp = setup
    with pytest.raises(ValueError, match="not a torch device|cpu or cuda"):
        featurize(str(data), tmp / "c.zarr", "base", policy=str(ckpt), config=_cfg(), progress=False, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            featurize(str(data), tmp / "c.zarr", "base", policy=str(ckpt), config=_cfg(), progress=False,
                      device="cuda")
    assert not (tmp / "c.zarr").exists()
    assert check_device(None) is None and check_device("cpu") == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_matches_cpu_run(setup):
    episodes, data, ckpt, tmp = setup
    featurize(str(data), tmp / "cpu.zarr", "base", policy=str(ckpt), config=_cfg(), progress=False, device="cpu")
    featurize(str(data), tmp / "gpu.zarr", "base", policy=str(ckpt), config=_cfg(), progress=False, device="cuda")
    a, b = _features(tmp / "cpu.zarr", episodes), _features(tmp / "gpu.zarr", episodes)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5
    ga = GradientStore.open(tmp / "cpu.zarr").run("base").gram()
    gb = GradientStore.open(tmp / "gpu.zarr").run("base").gram()
    np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-6)
