"""Benchmark: single-rollout top-10 query latency and the CUPID-Quality fused kernel.

Query (DESIGN §7): synthetic whitened episode sums, N ∈ {10⁴, 10⁵, 10⁶} (``--sizes``),
k = 1024, drawn (``--spectrum``) as low-rank structure plus noise (``lowrank``, the
default: x = z·B + 0.5·ε with z ∈ R³², the shape of real episode sums, which share a few
dominant gradient directions), with a power-law spectrum (``powerlaw``: coordinate j of
a random rotation scaled by (j+1)^-½) or isotropic Gaussian (``isotropic``: the hardest
case for int8 candidate selection, no dominant direction). Every size draws its data
from the same seed. For each N:

- exact: :class:`cupid_engine.index.InfluenceIndex` ``flat`` (the engine's query path),
  one query at a time, median/p10/p90 latency over ``--queries`` queries after a warm-up;
- floor: bytes of the index / the read bandwidth measured in this run by a large
  float32 ``torch.sum`` (every core), i.e. the time any exact scan must take;
- hnsw (N ≤ ``--hnsw-max``): ``IndexHNSWFlat`` (M, efConstruction) build time, then for
  each efSearch the median latency and recall@10 against the exact answers.
- sq8: the int8 scan (a quarter of the fp32 bytes) + exact re-ranking of ``--rerank``
  candidates + the exactness certificate (rows whose error bound lets them beat the
  k-th exact score are re-ranked too): median latency as a ratio to the fp32 scan floor,
  recall@10 against the exact answers, the rows re-ranked, and whether the returned
  scores equal the exact ones; then, without the certificate, recall@10 for each re-rank
  depth of ``--rerank-depths`` (what the certificate guards against);
- ivf (``--ivf-nlist``, an experiment, not an engine index): faiss ``IndexIVFFlat``
  (inner product; the scanned lists' scores are exact fp32) and ``IndexIVFScalarQuantizer``
  8-bit + ``IndexRefineFlat`` (the best ``--rerank`` candidates re-scored exactly),
  sharing one coarse quantizer trained by k-means on the first 65,536 rows; train and add
  times, then per ``--ivf-nprobe`` median latency (faiss, one query per call) and recall@10;
- default: the index ``auto`` resolves to at this N (``choose_kind``), timed again as
  the engine would search it: latency ratio to the fp32 floor and recall@10 (the
  ``default_index`` acceptance row, one entry per N). Every row carries the load
  average (``os.getloadavg``) when it was measured.

Quality kernel: ``--rollout-steps`` × ``--demo-steps`` (default 20k × 45k, k = 1024)
whitened step features cut into ragged episodes; the fused op (``cupid_engine.ops.
quality_minmax``, ``cpu`` backend, C++), the blockwise torch reference and the naive
per-pair path (materialise A for every (rollout, demo) pair with torch matmul) are each
timed and their extra peak resident memory measured (peak RSS reset via
/proc/self/clear_refs before each method). ``--naive-pairs`` times the naive path on a
subset of pairs and extrapolates linearly in pair count when the full run would take too
long (reported as such). The ceiling: the fp32 GEMM rate of ``torch.mm`` on
``[min(rollout steps, 4096), k] × [k, min(demo steps, 4096)]`` with the kernel's thread
count, measured right before and right after the fused kernel (best of 3 each); the
acceptance row ``quality_kernel_vs_gemm`` divides the kernel's GFLOP/s by the higher of
the two.

Usage::

    python benchmarks/bench_query.py --quick --json out.json
    python benchmarks/bench_query.py --json out.json          # full sizes (heavy)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import proc_status_kb, reset_peak_rss  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="episodes indexed")
    p.add_argument("--k", type=int, default=1024, help="feature dimension")
    p.add_argument("--queries", type=int, default=20, help="single queries timed per size")
    p.add_argument("--top", type=int, default=10, help="results per query")
    p.add_argument("--hnsw-max", type=int, default=100_000, help="largest N for which HNSW is built")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW M")
    p.add_argument("--rerank", type=int, default=256, help="sq8: candidates re-ranked exactly per query")
    p.add_argument("--rerank-depths", type=int, nargs="*", default=[10, 32, 64, 256],
                   help="sq8 without the certificate: re-rank depths whose recall@10 is measured")
    p.add_argument("--threads", type=int, default=None,
                   help="query: torch and C++ threads (default: as configured); the quality part keeps its own")
    p.add_argument("--spectrum", choices=("lowrank", "powerlaw", "isotropic"), default="lowrank",
                   help="synthetic whitened sums: rank-32 + noise, power-law spectrum, or isotropic Gaussian")
    p.add_argument("--skip-sq8", action="store_true", help="skip the int8-scan index")
    p.add_argument("--ivf-nlist", type=int, default=0,
                   help="also build faiss IVF (IVFFlat, and IVF-SQ8 + exact refine) with this many lists (0: skip)")
    p.add_argument("--ivf-nprobe", type=int, nargs="+", default=[8, 32, 128], help="IVF lists probed per query")
    p.add_argument("--ef-construction", type=int, default=200, help="HNSW efConstruction")
    p.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256], help="HNSW efSearch values")
    p.add_argument("--bandwidth-mib", type=int, default=2048, help="size of the bandwidth probe")
    p.add_argument("--rollout-steps", type=int, default=20_000, help="quality: all rollout steps")
    p.add_argument("--demo-steps", type=int, default=45_000, help="quality: all demo steps")
    p.add_argument("--quality-k", type=int, default=1024, help="quality: feature dimension")
    p.add_argument("--episode-len", type=int, default=150, help="quality: mean episode length (uniform ±50%%)")
    p.add_argument("--naive-pairs", type=int, default=2000, help="quality: pairs timed on the naive path (0 = all)")
    p.add_argument("--skip-quality", action="store_true", help="only the query benchmark")
    p.add_argument("--skip-query", action="store_true", help="only the quality benchmark")
    p.add_argument("--quick", action="store_true", help="small sizes: N ∈ {10⁴, 3·10⁴}, k = 256, 2k × 4.5k steps")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p


def _apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.sizes, args.k, args.queries, args.hnsw_max = [10_000, 30_000], 256, 20, 30_000
        args.bandwidth_mib, args.rollout_steps, args.demo_steps, args.quality_k = 512, 2000, 4500, 256
        args.naive_pairs = 0


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _timed_queries(search_one, q: np.ndarray, queries: int) -> tuple[list[float], list]:
    """Seconds and answer of ``search_one(q[i:i+1])`` for the first ``queries`` rows (one
    untimed warm-up call first)."""
    search_one(q[:1])
    lat, got = [], []
    for i in range(queries):
        t = time.perf_counter()
        ans = search_one(q[i : i + 1])
        lat.append(time.perf_counter() - t)
        got.append(ans)
    return lat, got


def _stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def measure_bandwidth(mib: int, repeats: int = 7) -> dict[str, float]:
    """Read bandwidth (GB/s) of a float32 ``torch.sum`` over ``mib`` MiB, every core."""
    x = torch.ones(mib * (1 << 20) // 4, dtype=torch.float32)
    x.sum()  # warm-up (page faults)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    gbps = [x.numel() * 4 / t / 1e9 for t in ts]
    return {"median_GBps": float(np.median(gbps)), "max_GBps": float(max(gbps)), "bytes": x.numel() * 4}


def _basis(spectrum: str, k: int, gen: torch.Generator) -> torch.Tensor | None:
    """``[r, k]`` mixing matrix of the synthetic sums (None: isotropic)."""
    if spectrum == "lowrank":
        return torch.randn(32, k, generator=gen)
    if spectrum == "powerlaw":
        rot, _ = torch.linalg.qr(torch.randn(k, k, generator=gen))
        return (torch.arange(1, k + 1, dtype=torch.float32) ** -0.5)[:, None] * rot.T * k**0.5
    return None


def _episode_sums(n: int, k: int, gen: torch.Generator, basis: torch.Tensor | None, block: int = 65536):
    for start in range(0, n, block):
        b = min(block, n - start)
        if basis is None:
            yield torch.randn(b, k, generator=gen).numpy()
        elif basis.shape[0] == k:  # power law: a full-rank spectrum, no extra noise
            yield (torch.randn(b, k, generator=gen) @ basis).numpy()
        else:
            z = torch.randn(b, basis.shape[0], generator=gen)
            yield (z @ basis + 0.5 * torch.randn(b, k, generator=gen)).numpy()


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    from cupid_engine.ops import cpu_backend

    if cpu_backend.is_available():
        cpu_backend._C().set_num_threads(n)


def _load() -> float:
    return float(os.getloadavg()[0])


def bench_query(args: argparse.Namespace, bandwidth: dict[str, float]) -> list[dict[str, Any]]:
    from cupid_engine.index import InfluenceIndex, choose_kind, recall_at_k

    results = []
    for n in args.sizes:
        gen = torch.Generator().manual_seed(args.seed)
        basis = _basis(args.spectrum, args.k, gen)
        exact = InfluenceIndex(args.k)
        sq8 = InfluenceIndex(args.k, kind="sq8", rerank=args.rerank) if not args.skip_sq8 else None
        t_sq8 = 0.0
        hnsw = None
        if n <= args.hnsw_max:
            hnsw = InfluenceIndex(args.k, kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        t_build, t_hnsw = 0.0, 0.0
        ivf = _IVF(args.k, args.ivf_nlist, args.rerank, args.top) if args.ivf_nlist and n >= 39 * args.ivf_nlist else None
        row = 0
        for block in _episode_sums(n, args.k, gen, basis):
            ids = range(row, row + len(block))
            if ivf is not None:
                ivf.add(block)
            t = time.perf_counter()
            exact.add(block, ids)
            t_build += time.perf_counter() - t
            if sq8 is not None:
                t = time.perf_counter()
                sq8.add(block, ids)
                t_sq8 += time.perf_counter() - t
            if hnsw is not None:
                t = time.perf_counter()
                hnsw.add(block, ids)
                t_hnsw += time.perf_counter() - t
            row += len(block)
        q = next(_episode_sums(args.queries + 1, args.k, gen, basis))
        exact.search(q[:1], args.top)  # warm-up
        lat, exact_ids, exact_scores = [], [], []
        for i in range(args.queries):
            t = time.perf_counter()
            sc, ids = exact.search(q[i : i + 1], args.top)
            lat.append(time.perf_counter() - t)
            exact_ids.append(ids[0])
            exact_scores.append(dict(zip(ids[0], sc[0].tolist())))
        nbytes = n * args.k * 4
        floor = nbytes / (bandwidth["median_GBps"] * 1e9)
        res = {"kind": "exact", "n": n, "k": args.k, "latency_ms": _stats([x * 1e3 for x in lat]),
               "index_bytes": nbytes, "floor_ms": floor * 1e3, "ratio_to_floor": float(np.median(lat)) / floor,
               "build_s": t_build, "spectrum": args.spectrum, "load": _load()}
        results.append(res)
        print(f"exact  N={n:>8} k={args.k}: median {res['latency_ms']['median']:.2f} ms "
              f"(p90 {res['latency_ms']['p90']:.2f}), floor {res['floor_ms']:.2f} ms, ratio {res['ratio_to_floor']:.2f}",
              flush=True)
        indexes = {"flat": exact}
        if sq8 is not None:
            indexes["sq8"] = sq8
            r = _time_sq8(sq8, q, args, exact_ids, exact_scores, floor)
            r.update({"n": n, "k": args.k, "build_s": t_sq8, "spectrum": args.spectrum})
            results.append(r)
            print(f"sq8    N={n:>8} rerank={args.rerank}: median {r['latency_ms']['median']:.2f} ms, "
                  f"{r['ratio_to_fp32_floor']:.2f}x the fp32 floor, recall@10 {r['recall_at_10']:.3f}, "
                  f"re-ranked {r['reranked_median']:.0f} rows (certificate added <= {r['widened_max']}), "
                  f"score diff vs exact {r['max_rel_score_diff_vs_exact']:.1e}, load {r['load']:.1f}", flush=True)
            for depth in args.rerank_depths:
                sq8.params.update(rerank=depth, certify=False)
                got = [sq8.search(q[i : i + 1], args.top)[1][0] for i in range(args.queries)]
                sq8.params.update(rerank=args.rerank, certify=True)
                d = {"kind": "sq8_uncertified", "n": n, "k": args.k, "rerank": depth, "spectrum": args.spectrum,
                     "recall_at_10": recall_at_k(got, exact_ids)}
                results.append(d)
                print(f"sq8    N={n:>8} rerank={depth:>4} without certificate: recall@10 {d['recall_at_10']:.3f}",
                      flush=True)
        kind, reason = choose_kind("auto", n, args.k)
        if kind in indexes:
            r = _time_sq8(sq8, q, args, exact_ids, exact_scores, floor) if kind == "sq8" else None
            lat = r["latency_ms"] if r else _stats([x * 1e3 for x in _time(exact, q, args)])
            d = {"kind": "default", "index": kind, "reason": reason, "n": n, "k": args.k, "latency_ms": lat,
                 "ratio_to_fp32_floor": lat["median"] / 1e3 / floor, "spectrum": args.spectrum,
                 "recall_at_10": r["recall_at_10"] if r else 1.0, "load": _load()}
            results.append(d)
            print(f"auto   N={n:>8} -> {kind}: median {lat['median']:.2f} ms, {d['ratio_to_fp32_floor']:.2f}x the fp32 "
                  f"floor, recall@10 {d['recall_at_10']:.3f}", flush=True)
        else:
            print(f"auto   N={n:>8} -> {kind}: not measured (--skip-sq8)", flush=True)
        if ivf is not None:
            for r in ivf.measure(q, args, exact_ids, floor):
                r.update({"n": n, "k": args.k, "spectrum": args.spectrum})
                results.append(r)
                print(f"{r['kind']:<8} N={n:>8} nlist={r['nlist']} nprobe={r['nprobe']:>4}: median "
                      f"{r['latency_ms']['median']:.2f} ms ({r['ratio_to_fp32_floor']:.2f}x the fp32 floor), recall@10 "
                      f"{r['recall_at_10']:.3f}; train {r['train_s']:.1f} s, add {r['add_s']:.1f} s, load {r['load']:.1f}",
                      flush=True)
        if hnsw is not None:
            print(f"hnsw   N={n:>8}: built in {t_hnsw:.1f} s", flush=True)
            for ef in args.ef_search:
                hnsw.ef_search = ef
                lat, got = _timed_queries(lambda x: hnsw.search(x, args.top)[1][0], q, args.queries)
                r = {"kind": "hnsw", "n": n, "k": args.k, "ef_search": ef, "hnsw_m": args.hnsw_m,
                     "ef_construction": args.ef_construction, "build_s": t_hnsw,
                     "latency_ms": _stats([x * 1e3 for x in lat]), "recall_at_10": recall_at_k(got, exact_ids)}
                results.append(r)
                print(f"hnsw   N={n:>8} ef={ef:>4}: median {r['latency_ms']['median']:.3f} ms, "
                      f"recall@10 {r['recall_at_10']:.3f}", flush=True)
        del exact, hnsw, sq8, indexes, ivf
    return results


class _IVF:
    """faiss IVF indexes sharing one coarse quantizer, trained on the first block added."""

    def __init__(self, k: int, nlist: int, rerank: int, top: int) -> None:
        import faiss

        self.faiss, self.nlist = faiss, nlist
        self.quantizer = faiss.IndexFlatIP(k)  # kept referenced: both indexes borrow it
        self.flat = faiss.IndexIVFFlat(self.quantizer, k, nlist, faiss.METRIC_INNER_PRODUCT)
        self.sq = faiss.IndexIVFScalarQuantizer(self.quantizer, k, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                faiss.METRIC_INNER_PRODUCT)
        self.refine = None
        self.k_factor = max(1.0, rerank / top)
        self.train_s = {"ivf_flat": 0.0, "ivf_sq8": 0.0}
        self.add_s = {"ivf_flat": 0.0, "ivf_sq8": 0.0}

    def add(self, block: np.ndarray) -> None:
        if self.refine is None:  # the first block (65,536 rows, or all of a smaller N) trains
            t = time.perf_counter()
            self.flat.train(block)  # k-means of the coarse quantizer
            self.train_s["ivf_flat"] = time.perf_counter() - t
            t = time.perf_counter()
            self.sq.train(block)  # the quantizer is trained: only the 8-bit ranges
            self.refine = self.faiss.IndexRefineFlat(self.sq)
            self.refine.k_factor = self.k_factor
            self.train_s["ivf_sq8"] = self.train_s["ivf_flat"] + time.perf_counter() - t
        for name, index in (("ivf_flat", self.flat), ("ivf_sq8", self.refine)):
            t = time.perf_counter()
            index.add(block)
            self.add_s[name] += time.perf_counter() - t

    def measure(self, q: np.ndarray, args: argparse.Namespace, exact_ids: list, floor: float) -> list[dict[str, Any]]:
        from cupid_engine.index import recall_at_k

        out = []
        for name, index in (("ivf_flat", self.flat), ("ivf_sq8", self.refine)):
            for nprobe in args.ivf_nprobe:
                (self.flat if name == "ivf_flat" else self.sq).nprobe = nprobe
                lat, rows = _timed_queries(lambda x: index.search(x, args.top)[1][0], q, args.queries)
                got = [[str(r) for r in row if r >= 0] for row in rows]
                out.append({"kind": name, "nlist": self.nlist, "nprobe": nprobe, "train_s": self.train_s[name],
                            "add_s": self.add_s[name], "latency_ms": _stats([x * 1e3 for x in lat]),
                            "ratio_to_fp32_floor": float(np.median(lat)) / floor,
                            "recall_at_10": recall_at_k(got, exact_ids), "load": _load(),
                            "refine_k_factor": self.k_factor if name == "ivf_sq8" else None})
        return out


def _time(index, q: np.ndarray, args: argparse.Namespace) -> list[float]:
    """Seconds per single query, after a warm-up."""
    index.search(q[:1], args.top)
    lat = []
    for i in range(args.queries):
        t = time.perf_counter()
        index.search(q[i : i + 1], args.top)
        lat.append(time.perf_counter() - t)
    return lat


def _time_sq8(sq8, q: np.ndarray, args: argparse.Namespace, exact_ids: list, exact_scores: list,
              floor: float) -> dict[str, Any]:
    """Latency, recall@10, re-ranked rows and score agreement of the sq8 index (certified)."""
    from cupid_engine.index import recall_at_k

    sq8.search(q[:1], args.top)  # warm-up
    lat, got, worst, reranked, widened = [], [], 0.0, [], []
    for i in range(args.queries):
        t = time.perf_counter()
        sc, ids = sq8.search(q[i : i + 1], args.top)
        lat.append(time.perf_counter() - t)
        got.append(ids[0])
        reranked.append(sq8.last_search[0]["reranked"])
        widened.append(sq8.last_search[0]["widened"])
        for e, v in zip(ids[0], sc[0].tolist()):
            if e in exact_scores[i]:
                worst = max(worst, abs(v - exact_scores[i][e]) / max(abs(exact_scores[i][e]), 1e-30))
    return {"kind": "sq8", "rerank": int(sq8.params["rerank"]), "certify": bool(sq8.params["certify"]),
            "latency_ms": _stats([x * 1e3 for x in lat]), "recall_at_10": recall_at_k(got, exact_ids),
            "bytes_scanned": len(sq8) * (sq8.dim + 4), "ratio_to_fp32_floor": float(np.median(lat)) / floor,
            "max_rel_score_diff_vs_exact": worst, "reranked_median": float(np.median(reranked)),
            "widened_max": int(max(widened)), "load": _load()}


def _ragged(total: int, mean: int, rng: np.random.Generator) -> np.ndarray:
    lens = []
    while sum(lens) < total:
        lens.append(int(min(rng.integers(max(1, mean // 2), mean + mean // 2 + 1), total - sum(lens))))
    return np.r_[0, np.cumsum(lens)].astype(np.int64)


def measure_gemm(rows: int, cols: int, k: int, threads: int, repeats: int = 3) -> dict[str, Any]:
    """fp32 GEMM rate of ``torch.mm`` ``[rows, k] x [k, cols]`` on ``threads`` threads (the ceiling)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(rows, k, generator=gen)
    b = torch.randn(cols, k, generator=gen).T  # the demo features' layout, as the kernel reads them
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.mm(a, b)  # warm-up (MKL packing buffers, page faults of the output)
        ts, cs = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            torch.mm(a, b)
            ts.append(time.perf_counter() - t)
            cs.append(time.process_time() - c)
    finally:
        torch.set_num_threads(before)
    flops = 2.0 * rows * cols * k
    return {"shape": [rows, k, cols], "threads": threads, "GFLOPs": flops / min(ts) / 1e9,
            "median_GFLOPs": flops / float(np.median(ts)) / 1e9, "GFLOPs_per_cpu_s": flops / min(cs) / 1e9}


def bench_quality(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Time every quality path; returns (rows, GEMM ceiling or None without the C++ kernel)."""
    from cupid_engine import ops
    from cupid_engine.ops.quality import quality_minmax, quality_minmax_naive, quality_minmax_reference

    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    r = torch.randn(args.rollout_steps, args.quality_k, generator=gen)
    d = torch.randn(args.demo_steps, args.quality_k, generator=gen)
    ro, do = _ragged(args.rollout_steps, args.episode_len, rng), _ragged(args.demo_steps, args.episode_len, rng)
    m, n = len(ro) - 1, len(do) - 1
    flops = 2.0 * args.rollout_steps * args.demo_steps * args.quality_k
    input_bytes = (r.numel() + d.numel()) * 4
    out_bytes = 2 * m * n * 4
    print(f"quality: {args.rollout_steps} rollout steps ({m} rollouts) x {args.demo_steps} demo steps ({n} demos), "
          f"k={args.quality_k}; A would be {args.rollout_steps * args.demo_steps * 4 / 2**30:.1f} GiB", flush=True)
    methods = []
    has_cpu = "cpu" in ops.available_backends()
    if has_cpu:
        methods.append(("fused-cpu", lambda: quality_minmax(r, ro, d, do, backend="cpu"), m * n))
    methods.append(("torch-blockwise", lambda: quality_minmax_reference(r, ro, d, do), m * n))
    # Naive: per-pair matmul; optionally on the first rollouts only, extrapolated by pair count.
    m_naive = m if args.naive_pairs <= 0 else max(1, min(m, args.naive_pairs // n))
    ro_n = ro[: m_naive + 1]
    r_n = r[: int(ro_n[-1])]
    methods.append(("naive-per-pair", lambda: quality_minmax_naive(r_n, ro_n, d, do), m_naive * n))
    reference = None
    results = []
    gemm: list[dict[str, Any]] = []
    threads = None
    if has_cpu:
        from cupid_engine import _C

        threads = _C.num_threads()
        gshape = (min(args.rollout_steps, 4096), min(args.demo_steps, 4096), args.quality_k)
    for name, fn, pairs in methods:
        if name == "fused-cpu":
            gemm.append(measure_gemm(*gshape, threads))
        rss0 = proc_status_kb("VmRSS")
        ok = reset_peak_rss()
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        peak = proc_status_kb("VmHWM")
        if name == "fused-cpu":
            # Short runs are repeated (best of up to 3 within ~2 s): one timing of a
            # 0.1 s call on a shared machine says little. Memory is from the first call.
            spent = dt
            for _ in range(2):
                if spent > 2.0:
                    break
                t, c = time.perf_counter(), time.process_time()
                fn()
                again = time.perf_counter() - t
                spent += again
                dt, cpu = min(dt, again), min(cpu, time.process_time() - c)
            gemm.append(measure_gemm(*gshape, threads))
        extra = (peak - rss0) * 1024 if ok and peak is not None and rss0 is not None else None
        scale = (m * n) / pairs
        res = {"method": name, "seconds": dt * scale, "measured_seconds": dt, "pairs_timed": pairs,
               "extrapolated": scale != 1.0, "GFLOPs": flops / (dt * scale) / 1e9,
               # Process CPU time (all threads): on a shared machine, the rate per CPU-second
               # does not count the time the scheduler gave to other processes.
               "GFLOPs_per_cpu_s": flops / (max(cpu, 1e-9) * scale) / 1e9,
               "peak_extra_bytes": extra, "output_bytes": out_bytes, "input_bytes": input_bytes}
        if reference is None:
            reference = out
        else:
            k_rows = out[0].shape[0]
            res["max_abs_diff_vs_first"] = float(max((a - b[:k_rows]).abs().max() for a, b in zip(out, reference)))
        results.append(res)
        xt = " (extrapolated from %d pairs)" % pairs if res["extrapolated"] else ""
        mem = "n/a" if extra is None else f"{extra / 2**20:.1f} MiB"
        print(f"  {name:<16} {res['seconds']:8.2f} s{xt}, {res['GFLOPs']:.1f} GFLOP/s, peak extra {mem}", flush=True)
        del out
    ceiling = None
    if gemm:
        best = max(gemm, key=lambda g: g["GFLOPs"])
        ceiling = {"method": "gemm-ceiling", "GFLOPs": best["GFLOPs"], "before": gemm[0], "after": gemm[1],
                   "GFLOPs_per_cpu_s": max(g["GFLOPs_per_cpu_s"] for g in gemm),
                   "threads": threads, "torch_threads": torch.get_num_threads(), "shape": best["shape"]}
        print(f"  {'torch.mm fp32':<16} {gemm[0]['GFLOPs']:.1f} GFLOP/s before, {gemm[1]['GFLOPs']:.1f} after the "
              f"fused kernel ({threads} threads, [{best['shape'][0]}, {best['shape'][1]}] x "
              f"[{best['shape'][1]}, {best['shape'][2]}])", flush=True)
    return results, ceiling


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, print it, write ``--json``; returns ``{"results", "acceptance", ...}``."""
    _apply_quick(args)
    torch.manual_seed(args.seed)
    out: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "results": []}
    acceptance: dict[str, Any] = {}
    if not args.skip_query:
        threads_before = torch.get_num_threads()
        if args.threads is not None:
            _set_threads(args.threads)
        bw = measure_bandwidth(args.bandwidth_mib)
        print(f"read bandwidth (torch.sum, {torch.get_num_threads()} threads): {bw['median_GBps']:.2f} GB/s", flush=True)
        out["bandwidth"] = bw
        try:
            q = bench_query(args, bw)
        finally:
            if args.threads is not None:
                _set_threads(threads_before)
        out["results"] += q
        largest = max(args.sizes)
        ex = [r for r in q if r["kind"] == "exact" and r["n"] == largest][0]
        acceptance["exact_within_2x_floor"] = {"n": largest, "value": ex["ratio_to_floor"], "target": 2.0,
                                               "pass": bool(ex["ratio_to_floor"] <= 2.0),
                                               "at_1e6": largest >= 1_000_000}
        sq = [r for r in q if r["kind"] == "sq8" and r["n"] == largest]
        if sq:
            acceptance["sq8_half_floor_recall_0.99"] = {
                "n": largest, "ratio_to_fp32_floor": sq[0]["ratio_to_fp32_floor"], "target_ratio": 0.5,
                "recall_at_10": sq[0]["recall_at_10"], "target_recall": 0.99, "at_1e6": largest >= 1_000_000,
                "pass": bool(sq[0]["ratio_to_fp32_floor"] <= 0.5 and sq[0]["recall_at_10"] >= 0.99)}
        default = [r for r in q if r["kind"] == "default"]
        if default:
            # The default must be exact at every N (recall 1 up to float32 ties) and, at
            # 10^6, at most half the fp32 scan floor (issue 19).
            big = [r for r in default if r["n"] >= 1_000_000]
            acceptance["default_index"] = {
                "rows": [{"n": r["n"], "index": r["index"], "ratio_to_fp32_floor": r["ratio_to_fp32_floor"],
                          "latency_ms": r["latency_ms"]["median"], "recall_at_10": r["recall_at_10"],
                          "load": r["load"]} for r in default],
                "target_recall": 0.99, "target_ratio_at_1e6": 0.5, "at_1e6": bool(big),
                "pass": bool(all(r["recall_at_10"] >= 0.99 for r in default)
                             and all(r["ratio_to_fp32_floor"] <= 0.5 for r in big))}
        hn = [r for r in q if r["kind"] == "hnsw"]
        if hn:
            nmax = max(r["n"] for r in hn)
            good = [r for r in hn if r["n"] == nmax and r["recall_at_10"] >= 0.99]
            best = min(good, key=lambda r: r["latency_ms"]["median"]) if good else max(
                (r for r in hn if r["n"] == nmax), key=lambda r: r["recall_at_10"])
            acceptance["hnsw_recall_0.99_at_10ms"] = {
                "n": nmax, "ef_search": best["ef_search"], "recall_at_10": best["recall_at_10"],
                "latency_ms": best["latency_ms"]["median"],
                "pass": bool(best["recall_at_10"] >= 0.99 and best["latency_ms"]["median"] <= 10.0)}
    if not args.skip_quality:
        qr, ceiling = bench_quality(args)
        out["results"] += [dict(r, kind="quality") for r in qr]
        by = {r["method"]: r for r in qr}
        if ceiling is not None:
            out["results"].append(dict(ceiling, kind="quality_gemm_ceiling"))
            ratio = by["fused-cpu"]["GFLOPs"] / ceiling["GFLOPs"]
            cpu_ratio = by["fused-cpu"]["GFLOPs_per_cpu_s"] / ceiling["GFLOPs_per_cpu_s"]
            acceptance["quality_kernel_vs_gemm"] = {
                "kernel_GFLOPs": by["fused-cpu"]["GFLOPs"], "gemm_GFLOPs": ceiling["GFLOPs"], "ratio": ratio,
                "ratio_per_cpu_s": cpu_ratio, "target": 0.5, "threads": ceiling["threads"],
                "pass": bool(ratio >= 0.5)}
            print(f"  fused-cpu at {ratio:.2f} of the fp32 GEMM rate (target >= 0.5); per CPU-second "
                  f"{by['fused-cpu']['GFLOPs_per_cpu_s']:.1f} vs {ceiling['GFLOPs_per_cpu_s']:.1f} GFLOP/s, "
                  f"{cpu_ratio:.2f}", flush=True)
        if "fused-cpu" in by:
            f, nv = by["fused-cpu"], by["naive-per-pair"]
            speed = nv["seconds"] / f["seconds"]
            acceptance["quality_fused_vs_naive"] = {"speedup": speed, "target": 2.0, "pass": bool(speed >= 2.0),
                                                    "naive_extrapolated": nv["extrapolated"]}
            acceptance["quality_fused_peak_extra_bytes"] = {
                "value": f["peak_extra_bytes"], "output_bytes": f["output_bytes"],
                "A_bytes": args.rollout_steps * args.demo_steps * 4,
                "pass": bool(f["peak_extra_bytes"] is not None
                             and f["peak_extra_bytes"] <= f["output_bytes"] + 64 * 2**20)}
    out["acceptance"] = acceptance
    out["hardware"] = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    out["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out["commit"] = _git_commit()
    # Printed and written here (not in main) so `cupid-engine bench query` gets both too.
    print("acceptance:", json.dumps(out["acceptance"], indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
