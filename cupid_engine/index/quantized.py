"""Int8 codes of the index vectors and the quantised scan that reads them.

A single-rollout query is one scan of N×K values, so its floor is the bytes read. With
one int8 code per coordinate and a float32 scale per row (symmetric, per-row:
``code = round(127·x/max|x|)``) the scan reads a quarter of the fp32 vectors; its scores
are approximate (error ≤ ½·scale/127·‖q‖₁ per row), so the index re-ranks the best
candidates exactly against the fp32 vectors and returns exact scores. Whether the true
top-k survive to re-ranking is measured (recall@k in ``bench query``), not assumed.

Backends: :func:`scan_reference` (torch, readable, float64 for tests) and the C++ kernel
``csrc/cpu/scan.cpp`` (OpenMP over rows, fixed-order lane sums: thread-count independent).
"""

from __future__ import annotations

import numpy as np
import torch

QMAX = 127


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 codes.

    Args:
        x: ``[N, K]`` float vectors.

    Returns:
        ``(codes [N, K] int8, scales [N] float32)`` with ``x ≈ codes · scales[:, None]``;
        an all-zero row gets scale 0.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"need [N, K] vectors, got shape {x.shape}")
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    scales = (amax / QMAX).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / safe[:, None]), -QMAX, QMAX).astype(np.int8)
    return codes, scales


def scan_reference(codes: np.ndarray, scales: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``[N]`` approximate scores ``scales[i]·⟨codes[i], q⟩`` in float64 (the spec)."""
    c = torch.from_numpy(np.asarray(codes)).to(torch.float64)
    return (torch.from_numpy(np.asarray(scales, np.float64)) * (c @ torch.from_numpy(np.asarray(q, np.float64)))).numpy()


def scan(codes: np.ndarray, scales: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``[N]`` float32 approximate scores by the C++ kernel (one pass over the codes)."""
    from cupid_engine.ops import cpu_backend

    codes = np.ascontiguousarray(codes, dtype=np.int8)
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    q = np.ascontiguousarray(np.asarray(q, dtype=np.float32).reshape(-1))
    if codes.ndim != 2 or scales.shape != (codes.shape[0],) or q.shape != (codes.shape[1],):
        raise ValueError(f"need codes [N, K], scales [N], q [K]; got {codes.shape}, {scales.shape}, {q.shape}")
    if not cpu_backend.is_available():
        raise RuntimeError("the int8 scan needs the C++ extension cupid_engine._C: run `make`")
    out = np.empty(codes.shape[0], np.float32)
    if codes.shape[0]:
        cpu_backend._C().scan_int8_cpu(codes.ctypes.data, scales.ctypes.data, codes.shape[0], codes.shape[1],
                                       q.ctypes.data, out.ctypes.data)
    return out
