"""A synthetic episode source generated on the fly: for pipeline benchmarks and tests.

:class:`SyntheticSource` implements ``data.EpisodeSource`` without any file: episode i is
a pure function of ``(seed, i)`` (its own ``numpy`` generator), so a million-episode
dataset costs no disk and no memory, any worker regenerates exactly the same episode, and
features computed from it are reproducible bit for bit. Units (``shards()``) are
``"start:stop"`` ranges of ``episodes_per_unit`` episodes, as the robomimic and replay
readers use, so the store's shard plan aligns with them.

It also offers two cheap look-ups real readers lack: :meth:`unit_catalog` (episode rows of
one unit without building the whole catalog) and :meth:`unit_of` (the unit holding an
episode id). The featurisation pipeline uses them when present.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from cupid_engine.data.episode import Episode
from cupid_engine.data.schema import EPISODE_SCHEMA

__all__ = ["SyntheticSource"]


class SyntheticSource:
    """Deterministic random-walk episodes.

    Args:
        num_episodes: Number of episodes N.
        steps: Steps per episode (or ``(min, max)`` for lengths drawn per episode).
        obs_dim: Width of the single observation key ``state``.
        action_dim: Action width.
        seed: Dataset seed.
        episodes_per_unit: Episodes per natural unit (``shards()``).
        holdout_every: Every n-th episode is in split ``holdout`` (0: none).
        rollout_every: Every n-th episode is a ``rollout`` with a deterministic success
            label (0: none); takes precedence over ``holdout_every``.
    """

    def __init__(
        self,
        num_episodes: int,
        *,
        steps: int | tuple[int, int] = 10,
        obs_dim: int = 16,
        action_dim: int = 4,
        seed: int = 0,
        episodes_per_unit: int = 1000,
        holdout_every: int = 10,
        rollout_every: int = 0,
    ) -> None:
        if num_episodes < 1 or episodes_per_unit < 1 or obs_dim < 1 or action_dim < 1:
            raise ValueError("num_episodes, episodes_per_unit, obs_dim and action_dim must be >= 1")
        lo, hi = (steps, steps) if isinstance(steps, int) else (int(steps[0]), int(steps[1]))
        if not 1 <= lo <= hi:
            raise ValueError(f"steps must be >= 1 (or a (min, max) range), got {steps!r}")
        self.num_episodes = int(num_episodes)
        self.steps = (lo, hi)
        self.obs_dim = int(obs_dim)
        self._action_dim = int(action_dim)
        self.seed = int(seed)
        self.episodes_per_unit = int(episodes_per_unit)
        self.holdout_every = int(holdout_every)
        self.rollout_every = int(rollout_every)
        self._catalog: pa.Table | None = None
        # The state -> action map is shared by all episodes: drawn once from (seed, 2**31).
        self._w = np.random.default_rng((self.seed, 2**31)).standard_normal(
            (self.obs_dim, self._action_dim), dtype=np.float32
        ) / np.float32(np.sqrt(self.obs_dim))

    # -- identity ----------------------------------------------------------------------
    def episode_id(self, i: int) -> str:
        return f"syn{i:09d}"

    def _index(self, episode_id: str) -> int:
        if not (episode_id.startswith("syn") and episode_id[3:].isdigit()):
            raise KeyError(f"{episode_id!r} is not an episode of this synthetic source")
        i = int(episode_id[3:])
        if not 0 <= i < self.num_episodes:
            raise KeyError(f"{episode_id!r} is not an episode of this synthetic source")
        return i

    def _length(self, i: np.ndarray) -> np.ndarray:
        lo, hi = self.steps
        if lo == hi:
            return np.full(np.shape(i), lo, np.int64)
        # A cheap integer hash of (seed, i): lengths without generating the episode.
        h = (np.asarray(i, np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(self.seed)) >> np.uint64(33)
        return (lo + (h % np.uint64(hi - lo + 1))).astype(np.int64)

    def _split(self, i: np.ndarray) -> np.ndarray:
        i = np.asarray(i)
        out = np.full(i.shape, "train", object)
        if self.holdout_every > 0:
            out[i % self.holdout_every == self.holdout_every - 1] = "holdout"
        if self.rollout_every > 0:
            out[i % self.rollout_every == self.rollout_every - 1] = "rollout"
        return out

    def _success(self, i: np.ndarray, split: np.ndarray) -> list:
        # Rollouts succeed for about half of the indices (a fixed bit of a hash of i).
        h = (np.asarray(i, np.uint64) * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(self.seed)) >> np.uint64(40)
        return [bool(b & 1) if s == "rollout" else None for b, s in zip(h.tolist(), split.tolist())]

    # -- EpisodeSource -----------------------------------------------------------------
    @property
    def obs_keys(self) -> list[str]:
        return ["state"]

    @property
    def action_dim(self) -> int:
        return self._action_dim

    def __len__(self) -> int:
        return self.num_episodes

    def shards(self) -> list[str]:
        n, u = self.num_episodes, self.episodes_per_unit
        return [f"{a}:{min(a + u, n)}" for a in range(0, n, u)]

    def _range(self, unit: str) -> tuple[int, int]:
        try:
            a, b = (int(x) for x in unit.split(":"))
        except ValueError:
            raise KeyError(f"{unit!r} is not a unit of this synthetic source") from None
        if a % self.episodes_per_unit or b != min(a + self.episodes_per_unit, self.num_episodes) or a >= b:
            raise KeyError(f"{unit!r} is not a unit of this synthetic source")
        return a, b

    def unit_catalog(self, unit: str) -> pa.Table:
        """Episode-level rows (``EPISODE_SCHEMA``) of one unit, without step data."""
        a, b = self._range(unit)
        return self._rows(np.arange(a, b))

    def unit_of(self, episode_id: str) -> str:
        """The unit (from :meth:`shards`) holding ``episode_id``."""
        i = self._index(episode_id)
        a = i - i % self.episodes_per_unit
        return f"{a}:{min(a + self.episodes_per_unit, self.num_episodes)}"

    def _rows(self, idx: np.ndarray) -> pa.Table:
        n = len(idx)
        split = self._split(idx)
        return pa.Table.from_pydict(
            {
                "episode_id": [self.episode_id(int(i)) for i in idx],
                "split": split.tolist(),
                "source": ["synthetic"] * n,
                "task": ["synthetic"] * n,
                "length": self._length(idx),
                "success": self._success(idx, split),
                "return": [None] * n,
                "tier": [None] * n,
                "metadata": ["{}"] * n,
            },
            schema=EPISODE_SCHEMA,
        )

    def catalog(self) -> pa.Table:
        """All episode rows (built once; ~100 B per episode)."""
        if self._catalog is None:
            self._catalog = self._rows(np.arange(self.num_episodes))
        return self._catalog

    def episode(self, i: int) -> Episode:
        """Episode ``i``: a smooth random walk, actions a fixed nonlinear map of the state."""
        rng = np.random.default_rng((self.seed, int(i)))
        split = self._split(np.asarray([i]))
        T = int(self._length(np.asarray([i]))[0])
        state = np.cumsum(rng.standard_normal((T, self.obs_dim), dtype=np.float32) * 0.1, axis=0)
        state += rng.standard_normal(self.obs_dim, dtype=np.float32)
        act = np.tanh(state @ self._w) + 0.05 * rng.standard_normal((T, self._action_dim), dtype=np.float32)
        return Episode(
            episode_id=self.episode_id(int(i)),
            observations={"state": state},
            actions=act.astype(np.float32),
            split=str(split[0]),
            source="synthetic",
            task="synthetic",
            success=self._success(np.asarray([i]), split)[0],
        )

    def iter_shard(self, unit: str) -> Iterator[Episode]:
        a, b = self._range(unit)
        for i in range(a, b):
            yield self.episode(i)

    def episodes(self, ids: Iterable[str] | None = None, split: str | None = None) -> Iterator[Episode]:
        idx = range(self.num_episodes) if ids is None else sorted(self._index(e) for e in ids)
        for i in idx:
            ep = self.episode(i)
            if split is None or ep.split == split:
                yield ep
