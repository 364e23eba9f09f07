"""Measure the constants of ``ops.tensorsketch_plan.CostModel`` on this machine.

Apart from the plan because it times the routes of ``ops.cpu_backend``, which imports the
plan to choose them. ``python -m cupid_engine.ops.tensorsketch_calibrate`` prints the
defaults and a fresh calibration (``--repeats N``: N calibrations, then the per-constant
median).
"""

from __future__ import annotations

import math
import time

from cupid_engine.ops import cpu_backend
from cupid_engine.ops.tensorsketch_plan import DEFAULT_COST, CostModel

__all__ = ["calibrate", "fit_direct"]

# The direct route's two sizes (T, O, I), DIRECT_GROUPS lane groups each: they differ in
# T O I (the products) and, much less, in T (O + I) (the gathered factor values, modelled by
# c_scatter). Several groups, because one group's products at the large size take ~0.4 ms
# and the best of 5 still moved by ~15% between runs.
DIRECT_SIZES = ((4, 16, 16), (4, 256, 256))
DIRECT_GROUPS = 4


def _best(fn, repeats: int = 5) -> float:
    """Least CPU seconds of ``fn`` over ``repeats`` calls (one thread: CPU time is the work
    itself, robust to other processes pre-empting this one on a shared machine)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def fit_direct(t_small: float, t_large: float, c_scatter: float, lanes: int, groups: int = DIRECT_GROUPS) -> float:
    """``c_direct`` from the CPU seconds of a direct-route kernel call over ``groups`` full lane
    groups at the two :data:`DIRECT_SIZES` (``ops.tensorsketch_plan``'s ``t_direct`` with
    ``B = groups * lanes``).

    The difference of the two times is ``c_direct`` times the difference in products plus
    ``c_scatter`` times ``lanes`` times the difference in gathered values; what both calls
    share (the inverse FFT of the accumulated output, the call itself) cancels.
    """
    (Ta, Oa, Ia), (Tb, Ob, Ib) = DIRECT_SIZES
    gathered = groups * lanes * (Tb * (Ob + Ib) - Ta * (Oa + Ia)) * c_scatter
    return max((t_large - t_small - gathered) / (groups * (Tb * Ob * Ib - Ta * Oa * Ia)), 1e-12)


def calibrate(k: int = 4096, seed: int = 0) -> CostModel:
    """Measure the constants of the model on this machine (one thread; ~seconds).

    Each constant is a two-point fit: the route is timed (CPU time, best of 5) at two sizes
    that differ in one term only, so the difference isolates that term (``c_hash`` and
    ``c_direct`` subtract a term already measured: the GEMM's flops, the gathered factor
    values at ``c_scatter``; :func:`fit_direct`).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    C = cpu_backend._C()
    before_omp, before_torch = C.num_threads(), torch.get_num_threads()
    C.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        lanes = int(C.tensorsketch_lanes(0))
        B = lanes
        lk = k * math.log2(k)

        def fft(T, n):
            d = torch.randn(B, T, n, generator=g)
            x = torch.randn(B, T, n, generator=g)
            return _best(lambda: cpu_backend.tensorsketch(d, x, k, 1, strategy="fft"))

        t_small, t_long = fft(8, 8), fft(40, 8)
        c_fft = max((t_long - t_small) / (B * 64 * lk), 1e-13)
        t_wide = fft(8, 4096)
        c_scatter = max((t_wide - t_small) / (B * 8 * 2 * (4096 - 8)), 1e-12)

        def dense(T, O):
            d = torch.randn(B, T, O, generator=g)
            x = torch.randn(B, T, O, generator=g)
            return _best(lambda: cpu_backend.tensorsketch(d, x, k, 1, strategy="dense"))

        d1, d2 = dense(1, 256), dense(257, 256)
        c_flop = max((d2 - d1) / (B * 2 * 256 * 256 * 256), 1e-13)
        c_hash = max((d1 - B * 2 * 256 * 256 * c_flop) / (B * 256 * 256), 1e-12)

        def direct(T, O, I):
            # The direct route alone (no fft layer in the call): the kernel's time-domain
            # products for one lane group, plus the inverse FFT both sizes share.
            d = torch.randn(DIRECT_GROUPS * B, T, O, generator=g)
            x = torch.randn(DIRECT_GROUPS * B, T, I, generator=g)
            return _best(lambda: cpu_backend.tensorsketch_fft_layers([(1, d, x)], k, direct=[True]))

        c_direct = fit_direct(*(direct(*size) for size in DIRECT_SIZES), c_scatter, lanes)
    finally:
        C.set_num_threads(before_omp)
        torch.set_num_threads(before_torch)
    return CostModel(c_fft=float(c_fft), c_scatter=float(c_scatter), c_flop=float(c_flop), c_hash=float(c_hash),
                     c_direct=float(c_direct), lanes=lanes)


def _median_model(models: list[CostModel]) -> CostModel:
    """Per-constant median of several calibrations (what the shipped defaults are)."""
    import statistics

    fields = ("c_fft", "c_scatter", "c_flop", "c_hash", "c_direct")
    return CostModel(**{f: float(statistics.median(getattr(m, f) for m in models)) for f in fields},
                     lanes=models[0].lanes)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=1, help="calibrations to run; prints each and the median")
    ap.add_argument("--k", type=int, default=4096, help="sketch dimension (a power of two)")
    args = ap.parse_args()
    print("default:   ", DEFAULT_COST.to_dict())
    runs = [calibrate(k=args.k, seed=r) for r in range(args.repeats)]
    for r in runs:
        print("calibrated:", r.to_dict())
    if len(runs) > 1:
        print("median:    ", _median_model(runs).to_dict())
