"""Encoding of fp32 step features into the run's storage dtype, and back.

One place owns every storage dtype so that writers, readers and tests agree:
- ``float32`` / ``float16``: plain numpy casts (round to nearest even).
- ``bfloat16``: numpy has no bfloat16 and zarr 3 cannot store it natively, so the
  upper 16 bits of the fp32 pattern are kept as ``uint16`` after round-to-nearest-even.
- ``int8``: symmetric per-row absmax quantisation; the fp32 scale of each row
  (``absmax / 127``) is stored beside it, so the error per element is <= scale / 2.
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127


def storage_numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of the zarr ``steps`` array for a storage dtype name."""
    return np.dtype({"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}[dtype])


def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode fp32 features for storage.

    Args:
        x: ``[R, K]`` float32, finite.
        dtype: a storage dtype name (see ``RunConfig.dtype``).

    Returns:
        ``(data [R, K], scales [R] float32 or None)``; scales only for ``int8``.
    """
    if dtype == "float32":
        return x, None
    if dtype == "float16":
        return x.astype(np.float16), None
    if dtype == "bfloat16":
        u = x.view(np.uint32)
        # Round to nearest even on the dropped 16 bits (inputs are finite, so no NaN care).
        rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
        return (rounded >> np.uint32(16)).astype(np.uint16), None
    if dtype == "int8":
        absmax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
        scales = (absmax / np.float32(INT8_MAX)).astype(np.float32)
        safe = np.where(scales > 0, scales, np.float32(1.0))
        q = np.rint(x / safe[:, None])
        np.clip(q, -INT8_MAX, INT8_MAX, out=q)
        return q.astype(np.int8), scales
    raise ValueError(f"unknown storage dtype {dtype!r}")


def decode(data: np.ndarray, dtype: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`encode`: ``[R, K]`` stored values -> ``[R, K]`` float32."""
    if dtype == "float32":
        return np.asarray(data, dtype=np.float32)
    if dtype == "float16":
        return data.astype(np.float32)
    if dtype == "bfloat16":
        return (data.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype == "int8":
        if scales is None:
            raise ValueError("int8 storage needs per-row scales")
        return data.astype(np.float32) * scales.astype(np.float32)[:, None]
    raise ValueError(f"unknown storage dtype {dtype!r}")
