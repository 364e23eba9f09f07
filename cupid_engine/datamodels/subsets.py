"""Subset orchestration for datamodel estimators: masks, subset trainings, their cache.

A datamodel sample is one training on a subset of clusters (a ``[C]`` bool mask) and the
metric of the trained policy. This module draws the masks (:func:`sample_masks`,
:func:`fraction_masks`, :func:`masks_from_ids`), trains on them (:class:`SubsetTrainer`)
and runs many of them (:func:`evaluate_subsets`), reusing the on-disk cache.

Trainings are the cost, so they are cached on disk (:class:`SubsetCache`): one small JSON
file per finished training, named by the sha256 of (trainer fingerprint, mask), written
to a temporary file and renamed into place (atomic on POSIX), so a killed run leaves only
complete entries and a restarted run trains only the missing masks. The fingerprint
covers the policy and training configs, the training data, the clusters and the metric,
so a cache folder can never serve a result of another setup.

Trainings run on the executor the caller gives (``cupid_engine.executor``: in this
process by default, Ray actors with ``cupid_engine.distributed.RayExecutor``); the subset
function is pickled to out-of-process workers (configs, samples, clusters and the metric:
trained models never cross processes). A training depends only on its mask and the
seeded configs, so the schedule never changes the numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from cupid_engine.datamodels.clusters import Clusters
from cupid_engine.datamodels.metrics import ProxyMetric, metric_values
from cupid_engine.executor import Executor, InProcess
from cupid_engine.policies.base import PolicyConfig
from cupid_engine.policies.normalizer import Normalizer
from cupid_engine.policies.samples import SampleSet
from cupid_engine.policies.training import TrainConfig, train_policy

log = logging.getLogger(__name__)

CACHE_SCHEMA = 1


# -- masks ----------------------------------------------------------------------------
def sample_masks(num_clusters: int, num_subsets: int, *, p: float = 0.5, seed: int = 0) -> np.ndarray:
    """Bernoulli(p) subset masks, ``[S, C]`` bool; an all-empty mask is redrawn (a policy
    needs data), so row j depends only on (seed, j)."""
    out = np.zeros((num_subsets, num_clusters), dtype=bool)
    for j in range(num_subsets):
        rng = np.random.default_rng([seed, j])
        row = rng.random(num_clusters) < p
        while not row.any():
            row = rng.random(num_clusters) < p
        out[j] = row
    return out


def fraction_masks(num_items: int, num_subsets: int, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Masks keeping exactly ``round(fraction·n)`` (>= 1) items each, ``[S, n]`` bool (LDS subsets)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * num_items)))
    out = np.zeros((num_subsets, num_items), dtype=bool)
    for j in range(num_subsets):
        out[j, np.random.default_rng([seed, j]).choice(num_items, size=k, replace=False)] = True
    return out


# -- trainings ------------------------------------------------------------------------
class SubsetFunction(Protocol):
    """What the estimator evaluates: ``fn(mask [C] bool) -> metric value(s)``, picklable for
    Ray, with a ``fingerprint()`` naming everything the value depends on."""

    def __call__(self, mask: np.ndarray) -> Any: ...

    def fingerprint(self) -> str: ...


def _tensor_digest(h: Any, t: torch.Tensor | np.ndarray) -> None:
    arr = t.numpy() if isinstance(t, torch.Tensor) else t
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())


class SubsetTrainer:
    """Train a policy on the clusters of a mask and return the metric: one datamodel sample.

    Every subset gets the identical budget (the same TrainConfig: seed, steps or epochs,
    batch size); excluded clusters get weight 0, which :func:`train_policy` drops before
    the data order, so the run equals training on the subset. By default every subset
    policy uses the normaliser fitted once on *all* training samples
    (``full_normalizer``): refitting it per subset changes the input and target scaling
    from one subset to the next, a source of variation in the measured metric that no
    additive datamodel can explain (noise in datamodels and LDS).

    Args:
        policy_config: Policy to train.
        samples: All training samples ``[N]``.
        clusters: Cluster of each sample.
        train_config: Training settings shared by every subset; ``steps`` must be set
            (with ``epochs`` a smaller subset would get fewer updates).
        metric: ``metric(policy) -> float | [n_targets]`` with a ``fingerprint()``
            (:class:`~cupid_engine.datamodels.metrics.ProxyMetric`, RolloutMetric).
            A ProxyMetric without ``action_scale`` is bound to the action scale of the
            normaliser fitted on *all* training samples, so every subset policy (each
            with its own normaliser) is measured in the same units.
        reference_units: Bind that fixed scale (default True); False measures each
            policy in its own normalised space.
        fixed_clusters: Trailing cluster ids that every subset includes (not scored):
            e.g. half of the target demonstrations mixed into training (DataMIL §4.2).
            Masks then cover only the first ``C - len(fixed_clusters)`` clusters.
        full_normalizer: Train every subset with the normaliser fitted on all
            ``samples`` (default True); False refits it on each subset's samples.
    """

    def __init__(self, policy_config: PolicyConfig, samples: SampleSet, clusters: Clusters,
                 train_config: TrainConfig, metric: Callable[[Any], Any], *, reference_units: bool = True,
                 fixed_clusters: int = 0, full_normalizer: bool = True) -> None:
        if len(clusters.ids) != len(samples):
            raise ValueError(f"clusters cover {len(clusters.ids)} samples, the SampleSet has {len(samples)}")
        if train_config.steps is None:
            # With epochs, a smaller subset would get fewer updates: budgets would differ.
            raise ValueError("set TrainConfig.steps: every subset must get the same number of updates")
        self.policy_config = policy_config
        self.samples = samples
        self.clusters = clusters
        self.train_config = train_config
        ref = Normalizer(samples.obs_dim, samples.action_dim,
                         mode=policy_config.normalizer_mode, min_spread=policy_config.normalizer_min_spread)
        ref.fit(samples.obs, samples.action)
        self.normalizer = ref if full_normalizer else None
        if reference_units and isinstance(metric, ProxyMetric) and metric.action_scale is None:
            metric = metric.with_action_scale(ref.action_scale.double())
        self.metric = metric
        if not 0 <= fixed_clusters < clusters.num_clusters:
            raise ValueError(f"fixed_clusters must be in [0, {clusters.num_clusters}), got {fixed_clusters}")
        self.fixed_clusters = int(fixed_clusters)
        self._fingerprint: str | None = None

    @property
    def num_clusters(self) -> int:
        """Clusters a mask covers (the scored ones; fixed clusters are always in)."""
        return self.clusters.num_clusters - self.fixed_clusters

    def fingerprint(self) -> str:
        """sha256 over configs, training data, clusters and metric (the cache namespace)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.policy_config.to_json().encode())
            h.update(self.train_config.to_json().encode())
            for t in (self.samples.obs, self.samples.action, self.samples.episode_key, self.samples.step):
                _tensor_digest(h, t)
            _tensor_digest(h, self.clusters.ids)
            h.update(f"fixed:{self.fixed_clusters}".encode())
            if self.normalizer is not None:  # absent for per-subset fits: older cache keys stay valid
                h.update(b"full-normalizer")
            fp = getattr(self.metric, "fingerprint", None)
            if fp is None:
                raise TypeError("the metric needs a fingerprint() for the subset cache")
            h.update(fp().encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.num_clusters,):
            raise ValueError(f"mask must be [C={self.num_clusters}], got {mask.shape}")
        if not mask.any():
            raise ValueError("an empty subset: no cluster to train on")
        weights = np.concatenate([mask.astype(np.float64), np.ones(self.fixed_clusters)])
        policy = train_policy(self.policy_config, self.samples, self.train_config,
                              cluster_weights=weights, clusters=self.clusters.ids, normalizer=self.normalizer,
                              progress=False)
        return metric_values(self.metric, policy)

    def __getstate__(self) -> dict:
        # Ray pickles the trainer once per actor; the fingerprint is cheap to carry.
        self.fingerprint()
        return self.__dict__


class SubsetCache:
    """Finished trainings on disk: ``<root>/<fingerprint>/<sha256(mask)>.json``.

    Args:
        root: Cache folder (created).
        fingerprint: Namespace: the subset function's fingerprint.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str) -> None:
        self.dir = os.path.join(os.fspath(root), fingerprint)
        os.makedirs(self.dir, exist_ok=True)

    @staticmethod
    def key(mask: np.ndarray) -> str:
        m = np.asarray(mask, dtype=bool)
        return hashlib.sha256(str(m.shape[0]).encode() + np.packbits(m).tobytes()).hexdigest()[:40]

    def _path(self, mask: np.ndarray) -> str:
        return os.path.join(self.dir, self.key(mask) + ".json")

    def get(self, mask: np.ndarray) -> np.ndarray | None:
        """The cached value ``[n_targets]`` float64, or None when not finished."""
        path = self._path(mask)
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as err:  # never written by put(): report, retrain
            log.warning("ignoring unreadable cache entry %s: %s", path, err)
            return None
        if entry.get("schema") != CACHE_SCHEMA or entry.get("mask") != np.flatnonzero(mask).tolist():
            log.warning("ignoring cache entry %s: it belongs to another mask or schema", path)
            return None
        return np.asarray(entry["value"], dtype=np.float64)

    def put(self, mask: np.ndarray, value: np.ndarray) -> None:
        """Write one finished training atomically (temp file + rename)."""
        entry = {"schema": CACHE_SCHEMA, "mask": np.flatnonzero(np.asarray(mask, bool)).tolist(),
                 "value": [float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1)]}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(mask))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def __len__(self) -> int:
        return sum(1 for n in os.listdir(self.dir) if n.endswith(".json") and not n.startswith("."))


class _SubsetWorker:
    """One executor worker: holds the subset function and the masks, evaluates one mask
    index per item (``mask [C] -> value [n_targets]`` float64)."""

    def __init__(self, fn: SubsetFunction, masks: list[np.ndarray], threads: int | None) -> None:
        if threads is not None:
            # Several workers share the machine's cores: one intra-op pool each avoids
            # oversubscription (tiny models slow down badly with contended threads).
            torch.set_num_threads(int(threads))
        self.fn, self.masks = fn, masks

    def __call__(self, index: int) -> np.ndarray:
        return np.atleast_1d(np.asarray(self.fn(self.masks[index]), dtype=np.float64)).reshape(-1)


def evaluate_subsets(
    fn: SubsetFunction,
    masks: np.ndarray,
    *,
    cache_dir: str | os.PathLike | None = None,
    executor: Executor | None = None,
    threads_per_worker: int = 1,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """Evaluate ``fn`` on every mask, reusing and filling the on-disk cache.

    Args:
        fn: The subset function (e.g. :class:`SubsetTrainer`); picklable for an executor
            out of this process.
        masks: ``[S, C]`` bool masks.
        cache_dir: Cache folder; None disables caching.
        executor: Where the trainings run (default :class:`~cupid_engine.executor.InProcess`;
            ``cupid_engine.distributed.executor_for(W, address)`` for W Ray actors).
        threads_per_worker: torch intra-op threads of each out-of-process worker (this
            process's setting is left alone).
        progress: tqdm bar.

    Returns:
        ``values [S, n_targets]`` float64 and ``info``: ``trained`` (trainings run now)
        and ``cached`` (distinct masks found in the cache); equal masks are trained once.
    """
    masks = np.asarray(masks, dtype=bool)
    executor = executor or InProcess()
    cache = SubsetCache(cache_dir, fn.fingerprint()) if cache_dir is not None else None
    results: list[np.ndarray | None] = [None] * len(masks)
    # Equal masks are one training (Bernoulli masks over few clusters repeat).
    first: dict[str, int] = {}
    copies: dict[int, list[int]] = {}
    for j, m in enumerate(masks):
        k = SubsetCache.key(m)
        if k in first:
            copies[first[k]].append(j)
        else:
            first[k] = j
            copies[j] = [j]
    todo = []
    for j in copies:
        hit = cache.get(masks[j]) if cache is not None else None
        if hit is not None:
            for i in copies[j]:
                results[i] = hit
        else:
            todo.append(j)
    cached = len(copies) - len(todo)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="subset trainings", unit="run", disable=not progress, leave=False)

    def done(i: int, value: np.ndarray) -> None:
        j = todo[i]
        for k in copies[j]:
            results[k] = value
        if cache is not None:
            cache.put(masks[j], value)  # as soon as it exists: a kill loses at most running trainings
        bar.update(1)

    threads = None if executor.in_process else threads_per_worker
    factory = functools.partial(_SubsetWorker, fn, [masks[j] for j in todo], threads)
    try:
        executor.map(factory, list(range(len(todo))), on_result=done)
    finally:
        bar.close()
    values = np.stack([r for r in results if r is not None])
    if values.shape[0] != len(masks):
        raise RuntimeError("some subset trainings returned no value")
    log.info("subset trainings: %d trained, %d from cache", len(todo), cached)
    return values, {"trained": len(todo), "cached": cached}


def masks_from_ids(subsets: Sequence[Sequence[str]], ids: Sequence[str]) -> np.ndarray:
    """Lists of included ids -> ``[S, len(ids)]`` bool masks; unknown ids raise."""
    index = {i: k for k, i in enumerate(ids)}
    out = np.zeros((len(subsets), len(ids)), dtype=bool)
    for j, sub in enumerate(subsets):
        for i in sub:
            if i not in index:
                raise ValueError(f"subset {j} names unknown id {i!r}")
            out[j, index[i]] = True
    return out
