"""The ``triton`` backend against the torch reference (``ops/reference.py``).

On a CPU machine Triton runs only under its interpreter, and ``TRITON_INTERPRET=1`` must
be set before ``triton`` is first imported (and before ``cupid_engine.ops`` is imported,
which decides the backend's devices at import). Other test modules in this pytest
process may already have imported both, so the interpreted checks run once, in a fresh
subprocess that executes this very file as a script with ``TRITON_INTERPRET=1`` in its
environment (``__main__`` below): it computes every case and prints one JSON record per
case; the tests here assert on those records. The variable is deliberately not set in
the pytest process itself: that would switch every later import of triton in the
session (including the compiled ``gpu`` tests below) to the interpreter.
Interpreted shapes stay tiny (B <= 3, P <= 300, k <= 64), with odd shapes: P prime,
B = 1, k not a power of two and not a multiple of 32.

On a CUDA machine the ``gpu`` tests run the same comparisons on the device, compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SEED = 20251123

# (B, P, k, s): P prime or small, k odd / not a multiple of 32, B = 1.
PROJECT_SHAPES = [(1, 293, 40, 1), (3, 257, 37, 1), (2, 300, 64, 4), (3, 7, 64, 2), (1, 131, 1, 1)]
PROJECT_CASES = [
    (method, dtype, shape)
    for method in ("dense", "sparse", "signshift")
    for dtype in DTYPES
    for shape in PROJECT_SHAPES
    if not (method != "sparse" and shape[3] != 1 and dtype != "float64")  # s only matters for sparse
]
# (B, T, O, I, k)
SKETCH_SHAPES = [(1, 1, 17, 29, 37), (2, 3, 33, 5, 64), (3, 2, 64, 65, 40)]
SKETCH_CASES = [(dtype, shape) for dtype in DTYPES for shape in SKETCH_SHAPES]


def _case_id(*parts) -> str:
    return "-".join(str(p).replace(" ", "").replace(",", "x").strip("()") for p in parts)


# --------------------------------------------------------------------------- subprocess


def _run_cases() -> dict[str, dict]:
    """Executed in the interpreter subprocess: every case -> a JSON-able record."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import triton  # noqa: F401  (first import, under the interpreter)

    import cupid_engine.ops as ops
    from cupid_engine.ops import reference as R
    from cupid_engine.ops import tolerances as T
    from cupid_engine.ops import triton as TB
    from cupid_engine.ops.triton import projection as TP

    gen = torch.Generator().manual_seed(SEED)
    res: dict[str, dict] = {}

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    for method, dname, (B, P, k, s) in PROJECT_CASES:
        dt = DTYPES[dname]
        x = randn(B, P, dtype=dt)
        out = TB.project(x, k, method, SEED, s)
        ref = R.project(x, k=k, method=method, seed=SEED, s=s)
        res[_case_id("project", method, dname, (B, P, k, s))] = {
            "err": T.max_rel_err(out, ref),
            "rtol": T.rtol(dt),
            "dtype": str(out.dtype),
            "shape": list(out.shape),
            "expected_dtype": str(ref.dtype),
        }

    # Signs and buckets bit for bit: project the identity, read the matrix back exactly.
    P, k = 37, 40
    eye = torch.eye(P, dtype=torch.float64)
    coords = torch.arange(P)
    dense = TB.project(eye, k, "dense", SEED, 1) * k**0.5
    want = R.dense_signs(SEED, coords, k).double()
    res["exact-dense"] = {"ok": bool(torch.equal(dense, want))}
    for s in (1, 4):
        got = TB.project(eye, k, "sparse", SEED, s) * s**0.5
        b, sg = R.sparse_buckets(SEED, coords, k, s)
        want = torch.zeros(P, k, dtype=torch.float64)
        for r in range(s):
            want[coords, b[r]] += sg[r].double()
        res[f"exact-sparse-s{s}"] = {"ok": bool(torch.equal(got, want))}
    for kk in (40, 7, 64):
        got = TB.project(eye, kk, "signshift", SEED, 1)
        b, sg = R.signshift_buckets(SEED, coords, kk)
        want = torch.zeros(P, kk, dtype=torch.float64)
        want[coords, b] = sg.double()
        res[f"exact-signshift-k{kk}"] = {"ok": bool(torch.equal(got, want))}
    for stream, n in ((2001, 19), (2002, 23), (2001, 50), (2002, 61)):  # injective (n <= k) and hashed
        key_in = torch.eye(n, dtype=torch.float64)
        cs1, cs2 = TB.countsketch_pair(key_in[None], key_in[None], 37, SEED)
        b, sg = R.countsketch_buckets(SEED, stream, n, 37)
        want = torch.zeros(n, 37, dtype=torch.float64)
        want[torch.arange(n), b] = sg.double()
        got = cs1[0] if stream == 2001 else cs2[0]
        res[f"exact-countsketch-{stream}-n{n}"] = {"ok": bool(torch.equal(got, want))}
    # Same order of additions as the C++ CPU kernel: bit-identical float32 CountSketches.
    try:
        from cupid_engine.ops import cpu_backend

        d32, x32 = randn(2, 3, 90, dtype=torch.float32), randn(2, 3, 20, dtype=torch.float32)
        c1, c2 = cpu_backend.countsketch_pair(d32, x32, 29, SEED)
        t1, t2 = TB.countsketch_pair(d32, x32, 29, SEED)
        res["countsketch-equals-cpu"] = {"ok": bool(torch.equal(c1, t1) and torch.equal(c2, t2))}
    except ImportError as e:
        res["countsketch-equals-cpu"] = {"skip": f"cupid_engine._C is not built: {e}"}

    # Several coordinate splits (partials reduced in order): shrink the split size.
    saved = TP._MIN_SPLIT
    TP._MIN_SPLIT = 64
    try:
        for method in ("dense", "sparse", "signshift"):
            x = randn(2, 293, dtype=torch.float64)
            out = TB.project(x, 24, method, SEED, 1)
            ref = R.project(x, k=24, method=method, seed=SEED)
            res[f"splits-{method}"] = {"err": T.max_rel_err(out, ref), "rtol": T.rtol(torch.float64)}
    finally:
        TP._MIN_SPLIT = saved

    # Determinism: reruns and batch splits are bit-identical.
    x = randn(3, 211, dtype=torch.float32)
    for method in ("dense", "sparse", "signshift"):
        a = TB.project(x, 40, method, SEED, 1)
        b = TB.project(x, 40, method, SEED, 1)
        row = TB.project(x[1:2].clone(), 40, method, SEED, 1)
        res[f"determinism-{method}"] = {"rerun": bool(torch.equal(a, b)), "batch": bool(torch.equal(a[1:2], row))}

    # Strided rows (a column slice) and the public API routed to this backend.
    base = randn(2, 400, dtype=torch.float32)
    xs = base[:, 50:347]
    for method in ("dense", "sparse", "signshift"):
        out = ops.project(xs, k=40, method=method, seed=SEED, backend="triton")
        ref = R.project(xs.contiguous(), k=40, method=method, seed=SEED)
        res[f"api-strided-{method}"] = {"err": T.max_rel_err(out, ref), "rtol": T.rtol(torch.float32)}

    for dname, (B, Tn, O, I, k) in SKETCH_CASES:
        dt = DTYPES[dname]
        delta, xin = randn(B, Tn, O, dtype=dt), randn(B, Tn, I, dtype=dt)
        out = TB.tensorsketch(delta, xin, k, SEED)
        ref = R.tensorsketch(delta, xin, k=k, seed=SEED)
        mat = R.tensorsketch_materialized(delta, xin, k=k, seed=SEED)
        cs1, cs2 = TB.countsketch_pair(delta, xin, k, SEED)
        r1, r2 = R.countsketch_pair(delta, xin, k=k, seed=SEED)
        res[_case_id("tensorsketch", dname, (B, Tn, O, I, k))] = {
            "err": T.max_rel_err(out, ref),
            "err_materialized": T.max_rel_err(out, mat),
            "err_cs": max(T.max_rel_err(cs1, r1), T.max_rel_err(cs2, r2)),
            "rtol": T.rtol(dt),
            "dtype": str(out.dtype),
            "expected_dtype": str(ref.dtype),
        }
    d, xx = randn(2, 2, 9, dtype=torch.float32), randn(2, 2, 11, dtype=torch.float32)
    out = ops.tensorsketch(d, xx, k=24, seed=SEED, backend="triton")
    res["api-tensorsketch"] = {"err": T.max_rel_err(out, R.tensorsketch(d, xx, k=24, seed=SEED)), "rtol": 1e-5}

    try:
        TB.project(torch.zeros(2, 5, dtype=torch.int32), 8, "dense", 0, 1)
        res["rejects-int"] = {"ok": False}
    except TypeError:
        res["rejects-int"] = {"ok": True}
    return res


@pytest.fixture(scope="module")
def interp() -> dict[str, dict]:
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CASES ")]
    assert line, f"no results from the subprocess:\n{proc.stdout[-4000:]}"
    return json.loads(line[-1][len("CASES ") :])


# --------------------------------------------------------------------------- interpreted


@pytest.mark.parametrize(
    "method,dtype,shape", PROJECT_CASES, ids=[_case_id(m, d, s) for m, d, s in PROJECT_CASES]
)
def test_project_matches_reference(interp, method, dtype, shape):
    r = interp[_case_id("project", method, dtype, shape)]
    assert r["dtype"] == r["expected_dtype"]
    assert r["shape"] == [shape[0], shape[2]]
    assert r["err"] <= r["rtol"], f"{method} {dtype} {shape}: rel err {r['err']:.3g} > {r['rtol']:.1g}"


@pytest.mark.parametrize(
    "name",
    ["exact-dense", "exact-sparse-s1", "exact-sparse-s4", "exact-signshift-k40", "exact-signshift-k7",
     "exact-signshift-k64", "exact-countsketch-2001-n19", "exact-countsketch-2002-n23", "exact-countsketch-2001-n50",
     "exact-countsketch-2002-n61"],
)
def test_signs_and_buckets_are_bit_exact(interp, name):
    assert interp[name]["ok"], f"{name}: the projection of the identity is not the reference matrix"


def test_countsketch_bit_identical_to_cpu_kernel(interp):
    r = interp["countsketch-equals-cpu"]
    if "skip" in r:
        pytest.skip(r["skip"])
    assert r["ok"], "the float32 CountSketch differs from the C++ CPU kernel's"


@pytest.mark.parametrize("method", ["dense", "sparse", "signshift"])
def test_several_coordinate_splits(interp, method):
    r = interp[f"splits-{method}"]
    assert r["err"] <= r["rtol"]


@pytest.mark.parametrize("method", ["dense", "sparse", "signshift"])
def test_deterministic_across_reruns_and_batch_splits(interp, method):
    r = interp[f"determinism-{method}"]
    assert r["rerun"], f"{method}: two runs differ"
    assert r["batch"], f"{method}: a row differs when projected alone"


@pytest.mark.parametrize("method", ["dense", "sparse", "signshift"])
def test_public_api_with_strided_rows(interp, method):
    r = interp[f"api-strided-{method}"]
    assert r["err"] <= r["rtol"]


@pytest.mark.parametrize("dtype,shape", SKETCH_CASES, ids=[_case_id(d, s) for d, s in SKETCH_CASES])
def test_tensorsketch_matches_reference(interp, dtype, shape):
    r = interp[_case_id("tensorsketch", dtype, shape)]
    assert r["dtype"] == r["expected_dtype"]
    assert r["err_cs"] <= r["rtol"], f"countsketch stage: {r['err_cs']:.3g}"
    assert r["err"] <= r["rtol"], f"tensorsketch: {r['err']:.3g}"
    # The FFT path against the materialised definition (float64 FFT rounding only).
    assert r["err_materialized"] <= max(r["rtol"], 1e-9)


def test_public_api_tensorsketch(interp):
    r = interp["api-tensorsketch"]
    assert r["err"] <= r["rtol"]


def test_rejects_integer_input(interp):
    assert interp["rejects-int"]["ok"]


# --------------------------------------------------------------------------- compiled (GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["dense", "sparse", "signshift"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_gpu_project_matches_reference(method, dtype):
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in sys.modules:
        pytest.skip("triton was imported under the interpreter in this process")
    from cupid_engine.ops import reference as R
    from cupid_engine.ops import tolerances as T
    from cupid_engine.ops import triton as TB

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(SEED)
    for B, P, k, s in [(1, 100_003, 1000, 4), (5, 70_001, 4096, 1), (33, 999, 37, 1)]:
        x = torch.randn(B, P, generator=gen, dtype=torch.float64).to(dt)
        out = TB.project(x.cuda(), k, method, SEED, s).cpu()
        ref = R.project(x, k=k, method=method, seed=SEED, s=s)
        assert T.max_rel_err(out, ref) <= T.rtol(dt), (B, P, k, s)
        if method != "sparse":  # sparse scatters with float atomics
            again = TB.project(x.cuda(), k, method, SEED, s).cpu()
            assert torch.equal(out, again)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_gpu_tensorsketch_matches_reference(dtype):
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in sys.modules:
        pytest.skip("triton was imported under the interpreter in this process")
    from cupid_engine.ops import reference as R
    from cupid_engine.ops import tolerances as T
    from cupid_engine.ops import triton as TB

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(SEED)
    delta = torch.randn(4, 7, 300, generator=gen, dtype=torch.float64).to(dt)
    x = torch.randn(4, 7, 513, generator=gen, dtype=torch.float64).to(dt)
    out = TB.tensorsketch(delta.cuda(), x.cuda(), 1000, SEED).cpu()
    ref = R.tensorsketch(delta, x, k=1000, seed=SEED)
    assert T.max_rel_err(out, ref) <= T.rtol(dt)


# --------------------------------------------------------------------------- compiled (no GPU)


def _compile_all(cc: int) -> dict[str, str]:
    """Executed in a subprocess without the interpreter: compile every kernel to a cubin.

    ``triton.compile`` runs the whole NVIDIA pipeline (TTIR -> PTX -> ptxas) with no GPU,
    so this catches what the interpreter lets through (non-constexpr globals, dot shape or
    dtype rules, unsupported casts) on machines without a GPU.
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cupid_engine.ops.triton import projection as TP

    TS = sys.modules["cupid_engine.ops.triton.tensorsketch"]  # the package attribute is the function
    target = GPUTarget("cuda", cc, 32)
    res = {}
    for dt, acc, dot, bp in [
        ("fp32", tl.float32, tl.float32, 32),
        ("fp64", tl.float64, tl.float64, 32),
        ("fp16", tl.float32, tl.float32, 32),
        ("bf16", tl.float32, tl.float32, 32),
    ]:
        acc_s = "*fp64" if acc == tl.float64 else "*fp32"
        # Keys >= 2**31 arrive as i64; ints equal to 1 (B, k, s) are specialised to constexprs.
        variants = ["i32", "i64", "ones"] if dt == "fp32" else ["i32"]
        for variant in variants:
            key_t = "i64" if variant == "i64" else "i32"
            jobs = {
                "dense": (
                    TP._dense_kernel,
                    dict(x_ptr="*" + dt, part_ptr=acc_s, B="i32", P="i32", K="i32", stride_xb="i32", split_size="i32",
                         key=key_t),
                    dict(BLOCK_B=32, BLOCK_K=128, BLOCK_P=bp, DOT_DTYPE=dot, ACC_DTYPE=acc, PRECISION="ieee"),
                ),
                "signshift": (
                    TP._signshift_kernel,
                    dict(x_ptr="*" + dt, part_ptr=acc_s, B="i32", P="i64", K="i32", stride_xb="i64",
                         chunks_per_split="i32", key_sign=key_t, key_shift=key_t),
                    dict(BLOCK_B=8, BLOCK_J=512, ACC_DTYPE=acc),
                ),
                "sparse": (
                    TP._sparse_kernel,
                    dict(x_ptr="*" + dt, out_ptr=acc_s, B="i32", P="i64", K="i32", S="i32", stride_xb="i64",
                         seed_key=key_t, stream0="i32"),
                    dict(BLOCK_B=4, BLOCK_P=1024, ACC_DTYPE=acc),
                ),
                "countsketch": (
                    TS._countsketch_kernel,
                    dict(x_ptr="*" + dt, order_ptr="*i32", sign_ptr="*i32", offsets_ptr="*i32", out_ptr=acc_s,
                         R="i32", D="i32", K="i32", MAX_BUCKET="i32"),
                    dict(BLOCK_R=8, BLOCK_K=256, ACC_DTYPE=acc),
                ),
            }
            for name, (fn, sig, const) in jobs.items():
                if variant == "ones":
                    const = dict(const, **{a: 1 for a in ("B", "K", "S", "R", "MAX_BUCKET") if a in sig})
                sig = dict(sig, **{c: "constexpr" for c in const})
                try:
                    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target,
                                   options={"num_warps": 4})
                    res[f"{name}-{dt}-{variant}"] = "ok"
                except Exception as e:  # noqa: BLE001 - reported by the test
                    res[f"{name}-{dt}-{variant}"] = f"{type(e).__name__}: {str(e)[-1500:]}"
    from cupid_engine.ops.triton import quality as TQ

    qsig = dict(r_ptr="*fp32", r_off_ptr="*i64", d_ptr="*fp32", d_off_ptr="*i64", maxmin_ptr="*fp32",
                minmax_ptr="*fp32", n_demos="i32", K="i32")
    for bk in (16, 32):
        const = dict(BLOCK_I=64, BLOCK_J=64, BLOCK_K=bk)
        try:
            triton.compile(ASTSource(fn=TQ._quality_minmax_kernel, signature=dict(qsig, **{c: "constexpr" for c in const}),
                                     constexprs=const), target=target, options={"num_warps": 4})
            res[f"quality-k{bk}"] = "ok"
        except Exception as e:  # noqa: BLE001 - reported by the test
            res[f"quality-k{bk}"] = f"{type(e).__name__}: {str(e)[-1500:]}"
    for dt in ("fp32", "fp64"):
        sig = dict(part_ptr="*" + dt, out_ptr="*" + dt, N="i32", N_SPLIT="i32", BLOCK="constexpr")
        try:
            triton.compile(ASTSource(fn=TP._reduce_splits_kernel, signature=sig, constexprs=dict(BLOCK=1024)),
                           target=target, options={"num_warps": 4})
            res[f"reduce-{dt}"] = "ok"
        except Exception as e:  # noqa: BLE001 - reported by the test
            res[f"reduce-{dt}"] = f"{type(e).__name__}: {str(e)[-1500:]}"
    return res


def test_kernels_compile_for_gpu():
    pytest.importorskip("triton")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--compile", "90"], env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-8000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("COMPILED ")]
    assert line, proc.stdout[-4000:]
    res = json.loads(line[-1][len("COMPILED ") :])
    failed = {k: v for k, v in res.items() if v != "ok"}
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())
    assert len(res) == 28


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile"]:  # subprocess of test_kernels_compile_for_gpu
        print("COMPILED " + json.dumps(_compile_all(int(sys.argv[2]))))
    else:  # the interpreter subprocess of the `interp` fixture
        print("CASES " + json.dumps(_run_cases()))
