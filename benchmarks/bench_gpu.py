"""GPU projection and featurisation: the ``cuda`` and ``triton`` kernels vs traker vs the roofline.

One run on a CUDA machine prints, side by side:

* the two ceilings, measured in this process: HBM bandwidth (a 2 GiB device-to-device
  copy, bytes read + written) and the bf16 matrix rate (8192^3 ``torch.matmul``);
* ``project`` for P in {1M, 16M}, k in {1024, 4096}, B = 32, fp32 and bf16 gradients, every
  method x GPU backend: samples/s, GB/s of gradient read, the fraction of HBM bandwidth
  (the floor of ``sparse``/``signshift``, which read each gradient once) and of the bf16
  matrix rate (``dense`` does 2BPk flops), and the ratio to the peers on the same input:
  traker's ``CudaProjector`` (fast_jl, Rademacher; when it builds) and traker's
  ``BasicProjector`` on the GPU (torch-generated blocks + matmul, P sliced and scaled,
  marked ``est``);
* ``tensorsketch`` on a 1024x1024 Linear layer, T in {1, 16}, B = 256, k = 4096, per GPU
  backend, against materialising sum_t delta_t x_t^T and projecting it with ``sparse``;
* featurisation on the GPU of the 0.55M-parameter MLP (``loss``) and the 1.2M-parameter
  diffusion UNet (``square``, 64 noise draws per sample): hooks + tensorsketch vs
  forward+backward alone vs traker's own pipeline (``FunctionalGradientComputer`` +
  ``CudaProjector``) on the same device;
* agreement: the largest relative difference of every GPU backend from the CPU reference
  on the same fp32 input and seed (features are interchangeable across devices).

Times are medians of CUDA-event timings after warm-up. Usage:
``python benchmarks/bench_gpu.py [--quick] [--json out.json]`` or ``cupid-engine bench gpu``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import backend_agreement, criterion, machine, table, traker_policy_output, write_json  # noqa: E402

from cupid_engine import ops  # noqa: E402


def cuda_time(fn, *, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def hbm_bandwidth(gib: float = 2.0) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    n = int(gib * (1 << 30)) // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), repeats=20)
    del src, dst
    return 2 * n * 4 / t / 1e9


def gemm_rate(n: int = 8192) -> float:
    """TFLOP/s of a bf16 ``n^3`` matmul on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, repeats=10, warmup=3)
    return 2 * n**3 / t / 1e12


def _fast_jl_projector(P: int, k: int, B: int):
    """traker's CudaProjector, or ``None`` with the reason when fast_jl is missing."""
    try:
        from trak.projectors import CudaProjector, ProjectionType

        return CudaProjector(grad_dim=P, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher,
                             device=torch.device("cuda"), max_batch_size=min(32, B)), ""
    except Exception as e:  # noqa: BLE001 - reported in the table
        return None, f"{type(e).__name__}: {str(e)[:120]}"


def _basic_gpu_seconds(P: int, k: int, B: int, slice_p: int) -> tuple[float, bool]:
    """traker BasicProjector (Rademacher) on the GPU; measured on ``slice_p`` coordinates, scaled."""
    from trak.projectors import BasicProjector, ProjectionType

    p_meas = min(P, slice_p)
    proj = BasicProjector(grad_dim=p_meas, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher,
                          device=torch.device("cuda"), dtype=torch.float32)
    g = torch.randn(B, p_meas, device="cuda")
    t = cuda_time(lambda: proj.project(g, model_id=0), repeats=3, warmup=1)
    return t * P / p_meas, p_meas < P


def bench_project(args, hbm: float, tflops: float, backends: list[str]) -> list[dict]:
    rows = []
    Ps = [1 << 20] if args.quick else [1 << 20, 16 << 20]
    ks = [1024] if args.quick else [1024, 4096]
    B = args.batch
    for P in Ps:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(B, P, device="cuda", dtype=dtype)
            gb = x.numel() * x.element_size() / 1e9
            for k in ks:
                peers = {}
                fj, why = _fast_jl_projector(P, k, B)
                if fj is not None:
                    # fast_jl takes fp16/fp32; bf16 gradients are given to it as fp16 (same bytes).
                    xf = x if dtype == torch.float32 else x.to(torch.float16)
                    t = cuda_time(lambda: fj.project(xf, model_id=0), repeats=5)
                    peers["fast_jl"] = t
                    rows.append(dict(impl="traker CudaProjector (fast_jl)", dtype=str(dtype)[6:], P=P, k=k,
                                     samples_s=B / t, GB_s=gb / t, frac_hbm=gb / t / hbm,
                                     frac_gemm=2 * B * P * k / t / 1e12 / tflops, vs_fast_jl=1.0, note=""))
                    del xf
                elif why:
                    rows.append(dict(impl="traker CudaProjector (fast_jl)", dtype=str(dtype)[6:], P=P, k=k,
                                     note="unavailable: " + why))
                if dtype == torch.float32:
                    t, est = _basic_gpu_seconds(P, k, B, args.basic_slice)
                    peers["basic"] = t
                    rows.append(dict(impl="traker BasicProjector[cuda]", dtype="float32", P=P, k=k, samples_s=B / t,
                                     GB_s=gb / t, frac_hbm=gb / t / hbm,
                                     frac_gemm=2 * B * P * k / t / 1e12 / tflops,
                                     vs_fast_jl=peers["fast_jl"] / t if "fast_jl" in peers else float("nan"),
                                     note="est" if est else ""))
                for backend in backends:
                    for method in ("signshift", "sparse", "dense"):
                        t = cuda_time(lambda: ops.project(x, k=k, method=method, backend=backend, check_finite=False),
                                      repeats=5 if method == "dense" else 10)
                        rows.append(dict(impl=f"cupid[{backend}] {method}", dtype=str(dtype)[6:], P=P, k=k,
                                         samples_s=B / t, GB_s=gb / t, frac_hbm=gb / t / hbm,
                                         frac_gemm=2 * B * P * k / t / 1e12 / tflops,
                                         vs_fast_jl=peers["fast_jl"] / t if "fast_jl" in peers else float("nan"),
                                         note=""))
            del x
            torch.cuda.empty_cache()
    return rows


def bench_tensorsketch(args, backends: list[str]) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    B, k, dim = 256, 4096, 1024
    for T in ([1] if args.quick else [1, 16]):
        x = torch.randn(B, T, dim, device="cuda", generator=g)
        delta = torch.randn(B, T, dim, device="cuda", generator=g)
        for backend in backends:
            t_ts = cuda_time(lambda: ops.tensorsketch(delta, x, k=k, seed=1, backend=backend), repeats=10)

            def materialise():
                G = torch.einsum("bto,bti->boi", delta, x).reshape(B, -1)
                return ops.project(G, k=k, method="sparse", seed=1, backend=backend)

            t_mat = cuda_time(materialise, repeats=5)
            rows.append(dict(backend=backend, layer=f"{dim}x{dim}", T=T, B=B, k=k, ts_samples_s=B / t_ts,
                             materialise_sparse_samples_s=B / t_mat, speedup=t_mat / t_ts))
    return rows


def bench_featurize(args) -> list[dict]:
    """Hook path vs forward+backward alone vs traker's pipeline, per model, on the GPU."""
    from cupid_engine.featurize import Featurizer, ProjectionConfig
    from cupid_engine.policies import DiffusionPolicy, DiffusionPolicyConfig, MLPPolicy, MLPPolicyConfig

    obs_dim, action_dim, k, draws = 40, 7, 4096, 64
    models = [("mlp-0.5M", MLPPolicy(MLPPolicyConfig(obs_dim=obs_dim, action_dim=action_dim)), "loss",
               [1024] if args.quick else [1024, 8192], 256)]
    if not args.quick:  # UNet `square`: one sample is `draws` network rows
        models.append(("unet-1.2M", DiffusionPolicy(DiffusionPolicyConfig(obs_dim=obs_dim, action_dim=action_dim)),
                       "square", [64, 256], 16))
    rows = []
    for name, policy, output, batches, Bt in models:
        policy = policy.cuda().eval()
        c, P = policy.config, policy.num_parameters()
        for B in batches:
            g = torch.Generator(device="cuda").manual_seed(0)
            batch = {
                "obs": torch.randn(B, c.n_obs_steps, c.obs_dim, device="cuda", generator=g),
                "action": torch.randn(B, c.horizon, c.action_dim, device="cuda", generator=g),
                "episode_key": torch.arange(B, dtype=torch.int64, device="cuda") * 7919,
                "step": torch.arange(B, dtype=torch.int64, device="cuda"),
            }
            f = Featurizer(policy, output, ProjectionConfig(k=k), draws=draws, policy_hash="bench")
            t = cuda_time(lambda: f(batch), repeats=5)
            rows.append(dict(model=name, P=P, output=output, path="hooks+tensorsketch [cuda]", B=B, samples_s=B / t))

            def fwd_bwd():
                policy.zero_grad(set_to_none=True)
                policy(batch, output=output, draws=draws).sum().backward()

            t = cuda_time(fwd_bwd, repeats=5)
            rows.append(dict(model=name, P=P, output=output, path="forward+backward only", B=B, samples_s=B / t))
            policy.zero_grad(set_to_none=True)
        # traker's pipeline on the same device: per-sample gradients (torch.func) + CudaProjector.
        try:
            from trak.gradient_computers import FunctionalGradientComputer
            from trak.utils import vectorize

            gc = FunctionalGradientComputer(policy, traker_policy_output(output, draws), grad_dim=P,
                                            dtype=torch.float32, device=torch.device("cuda"))
            fj, why = _fast_jl_projector(P, k, 32)
            if fj is None:
                raise RuntimeError(why)
            bt = [batch[n][:Bt] for n in ("obs", "action", "episode_key", "step")]

            def traker():
                grads = vectorize(gc.compute_per_sample_grad(bt), device=torch.device("cuda"))
                return torch.cat([fj.project(grads[i : i + 32], model_id=0) for i in range(0, Bt, 32)])

            t = cuda_time(traker, repeats=3, warmup=1)
            rows.append(dict(model=name, P=P, output=output, path="traker (FunctionalGC + CudaProjector)", B=Bt,
                             samples_s=Bt / t))
        except Exception as e:  # noqa: BLE001 - a missing peer is reported, not hidden
            rows.append(dict(model=name, P=P, path=f"traker unavailable: {type(e).__name__}: {str(e)[:100]}"))
        del policy
        torch.cuda.empty_cache()
    return rows


def run(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA device (torch.cuda.is_available() is False)")
    info = machine()
    hbm, tflops = hbm_bandwidth(), gemm_rate()
    print(f"machine: {info['gpu']} | {info['cpu']} | commit {info['commit']} | {info['date']} | torch {info['torch']}")
    print(f"measured HBM bandwidth: {hbm:.0f} GB/s (copy, read+write) | bf16 matmul: {tflops:.0f} TFLOP/s\n", flush=True)
    backends = [b for b in ops.available_backends() if b in ("cuda", "triton")]
    results = bench_project(args, hbm, tflops, backends)
    print(table(results, ["impl", "dtype", "P", "k", "samples_s", "GB_s", "frac_hbm", "frac_gemm", "vs_fast_jl",
                          "note"]), flush=True)
    ts_rows = bench_tensorsketch(args, backends)
    print()
    print(table(ts_rows, ["backend", "layer", "T", "B", "k", "ts_samples_s", "materialise_sparse_samples_s",
                          "speedup"]), flush=True)
    fz_rows = bench_featurize(args)
    print()
    print(table(fz_rows, ["model", "P", "output", "path", "B", "samples_s"]), flush=True)
    worst = backend_agreement(backends, sketch=True)

    acceptance = {}
    P, k = max(r["P"] for r in results), max(r["k"] for r in results)
    big = [r for r in results if r["P"] == P and r["k"] == k and "samples_s" in r]
    for b in backends:
        fast = [r for r in big if r["impl"] in (f"cupid[{b}] signshift", f"cupid[{b}] sparse")]
        if fast:
            best = max(fast, key=lambda r: r["frac_hbm"])
            acceptance[f"{b}_best_sketch_fraction_of_hbm_P{P}_k{k}_{best['dtype']}"] = criterion(best["frac_hbm"], 0.5)
    jl = [r for r in big if r["impl"].startswith("traker CudaProjector") and r["dtype"] == "float32"]
    ours = [r for r in big if r["impl"].startswith("cupid[") and r["dtype"] == "float32"]
    if jl and ours:
        best = max(ours, key=lambda r: r["samples_s"])
        acceptance[f"best_fp32_vs_traker_cudaprojector_P{P}_k{k}"] = criterion(best["samples_s"] / jl[0]["samples_s"], 1.0)
        acceptance[f"best_fp32_vs_traker_cudaprojector_P{P}_k{k}"]["impl"] = best["impl"]
    t1 = [r for r in ts_rows if r["T"] == 1]
    if t1:
        acceptance["tensorsketch_speedup_vs_materialise_sparse_T1"] = criterion(max(r["speedup"] for r in t1), 20)
    acceptance["gpu_backends_max_rel_diff_vs_cpu_reference"] = criterion(worst, 1e-5, higher_is_better=False)
    print("\nacceptance:")
    for name, c in acceptance.items():
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {name}: {c['value']:.4g} (target {c['target']:g})")
    payload = {"benchmark": "gpu", "machine": info, "hbm_GB_s": hbm, "bf16_TFLOP_s": tflops,
               "results": results + ts_rows + fz_rows, "acceptance": acceptance}
    write_json(args.json, payload)
    return payload


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="P = 1M, k = 1024, T = 1, B = 1024 featurisation only")
    p.add_argument("--batch", type=int, default=32, help="B for project")
    p.add_argument("--basic-slice", type=int, default=1 << 20, help="coordinates traker BasicProjector is timed on")
    p.add_argument("--json", default=None, help="write results + acceptance to this path")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
