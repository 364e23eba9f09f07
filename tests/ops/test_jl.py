"""Statistical check: every method preserves inner products like a dense Gaussian JL.

For >= 200 correlated pairs (x, y) we compare the mean relative error
``|<Px, Py> - <x, y>| / (|x| |y|)`` of each method with that of a dense Gaussian JL of the
same k, each pair under a fresh projection seed. Two families of gradients: iid
Gaussian, and structured per-sample Linear-layer gradients ``sum_t a_t delta_t x_t^T``
(sum of rank-1 terms with lognormal scales a_t), which is what the engine projects.
"""

from __future__ import annotations

import pytest
import torch

from cupid_engine import ops

PAIRS = 240
K = 256
O, I, T = 48, 40, 4  # P = 1920 structured gradients


def _pairs(kind: str, g: torch.Generator):
    """Return factored (delta, x) of shape [2*PAIRS, T, O], [2*PAIRS, T, I] and flat [2*PAIRS, P]."""
    if kind == "iid":
        a = torch.randn(PAIRS, O * I, dtype=torch.float64, generator=g)
        z = torch.randn(PAIRS, O * I, dtype=torch.float64, generator=g)
        rho = torch.rand(PAIRS, 1, dtype=torch.float64, generator=g) * 1.6 - 0.8
        b = rho * a + (1 - rho**2).sqrt() * z
        return None, torch.cat([a, b])
    # Structured: pair members share the inputs x_t (same states) with correlated deltas.
    scale = torch.exp(torch.randn(PAIRS, T, 1, dtype=torch.float64, generator=g))
    x = torch.randn(PAIRS, T, I, dtype=torch.float64, generator=g)
    d1 = torch.randn(PAIRS, T, O, dtype=torch.float64, generator=g) * scale
    d2 = 0.7 * d1 + 0.3 * torch.randn(PAIRS, T, O, dtype=torch.float64, generator=g) * scale
    delta = torch.cat([d1, d2])
    xs = torch.cat([x, x])
    flat = torch.einsum("bto,bti->boi", delta, xs).reshape(2 * PAIRS, -1)
    return (delta, xs), flat


def _pair_err(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """``|<Pa, Pb> - <a, b>| / (|a| |b|)`` for one projected pair ``p = [Pa; Pb]``."""
    return float(((p[0] * p[1]).sum() - (a * b).sum()).abs() / (a.norm() * b.norm()))


def _mean_err(project_pair, flat: torch.Tensor) -> float:
    return sum(_pair_err(project_pair(i), flat[i], flat[PAIRS + i]) for i in range(PAIRS)) / PAIRS


@pytest.mark.parametrize("kind", ["iid", "structured"])
def test_all_methods_match_gaussian_jl(kind):
    g = torch.Generator().manual_seed(2024 if kind == "iid" else 7)
    factored, flat = _pairs(kind, g)
    P = flat.shape[1]
    baseline = _mean_err(lambda i: flat[[i, PAIRS + i]] @ (torch.randn(P, K, dtype=torch.float64, generator=g) / K**0.5), flat)
    results = {
        method: _mean_err(lambda i, m=method: ops.project(flat[[i, PAIRS + i]], k=K, method=m, seed=1000 + i), flat)
        for method in ("dense", "sparse", "signshift")
    }
    if factored is not None:
        delta, xs = factored
        results["tensorsketch"] = _mean_err(
            lambda i: ops.tensorsketch(delta[[i, PAIRS + i]], xs[[i, PAIRS + i]], k=K, seed=1000 + i), flat
        )
    print(kind, "gaussian", baseline, results)
    for method, err in results.items():
        assert err <= 1.25 * baseline, f"{kind}: {method} mean rel err {err:.4f} vs Gaussian JL {baseline:.4f}"
    # And the sketch is not trivially exact: errors of the right order (~ 1/sqrt(k)).
    assert 0.2 / K**0.5 < baseline < 3 / K**0.5
