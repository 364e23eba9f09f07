"""Reading what a scorer needs from a store catalog: episode sets, outcomes, metadata.

Shared by the scorer adapters and the index so that "the rollouts", "the training
demos" and "R(τ)" mean the same thing everywhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cupid_engine.constants import SPLITS
from cupid_engine.errors import DataError

log = logging.getLogger(__name__)

# Rollout features this many times smaller (per step) than demo features are degenerate.
DEGENERATE_RATIO = 1e-3

RETURN_MODES = ("pm1", "01", "real")
METADATA_COLUMNS = ("tier", "length", "source", "task", "success")


def catalog_dict(catalog: pa.Table, ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Episode id -> catalog row (as a dict); only the rows of ``ids`` when given.

    Filtering first (one Arrow pass) keeps a lookup of a few ids O(len(ids)) in Python
    objects on a million-episode catalog.
    """
    if ids is not None:
        catalog = catalog.filter(pc.is_in(catalog.column("episode_id"), value_set=pa.array(list(ids), pa.string())))
    return {row["episode_id"]: row for row in catalog.to_pylist()}


def ids_in_split(catalog: pa.Table, split: str) -> list[str]:
    """Episode ids of one split, in catalog order."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; splits: {SPLITS}")
    return catalog.column("episode_id").filter(pc.fill_null(pc.equal(catalog.column("split"), split), False)).to_pylist()


def resolve_episodes(catalog: pa.Table, spec: str | Sequence[str] | None, *, default: str) -> list[str]:
    """Episode ids from a split name, a comma-separated id list or a sequence of ids.

    Args:
        catalog: Store catalog.
        spec: ``"rollout"`` (a split), ``"train+holdout"`` (splits), ``"ep_1,ep_2"``,
            ``["ep_1", "ep_2"]`` or None.
        default: Split used when ``spec`` is None.

    Raises:
        ValueError: If the result is empty or names an unknown episode.
    """
    if spec is None:
        spec = default
    if isinstance(spec, str):
        parts = spec.split("+")
        if all(p in SPLITS for p in parts):
            mask = pc.is_in(catalog.column("split"), value_set=pa.array(parts, pa.string()))
            return_ids = catalog.column("episode_id").filter(mask).to_pylist()
            if not return_ids:
                raise DataError(f"no episodes selected by {spec!r}")
            return return_ids  # taken from the catalog: all known
        ids = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        ids = [str(s) for s in spec]
    # Columnar membership test: no Python set of every catalog id.
    present = pc.is_in(pa.array(ids, pa.string()), value_set=catalog.column("episode_id")).to_pylist()
    unknown = [e for e, ok in zip(ids, present) if not ok]
    if unknown:
        raise DataError(f"episodes not in the catalog: {unknown[:5]}")
    if not ids:
        raise DataError(f"no episodes selected by {spec!r}")
    return ids


def returns_of(catalog: pa.Table, ids: Sequence[str], mode: str = "pm1") -> np.ndarray:
    """R(τ) per episode from the catalog.

    Args:
        catalog: Store catalog with ``success`` (pm1, 01) or ``return`` (real).
        ids: Episode ids.
        mode: ``pm1`` (+1 success, −1 failure), ``01`` (1 / 0) or ``real`` (catalog return).

    Returns:
        ``[M]`` float64.
    """
    if mode not in RETURN_MODES:
        raise DataError(f"returns must be one of {RETURN_MODES}, got {mode!r}")
    rows = catalog_dict(catalog, ids)
    out = np.empty(len(ids), np.float64)
    for i, e in enumerate(ids):
        row = rows[e]
        if mode == "real":
            val = row.get("return")
            if val is None or not np.isfinite(val):
                raise DataError(f"episode {e!r} has no finite 'return' in the catalog (returns='real')")
            out[i] = float(val)
        else:
            succ = row.get("success")
            if succ is None:
                raise DataError(f"episode {e!r} has no 'success' label in the catalog")
            out[i] = (1.0 if succ else -1.0) if mode == "pm1" else (1.0 if succ else 0.0)
    return out


def metadata_columns(catalog: pa.Table, ids: Sequence[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """Splits and the metadata columns (tier, length, ...) present in the catalog, per id."""
    rows = catalog_dict(catalog)
    splits = [rows[e]["split"] for e in ids]
    meta = {c: [rows[e].get(c) for e in ids] for c in METADATA_COLUMNS if c in catalog.column_names}
    return splits, meta


def metadata_value(row: dict[str, Any], key: str) -> Any:
    """A value from a catalog row: a column, else a key of its JSON ``metadata``."""
    if key in row and row[key] is not None:
        return row[key]
    raw = row.get("metadata")
    if raw:
        meta = json.loads(raw) if isinstance(raw, str) else raw
        if key in meta:
            return meta[key]
    return None


def check_rollout_scale(catalog: pa.Table, run: Any, rollouts: Sequence[str], demos: Sequence[str]) -> float:
    """Warn when rollout features are vanishingly small next to demo features; returns the ratio.

    The classic cause: the ``loss`` output of a deterministic policy, evaluated at a
    rollout's own actions (which *are* the policy's predictions), has a zero gradient, so
    every rollout feature is rounding noise and CUPID-style scores are meaningless. The
    fix is a label-agnostic output (``energy``; ``square`` for diffusion) or ``logprob`` of
    a stochastic policy's sampled actions.
    """
    if not rollouts or not demos:
        return float("nan")
    rows = catalog_dict(catalog, list(rollouts)[:256] + list(demos)[:256])

    def per_step(ids: Sequence[str]) -> float:
        sums = np.asarray(run.episode_features(list(ids)), np.float64)
        lengths = np.asarray([max(int(rows[e].get("length") or 1), 1) for e in ids], np.float64)
        return float(np.median(np.linalg.norm(sums, axis=1) / lengths))

    demo = per_step(list(demos)[:256])
    ratio = per_step(list(rollouts)[:256]) / demo if demo > 0 else float("nan")
    if ratio < DEGENERATE_RATIO:
        featurizer = getattr(getattr(run, "config", None), "featurizer", {}) or {}
        log.warning(
            "rollout features are %.1e times the size of demo features (output %r): the rollout "
            "gradients vanish, so influence scores are noise. A deterministic policy's BC loss has a "
            "zero gradient at its own actions; featurise with a label-agnostic output ('energy', or "
            "'square' for diffusion) instead.",
            ratio, featurizer.get("output", "?"),
        )
    return ratio
