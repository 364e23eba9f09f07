"""Calibration of the tensorsketch cost model (``ops.tensorsketch_calibrate``): the direct
route's constant ``c_direct`` is measured and fitted like the others."""

from __future__ import annotations

import math

import pytest

from cupid_engine.ops import cpu_backend, tensorsketch_calibrate, tensorsketch_plan


@pytest.mark.parametrize("c_direct,c_scatter", [(2.3e-9, 6e-10), (7e-10, 1.1e-9)])
@pytest.mark.parametrize("k", [64, 4096])
def test_fit_direct_inverts_the_models_direct_term(c_direct, c_scatter, k):
    """Times that follow the plan's ``t_direct`` (plus what both calls share: an inverse FFT
    and a call overhead) give back the constant they were made with: the fit and the model
    agree on what ``c_direct`` and ``c_scatter`` multiply."""
    cost = tensorsketch_plan.CostModel(c_direct=c_direct, c_scatter=c_scatter, lanes=16)
    B = tensorsketch_calibrate.DIRECT_GROUPS * cost.lanes
    shared = B * cost.c_fft * k * math.log2(k) + 3e-5
    small, large = (tensorsketch_plan.estimate(B, T, O, I, k, cost, inverse=False)["direct"] + shared
                    for T, O, I in tensorsketch_calibrate.DIRECT_SIZES)
    got = tensorsketch_calibrate.fit_direct(small, large, c_scatter, cost.lanes)
    assert got == pytest.approx(c_direct, rel=1e-9)
    # A wrong c_scatter moves the fit (the gathered values are subtracted, not ignored).
    assert tensorsketch_calibrate.fit_direct(small, large, 2 * c_scatter, cost.lanes) < c_direct * (1 - 1e-3)


def test_calibrate_measures_c_direct_at_tiny_size():
    """A real calibration (k = 64, a second or two): c_direct comes from timing the kernel's
    direct route, not the shipped default, and is a valid constant of the model."""
    cost = tensorsketch_calibrate.calibrate(k=64)
    assert isinstance(cost, tensorsketch_plan.CostModel)
    assert cost.lanes == cpu_backend._C().tensorsketch_lanes(0)
    assert math.isfinite(cost.c_direct) and cost.c_direct > 0
    assert cost.c_direct != tensorsketch_plan.DEFAULT_COST.c_direct
    # Lossless through the config dict, like the shipped model.
    assert tensorsketch_plan.CostModel.from_dict(cost.to_dict()) == cost


def test_median_of_calibrations_is_per_constant():
    a = tensorsketch_plan.CostModel(c_fft=1e-11, c_direct=3e-9)
    b = tensorsketch_plan.CostModel(c_fft=3e-11, c_direct=1e-9)
    c = tensorsketch_plan.CostModel(c_fft=2e-11, c_direct=2e-9, c_hash=5e-9)
    m = tensorsketch_calibrate._median_model([a, b, c])
    assert (m.c_fft, m.c_direct, m.c_hash) == (2e-11, 2e-9, tensorsketch_plan.DEFAULT_COST.c_hash)
