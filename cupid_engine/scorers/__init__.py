"""Scoring methods: which demonstrations help or hurt a policy.

Every method is a :class:`~cupid_engine.scorers.base.Scorer` registered by name
(``available_scorers()``): ``cupid``, ``cupid-step``, ``cupid-quality``, ``qoq``, ``trak-traj``,
``tracin`` and the baselines ``random``, ``length``, ``loss``, ``success-sim`` and
``oracle``. Each module keeps the method's math in pure array functions (tested
without a store) and a thin adapter reading what it needs from a gradient-store run:
whitened per-episode sums (cupid), whitened step features (cupid-quality), raw step
features (qoq), per-trajectory features (trak-traj), per-checkpoint sums (tracin).
Influence methods share one :mod:`~cupid_engine.scorers.preconditioner` (training-split
Gram, relative damping, Cholesky whitening). Results are score tables
(:mod:`~cupid_engine.scorers.table`), and :mod:`~cupid_engine.scorers.curation`
turns them into filtered or selected datasets.

Example:
    >>> table = score("cupid", store=store, run="base", rollouts="rollout")
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from cupid_engine.scorers.base import Scorer, available_scorers, get_scorer, register
from cupid_engine.scorers import baselines, cupid, cupid_step, qoq, quality, tracin, trak_traj  # noqa: F401  (registration)
from cupid_engine.scorers.preconditioner import Preconditioner, concat_checkpoints
from cupid_engine.scorers.table import make_table, read_table, write_table

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader

__all__ = [
    "Preconditioner",
    "Scorer",
    "available_scorers",
    "concat_checkpoints",
    "get_scorer",
    "make_table",
    "read_table",
    "register",
    "score",
    "write_table",
]

# Options that are data for one call rather than part of a method's config.
_INPUT_OPTIONS = ("states", "loss")


def _open(store: StoreReader | str | os.PathLike) -> StoreReader:
    if hasattr(store, "catalog") and hasattr(store, "run"):
        return store
    from cupid_engine.store import open_store

    return open_store(store)


def cached(store: StoreReader) -> StoreReader:
    """``store`` with chunk-cached step reads for one call (``scorers._cache``)."""
    from cupid_engine.scorers._cache import cached as _cached

    return _cached(store)


def score(method: str, *, store: StoreReader | str | os.PathLike, run: str, **options: Any) -> pa.Table:
    """Score episodes of ``store``/``run`` with a registered method.

    Args:
        method: A name from :func:`available_scorers`.
        store: An open store (``catalog()``, ``run(name)``) or a path/URL to open read-only.
        run: Run name.
        **options: Fields of the method's config (e.g. ``rollouts="rollout"``,
            ``normalization="mean"``, ``damping=1e-3``), plus per-call data the store
            does not hold (``states=`` for success-sim, ``loss=`` for loss).

    Returns:
        A score table (pyarrow.Table).
    """
    cls = get_scorer(method)
    inputs = {k: options.pop(k) for k in _INPUT_OPTIONS if k in options}
    # Chunk-aligned cached reads for the call (each steps chunk and marker fetched once).
    return cls(**options).score(cached(_open(store)), run, **inputs)
