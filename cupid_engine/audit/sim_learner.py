"""The robosuite learner: the audit's :class:`~cupid_engine.audit.protocol.Learner` on real runs.

Every call goes through the engine's public pieces: behaviour cloning
(``policies.train_policy``), closed-loop evaluation (``sim.run_rollouts``), and for the
influence methods a gradient store per trained policy (``featurize.featurize`` of the
training demos and of scoring rollouts of that policy, then ``scorers.score``). The
dataset is a LeRobot-layout dataset; when ``config.dataset`` does not exist it is
generated once with the scripted tiered demonstrators.

``learner_options`` (TOML ``[learner_options]``):

* ``demos_per_tier`` (20), ``data_seed`` (0): dataset generation when it is missing;
* ``score_rollouts`` (20): rollouts of the base policy that CUPID-style scorers use;
* ``k`` (1024), ``method`` ("tensorsketch"), ``output`` ("energy"): the features (label-agnostic:
  the BC loss of a deterministic policy has a zero gradient at its own rollout actions);
* ``size`` ("default"): the policy preset; ``rollout_workers`` (1): Ray actors for rollouts;
* ``draws`` (16): (t, noise) draws per sample when featurising a diffusion policy;
* ``scenario`` (none): a known-answer scenario (``cupid_engine.sim.scenarios``). The dataset
  is then generated with :func:`~cupid_engine.sim.scenarios.generate_scenario` (``demos``
  in total, default 60), every rollout (scoring and evaluation) runs under the scenario's
  shift, horizon and success rule, the ``oracle`` method ranks the known-bad strategy
  lowest, and the report's composition columns show the ground-truth label in place of a
  tier. Scorers still never see the label: it is read only for ``oracle`` and the report.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

# Methods computed from gradient features in a store of the trained policy.
STORE_METHODS = ("cupid", "cupid-quality", "qoq", "tracin", "trak-traj")
_SEED_STRIDE = 1_000_003  # keeps evaluation, scoring and dataset seeds in disjoint ranges


class SimLearner:
    """Train / score / evaluate BC policies on a robosuite task (see module docstring)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.options: dict[str, Any] = dict(config.learner_options or {})
        self.task = config.task
        self.dataset = Path(config.dataset)
        policy = dict(config.policy or {})
        self.policy_kind = policy.pop("type", "mlp")
        self.train_fields = policy
        self._lock = threading.Lock()
        self._episodes: list | None = None
        if not (self.dataset / "meta" / "info.json").exists():
            self._generate()

    # -- data ---------------------------------------------------------------------------
    def _scenario(self):
        """The scenario of ``learner_options.scenario``, or None."""
        name = self.options.get("scenario")
        if not name:
            return None
        from cupid_engine.sim.scenarios import get_scenario

        sc = get_scenario(str(name))
        if sc.task != self.task:
            raise ValueError(f"learner_options.scenario {sc.name!r} runs on task {sc.task!r}, the config says {self.task!r}")
        return sc

    def _rollout_options(self) -> dict[str, Any]:
        """Shift, horizon and success rule of every rollout (the scenario's, when one is set)."""
        sc = self._scenario()
        if sc is None:
            return {}
        from cupid_engine.sim.scenarios import rollout_options

        # A physics shift is a ``variation``; a context scenario's (lift-cue) is an env factory.
        return rollout_options(sc.name, shifted=True)

    def _generate(self) -> None:
        from cupid_engine.data import write_dataset
        from cupid_engine.sim import generate_episodes

        sc = self._scenario()
        if sc is not None:
            from cupid_engine.sim.scenarios import generate_scenario

            n = int(self.options.get("demos", 60))
            print(f"[audit] generating scenario {sc.name} at {self.dataset} ({n} demos)", flush=True)
            write_dataset(self.dataset, generate_scenario(sc.name, demos=n, seed=int(self.options.get("data_seed", 0))))
            return
        n = int(self.options.get("demos_per_tier", 20))
        print(f"[audit] generating {self.task} dataset at {self.dataset} ({n} demos per tier)", flush=True)
        eps = generate_episodes(self.task, demos_per_tier=n, seed=int(self.options.get("data_seed", 0)))
        write_dataset(self.dataset, eps)

    def episodes(self) -> list:
        with self._lock:
            if self._episodes is None:
                from cupid_engine.data import open_dataset

                self._episodes = list(open_dataset(self.dataset).episodes(split="train"))
            return self._episodes

    def episode_info(self) -> dict[str, list]:
        from cupid_engine.sim.scenarios import LABEL_KEY

        eps = self.episodes()
        labelled = self._scenario() is not None
        return {
            "episode_id": [e.episode_id for e in eps],
            "length": [e.length for e in eps],
            # The report's composition columns: tier, or a scenario's ground-truth label.
            "tier": [(e.metadata.get(LABEL_KEY, "") if labelled else e.tier) or "" for e in eps],
        }

    def feature_options(self) -> dict[str, Any]:
        """The featurisation settings with defaults resolved (part of every cache key)."""
        return {
            "k": int(self.options.get("k", 1024)),
            "method": self.options.get("method", "tensorsketch"),
            "output": self.options.get("output", "energy"),
            "score_rollouts": int(self.options.get("score_rollouts", 20)),
            "draws": int(self.options.get("draws", 16)),
        }

    def fingerprint(self) -> str:
        from cupid_engine import __version__

        info = self.episode_info()
        payload = json.dumps(
            {"info": info, "task": self.task, "policy": self.policy_kind, "train": self.train_fields,
             "options": self.options, "features": self.feature_options(), "version": __version__},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # -- training -----------------------------------------------------------------------
    def _policy_config(self):
        from cupid_engine.policies.registry import POLICIES
        from cupid_engine.sim.tasks import obs_keys

        cls = POLICIES[self.policy_kind][0]
        size = self.options.get("size", "default")
        make = {"tiny": cls.tiny, "default": cls, "large": getattr(cls, "large", None)}[size]
        sc = self._scenario()  # a context scenario adds its cue keys to the task's
        return make().replace(obs_keys=tuple(sc.obs_keys if sc is not None else obs_keys(self.task)))

    def _train_config(self, seed: int):
        from cupid_engine.policies import TrainConfig

        fields = {"steps": 2000, "batch_size": 256, "lr": 1e-3, **self.train_fields}
        return TrainConfig(**{**fields, "seed": int(seed)})

    def train(self, episode_ids: Sequence[str], seed: int, workdir: Path) -> None:
        from cupid_engine.policies import save_policy, train_policy

        keep = set(episode_ids)
        eps = [e for e in self.episodes() if e.episode_id in keep]
        if len(eps) != len(keep):
            raise ValueError(f"{len(keep) - len(eps)} episode ids are not in {self.dataset}")
        policy = train_policy(self._policy_config(), eps, self._train_config(seed), progress=False)
        save_policy(policy, Path(workdir) / "policy")

    # -- scoring ------------------------------------------------------------------------
    def _loss_scores(self, policy_path: Path) -> dict[str, float]:
        import torch

        from cupid_engine.policies import build_samples, load_policy

        policy = load_policy(policy_path)
        c = policy.config
        out = {}
        with torch.no_grad():
            for ep in self.episodes():
                samples = build_samples([ep], n_obs_steps=c.n_obs_steps, horizon=c.horizon, obs_keys=c.obs_keys)
                out[ep.episode_id] = -float(policy.per_sample_loss(policy.make_batch(samples)).mean())
        return out

    def _store(self, model_dir: Path, seed: int) -> Path:
        """Featurise training demos and scoring rollouts of the policy in ``model_dir`` (cached)."""
        from cupid_engine.data import open_dataset, write_dataset
        from cupid_engine.featurize import FeaturizeConfig, ProjectionConfig, featurize
        from cupid_engine.distributed import executor_for
        from cupid_engine.sim import run_rollouts
        from cupid_engine.store import GradientStore

        fo = self.feature_options()
        tag = hashlib.sha256(json.dumps(fo, sort_keys=True).encode()).hexdigest()[:12]
        root = Path(model_dir) / f"influence-{tag}"
        done = root / "done.json"
        if done.exists():
            return root / "store.zarr"
        root.mkdir(parents=True, exist_ok=True)
        policy_path = Path(model_dir) / "policy"
        rollouts = run_rollouts(
            str(policy_path), self.task, episodes=fo["score_rollouts"],
            seed=seed * _SEED_STRIDE + 17, executor=executor_for(int(self.options.get("rollout_workers", 1))),
            **self._rollout_options(),
        )
        write_dataset(root / "rollouts", rollouts, overwrite=True)
        store = GradientStore.create(str(root / "store.zarr"), overwrite=True)
        fcfg = FeaturizeConfig(
            output=fo["output"], draws=fo["draws"], projection=ProjectionConfig(method=fo["method"], k=fo["k"])
        )
        featurize(open_dataset(self.dataset), store, "base", policy=str(policy_path), config=fcfg, split="train",
                  progress=False)
        featurize(open_dataset(root / "rollouts"), store, "base", policy=str(policy_path), config=fcfg, progress=False)
        done.write_text(json.dumps({"rollout_success": float(np.mean([bool(e.success) for e in rollouts]))}))
        return root / "store.zarr"

    def score(self, model_dir: Path, method: str, seed: int) -> Mapping[str, float]:
        import cupid_engine as ce

        if method == "loss":
            return self._loss_scores(Path(model_dir) / "policy")
        sc = self._scenario()
        if method == "oracle" and sc is not None:
            from cupid_engine.sim.scenarios import LABEL_KEY

            bad = sc.known_bad
            return {e.episode_id: 0.0 if e.metadata.get(LABEL_KEY) == bad else 1.0 for e in self.episodes()}
        if method == "oracle":
            rank = {"better": 2.0, "okay": 1.0, "worse": 0.0}
            return {e.episode_id: rank.get(e.tier or "", 1.0) for e in self.episodes()}
        if method not in STORE_METHODS:
            raise ValueError(f"the sim learner cannot score {method!r}; choose from {STORE_METHODS + ('loss', 'oracle')}")
        if method in ("tracin", "trak-traj"):
            raise ValueError(
                f"{method!r} needs several checkpoints / trajectory features that this learner does not save; "
                "use cupid, cupid-quality, qoq, loss or length"
            )
        store = self._store(Path(model_dir), seed)
        opts = {"validation": "failed-rollouts"} if method == "qoq" else {}
        table = ce.score(method, store=str(store), run="base", **opts)
        return dict(zip(table.column("episode_id").to_pylist(), table.column("score").to_pylist()))

    # -- evaluation ---------------------------------------------------------------------
    def evaluation_rollouts(self, model_dir: Path, seed: int, rollouts: int) -> list:
        """The evaluation rollouts behind :meth:`evaluate`, with their metadata (e.g. context).

        Deterministic in ``(model_dir, seed, rollouts)``: the same initial states and shift
        for every condition of a seed, so a later look at them (success per context)
        reproduces the audit's success rate exactly.
        """
        from cupid_engine.distributed import executor_for
        from cupid_engine.sim import run_rollouts

        return run_rollouts(
            str(Path(model_dir) / "policy"), self.task, episodes=int(rollouts), seed=seed * _SEED_STRIDE + 5,
            executor=executor_for(int(self.options.get("rollout_workers", 1))),
            **self._rollout_options(),
        )

    def evaluate(self, model_dir: Path, seed: int, rollouts: int) -> float:
        eps = self.evaluation_rollouts(model_dir, seed, rollouts)
        return float(np.mean([bool(e.success) for e in eps]))


def make_learner(config: Any) -> SimLearner:
    """Entry point used by ``cupid-engine audit --learner sim``."""
    return SimLearner(config)
