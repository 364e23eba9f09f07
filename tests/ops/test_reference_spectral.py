"""The torch reference's own spectral stage (``reference.circular_convolve_sum``) against
the definition and against the fixed-order C++ stage (``ops.spectral``) the backends use.

The reference is plain torch (it imports nothing of the C++ extension); it must agree
with the C++ stage in float64 on odd shapes, and, since it sums in the C++ kernel's order
with every operation rounded once, to the bit in float32 and float64 on the CPU."""

from __future__ import annotations

import pytest
import torch

from cupid_engine.ops import cpu_backend, reference, spectral
from cupid_engine.ops.tolerances import max_rel_err, rtol

# (B, T, k): odd batch and step counts, k odd, even non-power-of-two, power of two.
SHAPES = [(1, 1, 8), (3, 1, 17), (5, 3, 33), (7, 4, 100), (2, 13, 61), (11, 2, 256)]


def _direct(cs1: torch.Tensor, cs2: torch.Tensor, k: int) -> torch.Tensor:
    """``out[b, m] = sum_t sum_j cs1[b, t, j] cs2[b, t, (m - j) mod k]`` written out (float64)."""
    j = torch.arange(k)
    shifted = cs2[:, :, (j[:, None] - j[None, :]) % k]  # [B, T, k (m), k (j)]: cs2[(m - j) mod k]
    return torch.einsum("btj,btmj->bm", cs1.double(), shifted.double())


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_the_written_out_convolution_float64(shape, generator):
    B, T, k = shape
    cs1 = torch.randn(B, T, k, generator=generator, dtype=torch.float64)
    cs2 = torch.randn(B, T, k, generator=generator, dtype=torch.float64)
    got = reference.circular_convolve_sum(cs1, cs2, k)
    assert got.shape == (B, k) and got.dtype == torch.float64
    assert max_rel_err(got, _direct(cs1, cs2, k)) < rtol(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_the_fixed_order_cpp_stage(shape, dtype, generator):
    assert cpu_backend.is_available(), "the fixed-order stage needs the C++ extension (`pip install -e .`)"
    B, T, k = shape
    cs1 = torch.randn(B, T, k, generator=generator, dtype=dtype)
    cs2 = torch.randn(B, T, k, generator=generator, dtype=dtype)
    ref = reference.circular_convolve_sum(cs1, cs2, k)
    cpp = spectral.circular_convolve_sum(cs1, cs2, k)
    assert max_rel_err(ref, cpp) < rtol(dtype)  # the parity a backend owes the reference
    assert torch.equal(ref, cpp)  # and more: the same order, so the same bits


def test_reference_does_not_depend_on_the_extension():
    """The spec stands alone: no import of the C++ stage (the circle reference -> spectral
    -> cpu_backend -> reference is gone)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(reference))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not imported & {"spectral", "cpu_backend", "extension", "_C", "cupid_engine.ops.spectral"}, imported
