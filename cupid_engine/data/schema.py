"""The Arrow episode schema and the validation every reader and writer shares.

Two tables describe a dataset:

* the **episode-level** table (:data:`EPISODE_SCHEMA`): one row per episode with its id,
  split, source, task, length, outcome (success, return), quality tier and free metadata
  as a JSON string. It is what the gradient store's catalog and the scorers consume, and
  it never holds step data;
* the **step-level** table (:func:`step_schema`): one row per step with ``episode_index``,
  ``frame_index``, one ``observation.<key>`` column per observation key and ``action``,
  each a ``fixed_size_list<float32>[d]`` so a column converts to a ``[rows, d]`` array
  without copying, and one ``observation.images.<key>`` column per camera holding each
  frame as an encoded image (:data:`IMAGE_STRUCT`: ``{bytes, path}``, LeRobot's and
  Hugging Face ``datasets``' ``Image`` layout; PNG, so decoding gives the exact pixels).

Validation lives here so that every path into the engine rejects the same bad input with
the same message, naming the episode and the field: duplicate ids, length-0 episodes,
dimensions that differ from the rest of the dataset, non-finite observations or actions,
unknown splits and metadata that is not JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from cupid_engine.constants import SPLITS
from cupid_engine.data.episode import Episode
from cupid_engine.errors import DataError

OBS_PREFIX = "observation."
IMAGE_PREFIX = "observation.images."
ACTION_COLUMN = "action"
IMAGE_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
"""Step-level image cell: encoded bytes (PNG) and an optional file path (None here)."""

EPISODE_SCHEMA = pa.schema(
    [
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("length", pa.int64(), nullable=False),
        pa.field("success", pa.bool_(), nullable=True),
        pa.field("return", pa.float64(), nullable=True),
        pa.field("tier", pa.string(), nullable=True),
        pa.field("metadata", pa.string(), nullable=False),
    ]
)
"""Episode-level table: one row per episode, no step data. ``metadata`` is JSON text."""


class EpisodeError(DataError):
    """Bad episode content; the message names the episode and the field.

    Attributes:
        episode_id: Id of the offending episode (None when it has none yet).
        field: Offending field, e.g. ``action`` or ``observation.state``.
    """

    def __init__(self, episode_id: str | None, field: str, message: str) -> None:
        self.episode_id = episode_id
        self.field = field
        super().__init__(f"episode {episode_id!r}: field {field!r}: {message}")


class FormatError(DataError):
    """A file does not follow the layout its reader expects; the message names the file."""


def metadata_json(episode: Episode) -> str:
    """Serialise ``episode.metadata`` to canonical JSON (sorted keys, no NaN).

    Raises:
        EpisodeError: If the metadata is not a JSON-serialisable dict.
    """
    if not isinstance(episode.metadata, Mapping):
        raise EpisodeError(episode.episode_id, "metadata", f"must be a dict, got {type(episode.metadata).__name__}")
    try:
        return json.dumps(dict(episode.metadata), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EpisodeError(episode.episode_id, "metadata", f"not JSON-serialisable ({exc})") from None


def parse_metadata(text: str | None, episode_id: str = "?") -> dict[str, Any]:
    """Inverse of :func:`metadata_json`; an empty/None string gives ``{}``."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EpisodeError(episode_id, "metadata", f"invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise EpisodeError(episode_id, "metadata", f"must decode to a dict, got {type(value).__name__}")
    return value


def validate_episode(
    episode: Episode,
    *,
    obs_dims: Mapping[str, int] | None = None,
    action_dim: int | None = None,
    image_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Check one episode on its own and, if given, against the dataset's dimensions.

    Images are checked by shape only (``[T, H, W, C]``, uint8): lazy views are not decoded.

    Args:
        episode: The episode to check.
        obs_dims: Expected ``observation key -> width``; keys must match exactly.
        action_dim: Expected action width ``A``.
        image_shapes: Expected ``camera key -> (H, W, C)``; keys must match exactly.

    Raises:
        EpisodeError: Naming the episode and the field, for length 0, zero-width or
            mismatched dimensions, non-finite values, an unknown split or tier type,
            or metadata that is not JSON.
    """
    eid = episode.episode_id
    if episode.length == 0:
        raise EpisodeError(eid, ACTION_COLUMN, "episode has length 0 (no steps)")
    if episode.split not in SPLITS:
        raise EpisodeError(eid, "split", f"{episode.split!r} is not one of {SPLITS}")
    if episode.tier is not None and not isinstance(episode.tier, str):
        raise EpisodeError(eid, "tier", f"must be a string or None, got {type(episode.tier).__name__}")
    A = episode.actions.shape[1]
    if A == 0:
        raise EpisodeError(eid, ACTION_COLUMN, "action has width 0")
    if action_dim is not None and A != action_dim:
        raise EpisodeError(eid, ACTION_COLUMN, f"has width {A}, expected {action_dim} like the rest of the dataset")
    if obs_dims is not None and set(obs_dims) != set(episode.observations):
        raise EpisodeError(
            eid,
            "observation",
            f"keys {sorted(episode.observations)} differ from the dataset's {sorted(obs_dims)}",
        )
    for key, arr in episode.observations.items():
        if arr.shape[1] == 0:
            raise EpisodeError(eid, OBS_PREFIX + key, "has width 0")
        if obs_dims is not None and arr.shape[1] != obs_dims[key]:
            raise EpisodeError(
                eid, OBS_PREFIX + key, f"has width {arr.shape[1]}, expected {obs_dims[key]} like the rest of the dataset"
            )
        _check_finite(eid, OBS_PREFIX + key, arr)
    _check_finite(eid, ACTION_COLUMN, episode.actions)
    if image_shapes is not None:
        got = episode.image_shapes
        if set(got) != set(image_shapes):
            raise EpisodeError(eid, "images", f"camera keys {sorted(got)} differ from the dataset's {sorted(image_shapes)}")
        for key, shape in got.items():
            if tuple(shape) != tuple(image_shapes[key]):
                raise EpisodeError(
                    eid, IMAGE_PREFIX + key, f"has frames {tuple(shape)}, expected {tuple(image_shapes[key])} like the rest of the dataset"
                )
    metadata_json(episode)


def _check_finite(eid: str, field: str, arr: np.ndarray) -> None:
    finite = np.isfinite(arr)
    if not finite.all():
        step, col = (int(i) for i in np.argwhere(~finite)[0])
        raise EpisodeError(eid, field, f"non-finite value {arr[step, col]} at step {step}, column {col}")


class EpisodeValidator:
    """Streaming validation: checks each episode and its consistency with the earlier ones.

    The first episode fixes the observation keys and widths, the camera keys and frame
    shapes and the action width; ids are remembered (a set of strings, not the episodes)
    to reject duplicates.
    """

    def __init__(self) -> None:
        self.obs_dims: dict[str, int] | None = None
        self.action_dim: int | None = None
        self.image_shapes: dict[str, tuple[int, int, int]] | None = None
        self._seen: set[str] = set()

    def __call__(self, episode: Episode) -> Episode:
        """Validate ``episode`` and return it unchanged.

        Raises:
            EpisodeError: As :func:`validate_episode`, or for a duplicate ``episode_id``.
        """
        if not isinstance(episode, Episode):
            raise TypeError(f"expected an Episode, got {type(episode).__name__}")
        if episode.episode_id in self._seen:
            raise EpisodeError(episode.episode_id, "episode_id", "duplicate episode id")
        validate_episode(episode, obs_dims=self.obs_dims, action_dim=self.action_dim, image_shapes=self.image_shapes)
        if self.obs_dims is None:
            self.obs_dims = {k: int(v.shape[1]) for k, v in episode.observations.items()}
            self.action_dim = int(episode.actions.shape[1])
            self.image_shapes = episode.image_shapes
        self._seen.add(episode.episode_id)
        return episode


def validate_episodes(episodes: Iterable[Episode]) -> None:
    """Validate a whole collection (streaming; see :class:`EpisodeValidator`)."""
    check = EpisodeValidator()
    for ep in episodes:
        check(ep)


def episode_row(episode: Episode) -> dict[str, Any]:
    """The episode-level row of one episode (a dict keyed by :data:`EPISODE_SCHEMA` names)."""
    ret = None if episode.return_ is None else float(episode.return_)
    if ret is not None and not math.isfinite(ret):
        raise EpisodeError(episode.episode_id, "return", "not finite")
    return {
        "episode_id": episode.episode_id,
        "split": episode.split,
        "source": episode.source,
        "task": episode.task,
        "length": episode.length,
        "success": None if episode.success is None else bool(episode.success),
        "return": ret,
        "tier": episode.tier,
        "metadata": metadata_json(episode),
    }


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Episode-level table from rows shaped like :func:`episode_row`."""
    columns = {f.name: [r[f.name] for r in rows] for f in EPISODE_SCHEMA}
    return pa.Table.from_pydict(columns, schema=EPISODE_SCHEMA)


def episodes_table(episodes: Iterable[Episode], *, validate: bool = True) -> pa.Table:
    """Build the episode-level table (no step data) from episodes.

    Args:
        episodes: Any iterable of episodes; only their scalar fields are kept.
        validate: Run :class:`EpisodeValidator` over the stream (duplicates, length 0,
            dimensions, non-finite values).

    Returns:
        A table with :data:`EPISODE_SCHEMA`, one row per episode, in input order.
    """
    check = EpisodeValidator() if validate else None
    rows = []
    for ep in episodes:
        if check is not None:
            check(ep)
        rows.append(episode_row(ep))
    return rows_table(rows)


def step_schema(obs_dims: Mapping[str, int], action_dim: int, image_keys: Iterable[str] = ()) -> pa.Schema:
    """Step-level schema: ``episode_index``, ``frame_index``, ``observation.<key>``,
    ``observation.images.<camera>`` (:data:`IMAGE_STRUCT`), ``action``.

    Observation and image columns follow sorted key order so two writers of the same data agree.
    """
    fields = [pa.field("episode_index", pa.int64(), nullable=False), pa.field("frame_index", pa.int64(), nullable=False)]
    for key in sorted(obs_dims):
        fields.append(pa.field(OBS_PREFIX + key, pa.list_(pa.float32(), int(obs_dims[key])), nullable=False))
    for key in sorted(image_keys):
        fields.append(pa.field(IMAGE_PREFIX + key, IMAGE_STRUCT, nullable=False))
    fields.append(pa.field(ACTION_COLUMN, pa.list_(pa.float32(), int(action_dim)), nullable=False))
    return pa.schema(fields)


def fixed_list(arr: np.ndarray) -> pa.FixedSizeListArray:
    """``[T, d]`` numpy array -> ``fixed_size_list<float32>[d]`` Arrow array (one copy at most)."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])


def column_to_numpy(column: pa.Array | pa.ChunkedArray, width: int | None = None) -> np.ndarray:
    """Arrow list / fixed-size-list / scalar column -> ``[rows, d]`` float32 array.

    Args:
        column: The column; plain numeric columns become ``[rows, 1]``.
        width: Expected ``d``; required for variable-size lists (LeRobot v2.1 files
            written by pandas store vectors as ``list<float>``).

    Raises:
        FormatError: If the values do not fill ``[rows, width]``.
    """
    if isinstance(column, pa.ChunkedArray):
        column = pa.concat_arrays(column.chunks) if column.num_chunks != 1 else column.chunk(0)
    rows = len(column)
    t = column.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        # flatten() honours slice offsets; .values would not.
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        d = t.list_size if pa.types.is_fixed_size_list(t) else (width if width is not None else (len(values) // rows if rows else 0))
    else:
        values = column.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        d = 1
    if width is not None and d != width:
        raise FormatError(f"column has width {d}, expected {width}")
    if values.size != rows * d:
        raise FormatError(f"column holds {values.size} values, expected {rows} rows x {d}")
    return values.reshape(rows, d)
