"""The ``triton`` backend of the projection ops (GPU; CPU under ``TRITON_INTERPRET=1``).

Exposes the backend interface used by ``ops/__init__.py`` and ``ops/quality.py``:
``project(x, k, method, seed, s)``, ``tensorsketch(delta, x, k, seed)`` and
``quality_minmax(r, r_off, d, d_off)``. Kernels live one op family per file:
``projection.py`` (dense, sparse, signshift), ``tensorsketch.py`` (CountSketch stage; the
FFT stage is ``torch.fft``), ``quality.py`` (CUPID-Quality min/max GEMM) and ``_hash.py``
(the Triton mirror of ``ops/hashing.py``).

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported for the
interpreter to be used (tests do this in a subprocess).
"""

from __future__ import annotations

from cupid_engine.ops.triton.projection import project
from cupid_engine.ops.triton.quality import quality_minmax
from cupid_engine.ops.triton.tensorsketch import countsketch_pair, tensorsketch

__all__ = ["project", "tensorsketch", "countsketch_pair", "quality_minmax"]
