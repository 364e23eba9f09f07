"""A FAISS inner-product index over whitened episode sums, with its on-disk form.

Exact ``IndexFlatIP`` is the default (what CUPID's Ψ_π needs is an exact inner
product); ``IndexHNSWFlat`` with METRIC_INNER_PRODUCT is the low-latency option, its
recall measured against exact by :func:`recall_at_k` rather than assumed. ``sq8`` scans
int8 codes of the vectors (a quarter of the bytes, :mod:`cupid_engine.index.quantized`)
and re-ranks the best ``rerank`` candidates exactly against the fp32 vectors, so the
scores it returns are exact and only its recall is approximate (measured likewise). An index is
saved as ``<kind>.faiss`` plus ``<kind>.json`` holding the episode ids (FAISS stores
only row numbers) and a fingerprint of what it was built from, so a reopen against a
changed run is detected and rebuilt instead of answering with stale rows.

Exact single queries on the CPU do not go through ``IndexFlatIP.search``: FAISS answers
fewer than ~20 queries with one thread per query, which on a many-core machine reads
the vectors at a fraction of the memory bandwidth. A matrix-vector product over the
*same* stored vectors (a zero-copy view of the FAISS buffer) uses every core and is
bandwidth-bound; both are exact scans, so the results are the same up to float32
summation order (``torch.topk`` and FAISS may order exact ties differently).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cupid_engine.index.quantized import quantize_rows, scan

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "sq8")
SMALL_BATCH = 16  # queries answered by a threaded matrix-vector scan instead of FAISS


def _faiss():
    import faiss

    return faiss


class InfluenceIndex:
    """Episode vectors searchable by inner product.

    Args:
        dim: Vector width.
        kind: ``flat`` (exact), ``hnsw`` or ``sq8`` (int8 scan + exact re-ranking).
        hnsw_m: HNSW graph degree M.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width (recall/latency trade-off).
        device: ``cpu`` (default) or ``gpu`` (faiss-gpu; flat only; same results).
        rerank: ``sq8`` candidates re-ranked exactly per query (at least ``k``).
    """

    def __init__(
        self, dim: int, *, kind: str = "flat", hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128,
        device: str = "cpu", rerank: int = 256,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        if device not in ("cpu", "gpu"):
            raise ValueError("device must be 'cpu' or 'gpu'")
        if not isinstance(rerank, int) or rerank < 1:
            raise ValueError(f"rerank must be a positive int, got {rerank!r}")
        faiss = _faiss()
        self.dim, self.kind, self.device = int(dim), kind, device
        self.params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search,
                       "rerank": rerank}
        # sq8 keeps the fp32 vectors (for exact re-ranking) beside their int8 codes.
        self.codes = np.zeros((0, self.dim), np.int8) if kind == "sq8" else None
        self.scales = np.zeros(0, np.float32) if kind == "sq8" else None
        if kind in ("flat", "sq8"):
            self.index = faiss.IndexFlatIP(self.dim)
        else:
            self.index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
            self.index.hnsw.efSearch = ef_search
        self.ids: list[str] = []
        self.meta: dict[str, Any] = {}
        self._search_index = None
        self._view: torch.Tensor | None = None

    def vectors(self) -> torch.Tensor:
        """``[N, dim]`` float32 zero-copy view of a flat index's stored vectors."""
        if self.kind == "hnsw":
            raise ValueError("an hnsw index does not expose its vectors verbatim")
        if self._view is None:
            n = self.index.ntotal
            buf = _faiss().rev_swig_ptr(self.index.get_xb(), n * self.dim)
            self._view = torch.from_numpy(np.asarray(buf).reshape(n, self.dim))
        return self._view

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def ef_search(self) -> int:
        return int(self.params["ef_search"])

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self.params["ef_search"] = int(value)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = int(value)

    def add(self, vectors: np.ndarray, ids: Sequence[str]) -> None:
        """Append ``[B, dim]`` vectors with their episode ids."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim or len(ids) != x.shape[0]:
            raise ValueError(f"need [B, {self.dim}] vectors and B ids, got {x.shape} and {len(ids)}")
        if not np.isfinite(x).all():
            raise ValueError("index vectors contain NaN/Inf")
        self.index.add(x)
        if self.kind == "sq8":
            codes, scales = quantize_rows(x)
            self.codes = np.concatenate([self.codes, codes])
            self.scales = np.concatenate([self.scales, scales])
        self.ids.extend(str(i) for i in ids)
        self._search_index = None
        self._view = None  # the FAISS buffer may have moved

    def _searcher(self) -> Any:
        if self.device == "cpu":
            return self.index
        if self._search_index is None:
            faiss = _faiss()
            if self.kind != "flat" or not hasattr(faiss, "StandardGpuResources"):
                raise ImportError("device='gpu' needs faiss-gpu and kind='flat' (pip install faiss-gpu)")
            self._gpu_res = faiss.StandardGpuResources()
            self._search_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
        return self._search_index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-``k`` by inner product.

        Args:
            queries: ``[B, dim]`` (or ``[dim]``).
            k: Results per query (clipped to the index size).

        Returns:
            ``(scores [B, k] float32, ids)`` with ``ids[b]`` the k episode ids of query b.
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query width {q.shape[1]} != index width {self.dim}")
        if not len(self):
            raise ValueError("the index is empty")
        k = min(int(k), len(self))
        if self.kind == "sq8":
            return self._search_sq8(q, k)
        if self.kind == "flat" and self.device == "cpu" and q.shape[0] <= SMALL_BATCH:
            vals, idx = torch.topk(self.vectors() @ torch.from_numpy(q).T, k, dim=0)  # [k, B]
            scores, rows = vals.T.contiguous().numpy(), idx.T.numpy()
        else:
            scores, rows = self._searcher().search(q, k)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows]

    def _search_sq8(self, q: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Int8 scan for candidates, then exact fp32 scores of the candidates only."""
        c = min(len(self), max(k, int(self.params["rerank"])))
        vec = self.vectors()
        scores = np.empty((q.shape[0], k), np.float32)
        rows = np.empty((q.shape[0], k), np.int64)
        for b in range(q.shape[0]):
            approx = torch.from_numpy(scan(self.codes, self.scales, q[b]))
            cand = torch.topk(approx, c).indices
            exact = vec[cand] @ torch.from_numpy(q[b])
            v, i = torch.topk(exact, k)
            scores[b], rows[b] = v.numpy(), cand[i].numpy()
        return scores, [[self.ids[r] for r in row] for row in rows]

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``<kind>.faiss`` and ``<kind>.json`` into ``folder`` (atomically renamed)."""
        faiss = _faiss()
        os.makedirs(folder, exist_ok=True)
        base = os.path.join(folder, self.kind)
        faiss.write_index(self.index, base + ".faiss.tmp")
        if self.kind == "sq8":
            with open(base + ".codes.tmp", "wb") as f:
                np.savez(f, codes=self.codes, scales=self.scales)
        with open(base + ".json.tmp", "w") as f:
            json.dump({"kind": self.kind, "dim": self.dim, "params": self.params, "meta": self.meta, "ids": self.ids}, f)
        os.replace(base + ".faiss.tmp", base + ".faiss")
        if self.kind == "sq8":
            os.replace(base + ".codes.tmp", base + ".codes.npz")
        os.replace(base + ".json.tmp", base + ".json")

    @classmethod
    def load(cls, folder: str | os.PathLike, kind: str = "flat", *, device: str = "cpu") -> "InfluenceIndex":
        """Read an index written by :meth:`save`."""
        faiss = _faiss()
        base = os.path.join(folder, kind)
        with open(base + ".json") as f:
            info = json.load(f)
        out = cls(info["dim"], kind=info["kind"], device=device, **info["params"])
        out.index = faiss.read_index(base + ".faiss")
        if out.index.ntotal != len(info["ids"]) or out.index.d != out.dim:
            raise ValueError(f"{base}.faiss does not match its JSON ({out.index.ntotal} rows, {len(info['ids'])} ids)")
        if kind == "hnsw":
            out.index.hnsw.efSearch = int(info["params"]["ef_search"])
        if kind == "sq8":
            with np.load(base + ".codes.npz", allow_pickle=False) as z:
                out.codes, out.scales = z["codes"], z["scales"]
            if out.codes.shape != (out.index.ntotal, out.dim) or out.scales.shape != (out.index.ntotal,):
                raise ValueError(f"{base}.codes.npz does not match {base}.faiss")
        out.ids = list(info["ids"])
        out.meta = dict(info["meta"])
        return out


def cache_folder(folder: str | os.PathLike) -> str:
    """Where an index of ``folder`` goes when ``folder`` cannot be written (a read-only store).

    ``$CUPID_ENGINE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/cupid_engine``, else
    ``~/.cache/cupid_engine``) ``/index/<hash of the folder's absolute path>/<name>``.
    """
    root = os.environ.get("CUPID_ENGINE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cupid_engine")
    path = os.path.abspath(os.fspath(folder))
    key = hashlib.sha256(os.path.dirname(path).encode()).hexdigest()[:16]
    return os.path.join(root, "index", key, os.path.basename(path))


def saved_folders(folder: str | os.PathLike, kind: str) -> list[str]:
    """Folders holding a saved ``kind`` index of ``folder``: itself and/or its cache."""
    return [f for f in (os.fspath(folder), cache_folder(folder)) if os.path.exists(os.path.join(f, f"{kind}.json"))]


def save_index(index: InfluenceIndex, folder: str | os.PathLike) -> str:
    """Save into ``folder``, or into :func:`cache_folder` when ``folder`` cannot be written.

    A read-only store stays fully usable: its index lives in the user's cache instead.

    Returns:
        The folder written.
    """
    try:
        index.save(folder)
        return os.fspath(folder)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    cache = cache_folder(folder)
    index.save(cache)
    log.info("store folder %s is not writable: index saved in %s", folder, cache)
    return cache


def recall_at_k(approx: Sequence[Sequence[str]], exact: Sequence[Sequence[str]]) -> float:
    """Mean over queries of |approx ∩ exact| / |exact|."""
    if len(approx) != len(exact) or not exact:
        raise ValueError("need the same non-zero number of approximate and exact result lists")
    return float(np.mean([len(set(a) & set(e)) / max(len(e), 1) for a, e in zip(approx, exact)]))
