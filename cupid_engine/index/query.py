"""Building the per-run index and answering single-rollout queries (DESIGN §5).

:func:`open_index` builds (or reopens) the FAISS index of a run's **training** demos:
whitened episode sums s_ξ = L⁻¹Σφ, streamed in blocks. For a checkpoint ensemble
(``run`` given as several run names) each checkpoint is whitened with its own
preconditioner and the parts are concatenated scaled by 1/√C, so one inner product is
the ensemble mean. The index is saved beside the store under
``<store>/index/<run>/`` with a fingerprint of the run (config hash, Gram checksum and
count, damping, indexed ids); a reopen with a different fingerprint rebuilds.

:func:`top_influencers` is featurise-free: it reads the rollout's step features from
the run, forms q = R(τ)·Σψ(z') (so for R(τ) = +1 the top demos are those whose
upweighting most raises the rollout's likelihood), searches, and then — for the top
demos only — computes the action influences a(z', z) = ψ(z')ᵀψ(z) to say which rollout
steps and which demo steps carry the score.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cupid_engine.index.faiss_index import DEFAULT_KIND, InfluenceIndex, choose_kind, save_index, saved_folders
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.preconditioner import DEFAULT_DAMPING, Preconditioner

if TYPE_CHECKING:
    from cupid_engine.store.reader import RunReader, StoreReader

log = logging.getLogger(__name__)
INDEX_DIR = "index"
_CACHE_SIZE = 2  # indexes can be GBs: keep only the most recent few in memory
_MEMORY_CACHE: collections.OrderedDict[tuple, tuple[Any, InfluenceIndex]] = collections.OrderedDict()
_PRECOND_CACHE: collections.OrderedDict[tuple, tuple[Any, Preconditioner]] = collections.OrderedDict()


def _open_store(store: StoreReader | str | os.PathLike) -> StoreReader:
    """An open store as is; a path or URL opened with ``store.open_store``."""
    if hasattr(store, "catalog") and hasattr(store, "run"):
        return store
    from cupid_engine.store import open_store

    return open_store(store)


def _runs(run: str | Sequence[str]) -> list[str]:
    return [run] if isinstance(run, str) else list(run)


def store_folder(store: StoreReader) -> str | None:
    """A local folder of the store where indexes can be saved (None: keep in memory)."""
    for attr in ("path", "url"):
        p = getattr(store, attr, None)
        if isinstance(p, (str, os.PathLike)):
            p = os.fspath(p)
            if p.startswith("file://"):
                p = p[len("file://") :]
            if "://" not in p and os.path.isdir(p):
                return p
    return None


def remote_cache_folder(store: StoreReader, fp: dict[str, Any]) -> str | None:
    """Local folder for the index of a remote store (``s3://``, ``gs://`` ...), None otherwise.

    ``$CUPID_ENGINE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/cupid_engine``, else
    ``~/.cache/cupid_engine``) ``/remote/<sha of the URL and the runs' fingerprint>``: the
    fingerprint holds each run's config hash, Gram count and Gram checksum and the training
    ids, so a changed run gets a new folder and a query never rebuilds an unchanged index.
    """
    url = getattr(store, "url", None)
    if not isinstance(url, str) or "://" not in url or url.startswith("file://"):
        return None
    root = os.environ.get("CUPID_ENGINE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cupid_engine")
    key = hashlib.sha256((url.rstrip("/") + "\x00" + json.dumps(fp, sort_keys=True, default=str)).encode()).hexdigest()
    return os.path.join(root, "remote", key[:24])


def _run_key(store: StoreReader, name: str) -> tuple:
    """A cheap identity of a run's state: config hash and Gram count (no array reads)."""
    r = store.run(name)
    cfg = getattr(r, "config", None)
    return (id(store), name, cfg.hash() if hasattr(cfg, "hash") else None, int(r.gram_count))


def _lru_get(cache: collections.OrderedDict, key: tuple) -> Any:
    hit = cache.get(key)
    if hit is None:
        return None
    cache.move_to_end(key)
    return hit[1]


def _lru_put(cache: collections.OrderedDict, key: tuple, store: StoreReader, value: Any, limit: int) -> None:
    # The store is kept alive with its entry so that its id() in the key cannot be reused.
    cache[key] = (store, value)
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def _ensemble(store: StoreReader, runs: list[str], damping: float) -> list[tuple[RunReader, Preconditioner]]:
    """(run, preconditioner) per run; the Cholesky factor is cached per run state, so
    repeated queries do not refactorise H."""
    out = []
    for n in runs:
        key = _run_key(store, n) + (float(damping),)
        pre = _lru_get(_PRECOND_CACHE, key)
        if pre is None:
            pre = Preconditioner.from_run(store.run(n), damping=damping)
            _lru_put(_PRECOND_CACHE, key, store, pre, 4 * _CACHE_SIZE)
        out.append((store.run(n), pre))
    return out


def whiten_sums(parts: list[tuple[RunReader, Preconditioner]], sums: list[np.ndarray]) -> torch.Tensor:
    """Whitened (and, for ensembles, 1/√C-concatenated) rows ``[B, ΣK]`` float64."""
    w = [pre.whiten(s) for (_, pre), s in zip(parts, sums)]
    return torch.cat(w, -1) / float(np.sqrt(len(w))) if len(w) > 1 else w[0]


def fingerprint(store: StoreReader, runs: list[str], damping: float, ids: list[str]) -> dict[str, Any]:
    """What an index depends on; a saved index whose fingerprint differs is rebuilt."""
    fp: dict[str, Any] = {"runs": runs, "damping": float(damping), "n": len(ids)}
    fp["ids_sha"] = hashlib.sha256("\x00".join(ids).encode()).hexdigest()[:16]
    for n in runs:
        r = store.run(n)
        cfg = getattr(r, "config", None)
        fp[f"{n}.config_hash"] = cfg.hash() if hasattr(cfg, "hash") else None
        fp[f"{n}.gram_count"] = int(r.gram_count)
        fp[f"{n}.gram_sha"] = hashlib.sha256(np.ascontiguousarray(r.gram(), np.float64).tobytes()).hexdigest()[:16]
    return fp


def _choose(kind: str, n: int, dim: int, params: dict[str, Any]) -> dict[str, str]:
    """``{"requested", "kind", "reason"}`` for ``kind`` over ``n`` rows of width ``dim``."""
    concrete, reason = choose_kind(kind, n, dim, device=params.get("device", "cpu"))
    return {"requested": kind, "kind": concrete, "reason": reason}


def build_index(
    store: StoreReader | str | os.PathLike, run: str | Sequence[str], *, kind: str = DEFAULT_KIND,
    damping: float = DEFAULT_DAMPING, block: int = 16384, **params: Any,
) -> InfluenceIndex:
    """Build the index of the training demos of ``run`` (one or several checkpoint runs).

    ``kind="auto"`` (the default) is resolved by :func:`~cupid_engine.index.faiss_index.
    choose_kind` from the size of the index (training demos × width); the index's
    ``choice`` records what was chosen and why (saved with it).
    """
    store = _open_store(store)
    runs = _runs(run)
    ids = _inputs.ids_in_split(store.catalog(), "train")
    return _build(store, runs, ids, _choose(kind, len(ids), _dim(store, runs), params), damping, block, params)


def _dim(store: StoreReader, runs: list[str]) -> int:
    """Width of the index: the runs' k summed (checkpoint ensembles concatenate)."""
    return sum(int(store.run(n).k) for n in runs)


def _build(store: StoreReader, runs: list[str], ids: list[str], choice: dict[str, str], damping: float, block: int,
           params: dict[str, Any]) -> InfluenceIndex:
    """The index of ``ids`` of the kind ``choice`` names, built block by block."""
    parts = _ensemble(store, runs, damping)
    if not ids:
        raise ValueError("the store has no training-split episodes to index")
    dim = sum(r.k for r, _ in parts)
    # No silent choice: the kind and why are logged here, kept in ``index.choice``, saved
    # with the index and returned by top_influencers (InfluenceResult.index).
    log.info("building the %s index over %d training demos (%s)", choice["kind"], len(ids), choice["reason"])
    index = InfluenceIndex(dim, kind=choice["kind"], **params)
    index.choice = choice
    for start in range(0, len(ids), block):
        chunk = ids[start : start + block]
        vec = whiten_sums(parts, [r.episode_features(chunk) for r, _ in parts])
        index.add(vec.to(torch.float32).numpy(), chunk)
    index.meta = fingerprint(store, runs, damping, ids)
    return index


def open_index(
    store: StoreReader | str | os.PathLike, run: str | Sequence[str], *, kind: str = DEFAULT_KIND,
    damping: float = DEFAULT_DAMPING,
    rebuild: bool = False, save: bool = True, **params: Any,
) -> InfluenceIndex:
    """The run's index: reopened from ``<store>/index/<run>/`` when still valid, else built.

    Args:
        store: Open store or path.
        run: Run name, or several (checkpoint ensemble).
        kind: ``auto`` (default: ``flat`` or ``sq8`` by the size of the index,
            see :func:`~cupid_engine.index.faiss_index.choose_kind`), ``flat`` (exact),
            ``hnsw`` or ``sq8`` (int8 scan, certified exact re-ranking).
        damping: Relative damping of the preconditioner.
        rebuild: Rebuild even if a valid saved index exists.
        save: Save a (re)built index beside the store when the store is a local folder.
        **params: :class:`InfluenceIndex` options (``hnsw_m``, ``ef_construction``,
            ``ef_search``, ``device``, ``rerank``, ``certify``).

    Returns:
        The index (``meta`` holds its fingerprint, ``choice`` the kind chosen and why).
    """
    store = _open_store(store)
    runs = _runs(run)
    ids = _inputs.ids_in_split(store.catalog(), "train")
    choice = _choose(kind, len(ids), _dim(store, runs), params)
    kind = choice["kind"]
    build_params = {k: v for k, v in params.items() if k in ("hnsw_m", "ef_construction")}
    folder = store_folder(store)
    sub = urllib.parse.quote("+".join(runs), safe="")  # run names are data: escape them
    # In memory, the same store object with unchanged run configs/Gram counts and the same
    # training ids reuses its index without re-reading the Gram; from disk, the full
    # fingerprint (Gram checksum included) decides.
    key = (tuple(_run_key(store, n) for n in runs), kind, float(damping), tuple(sorted(build_params.items())),
           len(ids), hashlib.sha256("\x00".join(ids).encode()).hexdigest()[:16])
    idx = None if rebuild else _lru_get(_MEMORY_CACHE, key)
    if idx is None:
        fp = fingerprint(store, runs, damping, ids)
        if folder is None:  # a remote store: a local cache keyed by the run's content hash
            folder = remote_cache_folder(store, fp)
        # Saved beside the store, or in the user's cache when the store is read-only.
        for saved in [] if rebuild or folder is None else saved_folders(os.path.join(folder, INDEX_DIR, sub), kind):
            loaded = InfluenceIndex.load(saved, kind, device=params.get("device", "cpu"))
            same_build = all(loaded.params.get(k) == v for k, v in build_params.items())
            if loaded.meta == fp and same_build:
                idx = loaded
                log.info("reopened the %s index over %d training demos from %s (%s)", kind, len(idx), saved,
                         choice["reason"])
                break
            log.info("index %s/%s is stale (run or build parameters changed): rebuilding", sub, kind)
        if idx is None:
            idx = _build(store, runs, ids, choice, damping, 16384, params)
            if save and folder is not None:
                save_index(idx, os.path.join(folder, INDEX_DIR, sub))
    if "ef_search" in params:
        idx.ef_search = params["ef_search"]
    if "rerank" in params:  # query-time, like ef_search
        idx.params["rerank"] = int(params["rerank"])
    if "certify" in params:
        idx.params["certify"] = bool(params["certify"])
    idx.choice = choice  # this call's request and reason (a reopened index may have been built for another)
    _lru_put(_MEMORY_CACHE, key, store, idx, _CACHE_SIZE)
    return idx


@dataclasses.dataclass
class StepInfluence:
    """Which steps carry the influence between the rollout and one demo.

    Attributes:
        episode_id: The demo.
        score: sign·Σ_{z',z} a(z', z) (equals the search score up to float32 rounding).
        rollout_steps: ``(step, Σ_z sign·a(z', z))`` of the top rollout steps.
        demo_steps: ``(step, Σ_z' sign·a(z', z))`` of the top demo steps.
        pairs: ``(rollout step, demo step, sign·a(z', z))`` of the largest single pairs.
    """

    episode_id: str
    score: float
    rollout_steps: list[tuple[int, float]]
    demo_steps: list[tuple[int, float]]
    pairs: list[tuple[int, int, float]]


@dataclasses.dataclass
class InfluenceResult:
    """Answer of :func:`top_influencers`.

    Attributes:
        rollout: The rollout episode id.
        sign: R(τ) used in q.
        table: ``rank``, ``episode_id``, ``score`` (+ ``tier``/``length`` when catalogued).
        steps: One :class:`StepInfluence` per top demo, in rank order.
        index: The index searched: ``kind``, ``requested``, ``reason`` (see
            ``InfluenceIndex.choice``) and ``rows``.
    """

    rollout: str
    sign: float
    table: pa.Table
    steps: list[StepInfluence]
    index: dict[str, Any] | None = None

    def __str__(self) -> str:
        lines = [f"top influencers of rollout {self.rollout} (ranked by sign·a(τ, ξ), sign {self.sign:+g})",
                 f"{'rank':>4}  {'episode_id':<24} {'score':>12}  top rollout steps / top demo steps"]
        for row, st in zip(self.table.to_pylist(), self.steps):
            rs = ",".join(str(i) for i, _ in st.rollout_steps)
            ds = ",".join(str(i) for i, _ in st.demo_steps)
            extra = f"  [{row['tier']}]" if row.get("tier") else ""
            lines.append(f"{row['rank']:>4}  {row['episode_id']:<24} {row['score']:>12.5g}  {rs} / {ds}{extra}")
        return "\n".join(lines)


def _catalog_rows(store: StoreReader, ids: list[str]) -> pa.Table:
    """Catalog rows of ``ids`` (in that order): O(len(ids)) for a :class:`GradientStore`.

    A store with ``catalog_rows`` (the gradient store: id hashes, then only the row
    groups holding the ids) answers directly; other stores (in-memory ``ArrayStore``)
    are filtered with one vectorised pass over their catalog table. Both give the same
    rows.

    Raises:
        ValueError: naming ids that are not in the catalog.
    """
    if hasattr(store, "catalog_rows"):
        try:
            return store.catalog_rows(ids)
        except KeyError as exc:
            raise ValueError(f"episodes not in the catalog: {exc.args[0]}") from None
    cat = store.catalog()
    sub = cat.filter(pc.is_in(cat.column("episode_id"), value_set=pa.array(ids, pa.string())))
    where = {e: i for i, e in enumerate(sub.column("episode_id").to_pylist())}
    unknown = [e for e in ids if e not in where]
    if unknown:
        raise ValueError(f"episodes not in the catalog: {unknown[:5]}")
    return sub.take(pa.array([where[e] for e in ids], pa.int64()))


def _top(values: torch.Tensor, n: int) -> list[tuple[int, float]]:
    n = min(n, values.numel())
    v, i = torch.topk(values, n)
    return [(int(a), float(b)) for a, b in zip(i, v)]


def top_influencers(
    store: StoreReader | str | os.PathLike,
    run: str | Sequence[str],
    rollout: str,
    k: int = 10,
    *,
    sign: float | None = None,
    returns: str = "pm1",
    damping: float = DEFAULT_DAMPING,
    kind: str = DEFAULT_KIND,
    steps: int = 3,
    index: InfluenceIndex | None = None,
    **params: Any,
) -> InfluenceResult:
    """The ``k`` training demos with the largest influence on one rollout.

    Args:
        store: Open store or path.
        run: Run name, or several runs (checkpoint ensemble).
        rollout: Episode id of the rollout (featurised into the same run).
        k: Number of demos.
        sign: R(τ) override; default from the catalog outcome (``returns`` mode).
            Pass ``sign=1`` on a failed rollout to find the demos that most support
            the failing behaviour instead of those that most oppose it.
        returns: ``pm1``, ``01`` or ``real`` (see ``scorers._inputs.returns_of``).
        damping: Relative damping of the preconditioner.
        kind: ``auto`` (default; ``flat`` or ``sq8`` by the size of the index),
            ``flat`` (exact), ``hnsw`` or ``sq8`` (int8 scan, certified exact re-ranking).
            Scores are always the exact ones; only ``hnsw`` may miss a top demo.
        steps: Top steps/pairs reported per demo.
        index: A prebuilt index (else :func:`open_index`).
        **params: Index options (``ef_search``, ``hnsw_m``, ``rerank``, ``device``, ...).

    Returns:
        An :class:`InfluenceResult`.
    """
    store = _open_store(store)
    runs = _runs(run)
    rollout_row = _catalog_rows(store, [rollout])
    if sign is None:
        sign = float(_inputs.returns_of(rollout_row, [rollout], returns)[0])
    if index is None:
        index = open_index(store, runs, kind=kind, damping=damping, **params)
    parts = _ensemble(store, runs, damping)
    # Whitened rollout steps [T, ΣK] (float64; 1/√C concatenation for ensembles).
    psi_r = whiten_sums(parts, [r.step_features(rollout) for r, _ in parts])
    q = sign * psi_r.sum(0)
    if not torch.isfinite(q).all():
        raise ValueError(f"rollout {rollout!r} has non-finite features")
    _, found = index.search(q.to(torch.float32).numpy(), k)
    ids = found[0]
    details = []
    for eid in ids:
        psi_d = whiten_sums(parts, [r.step_features(eid) for r, _ in parts])
        a = sign * (psi_r @ psi_d.T)  # [|τ|, |ξ|], only for the top demos
        flat_top = _top(a.reshape(-1), steps)
        details.append(
            StepInfluence(
                episode_id=eid,
                score=float(a.sum()),
                rollout_steps=_top(a.sum(1), steps),
                demo_steps=_top(a.sum(0), steps),
                pairs=[(i // a.shape[1], i % a.shape[1], v) for i, v in flat_top],
            )
        )
    cols: dict[str, Any] = {
        "rank": list(range(1, len(ids) + 1)),
        "episode_id": ids,
        "score": [d.score for d in details],
    }
    hits = _catalog_rows(store, ids)
    for c in ("tier", "length"):
        if c in hits.column_names:
            cols[c] = hits.column(c).to_pylist()
    choice = index.choice or {"requested": index.kind, "kind": index.kind, "reason": f"{index.kind} index given"}
    return InfluenceResult(rollout=rollout, sign=float(sign), table=pa.table(cols), steps=details,
                           index=dict(choice, rows=len(index)))
