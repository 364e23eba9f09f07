"""Comparison tolerances per dtype, in one place (relative error of outputs vs the reference).

``rtol`` bounds ``max|out - ref| / max(|ref|_max, tiny)`` over a whole output: the
backends sum in different orders, so only a norm-relative bound is meaningful.
"""

from __future__ import annotations

import torch

RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    # Half inputs are converted exactly to float32 before accumulation, so outputs agree
    # as closely as float32 ones; the bound only covers different summation orders.
    torch.float16: 1e-5,
    torch.bfloat16: 1e-5,
}


def rtol(dtype: torch.dtype) -> float:
    return RTOL[dtype]


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-relative max abs error (see module docstring)."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    scale = ref64.abs().max().clamp_min(1e-300)
    return float((out64 - ref64).abs().max() / scale)
