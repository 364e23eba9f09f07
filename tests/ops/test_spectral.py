"""Thread-count and batch-split independence of the tensorsketch spectral stage and of the
torch reference (issue 17): the same rows give the same bits with 1 or 2 torch threads and
in any batch split. Sizes are ones where the previous torch formulation (``a * b`` summed,
a complex matmul for narrow factors) differed in the last bit."""

from __future__ import annotations

import contextlib

import pytest
import torch

from cupid_engine import ops
from cupid_engine.featurize import hooks
from cupid_engine.ops import cpu_backend, spectral
from cupid_engine.ops.tolerances import max_rel_err


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _split(fn, n, size):
    return torch.cat([fn(i, min(n, i + size)) for i in range(0, n, size)])


def _cplx(shape, generator, dtype=torch.complex64):
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    return torch.complex(torch.randn(shape, generator=generator, dtype=real), torch.randn(shape, generator=generator, dtype=real))


def _ri(z):
    return torch.view_as_real(z.to(torch.complex128))


def test_extension_is_built():
    assert cpu_backend.is_available(), "the spectral kernels need the C++ extension (`pip install -e .`)"


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_spectral_mac_split_and_threads(dtype, generator):
    R, T, F = 301, 3, 1025
    a, b = _cplx((R, T, F), generator, dtype), _cplx((R, T, F), generator, dtype)
    base = _cplx((R, F), generator, dtype)

    def mac(i, j, accumulate=True):
        acc = base[i:j].clone()
        return spectral.spectral_mac(a[i:j], b[i:j], acc, accumulate=accumulate)

    with threads(1):
        full = mac(0, R)
        for size in (1, 7, 64):
            assert torch.equal(_split(mac, R, size), full), size
    with threads(2):
        assert torch.equal(mac(0, R), full)
    # The order is the documented one: equal, bit for bit, to single-rounding torch ops.
    want_re, want_im = base.real.clone(), base.imag.clone()
    for t in range(T):
        ar, ai, br, bi = a[:, t].real, a[:, t].imag, b[:, t].real, b[:, t].imag
        want_re = want_re + (ar * br - ai * bi)
        want_im = want_im + (ar * bi + ai * br)
    assert torch.equal(full, torch.complex(want_re, want_im))
    fresh = spectral.spectral_mac(a, b, torch.empty_like(base), accumulate=False)
    want = (a.to(torch.complex128) * b.to(torch.complex128)).sum(1)
    assert max_rel_err(_ri(fresh), _ri(want)) < (1e-5 if dtype == torch.complex64 else 1e-12)


def test_dft_spectrum_split_threads_and_parity(generator):
    R, T, n, k = 203, 2, 7, 1024
    v = torch.randn(R, T, n, generator=generator)
    table = hooks._dft_table(11, 1, n, k, torch.complex64)

    def dft(i, j):
        return spectral.dft_spectrum(v[i:j], table, torch.empty(j - i, T, k // 2 + 1, dtype=torch.complex64))

    with threads(1):
        full = dft(0, R)
        for size in (1, 3, 64):
            assert torch.equal(_split(dft, R, size), full), size
    with threads(2):
        assert torch.equal(dft(0, R), full)
    t64 = hooks._dft_table(11, 1, n, k, torch.complex128)
    want = torch.matmul(v.double().to(torch.complex128), t64)
    got64 = spectral.dft_spectrum(v.double(), t64, torch.empty(R, T, k // 2 + 1, dtype=torch.complex128))
    assert max_rel_err(_ri(got64), _ri(want)) < 1e-12
    assert max_rel_err(_ri(full), _ri(want)) < 1e-5


@pytest.mark.parametrize("strategy", ["auto", "fft"])
def test_fused_tensorsketch_threads_and_batch_split(strategy, generator):
    # A narrow (DFT) factor, wide factors with T = 1 and T = 3: every branch of the FFT path.
    B, k = 300, 512
    shapes = [(1, 40, 9), (1, 7, 33), (3, 24, 20)]  # (T, O, I)
    factors = [
        (s + 1, torch.randn(B, T, O, generator=generator), torch.randn(B, T, I, generator=generator))
        for s, (T, O, I) in enumerate(shapes)
    ]

    def sketch(i, j):
        return hooks.fused_tensorsketch([(s, d[i:j], x[i:j]) for s, d, x in factors], k=k, strategy=strategy)

    with threads(1):
        full = sketch(0, B)
        for size in (1, 7, 100):
            assert torch.equal(_split(sketch, B, size), full), size
    with threads(2):
        assert torch.equal(sketch(0, B), full)
    want = sum(ops.tensorsketch(d.double(), x.double(), k=k, seed=s, backend="torch") for s, d, x in factors)
    assert max_rel_err(full.double(), want) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_ops_thread_count_independent(backend, generator):
    x = torch.randn(37, 5001, generator=generator)
    d, xi = torch.randn(67, 9, 300, generator=generator), torch.randn(67, 9, 257, generator=generator)
    out = {}
    for n in (1, 2):
        with threads(n):
            out[n] = (
                ops.project(x, k=512, method="dense", backend=backend),
                ops.project(x, k=512, method="sparse", s=2, backend=backend),
                ops.tensorsketch(d, xi, k=1024, seed=3, backend=backend),
            )
    for a, b in zip(out[1], out[2]):
        assert torch.equal(a, b)
