"""Benchmark: gradient-store write/read throughput and gather latency vs a raw memmap.

The peer is a raw numpy ``.npy`` memmap, the format TRAK's saver keeps gradients in;
both engines consume the same fp32 features (cast to the storage dtype while writing),
use the same shard plan (the catalog's chunk-aligned row offsets) and the same number
of writer processes, so the ratio isolates the cost of Zarr chunking + crc32c.

Measured, each repeated ``--repeats`` times (median, min, max), after a warm-up write:
- write GB/s: stored bytes of all shards / wall time from a barrier to the last writer;
- read GB/s: stored bytes / time to stream every shard decoded to fp32 (store:
  ``Run.iter_shard_steps``, checksums verified; memmap: slice + cast). The page cache
  is warm, so this compares software overhead, not the disk;
- gather latency: one random episode's ``[T, K]`` fp32 features (store:
  ``Run.step_features``; memmap: slice + cast).

The Gram partial is off by default (``gram_splits=()``): at K=4096 it is a
compute-bound fp64 GEMM (2·rows·K² flop), not I/O; ``--gram`` turns it on.

Usage::

    python benchmarks/bench_store.py                 # 100k rows x 4096 fp16
    python benchmarks/bench_store.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="total step rows")
    p.add_argument("--k", type=int, default=4096, help="feature dimension")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16", "int8"])
    p.add_argument("--compressor", default="none", choices=["none", "blosc-lz4", "zstd"])
    p.add_argument("--episode-len", type=int, default=100, help="mean episode length (uniform ±50%%)")
    p.add_argument("--shard-size", type=int, default=64, help="episodes per shard")
    p.add_argument("--chunk-rows", type=int, default=1024, help="step rows per chunk")
    p.add_argument("--workers", type=int, default=2, help="writer processes (both engines)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions")
    p.add_argument("--gathers", type=int, default=200, help="random episodes gathered per repeat")
    p.add_argument("--gram", action="store_true", help="also compute per-shard fp64 Gram partials")
    p.add_argument("--sync", action="store_true", help="include os.sync() in write timings (both engines)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir, removed after)")
    p.add_argument("--quick", action="store_true", help="small sizes: 8192 rows x 512")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p


def _lengths(rows: int, mean: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lo, hi = max(1, mean // 2), max(2, mean + mean // 2 + 1)
    out, total = [], 0
    while total < rows:
        n = int(min(rng.integers(lo, hi), rows - total))
        out.append(n)
        total += n
    return np.asarray(out, np.int64)


def _pool(max_rows: int, k: int, seed: int) -> np.ndarray:
    # Twice the largest shard so shards start at different offsets (distinct bytes per shard).
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2 * max_rows, k), dtype=np.float32)


def _shard_input(pool: np.ndarray, shard: int, rows: int) -> np.ndarray:
    start = (shard * 7919) % (pool.shape[0] - rows + 1)
    return pool[start : start + rows]


def _worker(kind, path, shards, k, dtype, max_rows, seed, barrier, done_q):
    """One writer process: prepare inputs, wait at the barrier, write its shards."""
    sys.path.insert(0, REPO)
    pool = _pool(max_rows, k, seed)
    if kind == "store":
        from cupid_engine.store.gradient_store import open_store

        store = open_store(path, mode="r+")
        run = store.run("bench")
        plan = [(s, *store.shard_episodes(s)) for s in shards]
        barrier.wait()
        for s, ids, lengths in plan:
            run.write_shard(s, ids, _shard_input(pool, s, int(lengths.sum())), lengths)
    else:
        from cupid_engine.store import quant

        mm = np.load(path, mmap_mode="r+")
        offsets = json.loads(open(path + ".plan.json").read())
        barrier.wait()
        for s in shards:
            r0, n = offsets[s]
            x = _shard_input(pool, s, n)
            if dtype in ("float16", "float32"):
                mm[r0 : r0 + n] = x  # numpy casts fp32 -> storage dtype into the mapping
            else:  # same encoding as the store (int8 scales are not kept: TRAK has none)
                mm[r0 : r0 + n] = quant.encode(x, dtype)[0]
        del mm  # TRAK does not msync per write either; --sync covers durability
    done_q.put(time.perf_counter())


def _timed_write(kind, path, num_shards, args, max_rows) -> float:
    ctx = mp.get_context("spawn")  # never fork a process that runs zarr's event loop
    barrier = ctx.Barrier(args.workers + 1)
    q = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(kind, path, list(range(w, num_shards, args.workers)), args.k, args.dtype, max_rows, args.seed + w, barrier, q),
        )
        for w in range(args.workers)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    ends = [q.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{kind} writer failed with exit code {p.exitcode}")
    if args.sync:
        os.sync()
        ends.append(time.perf_counter())
    return max(ends) - t0


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return ``{"results": [...], "acceptance": {...}, ...}``."""
    import pyarrow as pa

    from cupid_engine.store.config import RunConfig
    from cupid_engine.store.gradient_store import create_store

    if args.quick:
        args.rows, args.k, args.repeats, args.gathers = min(args.rows, 8192), min(args.k, 512), min(args.repeats, 2), min(args.gathers, 50)
    own_dir = args.dir is None
    root = tempfile.mkdtemp(prefix="bench_store_") if own_dir else args.dir
    os.makedirs(root, exist_ok=True)
    try:
        lengths = _lengths(args.rows, args.episode_len, args.seed)
        store_path = os.path.join(root, "store.zarr")
        store = create_store(store_path, overwrite=True, chunk_rows=args.chunk_rows)
        n_ep = len(lengths)
        store.add_episodes(
            pa.table({"episode_id": [f"ep_{i:07d}" for i in range(n_ep)], "split": ["train"] * n_ep, "length": lengths}),
            shard_size=args.shard_size,
        )
        gram_splits = ("train",) if args.gram else ()
        bench_run = store.create_run("bench", RunConfig(k=args.k, dtype=args.dtype, compressor=args.compressor, gram_splits=gram_splits))
        cat = store.catalog()
        num_shards = store.num_shards
        offsets = np.asarray(cat["row_offset"].to_numpy(), np.int64)
        shard_col = np.asarray(cat["shard"].to_numpy(), np.int64)
        first = np.searchsorted(shard_col, np.arange(num_shards + 1))
        # [row_offset, rows] per shard: the memmap uses the store's exact layout.
        plan = [[int(offsets[first[s]]), int(lengths[first[s] : first[s + 1]].sum())] for s in range(num_shards)]
        max_rows = max(n for _, n in plan)
        total_rows = int(offsets[-1] + lengths[-1])  # rows spanned by the shard plan

        mm_path = os.path.join(root, "grads.npy")
        mm_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}[args.dtype]
        np.lib.format.open_memmap(mm_path, mode="w+", dtype=mm_dtype, shape=(total_rows, args.k))
        with open(mm_path + ".plan.json", "w") as f:
            json.dump(plan, f)

        payload = int(lengths.sum()) * args.k * np.dtype(mm_dtype).itemsize
        results: list[dict[str, Any]] = []

        # Write: a warm-up pass each (page cache, file allocation), then timed repeats,
        # alternating engines so background load hits both alike.
        times: dict[str, list[float]] = {"store": [], "memmap": []}
        for rep in range(args.repeats + 1):
            for kind, path in (("store", store_path), ("memmap", mm_path)):
                t = _timed_write(kind, path, num_shards, args, max_rows)
                if rep:
                    times[kind].append(t)
        assert bench_run.is_complete()
        for kind in ("store", "memmap"):
            results.append({"metric": "write_GBps", "engine": kind, **_stats([payload / t / 1e9 for t in times[kind]]), "seconds": times[kind]})

        # Sequential read, shard by shard, decoded to fp32 (what a scorer streams).
        mm = np.load(mm_path, mmap_mode="r")
        read_t: dict[str, list[float]] = {"store": [], "memmap": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _shard in bench_run.iter_shard_steps():
                pass
            read_t["store"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for r0, n in plan:
                np.asarray(mm[r0 : r0 + n], dtype=np.float32)
            read_t["memmap"].append(time.perf_counter() - t0)
        for kind in ("store", "memmap"):
            results.append({"metric": "read_GBps", "engine": kind, **_stats([payload / t / 1e9 for t in read_t[kind]]), "seconds": read_t[kind]})

        # Random-episode gather latency, fp32 out.
        rng = np.random.default_rng(args.seed)
        ids = store.episode_ids()
        lat: dict[str, list[float]] = {"store": [], "memmap": []}
        for _ in range(args.repeats):
            for i in rng.integers(0, n_ep, args.gathers):
                t0 = time.perf_counter()
                bench_run.step_features(ids[i])
                lat["store"].append(time.perf_counter() - t0)
                r0, n = int(offsets[i]), int(lengths[i])
                t0 = time.perf_counter()
                mm[r0 : r0 + n].astype(np.float32)
                lat["memmap"].append(time.perf_counter() - t0)
        for kind in ("store", "memmap"):
            ms = sorted(x * 1e3 for x in lat[kind])
            results.append(
                {"metric": "gather_ms", "engine": kind, **_stats(ms), "p90": ms[int(0.9 * (len(ms) - 1))], "episodes": len(ms)}
            )

        med = {(r["metric"], r["engine"]): r["median"] for r in results}
        ratio = med[("write_GBps", "store")] / med[("write_GBps", "memmap")]
        out = {
            "benchmark": "store",
            "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "sizes": {"rows": int(lengths.sum()), "k": args.k, "episodes": n_ep, "shards": num_shards, "payload_bytes": payload},
            "results": results,
            "ratios": {
                "write_store_vs_memmap": ratio,
                "read_store_vs_memmap": med[("read_GBps", "store")] / med[("read_GBps", "memmap")],
                "gather_latency_store_vs_memmap": med[("gather_ms", "store")] / med[("gather_ms", "memmap")],
            },
            "acceptance": {"write_throughput_vs_memmap": {"value": ratio, "target": 0.5, "pass": bool(ratio >= 0.5)}},
            "hardware": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git_commit(),
        }
        return out
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def _print(out: dict[str, Any]) -> None:
    s = out["sizes"]
    print(f"store benchmark: {s['rows']} rows x {s['k']} {out['config']['dtype']}, {s['episodes']} episodes, "
          f"{s['shards']} shards, {out['config']['workers']} writer(s), compressor={out['config']['compressor']}")
    by = {(r["metric"], r["engine"]): r for r in out["results"]}
    print(f"{'metric':<12} {'store (median [min, max])':>30} {'memmap (median [min, max])':>30} {'store/memmap':>13}")
    for metric in ("write_GBps", "read_GBps", "gather_ms"):
        a, b = by[(metric, "store")], by[(metric, "memmap")]
        fa = f"{a['median']:.3f} [{a['min']:.3f}, {a['max']:.3f}]"
        fb = f"{b['median']:.3f} [{b['min']:.3f}, {b['max']:.3f}]"
        print(f"{metric:<12} {fa:>30} {fb:>30} {a['median'] / b['median']:>13.2f}")
    acc = out["acceptance"]["write_throughput_vs_memmap"]
    print(f"acceptance: write throughput vs memmap = {acc['value']:.2f} (target >= {acc['target']}): {'PASS' if acc['pass'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    _print(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
