"""Chunk-aligned read cache of a gradient store for the duration of one scoring call.

Scorers read step features one episode at a time (``run.step_features(id)``). On a
remote store (``s3://``) each such call fetched the zarr chunk(s) holding the episode's
rows, i.e. every chunk once per episode inside it (measured: ~51 fetches per steps chunk
in ``cupid-quality``), and read the episode's shard marker too: 6.7x slower than local.

:func:`cached` wraps an open :class:`~cupid_engine.store.GradientStore` so that, per call:

* step features are read whole chunk by whole chunk (chunk-aligned row ranges of the
  run's ``steps`` array), each chunk once, and kept in an LRU bounded by bytes;
* shard completion markers are read once (all of them, one array read), not per episode.

Everything else (catalog, Gram, episode sums, index look-ups) passes through to the
store. Results are the same arrays: the cache only changes how often bytes are fetched.
Local stores are wrapped too (their chunk files are read once instead of once per
episode); in-memory stores (``ArrayStore``) are returned as they are.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cupid_engine.store import GradientStore, Run
    from cupid_engine.store.reader import StoreReader

__all__ = ["cached", "CachedStore", "CachedRun"]

DEFAULT_CACHE_BYTES = 512 << 20


def cached(store: StoreReader, *, max_bytes: int = DEFAULT_CACHE_BYTES) -> StoreReader:
    """``store`` with chunk-cached runs (a :class:`GradientStore`), else ``store`` itself."""
    from cupid_engine.store import GradientStore

    if isinstance(store, CachedStore) or not isinstance(store, GradientStore):
        return store
    return CachedStore(store, max_bytes=max_bytes)


class CachedStore:
    """A :class:`GradientStore` whose :meth:`run` handles cache step-feature chunks."""

    def __init__(self, store: GradientStore, *, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._store = store
        self._max_bytes = int(max_bytes)
        self._runs: dict[str, CachedRun] = {}

    def run(self, name: str) -> CachedRun:
        if name not in self._runs:
            self._runs[name] = CachedRun(self._store.run(name), self._store, max_bytes=self._max_bytes)
        return self._runs[name]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._store, attr)


class CachedRun:
    """A store :class:`Run` whose ``step_features`` reads whole chunks, each once.

    Attributes:
        fetches: Chunk reads done so far (tests, benchmarks).
    """

    def __init__(self, run: Run, store: GradientStore, *, max_bytes: int) -> None:
        self._run = run
        self._store = store
        self._max_bytes = max_bytes
        self._chunks: collections.OrderedDict[tuple[str, int], np.ndarray] = collections.OrderedDict()
        self._gram: np.ndarray | None = None
        self._bytes = 0
        self._done: np.ndarray | None = None
        steps = run._array("steps")
        self._chunk_rows = int(steps.chunks[0])
        self._total_rows = int(steps.shape[0])
        self.fetches = 0
        # The run object is this wrapper's own (GradientStore.run builds a new one per
        # call): its completeness checks (episode sums, shard streams) use the marker
        # flags read once here instead of re-reading every marker per call.
        self._check_original = run._check_written
        run._check_written = self._check_written

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._run, attr)

    def _check_written(self, positions: np.ndarray) -> None:
        if self._done is None:
            self._done = np.asarray(self._run._done_flags()).astype(bool)  # every marker, one read
        of_shard = self._store._index().plan.shard_of(np.asarray(positions, np.int64))
        if np.any(of_shard >= len(self._done)) or not self._done[of_shard].all():
            self._check_original(positions)  # raises the store's own error, naming episodes

    def gram(self) -> np.ndarray:
        """``[K, K]`` float64 Gram, read once per call."""
        if self._gram is None:
            self._gram = self._run.gram()
        return self._gram.copy()

    def _chunk(self, c: int, what: str = "steps") -> np.ndarray:
        key = (what, c)
        got = self._chunks.get(key)
        if got is not None:
            self._chunks.move_to_end(key)
            return got
        if what == "steps":
            r0 = c * self._chunk_rows
            got = self._run._read_steps(r0, min(self._total_rows, r0 + self._chunk_rows))
        else:
            arr = self._run._array("episodes")
            r0, cr = c * arr.chunks[0], int(arr.chunks[0])
            got = self._run._read(arr, slice(r0, min(int(arr.shape[0]), r0 + cr)), "episodes",
                                  lambda: self._store._index().episodes_in_slots(r0, r0 + cr)
                                  if hasattr(self._store._index(), "episodes_in_slots") else [])
        self.fetches += 1
        self._chunks[key] = got
        self._bytes += got.nbytes
        while self._bytes > self._max_bytes and len(self._chunks) > 1:
            _, old = self._chunks.popitem(last=False)
            self._bytes -= old.nbytes
        return got

    def step_features(self, episode_id: str) -> np.ndarray:
        """``[T, K]`` float32 features of one episode (same values as the store's)."""
        return self.step_features_at(int(self._store.positions([episode_id])[0]))

    def step_features_at(self, position: int) -> np.ndarray:
        self._check_written(np.asarray([position], np.int64))
        idx = self._store._index()
        r0 = int(idx.int_column("row_offset")[position])
        r1 = r0 + int(idx.int_column("length")[position])
        cr = self._chunk_rows
        parts = []
        for c in range(r0 // cr, -(-r1 // cr)):
            chunk = self._chunk(c)
            a, b = max(r0, c * cr) - c * cr, min(r1, (c + 1) * cr) - c * cr
            parts.append(chunk[a:b])
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def episode_features(self, ids: Any = None) -> np.ndarray:
        """``[E, K]`` float32 per-episode sums (catalog order when ``ids`` is None)."""
        if ids is None:
            pos = np.arange(self._store._index().num_rows)
        else:
            pos = self._store.positions(list(ids))
        return self.episode_features_at(pos)

    def episode_features_at(self, positions: Any) -> np.ndarray:
        """``[E, K]`` float32 per-episode sums at catalog rows ``positions``, chunk-cached."""
        pos = np.asarray(positions, np.int64)
        out = np.empty((len(pos), self._run.k), np.float32)
        if len(pos) == 0:
            return out
        self._check_written(pos)
        slots = self._store._index().plan.slots(pos)
        cr = int(self._run._array("episodes").chunks[0])
        chunk_of = slots // cr
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            out[sel] = self._chunk(int(c), "episodes")[slots[sel] - int(c) * cr]
        return out

    def iter_episode_features(self, block: int = 4096):
        """``(episode_ids [b], [b, K])`` blocks in catalog order (as the store's)."""
        if block <= 0:
            raise ValueError(f"block must be positive, got {block}")
        idx = self._store._index()
        for a in range(0, idx.num_rows, block):
            b = min(idx.num_rows, a + block)
            yield idx.ids(a, b), self.episode_features_at(np.arange(a, b))
