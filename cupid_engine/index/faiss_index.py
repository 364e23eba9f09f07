"""A FAISS inner-product index over whitened episode sums, with its on-disk form.

Exact ``IndexFlatIP`` is the default (what CUPID's Ψ_π needs is an exact inner
product); ``IndexHNSWFlat`` with METRIC_INNER_PRODUCT is the low-latency option, its
recall measured against exact by :func:`recall_at_k` rather than assumed. ``sq8`` scans
int8 codes of the vectors (a quarter of the bytes, :mod:`cupid_engine.index.quantized`)
and re-ranks the best ``rerank`` candidates exactly against the fp32 vectors, so the
scores it returns are exact; with ``certify`` (the default) it then re-ranks every other
row whose quantisation error bound says it could still beat the k-th exact score, so its
top-k is the exact one too (see :meth:`InfluenceIndex._search_sq8`). ``auto`` is not an
index of its own: :func:`choose_kind` resolves it to ``flat`` or ``sq8`` from the number
of rows and their width, by the crossover measured in ``bench query``
(:data:`AUTO_SQ8_MIN_BYTES`), and
the index records the choice and its reason (``InfluenceIndex.choice``). An index is
saved as ``<kind>.faiss`` plus ``<kind>.json`` holding the episode ids (FAISS stores
only row numbers) and a fingerprint of what it was built from, so a reopen against a
changed run is detected and rebuilt instead of answering with stale rows.

Exact single queries on the CPU do not go through ``IndexFlatIP.search``: FAISS answers
fewer than ~20 queries with one thread per query, which on a many-core machine reads
the vectors at a fraction of the memory bandwidth. A matrix-vector product over the
*same* stored vectors (a zero-copy view of the FAISS buffer) uses every core and is
bandwidth-bound; both are exact scans, so the results are the same up to float32
summation order (``torch.topk`` and FAISS may order exact ties differently). Below
:data:`SERIAL_SCAN_BYTES` the scan is one serial pass instead: under load, waiting for a
parallel region's threads costs far more than so small a scan.
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

from cupid_engine.index.quantized import QMAX, quantize_query, quantize_rows, scan

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "sq8")
CHOICES = ("auto",) + KINDS  # what build_index/open_index/top_influencers and the CLI accept
DEFAULT_KIND = "auto"
SMALL_BATCH = 16  # queries answered by a threaded matrix-vector scan instead of FAISS
# ... except over fewer fp32 bytes than this, scanned serially (einsum): a parallel region
# waits for every thread, and on a loaded machine that wait dominates a small scan —
# measured 12.0 ms (torch mv, 2 threads) vs 0.18 ms (serial) at 1,000 x 1024, load 4.5
# (benchmarks/RESULTS.md, issue 19 item 3); on an idle many-core machine a serial pass over
# 8 MiB costs at most ~1 ms.
SERIAL_SCAN_BYTES = 8 << 20
# ``auto`` picks ``sq8`` once the fp32 vectors (rows x dim x 4 bytes) reach this size.
# Measured (benchmarks/RESULTS.md, "Issue 19 item 3: the default index", 2026-12-06,
# Intel Xeon 2 cores, load 6-7, low-rank synthetic sums, single top-10 queries): with
# one thread sq8 (certified) and flat cross at ~4 MB of fp32 vectors for dim 1024
# (1,000 rows: 0.42 vs 0.50 ms; 3,000: 0.60 vs 1.56 ms), ~3 MB for dim 256 (3,000 rows:
# 0.22 vs 0.27 ms) and ~2.5 MB for dim 64 (10,000 rows: 0.21 vs 0.22 ms); with two
# threads under load both pay ~12 ms per parallel region below ~10^4 rows x 1024 and
# sq8 is never slower from 1,000 rows x 1024 on (30,000: 12 vs 38 ms; 10^5: 29 vs
# 127 ms). 8 MiB sits just above every crossover: below it both answer in about a
# millisecond and flat saves the codes' memory.
AUTO_SQ8_MIN_BYTES = 8 << 20


def _faiss():
    import faiss

    return faiss


def choose_kind(kind: str, n: int, dim: int, *, device: str = "cpu") -> tuple[str, str]:
    """Resolve ``auto`` (other kinds pass through) for an index of ``n`` rows of width ``dim``.

    Both candidates return exact fp32 scores and, ``sq8`` with its certified re-rank,
    the exact top-k; ``auto`` only decides which is faster. Below
    :data:`AUTO_SQ8_MIN_BYTES` of fp32 vectors the fp32 scan is as fast or faster (the
    int8 path's fixed costs — query quantisation, selecting candidates among the
    approximate scores, the error-bound pass, the re-rank of 256 rows — outweigh the
    bytes it saves, and the vectors sit in cache); from there on the int8 scan's quarter
    of the bytes wins. ``sq8`` needs the C++ scan and the CPU; without either ``auto``
    takes ``flat`` and says so in the reason.

    Args:
        kind: One of :data:`CHOICES`.
        n: Rows the index will hold.
        dim: Their width.
        device: ``cpu`` or ``gpu`` (faiss-gpu serves ``flat`` only).

    Returns:
        ``(kind, reason)``: the concrete kind and one sentence saying why.
    """
    if kind not in CHOICES:
        raise ValueError(f"index kind must be one of {CHOICES}, got {kind!r}")
    if kind != "auto":
        return kind, f"{kind} requested"
    if device != "cpu":
        return "flat", f"auto: flat because device={device!r} serves only the exact flat index"
    size = f"{n} rows x {dim} x 4 B = {n * dim * 4 / 2**20:.1f} MiB of fp32 vectors"
    limit = f"{AUTO_SQ8_MIN_BYTES / 2**20:g} MiB"
    if n * dim * 4 < AUTO_SQ8_MIN_BYTES:
        return "flat", (f"auto: flat (exact fp32 scan) because {size} < {limit}, below which the fp32 scan "
                        f"was measured as fast as the int8 scan + exact re-rank (bench query)")
    from cupid_engine.ops import cpu_backend

    if not cpu_backend.is_available():
        return "flat", (f"auto: flat because the int8 scan needs the C++ extension cupid_engine._C, which is not "
                        f"built (sq8 would be faster at {size} >= {limit}: run `make`)")
    return "sq8", (f"auto: sq8 (int8 scan, certified exact re-rank) because {size} >= {limit}, from which it "
                   f"was measured faster than the fp32 scan (bench query); scores and top-k are exact")


class InfluenceIndex:
    """Episode vectors searchable by inner product.

    Args:
        dim: Vector width.
        kind: ``flat`` (exact), ``hnsw`` or ``sq8`` (int8 scan + exact re-ranking).
        hnsw_m: HNSW graph degree M.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width (recall/latency trade-off).
        device: ``cpu`` (default) or ``gpu`` (faiss-gpu; flat only; same results).
        rerank: ``sq8`` candidates re-ranked exactly per query before the certificate
            (at least ``k``; more when the certificate asks for it).
        certify: ``sq8``: also re-rank every row whose error bound lets it beat the k-th
            exact score, so the top-k is exact (False: the first ``rerank`` only, recall
            measured; for benchmarks of the re-rank depth).

    Attributes:
        choice: ``{"requested", "kind", "reason"}`` when the kind was chosen by
            :func:`choose_kind` (saved and reloaded with the index), else None.
        last_search: ``sq8``: per query of the last search, the rows re-ranked
            (``reranked``) and how many of them the certificate added (``widened``).
    """

    def __init__(
        self, dim: int, *, kind: str = "flat", hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128,
        device: str = "cpu", rerank: int = 256, certify: bool = True,
    ) -> None:
        if kind not in KINDS:
            hint = " (resolve 'auto' with choose_kind first)" if kind == "auto" else ""
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}{hint}")
        if device not in ("cpu", "gpu"):
            raise ValueError("device must be 'cpu' or 'gpu'")
        if not isinstance(rerank, int) or rerank < 1:
            raise ValueError(f"rerank must be a positive int, got {rerank!r}")
        if not isinstance(certify, bool):
            raise ValueError(f"certify must be a bool, got {certify!r}")
        faiss = _faiss()
        self.dim, self.kind, self.device = int(dim), kind, device
        self.params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search,
                       "rerank": rerank, "certify": certify}
        # sq8 keeps the fp32 vectors (for exact re-ranking) beside their int8 codes, and
        # per row the L1 norm of the dequantised codes (for the error bound; not saved:
        # recomputed from the codes on load).
        self.codes = np.zeros((0, self.dim), np.int8) if kind == "sq8" else None
        self.scales = np.zeros(0, np.float32) if kind == "sq8" else None
        self.l1 = np.zeros(0, np.float32) if kind == "sq8" else None
        self.choice: dict[str, str] | None = None
        self.last_search: list[dict[str, int]] = []
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
            self.l1 = np.concatenate([self.l1, _code_l1(codes, scales)])
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
            if len(self) * self.dim * 4 < SERIAL_SCAN_BYTES:
                return self._search_serial(q, k)
            vals, idx = torch.topk(self.vectors() @ torch.from_numpy(q).T, k, dim=0)  # [k, B]
            scores, rows = vals.T.contiguous().numpy(), idx.T.numpy()
        else:
            scores, rows = self._searcher().search(q, k)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows]

    def _search_serial(self, q: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """The exact scan of a small flat index, one serial pass per query (no thread wait)."""
        vec = self.vectors().numpy()
        scores = np.empty((q.shape[0], k), np.float32)
        rows = np.empty((q.shape[0], k), np.int64)
        for b in range(q.shape[0]):
            full = np.einsum("ij,j->i", vec, q[b])
            top = np.argpartition(-full, k - 1)[:k]
            top = top[np.argsort(-full[top], kind="stable")]
            scores[b], rows[b] = full[top], top
        return scores, [[self.ids[r] for r in row] for row in rows]

    def _search_sq8(self, q: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Int8 scan for candidates, then exact fp32 scores of the candidates only.

        The best ``c = max(k, rerank)`` rows by approximate score are scored exactly.
        With ``certify``, every other row ``i`` whose upper bound
        ``approx_i + e_i`` reaches the k-th exact score found is scored exactly too, where
        ``e_i = ½·s_i·‖q‖₁ + ½·s_q·‖ŝ_i‖₁`` bounds the quantisation error of row i
        (``ŝ_i`` its dequantised codes; :mod:`cupid_engine.index.quantized`) and a
        float32 margin covers the rounding of the quantisation itself, of the approximate
        and of the exact scores (both halves taken as ½ + γ with γ = K·127·2⁻²³, which
        bounds a float32 dot product's rounding relative to s_i·‖q‖₁ = ‖x_i‖∞·‖q‖₁/127,
        plus 2⁻²¹ of the approximate score). A row left out then
        scores below the k-th exact score found, hence below the true k-th score: the
        returned top-k is the exact one (ties at float32 rounding aside), whatever
        ``rerank`` is. When the bound leaves more than a quarter of the rows in doubt
        (near-duplicate rows whose scores differ by less than the int8 error), all rows
        are scored in one fp32 pass instead, as ``flat`` would. ``last_search`` says, per
        query, how many rows were re-ranked and how many of those the certificate added.
        """
        c = min(len(self), max(k, int(self.params["rerank"])))
        certify = bool(self.params.get("certify", True))
        vec = self.vectors().numpy()
        n = len(self)
        scores = np.empty((q.shape[0], k), np.float32)
        rows = np.empty((q.shape[0], k), np.int64)
        self.last_search = []
        # After the scan (one OpenMP region) everything is serial numpy: on a loaded
        # machine each further parallel region waits ~10 ms for its threads (measured),
        # which would cost more than these O(N) and O(c·K) passes.
        for b in range(q.shape[0]):
            qb = q[b]
            approx = scan(self.codes, self.scales, qb)
            cand = np.argpartition(approx, n - c)[n - c :] if c < n else np.arange(n)
            exact = _dots(vec, cand, qb)
            widened = 0
            if certify and c < n:
                q_l1 = float(np.abs(qb).astype(np.float64).sum())
                q_scale = quantize_query(qb)[1]
                gamma = self.dim * 2.0**-23 * QMAX  # float32 dot rounding, per unit of s_i·‖q‖₁
                kth = float(np.partition(exact, len(exact) - k)[len(exact) - k])
                kth -= gamma * float(self.scales[cand].max()) * q_l1  # the k-th's own rounding
                upper = np.abs(approx)
                upper *= np.float32(2.0**-21)
                upper += approx
                upper += np.float32((0.5 + gamma) * q_l1) * self.scales
                upper += np.float32((0.5 + gamma) * q_scale) * self.l1
                upper[cand] = -np.inf
                extra = np.flatnonzero(upper >= kth)
                if extra.size > n // 4:  # gathering that many rows costs more than one fp32 pass
                    widened = n - c
                    cand, exact = np.arange(n), vec @ qb
                elif extra.size:
                    widened = int(extra.size)
                    cand = np.concatenate([cand, extra])
                    exact = np.concatenate([exact, _dots(vec, extra, qb)])
            top = np.argsort(-exact, kind="stable")[:k]
            scores[b], rows[b] = exact[top], cand[top]
            self.last_search.append({"reranked": int(cand.size), "widened": widened})
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
            json.dump({"kind": self.kind, "dim": self.dim, "params": self.params, "meta": self.meta,
                       "choice": self.choice, "ids": self.ids}, f)
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
            out.l1 = _code_l1(out.codes, out.scales)
        out.ids = list(info["ids"])
        out.meta = dict(info["meta"])
        out.choice = info.get("choice")  # absent in indexes saved before `auto` existed
        return out


def _dots(vec: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``[len(rows)]`` float32 ``vec[rows] @ q``, serial (einsum's own loop, no threaded BLAS)."""
    return np.einsum("ij,j->i", vec[rows], q)


def _code_l1(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[N]`` float32 L1 norms of the dequantised rows ``scales[i]·Σ_j |codes[i, j]|`` (rounded up)."""
    sums = np.empty(codes.shape[0], np.int64)
    for start in range(0, codes.shape[0], 16384):  # blocks: no int16 copy of a GB-sized code array
        sums[start : start + 16384] = np.abs(codes[start : start + 16384].astype(np.int16)).sum(axis=1)
    l1 = sums.astype(np.float64) * scales.astype(np.float64)
    return np.nextafter(l1.astype(np.float32), np.float32(np.inf))


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
