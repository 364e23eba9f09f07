"""The ``cuda`` backend: host wrappers of the CUDA kernels in ``csrc/cuda``.

The extension takes raw device pointers and a stream handle, so every check on device,
dtype, contiguity and shape happens here before a pointer leaves Python. Kernels are
launched on ``torch.cuda.current_stream()`` of the input's device and are asynchronous
like any torch op. The tensorsketch FFT stage runs in ``torch.fft`` (cuFFT); the CUDA
kernel fuses the hashing scatter of the CountSketch stage.

Determinism: dense, signshift and the CountSketch stage use no atomics and sum in an
order fixed by the shapes (bit-reproducible); sparse scatters with float atomics (see
``csrc/cuda/projection.cu``). The CountSketch stage consumes the host tables of
``reference.countsketch_buckets`` (see :func:`countsketch_csr`).
"""

from __future__ import annotations

import functools

import torch

from cupid_engine import constants as C
from cupid_engine.ops import reference, spectral

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_METHODS = {"dense": 0, "sparse": 1, "signshift": 2}


def _C():
    from cupid_engine import _C as mod  # noqa: N811

    if not hasattr(mod, "project_cuda"):
        raise RuntimeError(
            "cuda backend: cupid_engine._C was built without CUDA kernels; rebuild with a CUDA toolkit "
            "(CUPID_ENABLE_CUDA=ON pip install --no-build-isolation -e .)"
        )
    return mod


def is_available() -> bool:
    """Whether CUDA kernels were compiled into an extension that loads, and a GPU is present.

    "Not built" and "built without CUDA" fall through; an extension that is installed but
    fails to load raises (``cpu_backend.is_available`` says why), never a silent switch.
    """
    from cupid_engine.ops import cpu_backend

    if not cpu_backend.is_available():
        return False
    if not hasattr(cpu_backend._C(), "project_cuda"):
        return False
    return torch.cuda.is_available()


def _check(t: torch.Tensor, name: str, device: torch.device | None = None) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"cuda backend: {name} is on {t.device}, expected a CUDA tensor")
    if device is not None and t.device != device:
        raise ValueError(f"cuda backend: {name} is on {t.device}, expected {device}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"cuda backend: {name} has dtype {t.dtype}, expected one of {list(_DTYPES)}")


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=128)
def countsketch_csr(seed: int, stream: int, n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The factor tables of ``reference.countsketch_buckets`` grouped by bucket (CSR), on ``device``.

    Shared by the GPU backends (``cuda`` and ``triton``), whose CountSketch kernels gather
    instead of scattering: bucket ``j`` sums ``sign[e] * x[order[e]]`` for ``e`` in
    ``[offsets[j], offsets[j + 1])``, coordinates in increasing order (a stable sort), so
    no atomics are needed and the order of additions is that of the CPU kernel.

    Returns:
        ``order`` int32 ``[n]`` (coordinates sorted by bucket), ``sign`` int32 ``[n]`` (±1,
        in the same order), ``offsets`` int32 ``[k + 1]`` and the longest bucket.
    """
    if n >= 2**31 or k >= 2**31:
        raise ValueError(f"countsketch tables need n, k < 2**31, got n={n}, k={k}")
    buckets, signs = reference.countsketch_buckets(seed, stream, n, k)
    buckets, signs = buckets.cpu(), signs.cpu()
    order = torch.argsort(buckets, stable=True)
    counts = torch.bincount(buckets, minlength=k)
    offsets = torch.zeros(k + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    as_i32 = lambda t: t.to(torch.int32).to(device)  # noqa: E731
    return as_i32(order), as_i32(signs[order]), as_i32(offsets), int(counts.max())


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def project(x: torch.Tensor, k: int, method: str, seed: int, s: int) -> torch.Tensor:
    """``[B, P] -> [B, k]`` on the GPU (inputs validated by ``ops.project``)."""
    _check(x, "x")
    if x.dim() != 2:
        raise ValueError(f"cuda backend: x must be [B, P], got {tuple(x.shape)}")
    if method not in _METHODS:
        raise ValueError(f"cuda backend: unknown method {method!r}")
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    B, P = x.shape
    out = torch.zeros(B, k, dtype=_out_dtype(x.dtype), device=x.device)
    if B:
        _C().project_cuda(
            x.data_ptr(),
            out.data_ptr(),
            B,
            P,
            x.stride(0),
            k,
            _METHODS[method],
            _DTYPES[x.dtype],
            seed,
            s,
            x.device.index,
            _stream(x.device),
        )
    return out


def countsketch_pair(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 of tensorsketch on the GPU: ``CS1(delta) [B, T, k]``, ``CS2(x) [B, T, k]``."""
    _check(delta, "delta")
    _check(x, "x", delta.device)
    if delta.dtype != x.dtype:
        raise TypeError(f"cuda backend: delta is {delta.dtype} but x is {x.dtype}")
    if delta.dim() != 3 or x.dim() != 3 or delta.shape[:2] != x.shape[:2]:
        raise ValueError(f"cuda backend: need delta [B, T, O] and x [B, T, I], got {tuple(delta.shape)}, {tuple(x.shape)}")
    delta, x = delta.contiguous(), x.contiguous()
    B, T, O = delta.shape
    I = x.shape[2]
    acc = _out_dtype(delta.dtype)
    cs1 = torch.empty(B, T, k, dtype=acc, device=delta.device)
    cs2 = torch.empty(B, T, k, dtype=acc, device=delta.device)
    o1, s1, f1, _ = countsketch_csr(seed, C.STREAM_TS_OUT, O, k, str(delta.device))
    o2, s2, f2, _ = countsketch_csr(seed, C.STREAM_TS_IN, I, k, str(delta.device))
    if B * T:
        _C().countsketch_pair_cuda(
            delta.data_ptr(),
            x.data_ptr(),
            o1.data_ptr(),
            s1.data_ptr(),
            f1.data_ptr(),
            o2.data_ptr(),
            s2.data_ptr(),
            f2.data_ptr(),
            cs1.data_ptr(),
            cs2.data_ptr(),
            B * T,
            O,
            I,
            k,
            _DTYPES[delta.dtype],
            delta.device.index,
            _stream(delta.device),
        )
    return cs1, cs2


def tensorsketch(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``[B, T, O], [B, T, I] -> [B, k]`` on the GPU (inputs validated by ``ops.tensorsketch``)."""
    cs1, cs2 = countsketch_pair(delta, x, k, seed)
    return spectral.circular_convolve_sum(cs1, cs2, k)
