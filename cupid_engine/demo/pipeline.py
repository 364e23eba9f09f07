"""Stages of the demo, each cached under ``out/`` behind a completion marker.

The stages call only public APIs (sim, policies, featurize, scorers, index), so this
module doubles as a worked example of using the engine from Python.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from cupid_engine.config import Config, check, field

logger = logging.getLogger("cupid_engine.demo")

# Scorers run by the demo, in report order: influence methods first, then baselines.
METHODS = ("cupid", "cupid-quality", "qoq", "length", "random", "oracle")


@dataclasses.dataclass(frozen=True)
class DemoConfig(Config):
    """Sizes and knobs of the demo; defaults finish in minutes on 2 cores."""

    task: str = field("lift", help="robosuite task: lift, can or square")
    demos_per_tier: int = field(20, help="successful scripted demos per quality tier")
    tiers: tuple[str, ...] = field(("better", "okay", "worse"), help="quality tiers to generate")
    policy: str = field("mlp", help="policy class: mlp or diffusion")
    policy_size: str = field("default", help="policy preset: tiny, default or large")
    train_steps: int = field(3000, help="optimizer steps of behaviour cloning")
    batch_size: int = field(256, help="training batch size")
    rollouts: int = field(30, help="closed-loop rollouts of the trained policy")
    workers: int = field(
        1, help="rollout workers (1 = in-process, >1 = local Ray actors; obs=image: rendering processes of generate "
                "and rollout)"
    )
    k: int = field(1024, help="projection dimension")
    method: str = field("tensorsketch", help="projection method")
    # Not "loss": a deterministic MLP's rollout actions are its own predictions, so the BC
    # loss has a zero gradient at every rollout step (measured: median rollout feature
    # norm 1.7e-6 vs 1.35 for demos) and CUPID would score noise. The label-agnostic
    # energy output is CUPID's remedy (its appendix A uses ||eps_theta||^2 for diffusion).
    output: str = field("energy", help="output function of the influence features (label-agnostic by default)")
    filter_fraction: float = field(0.3, help="fraction of lowest-scoring demos filtered in the report")
    seed: int = field(0, help="seed of every stage")
    obs: str = field("state", help="state (low-dim observations) or image (camera frames + state, see DemoConfig.image)")
    cameras: tuple[str, ...] = field(("agentview",), help="obs=image: robosuite cameras rendered for demos and rollouts")
    image_size: int = field(64, help="obs=image: frame height and width in pixels")
    draws: int = field(64, help="(eps, t) draws per sample of the diffusion outputs")
    rollout_horizon: int = field(0, help="step limit of a rollout (0: the task's default)")

    def __post_init__(self) -> None:
        check(self.demos_per_tier > 0, "demos_per_tier must be > 0")
        check(self.rollouts > 0, "rollouts must be > 0")
        check(self.workers >= 1, "workers must be >= 1")
        check(0 < self.filter_fraction < 1, "filter_fraction must be in (0, 1)")
        check(self.obs in ("state", "image"), f"obs must be state or image, got {self.obs!r}")
        if self.obs == "state":
            check(self.policy in ("mlp", "diffusion"), f"policy must be mlp or diffusion, got {self.policy!r}")
        else:
            check(self.policy == "diffusion-image", f"obs=image needs policy diffusion-image, got {self.policy!r}")
            check(len(self.cameras) >= 1, "obs=image needs at least one camera")
            check(self.image_size >= 17, f"image_size must be >= 17, got {self.image_size}")
        check(self.draws >= 1, "draws must be >= 1")
        check(self.rollout_horizon >= 0, "rollout_horizon must be >= 0")

    @classmethod
    def image(cls, **overrides: Any) -> DemoConfig:
        """The image demo (``cupid-engine demo --obs image``): sized for well under 20
        minutes on 2 loaded cores (README gives the measured time).

        One 64x64 ``agentview`` camera; the tiny ``diffusion-image`` preset (ResNet-GN
        encoder + spatial softmax, UNet (16, 32)); rollouts in 2 rendering processes;
        ``square`` output (CUPID appendix A, label-agnostic) with 4 noise draws per sample.
        """
        base: dict[str, Any] = {
            "obs": "image", "policy": "diffusion-image", "policy_size": "tiny", "demos_per_tier": 6,
            "train_steps": 1000, "batch_size": 64, "rollouts": 8, "workers": 2, "k": 256, "output": "square",
            "draws": 4, "rollout_horizon": 200,
        }
        return cls(**{**base, **overrides})


def _stage(out: Path, name: str, cfg: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` unless ``out/name.done.json`` records the same config; returns its summary."""
    marker = out / f"{name}.done.json"
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("config") == cfg:
            print(f"[demo] {name}: cached ({marker})")
            return saved["summary"]
    print(f"[demo] {name}: running ...", flush=True)
    t0 = time.perf_counter()
    summary = fn()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": cfg, "summary": summary}, indent=2, default=str))
    tmp.replace(marker)
    print(f"[demo] {name}: done in {summary['seconds']:.1f} s", flush=True)
    return summary


def generate_stage(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from cupid_engine.data import write_dataset
    from cupid_engine.sim import generate_episodes

    path = out / "data" / f"{cfg.task}_mh"

    def run() -> dict[str, Any]:
        counts: dict[str, int] = {}
        total = cfg.demos_per_tier * len(cfg.tiers)

        if cfg.obs == "image":
            from cupid_engine.sim.render import generate_image_episodes

            episodes = generate_image_episodes(
                cfg.task, cameras=cfg.cameras, size=cfg.image_size, workers=cfg.workers,
                demos_per_tier=cfg.demos_per_tier, tiers=cfg.tiers, seed=cfg.seed,
            )
        else:
            episodes = generate_episodes(cfg.task, demos_per_tier=cfg.demos_per_tier, tiers=cfg.tiers, seed=cfg.seed)

        def stream():
            for i, ep in enumerate(episodes):
                counts[ep.tier] = counts.get(ep.tier, 0) + 1
                if (i + 1) % 10 == 0 or i + 1 == total:
                    print(f"        generated {i + 1}/{total} demos", flush=True)
                yield ep

        write_dataset(path, stream(), overwrite=True)
        return {"path": str(path), "tiers": counts}

    return _stage(out, "generate", {**cfg.to_dict(), "stage": "generate"}, run)


def train_stage(cfg: DemoConfig, out: Path, data_path: str) -> dict[str, Any]:
    from cupid_engine.data import open_source
    from cupid_engine.policies import TrainConfig, save_policy, train_policy
    from cupid_engine.policies.registry import POLICIES
    from cupid_engine.sim.tasks import obs_keys

    path = out / "policy"

    def run() -> dict[str, Any]:
        episodes = list(open_source(data_path).episodes(split="train"))
        pcls = POLICIES[cfg.policy][0]
        presets = {"tiny": pcls.tiny, "default": pcls, "large": getattr(pcls, "large", None)}
        if presets.get(cfg.policy_size) is None:
            raise ValueError(f"policy {cfg.policy!r} has no {cfg.policy_size!r} preset")
        policy_cfg = presets[cfg.policy_size]().replace(obs_keys=tuple(obs_keys(cfg.task)))
        if cfg.obs == "image":
            policy_cfg = policy_cfg.replace(image_keys=tuple(cfg.cameras))
        tcfg = TrainConfig(steps=cfg.train_steps, batch_size=cfg.batch_size, seed=cfg.seed, lr=1e-3)
        policy = train_policy(policy_cfg, episodes, tcfg, progress=True)
        save_policy(policy, path, overwrite=True)
        info = getattr(policy, "train_info", {}) or {}
        losses = info.get("step_losses") or info.get("losses") or []
        return {"path": str(path), "final_loss": float(losses[-1]) if losses else None}

    return _stage(out, "train", {**cfg.to_dict(), "stage": "train"}, run)


def rollout_stage(cfg: DemoConfig, out: Path, policy_path: str) -> dict[str, Any]:
    from cupid_engine.data import write_dataset
    from cupid_engine.distributed import executor_for
    from cupid_engine.sim import run_rollouts

    path = out / "data" / f"{cfg.task}_rollouts"

    def run() -> dict[str, Any]:
        done = [0]

        def progress(ep) -> None:
            done[0] += 1
            print(f"        rollout {done[0]}/{cfg.rollouts}: {'success' if ep.success else 'failure'}", flush=True)

        # Image policies: rolled out in cfg.workers spawned rendering processes (sim.rollout).
        eps = run_rollouts(
            policy_path, cfg.task, episodes=cfg.rollouts, seed=cfg.seed + 10_000, executor=executor_for(cfg.workers),
            progress=progress,
            horizon=cfg.rollout_horizon or None,
        )
        write_dataset(path, eps, overwrite=True)
        rate = sum(bool(e.success) for e in eps) / len(eps)
        return {"path": str(path), "success_rate": rate, "episodes": len(eps)}

    return _stage(out, "rollout", {**cfg.to_dict(), "stage": "rollout"}, run)


def featurize_stage(cfg: DemoConfig, out: Path, data_path: str, rollout_path: str, policy_path: str) -> dict[str, Any]:
    from cupid_engine.data import open_source
    from cupid_engine.featurize import FeaturizeConfig, ProjectionConfig, featurize
    from cupid_engine.policies import load_policy
    from cupid_engine.store import GradientStore

    path = out / "store.zarr"

    def run() -> dict[str, Any]:
        store = GradientStore.create(str(path), overwrite=True)
        policy = load_policy(policy_path)
        fcfg = FeaturizeConfig(output=cfg.output, draws=cfg.draws,
                               projection=ProjectionConfig(method=cfg.method, k=cfg.k, seed=cfg.seed))
        featurize(open_source(data_path), store, "base", policy=policy, config=fcfg)
        run_ = featurize(open_source(rollout_path), store, "base", policy=policy, config=fcfg)
        return {"path": str(path), "k": run_.k, "gram_count": int(run_.gram_count)}

    return _stage(out, "featurize", {**cfg.to_dict(), "stage": "featurize"}, run)


def score_stage(cfg: DemoConfig, out: Path, store_path: str) -> dict[str, Any]:
    import cupid_engine as ce
    from cupid_engine.scorers import write_table

    def run() -> dict[str, Any]:
        paths = {}
        for method in METHODS:
            opts: dict[str, Any] = {}
            if method == "qoq":
                opts["validation"] = "failed-rollouts"
            if method == "random":
                opts["seed"] = cfg.seed
            table = ce.score(method, store=store_path, run="base", **opts)
            p = out / "scores" / f"{method}.parquet"
            p.parent.mkdir(parents=True, exist_ok=True)
            write_table(table, p)
            paths[method] = str(p)
            print(f"        scored {table.num_rows} demos with {method}", flush=True)
        return {"scores": paths}

    return _stage(out, "score", {**cfg.to_dict(), "stage": "score"}, run)


def run_demo(cfg: DemoConfig, out: str | Path) -> Path:
    """Run (or resume) the whole demo; returns the report's ``index.html``."""
    from cupid_engine.demo.report import failed_rollout_query, write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = generate_stage(cfg, out)
    tr = train_stage(cfg, out, gen["path"])
    ro = rollout_stage(cfg, out, tr["path"])
    print(f"[demo] policy success rate over {ro['episodes']} rollouts: {ro['success_rate']:.0%}")
    fe = featurize_stage(cfg, out, gen["path"], ro["path"], tr["path"])
    sc = score_stage(cfg, out, fe["path"])
    query = failed_rollout_query(fe["path"], k=10)
    index = write_report(cfg, out, summaries={"generate": gen, "train": tr, "rollout": ro, "featurize": fe,
                                              "score": sc}, query=query)
    site = explorer_stage(out, fe["path"], sc["scores"], [gen["path"], ro["path"]])
    print(f"[demo] influence explorer: {site} (open it in a browser)")
    return index


def explorer_stage(out: Path, store_path: str, scores: dict[str, str], data: list[str]) -> Path:
    """The influence explorer of the demo run (always rewritten: it is cheap and reads only results)."""
    from cupid_engine.explorer import build_site

    return build_site(store_path, "base", out / "site", scores=scores, data=data, title="cupid_engine demo")
