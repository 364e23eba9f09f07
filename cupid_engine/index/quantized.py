"""Int8 codes of the index vectors and the quantised scan that reads them.

A single-rollout query is one scan of N×K values, so its floor is the bytes read. With
one int8 code per coordinate and a float32 scale per row (symmetric, per-row:
``code = round(127·x/max|x|)``) the scan reads a quarter of the fp32 vectors. The query
is quantised the same way once per call, so each row's dot product is an exact int32 sum
of int8 products (vectorisable without reordering concerns, identical for any thread
count). The scores are approximate (error ≤ ½·sₓ·‖q‖₁ + ½·s_q·‖x̂‖₁ per row, x̂ = sₓ·codes
the dequantised row: x·q − x̂·q̂ = (x − x̂)·q + x̂·(q − q̂)), so the index re-ranks the
best candidates exactly against the fp32 vectors and returns exact scores; with this
bound it also re-ranks every other row that could still beat the k-th exact score, so
the top-k is certified exact (``InfluenceIndex._search_sq8``). How many rows that takes,
and the recall of a fixed re-rank depth without the certificate, are measured in
``bench query``.

Backends: :func:`scan_reference` (readable, float64 for tests) and the C++ kernel
``csrc/cpu/scan.cpp`` (OpenMP over rows).
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


def quantize_query(q: np.ndarray) -> tuple[np.ndarray, float]:
    """``(codes [K] int8, scale)`` of one query, as :func:`quantize_rows` does per row."""
    codes, scales = quantize_rows(np.asarray(q, np.float32).reshape(1, -1))
    return codes[0], float(scales[0])


def scan_reference(codes: np.ndarray, scales: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``[N]`` approximate scores ``scales[i]·s_q·⟨codes[i], q_codes⟩`` in float64 (the spec)."""
    qc, qs = quantize_query(q)
    dots = np.asarray(codes, np.int64) @ qc.astype(np.int64)  # exact
    return np.asarray(scales, np.float64) * qs * dots.astype(np.float64)


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
    qc, qs = quantize_query(q)
    out = np.empty(codes.shape[0], np.float32)
    if codes.shape[0]:
        cpu_backend._C().scan_int8_cpu(codes.ctypes.data, scales.ctypes.data, codes.shape[0], codes.shape[1],
                                       qc.ctypes.data, np.float32(qs), out.ctypes.data)
    return out
