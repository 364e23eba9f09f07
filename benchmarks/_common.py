"""Shared benchmark plumbing: timing, the hardware limit, machine info and JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import cupid_engine  # noqa: F401  (sets OMP_WAIT_POLICY before torch starts OpenMP)
import torch


def timeit(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median/min/max wall seconds of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: a torch float32 sum over a ``gib`` GiB buffer, all threads."""
    n = int(gib * (1 << 30)) // 4
    buf = torch.ones(n, dtype=torch.float32)
    t = timeit(lambda: buf.sum(), repeats=repeats, warmup=1)
    del buf
    return n * 4 / t["min"] / 1e9


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {p}")


def criterion(value: float, target: float, *, higher_is_better: bool = True) -> dict[str, Any]:
    ok = value >= target if higher_is_better else value <= target
    return {"value": float(value), "target": float(target), "pass": bool(ok)}


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def proc_status_kb(key: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM`` ...); None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def backend_agreement(backends: list[str], *, sketch: bool = False) -> float:
    """Largest relative difference from the CPU torch reference over ``backends`` (fp32 input).

    ``project`` (every method, P = 30011, k = 512) and, with ``sketch``, ``tensorsketch``;
    inputs go to the backend's device (``cuda``/``triton``: the GPU).
    """
    from cupid_engine import ops
    from cupid_engine.ops.tolerances import max_rel_err

    def dev(b: str) -> str:
        return "cuda" if b in ("cuda", "triton") else "cpu"

    g = torch.Generator().manual_seed(1)
    xa = torch.randn(4, 30011, generator=g)
    worst = 0.0
    for method in ("dense", "sparse", "signshift"):
        ref = ops.project(xa, k=512, method=method, backend="torch")
        for b in backends:
            if b != "torch":
                worst = max(worst, max_rel_err(ops.project(xa.to(dev(b)), k=512, method=method, backend=b), ref))
    if sketch:
        dl, xx = torch.randn(3, 2, 300, generator=g), torch.randn(3, 2, 170, generator=g)
        ref = ops.tensorsketch(dl, xx, k=1000, seed=2, backend="torch")
        for b in backends:
            if b != "torch":
                out = ops.tensorsketch(dl.to(dev(b)), xx.to(dev(b)), k=1000, seed=2, backend=b)
                worst = max(worst, max_rel_err(out, ref))
    return worst


def traker_policy_output(output: str, draws: int = 64):
    """A traker ``AbstractModelOutput`` that evaluates this engine's policy output function.

    One sample per vmap lane (traker's FunctionalGradientComputer); used by the benchmarks
    that run traker's own per-sample-gradient pipeline on our policies.
    """
    from trak.modelout_functions import AbstractModelOutput

    class PolicyOutput(AbstractModelOutput):
        def __init__(self) -> None:  # traker declares __init__ abstract
            pass

        @staticmethod
        def get_output(model, weights, buffers, obs, action, episode_key, step):
            one = {"obs": obs[None], "action": action[None], "episode_key": episode_key[None], "step": step[None]}
            kwargs = {"output": output, "seed": 0, "draws": draws}
            return torch.func.functional_call(model, (weights, buffers), (one,), kwargs).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):  # unused: featurisation only
            raise NotImplementedError

    return PolicyOutput()


def policy_batch(policy, B: int) -> dict:
    """A seeded synthetic batch of ``B`` samples shaped for ``policy``'s config (obs, action,
    episode_key, step): what the featurisation benchmarks feed every policy."""
    import torch

    c = policy.config
    g = torch.Generator().manual_seed(0)
    return {
        "obs": torch.randn(B, c.n_obs_steps, c.obs_dim, generator=g),
        "action": torch.randn(B, c.horizon, c.action_dim, generator=g),
        "episode_key": torch.arange(B, dtype=torch.int64) * 7919,
        "step": torch.arange(B, dtype=torch.int64),
    }
