"""Measure the constants of ``ops.tensorsketch_plan.CostModel`` on this machine.

Apart from the plan because it times the routes of ``ops.cpu_backend``, which imports the
plan to choose them. ``python -m cupid_engine.ops.tensorsketch_calibrate`` prints the
defaults and a fresh calibration.
"""

from __future__ import annotations

import math
import time

from cupid_engine.ops import cpu_backend
from cupid_engine.ops.tensorsketch_plan import DEFAULT_COST, CostModel

__all__ = ["calibrate"]


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


def calibrate(k: int = 4096, seed: int = 0) -> CostModel:
    """Measure the constants of the model on this machine (one thread; ~seconds).

    Each constant is a two-point fit: the route is timed (CPU time, best of 5) at two sizes
    that differ in one term only, so the difference isolates that term.
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
    finally:
        C.set_num_threads(before_omp)
        torch.set_num_threads(before_torch)
    return CostModel(c_fft=float(c_fft), c_scatter=float(c_scatter), c_flop=float(c_flop), c_hash=float(c_hash),
                     lanes=lanes)


if __name__ == "__main__":
    print("default:   ", DEFAULT_COST.to_dict())
    print("calibrated:", calibrate().to_dict())
