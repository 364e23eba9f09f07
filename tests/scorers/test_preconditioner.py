"""Preconditioner: damping default, whitening identity, train-only Gram, PD errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupid_engine.scorers.arrays import ArrayRun, ArrayStore
from cupid_engine.scorers.preconditioner import (
    DEFAULT_DAMPING,
    Preconditioner,
    PreconditionerConfig,
    concat_checkpoints,
)
from cupid_engine.scorers import score


def test_default_damping_is_positive():
    assert DEFAULT_DAMPING > 0 and PreconditionerConfig().damping == DEFAULT_DAMPING
    x = np.random.default_rng(0).standard_normal((50, 6))
    assert Preconditioner.from_features(x).ridge > 0


def test_whitened_inner_product_is_action_influence(rng):
    x = rng.standard_normal((40, 6))
    pre = Preconditioner.from_features(x, damping=0.01)
    g = x.T @ x / 40
    h = g + 0.01 * np.trace(g) / 6 * np.eye(6)
    a, b = rng.standard_normal((3, 6)), rng.standard_normal((4, 6))
    want = a @ np.linalg.solve(h, b.T)
    got = (pre.whiten(a) @ pre.whiten(b).T).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pre.inverse_apply(b).numpy(), np.linalg.solve(h, b.T).T, rtol=1e-10)
    # Linear: whitening a sum equals summing whitened rows (episode sums suffice).
    np.testing.assert_allclose(pre.whiten(b.sum(0)).numpy(), pre.whiten(b).sum(0).numpy(), rtol=1e-10)


def test_not_positive_definite_raises_with_hint():
    x = np.random.default_rng(1).standard_normal((3, 8))  # rank 3 < k = 8
    with pytest.raises(ValueError, match="increase the damping"):
        Preconditioner.from_features(x, damping=0.0)
    Preconditioner.from_features(x)  # default damping makes it PD
    with pytest.raises(ValueError, match="0 training steps"):
        Preconditioner(np.eye(3), 0)
    with pytest.raises(ValueError):
        PreconditionerConfig(damping=-1.0)


def test_gram_uses_train_split_only(rng, store_factory):
    st = store_factory(rng)
    run = st.run("base")
    train = [e for e, s in zip(st.catalog()["episode_id"].to_pylist(), st.catalog()["split"].to_pylist()) if s == "train"]
    x = np.concatenate([run.step_features(e) for e in train]).astype(np.float64)
    np.testing.assert_allclose(run.gram(), x.T @ x, rtol=1e-10)
    assert run.gram_count == len(x)
    # Changing holdout features changes neither the preconditioner nor the training scores.
    t1 = score("cupid", store=st, run="base")
    steps = {e: run.step_features(e) * (100.0 if e.startswith("holdout") else 1.0) for e in run._order}
    st2 = ArrayStore(st.catalog(), {"base": ArrayRun("base", steps, st.catalog(), dtype=np.float64)})
    t2 = score("cupid", store=st2, run="base")
    np.testing.assert_array_equal(t1["score"].to_numpy(), t2["score"].to_numpy())
    # A run whose Gram included holdout rows is refused.
    leaky = ArrayRun("leaky", steps, st.catalog(), gram_splits=("train", "holdout"))
    with pytest.raises(ValueError, match="training split only"):
        Preconditioner.from_run(leaky)


def test_checkpoint_ensemble_concatenation_averages(rng):
    a = [torch.as_tensor(rng.standard_normal((5, 4))) for _ in range(3)]
    b = [torch.as_tensor(rng.standard_normal((2, 4))) for _ in range(3)]
    got = concat_checkpoints(a) @ concat_checkpoints(b).T
    want = sum(x @ y.T for x, y in zip(a, b)) / 3
    torch.testing.assert_close(got, want)
