"""Every available backend against the torch reference, plus the op contracts."""

from __future__ import annotations

import math

import pytest
import torch

from cupid_engine import ops
from cupid_engine.ops import reference
from cupid_engine.ops.tolerances import max_rel_err, rtol

# Both always: `make` builds the extension, so a missing `cpu` backend must fail these tests,
# not make its cases disappear.
CPU_BACKENDS = ["torch", "cpu"]
METHODS = ["dense", "sparse", "signshift"]

# (B, P, k, s): P prime, B = 1, k not a power of two nor a multiple of 32, P < k, P spanning
# several superblocks of the C++ kernel.
SHAPES = [
    (1, 7, 5, 1),
    (3, 1009, 100, 1),
    (2, 97, 130, 2),
    (5, 70001, 96, 4),
    (33, 40009, 64, 2),
    (4, 131101, 257, 1),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-P{}-k{}-s{}".format(*s))
def test_project_matches_reference_float64(backend, method, shape, generator):
    B, P, k, s = shape
    s = s if method == "sparse" else 1
    x = torch.randn(B, P, dtype=torch.float64, generator=generator)
    ref = reference.project(x, k=k, method=method, seed=11, s=s)
    out = ops.project(x, k=k, method=method, seed=11, s=s, backend=backend)
    assert out.dtype == torch.float64 and out.shape == (B, k)
    assert max_rel_err(out, ref) < rtol(torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_project_low_precision_inputs(backend, method, dtype, generator):
    x = torch.randn(3, 5003, generator=generator).to(dtype)
    ref = reference.project(x.double(), k=200, method=method, seed=3, s=2 if method == "sparse" else 1)
    out = ops.project(x, k=200, method=method, seed=3, s=2 if method == "sparse" else 1, backend=backend)
    assert out.dtype == torch.float32
    assert max_rel_err(out, ref) < rtol(dtype)


@pytest.mark.parametrize("method", METHODS)
def test_backends_agree_float32(method, generator):
    """cpu and torch agree within 1e-5 relative on the same fp32 inputs and seed."""
    x = torch.randn(6, 20011, generator=generator)
    outs = {b: ops.project(x, k=384, method=method, seed=5, backend=b) for b in CPU_BACKENDS}
    base = outs.pop("torch")
    for name, out in outs.items():
        assert max_rel_err(out, base) < 1e-5, name


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("method", METHODS)
def test_cpu_bit_identical_across_threads_and_batch_splits(method, generator):
    from cupid_engine import _C

    x = torch.randn(37, 300007, generator=generator)
    before = _C.num_threads()
    try:
        _C.set_num_threads(1)
        one = ops.project(x, k=256, method=method, seed=9, backend="cpu")
        _C.set_num_threads(3)
        three = ops.project(x, k=256, method=method, seed=9, backend="cpu")
    finally:
        _C.set_num_threads(before)
    split = torch.cat([ops.project(x[i : i + 5], k=256, method=method, seed=9, backend="cpu") for i in range(0, 37, 5)])
    single = torch.cat([ops.project(x[i : i + 1], k=256, method=method, seed=9, backend="cpu") for i in range(37)])
    assert torch.equal(one, three)
    assert torch.equal(one, split)
    assert torch.equal(one, single)


@pytest.mark.parametrize("method", METHODS)
def test_projection_is_linear_and_seeded(method, generator):
    x = torch.randn(2, 999, dtype=torch.float64, generator=generator)
    y = torch.randn(2, 999, dtype=torch.float64, generator=generator)
    p = lambda v, seed=1: ops.project(v, k=64, method=method, seed=seed)  # noqa: E731
    assert torch.allclose(p(2 * x - y), 2 * p(x) - p(y), atol=1e-10)
    assert not torch.allclose(p(x, 1), p(x, 2))
    assert torch.equal(p(x, 1), p(x, 1))


def test_sparse_hash_block_construction():
    """With s non-zeros, each coordinate hits s distinct buckets, one per block."""
    coords = torch.arange(5000)
    buckets, signs = reference.sparse_buckets(3, coords, 96, 4)
    block = 96 // 4
    for r in range(4):
        assert bool(((buckets[r] >= r * block) & (buckets[r] < (r + 1) * block)).all())
    assert set(signs.unique().tolist()) == {-1, 1}


def test_hash_matches_python_ints():
    from cupid_engine.ops import hashing as H

    key = H.stream_key(123456789012, 7)
    c = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    got = H.hash32(key, c).tolist()
    assert got == [H.hash32_int(key, int(v)) for v in c]
    assert all(0 <= g < 2**32 for g in got)


# ----------------------------------------------------------------------------- errors


def test_errors_are_clear():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        ops.project(torch.randn(10), k=4)
    with pytest.raises(ValueError, match="positive int"):
        ops.project(x, k=0)
    with pytest.raises(ValueError, match="method"):
        ops.project(x, k=4, method="gauss")
    with pytest.raises(ValueError, match="dividing k"):
        ops.project(x, k=10, method="sparse", s=3)
    with pytest.raises(TypeError, match="float"):
        ops.project(x.long(), k=4)
    with pytest.raises(ValueError, match="seed"):
        ops.project(x, k=4, seed=-1)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.project(x, k=4, backend="tpu")
    with pytest.raises(ValueError, match="disagree"):
        ops.tensorsketch(torch.randn(2, 3, 4), torch.randn(2, 4, 5), k=8)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        ops.tensorsketch(torch.randn(2, 4), torch.randn(2, 3, 5), k=8)
    with pytest.raises(TypeError, match="delta is"):
        ops.tensorsketch(torch.randn(2, 3, 4), torch.randn(2, 3, 5, dtype=torch.float64), k=8)


def test_missing_explicit_backend_raises_with_hint():
    if "cuda" in ops.available_backends():
        pytest.skip("cuda backend present")
    with pytest.raises(RuntimeError, match="not available"):
        ops.project(torch.randn(2, 10), k=4, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the mismatch")
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="is on"):
        ops.tensorsketch(torch.randn(2, 3, 4, device="cuda"), torch.randn(2, 3, 5), k=8)


def test_cpu_backend_rejects_cuda_tensors_before_any_pointer():
    from cupid_engine.ops import cpu_backend

    with pytest.raises(ValueError, match="expected cpu"):
        cpu_backend._check(torch.empty(0, device="meta"), "x")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_input_names_the_rows(backend, method, bad):
    x = torch.randn(4, 300)
    x[2, 17] = bad
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        ops.project(x, k=32, method=method, backend=backend)
    out = ops.project(x, k=32, method=method, backend=backend, check_finite=False)
    assert torch.isfinite(out[[0, 1, 3]]).all()


def test_auto_logs_its_choice_once(caplog):
    from cupid_engine.ops import registry

    registry._LOGGED.discard(("project", "cpu"))
    with caplog.at_level("INFO", logger="cupid_engine.ops"):
        ops.project(torch.randn(1, 10), k=4)
        ops.project(torch.randn(1, 10), k=4)
    msgs = [r.message for r in caplog.records if "backend='auto' chose" in r.message]
    assert len(msgs) == 1
