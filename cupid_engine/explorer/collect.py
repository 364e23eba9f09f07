"""What the explorer shows, computed from a store: influences, per-step profiles, labels.

Everything here is exact and streaming: training demos are read in blocks of whitened
episode sums; for every rollout τ the block gives ``a(τ, ξ) = q_τᵀ s_ξ`` (q_τ = Σψ(z'),
sign +1: how much upweighting ξ raises τ's likelihood — for a failed rollout, the demos
that made it more likely are the candidates for "what made it fail"). Per rollout only its
top demos are kept, per demo only the rollouts it influenced most, so memory is
O((N + M)·top), never N×M. Step-level detail ``A = Ψ_τ Ψ_ξᵀ`` is formed only for each
rollout's top demos, as :func:`cupid_engine.index.top_influencers` does.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cupid_engine.index.query import _ensemble, _open_store, _runs, whiten_sums
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.preconditioner import DEFAULT_DAMPING

if TYPE_CHECKING:
    import os

    from cupid_engine.store.reader import StoreReader

MAX_LABEL_VALUES = 12
"""A metadata key becomes a grouping label when it takes at most this many values."""


@dataclasses.dataclass
class RolloutDetail:
    """One rollout's top demos with the steps that carry their influence.

    Attributes:
        episode_id: Rollout id.
        demos: ``[(demo id, a(τ, ξ))]`` in rank order (largest first).
        rollout_profiles: Per top demo, ``[T_τ]`` influence of each rollout step (Σ over demo steps).
        demo_profiles: Per top demo, ``[T_ξ]`` influence of each demo step (Σ over rollout steps).
        aligned: Per top demo, ``[T_τ]`` the demo step most influenced by each rollout step.
    """

    episode_id: str
    demos: list[tuple[str, float]]
    rollout_profiles: list[np.ndarray]
    demo_profiles: list[np.ndarray]
    aligned: list[np.ndarray]


@dataclasses.dataclass
class Influences:
    """Rollout→demo influences of one run.

    Attributes:
        rollouts: Rollout ids (catalog order).
        demos: Training demo ids (catalog order).
        top_demos: rollout id -> ``[(demo id, a)]``, largest first.
        top_rollouts: demo id -> ``[(rollout id, a)]``, largest first.
    """

    rollouts: list[str]
    demos: list[str]
    top_demos: dict[str, list[tuple[str, float]]]
    top_rollouts: dict[str, list[tuple[str, float]]]


def _push(heap: list, item: tuple[float, str], n: int) -> None:
    if len(heap) < n:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def _sorted(heap: list) -> list[tuple[str, float]]:
    return [(eid, float(v)) for v, eid in sorted(heap, reverse=True)]


def influences(
    store: StoreReader | str | os.PathLike, run: str | Sequence[str], *, top: int = 5, per_demo: int = 5, damping: float = DEFAULT_DAMPING,
    rollouts: Sequence[str] | None = None, block: int = 4096,
) -> Influences:
    """Top demos per rollout and top rollouts per demo, exact, in one streamed pass.

    Args:
        store: Open store or path.
        run: Run name (or several: a checkpoint ensemble).
        top: Demos kept per rollout.
        per_demo: Rollouts kept per demo.
        damping: Relative damping of the preconditioner.
        rollouts: Rollout ids (default: the whole ``rollout`` split).
        block: Training demos per block.

    Returns:
        An :class:`Influences`.
    """
    store = _open_store(store)
    runs = _runs(run)
    catalog = store.catalog()
    demos = _inputs.ids_in_split(catalog, "train")
    rids = list(rollouts) if rollouts is not None else _inputs.ids_in_split(catalog, "rollout")
    if not demos:
        raise ValueError("the store has no training demos to attribute to")
    parts = _ensemble(store, runs, damping)
    q = torch.stack([whiten_sums(parts, [r.step_features(rid) for r, _ in parts]).sum(0) for rid in rids]) if rids \
        else torch.zeros(0, sum(r.k for r, _ in parts), dtype=torch.float64)
    per_rollout: list[list] = [[] for _ in rids]
    top_rollouts: dict[str, list[tuple[str, float]]] = {}
    for start in range(0, len(demos), block):
        chunk = demos[start : start + block]
        s = whiten_sums(parts, [r.episode_features(chunk) for r, _ in parts])  # [b, K]
        a = (s @ q.T).numpy()  # [b, M]
        if not rids:
            continue
        for j in range(len(rids)):
            col = a[:, j]
            for i in np.argsort(-col, kind="stable")[:top]:
                _push(per_rollout[j], (float(col[i]), chunk[i]), top)
        order = np.argsort(-a, axis=1, kind="stable")[:, :per_demo]
        for i, eid in enumerate(chunk):
            top_rollouts[eid] = [(rids[j], float(a[i, j])) for j in order[i]]
    return Influences(
        rollouts=rids,
        demos=demos,
        top_demos={rid: _sorted(h) for rid, h in zip(rids, per_rollout)},
        top_rollouts=top_rollouts,
    )


def rollout_detail(store: StoreReader | str | os.PathLike, run: str | Sequence[str], rollout: str, demos: list[tuple[str, float]], *,
                   damping: float = DEFAULT_DAMPING) -> RolloutDetail:
    """Step-level influence between one rollout and its top demos (``A`` for those only)."""
    store = _open_store(store)
    parts = _ensemble(store, _runs(run), damping)
    psi_r = whiten_sums(parts, [r.step_features(rollout) for r, _ in parts])
    rp, dp, al = [], [], []
    for eid, _ in demos:
        psi_d = whiten_sums(parts, [r.step_features(eid) for r, _ in parts])
        a = psi_r @ psi_d.T  # [T_τ, T_ξ]
        rp.append(a.sum(1).numpy())
        dp.append(a.sum(0).numpy())
        al.append(a.argmax(1).numpy())
    return RolloutDetail(rollout, demos, rp, dp, al)


def labels(catalog_rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Grouping labels of the demos: ``tier`` and low-cardinality metadata keys.

    Returns:
        label name -> sorted values (only labels with at least two values).
    """
    values: dict[str, set] = {}
    for row in catalog_rows:
        for key, val in episode_labels(row).items():
            values.setdefault(key, set()).add(val)
    return {k: sorted(v) for k, v in values.items() if 2 <= len(v) <= MAX_LABEL_VALUES}


def episode_labels(row: dict[str, Any]) -> dict[str, str]:
    """The label values of one catalog row (tier and scalar metadata, as strings)."""
    out: dict[str, str] = {}
    if row.get("tier"):
        out["tier"] = str(row["tier"])
    meta = row.get("metadata")
    if meta:
        try:
            parsed = json.loads(meta) if isinstance(meta, str) else dict(meta)
        except (ValueError, TypeError):
            parsed = {}
        for key, val in parsed.items() if isinstance(parsed, dict) else ():
            if isinstance(val, (str, bool)) or (isinstance(val, int) and not isinstance(val, bool)):
                out[str(key)] = str(val)
    return out
