"""The Python facade: ``ce.score``, ``ce.top_influencers``, ``ce.curate``.

Thin wrappers that open a store and dispatch to ``scorers``, ``index`` and ``scorers.curation``;
imports are deferred so that ``import cupid_engine`` does not pull FAISS or zarr.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cupid_engine.store.reader import StoreReader


def score(method: str, *, store: StoreReader | str | os.PathLike, run: str, **options: Any):
    """Score every training episode of ``store``/``run`` with ``method``; returns a pyarrow.Table."""
    from cupid_engine.scorers import score as _score

    return _score(method, store=store, run=run, **options)


def top_influencers(*, store: StoreReader | str | os.PathLike, run: str | Sequence[str], rollout: str, k: int = 10, **options: Any):
    """Top-``k`` demonstrations influencing one rollout episode (see ``index.top_influencers``)."""
    from cupid_engine.index import top_influencers as _top

    return _top(store, run, rollout, k=k, **options)


def curate(mode: str, scores: Any, *, k: int, **options: Any):
    """``filter`` (drop k lowest training demos) or ``select`` (add k highest holdout demos)."""
    from cupid_engine.scorers import curation

    if mode == "filter":
        return curation.filter_k(scores, k, **options)
    if mode == "select":
        return curation.select_k(scores, k, **options)
    raise ValueError(f"curate mode must be 'filter' or 'select', got {mode!r}")
