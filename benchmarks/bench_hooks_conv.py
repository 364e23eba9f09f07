"""Hook-path featurisation of a Conv2d image encoder vs forward+backward alone, and the
per-layer strategy the cost model picks vs the faster one measured.

Model: a spatial-softmax CNN of the diffusion-policy kind at 84x84x3 (Conv2d + GroupNorm
x 4, spatial softmax, two Linear layers), a plain ``nn.Module`` featurised through a task
object (the policy protocol). Output ``f = ||model(x)||^2`` per sample.

    python benchmarks/bench_hooks_conv.py [--batch 32] [--k 4096] [--repeats 3] [--threads 2]

Prints one markdown table per section and the load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from cupid_engine.featurize import Featurizer, ProjectionConfig
from cupid_engine.featurize import hooks


class SpatialSoftmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = torch.softmax(x.reshape(n, c, h * w), -1).reshape(n, c, h, w)
        ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
        return torch.cat(((p.sum(3) * ys).sum(2), (p.sum(2) * xs).sum(2)), 1)


def encoder() -> nn.Module:
    def block(i, o, s):
        return [nn.Conv2d(i, o, 3 if s == 1 or i != 3 else 5, stride=s, padding=1 if i != 3 else 2),
                nn.GroupNorm(8, o), nn.ReLU()]

    return nn.Sequential(*block(3, 32, 2), *block(32, 64, 2), *block(64, 64, 2), *block(64, 64, 1),
                         SpatialSoftmax(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 7))


class SquareTask:
    supported_outputs = ("energy",)

    def build_batch(self, episodes):
        raise NotImplementedError

    def output(self, model, batch, name, *, seed=0, draws=64):
        return model(batch["image"]).square().sum(1)


def _median(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, hash tables)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = encoder().eval()
    task = SquareTask()
    batch = {"image": torch.rand(args.batch, 3, 84, 84)}
    f = Featurizer(None, "energy", ProjectionConfig(k=args.k), task=task, model=model)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        task.output(model, batch, "energy").sum().backward()

    # Interleaved (fwd+bwd, capture, sketch per round) so that all three see the same load.
    paths = {"fb": fwd_bwd, "capture": lambda: f.layer_factors(batch), "hooks": lambda: f(batch)}
    for fn in paths.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t_fb, t_capture, t_hooks = (statistics.median(times[n]) for n in ("fb", "capture", "hooks"))
    print(f"load average {os.getloadavg()[0]:.1f} / {os.cpu_count()} cpus, threads {args.threads}, "
          f"batch {args.batch}, k {args.k}, {sum(p.numel() for p in model.parameters()):,} parameters")
    print("\n| path | s/batch | samples/s | vs fwd+bwd |\n|---|---|---|---|")
    for name, t in (("forward+backward (param grads)", t_fb), ("hooks: capture (fwd + output deltas + im2col)",
                                                                  t_capture), ("hooks: full sketch", t_hooks)):
        print(f"| {name} | {t:.3f} | {args.batch / t:,.0f} | {t_fb / t:.2f} |")

    factors = f.layer_factors(batch)
    print("\n| layer | T | O | I | chosen | fft s | dense s | faster |\n|---|---|---|---|---|---|---|---|")
    for name, d, x in factors:
        seed = f._seeds[name]
        T, O, I = d.shape[1], d.shape[2], x.shape[2]
        chosen = hooks.choose_strategy("auto", T, O, I, args.k)
        t = {s: _median(lambda s=s: hooks.fused_tensorsketch([(seed, d, x)], k=args.k, strategy=s), args.repeats)
             for s in ("fft", "dense")}
        print(f"| {name} ({type(f._by_name[name]).__name__}) | {T} | {O} | {I} | {chosen} | {t['fft']:.4f} | "
              f"{t['dense']:.4f} | {min(t, key=t.get)} |")


if __name__ == "__main__":
    main()
