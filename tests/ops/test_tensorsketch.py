"""tensorsketch: FFT path == materialised definition, on every available CPU backend."""

from __future__ import annotations

import pytest
import torch

from cupid_engine import ops
from cupid_engine.ops import reference
from cupid_engine.ops.tolerances import max_rel_err, rtol

# Both always: `make` builds the extension, so a missing `cpu` backend must fail these tests,
# not make its cases disappear.
CPU_BACKENDS = ["torch", "cpu"]

# (B, T, O, I, k): T = 1, B = 1, odd dims, k not a power of two, k smaller than O and I.
SHAPES = [(1, 1, 1, 1, 1), (3, 1, 17, 13, 50), (2, 5, 31, 7, 97), (4, 16, 64, 33, 256), (1, 3, 200, 150, 12)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-O{}-I{}-k{}".format(*s))
def test_tensorsketch_equals_materialised(backend, shape, generator):
    B, T, O, I, k = shape
    delta = torch.randn(B, T, O, dtype=torch.float64, generator=generator)
    x = torch.randn(B, T, I, dtype=torch.float64, generator=generator)
    want = reference.tensorsketch_materialized(delta, x, k=k, seed=4)
    got = ops.tensorsketch(delta, x, k=k, seed=4, backend=backend)
    assert got.dtype == torch.float64
    assert max_rel_err(got, want) < 1e-9


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_tensorsketch_low_precision(backend, dtype, generator):
    delta = torch.randn(3, 4, 40, generator=generator).to(dtype)
    x = torch.randn(3, 4, 30, generator=generator).to(dtype)
    want = reference.tensorsketch_materialized(delta.double(), x.double(), k=64, seed=2)
    got = ops.tensorsketch(delta, x, k=64, seed=2, backend=backend)
    assert got.dtype == torch.float32
    # FFT round trip in float32 adds ~1e-6 relative on top of the summation order.
    assert max_rel_err(got, want) < 10 * rtol(dtype)


def test_tensorsketch_is_the_sketch_of_the_flattened_gradient(generator):
    """<TS(g1), TS(g2)> is an unbiased estimate of <vec G1, vec G2>: check exactly for k >= O*I
    where the bucket map can still collide, via the materialised definition on the outer product."""
    delta = torch.randn(1, 2, 5, dtype=torch.float64, generator=generator)
    x = torch.randn(1, 2, 3, dtype=torch.float64, generator=generator)
    G = torch.einsum("bto,bti->boi", delta, x).reshape(-1)
    sketch = ops.tensorsketch(delta, x, k=1, seed=0)
    # k = 1: every entry lands in bucket 0 with its sign, so the sketch is a signed sum.
    b1, s1 = reference.countsketch_buckets(0, 2001, 5, 1)
    b2, s2 = reference.countsketch_buckets(0, 2002, 3, 1)
    signs = (s1[:, None] * s2[None, :]).reshape(-1).double()
    assert torch.allclose(sketch[0, 0], (G * signs).sum())


def test_bias_as_appended_one(generator):
    """The bias gradient sum_t delta_t is the sketch column of an appended constant input."""
    delta = torch.randn(2, 3, 6, dtype=torch.float64, generator=generator)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=generator)
    x1 = torch.cat([x, torch.ones(2, 3, 1, dtype=torch.float64)], dim=2)
    want = reference.tensorsketch_materialized(delta, x1, k=16, seed=1)
    assert max_rel_err(ops.tensorsketch(delta, x1, k=16, seed=1), want) < 1e-9
