"""Single-rollout queries: which demonstrations (and steps) influence this rollout.

A FAISS index over whitened training-demo sums (exact ``IndexFlatIP`` by default,
HNSW as a measured-recall option) saved beside the store and rebuilt when its run
changes, and :func:`top_influencers`, which answers "why did this rollout fail/succeed"
without featurising anything: the rollout is already a split of the run.
"""

from __future__ import annotations

from cupid_engine.index.faiss_index import KINDS, InfluenceIndex, recall_at_k
from cupid_engine.index.query import (
    InfluenceResult,
    StepInfluence,
    build_index,
    open_index,
    top_influencers,
)

__all__ = [
    "KINDS",
    "InfluenceIndex",
    "InfluenceResult",
    "StepInfluence",
    "build_index",
    "open_index",
    "recall_at_k",
    "top_influencers",
]
