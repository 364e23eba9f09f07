"""Readable torch reference of every projection op: the executable spec.

Each function here defines, in plain tensor code, exactly what the fast backends
(``csrc/cpu``, ``ops/triton``, ``csrc/cuda``) must compute. The references favour
clarity over speed, but they are vectorised enough to serve as the ``torch`` backend on
small and medium inputs, and they compute in float64 when given float64 so that tests
can compare every backend against them in float64.

Methods (``k`` output buckets, input coordinate ``i`` in ``[0, P)``):

* ``dense``: Rademacher JL. Entry ``(i, j)`` is ``±1/sqrt(k)`` with the sign given by bit
  ``j & 31`` of ``hash32(hash32(key_dense, i), j >> 5)``: one 32-bit hash yields 32
  signs, so the matrix is generated on the fly at one hash per 32 entries.
* ``sparse``: CountSketch / sparse JL with ``s`` non-zeros per coordinate using the
  block construction (Kane–Nelson): the ``r``-th non-zero of coordinate ``i`` lands in
  block ``r`` of size ``k / s`` at ``r * k/s + fastrange(h, k/s)``, ``h = hash32(key_r, i)``,
  with sign bit ``h & 1`` and value ``±1/sqrt(s)``. ``k`` must be divisible by ``s``.
* ``signshift``: coordinate ``i`` gets the sign bit ``i & 31`` of
  ``hash32(key_sign, i >> 5)`` and lands in bucket ``((i mod k) + shift(i div k)) mod k``
  where ``shift(c) = fastrange(hash32(key_shift, c), k)``: each k-long chunk of the
  gradient is a signed cyclic shift, so the kernel streams contiguous memory.
* ``tensorsketch``: for ``delta [B, T, O]`` and ``x [B, T, I]`` the CountSketch of
  ``vec(sum_t delta_t x_t^T)`` with bucket ``(h1(o) + h2(i)) mod k`` and sign
  ``s1(o) s2(i)``, computed as ``sum_t IFFT(FFT(CS1(delta_t)) * FFT(CS2(x_t)))``.
  Each factor hash ``h`` over ``n`` indices is a random *injection* into ``[0, k)`` when
  ``n <= k``: the first ``n`` entries of the permutation that sorts
  ``hash32(key, j), j < k`` (ties by ``j``); otherwise ``fastrange(hash32(key, i), k)``.
  Injectivity matters: with a plain hash, entries of one gradient row (or column)
  collide with each other, and for correlated samples those errors add coherently
  (measured 1.3-1.45x the error of a dense Gaussian JL on correlated layer gradients,
  against 0.9-1.0x with injections). Signs ``s`` are bit 0 of ``hash32(key_sign, i)``
  with ``key_sign = stream_key(seed, stream + STREAM_TS_SIGN_OFFSET)``.

All methods satisfy ``E<Px, Py> = <x, y>`` over the random seed.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch

from cupid_engine import constants as C
from cupid_engine.ops import hashing as H


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch CPU ops on one intra-op thread for the duration (restored on exit)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dense_signs(seed: int, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Sign matrix ``[len(rows), k]`` (int8 ±1) of the ``dense`` method for coordinates ``rows``."""
    key = H.stream_key(seed, C.STREAM_DENSE)
    words = (k + 31) // 32
    row_keys = H.hash32(key, rows.to(torch.int64))  # [R]
    w = torch.arange(words, dtype=torch.int64, device=rows.device)
    h = H.hash32(row_keys[:, None], w[None, :])  # [R, W]
    j = torch.arange(k, dtype=torch.int64, device=rows.device)
    bits = (h[:, j >> 5] >> (j & 31)) & 1
    return (1 - 2 * bits).to(torch.int8)


def sparse_buckets(seed: int, coords: torch.Tensor, k: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets and signs ``[s, len(coords)]`` of the ``sparse`` method."""
    block = k // s
    buckets, signs = [], []
    for r in range(s):
        h = H.hash32(H.stream_key(seed, C.STREAM_SPARSE + r), coords.to(torch.int64))
        buckets.append(r * block + H.fastrange(h, block))
        signs.append(1 - 2 * (h & 1))
    return torch.stack(buckets), torch.stack(signs)


def signshift_buckets(seed: int, coords: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets and signs ``[len(coords)]`` of the ``signshift`` method."""
    coords = coords.to(torch.int64)
    key_sign = H.stream_key(seed, C.STREAM_SIGNSHIFT_SIGN)
    key_shift = H.stream_key(seed, C.STREAM_SIGNSHIFT_SHIFT)
    sign_bits = (H.hash32(key_sign, coords >> 5) >> (coords & 31)) & 1
    shift = H.fastrange(H.hash32(key_shift, coords // k), k)
    return (coords % k + shift) % k, 1 - 2 * sign_bits


@functools.lru_cache(maxsize=256)
def _countsketch_tables(seed: int, stream: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = H.stream_key(seed, stream)
    if n <= k:
        j = torch.arange(k, dtype=torch.int64)
        # Sort by (hash, index): a seeded random permutation, identical on every machine.
        buckets = torch.argsort(H.hash32(key, j) * k + j)[:n]
    else:
        buckets = H.fastrange(H.hash32(key, torch.arange(n, dtype=torch.int64)), k)
    key_sign = H.stream_key(seed, stream + C.STREAM_TS_SIGN_OFFSET)
    signs = 1 - 2 * (H.hash32(key_sign, torch.arange(n, dtype=torch.int64)) & 1)
    return buckets, signs


def countsketch_buckets(seed: int, stream: int, n: int, k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets (int64) and signs (±1 int64) ``[n]`` of one tensorsketch factor (stream TS_OUT or TS_IN).

    Host-computed once per ``(seed, stream, n, k)`` and cached; every backend consumes
    these tables, so the factor hashes are identical everywhere by construction.
    """
    buckets, signs = _countsketch_tables(seed, stream, n, k)
    return buckets.to(device), signs.to(device)


def project(x: torch.Tensor, *, k: int, method: str, seed: int, s: int = 1, block: int = 1 << 16) -> torch.Tensor:
    """Reference ``ops.project``: ``[B, P] -> [B, k]`` (float64 in, float64 out; else float32).

    Coordinates are processed in blocks of ``block`` so that the reference also runs on
    large ``P`` without materialising a ``[P, k]`` matrix.
    """
    acc = _acc_dtype(x)
    B, P = x.shape
    out = torch.zeros(B, k, dtype=acc, device=x.device)
    for start in range(0, P, block):
        stop = min(P, start + block)
        xb = x[:, start:stop].to(acc)
        coords = torch.arange(start, stop, dtype=torch.int64, device=x.device)
        if method == "dense":
            # MKL's GEMM splits the inner dimension over threads, so the sum order (and the
            # last bit) followed the thread count: one thread fixes it.
            with single_thread():
                out += xb @ dense_signs(seed, coords, k).to(acc)
        elif method == "sparse":
            buckets, signs = sparse_buckets(seed, coords, k, s)
            for r in range(s):
                out.index_add_(1, buckets[r], xb * signs[r].to(acc))
        elif method == "signshift":
            buckets, signs = signshift_buckets(seed, coords, k)
            out.index_add_(1, buckets, xb * signs.to(acc))
        else:
            raise ValueError(f"unknown projection method {method!r}")
    if method == "dense":
        out /= math.sqrt(k)
    elif method == "sparse":
        out /= math.sqrt(s)
    return out


def countsketch_pair(delta: torch.Tensor, x: torch.Tensor, *, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 of tensorsketch: ``CS1(delta) [B, T, k]`` and ``CS2(x) [B, T, k]``."""
    acc = _acc_dtype(delta)
    B, T, O = delta.shape
    I = x.shape[2]
    b1, s1 = countsketch_buckets(seed, C.STREAM_TS_OUT, O, k, delta.device)
    b2, s2 = countsketch_buckets(seed, C.STREAM_TS_IN, I, k, delta.device)
    cs1 = torch.zeros(B, T, k, dtype=acc, device=delta.device).index_add_(2, b1, delta.to(acc) * s1.to(acc))
    cs2 = torch.zeros(B, T, k, dtype=acc, device=delta.device).index_add_(2, b2, x.to(acc) * s2.to(acc))
    return cs1, cs2


def circular_convolve_sum(cs1: torch.Tensor, cs2: torch.Tensor, k: int) -> torch.Tensor:
    """Stage 2 of tensorsketch: ``sum_t cs1[:, t] (*) cs2[:, t]`` (circular convolution) via FFT.

    ``[B, T, k], [B, T, k] -> [B, k]``: ``irfft(sum_t rfft(cs1_t) * rfft(cs2_t))``. Each
    complex product is written out as ``(ar br - ai bi, ar bi + ai br)`` in real ops and
    summed over ``t`` in ascending order: a real op rounds every element once, in torch's
    vectorised body and scalar tail alike (a complex ``*`` or a ``sum`` over ``t`` need
    not), so a row's result depends on that row alone, not on its batch or the thread
    count. This is the order of the C++ kernel ``csrc/cpu/spectral.cpp`` (bit-identical to
    it on the CPU, see ``tests/ops/test_reference_spectral.py``).
    """
    f1 = torch.fft.rfft(cs1, n=k, dim=-1)  # [B, T, F], F = k // 2 + 1
    f2 = torch.fft.rfft(cs2, n=k, dim=-1)
    ar, ai, br, bi = f1.real, f1.imag, f2.real, f2.imag
    prod_re = ar * br - ai * bi  # [B, T, F]
    prod_im = ar * bi + ai * br
    re = torch.zeros_like(prod_re[:, 0])  # [B, F]
    im = torch.zeros_like(prod_im[:, 0])
    for t in range(prod_re.shape[1]):
        re = re + prod_re[:, t]
        im = im + prod_im[:, t]
    return torch.fft.irfft(torch.complex(re, im), n=k, dim=-1)


def tensorsketch(delta: torch.Tensor, x: torch.Tensor, *, k: int, seed: int) -> torch.Tensor:
    """Reference ``ops.tensorsketch``: ``[B, T, O], [B, T, I] -> [B, k]``."""
    cs1, cs2 = countsketch_pair(delta, x, k=k, seed=seed)
    return circular_convolve_sum(cs1, cs2, k)


def tensorsketch_materialized(delta: torch.Tensor, x: torch.Tensor, *, k: int, seed: int) -> torch.Tensor:
    """Same sketch computed the slow way: materialise ``G = sum_t delta_t x_t^T`` and hash it.

    The definition the FFT path must reproduce (tests); O(B * O * I) memory.
    """
    acc = _acc_dtype(delta)
    G = torch.einsum("bto,bti->boi", delta.to(acc), x.to(acc))
    B, O, I = G.shape
    b1, s1 = countsketch_buckets(seed, C.STREAM_TS_OUT, O, k, delta.device)
    b2, s2 = countsketch_buckets(seed, C.STREAM_TS_IN, I, k, delta.device)
    bucket = ((b1[:, None] + b2[None, :]) % k).reshape(-1)
    sign = (s1[:, None] * s2[None, :]).reshape(-1).to(acc)
    return torch.zeros(B, k, dtype=acc, device=delta.device).index_add_(1, bucket, G.reshape(B, -1) * sign)
