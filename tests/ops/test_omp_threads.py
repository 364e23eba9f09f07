"""OpenMP regions of the C++ kernels (scan, projection, count sketch, quality).

A region runs on one thread below its kernel's work threshold (``_C.serial_thresholds()``)
and in a forked child (GNU libgomp's pool does not survive fork); either way each output is
computed by one thread in a fixed order, so the bytes must not change. The inputs here are
sized from the thresholds themselves: one just above (a real two-thread region) and one
below (serial), so a later change of a threshold keeps both paths tested.
"""

from __future__ import annotations

import hashlib
import multiprocessing

import numpy as np
import pytest
import torch

from cupid_engine import ops
from cupid_engine.index.quantized import quantize_query, scan
from cupid_engine.ops import cpu_backend

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(), reason="C++ extension not built")


def _C():
    return cpu_backend._C()


def _thresholds() -> dict[str, int]:
    return _C().serial_thresholds()


class _threads:
    """``_C.set_num_threads(n)`` for a block, restored after."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.before = _C().num_threads()
        _C().set_num_threads(self.n)

    def __exit__(self, *exc):
        _C().set_num_threads(self.before)


def _scan_inputs(rng: np.random.Generator, rows: int, k: int):
    codes = rng.integers(-127, 128, size=(rows, k), dtype=np.int8)
    scales = (rng.random(rows) + 0.5).astype(np.float32)
    return codes, scales, rng.standard_normal(k).astype(np.float32)


def _scan_exact(codes: np.ndarray, scales: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The kernel's float32 expression ``(scale_i * q_scale) * float(int32 dot)``, dot exact in int64."""
    qc, qs = quantize_query(q)
    dots = codes.astype(np.int64) @ qc.astype(np.int64)
    return (scales * np.float32(qs)) * dots.astype(np.float32)


def _big_inputs(rng: np.random.Generator) -> dict:
    """One input per kernel just above its threshold (a two-thread region in the parent), as
    numpy arrays: the fork test's child calls the kernels without any torch op (torch's own
    OpenMP regions hang in a forked child too, which is not what is tested here)."""
    from cupid_engine import constants as C
    from cupid_engine.ops import reference

    t = _thresholds()
    k_scan = 515
    scan_in = _scan_inputs(rng, t["scan_bytes"] // k_scan + 7, k_scan)
    # Projection: a full row group of 32 over >= 2 superblocks (parallel) plus 5 rows (serial).
    x = rng.standard_normal((37, t["project_bytes"] // (32 * 4) + 17), dtype=np.float32)
    # Count sketch: rows * (O + I + 2k) * 4 bytes above the threshold.
    O, I, k_cs = 700, 901, 1024
    rows = t["project_bytes"] // ((O + I + 2 * k_cs) * 4) + 3
    delta, xin = rng.standard_normal((rows, O), dtype=np.float32), rng.standard_normal((rows, I), dtype=np.float32)
    tables = [
        v.numpy()
        for stream, n in ((C.STREAM_TS_OUT, O), (C.STREAM_TS_IN, I))
        for v in reference.countsketch_buckets(3, stream, n, k_cs)
    ]
    # Quality: 2 * rollout rows * demo rows * k flops above the threshold, odd segments.
    r_len, d_len, k_q = [37, 50, 41], [23] * 40 + [17], 384
    while 2 * sum(r_len) * sum(d_len) * k_q < t["quality_flops"]:
        d_len.append(29)
    r = rng.standard_normal((sum(r_len), k_q), dtype=np.float32)
    d = rng.standard_normal((sum(d_len), k_q), dtype=np.float32)
    ro, do = np.r_[0, np.cumsum(r_len)].astype(np.int64), np.r_[0, np.cumsum(d_len)].astype(np.int64)
    return {"scan": scan_in, "x": x, "cs": (delta, xin, tables, k_cs), "quality": (r, ro, d, do)}


_METHODS = {"signshift": (2, 1), "sparse": (1, 4)}  # cpu_backend's method ids, s


def _project(x: np.ndarray, method: str) -> np.ndarray:
    code, s = _METHODS[method]
    out = np.zeros((x.shape[0], 256), np.float32)
    _C().project_cpu(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], x.shape[1], 256, code, 0, 5, s)
    return out


def _run_all(inp: dict) -> dict[str, bytes]:
    """Every OpenMP kernel on ``inp`` (no torch op), as raw bytes per output."""
    out = {"scan": scan(*inp["scan"]).tobytes()}
    for method in _METHODS:
        out[f"project_{method}"] = _project(inp["x"], method).tobytes()
    delta, xin, (b1, s1, b2, s2), k_cs = inp["cs"]
    rows, O, I = delta.shape[0], delta.shape[1], xin.shape[1]
    a, b = np.zeros((rows, k_cs), np.float32), np.zeros((rows, k_cs), np.float32)
    _C().countsketch_pair_cpu(delta.ctypes.data, xin.ctypes.data, b1.ctypes.data, s1.ctypes.data, b2.ctypes.data,
                              s2.ctypes.data, a.ctypes.data, b.ctypes.data, rows, O, I, k_cs, 0)
    out["countsketch"] = a.tobytes() + b.tobytes()
    r, ro, d, do = inp["quality"]
    m, n = len(ro) - 1, len(do) - 1
    mm, xm = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
    _C().quality_minmax_cpu(r.ctypes.data, ro.ctypes.data, m, d.ctypes.data, do.ctypes.data, n, r.shape[1],
                            mm.ctypes.data, xm.ctypes.data, 0)
    out["quality"] = mm.tobytes() + xm.tobytes()
    return out


def _digests(out: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(b).hexdigest() for name, b in out.items()}


def test_threads_follow_work_threshold():
    with _threads(2):
        assert _C().omp_threads(999, 1000) == 1
        assert _C().omp_threads(1000, 1000) == 2
        assert not _C().in_forked_child()
    assert set(_thresholds()) == {"scan_bytes", "project_bytes", "quality_flops"}


def test_serial_and_parallel_regions_give_the_same_bytes(rng):
    """Above each threshold with 1 and 2 threads (serial vs a real parallel region), and the
    projection's serial 5-row group against the same rows inside a parallel call."""
    inp = _big_inputs(rng)
    with _threads(1):
        one = _run_all(inp)
    with _threads(2):
        two = _run_all(inp)
        tail = {m: _project(np.ascontiguousarray(inp["x"][32:]), m) for m in _METHODS}
    assert one.keys() == two.keys()
    for name in one:
        assert one[name] == two[name], name
    for m, t in tail.items():
        full = np.frombuffer(two[f"project_{m}"], np.float32).reshape(37, 256)
        assert full[32:].tobytes() == t.tobytes(), m
    # The wrappers agree with the raw calls (the fork child uses the raw calls, no torch).
    x = torch.from_numpy(inp["x"])
    assert cpu_backend.project(x, 256, "signshift", 5, 1).numpy().tobytes() == two["project_signshift"]
    r, ro, d, do = inp["quality"]
    mm, xm = ops.quality_minmax(torch.from_numpy(r), ro, torch.from_numpy(d), do, backend="cpu")
    assert mm.numpy().tobytes() + xm.numpy().tobytes() == two["quality"]
    # The scan's bytes are its exact definition, serial or not.
    assert one["scan"] == _scan_exact(*inp["scan"]).tobytes()


def test_small_scan_is_serial_and_exact(rng):
    codes, scales, q = _scan_inputs(rng, 1001, 1024)  # ~1 MiB of codes: below the threshold
    assert codes.size < _thresholds()["scan_bytes"]
    with _threads(2):
        two = scan(codes, scales, q)
    assert two.tobytes() == _scan_exact(codes, scales, q).tobytes()


def _child(inp: dict, queue) -> None:  # runs in a forked child, still set to 2 threads
    queue.put((_C().in_forked_child(), _digests(_run_all(inp))))


def test_kernels_survive_fork(rng):
    """A child forked after the parent ran every OpenMP kernel in a two-thread region (so
    libgomp's pool exists) runs them all and gets the parent's bytes. Before the fork guard the
    child hung in its first region (the scan, verified against the old build); the timeout
    turns such a regression into a failure instead of a hung run."""
    inp = _big_inputs(rng)
    with _threads(2):
        want = _digests(_run_all(inp))
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(inp, queue))
        proc.start()
        try:
            forked, got = queue.get(timeout=60)  # read before join: a full pipe blocks the child's exit
        except Exception:  # queue.Empty: hung (or died) in a kernel
            proc.kill()
            proc.join(10)
            pytest.fail(f"the forked child gave no result in 60 s (exit code {proc.exitcode}): hung in a kernel?")
        proc.join(30)
        assert proc.exitcode == 0
        assert not _C().in_forked_child()
    assert forked
    assert got == want
