"""Per-stage profile of the hook featuriser against forward+backward (issue 19, item 1).

For the 0.5M MLP (output ``loss``, B = 1024) and the diffusion UNet (output ``square``,
64 draws, B = 64), k = 4096, each round times back to back (the machine is shared; a
load burst moves separately timed runs by several x, so every ratio is per round and the
median over rounds is reported):

* ``fwd_bwd``: ``policy(batch).sum().backward()`` with parameter gradients (the floor);
* ``hooks``: the whole hook featuriser call (``Featurizer.__call__``);
* ``hooks_before``: the same call on the previous CPU route (``hooks.kernel_route``
  off: count sketches in workspace buffers + ``torch.fft``, the flop-model choice);
* ``hooks_laid_out``: the hook path as it was before dense-route layers were streamed:
  every layer's factors laid out for the whole batch (``Featurizer.layer_factors``, fresh
  unfolded inputs and bias columns), then ``hooks.fused_tensorsketch`` on them (same
  numbers bit for bit);
* ``capture_raw``: forward with hooks + the output deltas (``autograd.grad`` to the
  tracked outputs, no parameter gradients), nothing laid out (``HookCapture.raw``);
* ``after_capture``: the rest of today's call on those raw captures
  (``Featurizer._sketch_raw``: dense-route Linear/Conv layers streamed chunk by chunk,
  unfold + GEMM + hash; the other layers laid out and sketched);
* ``capture``: forward with hooks + the output deltas + the whole-batch factor layout
  (im2col/unfold, bias column, norm recomputation): ``Featurizer.layer_factors``;
* ``sketch``: ``hooks.fused_tensorsketch`` on those factors, split into its routes:
  ``fft`` layers (the C++ lane-FFT kernel in one call), ``direct`` layers (the kernel's
  time-domain products, one call) and ``dense`` layers (batched GEMM forming ``G`` + the
  C++ hash), each timed alone on the same factors (each alone pays its own output write);
* ``store_write``: the batch's features cast to the store dtype (float16) and written as
  one ``[B, k]`` zarr v3 chunk (the format of a run's ``steps`` array), on local disk.

Inside the one-call FFT kernel the count-sketch scatter, the FFTs and the spectra
accumulation are not separable by a timer; the ``fft`` time is split between them by the
calibrated cost model (``ops.tensorsketch_plan``: scatter ``c_scatter T (O + I)`` vs
transforms ``c_fft (2T + 1) k log2 k``, the multiply-accumulate is fused into the second
factor's FFT output), and that split is labelled as modelled.

With ``--pipeline``, whole shards of a synthetic dataset (MLP, float16 store) also go
through ``featurize_shards`` with the store writes overlapped with the next shard's
compute and without, interleaved per round (``--models ''`` for that alone).

Usage: ``python benchmarks/bench_featurize_stages.py [--rounds 3] [--models mlp,unet]
[--threads 2] [--pipeline] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, policy_batch, table, write_json  # noqa: E402

from cupid_engine.featurize import Featurizer, ProjectionConfig  # noqa: E402
from cupid_engine.featurize import hooks as H  # noqa: E402
from cupid_engine.ops import tensorsketch_plan  # noqa: E402
from cupid_engine.policies import DiffusionPolicy, DiffusionPolicyConfig, MLPPolicy, MLPPolicyConfig  # noqa: E402

OBS_DIM, ACTION_DIM = 40, 7


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _before(f, batch):
    """The hook call on the previous CPU route (count sketches + torch.fft, flop-model
    strategy choice): what ``hooks.kernel_route`` returning False selects."""
    keep = H.kernel_route
    H.kernel_route = lambda *a, **kw: False
    try:
        return f(batch)
    finally:
        H.kernel_route = keep


def _laid_out(f, batch):
    """The hook call before streaming (whole-batch factor layout, then the fused sketch)."""
    captured = f.layer_factors(batch)
    layers = [(f._seeds[n], d, x) for n, d, x in captured if d.is_floating_point()]
    index = [(f._seeds[n], d, x, f._by_name[n].num_embeddings) for n, d, x in captured if not d.is_floating_point()]
    return H.fused_tensorsketch(layers, k=f.k, workspace=f._workspace, index_factors=index)


def profile(name: str, policy, output: str, B: int, k: int, draws: int, rounds: int) -> dict:
    import zarr

    policy.eval()
    batch = policy_batch(policy, B)
    f = Featurizer(policy, output, ProjectionConfig(k=k), draws=draws, policy_hash="bench")
    f(batch)  # warm up; records the per-layer routes
    routes = {n: v["strategy"] for n, v in f.layer_strategies.items()}

    def fwd_bwd():
        policy.zero_grad(set_to_none=True)
        policy(batch, output=output, draws=draws).sum().backward()

    tmp = tempfile.mkdtemp(prefix="cupid-stage-")
    arr = zarr.create_array(store=os.path.join(tmp, "steps"), shape=(B, k), chunks=(B, k), dtype="float16",
                            compressors=None, fill_value=0)
    times: dict[str, list[float]] = {}
    model_split = {}
    for _ in range(rounds):
        for stage, fn in (("fwd_bwd", fwd_bwd), ("hooks", lambda: f(batch)), ("hooks_before", lambda: _before(f, batch)),
                          ("hooks_laid_out", lambda: _laid_out(f, batch))):
            times.setdefault(stage, []).append(_timed(fn)[0])
        t_raw, raw = _timed(lambda: f._raw_captures(batch))
        times.setdefault("capture_raw", []).append(t_raw)
        times.setdefault("after_capture", []).append(_timed(lambda: f._sketch_raw(raw, B))[0])
        del raw
        t_cap, captured = _timed(lambda: f.layer_factors(batch))
        times.setdefault("capture", []).append(t_cap)
        layers = [(f._seeds[n], d, x) for n, d, x in captured if d.is_floating_point()]
        by_route: dict[str, list] = {"fft": [], "direct": [], "dense": []}
        for s, d, x in layers:
            by_route[H.choose_strategy("auto", d.shape[1], d.shape[2], x.shape[2], k)].append((s, d, x))
        fft = by_route["fft"]
        t_all, feats = _timed(lambda: H.fused_tensorsketch(layers, k=k))
        times.setdefault("sketch", []).append(t_all)
        for route, group in by_route.items():  # each route's layers alone (fft + direct: one kernel call each)
            times.setdefault(f"sketch_{route}_layers", []).append(
                _timed(lambda: H.fused_tensorsketch(group, k=k))[0] if group else 0.0)
        times.setdefault("store_write", []).append(_timed(lambda: arr.__setitem__(
            (slice(None), slice(None)), feats.to(torch.float16).numpy()))[0])
        # Modelled split of the fft kernel's time: scatter vs transforms (+ fused MAC).
        c = tensorsketch_plan.DEFAULT_COST
        lk = k * math.log2(k)
        sc = sum(d.shape[1] * (d.shape[2] + x.shape[2]) for _, d, x in fft) * c.c_scatter
        tr = (sum(2 * d.shape[1] for _, d, _ in fft) + (1 if fft else 0)) * c.c_fft * lk
        model_split = {"scatter": sc / (sc + tr) if fft else 0.0, "transforms_mac": tr / (sc + tr) if fft else 0.0}
    fb = times["fwd_bwd"]
    rows = []
    for stage, ts in times.items():
        rows.append({"model": name, "stage": stage, "median_s": statistics.median(ts),
                     "of_fwd_bwd": statistics.median([t / b for t, b in zip(ts, fb)]),
                     "rounds": [round(t, 4) for t in ts]})
    ratio = statistics.median([b / h for b, h in zip(fb, times["hooks"])])
    ratio_before = statistics.median([b / h for b, h in zip(fb, times["hooks_before"])])
    ratio_laid_out = statistics.median([b / h for b, h in zip(fb, times["hooks_laid_out"])])
    n_routes = {r: sum(1 for v in routes.values() if v == r) for r in sorted(set(routes.values()))}
    return {"model": name, "B": B, "rows": rows, "hooks_over_fwd_bwd": ratio, "before_over_fwd_bwd": ratio_before,
            "laid_out_over_fwd_bwd": ratio_laid_out,
            "routes": n_routes,
            "fft_model_split": model_split, "load_after": os.getloadavg()}


def pipeline_overlap(rounds: int, k: int, episodes: int, shard_size: int) -> dict:
    """Whole shards through ``featurize_shards`` with the store writes overlapped with the
    next shard's compute (``overlap_writes``) and without, interleaved per round, into
    fresh local stores; the stores' bytes are compared (they must be equal)."""
    import shutil

    from cupid_engine.featurize import FeaturizeConfig, SyntheticSource
    from cupid_engine.featurize.pipeline import featurize_shards, prepare_run
    from cupid_engine.store import GradientStore

    source = SyntheticSource(episodes, steps=50, obs_dim=OBS_DIM, action_dim=ACTION_DIM, seed=0,
                             episodes_per_unit=shard_size, holdout_every=0)
    torch.manual_seed(0)
    policy = MLPPolicy(MLPPolicyConfig(obs_dim=OBS_DIM, action_dim=ACTION_DIM)).eval()
    cfg = FeaturizeConfig.for_method("tensorsketch", k=k, output="loss", shard_size=shard_size, batch_size=1024,
                                     dtype="float16")
    f = Featurizer.from_config(policy, cfg, policy_hash="bench")
    times: dict[str, list[float]] = {"sequential": [], "overlapped": []}
    digests: dict[str, str] = {}
    for _ in range(rounds):
        for mode in ("sequential", "overlapped"):
            root = tempfile.mkdtemp(prefix="cupid-overlap-")
            try:
                store = GradientStore.create(os.path.join(root, "s.zarr"))
                run = prepare_run(source, store, "r", f, cfg)
                t0 = time.perf_counter()
                featurize_shards(source, store, "r", run.pending_shards(), config=cfg, featurizer=f, progress=False,
                                 overlap_writes=mode == "overlapped")
                times[mode].append(time.perf_counter() - t0)
                digests[mode] = _digest(os.path.join(root, "s.zarr", "runs", "r"))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    rows = episodes * 50
    speedup = statistics.median([a / b for a, b in zip(times["sequential"], times["overlapped"])])
    return {"episodes": episodes, "rows": rows, "shards": -(-episodes // shard_size), "k": k,
            "sequential_s": times["sequential"], "overlapped_s": times["overlapped"],
            "rows_per_s_sequential": rows / statistics.median(times["sequential"]),
            "rows_per_s_overlapped": rows / statistics.median(times["overlapped"]),
            "speedup": speedup, "same_bytes": digests["sequential"] == digests["overlapped"],
            "load_after": os.getloadavg()}


def _digest(root: str) -> str:
    import hashlib

    h = hashlib.sha256()
    for dirpath, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        for n in sorted(names):
            path = os.path.join(dirpath, n)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    info = machine()
    out = {"machine": info, "threads": args.threads, "k": args.k, "load_before": os.getloadavg(), "models": []}
    print(f"machine: {info['cpu']} | threads {args.threads} | commit {info['commit']} | load {os.getloadavg()}")
    if args.pipeline:
        res = pipeline_overlap(args.rounds, args.k, args.pipeline_episodes, args.pipeline_shard_size)
        print(f"pipeline ({res['episodes']} episodes x 50 steps, {res['shards']} shards, k={res['k']}, float16): "
              f"sequential {res['rows_per_s_sequential']:.0f} rows/s, overlapped writes "
              f"{res['rows_per_s_overlapped']:.0f} rows/s, speed-up (median per round) {res['speedup']:.3f}, "
              f"same bytes {res['same_bytes']}; rounds {res['sequential_s']} / {res['overlapped_s']}; "
              f"load {res['load_after']}", flush=True)
        out["pipeline"] = res
    for name in [m for m in args.models.split(",") if m]:
        if name == "mlp":
            res = profile("mlp-0.5M", MLPPolicy(MLPPolicyConfig(obs_dim=OBS_DIM, action_dim=ACTION_DIM)), "loss",
                          args.batch, args.k, args.draws, args.rounds)
        elif name == "unet":
            res = profile("unet-1.2M", DiffusionPolicy(DiffusionPolicyConfig(obs_dim=OBS_DIM, action_dim=ACTION_DIM)),
                          "square", args.unet_batch, args.k, args.draws, args.rounds)
        else:
            raise ValueError(f"unknown model {name!r} (mlp, unet)")
        print(table(res["rows"], ["model", "stage", "median_s", "of_fwd_bwd", "rounds"]))
        print(f"hooks / fwd+bwd (median of per-round ratios): {res['hooks_over_fwd_bwd']:.3f} (previous route "
              f"{res['before_over_fwd_bwd']:.3f}, whole-batch layout {res['laid_out_over_fwd_bwd']:.3f}); "
              f"routes {res['routes']}; "
              f"fft kernel split (modelled) {res['fft_model_split']}; load {res['load_after']}\n", flush=True)
        out["models"].append(res)
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", default="mlp,unet")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--draws", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--pipeline", action="store_true",
                   help="also time whole shards through featurize_shards with/without overlapped store writes")
    p.add_argument("--pipeline-episodes", type=int, default=120)
    p.add_argument("--pipeline-shard-size", type=int, default=20)
    run(p.parse_args())
