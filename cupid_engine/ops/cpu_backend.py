"""The ``cpu`` backend: host wrappers of the C++ kernels in ``csrc/cpu``.

The C++ module takes raw pointers, so every check on device, dtype, contiguity and shape
happens here (or, for ``quality_minmax``, in ``ops/quality.py``) before a pointer leaves
Python. The tensorsketch runs in ``csrc/cpu/tensorsketch.cpp``: its own FFT, W samples per
SIMD lane group, the count-sketch scatter written straight into the FFT input (``fft``
route), or a batched GEMM forming each sample's ``[O, I]`` gradient hashed by the same
bucket/sign tables (``dense`` route for many steps); ``ops.tensorsketch_plan`` chooses.
"""

from __future__ import annotations

import torch

from cupid_engine import constants as C
from cupid_engine.ops import reference, spectral, tensorsketch_plan
from cupid_engine.ops.extension import _C, is_available  # noqa: F401 - is_available: this backend's predicate

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_METHODS = {"dense": 0, "sparse": 1, "signshift": 2}


def _check(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"cpu backend: {name} is on {t.device}, expected cpu")
    if t.dtype not in _DTYPES:
        raise TypeError(f"cpu backend: {name} has dtype {t.dtype}, expected one of {list(_DTYPES)}")


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def project(x: torch.Tensor, k: int, method: str, seed: int, s: int) -> torch.Tensor:
    _check(x, "x")
    if x.stride(1) != 1:
        x = x.contiguous()
    B, P = x.shape
    out = torch.zeros(B, k, dtype=_out_dtype(x.dtype))
    if B:
        _C().project_cpu(
            x.data_ptr(), out.data_ptr(), B, P, x.stride(0), k, _METHODS[method], _DTYPES[x.dtype], seed, s
        )
    return out


def countsketch_pair(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(delta, "delta")
    _check(x, "x")
    delta, x = delta.contiguous(), x.contiguous()
    B, T, O = delta.shape
    I = x.shape[2]
    acc = _out_dtype(delta.dtype)
    cs1 = torch.zeros(B, T, k, dtype=acc)
    cs2 = torch.zeros(B, T, k, dtype=acc)
    b1, s1 = reference.countsketch_buckets(seed, C.STREAM_TS_OUT, O, k)
    b2, s2 = reference.countsketch_buckets(seed, C.STREAM_TS_IN, I, k)
    if B * T:
        _C().countsketch_pair_cpu(
            delta.data_ptr(), x.data_ptr(), b1.data_ptr(), s1.data_ptr(), b2.data_ptr(), s2.data_ptr(),
            cs1.data_ptr(), cs2.data_ptr(), B * T, O, I, k, _DTYPES[delta.dtype],
        )
    return cs1, cs2


STRATEGIES = ("auto", "fft", "dense")

# G chunk of the dense route: at most this many entries of [b, O, I] at once (256 MiB fp32).
_DENSE_CHUNK_ENTRIES = 1 << 26


def fft_kernel_supports(k: int) -> bool:
    """Whether the C++ FFT kernel takes this ``k`` (a power of two >= 8)."""
    return k >= 8 and k & (k - 1) == 0


def _tables(seed: int, O: int, I: int, k: int) -> tuple[torch.Tensor, ...]:
    b1, s1 = reference.countsketch_buckets(seed, C.STREAM_TS_OUT, O, k)
    b2, s2 = reference.countsketch_buckets(seed, C.STREAM_TS_IN, I, k)
    return b1.contiguous(), s1.contiguous(), b2.contiguous(), s2.contiguous()


def _kernel_input(t: torch.Tensor) -> torch.Tensor:
    """float32/float64 with a unit stride along the last dim (fp16/bf16 widened once)."""
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def tensorsketch_fft_layers(
    layers: list[tuple[int, torch.Tensor, torch.Tensor]], k: int, out: torch.Tensor | None = None, *,
    direct: list[bool] | None = None, x_ones: list[bool] | None = None, row_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over layers of the tensorsketch by the C++ FFT kernel (``csrc/cpu/tensorsketch.cpp``).

    Args:
        layers: ``[(seed, delta [B, T, O], x [B, T, I])]``; every tensor float32 (or every
            one float64), any T per layer, unit stride along the last dim (other strides free).
        k: A power of two >= 8 (:func:`fft_kernel_supports`).
        out: ``[B, k]`` contiguous of the inputs' dtype to write into (else a new tensor).
        direct: One flag per layer (None: none): a flagged layer's ``T O I`` hashed products
            are accumulated in the time domain (per SIMD lane group) and added to the inverse
            FFT's output, instead of two FFTs per step: exact, cheaper for a narrow factor, a
            different float rounding of that layer's contribution.
        x_ones: One flag per layer (None: none): a flagged layer's ``x [B, T, I - 1]`` lacks
            its last coordinate, a constant 1 (a bias input), which the kernel adds itself:
            the same sums as a stored column of ones, without writing one.
        row_sums: ``[B]`` contiguous of the inputs' dtype: receives the sum of each output
            row (fixed order), for a NaN/Inf check without another pass over the output.

    Returns:
        ``[B, k]``: ``sum_l irfft(sum_t rfft(CS1_l(delta_t)) * rfft(CS2_l(x_t)))``, layers in
        the given order, ``t`` ascending. Each sample's row depends on its own inputs only
        (not on B, the batch split or the thread count).
    """
    if not fft_kernel_supports(k):
        raise ValueError(f"the C++ tensorsketch FFT kernel needs k a power of two >= 8, got {k}")
    dtype = layers[0][1].dtype
    B = layers[0][1].shape[0]
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"tensorsketch_fft_layers takes float32 or float64, got {dtype}")
    args: dict[str, list] = {n: [] for n in ("d", "x", "T", "O", "I", "dsb", "dst", "xsb", "xst", "b1", "s1", "b2", "s2")}
    keep = []
    for v, what in ((direct, "direct"), (x_ones, "x_ones")):
        if v is not None and len(v) != len(layers):
            raise ValueError(f"tensorsketch_fft_layers: {len(v)} {what} flags for {len(layers)} layers")
    for l, (seed, d, x) in enumerate(layers):
        one = int(x_ones is not None and bool(x_ones[l]))
        if d.dtype != dtype or x.dtype != dtype:
            raise TypeError(f"tensorsketch_fft_layers: mixed dtypes {d.dtype}, {x.dtype}, expected {dtype}")
        if d.dim() != 3 or x.dim() != 3 or d.shape[:2] != x.shape[:2] or d.shape[0] != B:
            raise ValueError(f"tensorsketch_fft_layers: delta {tuple(d.shape)} and x {tuple(x.shape)} disagree (B={B})")
        _check(d, "delta")
        _check(x, "x")
        if d.stride(-1) != 1 or x.stride(-1) != 1:
            raise ValueError("tensorsketch_fft_layers: delta and x need a unit stride along the last dim")
        b1, s1, b2, s2 = _tables(seed, d.shape[2], x.shape[2] + one, k)
        keep += [b1, s1, b2, s2]
        for n, v in (("d", d.data_ptr()), ("x", x.data_ptr()), ("T", d.shape[1]), ("O", d.shape[2]),
                     ("I", x.shape[2] + one), ("dsb", d.stride(0)), ("dst", d.stride(1)), ("xsb", x.stride(0)),
                     ("xst", x.stride(1)), ("b1", b1.data_ptr()), ("s1", s1.data_ptr()), ("b2", b2.data_ptr()),
                     ("s2", s2.data_ptr())):
            args[n].append(v)
    if out is None:
        out = torch.empty(B, k, dtype=dtype)
    elif out.shape != (B, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"tensorsketch_fft_layers: out must be a contiguous [{B}, {k}] {dtype} tensor")
    if row_sums is not None and (row_sums.shape != (B,) or row_sums.dtype != dtype or not row_sums.is_contiguous()):
        raise ValueError(f"tensorsketch_fft_layers: row_sums must be a contiguous [{B}] {dtype} tensor")
    _C().tensorsketch_fft_cpu(
        args["d"], args["x"], args["T"], args["O"], args["I"], args["dsb"], args["dst"], args["xsb"], args["xst"],
        args["b1"], args["s1"], args["b2"], args["s2"], out.data_ptr(), B, k, _DTYPES[dtype],
        [int(bool(v)) for v in direct] if direct is not None else [],
        [int(bool(v)) for v in x_ones] if x_ones is not None else [],
        row_sums.data_ptr() if row_sums is not None else 0,
    )
    del keep
    return out


def hash_gradient(G: torch.Tensor, seed: int, k: int, out: torch.Tensor, *, accumulate: bool) -> torch.Tensor:
    """``out [B, k]`` (+)= the tensorsketch-hashed materialised gradient ``G [B, O, I]``
    (bucket ``(h1(o) + h2(i)) mod k``, sign ``s1(o) s2(i)``; o, then i ascending per row)."""
    _check(G, "G")
    G = G.contiguous()
    B, O, I = G.shape
    if out.shape != (B, k) or out.dtype != G.dtype or not out.is_contiguous():
        raise ValueError(f"hash_gradient: out must be a contiguous [{B}, {k}] {G.dtype} tensor")
    b1, s1, b2, s2 = _tables(seed, O, I, k)
    _C().hash_gradient_cpu(G.data_ptr(), b1.data_ptr(), s1.data_ptr(), b2.data_ptr(), s2.data_ptr(), out.data_ptr(),
                           B, O, I, k, _DTYPES[G.dtype], bool(accumulate))
    return out


def tensorsketch_dense(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The ``dense`` route: ``G = sum_t delta_t x_t^T`` by batched GEMM (chunks of samples,
    bounded memory), hashed by :func:`hash_gradient`."""
    delta, x = _kernel_input(delta), _kernel_input(x)
    B, T, O = delta.shape
    I = x.shape[2]
    out = torch.empty(B, k, dtype=delta.dtype)
    chunk = max(1, _DENSE_CHUNK_ENTRIES // (O * I))
    for a in range(0, B, chunk):
        e = min(B, a + chunk)
        G = torch.bmm(delta[a:e].transpose(1, 2), x[a:e])  # [b, O, I]
        hash_gradient(G, seed, k, out[a:e], accumulate=False)
    return out


def tensorsketch(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int, strategy: str = "auto") -> torch.Tensor:
    """The CPU tensorsketch: ``fft`` (C++ lane-FFT kernel; torch.fft when ``k`` is not a power
    of two) or ``dense`` (GEMM + hash), ``auto`` by ``ops.tensorsketch_plan`` (all exact)."""
    _check(delta, "delta")
    _check(x, "x")
    B, T, O = delta.shape
    route = tensorsketch_plan.choose(strategy, B, T, O, x.shape[2], k)
    if route == "dense":
        return tensorsketch_dense(delta, x, k, seed)
    if fft_kernel_supports(k):
        return tensorsketch_fft_layers([(seed, _kernel_input(delta), _kernel_input(x))], k)
    # k not a power of two: the C++ count sketch, then torch.fft and the fixed-order C++
    # spectral stage (the same sketch).
    cs1, cs2 = countsketch_pair(delta, x, k, seed)
    return spectral.circular_convolve_sum(cs1, cs2, k)


def quality_minmax(
    r: torch.Tensor, r_off: torch.Tensor, d: torch.Tensor, d_off: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ quality kernel on inputs checked by ``ops.quality.check_quality_inputs``."""
    _check(r, "R")
    _check(d, "D")
    if r.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cpu backend: quality_minmax takes float32 or float64 features, got {r.dtype}")
    r, d = r.contiguous(), d.contiguous()
    r_off, d_off = r_off.to("cpu", torch.int64).contiguous(), d_off.to("cpu", torch.int64).contiguous()
    m, n = r_off.numel() - 1, d_off.numel() - 1
    maxmin = torch.empty(m, n, dtype=r.dtype)
    minmax = torch.empty(m, n, dtype=r.dtype)
    _C().quality_minmax_cpu(
        r.data_ptr(), r_off.data_ptr(), m, d.data_ptr(), d_off.data_ptr(), n, r.shape[1],
        maxmin.data_ptr(), minmax.data_ptr(), _DTYPES[r.dtype],
    )
    return maxmin, minmax
