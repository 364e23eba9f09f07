"""The int8 scan against its float64 reference, and the sq8 index against exact search (its
certified re-rank returns the exact top-k whatever the re-rank depth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupid_engine.index.faiss_index import InfluenceIndex, recall_at_k
from cupid_engine.index.quantized import QMAX, quantize_rows, scan, scan_reference


@pytest.mark.parametrize("n,k", [(1, 1), (3, 15), (17, 16), (33, 1027), (5, 4096)])
def test_scan_matches_reference(rng, n, k):
    x = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.1, 10, size=(n, 1)).astype(np.float32)
    codes, scales = quantize_rows(x)
    q = rng.standard_normal(k).astype(np.float32)
    got = scan(codes, scales, q).astype(np.float64)
    want = scan_reference(codes, scales, q)  # exact integer sums: only the final float scaling rounds
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_quantisation_error_bound(rng):
    x = rng.standard_normal((50, 300)).astype(np.float32)
    x[3] = 0.0  # an all-zero row
    codes, scales = quantize_rows(x)
    assert codes.dtype == np.int8 and np.abs(codes).max() <= QMAX and scales[3] == 0
    err = np.abs(codes * scales[:, None] - x)
    assert (err <= 0.5 * scales[:, None] * (1 + 1e-5) + 1e-12).all()
    q = rng.standard_normal(300).astype(np.float32)
    qs = float(np.abs(q).max() / QMAX)
    bound = 0.5 * scales * np.abs(q).sum() + 0.5 * qs * np.abs(x).sum(axis=1) + 1e-4
    assert (np.abs(scan_reference(codes, scales, q) - x.astype(np.float64) @ q) <= bound).all()


def test_scan_is_thread_count_independent(rng):
    from cupid_engine import _C

    # Above the scan's serial threshold (read from the extension), or both runs are serial.
    d = 515
    n = _C.serial_thresholds()["scan_bytes"] // d + 257
    assert n * d >= _C.serial_thresholds()["scan_bytes"]
    codes, scales = quantize_rows(rng.standard_normal((n, d), dtype=np.float32))
    q = rng.standard_normal(d).astype(np.float32)
    before = _C.num_threads()
    try:
        _C.set_num_threads(1)
        one = scan(codes, scales, q)
        _C.set_num_threads(2)
        two = scan(codes, scales, q)
    finally:
        _C.set_num_threads(before)
    assert one.tobytes() == two.tobytes()


def test_sq8_returns_exact_scores_and_finds_the_exact_top(rng, tmp_path):
    n, d = 3000, 64
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = [f"ep{i:05d}" for i in range(n)]
    flat, sq8 = InfluenceIndex(d), InfluenceIndex(d, kind="sq8", rerank=100)
    for idx in (flat, sq8):
        idx.add(x[:1000], ids[:1000])
        idx.add(x[1000:], ids[1000:])  # appends keep codes aligned with ids
    q = rng.standard_normal((4, d)).astype(np.float32)
    fs, fi = flat.search(q, 10)
    ss, si = sq8.search(q, 10)
    assert si == fi
    for b in range(4):
        exact = np.array([x[ids.index(e)] @ q[b] for e in si[b]], np.float32)
        np.testing.assert_allclose(ss[b], exact, rtol=1e-5)
    sq8.save(tmp_path)
    back = InfluenceIndex.load(tmp_path, "sq8")
    assert back.search(q, 10)[1] == si
    assert np.array_equal(back.codes, sq8.codes) and np.array_equal(back.scales, sq8.scales)


def test_sq8_rerank_bounds(rng):
    idx = InfluenceIndex(8, kind="sq8", rerank=3)
    x = rng.standard_normal((20, 8)).astype(np.float32)
    idx.add(x, [str(i) for i in range(20)])
    scores, found = idx.search(x[0], 5)  # k > rerank: re-ranks k candidates
    assert len(found[0]) == 5
    with pytest.raises(ValueError, match="rerank"):
        InfluenceIndex(8, kind="sq8", rerank=0)
    assert torch.is_tensor(idx.vectors())


def _spread(rng, n, d):
    """Hard rows for int8 ranking: a third near-duplicates of one direction (their scores
    differ by less than the quantisation error), the rest with norms over two decades,
    and a few exact zeros."""
    x = rng.standard_normal((n, d)) * np.exp(rng.uniform(-2.3, 2.3, size=(n, 1)))
    x[: n // 3] = 8.0 * rng.standard_normal(d) + 0.02 * rng.standard_normal((n // 3, d))
    x[::97] = 0.0
    return x.astype(np.float32)


@pytest.mark.parametrize("d", [7, 64, 300])
def test_certificate_widens_until_the_top_is_exact(rng, d):
    n, k = 4000, 10
    x = _spread(rng, n, d)
    ids = [f"e{i}" for i in range(n)]
    flat = InfluenceIndex(d)
    flat.add(x, ids)
    q = rng.standard_normal((12, d)).astype(np.float32)
    want_scores, want = flat.search(q, k)
    loose = InfluenceIndex(d, kind="sq8", rerank=k, certify=False)  # no margin at all
    loose.add(x, ids)
    assert recall_at_k(loose.search(q, k)[1], want) < 1.0  # the depth alone misses some
    assert all(s["widened"] == 0 for s in loose.last_search)
    sure = InfluenceIndex(d, kind="sq8", rerank=k)
    sure.add(x, ids)
    scores, got = sure.search(q, k)
    assert got == want
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6 * np.abs(want_scores).max())
    assert sum(s["widened"] for s in sure.last_search) > 0
    assert all(s["reranked"] == k + s["widened"] for s in sure.last_search)


def test_k_above_rerank_is_widened_not_missed(rng):
    x = _spread(rng, 2000, 33)
    ids = [str(i) for i in range(2000)]
    flat, sq8 = InfluenceIndex(33), InfluenceIndex(33, kind="sq8", rerank=3)
    flat.add(x, ids)
    sq8.add(x, ids)
    q = rng.standard_normal((4, 33)).astype(np.float32)
    assert sq8.search(q, 25)[1] == flat.search(q, 25)[1]  # 25 requested > rerank 3
    assert all(s["reranked"] >= 25 for s in sq8.last_search)


def test_certificate_falls_back_to_one_fp32_pass_when_most_rows_are_in_doubt(rng):
    n, d = 1500, 48
    x = (5.0 * rng.standard_normal(d) + 0.01 * rng.standard_normal((n, d))).astype(np.float32)  # all near-equal
    ids = [str(i) for i in range(n)]
    flat, sq8 = InfluenceIndex(d), InfluenceIndex(d, kind="sq8", rerank=16)
    flat.add(x, ids)
    sq8.add(x, ids)
    q = rng.standard_normal((3, d)).astype(np.float32)
    assert sq8.search(q, 10)[1] == flat.search(q, 10)[1]
    assert all(s == {"reranked": n, "widened": n - 16} for s in sq8.last_search)
