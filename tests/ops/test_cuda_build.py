"""The CUDA kernels (``csrc/cuda``) are built when a toolkit is present, and match the reference.

* Build checks run everywhere nvcc is on PATH, so a broken or silently skipped CUDA
  build cannot go unnoticed on a machine without a GPU.
* Emulated checks compile ``csrc/cuda/projection.cu`` as plain C++ against a small host
  emulation of the CUDA runtime (one OS thread per CUDA thread, a barrier per block,
  launches through the file's ``CUPID_LAUNCH`` hook) and compare every kernel with
  ``ops/reference.py``: the kernel logic (indexing, tiling, splits, row blocks, hashing)
  is tested without a GPU. Memory-model and performance questions still need one.
* Runtime checks (``gpu`` marker) compare the ``cuda`` backend with the reference on a GPU.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


# --------------------------------------------------------------------------- emulated (no GPU)

_SHIM = r"""
#pragma once
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx, blockIdx, blockDim;
inline std::barrier<>* g_block_barrier = nullptr;
inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) {
  *p = std::malloc(n);
  std::memset(*p, 0x7f, n);  // garbage: kernels must write every partial they read
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { std::free(p); return cudaSuccess; }
struct __half { _Float16 v; };
inline float __half2float(__half h) { return static_cast<float>(h.v); }
struct __nv_bfloat16 { uint16_t v; };
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = static_cast<uint32_t>(b.v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline std::mutex g_atomic_mutex;
template <class T>
T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> lock(g_atomic_mutex);
  T old = *p;
  *p = old + v;
  return old;
}
template <class K, class... A>
void cupid_emulate(K kernel, dim3 grid, dim3 block, A... args) {
  const unsigned n = block.x * block.y * block.z;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(n);
        g_block_barrier = &bar;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(x, y, z);
            blockDim = block;
            kernel(args...);
          });
        for (auto& th : threads) th.join();
      }
}
#define CUPID_LAUNCH(kernel, grid, block, stream, ...) cupid_emulate(kernel, dim3(grid), dim3(block), __VA_ARGS__)
"""

_DRIVER = r"""
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>
#include "cupid/cuda_kernels.h"
static std::vector<char> slurp(const char* path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}
static void dump(const char* path, const std::vector<char>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(v.data(), static_cast<std::streamsize>(v.size()));
}
static uintptr_t ptr(std::vector<char>& v) { return reinterpret_cast<uintptr_t>(v.data()); }
int main(int argc, char** argv) {
  const std::string mode = argv[1];
  const int dtype = std::stoi(argv[2]);
  const size_t acc = dtype == 3 ? 8 : 4;
  if (mode == "project") {  // project dtype method B P ld k s seed x out
    const int method = std::stoi(argv[3]);
    const int64_t B = std::stoll(argv[4]), P = std::stoll(argv[5]), ld = std::stoll(argv[6]), k = std::stoll(argv[7]);
    const int64_t s = std::stoll(argv[8]);
    const uint64_t seed = std::stoull(argv[9]);
    std::vector<char> x = slurp(argv[10]), out(B * k * acc, 0);
    cupid::project_cuda(ptr(x), ptr(out), B, P, ld, k, method, dtype, seed, s, 0, 0);
    dump(argv[11], out);
  } else {  // cs dtype rows O I k delta x o1 s1 f1 o2 s2 f2 out1 out2
    const int64_t R = std::stoll(argv[3]), O = std::stoll(argv[4]), I = std::stoll(argv[5]), k = std::stoll(argv[6]);
    std::vector<char> d = slurp(argv[7]), x = slurp(argv[8]);
    std::vector<char> o1 = slurp(argv[9]), s1 = slurp(argv[10]), f1 = slurp(argv[11]);
    std::vector<char> o2 = slurp(argv[12]), s2 = slurp(argv[13]), f2 = slurp(argv[14]);
    std::vector<char> c1(R * k * acc, 0x7f), c2(R * k * acc, 0x7f);
    cupid::countsketch_pair_cuda(ptr(d), ptr(x), ptr(o1), ptr(s1), ptr(f1), ptr(o2), ptr(s2), ptr(f2), ptr(c1),
                                 ptr(c2), R, O, I, k, dtype, 0, 0);
    dump(argv[15], c1);
    dump(argv[16], c2);
  }
  return 0;
}
"""

_ROOT = Path(__file__).resolve().parents[2]
_DT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    d = tmp_path_factory.mktemp("cuda_emu")
    (d / "shim.h").write_text(_SHIM)
    (d / "driver.cpp").write_text(_DRIVER)
    exe = d / "emu"
    cmd = [
        cxx, "-std=c++20", "-O1", "-pthread", "-DCUPID_CUDA_EMULATE", "-DCUPID_CUDA_MIN_SPLIT=64",
        "-DCUPID_CUDA_PARTIAL_BYTES=2000", f"-I{_ROOT / 'csrc' / 'include'}", "-include", str(d / "shim.h"),
        "-x", "c++", str(_ROOT / "csrc" / "cuda" / "projection.cu"), "-x", "c++", str(d / "driver.cpp"), "-o", str(exe),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"emulated build of csrc/cuda/projection.cu failed:\n{proc.stderr[-6000:]}"
    return exe


def _emu_project(exe: Path, x: torch.Tensor, k: int, method: str, seed: int, s: int) -> torch.Tensor:
    d = exe.parent
    B, P = x.shape
    raw = x.contiguous().view(torch.int16) if x.dtype in (torch.float16, torch.bfloat16) else x.contiguous()
    raw.numpy().tofile(d / "x.bin")
    m = {"dense": 0, "sparse": 1, "signshift": 2}[method]
    args = [str(exe), "project", str(_DT_CODE[x.dtype]), str(m), str(B), str(P), str(P), str(k), str(s), str(seed),
            str(d / "x.bin"), str(d / "out.bin")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    acc = "float64" if x.dtype == torch.float64 else "float32"
    return torch.from_numpy(np.fromfile(d / "out.bin", dtype=acc)).view(B, k)


EMU_SHAPES = [(9, 293, 40, 4), (1, 300, 37, 1), (3, 7, 64, 2), (2, 131, 24, 1)]


@pytest.mark.parametrize("method", ["dense", "sparse", "signshift"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_emulated_project_matches_reference(emulator, method, dtype):
    from cupid_engine.ops import reference as R
    from cupid_engine.ops import tolerances as T

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(SEED)
    for B, P, k, s in EMU_SHAPES:
        s = s if method == "sparse" else 1
        x = torch.randn(B, P, generator=gen, dtype=torch.float64).to(dt)
        out = _emu_project(emulator, x, k, method, SEED, s)
        ref = R.project(x, k=k, method=method, seed=SEED, s=s)
        err = T.max_rel_err(out, ref)
        assert err <= T.rtol(dt), f"{method} {dtype} {(B, P, k, s)}: rel err {err:.3g}"
        if method != "sparse":  # a row alone gives the same bits (split and row-block layout)
            alone = _emu_project(emulator, x[-1:], k, method, SEED, s)
            assert torch.equal(alone, out[-1:])


def test_emulated_signs_and_buckets_are_exact(emulator):
    from cupid_engine.ops import reference as R

    P, k = 37, 40
    eye = torch.eye(P, dtype=torch.float64)
    coords = torch.arange(P)
    dense = _emu_project(emulator, eye, k, "dense", SEED, 1) * k**0.5
    assert torch.equal(dense, R.dense_signs(SEED, coords, k).double())
    b, sg = R.signshift_buckets(SEED, coords, k)
    want = torch.zeros(P, k, dtype=torch.float64)
    want[coords, b] = sg.double()
    assert torch.equal(_emu_project(emulator, eye, k, "signshift", SEED, 1), want)
    b, sg = R.sparse_buckets(SEED, coords, k, 4)
    want = torch.zeros(P, k, dtype=torch.float64)
    for r in range(4):
        want[coords, b[r]] += sg[r].double()
    assert torch.equal(_emu_project(emulator, eye, k, "sparse", SEED, 4) * 2.0, want)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_emulated_countsketch_matches_reference(emulator, dtype):
    from cupid_engine import constants as C
    from cupid_engine.ops import cuda_backend
    from cupid_engine.ops import reference as R
    from cupid_engine.ops import tolerances as T

    dt = DTYPES[dtype]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(SEED)
    d = emulator.parent
    for B, Tn, O, I, k in [(1, 1, 17, 29, 37), (2, 3, 90, 5, 29), (3, 2, 64, 200, 40)]:  # injective and hashed
        delta = torch.randn(B, Tn, O, generator=gen, dtype=torch.float64).to(dt)
        x = torch.randn(B, Tn, I, generator=gen, dtype=torch.float64).to(dt)
        files = []
        for name, t in (("delta", delta), ("x", x)):
            raw = t.contiguous().view(torch.int16) if dt in (torch.float16, torch.bfloat16) else t.contiguous()
            raw.numpy().tofile(d / f"{name}.bin")
            files.append(str(d / f"{name}.bin"))
        for tag, stream, n in (("1", C.STREAM_TS_OUT, O), ("2", C.STREAM_TS_IN, I)):
            order, sign, offsets, _ = cuda_backend.countsketch_csr(SEED, stream, n, k, "cpu")
            for name, t in (("o", order), ("s", sign), ("f", offsets)):
                t.numpy().tofile(d / f"{name}{tag}.bin")
                files.append(str(d / f"{name}{tag}.bin"))
        args = [str(emulator), "cs", str(_DT_CODE[dt]), str(B * Tn), str(O), str(I), str(k), *files,
                str(d / "c1.bin"), str(d / "c2.bin")]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        np_acc = "float64" if acc == torch.float64 else "float32"
        c1 = torch.from_numpy(np.fromfile(d / "c1.bin", dtype=np_acc)).view(B, Tn, k)
        c2 = torch.from_numpy(np.fromfile(d / "c2.bin", dtype=np_acc)).view(B, Tn, k)
        r1, r2 = R.countsketch_pair(delta, x, k=k, seed=SEED)
        assert max(T.max_rel_err(c1, r1), T.max_rel_err(c2, r2)) <= T.rtol(dt), (dtype, B, Tn, O, I, k)
        try:
            from cupid_engine.ops import cpu_backend

            p1, p2 = cpu_backend.countsketch_pair(delta, x, k, SEED)
        except ImportError:
            continue
        assert torch.equal(c1, p1) and torch.equal(c2, p2), "not bit-identical to the CPU kernel"


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
