"""Score tables of several methods from one dataset, for a side-by-side LDS.

``cupid-engine eval lds --methods cupid,trak-traj,tracin,datamodel,random`` needs each
method's scores of the same training demonstrations against the same target
demonstrations. :func:`method_score_tables` produces them from a dataset alone:

1. **Base training** on all training demos with the LDS training budget, with ``C``
   checkpoints at steps ``round(c·T/C)``. Training is deterministic (seeded init, data
   order and noise; no schedule depends on the total), so the checkpoint at step ``t``
   is the run trained for ``t`` steps: a prefix of the full run.
2. **Features** in a gradient store (``featurize``) of the training and target demos:
   the ``loss`` output at every checkpoint (projection seed 0) for CUPID and TracIn, and
   the label-agnostic ``energy`` output at every checkpoint for each TRAK-Traj
   projection seed (0, 97, 211 by default).
3. **Scores** with the engine's scorers:

   * ``cupid``: Ψ_π with the target demonstrations as the successful "rollouts"
     (R = +1): ``s_ξᵀ u`` with ``u`` the whitened target sum, i.e. the influence of a
     demo on the target BC loss, which is what the proxy metric M̂ measures (final
     checkpoint, its own preconditioner);
   * ``tracin``: Σ_c η_c s_ξ^c · φ̄_c(target) over the ``C`` checkpoints;
   * ``trak-traj``: one feature per trajectory, the mean of the per-step ``energy``
     features over 16 deterministically sampled transitions (projection is linear, so
     this is the projection of the mean gradient), ridge-whitened against the target
     mean per checkpoint, averaged over checkpoints, rank-ensembled over seeds;
   * ``datamodel``: the regression (or metagradient) estimator on its *own* subsets
     (Bernoulli masks with another seed than the LDS subsets: a datamodel must not be
     evaluated on its training subsets);
   * ``random``: a seeded hash per episode.

Everything lands under ``workdir/<fingerprint>/`` (checkpoints, store, score tables),
keyed by the data, the policy and training configs and these options, so a rerun reuses
it and a different setup never does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cupid_engine.config import Config, check, field
from cupid_engine.data.episode import Episode
from cupid_engine.policies.base import PolicyConfig
from cupid_engine.policies.training import TrainConfig

log = logging.getLogger(__name__)

LDS_METHODS = ("cupid", "trak-traj", "tracin", "datamodel", "random")
"""Methods :func:`method_score_tables` computes, in the order the LDS table lists them."""


@dataclasses.dataclass(frozen=True)
class CompareConfig(Config):
    """How each method's scores are computed for the comparison."""

    checkpoints: int = field(3, help="base-training checkpoints C (TracIn and TRAK-Traj use all; CUPID the last)")
    k: int = field(512, help="projection dimension of the features")
    projection: str = field("tensorsketch", help="projection method of the features")
    loss_output: str = field("loss", help="output function of the CUPID and TracIn features")
    trak_output: str = field("energy", help="output function of the TRAK-Traj features (label-agnostic)")
    trak_seeds: tuple[int, ...] = field((0, 97, 211), help="TRAK-Traj projection seeds (ensemble members)")
    trak_transitions: int = field(16, help="TRAK-Traj: transitions sampled per trajectory")
    damping: float = field(1e-3, help="relative damping of the CUPID preconditioner")
    trak_ridge: float = field(1e-3, help="TRAK-Traj relative ridge λ")
    datamodel_estimator: str = field("regression", help="datamodel estimator: regression or metagradient")
    datamodel_subsets: int = field(32, help="datamodel regression: subset trainings of the estimator")
    datamodel_ridge: float = field(0.0, help="datamodel regression: ridge penalty")
    datamodel_seed_offset: int = field(1, help="datamodel masks use seed + this (never the LDS subsets)")
    random_seed: int = field(0, help="seed of the random baseline")

    def __post_init__(self) -> None:
        object.__setattr__(self, "trak_seeds", tuple(int(s) for s in self.trak_seeds))
        check(self.checkpoints >= 1, "checkpoints must be >= 1")
        check(self.k >= 1, "k must be >= 1")
        check(len(self.trak_seeds) >= 1, "trak_seeds must name at least one projection seed")
        check(self.trak_transitions >= 1, "trak_transitions must be >= 1")
        check(self.datamodel_subsets >= 2, "datamodel_subsets must be >= 2")
        check(self.datamodel_estimator in ("regression", "metagradient"),
              f"datamodel_estimator must be regression or metagradient, got {self.datamodel_estimator!r}")
        check(self.datamodel_seed_offset != 0, "datamodel_seed_offset must be != 0 (LDS subsets use the seed)")


def checkpoint_steps(total: int, count: int) -> list[int]:
    """Steps of ``count`` evenly spaced checkpoints ending at ``total`` (distinct, >= 1)."""
    return sorted({max(1, round(c * total / count)) for c in range(1, count + 1)})


def sampled_steps(episode_id: str, length: int, count: int) -> np.ndarray:
    """``min(count, length)`` distinct steps of an episode, a deterministic function of its id."""
    seed = int.from_bytes(hashlib.sha256(f"trak-traj\x00{episode_id}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(length, size=min(count, length), replace=False))


def trajectory_features(run: Any, ids: Sequence[str], transitions: int) -> np.ndarray:
    """``[N, K]`` mean per-step feature over each episode's sampled transitions (TRAK-Traj φ_i)."""
    out = []
    for e in ids:
        steps = np.asarray(run.step_features(e), np.float64)
        out.append(steps[sampled_steps(e, len(steps), transitions)].mean(0))
    return np.stack(out)


def _fingerprint(train: Sequence[Episode], target: Sequence[Episode], policy_config: PolicyConfig,
                 train_config: TrainConfig, config: CompareConfig, seed: int) -> str:
    h = hashlib.sha256()
    for part in (policy_config.to_json(), train_config.to_json(), config.to_json(), str(seed)):
        h.update(part.encode())
    for role, eps in (("train", train), ("target", target)):
        for ep in eps:
            h.update(f"{role}:{ep.episode_id}".encode())
            for k in sorted(ep.observations):
                h.update(k.encode() + np.ascontiguousarray(ep.observations[k]).tobytes())
            h.update(np.ascontiguousarray(ep.actions).tobytes())
    return h.hexdigest()[:16]


def _base_checkpoints(policy_config: PolicyConfig, train: Sequence[Episode], train_config: TrainConfig,
                      steps: list[int], folder: Path, progress: bool) -> list[Path]:
    from cupid_engine.policies import load_policy, save_policy, train_policy

    paths = []
    for t in steps:
        path = folder / f"step_{t:07d}"
        try:
            load_policy(path)  # a cached checkpoint, its content hash verified
        except (OSError, ValueError) as err:
            if path.exists():
                log.warning("retraining checkpoint %s: %s", path, err)
            policy = train_policy(policy_config, list(train), dataclasses.replace(train_config, steps=t),
                                  progress=progress)
            save_policy(policy, path, overwrite=True)
        paths.append(path)
    return paths


def method_score_tables(
    methods: Sequence[str],
    train: Sequence[Episode],
    target: Sequence[Episode],
    policy_config: PolicyConfig,
    train_config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    config: CompareConfig | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 1,
    address: str | None = None,
    metric: Any = None,
    progress: bool = False,
) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Compute each method's score table of ``train`` against ``target`` (see module doc).

    Args:
        methods: Names from :data:`LDS_METHODS`.
        train: Training demonstrations (scored; the base policy trains on all of them).
        target: Target demonstrations (held out; the direction of every influence score).
        policy_config: Policy of the base training (and of the datamodel's trainings).
        train_config: Training budget (``steps`` set), the LDS subsets' budget too.
        workdir: Folder of checkpoints, store and tables (a fingerprinted subfolder).
        config: :class:`CompareConfig`.
        seed: The LDS seed; the datamodel's masks use ``seed + datamodel_seed_offset``.
        cache_dir: Subset-training cache of the datamodel estimator.
        workers: Parallel datamodel trainings (> 1: Ray actors).
        address: Ray cluster address.
        metric: The LDS metric when not the proxy (e.g. a rollout success rate): the
            regression datamodel is then fitted to it too (the metagradient estimator
            needs the differentiable proxy and refuses).
        progress: tqdm bars.

    Returns:
        ``(tables, info)``: method -> score table (rows in ``train`` order), and details
        (``folder``, checkpoint steps, datamodel trainings).
    """
    cfg = config or CompareConfig()
    unknown = [m for m in methods if m not in LDS_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {LDS_METHODS}")
    if train_config.steps is None:
        raise ValueError("set TrainConfig.steps (the checkpoints are steps of the base training)")
    train, target = list(train), list(target)
    ids = [e.episode_id for e in train]
    clash = set(ids) & {e.episode_id for e in target}
    if clash:
        raise ValueError(f"episodes both in train and target: {sorted(clash)[:5]}")
    folder = Path(workdir) / _fingerprint(train, target, policy_config, train_config, cfg, seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(
        {"compare": cfg.to_dict(), "policy": policy_config.to_dict(), "train": train_config.to_dict(), "seed": seed,
         "train_ids": ids, "target_ids": [e.episode_id for e in target]}, indent=2, default=str))
    tables: dict[str, pa.Table] = {}
    info: dict[str, Any] = {"folder": str(folder)}
    store_methods = [m for m in methods if m in ("cupid", "tracin", "trak-traj")]
    if store_methods:
        tables.update(_store_scores(store_methods, train, target, policy_config, train_config, cfg, folder, info,
                                    progress))
    if "datamodel" in methods:
        from cupid_engine.datamodels.regression import RegressionConfig
        from cupid_engine.datamodels.scorer import datamodel_scores

        reg = RegressionConfig(num_subsets=cfg.datamodel_subsets, seed=seed + cfg.datamodel_seed_offset,
                               ridge=cfg.datamodel_ridge, workers=workers, address=address,
                               cache_dir=None if cache_dir is None else os.fspath(cache_dir))
        table = datamodel_scores(train, target, policy_config, train_config, estimator=cfg.datamodel_estimator,
                                 regression=reg, metric=metric, config=cfg, progress=progress)
        tables["datamodel"] = table
        info["datamodel_subsets"] = cfg.datamodel_subsets if cfg.datamodel_estimator == "regression" else 0
    if "random" in methods:
        from cupid_engine.scorers.baselines import random_scores
        from cupid_engine.scorers.table import make_table

        tables["random"] = make_table(ids, random_scores(ids, cfg.random_seed), method="random", config=cfg)
    from cupid_engine.scorers.table import write_table

    (folder / "scores").mkdir(exist_ok=True)
    for name, table in tables.items():
        write_table(table, folder / "scores" / f"{name}.parquet")
    return {m: tables[m] for m in methods}, info


def _store_scores(methods: list[str], train: list[Episode], target: list[Episode], policy_config: PolicyConfig,
                  train_config: TrainConfig, cfg: CompareConfig, folder: Path, info: dict,
                  progress: bool) -> dict[str, pa.Table]:
    from cupid_engine.data import open_source, write_dataset
    from cupid_engine.featurize import FeaturizeConfig, featurize
    from cupid_engine.policies import load_policy
    from cupid_engine.scorers import _inputs
    from cupid_engine.scorers.cupid import CupidScorer
    from cupid_engine.scorers.table import make_table
    from cupid_engine.scorers.tracin import TracInScorer
    from cupid_engine.scorers.trak_traj import trak_traj_scores
    from cupid_engine.store import GradientStore

    steps = checkpoint_steps(int(train_config.steps), cfg.checkpoints)
    info["checkpoint_steps"] = steps
    ckpts = _base_checkpoints(policy_config, train, train_config, steps, folder / "checkpoints", progress)
    data = folder / "data"
    if not (data / "meta" / "info.json").exists():
        # The store's catalog takes the splits from the data: train, and target for the targets.
        write_dataset(data, [dataclasses.replace(e, split="train") for e in train]
                      + [dataclasses.replace(e, split="target") for e in target], overwrite=True)
    store_path = folder / "store.zarr"
    store = GradientStore.open(str(store_path), mode="a") if store_path.exists() else GradientStore.create(
        str(store_path))
    source = open_source(str(data))

    def features(run: str, policy: Any, output: str, proj_seed: int) -> None:
        fcfg = FeaturizeConfig.for_method(cfg.projection, k=cfg.k, seed=proj_seed, output=output, dtype="float32")
        featurize(source, store, run, policy=policy, config=fcfg, progress=progress)

    policies = [load_policy(p) for p in ckpts]
    loss_runs = [f"{cfg.loss_output}-c{t}" for t in steps]
    if "cupid" in methods or "tracin" in methods:
        for run, policy in zip(loss_runs, policies):
            features(run, policy, cfg.loss_output, 0)
    trak_runs = [[f"{cfg.trak_output}-s{s}-c{t}" for t in steps] for s in cfg.trak_seeds]
    if "trak-traj" in methods:
        for seed_runs, s in zip(trak_runs, cfg.trak_seeds):
            for run, policy in zip(seed_runs, policies):
                features(run, policy, cfg.trak_output, s)
    ids = [e.episode_id for e in train]
    target_ids = [e.episode_id for e in target]
    catalog = store.catalog(refresh=True)
    splits, meta = _inputs.metadata_columns(catalog, ids)
    out: dict[str, pa.Table] = {}
    if "cupid" in methods:
        # The target demonstrations are the successful "rollouts" (R = +1) that define the goal.
        _check_target_success(catalog, target_ids)
        scorer = CupidScorer(rollouts="target", episodes="train", returns="pm1", damping=cfg.damping)
        out["cupid"] = scorer.score(store, loss_runs[-1])
    if "tracin" in methods:
        lr = float(train_config.lr)
        out["tracin"] = TracInScorer(checkpoints=tuple(loss_runs), learning_rates=(lr,) * len(loss_runs),
                                     target="target", episodes="train").score(store, loss_runs[-1])
    if "trak-traj" in methods:
        members = [[(trajectory_features(store.run(r), ids, cfg.trak_transitions),
                     trajectory_features(store.run(r), target_ids, cfg.trak_transitions)) for r in seed_runs]
                   for seed_runs in trak_runs]
        scores = trak_traj_scores(members, ridge=cfg.trak_ridge)
        out["trak-traj"] = make_table(ids, scores, method="trak-traj", splits=splits, config=cfg, metadata=meta)
    return out


def _check_target_success(catalog: pa.Table, target_ids: Sequence[str]) -> None:
    """CUPID reads R(τ) from the catalog's ``success``: targets must be labelled successful."""
    from cupid_engine.scorers import _inputs

    rows = _inputs.catalog_dict(catalog)
    bad = [e for e in target_ids if rows[e].get("success") is not True]
    if bad:
        raise ValueError(f"CUPID uses the target demonstrations as successful rollouts, but {len(bad)} are not "
                         f"labelled success=True (e.g. {bad[:3]}); choose successful targets")
