"""End-to-end pipeline scaling: featurise -> finalize -> score -> query, 10^3 .. 10^6 episodes.

Source: :class:`cupid_engine.featurize.SyntheticSource`, episodes generated on the fly
from ``(seed, index)`` (nothing on disk but the store), ``--steps`` steps each; every
``--rollout-every``-th episode is a rollout with a success label. Policy: a small MLP
(hidden 64x64, freshly initialised, saved as a checkpoint the workers load), output
``loss``, head-only gradients, tensorsketch at ``--k``.

Stages, each timed:

* ``featurize``: register the catalog (one shard per source unit), then featurise every
  shard on ``--workers`` Ray actors (``cupid_engine.distributed.featurize``; 1 = in process);
* ``finalize``: reduce the per-shard Gram partials (training split);
* ``score``: CUPID (``cupid_engine.scorers`` ``cupid`` scorer: whitened episode sums . u,
  Gram + Cholesky) over every training episode against the rollouts;
* ``query``: one rollout's top-10 influencing demos (``cupid_engine.index``: FAISS
  ``IndexFlatIP`` over whitened sums): index build, then ``top_influencers`` end to end
  (median of 5 after a warm-up; search plus the hits' catalog rows and step breakdown).

Each scale runs in a fresh child process so that the driver's peak RSS (``VmHWM``) is
that scale's own; workers report theirs. Memory must stay flat from 10^3 to 10^6.

The 10^6 point is designed to fit ~30 minutes on 2 cores (10 steps, k = 256, head only,
shards of 2000 episodes -> 500 tasks, catalog registered in one call); run it with
``--episodes 1000000``.

Usage: ``python benchmarks/bench_pipeline.py [--quick] [--episodes 1000,10000] [--json out.json]``
or ``cupid-engine bench pipeline``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import criterion, machine, proc_status_kb, table, write_json  # noqa: E402


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def child(args: argparse.Namespace) -> dict:
    """One scale, in this (fresh) process."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch

    torch.set_num_threads(1)
    from cupid_engine.featurize import FeaturizeConfig, Featurizer, SyntheticSource
    from cupid_engine.featurize.pipeline import featurize_shard, prepare_run, shard_units
    from cupid_engine.policies import MLPPolicy, MLPPolicyConfig, policy_hash, save_policy
    from cupid_engine.store import GradientStore

    n = args.child
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    root = tempfile.mkdtemp(prefix=f"cupid_bench_pipeline_{n}_", dir=args.workdir)
    try:
        source = SyntheticSource(n, steps=args.steps, obs_dim=16, action_dim=4, seed=0,
                                 episodes_per_unit=args.shard_size, holdout_every=0, rollout_every=args.rollout_every)
        torch.manual_seed(0)
        policy = MLPPolicy(MLPPolicyConfig(hidden_sizes=(64, 64), obs_dim=16, action_dim=4))
        ckpt = str(save_policy(policy, os.path.join(root, "policy")))
        cfg = FeaturizeConfig.for_method("tensorsketch", k=args.k, track="head", output="loss",
                                         shard_size=args.shard_size, batch_size=4096, dtype="float16")
        f = Featurizer.from_config(policy, cfg, policy_hash=policy_hash(ckpt))
        store = GradientStore.create(os.path.join(root, "store.zarr"))
        out: dict = {"episodes": n, "steps": n * args.steps, "workers": args.workers}

        t0 = time.perf_counter()
        run = prepare_run(source, store, "bench", f, cfg)
        out["register_s"] = time.perf_counter() - t0
        shards = run.pending_shards()
        t1 = time.perf_counter()
        if args.workers > 1:
            from cupid_engine.distributed.featurize import featurize_distributed

            summary = featurize_distributed(source, store, "bench", policy_path=ckpt, config=cfg, shards=shards,
                                            workers=args.workers, progress=False)
            out["worker_peak_rss_mib"] = sorted(v / 1024 for v in summary["workers"].values())
            out["ray_tasks"] = summary["shards"]
            out["steady_episodes_per_s"] = n / summary["dispatch_seconds"]  # Ray start-up excluded
        else:
            units = shard_units(source, store, shards)
            for s in shards:
                featurize_shard(store, "bench", s, source, f, unit=units[s], batch_size=cfg.batch_size)
            out["worker_peak_rss_mib"] = []
            out["steady_episodes_per_s"] = n / (time.perf_counter() - t1)
        out["featurize_s"] = time.perf_counter() - t1 + out["register_s"]
        t2 = time.perf_counter()
        run.finalize()
        out["finalize_s"] = time.perf_counter() - t2
        # Peak so far: featurise + finalize only (the index below is O(N k) by nature).
        out["driver_peak_rss_featurize_mib"] = proc_status_kb("VmHWM") / 1024

        t3 = time.perf_counter()
        try:
            from cupid_engine.scorers import get_scorer

            scorer = get_scorer("cupid")(get_scorer("cupid").config_cls())
            ids, scores = scorer.raw_scores(store, "bench")
            out["scorer"] = "cupid_engine.scorers cupid"
        except ImportError:  # pragma: no cover - the scorers package is part of the engine
            raise
        out["score_s"] = time.perf_counter() - t3
        out["scored"] = len(ids)
        out["driver_peak_rss_score_mib"] = proc_status_kb("VmHWM") / 1024

        from cupid_engine.index import open_index, top_influencers

        rollout = store.episode_ids("rollout")[0]
        t4 = time.perf_counter()
        index = open_index(store, "bench", kind="flat", save=False)
        out["index_build_s"] = time.perf_counter() - t4
        top_influencers(store, "bench", rollout, k=10, index=index)  # warm (builds the id look-up once)
        times = []
        for _ in range(5):
            t5 = time.perf_counter()
            res = top_influencers(store, "bench", rollout, k=10, index=index)
            times.append((time.perf_counter() - t5) * 1e3)
        out["query_ms"] = float(np.median(times))
        out["query_ms_min_max"] = [min(times), max(times)]
        out["top10"] = res.table.column("episode_id").to_pylist()[:10]

        info = run.info()
        rows = n * args.steps
        out["store_bytes_per_step"] = info["steps_bytes_stored"] / rows
        out["store_total_bytes_per_step"] = _dir_bytes(os.path.join(root, "store.zarr")) / rows
        out["episodes_per_s"] = n / out["featurize_s"]
        out["driver_peak_rss_mib"] = proc_status_kb("VmHWM") / 1024
        out["load_average"] = os.getloadavg()
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace) -> dict:
    if getattr(args, "child", None):
        res = child(args)
        print("RESULT " + json.dumps(res))
        return res
    info = machine()
    scales = [int(x) for x in args.episodes.split(",")] if args.episodes else ([1000, 10000] if args.quick else
                                                                                 [1000, 10000, 100000, 1000000])
    print(f"machine: {info['cpu']} | {info['cores']} cores | commit {info['commit']} | {info['date']} | "
          f"load average {os.getloadavg()}")
    print(f"steps/episode {args.steps}, k {args.k}, head-only tensorsketch, shard_size {args.shard_size}, "
          f"workers {args.workers}\n")
    rows = []
    for n in scales:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--steps", str(args.steps), "--k",
               str(args.k), "--workers", str(args.workers), "--shard-size", str(args.shard_size),
               "--rollout-every", str(args.rollout_every)]
        if args.workdir:
            cmd += ["--workdir", args.workdir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-4000:])
            raise SystemExit(f"scale {n} failed (rc {proc.returncode})")
        r = json.loads(lines[-1][len("RESULT "):])
        rows.append(r)
        print(table([r], ["episodes", "episodes_per_s", "steady_episodes_per_s", "featurize_s", "finalize_s", "score_s", "index_build_s",
                          "query_ms", "driver_peak_rss_mib", "store_bytes_per_step"]))
        print(f"  worker peak RSS MiB: {[round(v) for v in r['worker_peak_rss_mib']]}  load {r['load_average']}\n",
              flush=True)
    acceptance = {}
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        acceptance["driver_rss_growth"] = criterion(b["driver_peak_rss_mib"] / a["driver_peak_rss_mib"] - 1, 0.2,
                                                    higher_is_better=False)
        acceptance["driver_rss_growth_featurize_phase"] = criterion(
            b["driver_peak_rss_featurize_mib"] / a["driver_peak_rss_featurize_mib"] - 1, 0.2, higher_is_better=False)
        acceptance["driver_rss_growth_through_score"] = criterion(
            b["driver_peak_rss_score_mib"] / a["driver_peak_rss_score_mib"] - 1, 0.2, higher_is_better=False)
        if a["worker_peak_rss_mib"] and b["worker_peak_rss_mib"]:
            acceptance["worker_rss_growth"] = criterion(
                max(b["worker_peak_rss_mib"]) / max(a["worker_peak_rss_mib"]) - 1, 0.2, higher_is_better=False)
        acceptance["throughput_ratio_large_over_small"] = criterion(b["episodes_per_s"] / a["episodes_per_s"], 0.8)
        # Ray start-up excluded: the per-worker rate of the dispatch loop itself.
        acceptance["throughput_ratio_steady"] = criterion(b["steady_episodes_per_s"] / a["steady_episodes_per_s"], 0.8)
    if any(r["episodes"] >= 1_000_000 for r in rows):
        r = next(r for r in rows if r["episodes"] >= 1_000_000)
        acceptance["million_total_minutes"] = criterion(
            (r["featurize_s"] + r["finalize_s"] + r["score_s"] + r["index_build_s"]) / 60, 30, higher_is_better=False)
        acceptance["million_top_influencers_ms"] = criterion(r["query_ms"], 1000, higher_is_better=False)
    if len(rows) == 1:
        # One scale measures throughput and memory; flatness needs two scales to compare.
        r = rows[0]
        workers = [round(v) for v in r["worker_peak_rss_mib"]]
        print(f"one scale ({r['episodes']} episodes): {r['episodes_per_s']:.4g} episodes/s overall, "
              f"{r['steady_episodes_per_s']:.4g} steady; driver peak RSS {r['driver_peak_rss_mib']:.0f} MiB, "
              f"worker peak RSS {workers} MiB; store {r['store_bytes_per_step']:.4g} bytes/step "
              "(flatness rows need two or more scales: --episodes A,B)")
    if acceptance:
        print("acceptance:")
        for key, v in acceptance.items():
            print(f"  {key}: {v['value']:.4g} (target {v['target']}) {'PASS' if v['pass'] else 'FAIL'}")
    payload = {"machine": info, "results": rows, "acceptance": acceptance}
    write_json(args.json, payload)
    return payload


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="10^3 and 10^4 episodes only")
    p.add_argument("--episodes", default=None, help="comma-separated scales (default 10^3..10^6; quick: 10^3,10^4)")
    p.add_argument("--steps", type=int, default=10, help="steps per episode")
    p.add_argument("--k", type=int, default=256, help="feature dimension")
    p.add_argument("--workers", type=int, default=2, help="Ray actors (1: in process)")
    p.add_argument("--shard-size", type=int, default=2000, help="episodes per shard (= per source unit)")
    p.add_argument("--rollout-every", type=int, default=100, help="every n-th episode is a rollout")
    p.add_argument("--workdir", default=None, help="where stores are written (default: system temp)")
    p.add_argument("--json", default=None, help="write results + acceptance to this path")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
