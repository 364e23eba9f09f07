"""cupid_engine: a gradient-store engine for curating robot demonstrations.

The facade below is what most users need (``import cupid_engine as ce``); heavy
subpackages are imported lazily so that ``import cupid_engine`` stays cheap and never
imports ray or robosuite.
"""

from __future__ import annotations

import logging
import os

# The C++ kernels and torch share one OpenMP runtime (torch's libgomp). With GNU OpenMP's
# default active waiting, its workers spin for ~ms after every parallel region and starve
# the other thread pools that run in between (FFT, BLAS): measured on 2 cores, tensorsketch
# ran 2.4k samples/s active vs 26k passive, and the signshift kernel 0.44 vs 0.69 of the
# read bandwidth. The setting only takes effect if made before the runtime starts, i.e.
# before torch is first imported; an explicit user setting always wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# MKL's GEMM splits small-M products over threads along the inner dimension and picks
# kernels by row count, so a policy's forward/backward (hence its features) changed in the
# last bit with the torch thread count and the batch split (measured: [37, 2048] @ [2048,
# 64] differs between 1 and 2 threads). Strict conditional numerical reproducibility fixes
# the summation order (~5-15% slower GEMMs here). Read at MKL's first call: effective only
# when cupid_engine is imported before torch does any matmul.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

from cupid_engine.facade import curate, score, top_influencers  # noqa: E402

__all__ = ["__version__", "curate", "score", "top_influencers"]
