"""An in-memory gradient store over numpy arrays.

:class:`ArrayStore` / :class:`ArrayRun` implement the read API of
:class:`cupid_engine.store.GradientStore` that the scorers and the index use
(``catalog()``, ``run(name)``, ``episode_features``, ``iter_episode_features``,
``step_features``, ``gram``, ``gram_count``, ``k``, ``config``). They exist so that
features that never touched disk (tests, benchmarks, notebooks) can be scored by
exactly the same adapters as a Zarr store, and so that the scorers' math is testable
while the store evolves. The Gram is accumulated in float64 over the training split
only, as the real store does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from cupid_engine.config import Config, check, field, names_tuple
from cupid_engine.constants import SPLITS


@dataclasses.dataclass(frozen=True)
class ArrayRunConfig(Config):
    """Description of an in-memory run (mirrors the fields of the store's RunConfig)."""

    k: int = field(help="feature dimension")
    gram_splits: tuple[str, ...] = field(("train",), help="splits whose steps enter the Gram")
    featurizer: dict = field(default_factory=dict, help="JSON-safe featuriser description")

    def __post_init__(self) -> None:
        check(self.k > 0, f"k must be positive, got {self.k}")
        object.__setattr__(self, "gram_splits", names_tuple(self.gram_splits, "gram_splits"))
        for s in self.gram_splits:
            check(s in SPLITS, f"gram_splits entry {s!r} is not one of {SPLITS}")


class ArrayRun:
    """One run: per-step features of every catalogued episode.

    Args:
        name: Run name.
        steps: Episode id -> ``[T, K]`` step features.
        catalog: The store catalog (``episode_id``, ``split``, ...).
        gram_splits: Splits whose steps enter the Gram (the store's default: train).
        featurizer: JSON-safe featuriser description (recorded in ``config``).
        dtype: Feature dtype: float32 like the store, or float64 for exact tests.
    """

    def __init__(
        self,
        name: str,
        steps: Mapping[str, np.ndarray],
        catalog: pa.Table,
        *,
        gram_splits: Sequence[str] = ("train",),
        featurizer: Mapping[str, Any] | None = None,
        dtype: Any = np.float32,
    ) -> None:
        if not steps:
            raise ValueError("an ArrayRun needs at least one episode")
        self.name = name
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self._steps = {str(k): np.ascontiguousarray(v, dtype=self.dtype) for k, v in steps.items()}
        dims = {v.shape[1] for v in self._steps.values()}
        if len(dims) != 1:
            raise ValueError(f"step features have mixed widths {sorted(dims)}")
        for eid, v in self._steps.items():
            if v.ndim != 2 or v.shape[0] == 0:
                raise ValueError(f"episode {eid!r}: step features must be [T>0, K], got {v.shape}")
        self.k = dims.pop()
        self.config = ArrayRunConfig(
            k=self.k, gram_splits=tuple(gram_splits), featurizer=dict(featurizer or {})
        )
        split = dict(zip(catalog.column("episode_id").to_pylist(), catalog.column("split").to_pylist()))
        self._order = [e for e in catalog.column("episode_id").to_pylist() if e in self._steps]
        gram = np.zeros((self.k, self.k), np.float64)
        count = 0
        for eid in self._order:
            if split[eid] in self.config.gram_splits:
                x = self._steps[eid].astype(np.float64)
                gram += x.T @ x
                count += x.shape[0]
        self._gram, self.gram_count = gram, count

    def gram(self) -> np.ndarray:
        """``[K, K]`` float64 sum of φφᵀ over the steps of ``gram_splits``."""
        return self._gram.copy()

    def step_features(self, episode_id: str) -> np.ndarray:
        """``[T, K]`` step features of one episode (float32 unless built as float64)."""
        try:
            return self._steps[str(episode_id)]
        except KeyError:
            raise KeyError(f"episode {episode_id!r} is not in run {self.name!r}") from None

    def episode_features(self, ids: Sequence[str] | None = None) -> np.ndarray:
        """``[E, K]`` per-episode sums of step features (catalog order if ids is None)."""
        ids = self._order if ids is None else [str(i) for i in ids]
        out = np.empty((len(ids), self.k), self.dtype)
        for r, eid in enumerate(ids):
            out[r] = self.step_features(eid).sum(0, dtype=np.float64)
        return out

    def iter_episode_features(
        self, block: int = 4096, ids: Sequence[str] | None = None
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield ``(ids, [b, K])`` blocks of per-episode sums."""
        ids = self._order if ids is None else [str(i) for i in ids]
        for start in range(0, len(ids), block):
            chunk = list(ids[start : start + block])
            yield chunk, self.episode_features(chunk)


class ArrayStore:
    """A store of in-memory runs sharing one catalog.

    Args:
        catalog: ``episode_id``, ``split`` and optionally ``length``, ``success``,
            ``return``, ``tier``, ``source``, ``task``, ``metadata`` columns.
        runs: Run name -> :class:`ArrayRun`.
        path: Optional folder where the index may be saved (None: indexes stay in memory).
    """

    def __init__(self, catalog: pa.Table, runs: Mapping[str, ArrayRun], *, path: str | None = None) -> None:
        self._catalog = catalog
        self._runs = dict(runs)
        self.path = path

    def catalog(self) -> pa.Table:
        return self._catalog

    def run(self, name: str) -> ArrayRun:
        try:
            return self._runs[name]
        except KeyError:
            raise KeyError(f"no run {name!r}; runs: {sorted(self._runs)}") from None

    @classmethod
    def from_episodes(
        cls,
        steps: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
        splits: Mapping[str, str],
        *,
        success: Mapping[str, bool] | None = None,
        returns: Mapping[str, float] | None = None,
        tiers: Mapping[str, str] | None = None,
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
        run_names: Sequence[str] | None = None,
        path: str | None = None,
        dtype: Any = np.float32,
    ) -> "ArrayStore":
        """Build a store from step features (one mapping per run) and per-episode labels."""
        runs_steps = [steps] if isinstance(steps, Mapping) else list(steps)
        names = list(run_names) if run_names is not None else (
            ["base"] if len(runs_steps) == 1 else [f"ckpt{i}" for i in range(len(runs_steps))]
        )
        ids = list(runs_steps[0])
        succ = [None if success is None else bool(success.get(e, False)) if e in success else None for e in ids]
        rets = [None if returns is None or e not in returns else float(returns[e]) for e in ids]
        catalog = pa.table(
            {
                "episode_id": ids,
                "split": [splits[e] for e in ids],
                "length": [int(runs_steps[0][e].shape[0]) for e in ids],
                "success": pa.array(succ, pa.bool_()),
                "return": pa.array(rets, pa.float64()),
                "tier": pa.array([None if tiers is None else tiers.get(e) for e in ids], pa.string()),
                "metadata": [json.dumps(dict((metadata or {}).get(e, {}))) for e in ids],
            }
        )
        runs = {n: ArrayRun(n, s, catalog, dtype=dtype) for n, s in zip(names, runs_steps)}
        return cls(catalog, runs, path=path)
