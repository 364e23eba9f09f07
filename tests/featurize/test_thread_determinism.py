"""A featurisation is the same bits whatever the torch thread count (issue 17).

Before the fixed-order spectral stage, this exact run (400 episodes, k = 1024, batches of
512 split over 2 threads at non-block boundaries) differed between 1 and 2 threads in 382
step values, 284 episode rows and most of the Gram, by up to 6e-8."""

from __future__ import annotations

import numpy as np
import torch

from cupid_engine.featurize import FeaturizeConfig, SyntheticSource, featurize
from cupid_engine.store import GradientStore


def _arrays(path):
    run = GradientStore.open(path).run("r")
    steps = np.concatenate([run.step_features(e) for e in run.store.episode_ids()])
    return {"steps": steps, "episodes": run.episode_features(), "gram": run.gram()}


def test_one_and_two_threads_give_identical_stores(tmp_path):
    from cupid_engine.policies import MLPPolicy, MLPPolicyConfig

    torch.manual_seed(0)
    policy = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=16, action_dim=4))
    cfg = FeaturizeConfig.for_method(k=1024, shard_size=64, dtype="float32", batch_size=512)
    before = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            src = SyntheticSource(400, steps=(10, 30), obs_dim=16, action_dim=4)
            featurize(src, tmp_path / f"t{n}.zarr", "r", policy=policy, config=cfg, progress=False)
            out[n] = _arrays(tmp_path / f"t{n}.zarr")
    finally:
        torch.set_num_threads(before)
    for key in out[1]:
        assert np.array_equal(out[1][key], out[2][key]), key  # bitwise


def test_policy_gemm_thread_and_split_independent(generator):
    # MKL splits this product's inner dimension over threads unless strict CNR is on
    # (cupid_engine/__init__.py sets MKL_CBWR before MKL's first call).
    import os

    assert os.environ.get("MKL_CBWR", "").upper().endswith("STRICT")
    a, w = torch.randn(37, 2048, generator=generator), torch.randn(64, 2048, generator=generator)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = a @ w.T
        torch.set_num_threads(2)
        two = a @ w.T
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    b = torch.randn(512, 512, generator=generator)
    assert torch.equal(torch.cat([b[i : i + 100] @ b.T for i in range(0, 512, 100)]), b @ b.T)
