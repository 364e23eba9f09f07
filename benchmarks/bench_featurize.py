"""Featuriser throughput and memory: hooks + tensorsketch vs torch.func + sparse vs traker.

One run prints, for each model, samples/s and peak extra memory of

* ``hooks+tensorsketch``: this engine's hook path (one batched forward/backward, fused
  layer sketches; per-sample gradients never formed),
* ``vmap+sparse``: this engine's torch.func path (per-sample gradients, C++ CountSketch),
* ``traker``: traker's own pipeline on the same model, output and k:
  ``trak.gradient_computers.FunctionalGradientComputer`` (torch.func per-sample
  gradients, through a small ``AbstractModelOutput`` that evaluates our output function)
  + ``trak.utils.vectorize`` + ``trak.projectors.BasicProjector`` (Rademacher, CPU).
  BasicProjector's cost is linear in P and its time is dominated by generating the
  projection blocks, so at P ~ 1M it is measured on a slice of the coordinates and
  scaled to P (marked ``est``), as in ``bench_projection.py``.

Models: the MLP (``MLPPolicyConfig()``, ~0.55M params; ``.large()``, ~8.5M) with output
``loss``, and the diffusion UNet (``DiffusionPolicyConfig()``, ~1.2M params) with output
``square`` at 64 draws per sample (so one sample is 64 network rows). k = 4096.

The ratio hooks / forward+backward (issue 19 acceptance: >= 0.7 on the 0.5M MLP, >= 0.85
on the UNet) is the median over interleaved rounds, one hook call and one
forward+backward per round.

Peak memory: the process's peak RSS (``VmHWM``) is reset through ``/proc/self/clear_refs``
before each measurement and read after it; the value reported is the peak minus the RSS
before, i.e. what the featuriser allocated on top of the model (Linux only; ``nan``
where the reset is refused).

With ``--image`` the models are the image policies instead (issue 14): the image
diffusion policy (``DiffusionImagePolicyConfig()``: ResNet-18 GN encoders of width 16,
84x84, 2 observation steps) with one and with two cameras, and the transformer
(``TransformerPolicyConfig()``, two cameras, 16 text tokens), all with output ``square``
at ``--draws`` draws; the hook row also names the per-layer strategy the featuriser chose
(when it records one) or the refusal message when it cannot featurise a layer type.

Usage: ``python benchmarks/bench_featurize.py [--quick] [--image] [--json out.json]`` or
``cupid-engine bench featurize``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    criterion, machine, policy_batch, proc_status_kb, reset_peak_rss, table, timeit, traker_policy_output, write_json,
)

from cupid_engine.featurize import Featurizer, ProjectionConfig  # noqa: E402
from cupid_engine.policies import DiffusionPolicy, DiffusionPolicyConfig, MLPPolicy, MLPPolicyConfig  # noqa: E402

OBS_DIM, ACTION_DIM = 40, 7


def measure(fn, *, repeats: int) -> tuple[dict, float]:
    """``(timeit stats, peak extra MiB)`` of ``fn``."""
    fn()  # warm up (allocator, kernels, caches)
    ok = reset_peak_rss()
    base = proc_status_kb("VmRSS")
    t = timeit(fn, repeats=repeats, warmup=0)
    peak = (proc_status_kb("VmHWM") - base) / 1024 if ok else float("nan")
    return t, peak


def _models(quick: bool) -> list[tuple[str, torch.nn.Module, str]]:
    out = [("mlp-0.5M", MLPPolicy(MLPPolicyConfig(obs_dim=OBS_DIM, action_dim=ACTION_DIM)), "loss")]
    if not quick:
        out.append(("mlp-8.5M", MLPPolicy(MLPPolicyConfig.large(obs_dim=OBS_DIM, action_dim=ACTION_DIM)), "loss"))
    out.append(("unet-1.2M", DiffusionPolicy(DiffusionPolicyConfig(obs_dim=OBS_DIM, action_dim=ACTION_DIM)), "square"))
    return out


def _traker(policy, output: str, batch: dict, k: int, draws: int, slice_p: int) -> tuple[float, float, bool]:
    """traker's per-sample gradients + BasicProjector: ``(samples/s, peak MiB, estimated)``."""
    from trak.gradient_computers import FunctionalGradientComputer
    from trak.projectors import BasicProjector, ProjectionType
    from trak.utils import vectorize

    P = sum(p.numel() for p in policy.parameters())
    gc = FunctionalGradientComputer(policy, traker_policy_output(output, draws), grad_dim=P, dtype=torch.float32,
                                    device=torch.device("cpu"))
    p_meas = min(P, slice_p)
    proj = BasicProjector(grad_dim=p_meas, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher,
                          device=torch.device("cpu"), dtype=torch.float32)
    args = [batch["obs"], batch["action"], batch["episode_key"], batch["step"]]
    B = batch["obs"].shape[0]

    def grads():
        return vectorize(gc.compute_per_sample_grad(args), device=torch.device("cpu"))

    t_grad, peak_grad = measure(grads, repeats=1)
    g = grads()[:, :p_meas].contiguous()
    t_proj, peak_proj = measure(lambda: proj.project(g, model_id=0), repeats=1)
    seconds = t_grad["median"] + t_proj["median"] * P / p_meas
    return B / seconds, max(peak_grad, peak_proj), p_meas < P


# -- image policies (issue 14: diffusion-image at 84x84 with 1-2 cameras, the transformer) --

IMAGE_SIZE, IMAGE_OBS_DIM = 84, 9


def _image_models() -> list[tuple[str, torch.nn.Module, str]]:
    from cupid_engine.policies import (
        DiffusionImagePolicy, DiffusionImagePolicyConfig, TransformerPolicy, TransformerPolicyConfig,
    )

    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    dims = {"obs_dim": IMAGE_OBS_DIM, "action_dim": ACTION_DIM, "image_shape": shape}
    torch.manual_seed(0)
    return [
        ("dp-image-1cam", DiffusionImagePolicy(DiffusionImagePolicyConfig(image_keys=("agentview",), **dims)), "square"),
        ("dp-image-2cam", DiffusionImagePolicy(DiffusionImagePolicyConfig(image_keys=("agentview", "wrist"), **dims)),
         "square"),
        ("transformer-2cam", TransformerPolicy(TransformerPolicyConfig(image_keys=("agentview", "wrist"), **dims)),
         "square"),
    ]


def _image_batch(policy, B: int) -> dict[str, torch.Tensor]:
    c = policy.config
    g = torch.Generator().manual_seed(0)
    batch = policy_batch(policy, B)
    batch["image"] = torch.randint(0, 256, (B, c.n_obs_steps, len(c.image_keys), *c.image_shape), generator=g,
                                   dtype=torch.uint8)
    batch["text"] = torch.randint(1, c.vocab_size, (B, c.text_tokens), generator=g)
    return batch


def _traker_image_output(draws: int):
    """traker ``AbstractModelOutput`` for the image policies (image and text lanes too)."""
    from trak.modelout_functions import AbstractModelOutput

    class ImagePolicyOutput(AbstractModelOutput):
        def __init__(self) -> None:  # traker declares __init__ abstract
            pass

        @staticmethod
        def get_output(model, weights, buffers, obs, action, episode_key, step, image, text):
            one = {"obs": obs[None], "action": action[None], "episode_key": episode_key[None], "step": step[None],
                   "image": image[None], "text": text[None]}
            kwargs = {"output": "square", "seed": 0, "draws": draws}
            return torch.func.functional_call(model, (weights, buffers), (one,), kwargs).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):  # unused: featurisation only
            raise NotImplementedError

    return ImagePolicyOutput()


def _traker_image(policy, batch: dict, k: int, draws: int, slice_p: int) -> tuple[float, float, bool]:
    """traker's FunctionalGradientComputer + BasicProjector on an image policy (see :func:`_traker`)."""
    from trak.gradient_computers import FunctionalGradientComputer
    from trak.projectors import BasicProjector, ProjectionType
    from trak.utils import vectorize

    P = sum(p.numel() for p in policy.parameters())
    gc = FunctionalGradientComputer(policy, _traker_image_output(draws), grad_dim=P, dtype=torch.float32,
                                    device=torch.device("cpu"))
    p_meas = min(P, slice_p)
    proj = BasicProjector(grad_dim=p_meas, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher,
                          device=torch.device("cpu"), dtype=torch.float32)
    args = [batch[key] for key in ("obs", "action", "episode_key", "step", "image", "text")]
    B = batch["obs"].shape[0]

    def grads():
        return vectorize(gc.compute_per_sample_grad(args), device=torch.device("cpu"))

    t_grad, peak_grad = measure(grads, repeats=1)
    g = grads()[:, :p_meas].contiguous()
    t_proj, peak_proj = measure(lambda: proj.project(g, model_id=0), repeats=1)
    seconds = t_grad["median"] + t_proj["median"] * P / p_meas
    return B / seconds, max(peak_grad, peak_proj), p_meas < P


def _strategies(featurizer) -> str:
    """The per-layer evaluation strategies the hook path chose on its last batch, as
    ``strategy: count`` (from ``Featurizer.layer_strategies`` where the featuriser records
    them), else an empty string."""
    chosen = getattr(featurizer, "layer_strategies", None) or {}
    counts: dict[str, int] = {}
    for v in chosen.values():
        kind = v.get("strategy", "?") if isinstance(v, dict) else str(v)
        counts[kind] = counts.get(kind, 0) + 1
    return " ".join(f"{k}:{n}" for k, n in sorted(counts.items()))


def run_image(args: argparse.Namespace) -> dict:
    """Rows for the image policies: hooks, forward+backward, vmap+sparse, traker; acceptance
    hooks >= 0.5 (goal 0.7) of forward+backward and >= 100x traker."""
    k, draws = args.k, args.draws
    rows, acceptance = [], {}
    for name, policy, output in _image_models():
        policy.eval()
        P = policy.num_parameters()
        B = args.image_batch
        batch = _image_batch(policy, B)
        reps = 1 if args.quick else 3
        res = {}
        try:
            f = Featurizer(policy, output, ProjectionConfig(k=k), draws=draws, policy_hash="bench")
        except ValueError as exc:  # the hook path refuses a layer type it cannot featurise: say which
            rows.append({"model": name, "P": P, "path": "hooks+tensorsketch", "B": B, "samples/s": float("nan"),
                         "spread": "refused", "peak MiB": float("nan"), "strategy": str(exc)[:160]})
            f = None

        def fwd_bwd():
            policy.zero_grad(set_to_none=True)
            policy(batch, output=output, draws=draws).sum().backward()

        # The machine is shared: hooks and forward+backward are timed interleaved (one of
        # each per round) so both see the same load, and the ratio is the median of the
        # per-round ratios.
        t_fb, peak_fb = measure(fwd_bwd, repeats=1)
        times = {"fwd_bwd": [t_fb["median"]], "hooks": []}
        peak_h = float("nan")
        if f is not None:
            t_h, peak_h = measure(lambda: f(batch), repeats=1)
            times["hooks"].append(t_h["median"])
        for _ in range(reps - 1):
            times["fwd_bwd"].append(timeit(fwd_bwd, repeats=1, warmup=0)["median"])
            if f is not None:
                times["hooks"].append(timeit(lambda: f(batch), repeats=1, warmup=0)["median"])
        med = {key: sorted(v)[len(v) // 2] for key, v in times.items() if v}
        res["fwd_bwd"] = B / med["fwd_bwd"]
        if f is not None:
            res["hooks"] = B / med["hooks"]
            ratios = sorted(a / b for a, b in zip(times["fwd_bwd"], times["hooks"]))
            res["round_ratio"] = ratios[len(ratios) // 2]
            rows.append({"model": name, "P": P, "path": "hooks+tensorsketch", "B": B, "samples/s": res["hooks"],
                         "spread": f"{B / max(times['hooks']):.2f}-{B / min(times['hooks']):.2f}", "peak MiB": peak_h,
                         "strategy": _strategies(f)})
        rows.append({"model": name, "P": P, "path": "forward+backward only", "B": B, "samples/s": res["fwd_bwd"],
                     "spread": f"{B / max(times['fwd_bwd']):.2f}-{B / min(times['fwd_bwd']):.2f}", "peak MiB": peak_fb,
                     "strategy": ""})
        policy.zero_grad(set_to_none=True)
        Bv = min(B, args.image_vmap_batch)
        bv = {key: v[:Bv] for key, v in batch.items()}
        fv = Featurizer(policy, output, ProjectionConfig(method="sparse", k=k), path="vmap", draws=draws, policy_hash="b")
        t, peak = measure(lambda: fv(bv), repeats=1)
        res["vmap"] = Bv / t["median"]
        rows.append({"model": name, "P": P, "path": "vmap+sparse", "B": Bv, "samples/s": res["vmap"], "spread": "",
                     "peak MiB": peak, "strategy": ""})
        if not args.no_traker:
            # traker's BasicProjector draws its projection blocks once per batch, so it gets
            # the hook path's batch size (up to --traker-batch), not the small vmap batch.
            Bt = min(B, args.traker_batch)
            bt = {key: v[:Bt] for key, v in batch.items()}
            sps_t, peak_t, est = _traker_image(policy, bt, k, draws, args.traker_slice)
            res["traker"] = sps_t
            rows.append({"model": name, "P": P, "path": "traker (FunctionalGC+BasicProjector)" + (" est" if est else ""),
                         "B": Bt, "samples/s": sps_t, "spread": "", "peak MiB": peak_t, "strategy": ""})
        print(table(rows[-4:], ["model", "P", "path", "B", "samples/s", "spread", "peak MiB", "strategy"]), flush=True)
        print()
        if "hooks" in res:
            acceptance[f"{name}_hooks_over_fwd_bwd"] = criterion(res["round_ratio"], 0.5)
            if "traker" in res:
                acceptance[f"{name}_hooks_over_traker"] = criterion(res["hooks"] / res["traker"], 100)
        del policy
    return {"rows": rows, "acceptance": acceptance}


def run(args: argparse.Namespace) -> dict:
    info = machine()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"machine: {info['cpu']} | {info['cores']} cores | torch threads {args.threads} | commit {info['commit']} "
          f"| {info['date']} | load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    k = args.k
    if args.image:
        out = run_image(args)
        print("acceptance:")
        for key, v in out["acceptance"].items():
            print(f"  {key}: {v['value']:.4g} (target {v['target']}) {'PASS' if v['pass'] else 'FAIL'}")
        payload = {"machine": info, "load_average": load, "k": k, "draws": args.draws, "results": out["rows"],
                   "acceptance": out["acceptance"]}
        write_json(args.json, payload)
        return payload
    rows = []
    results = {}
    for name, policy, output in _models(args.quick):
        policy.eval()
        P = policy.num_parameters()
        is_unet = output == "square"
        draws = args.draws
        B = args.unet_batch if is_unet else args.batch
        batch = policy_batch(policy, B)
        reps = args.rounds or (1 if args.quick else 3)
        # hooks + tensorsketch
        f = Featurizer(policy, output, ProjectionConfig(k=k), draws=draws, policy_hash="bench")
        t, peak = measure(lambda: f(batch), repeats=reps)
        sps = B / t["median"]
        rows.append({"model": name, "P": P, "path": "hooks+tensorsketch", "B": B, "samples/s": sps,
                     "spread": f"{B / t['max']:.0f}-{B / t['min']:.0f}", "peak MiB": peak})
        results[(name, "hooks")] = sps
        # forward+backward alone (the floor the hook path cannot beat)
        def fwd_bwd():
            policy.zero_grad(set_to_none=True)
            policy(batch, output=output, draws=draws).sum().backward()
        t, peak = measure(fwd_bwd, repeats=reps)
        rows.append({"model": name, "P": P, "path": "forward+backward only", "B": B, "samples/s": B / t["median"],
                     "spread": f"{B / t['max']:.0f}-{B / t['min']:.0f}", "peak MiB": peak})
        # The ratio hooks / forward+backward from interleaved rounds (one of each per round):
        # on a shared machine a load burst in one separately timed measurement and not the
        # other moves their ratio by several x.
        # The same ratio in process CPU time (all threads) is printed beside it: on a loaded
        # machine wall time also measures how long threads wait for a core (e.g. torch's
        # OpenMP barriers), CPU time the work.
        ratios, cpu_ratios = [], []
        for _ in range(reps):
            c0 = time.process_time()
            t_fb = timeit(fwd_bwd, repeats=1, warmup=0)["median"]
            c1 = time.process_time()
            t_h = timeit(lambda: f(batch), repeats=1, warmup=0)["median"]
            c2 = time.process_time()
            ratios.append(t_fb / t_h)
            cpu_ratios.append((c1 - c0) / max(c2 - c1, 1e-9))
        results[(name, "hooks_over_fwd_bwd")] = sorted(ratios)[len(ratios) // 2]
        rows[-2]["hooks/fwd+bwd"] = results[(name, "hooks_over_fwd_bwd")]
        rows[-2]["cpu ratio"] = sorted(cpu_ratios)[len(cpu_ratios) // 2]
        policy.zero_grad(set_to_none=True)
        # vmap + sparse (smaller batch: B * P floats of per-sample gradients)
        Bv = min(B, args.vmap_batch if not is_unet else max(1, args.vmap_batch // 8))
        bv = {key: v[:Bv] for key, v in batch.items()}
        fv = Featurizer(policy, output, ProjectionConfig(method="sparse", k=k), path="vmap", draws=draws, policy_hash="b")
        t, peak = measure(lambda: fv(bv), repeats=1)
        rows.append({"model": name, "P": P, "path": "vmap+sparse", "B": Bv, "samples/s": Bv / t["median"],
                     "spread": "", "peak MiB": peak})
        results[(name, "vmap")] = Bv / t["median"]
        # traker
        if not args.no_traker:
            Bt = min(Bv, args.traker_batch)
            bt = {key: v[:Bt] for key, v in batch.items()}
            sps_t, peak_t, est = _traker(policy, output, bt, k, draws, args.traker_slice)
            rows.append({"model": name, "P": P, "path": "traker (FunctionalGC+BasicProjector)" + (" est" if est else ""),
                         "B": Bt, "samples/s": sps_t, "spread": "", "peak MiB": peak_t})
            results[(name, "traker")] = sps_t
        print(table(rows[-4:], ["model", "P", "path", "B", "samples/s", "spread", "peak MiB", "hooks/fwd+bwd", "cpu ratio"]),
              flush=True)
        print()
        del policy
    acceptance = {"hooks_tensorsketch_mlp_samples_per_s": criterion(results[("mlp-0.5M", "hooks")], 10000)}
    # Issue 19: the hook path at the cost of a backward pass (median of interleaved rounds).
    acceptance["hooks_over_fwd_bwd_mlp-0.5M"] = criterion(results[("mlp-0.5M", "hooks_over_fwd_bwd")], 0.7)
    if ("unet-1.2M", "hooks_over_fwd_bwd") in results:
        acceptance["hooks_over_fwd_bwd_unet-1.2M"] = criterion(results[("unet-1.2M", "hooks_over_fwd_bwd")], 0.85)
    if ("mlp-0.5M", "traker") in results:
        acceptance["vs_traker_ratio"] = criterion(results[("mlp-0.5M", "hooks")] / results[("mlp-0.5M", "traker")], 1000)
    if ("mlp-8.5M", "hooks") in results:
        # Memory of the hook path must not grow with P beyond the model and activations.
        pk = {r["model"]: r["peak MiB"] for r in rows if r["path"] == "hooks+tensorsketch"}
        acceptance["hooks_peak_mib_large_over_small"] = {
            "value": pk["mlp-8.5M"] / max(pk["mlp-0.5M"], 1e-9), "target": None, "pass": None,
            "note": "informational: activations of the 2048-wide layers are 4x larger",
        }
    print("acceptance:")
    for key, v in acceptance.items():
        print(f"  {key}: {v['value']:.4g} (target {v['target']}) {'PASS' if v['pass'] else ('FAIL' if v['pass'] is False else '')}")
    payload = {"machine": info, "load_average": load, "k": k, "results": rows, "acceptance": acceptance}
    write_json(args.json, payload)
    return payload


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="skip the 8.5M MLP, one repeat")
    p.add_argument("--k", type=int, default=4096, help="feature dimension")
    p.add_argument("--batch", type=int, default=1024, help="samples per batch for the MLP hook path")
    p.add_argument("--unet-batch", type=int, default=64, help="samples per batch for the UNet (each = --draws rows)")
    p.add_argument("--draws", type=int, default=64, help="(eps, t) draws per UNet sample")
    p.add_argument("--vmap-batch", type=int, default=128, help="samples per batch for the torch.func path")
    p.add_argument("--traker-batch", type=int, default=16, help="samples per batch for traker")
    p.add_argument("--traker-slice", type=int, default=1 << 16, help="coordinates BasicProjector is timed on")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--no-traker", action="store_true", help="skip the traker peer")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed repeats and interleaved hooks/fwd+bwd rounds (default 3; 1 with --quick; MLP/UNet rows)")
    p.add_argument("--json", default=None, help="write results + acceptance to this path")
    p.add_argument("--image", action="store_true",
                   help="the image policies instead: diffusion-image (84x84, 1 and 2 cameras) and the transformer")
    p.add_argument("--image-batch", type=int, default=16, help="samples per batch for the image policies' hook path")
    p.add_argument("--image-vmap-batch", type=int, default=4, help="samples per batch for the image policies' vmap path")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
