"""CUPID-Quality scorer: scores vs the per-pair min/max of the whitened features (the op itself,
against a Python double loop: tests/ops/test_quality.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cupid_engine.ops.quality import quality_minmax_naive
from cupid_engine.scorers import score
from cupid_engine.scorers.preconditioner import Preconditioner
from cupid_engine.scorers.quality import combine_quality, minmax_normalize


def pairwise_minmax(rs, ds):
    """``(maxmin, minmax) [M, N]`` float64 of whitened step features ``rs``/``ds`` (lists of
    ``[T, K]``), one matmul per (rollout, demo) pair: the op's naive form, which
    tests/ops/test_quality.py checks against a Python double loop."""
    offsets = [np.r_[0, np.cumsum([len(x) for x in xs])] for xs in (rs, ds)]
    mm, xm = quality_minmax_naive(np.concatenate(rs), offsets[0], np.concatenate(ds), offsets[1])
    return mm.numpy(), xm.numpy()


def test_scorer_matches_arrays_and_ignores_outcomes(store):
    run = store.run("base")
    pre = Preconditioner.from_run(run)
    cat = store.catalog().to_pylist()
    rollouts = [c["episode_id"] for c in cat if c["split"] == "rollout"]
    demos = [c["episode_id"] for c in cat if c["split"] == "train"]
    rs = [pre.whiten(run.step_features(e)).numpy() for e in rollouts]
    ds = [pre.whiten(run.step_features(e)).numpy() for e in demos]
    mm, xm = pairwise_minmax(rs, ds)
    perf = score("cupid", store=store, run="base", baseline="none")["score"].to_numpy()  # the paper's, as cupid-quality

    got = score("cupid-quality", store=store, run="base", dtype="float64", backend="torch", block_steps=7)
    want = 0.5 * minmax_normalize(perf) + 0.5 * minmax_normalize((mm - xm).mean(0))
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["quality"].to_numpy(), (mm - xm).mean(0), rtol=1e-9, atol=1e-12)

    official = score("cupid-quality", store=store, run="base", dtype="float64", weighting="official")
    want = 0.5 * minmax_normalize(perf) + 0.25 * minmax_normalize(-xm.sum(0)) + 0.25 * minmax_normalize(mm.sum(0))
    np.testing.assert_allclose(official["score"].to_numpy(), want, rtol=1e-9, atol=1e-12)

    # The C++ kernel (the default on CPU) gives the same scores in float64.
    cpu = score("cupid-quality", store=store, run="base", dtype="float64", backend="cpu", block_steps=7)
    np.testing.assert_allclose(cpu["quality"].to_numpy(), (mm - xm).mean(0), rtol=1e-9, atol=1e-12)

    alpha1 = score("cupid-quality", store=store, run="base", alpha=1.0)
    np.testing.assert_allclose(alpha1["score"].to_numpy(), minmax_normalize(perf), rtol=1e-12)

    # Ψ_qual ignores outcomes: flipping every rollout's success changes only Ψ_π.
    assert np.allclose(got["quality"].to_numpy(),
                       score("cupid-quality", store=store, run="base", dtype="float64", returns="01")["quality"].to_numpy())


def test_combine_quality_validates():
    with pytest.raises(ValueError):
        combine_quality(np.zeros(3), np.zeros((2, 3)), np.zeros((2, 3)), weighting="nope")
