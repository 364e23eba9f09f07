"""Tensorsketch spectral stage with a fixed summation order (thread-count independent).

Two reductions of the tensorsketch FFT path decide the last bits of every feature:

* the multiply-accumulate of factor spectra over time steps (and layers),
  ``acc[r] += sum_t a[r, t] * b[r, t]``;
* the direct DFT of narrow factors, ``out[r] = sum_j v[r, j] * table[j]``.

With torch ops (``a * b``, ``addcmul_``, a complex ``matmul``) an element's rounding
depends on whether it falls in a vectorised body or a scalar tail, and tails move with
the tensor's length and with the chunk each intra-op thread gets; a complex GEMM also
picks kernels by row count. A sample's features then changed with the batch split and
the torch thread count (1 vs 2 threads: ~5% of store rows differed in the last bit).

Here, on the CPU, both reductions run in ``csrc/cpu/spectral.cpp``: one thread per
output row, one expression, ``t`` / ``j`` ascending, no FMA contraction. The result for a
row depends on that row alone. Without the C++ extension the same order is evaluated
with single-rounding torch ops (one op per step: slow for long ``T``, still exact in
order). On CUDA the torch ops are kept (GPU runs are not bit-compared with CPU runs:
features agree to float32 rounding across devices, see ``featurize.featurizer``).
"""

from __future__ import annotations

import torch

from cupid_engine.ops import extension

__all__ = ["spectral_mac", "dft_spectrum", "circular_convolve_sum"]

_DTYPE = {torch.complex64: 0, torch.complex128: 3}


def _kernel():
    return extension._C() if extension.is_available() else None


def _mul_parts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of ``a * b``, each op rounded once (no fused multiply-add)."""
    ar, ai, br, bi = a.real, a.imag, b.real, b.imag
    return ar * br - ai * bi, ar * bi + ai * br


def spectral_mac(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor, *, accumulate: bool) -> torch.Tensor:
    """``acc [R, F]`` (=, or += when ``accumulate``) ``sum_t a[:, t] * b[:, t]``, t ascending.

    Args:
        a: ``[R, T, F]`` complex64/complex128.
        b: Same shape and dtype as ``a``.
        acc: ``[R, F]`` contiguous, same dtype; written in place.
        accumulate: Add to ``acc`` instead of overwriting it.

    Returns:
        ``acc``.
    """
    if a.shape != b.shape or a.dim() != 3 or acc.shape != (a.shape[0], a.shape[2]):
        raise ValueError(f"spectral_mac: a {tuple(a.shape)}, b {tuple(b.shape)}, acc {tuple(acc.shape)} disagree")
    if not (a.dtype == b.dtype == acc.dtype) or a.dtype not in _DTYPE:
        raise TypeError(f"spectral_mac: complex64/complex128 of one dtype needed, got {a.dtype}, {b.dtype}, {acc.dtype}")
    if a.device.type != "cpu":
        if accumulate:
            return acc.add_((a * b).sum(dim=1))
        return torch.sum(a * b, dim=1, out=acc)
    kern = _kernel()
    if kern is not None and acc.is_contiguous():
        R, T, F = a.shape
        if R:
            a, b = a.contiguous(), b.contiguous()
            kern.spectral_mac_cpu(a.data_ptr(), b.data_ptr(), acc.data_ptr(), R, T, F, _DTYPE[a.dtype], bool(accumulate))
        return acc
    re, im = (acc.real.clone(), acc.imag.clone()) if accumulate else (None, None)
    for t in range(a.shape[1]):
        pr, pi = _mul_parts(a[:, t], b[:, t])
        re, im = (pr, pi) if re is None else (re + pr, im + pi)
    acc.copy_(torch.complex(re, im))
    return acc


def dft_spectrum(v: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [..., F] = sum_j v[..., j] * table[j]``, j ascending (``v`` real, ``table [n, F]`` complex).

    Args:
        v: ``[..., n]`` real (float32 for a complex64 table, float64 for complex128).
        table: ``[n, F]`` complex.
        out: ``[..., F]`` contiguous complex, written in place.

    Returns:
        ``out``.
    """
    if table.dim() != 2 or v.shape[-1] != table.shape[0] or out.shape != v.shape[:-1] + (table.shape[1],):
        raise ValueError(f"dft_spectrum: v {tuple(v.shape)}, table {tuple(table.shape)}, out {tuple(out.shape)} disagree")
    if table.dtype not in _DTYPE or out.dtype != table.dtype:
        raise TypeError(f"dft_spectrum: complex64/complex128 table and out needed, got {table.dtype}, {out.dtype}")
    real = torch.float64 if table.dtype == torch.complex128 else torch.float32
    if v.device.type != "cpu":
        return torch.matmul(v.to(table.dtype), table, out=out)
    kern = _kernel()
    n, F = table.shape
    if kern is not None and out.is_contiguous():
        rows = out.numel() // F
        if rows:
            v2 = v.to(real).contiguous()
            tab = table.contiguous()
            kern.dft_spectrum_cpu(v2.data_ptr(), tab.data_ptr(), out.data_ptr(), rows, n, F, _DTYPE[table.dtype])
        return out
    v = v.to(real)
    re = im = None
    for j in range(n):
        pr, pi = v[..., j, None] * table[j].real, v[..., j, None] * table[j].imag
        re, im = (pr, pi) if re is None else (re + pr, im + pi)
    out.copy_(torch.complex(re, im))
    return out


def circular_convolve_sum(cs1: torch.Tensor, cs2: torch.Tensor, k: int) -> torch.Tensor:
    """``sum_t cs1[:, t] (*) cs2[:, t]`` (circular convolution) via FFT, fixed order: ``[B, T, k] -> [B, k]``.

    The backends' spectral stage (the C++ kernel on the CPU, torch ops on a GPU); its
    readable definition is ``reference.circular_convolve_sum``, bit-identical on the CPU.
    """
    f1 = torch.fft.rfft(cs1, n=k, dim=-1)
    f2 = torch.fft.rfft(cs2, n=k, dim=-1)
    acc = torch.empty(f1.shape[0], f1.shape[2], dtype=f1.dtype, device=f1.device)
    return torch.fft.irfft(spectral_mac(f1, f2, acc, accumulate=False), n=k, dim=-1)
