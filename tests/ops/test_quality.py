"""The CUPID-Quality op: every backend against the reference (float64, odd shapes), the contracts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cupid_engine import ops
from cupid_engine.ops import quality as Q
from cupid_engine.ops import registry as reg
from cupid_engine.ops import reference_quality
from cupid_engine.ops.tolerances import max_rel_err, rtol

# Both always: `make` builds the extension, so a missing `cpu` backend fails these tests.
CPU_BACKENDS = ["torch", "cpu"]

# Ragged (rollout lengths, demo lengths, k). Lengths 1, odd k, a demo longer than a C++
# tile (240 columns), k across one, two and three k slices (128) of the C++ kernel, more
# rollout rows than one C++ row block (512) with a rollout cut by the block boundary,
# tiles holding many one-step demos.
SHAPES = [
    ([1, 3, 17, 2, 70], [5, 1, 40, 3, 301, 2, 1, 7], 13),
    ([1], [1], 1),
    ([2, 1], [1, 1, 1, 2], 129),
    ([1, 3, 17, 2, 600, 70, 5], [250, 241, 1, 1, 600, 3], 257),
    ([40] * 15 + [1] * 9, [1] * 300 + [7] * 30, 31),
]


def brute_force(r, r_len, d, d_len):
    """Python double loop over step pairs, float64: independent of torch's reductions."""
    ro, do = np.r_[0, np.cumsum(r_len)], np.r_[0, np.cumsum(d_len)]
    mm = np.empty((len(r_len), len(d_len)))
    xm = np.empty_like(mm)
    for t in range(len(r_len)):
        for e in range(len(d_len)):
            a = [[float(np.dot(r[i], d[j])) for j in range(do[e], do[e + 1])] for i in range(ro[t], ro[t + 1])]
            mm[t, e] = max(min(row) for row in a)
            xm[t, e] = min(max(row) for row in a)
    return mm, xm


def _inputs(shape, generator, dtype=torch.float64):
    r_len, d_len, k = shape
    r = torch.randn(sum(r_len), k, dtype=torch.float64, generator=generator).to(dtype)
    d = torch.randn(sum(d_len), k, dtype=torch.float64, generator=generator).to(dtype)
    return r, np.r_[0, np.cumsum(r_len)], d, np.r_[0, np.cumsum(d_len)]


def _shape_id(s):
    return f"m{len(s[0])}-rows{sum(s[0])}-n{len(s[1])}-cols{sum(s[1])}-k{s[2]}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_reference_float64(backend, shape, generator):
    r, ro, d, do = _inputs(shape, generator)
    want = Q.quality_minmax_reference(r, ro, d, do)
    got = ops.quality_minmax(r, ro, d, do, backend=backend)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and g.shape == (len(ro) - 1, len(do) - 1)
        assert max_rel_err(g, w) < rtol(torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_brute_force_double_loop(backend, generator):
    shape = SHAPES[0]
    r, ro, d, do = _inputs(shape, generator)
    want = brute_force(r.numpy(), shape[0], d.numpy(), shape[1])
    got = ops.quality_minmax(r, ro, d, do, backend=backend)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[::3], ids=_shape_id)
def test_float32_within_tolerance_of_float64_reference(backend, shape, generator):
    r, ro, d, do = _inputs(shape, generator, torch.float32)
    want = Q.quality_minmax_reference(r.double(), ro, d.double(), do)
    got = ops.quality_minmax(r, ro, d, do, backend=backend)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert max_rel_err(g, w) < rtol(torch.float32)


def test_reference_block_size_and_naive_agree(generator):
    r, ro, d, do = _inputs(SHAPES[0], generator)
    a = Q.quality_minmax_reference(r, ro, d, do, block_elems=1)
    b = Q.quality_minmax_reference(r, ro, d, do)
    c = Q.quality_minmax_naive(r, ro, d, do)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)  # GEMM rounding varies with width
        torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-12)


def test_cpu_bit_identical_across_thread_counts(generator):
    """Several row blocks and demo chunks: the work split follows the thread count, the sums do not."""
    from cupid_engine import _C

    r, ro, d, do = _inputs(SHAPES[3], generator, torch.float32)
    before = _C.num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            _C.set_num_threads(n)
            outs.append(ops.quality_minmax(r, ro, d, do, backend="cpu"))
    finally:
        _C.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_cpu_is_one_fma_chain_in_k_order(generator):
    """Splitting D into demo subsets or R into rollout subsets changes no bit (no blocking in the sums)."""
    r, ro, d, do = _inputs(SHAPES[3], generator, torch.float32)
    whole = ops.quality_minmax(r, ro, d, do, backend="cpu")
    half = int(do[3])
    left = ops.quality_minmax(r, ro, d[:half], do[:4], backend="cpu")
    right = ops.quality_minmax(r, ro, d[half:], do[3:] - half, backend="cpu")
    for w, a, b in zip(whole, left, right):
        assert torch.equal(w, torch.cat([a, b], 1))
    cut = int(ro[4])
    top = ops.quality_minmax(r[:cut], ro[:5], d, do, backend="cpu")
    for w, a in zip(whole, top):
        assert torch.equal(w[:4], a)


def test_bad_inputs_raise():
    r, d = torch.zeros(4, 3), torch.zeros(5, 3)
    with pytest.raises(ValueError, match="empty segment"):
        ops.quality_minmax(r, [0, 2, 2, 4], d, [0, 5])
    with pytest.raises(ValueError, match="end at"):
        ops.quality_minmax(r, [0, 3], d, [0, 5])
    with pytest.raises(ValueError, match="equal K"):
        ops.quality_minmax(r, [0, 4], torch.zeros(5, 2), [0, 5])
    with pytest.raises(TypeError, match="dtype"):
        ops.quality_minmax(r, [0, 4], d.double(), [0, 5])
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.quality_minmax(r, [0, 4], d, [0, 5], backend="cuda")


def test_auto_uses_the_extension_on_cpu_and_never_an_op_less_backend(monkeypatch):
    reg._LOGGED.discard((Q.OP, "cpu"))
    assert reg.resolve("auto", "cpu", Q.OP).name == "cpu"
    # A backend without the op never wins `auto`, whatever its priority, and asking for it raises.
    fake = reg.Backend("fast", ("cpu",), "cupid_engine.ops.torch_backend", lambda: True, "", 99)
    monkeypatch.setitem(reg._REGISTRY, "fast", fake)
    assert reg.resolve("auto", "cpu", Q.OP).name == "cpu"
    assert reg.resolve("auto", "cpu", "project").name == "fast"
    with pytest.raises(ValueError, match="does not implement quality_minmax"):
        reg.resolve("fast", "cpu", Q.OP)


def test_backends_listed_match_the_registry():
    assert Q.BACKENDS == ("auto", "torch", "cpu", "triton")
    assert not reg.get("cuda").supports(Q.OP)
    # The scorer module re-exports the op (benchmarks and older callers import it there).
    from cupid_engine.scorers import quality as scorer_quality

    assert scorer_quality.quality_minmax is ops.quality_minmax
    assert reference_quality.quality_minmax is not None


def test_triton_backend_under_interpreter():
    """TRITON_INTERPRET must be set before triton is imported: run in a fresh process."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import numpy as np, torch
        from cupid_engine import ops
        from cupid_engine.ops import quality as Q
        from cupid_engine.ops.tolerances import max_rel_err
        g = torch.Generator().manual_seed(0)
        for rl, dl, k in (([1, 3, 17, 2], [5, 1, 19, 3, 2], 21), ([2], [1, 33], 1)):
            r = torch.randn(sum(rl), k, generator=g); d = torch.randn(sum(dl), k, generator=g)
            ro, do = np.r_[0, np.cumsum(rl)], np.r_[0, np.cumsum(dl)]
            want = Q.quality_minmax_reference(r.double(), ro, d.double(), do)
            got = ops.quality_minmax(r, ro, d, do, backend="triton")
            for a, b in zip(got, want):
                assert a.dtype == torch.float32 and a.shape == b.shape
                assert max_rel_err(a, b) < 1e-5, max_rel_err(a, b)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
