"""The ``triton`` backend of the projection ops (GPU; CPU under ``TRITON_INTERPRET=1``).

Exposes the backend interface used by ``ops/__init__.py``: ``project(x, k, method, seed,
s)`` and ``tensorsketch(delta, x, k, seed)``. Kernels live one op family per file:
``projection.py`` (dense, sparse, signshift), ``tensorsketch.py`` (CountSketch stage; the
FFT stage is ``torch.fft``) and ``_hash.py`` (the Triton mirror of ``ops/hashing.py``).

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported for the
interpreter to be used (tests do this in a subprocess).
"""

from __future__ import annotations

from cupid_engine.ops.triton.projection import project
from cupid_engine.ops.triton.tensorsketch import countsketch_pair, tensorsketch

__all__ = ["project", "tensorsketch", "countsketch_pair"]
