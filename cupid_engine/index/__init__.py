"""Single-rollout queries: which demonstrations (and steps) influence this rollout.

A FAISS index over whitened training-demo sums saved beside the store and rebuilt when
its run changes — by default ``auto``: the exact fp32 scan (``flat``) for small runs, the
int8 scan with a certified exact re-rank (``sq8``) from :data:`AUTO_SQ8_MIN_BYTES` of
vectors on, both giving the exact top-k and exact scores; HNSW is a measured-recall
option — and
:func:`top_influencers`, which answers "why did this rollout fail/succeed" without
featurising anything: the rollout is already a split of the run.
"""

from __future__ import annotations

from cupid_engine.index.faiss_index import (
    AUTO_SQ8_MIN_BYTES,
    CHOICES,
    DEFAULT_KIND,
    KINDS,
    InfluenceIndex,
    choose_kind,
    recall_at_k,
)
from cupid_engine.index.query import (
    InfluenceResult,
    StepInfluence,
    build_index,
    open_index,
    top_influencers,
)

__all__ = [
    "AUTO_SQ8_MIN_BYTES",
    "CHOICES",
    "DEFAULT_KIND",
    "KINDS",
    "InfluenceIndex",
    "InfluenceResult",
    "StepInfluence",
    "build_index",
    "choose_kind",
    "open_index",
    "recall_at_k",
    "top_influencers",
]
