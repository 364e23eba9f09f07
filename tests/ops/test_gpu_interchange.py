"""On a CUDA machine: GPU and CPU results are interchangeable (the same projection).

A feature computed on a GPU and one computed on a laptop must be usable in one store, so
for the same inputs and seed every GPU backend (``cuda``, ``triton``, and the ``torch``
reference on the device) must match the CPU C++ kernel and the CPU reference within the
float32 tolerance, the public ``ops`` entry points must route CUDA tensors to a GPU
backend under ``auto``, and the fused CUPID-Quality kernel must agree with the brute-force
definition on the device. Skipped without a GPU.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from cupid_engine import ops
from cupid_engine.ops import reference
from cupid_engine.ops.tolerances import max_rel_err, rtol

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

METHODS = ["dense", "sparse", "signshift"]


def _gpu_backends() -> list[str]:
    names = [b for b in ops.available_backends() if b in ("cuda", "triton")]
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in sys.modules:
        names = [b for b in names if b != "triton"]
    return names + ["torch"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(1, 100_003, 1000), (7, 65_537, 4096), (33, 4099, 37)], ids=str)
def test_gpu_backends_match_cpu_kernel(method, shape, generator):
    B, P, k = shape
    x = torch.randn(B, P, generator=generator)
    ref = reference.project(x.double(), k=k, method=method, seed=17)
    cpu = ops.project(x, k=k, method=method, seed=17, backend="cpu" if "cpu" in ops.available_backends() else "torch")
    assert max_rel_err(cpu, ref) < rtol(torch.float32)
    for backend in _gpu_backends():
        out = ops.project(x.cuda(), k=k, method=method, seed=17, backend=backend)
        assert out.device.type == "cuda" and out.dtype == torch.float32
        assert max_rel_err(out.cpu(), ref) < rtol(torch.float32), backend
        assert max_rel_err(out.cpu(), cpu) < 1e-5, backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_tensorsketch_matches_cpu(dtype, generator):
    B, T, O, I, k = 5, 3, 257, 130, 1000
    delta = torch.randn(B, T, O, generator=generator).to(dtype)
    x = torch.randn(B, T, I, generator=generator).to(dtype)
    ref = reference.tensorsketch(delta.double(), x.double(), k=k, seed=4)
    for backend in _gpu_backends():
        out = ops.tensorsketch(delta.cuda(), x.cuda(), k=k, seed=4, backend=backend)
        assert max_rel_err(out.cpu().double(), ref) < rtol(dtype), backend


def test_auto_routes_cuda_tensors_to_a_gpu_backend(generator):
    x = torch.randn(2, 3001, generator=generator)
    out = ops.project(x.cuda(), k=64, method="signshift", seed=1)
    assert out.device.type == "cuda"
    want = ops.project(x, k=64, method="signshift", seed=1)
    assert max_rel_err(out.cpu(), want) < 1e-5


def test_quality_kernel_on_gpu(rng):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton runs under the interpreter in this process")
    from cupid_engine.ops.quality import quality_minmax, quality_minmax_naive

    rl, dl = [1, 3, 17, 2, 70], [5, 1, 40, 3, 301, 2, 1, 7]
    r = torch.as_tensor(rng.standard_normal((sum(rl), 45)), dtype=torch.float32)
    d = torch.as_tensor(rng.standard_normal((sum(dl), 45)), dtype=torch.float32)
    ro, do = np.r_[0, np.cumsum(rl)], np.r_[0, np.cumsum(dl)]
    want = quality_minmax_naive(r.double(), ro, d.double(), do)
    got = quality_minmax(r.cuda(), ro, d.cuda(), do, backend="triton")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.double().cpu().numpy(), w.numpy(), rtol=1e-5, atol=1e-5)
    # `auto` on CUDA tensors is the Triton kernel; the torch reference runs on the GPU too
    # (its segment indices live on the input's device), float64 included.
    auto = quality_minmax(r.cuda(), ro, d.cuda(), do)
    assert all(torch.equal(a, b) for a, b in zip(auto, got))
    ref = quality_minmax(r.double().cuda(), ro, d.double().cuda(), do, backend="torch")
    for g, w in zip(ref, want):
        assert g.device.type == "cuda"
        np.testing.assert_allclose(g.cpu().numpy(), w.numpy(), rtol=1e-12, atol=1e-12)
