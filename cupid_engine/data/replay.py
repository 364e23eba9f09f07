"""diffusion_policy zarr replay buffers: a streaming reader and a small writer.

diffusion_policy (Chi et al.) stores a dataset as one zarr group (often zipped,
``*.zarr.zip``)::

    data/<key>          [N, ...] step arrays over all episodes, concatenated
                        (``action``, ``state``, ``agent_pos``, ``img`` ...)
    meta/episode_ends   [E] int64, exclusive end row of each episode

The format has no ids, splits, tasks or outcomes: ids are ``episode_000000`` ...
(position), the split is the ``split`` option (default ``train``; diffusion_policy draws
its validation episodes at training time), source is the folder name, success/return/tier
are unknown. Observations are the ``data/`` arrays other than the action with at most
two dimensions; arrays shaped ``[N, H, W, C]`` (``C`` in 1, 3, 4; ``img``, ``camera_0`` ...)
are camera streams, read lazily into ``Episode.images`` as ``uint8`` (PushT stores ``img``
as float32 holding integers 0..255: converted exactly, anything else is refused by name). Files written by diffusion_policy are
zarr format 2, which zarr 3 reads; :func:`write_replay_buffer` writes format 2 by default
for the same reason.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from cupid_engine.data._util import build_then_swap, check_split, select_keys, selected_rows
from cupid_engine.data.episode import Episode, ImageSequence
from cupid_engine.data.schema import EPISODE_SCHEMA, EpisodeValidator, FormatError, validate_episode

ACTION_KEY = "action"


def _open_group(path: str | os.PathLike, mode: str) -> zarr.Group:
    p = str(path)
    if p.endswith(".zip"):
        return zarr.open_group(zarr.storage.ZipStore(p, mode="r"), mode="r")
    return zarr.open_group(p, mode=mode)


class ReplayBufferDataset:
    """Streaming reader of a diffusion_policy replay buffer (zarr group or ``.zarr.zip``).

    Args:
        path: Zarr group path, ``.zip`` or URL.
        obs_keys: ``data/`` arrays to use as observations (default: every array except
            the action whose rows have at most one dimension).
        action_key: Name of the action array.
        split: Split of every episode.
        source: Source name (default: the folder name without ``.zarr``/``.zip``).
        task: Task name.
        episodes_per_shard: Episodes per unit of :meth:`shards`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        obs_keys: Iterable[str] | None = None,
        action_key: str = ACTION_KEY,
        split: str = "train",
        source: str | None = None,
        task: str = "",
        episodes_per_shard: int = 100,
    ) -> None:
        check_split(split)
        if episodes_per_shard <= 0:
            raise ValueError("episodes_per_shard must be positive")
        self.path = str(path)
        try:
            root = _open_group(path, "r")
            data, meta = root["data"], root["meta"]
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise FormatError(f"{self.path}: not a replay buffer (needs groups data/ and meta/): {exc}") from None
        if "episode_ends" not in meta:
            raise FormatError(f"{self.path}: no meta/episode_ends")
        ends_arr = meta["episode_ends"]
        if ends_arr.ndim != 1:
            raise FormatError(f"{self.path}: meta/episode_ends has shape {ends_arr.shape}, expected [E]")
        ends = np.asarray(ends_arr[:], dtype=np.int64)
        self._arrays = {k: data[k] for k in data.array_keys()}
        if action_key not in self._arrays:
            raise FormatError(f"{self.path}: no data/{action_key} (have {sorted(self._arrays)})")
        n_rows = self._arrays[action_key].shape[0]
        starts = np.concatenate([[0], ends[:-1]]) if ends.size else ends
        if ends.size and (np.any(ends - starts <= 0) or ends[-1] != n_rows):
            bad = np.flatnonzero(ends - starts <= 0)
            detail = f"episode {int(bad[0])} is empty or out of order" if bad.size else f"last end {ends[-1]} != {n_rows} rows"
            raise FormatError(f"{self.path}: meta/episode_ends is inconsistent: {detail}")
        others = {k: a for k, a in self._arrays.items() if k != action_key}
        cameras = [k for k, a in others.items() if _is_camera(a)]
        # Named explicitly, any other array is flattened per step (e.g. keypoints [N, 9, 2]).
        lowdim = [k for k, a in others.items() if k not in cameras and (obs_keys is not None or a.ndim <= 2)]
        self._obs_keys, self._image_keys = select_keys(obs_keys, lowdim, cameras, where=self.path)
        self._skipped = {
            f"data/{k}": f"{a.dtype} {list(a.shape[1:])} per step (not a vector)"
            for k, a in sorted(others.items())
            if obs_keys is None and k not in self._obs_keys and k not in self._image_keys
        }
        for k in self._obs_keys + self._image_keys + [action_key]:
            if k not in self._arrays:
                raise FormatError(f"{self.path}: no data/{k}")
            if self._arrays[k].shape[0] != n_rows:
                raise FormatError(f"{self.path}: data/{k} has {self._arrays[k].shape[0]} rows, data/{action_key} {n_rows}")
        self._action_key = action_key
        self._starts, self._ends = starts, ends
        self._split, self._task = split, task
        name = pathlib.PurePosixPath(self.path.rstrip("/")).name
        for suffix in (".zip", ".zarr"):
            name = name.removesuffix(suffix)
        self._source = source if source is not None else name
        self._per_shard = int(episodes_per_shard)
        self._catalog: pa.Table | None = None

    @property
    def obs_keys(self) -> list[str]:
        return list(self._obs_keys)

    @property
    def skipped_fields(self) -> dict[str, str]:
        """``data/*`` arrays the default selection leaves out (neither ``[N, d]`` vectors
        nor cameras, e.g. keypoints ``[N, 9, 2]``), ``name -> "dtype [per-step shape] ..."``;
        naming them in ``obs_keys`` reads them flattened per step."""
        return dict(self._skipped)

    @property
    def obs_dims(self) -> dict[str, int]:
        return {k: _row_width(self._arrays[k]) for k in self._obs_keys}

    @property
    def image_keys(self) -> list[str]:
        """Camera keys (``data/<key>`` arrays shaped ``[N, H, W, C]``), sorted."""
        return list(self._image_keys)

    @property
    def image_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``camera key -> (H, W, C)`` of every frame."""
        return {k: tuple(int(x) for x in self._arrays[k].shape[1:]) for k in self._image_keys}  # type: ignore[misc]

    @property
    def action_dim(self) -> int:
        return _row_width(self._arrays[self._action_key])

    def __len__(self) -> int:
        return int(self._ends.size)

    def _id(self, i: int) -> str:
        return f"episode_{i:06d}"

    def catalog(self) -> pa.Table:
        """Episode-level table from ``meta/episode_ends`` alone."""
        if self._catalog is None:
            n = len(self)
            self._catalog = pa.Table.from_pydict(
                {
                    "episode_id": [self._id(i) for i in range(n)],
                    "split": [self._split] * n,
                    "source": [self._source] * n,
                    "task": [self._task] * n,
                    "length": (self._ends - self._starts).tolist(),
                    "success": [None] * n,
                    "return": [None] * n,
                    "tier": [None] * n,
                    "metadata": ["{}"] * n,
                },
                schema=EPISODE_SCHEMA,
            )
        return self._catalog

    def shards(self) -> list[str]:
        """Units of ``episodes_per_shard`` consecutive episodes, written ``"start:stop"``."""
        n = len(self)
        return [f"{a}:{min(a + self._per_shard, n)}" for a in range(0, n, self._per_shard)]

    def iter_shard(self, unit: str) -> Iterator[Episode]:
        if unit not in self.shards():
            raise KeyError(f"{unit!r} is not a shard of {self.path}")
        a, b = (int(x) for x in unit.split(":"))
        for i in range(a, b):
            yield self._episode(i)

    def episodes(self, ids: Iterable[str] | None = None, split: str | None = None) -> Iterator[Episode]:
        """Stream episodes in order; each reads only its own row range of every array."""
        for i in selected_rows(self.catalog(), ids, split):
            yield self._episode(i)

    def _episode(self, i: int) -> Episode:
        s, e = int(self._starts[i]), int(self._ends[i])

        def rows(key: str) -> np.ndarray:
            arr = np.asarray(self._arrays[key][s:e], dtype=np.float32)
            return arr.reshape(e - s, -1)

        ep = Episode(
            episode_id=self._id(i),
            observations={k: rows(k) for k in self._obs_keys},
            actions=rows(self._action_key),
            split=self._split,
            source=self._source,
            task=self._task,
            images={k: self._image_view(k, s, e) for k in self._image_keys},
        )
        validate_episode(ep, obs_dims=self.obs_dims, action_dim=self.action_dim, image_shapes=self.image_shapes)
        return ep

    def _image_view(self, key: str, s: int, e: int) -> ImageSequence:
        arr, what = self._arrays[key], f"{self.path}: data/{key} rows {s}:{e}"

        def frames(a: int, b: int) -> np.ndarray:
            return _as_uint8(np.asarray(arr[s + a : s + b]), what)

        return ImageSequence((e - s, *arr.shape[1:]), frames=frames, what=what)


def _is_camera(arr: Any) -> bool:
    """``[N, H, W, C]`` with ``C`` in 1, 3, 4 and an integer or float dtype."""
    return len(arr.shape) == 4 and arr.shape[3] in (1, 3, 4) and np.dtype(arr.dtype).kind in "uif"


def _as_uint8(values: np.ndarray, what: str) -> np.ndarray:
    """Pixels stored as uint8, or as other numbers holding exact integers 0..255, to uint8."""
    if values.dtype == np.uint8:
        return values
    if values.size and (values.min() < 0 or values.max() > 255 or not np.array_equal(values, np.round(values))):
        raise FormatError(f"{what}: {values.dtype} pixels are not integers in 0..255; cannot read them as uint8 images")
    return values.astype(np.uint8)


def _row_width(arr: Any) -> int:
    return int(np.prod(arr.shape[1:])) if len(arr.shape) > 1 else 1


def open_replay_buffer(path: str | os.PathLike, **options: Any) -> ReplayBufferDataset:
    """Open a diffusion_policy replay buffer; options as :class:`ReplayBufferDataset`."""
    return ReplayBufferDataset(path, **options)


def write_replay_buffer(
    path: str | os.PathLike,
    episodes: Iterable[Episode],
    *,
    chunk_rows: int = 1024,
    zarr_format: int = 2,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write episodes as a diffusion_policy replay buffer, appending one episode at a time.

    Only step arrays and episode boundaries are stored (the format has no place for ids,
    splits or outcomes). Observation ``k`` goes to ``data/k``, actions to ``data/action``.

    Returns:
        The group path.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and swapped in at the end: a failed overwrite loses nothing.
    check = EpisodeValidator()
    with build_then_swap(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
        data, meta = root.require_group("data"), root.require_group("meta")
        arrays: dict[str, Any] = {}
        ends: list[int] = []
        total = 0
        for ep in episodes:
            check(ep)
            cols = dict(ep.observations)
            if ACTION_KEY in cols or ACTION_KEY in ep.images:
                raise ValueError(f"episode {ep.episode_id!r}: observation key {ACTION_KEY!r} clashes with data/{ACTION_KEY}")
            cols[ACTION_KEY] = ep.actions
            for k, v in cols.items():
                if k not in arrays:
                    arrays[k] = data.create_array(k, shape=(0, v.shape[1]), chunks=(chunk_rows, v.shape[1]), dtype="float32")
                arrays[k].append(v, axis=0)
            for k in ep.images:
                v = ep.image_array(k)
                if k not in arrays:
                    # A few frames per chunk: reading one episode touches only its own frames.
                    arrays[k] = data.create_array(k, shape=(0, *v.shape[1:]), chunks=(16, *v.shape[1:]), dtype="uint8")
                arrays[k].append(v, axis=0)
            total += ep.length
            ends.append(total)
        if not ends:
            raise ValueError("write_replay_buffer got no episodes")
        meta.create_array("episode_ends", shape=(len(ends),), chunks=(max(len(ends), 1),), dtype="int64")[:] = np.asarray(ends, np.int64)
    return path
