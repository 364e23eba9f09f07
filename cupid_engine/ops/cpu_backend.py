"""The ``cpu`` backend: host wrappers of the C++ kernels in ``csrc/cpu``.

The C++ module takes raw pointers, so every check on device, dtype, contiguity and shape
happens here (or, for ``quality_minmax``, in ``ops/quality.py``) before a pointer leaves
Python. The tensorsketch FFT stage runs in
``torch.fft`` (pocketfft on CPU): the C++ kernel fuses the hashing scatter, which is the
part torch cannot do without index tensors.
"""

from __future__ import annotations

import torch

from cupid_engine import constants as C
from cupid_engine.ops import reference

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_METHODS = {"dense": 0, "sparse": 1, "signshift": 2}


def _C():
    from cupid_engine import _C as mod  # noqa: N811

    return mod


def is_available() -> bool:
    """Whether the extension is installed; an installed one that fails to load is an error.

    Only "not built" falls through to another backend. An ABI mismatch ("undefined symbol")
    or a missing shared library would otherwise turn ``auto`` into the slow torch reference
    without a word.
    """
    try:
        _C()
    except ModuleNotFoundError as exc:
        if exc.name == "cupid_engine._C":
            return False
        raise RuntimeError(f"the C++ extension cupid_engine._C failed to load: {exc}") from exc
    except ImportError as exc:
        raise RuntimeError(
            f"the C++ extension cupid_engine._C is installed but failed to load: {exc}; "
            "rebuild it with `pip install --no-build-isolation --no-deps -e .`"
        ) from exc
    return True


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


def tensorsketch(delta: torch.Tensor, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    cs1, cs2 = countsketch_pair(delta, x, k, seed)
    return reference.circular_convolve_sum(cs1, cs2, k)


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
