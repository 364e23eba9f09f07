"""The CUDA kernels (``csrc/cuda``) are built when a toolkit is present, and match the reference on a GPU.

Build checks run everywhere nvcc is on PATH, so a broken or silently skipped CUDA build
cannot go unnoticed on a machine without a GPU. Runtime checks (``gpu`` marker) compare
the ``cuda`` backend with ``ops/reference.py`` in float64 and in each input dtype.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

SEED = 20251123
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: the CUDA kernels are not built")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def ext():
    try:
        from cupid_engine import _C
    except ImportError as e:  # pragma: no cover - the extension is part of the install
        pytest.fail(f"cupid_engine._C is not built: {e}")
    return _C


@needs_nvcc
def test_extension_built_with_cuda(ext):
    assert ext.has_cuda(), "nvcc is on PATH but cupid_engine._C was built without CUDA (CUPID_WITH_CUDA unset)"


@needs_nvcc
@pytest.mark.parametrize("name", ["project_cuda", "countsketch_pair_cuda"])
def test_cuda_entry_points_are_bound(ext, name):
    assert hasattr(ext, name), f"cupid_engine._C has no {name}: the csrc/cuda bindings are missing"


@needs_nvcc
def test_host_checks_run_before_any_cuda_call(ext):
    with pytest.raises(ValueError, match="unknown projection method"):
        ext.project_cuda(0, 0, 1, 10, 10, 8, 7, 0, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="sparse needs"):
        ext.project_cuda(0, 0, 1, 10, 10, 8, 1, 0, 0, 3, 0, 0)
    with pytest.raises(ValueError, match="unsupported dtype|k > 0"):
        ext.project_cuda(0, 0, 1, 10, 10, 0, 0, 0, 0, 1, 0, 0)


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")
def test_no_gpu_raises_instead_of_crashing():
    # In a subprocess: if the launcher touched the null pointers, only the child dies.
    code = (
        "import cupid_engine._C as c\n"
        "try:\n"
        "    c.project_cuda(0, 0, 1, 10, 10, 8, 0, 0, 0, 1, 0, 0)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RAISED cupid._C (cuda)" in proc.stdout


def test_cuda_backend_rejects_cpu_tensors():
    from cupid_engine.ops import cuda_backend

    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        cuda_backend.project(torch.zeros(2, 8), 4, "dense", 0, 1)
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        cuda_backend.tensorsketch(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), 4, 0)


# --------------------------------------------------------------------------- runtime (GPU)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", ["dense", "sparse", "signshift"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gpu_project_matches_reference(method, dtype):
    import cupid_engine.ops as ops
    from cupid_engine.ops import reference as R
    from cupid_engine.ops import tolerances as T

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(SEED)
    # Odd shapes; P = 300_007 spans several coordinate splits; B = 9 crosses row tiles.
    for B, P, k, s in [(1, 293, 40, 1), (9, 300_007, 1000, 4), (3, 70_001, 4096, 1), (2, 5, 37, 1)]:
        x = torch.randn(B, P, generator=gen, dtype=torch.float64).to(dt)
        out = ops.project(x.cuda(), k=k, method=method, seed=SEED, s=s, backend="cuda")
        assert out.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
        ref = R.project(x, k=k, method=method, seed=SEED, s=s)
        err = T.max_rel_err(out, ref)
        assert err <= T.rtol(dt), f"{method} {dtype} {(B, P, k, s)}: {err:.3g}"
        if method != "sparse":  # sparse scatters with float atomics
            again = ops.project(x.cuda(), k=k, method=method, seed=SEED, s=s, backend="cuda")
            assert torch.equal(out, again), "not bit-reproducible"
            alone = ops.project(x[-1:].cuda(), k=k, method=method, seed=SEED, s=s, backend="cuda")
            assert torch.equal(out[-1:], alone), "a row depends on its batch"


@pytest.mark.gpu
@needs_gpu
def test_gpu_signs_and_buckets_are_exact():
    from cupid_engine.ops import cuda_backend
    from cupid_engine.ops import reference as R

    P, k = 77, 70
    eye = torch.eye(P, dtype=torch.float64, device="cuda")
    coords = torch.arange(P)
    dense = cuda_backend.project(eye, k, "dense", SEED, 1).cpu() * k**0.5
    assert torch.equal(dense, R.dense_signs(SEED, coords, k).double())
    b, sg = R.signshift_buckets(SEED, coords, k)
    want = torch.zeros(P, k, dtype=torch.float64)
    want[coords, b] = sg.double()
    assert torch.equal(cuda_backend.project(eye, k, "signshift", SEED, 1).cpu(), want)
    b, sg = R.sparse_buckets(SEED, coords, k, 5)
    want = torch.zeros(P, k, dtype=torch.float64)
    for r in range(5):
        want[coords, b[r]] += sg[r].double()
    assert torch.equal(cuda_backend.project(eye, k, "sparse", SEED, 5).cpu() * 5**0.5, want)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gpu_tensorsketch_matches_reference(dtype):
    import cupid_engine.ops as ops
    from cupid_engine.ops import cuda_backend
    from cupid_engine.ops import reference as R
    from cupid_engine.ops import tolerances as T

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(SEED)
    for B, Tn, O, I, k in [(1, 1, 17, 29, 37), (4, 7, 300, 513, 1000), (2, 3, 1000, 5, 4096)]:
        delta = torch.randn(B, Tn, O, generator=gen, dtype=torch.float64).to(dt)
        x = torch.randn(B, Tn, I, generator=gen, dtype=torch.float64).to(dt)
        cs1, cs2 = cuda_backend.countsketch_pair(delta.cuda(), x.cuda(), k, SEED)
        r1, r2 = R.countsketch_pair(delta, x, k=k, seed=SEED)
        assert max(T.max_rel_err(cs1, r1), T.max_rel_err(cs2, r2)) <= T.rtol(dt)
        out = ops.tensorsketch(delta.cuda(), x.cuda(), k=k, seed=SEED, backend="cuda")
        assert T.max_rel_err(out, R.tensorsketch(delta, x, k=k, seed=SEED)) <= T.rtol(dt)
