"""The two exact routes of tensorsketch (``fft``: C++ lane-FFT kernel; ``dense``: GEMM +
combined hash) against the readable definitions, and the cost model that picks one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cupid_engine import ops
from cupid_engine.ops import cpu_backend, reference, tensorsketch_plan
from cupid_engine.ops.tolerances import max_rel_err

# (B, T, O, I, k): B not a multiple of the lane group (16 / 8), B = 1, odd dims, T up to 40,
# factors wider than k (colliding hashes), k from 8 to 1024 and one k that is no power of two.
SHAPES = [
    (1, 1, 1, 1, 8),
    (3, 1, 17, 13, 64),
    (19, 5, 31, 7, 128),
    (9, 40, 5, 9, 32),
    (2, 3, 300, 150, 256),
    (17, 2, 65, 129, 1024),
    (5, 7, 23, 11, 96),
]
IDS = ["B{}-T{}-O{}-I{}-k{}".format(*s) for s in SHAPES]


def _inputs(shape, generator, dtype=torch.float64):
    B, T, O, I, _ = shape
    delta = torch.randn(B, T, O, dtype=dtype, generator=generator)
    x = torch.randn(B, T, I, dtype=dtype, generator=generator) * torch.exp(torch.randn(B, T, 1, generator=generator, dtype=dtype))
    return delta, x


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("route", [("cpu", "fft"), ("cpu", "dense"), ("torch", "fft"), ("torch", "dense")], ids="-".join)
def test_routes_equal_the_definition_float64(route, shape, generator):
    backend, strategy = route
    delta, x = _inputs(shape, generator)
    k = shape[-1]
    want = reference.tensorsketch_materialized(delta, x, k=k, seed=7)
    got = ops.tensorsketch(delta, x, k=k, seed=7, backend=backend, strategy=strategy)
    assert got.dtype == torch.float64
    assert max_rel_err(got, want) < 1e-12


@pytest.mark.parametrize("shape", SHAPES[1:], ids=IDS[1:])
def test_fft_kernel_float32_against_pocketfft(shape, generator):
    """float32: the lane-FFT kernel and the torch.fft route are both within float32 rounding of
    the float64 definition (they differ from each other in the last bits only)."""
    delta, x = _inputs(shape, generator, torch.float32)
    k = shape[-1]
    want = reference.tensorsketch_materialized(delta.double(), x.double(), k=k, seed=3)
    kernel = ops.tensorsketch(delta, x, k=k, seed=3, backend="cpu", strategy="fft")
    pocket = reference.tensorsketch(delta, x, k=k, seed=3)
    assert kernel.dtype == torch.float32
    assert max_rel_err(kernel, want) < 2e-6
    assert max_rel_err(pocket, want) < 2e-6
    assert max_rel_err(kernel, pocket) < 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fft_kernel_independent_of_batch_split_and_threads(dtype, generator):
    """A sample's row is bit-identical whatever batch it is in, its lane, and the thread count."""
    delta, x = _inputs((37, 3, 50, 21, 256), generator, dtype)
    C = cpu_backend._C()
    before = C.num_threads()
    try:
        C.set_num_threads(2)
        full = cpu_backend.tensorsketch(delta, x, 256, 5, strategy="fft")
        C.set_num_threads(1)
        one = cpu_backend.tensorsketch(delta, x, 256, 5, strategy="fft")
    finally:
        C.set_num_threads(before)
    parts = torch.cat([cpu_backend.tensorsketch(delta[a:e], x[a:e], 256, 5, strategy="fft")
                       for a, e in ((0, 1), (1, 6), (6, 37))])
    shifted = cpu_backend.tensorsketch(delta[3:], x[3:], 256, 5, strategy="fft")  # every sample in another lane
    assert torch.equal(full, one)
    assert torch.equal(full, parts)
    assert torch.equal(full[3:], shifted)


def test_fft_kernel_fuses_layers_and_takes_strided_factors(generator):
    """Several layers in one call == the sum of per-layer sketches; factors may be strided views."""
    k = 128
    layers = []
    for seed, (T, O, I) in enumerate([(1, 9, 4), (6, 33, 17), (2, 3, 70)]):
        d = torch.randn(11, O, T, dtype=torch.float64, generator=generator).transpose(1, 2)  # stride(-1) != 1
        x = torch.randn(11, T, I + 3, dtype=torch.float64, generator=generator)[:, :, 1 : I + 1]  # strided rows
        layers.append((100 + seed, d.contiguous(), x))
    fused = cpu_backend.tensorsketch_fft_layers(layers, k)
    want = sum(reference.tensorsketch_materialized(d, x, k=k, seed=s) for s, d, x in layers)
    assert max_rel_err(fused, want) < 1e-12
    with pytest.raises(ValueError, match="unit stride"):
        cpu_backend.tensorsketch_fft_layers([(1, layers[0][1].transpose(1, 2), layers[0][2][:, :1, :1].expand(11, 9, 4))], k)


def test_fft_kernel_rejects_bad_k_and_dtypes(generator):
    d = torch.randn(2, 1, 3, generator=generator)
    with pytest.raises(ValueError, match="power of two"):
        cpu_backend.tensorsketch_fft_layers([(0, d, d)], 96)
    with pytest.raises(TypeError, match="mixed dtypes"):
        cpu_backend.tensorsketch_fft_layers([(0, d, d.double())], 64)


@pytest.mark.parametrize("strategy", ["fft", "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_routes_take_half_precision(strategy, dtype, generator):
    delta = torch.randn(5, 3, 40, generator=generator).to(dtype)
    x = torch.randn(5, 3, 30, generator=generator).to(dtype)
    want = reference.tensorsketch_materialized(delta.double(), x.double(), k=64, seed=2)
    got = ops.tensorsketch(delta, x, k=64, seed=2, backend="cpu", strategy=strategy)
    assert got.dtype == torch.float32
    assert max_rel_err(got, want) < 1e-5  # the inputs are exact in float32; float32 rounding only


def test_calibrate_measures_a_valid_model():
    from cupid_engine.ops import tensorsketch_calibrate

    cost = tensorsketch_calibrate.calibrate(k=64)
    assert isinstance(cost, tensorsketch_plan.CostModel)
    assert cost.lanes == cpu_backend._C().tensorsketch_lanes(0)


def test_hash_gradient_accumulates(generator):
    G = torch.randn(4, 13, 6, dtype=torch.float64, generator=generator)
    out = torch.ones(4, 32, dtype=torch.float64)
    cpu_backend.hash_gradient(G, 9, 32, out, accumulate=True)
    # G = sum_t e_t G[t]^T: the definition with T = O one-hot steps.
    want = reference.tensorsketch_materialized(torch.eye(13, dtype=torch.float64).expand(4, 13, 13), G, k=32, seed=9)
    assert max_rel_err(out - 1, want) < 1e-12


def test_cost_model_choice():
    # A Linear layer, one step: fft. A conv layer with hundreds of positions and a narrow
    # [O, I]: dense. The choice is a pure function of the shapes.
    assert tensorsketch_plan.choose("auto", 256, 1, 1024, 1024, 4096) == "fft"
    assert tensorsketch_plan.choose("auto", 32, 441, 64, 289, 4096) == "dense"
    assert tensorsketch_plan.choose("auto", 32, 1764, 32, 76, 4096) == "dense"
    assert tensorsketch_plan.choose("fft", 32, 1764, 32, 76, 4096) == "fft"
    # The crossover moves with T: a 256x256 layer is fft at one step and dense at many.
    assert tensorsketch_plan.choose("auto", 256, 1, 256, 256, 4096) == "fft"
    assert tensorsketch_plan.choose("auto", 256, 256, 256, 256, 4096) == "dense"
    with pytest.raises(ValueError, match="strategy"):
        tensorsketch_plan.choose("fast", 1, 1, 1, 1, 8)
    with pytest.raises(ValueError, match="strategy"):
        ops.tensorsketch(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), k=8, strategy="fast")


def test_cost_model_config_roundtrip_and_validation():
    c = tensorsketch_plan.DEFAULT_COST
    assert tensorsketch_plan.CostModel.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="c_flop"):
        dataclasses.replace(c, c_flop=-1.0)
    with pytest.raises(ValueError, match="lanes"):
        dataclasses.replace(c, lanes=0)
    assert all(f.metadata.get("help") for f in dataclasses.fields(c))


def _child_sketch(q):  # runs in a forked child
    g = torch.Generator().manual_seed(0)
    d, x = torch.randn(64, 2, 100, generator=g), torch.randn(64, 2, 50, generator=g)
    q.put(cpu_backend.tensorsketch(d, x, 256, 1, strategy="fft").sum().item())


def test_kernels_survive_fork():
    """A process forked after the parent ran the C++ tensorsketch kernels must be able to run
    them (an OpenMP thread pool does not survive fork: the child used to hang)."""
    import multiprocessing

    g = torch.Generator().manual_seed(0)
    d, x = torch.randn(64, 2, 100, generator=g), torch.randn(64, 2, 50, generator=g)
    C = cpu_backend._C()
    before = C.num_threads()
    C.set_num_threads(2)
    try:
        want = cpu_backend.tensorsketch(d, x, 256, 1, strategy="fft").sum().item()
        cpu_backend.tensorsketch(d, x, 256, 1, strategy="dense")
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child_sketch, args=(q,))
        p.start()
        p.join(60)
        if p.is_alive():
            p.kill()
            pytest.fail("the forked child hung in the tensorsketch kernel")
        assert p.exitcode == 0
        assert q.get(timeout=5) == want
    finally:
        C.set_num_threads(before)


@pytest.mark.parametrize("shape", [(19, 2, 3, 5, 4096), (5, 1, 7, 41, 2048), (9, 1, 1, 300, 1024)],
                         ids=lambda s: "B{}-T{}-O{}-I{}-k{}".format(*s))
def test_fft_kernel_skips_empty_columns_exactly(shape, generator):
    """Factors with few buckets leave most four-step input columns empty; the kernel skips
    those columns' FFTs (``live_columns`` in tensorsketch.cpp). Same sketch as the definition,
    and the same bytes whatever the batch split (partial lane groups, other lanes)."""
    from cupid_engine import constants as C

    B, T, O, I, k = shape
    m = k // 2
    m2 = 1 << (m.bit_length() - 1) // 2  # Plan: m2 = 2^(floor(log2 m / 2)), four-step for m > 64
    b1, _ = reference.countsketch_buckets(7, C.STREAM_TS_OUT, O, k)
    assert len({int(b) // 2 % m2 for b in b1}) < m2  # the test reaches a skipped column
    delta, x = _inputs(shape, generator)
    want = reference.tensorsketch_materialized(delta, x, k=k, seed=7)
    got = ops.tensorsketch(delta, x, k=k, seed=7, backend="cpu", strategy="fft")
    assert max_rel_err(got, want) < 1e-12
    d32, x32 = delta.float(), x.float()
    full = cpu_backend.tensorsketch(d32, x32, k, 7, strategy="fft")
    parts = torch.cat([cpu_backend.tensorsketch(d32[a:a + 2], x32[a:a + 2], k, 7, strategy="fft") for a in range(0, B, 2)])
    assert torch.equal(full, parts)
    assert max_rel_err(full.double(), want) < 2e-6
