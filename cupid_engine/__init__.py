"""cupid_engine: a gradient-store engine for curating robot demonstrations.

The facade below is what most users need (``import cupid_engine as ce``); heavy
subpackages are imported lazily so that ``import cupid_engine`` stays cheap and never
imports ray or robosuite.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

from cupid_engine.facade import curate, score, top_influencers  # noqa: E402

__all__ = ["__version__", "curate", "score", "top_influencers"]
