"""CUPID-Quality: every fused-kernel backend vs the brute-force double loop, and the scorer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cupid_engine.scorers import score
from cupid_engine.scorers.preconditioner import Preconditioner
from cupid_engine.scorers.quality import (
    combine_quality,
    cpu_available,
    minmax_normalize,
    quality_minmax,
    quality_minmax_naive,
    quality_minmax_reference,
)

ROLLOUT_LENGTHS = [1, 3, 17, 2, 70]
DEMO_LENGTHS = [5, 1, 40, 3, 301, 2, 1, 7]  # odd, length 1, one longer than a CPU tile


def brute_force(r, r_len, d, d_len):
    """Python double loop over step pairs, float64."""
    ro, do = np.r_[0, np.cumsum(r_len)], np.r_[0, np.cumsum(d_len)]
    mm = np.empty((len(r_len), len(d_len)))
    xm = np.empty_like(mm)
    for t in range(len(r_len)):
        for e in range(len(d_len)):
            a = [[float(np.dot(r[i], d[j])) for j in range(do[e], do[e + 1])] for i in range(ro[t], ro[t + 1])]
            mm[t, e] = max(min(row) for row in a)
            xm[t, e] = min(max(row) for row in a)
    return mm, xm


def _ragged(rng, k=13):
    r = rng.standard_normal((sum(ROLLOUT_LENGTHS), k))
    d = rng.standard_normal((sum(DEMO_LENGTHS), k))
    return r, np.r_[0, np.cumsum(ROLLOUT_LENGTHS)], d, np.r_[0, np.cumsum(DEMO_LENGTHS)]


BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not cpu_available(), reason="C++ extension not built"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_kernel_equals_brute_force(rng, backend, dtype):
    r, ro, d, do = _ragged(rng)
    want = brute_force(r, ROLLOUT_LENGTHS, d, DEMO_LENGTHS)
    got = quality_minmax(torch.as_tensor(r, dtype=dtype), ro, torch.as_tensor(d, dtype=dtype), do, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.double().numpy(), w, rtol=tol, atol=tol)


def test_reference_block_size_does_not_matter(rng):
    r, ro, d, do = _ragged(rng)
    r, d = torch.as_tensor(r), torch.as_tensor(d)
    a = quality_minmax_reference(r, ro, d, do, block_elems=1)
    b = quality_minmax_reference(r, ro, d, do)
    c = quality_minmax_naive(r, ro, d, do)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)  # GEMM rounding varies with width
        torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-12)


def test_bad_offsets_raise(rng):
    r, d = torch.zeros(4, 3), torch.zeros(5, 3)
    with pytest.raises(ValueError, match="empty segment"):
        quality_minmax(r, [0, 2, 2, 4], d, [0, 5], backend="torch")
    with pytest.raises(ValueError, match="end at"):
        quality_minmax(r, [0, 3], d, [0, 5], backend="torch")


def test_triton_kernel_under_interpreter():
    """TRITON_INTERPRET must be set before triton is imported: run in a fresh process."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import numpy as np, torch
        from cupid_engine.ops.triton.quality import quality_minmax_triton
        from cupid_engine.scorers.quality import quality_minmax_naive
        g = torch.Generator().manual_seed(0)
        rl, dl = [1, 3, 17, 2], [5, 1, 19, 3, 2]
        r = torch.randn(sum(rl), 21, generator=g); d = torch.randn(sum(dl), 21, generator=g)
        ro, do = np.r_[0, np.cumsum(rl)], np.r_[0, np.cumsum(dl)]
        want = quality_minmax_naive(r.double(), ro, d.double(), do)
        got = quality_minmax_triton(r, ro, d, do)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.double().numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_scorer_matches_arrays_and_ignores_outcomes(store):
    run = store.run("base")
    pre = Preconditioner.from_run(run)
    cat = store.catalog().to_pylist()
    rollouts = [c["episode_id"] for c in cat if c["split"] == "rollout"]
    demos = [c["episode_id"] for c in cat if c["split"] == "train"]
    rs = [pre.whiten(run.step_features(e)).numpy() for e in rollouts]
    ds = [pre.whiten(run.step_features(e)).numpy() for e in demos]
    mm, xm = brute_force(np.concatenate(rs), [len(x) for x in rs], np.concatenate(ds), [len(x) for x in ds])
    perf = score("cupid", store=store, run="base")["score"].to_numpy()

    got = score("cupid-quality", store=store, run="base", dtype="float64", backend="torch", block_steps=7)
    want = 0.5 * minmax_normalize(perf) + 0.5 * minmax_normalize((mm - xm).mean(0))
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["quality"].to_numpy(), (mm - xm).mean(0), rtol=1e-9, atol=1e-12)

    official = score("cupid-quality", store=store, run="base", dtype="float64", weighting="official")
    want = 0.5 * minmax_normalize(perf) + 0.25 * minmax_normalize(-xm.sum(0)) + 0.25 * minmax_normalize(mm.sum(0))
    np.testing.assert_allclose(official["score"].to_numpy(), want, rtol=1e-9, atol=1e-12)

    alpha1 = score("cupid-quality", store=store, run="base", alpha=1.0)
    np.testing.assert_allclose(alpha1["score"].to_numpy(), minmax_normalize(perf), rtol=1e-12)

    # Ψ_qual ignores outcomes: flipping every rollout's success changes only Ψ_π.
    assert np.allclose(got["quality"].to_numpy(),
                       score("cupid-quality", store=store, run="base", dtype="float64", returns="01")["quality"].to_numpy())


def test_combine_quality_validates():
    with pytest.raises(ValueError):
        combine_quality(np.zeros(3), np.zeros((2, 3)), np.zeros((2, 3)), weighting="nope")
