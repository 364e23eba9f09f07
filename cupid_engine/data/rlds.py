"""RLDS TFRecord shards (Open X-Embodiment) read without TensorFlow.

Open X-Embodiment ships each dataset as TFDS-built RLDS: a folder with
``features.json`` (the TFDS feature spec), ``dataset_info.json`` and shards
``<name>-<split>.tfrecord-00000-of-00128``. Each record is one serialised
``tf.train.Example`` holding a whole episode, with the step features flattened and
concatenated over steps: ``steps/observation/<key>``, ``steps/action`` (or a dict
``steps/action/<key>``), ``steps/is_first``, ``steps/is_last``, ``steps/is_terminal``,
``steps/reward``, ``steps/language_instruction``, plus ``episode_metadata/<key>``.

This module owns:

* a TFRecord reader that checks both CRCs of every record (masked CRC32C of the 8-byte
  length, then of the payload) and bounds the length before allocating, so a corrupt or
  truncated shard raises :class:`TFRecordError` naming the file and record index instead
  of returning garbage or exhausting memory;
* the ``tf.train.Example`` protobuf classes, built at runtime from a
  ``FileDescriptorProto`` in a private descriptor pool (no protoc, no TensorFlow, no
  clash with TensorFlow's own classes if it is installed);
* :class:`RLDSDataset`, the streaming reader (one record, i.e. one episode, in memory);
* writers for fixtures and exports: :func:`write_tfrecord`, :func:`encode_episode_example`,
  :func:`features_json` and :func:`write_rlds`.

Dict actions are flattened to one ``[T, A]`` vector in sorted key order unless
``action_keys`` gives the order. Observations keep the features whose per-step shape has
at most one dimension (images and depth maps are skipped) unless ``obs_keys`` names them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import crc32c
import numpy as np
import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from cupid_engine.data._util import NATIVE_SPLIT_MAP, filter_stream, map_split, url_to_fs
from cupid_engine.data.episode import Episode
from cupid_engine.data.schema import (
    EPISODE_SCHEMA,
    EpisodeValidator,
    FormatError,
    episode_row,
    metadata_json,
    parse_metadata,
    validate_episode,
)

DEFAULT_MAX_RECORD_BYTES = 1 << 30
SUCCESS_MODES = ("terminal", "reward", "none")
SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<split>[A-Za-z0-9_]+)\.tfrecord-(?P<index>\d{5})-of-(?P<count>\d{5})$")
# Episode-level fields our writer adds under episode_metadata/ so a round trip is exact.
_META_FIELDS = ("episode_id", "source", "tier", "metadata")
_CRC_MASK_DELTA = 0xA282EAD8


class TFRecordError(FormatError):
    """A TFRecord file is corrupt or truncated; the message names the file and record."""


# ----------------------------------------------------------------------------- TFRecord


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C: ``((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32``."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def iter_tfrecord(
    path: str | os.PathLike,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    fs: Any = None,
) -> Iterator[bytes]:
    """Yield the records of one TFRecord file, verifying both CRCs of each.

    Args:
        path: File path (or a path inside ``fs``).
        max_record_bytes: Largest record accepted; a larger length field is treated as
            corruption before any allocation.
        fs: Optional fsspec filesystem (default: the one ``path`` names).

    Raises:
        TFRecordError: Naming the file, record index and byte offset, on a CRC mismatch,
            an oversized length or a truncated record.
    """
    if fs is None:
        fs, path = url_to_fs(path)
    with fs.open(str(path), "rb") as f:
        yield from _records(f, str(path), max_record_bytes)


def _records(f: BinaryIO, name: str, max_record_bytes: int) -> Iterator[bytes]:
    index, offset = 0, 0
    while True:
        header = f.read(12)
        if not header:
            return
        where = f"{name}: record {index} (byte offset {offset})"
        if len(header) < 12:
            raise TFRecordError(f"{where}: truncated header ({len(header)} of 12 bytes)")
        length_bytes = header[:8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", header[8:])
        if masked_crc32c(length_bytes) != length_crc:
            raise TFRecordError(f"{where}: length CRC mismatch (corrupt header)")
        if length > max_record_bytes:
            raise TFRecordError(f"{where}: length {length} exceeds max_record_bytes={max_record_bytes}")
        data = f.read(length)
        if len(data) < length:
            raise TFRecordError(f"{where}: truncated data ({len(data)} of {length} bytes)")
        footer = f.read(4)
        if len(footer) < 4:
            raise TFRecordError(f"{where}: truncated data CRC ({len(footer)} of 4 bytes)")
        if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
            raise TFRecordError(f"{where}: data CRC mismatch (corrupt payload)")
        yield data
        index += 1
        offset += 16 + length


def write_tfrecord(path: str | os.PathLike, examples_bytes: Iterable[bytes]) -> pathlib.Path:
    """Write serialised records to a TFRecord file (length, masked CRCs, payload).

    Returns:
        The file path.
    """
    path = pathlib.Path(path)
    with open(path, "wb") as f:
        for data in examples_bytes:
            data = bytes(data)
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked_crc32c(length)))
            f.write(data + struct.pack("<I", masked_crc32c(data)))
    return path


# ----------------------------------------------------------------------------- protobuf


def _build_example_classes() -> dict[str, type]:
    """tensorflow/core/example/{feature,example}.proto as runtime message classes."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="cupid_engine/tensorflow_example.proto", package="tensorflow", syntax="proto3"
    )

    def message(name: str, fields: Sequence[tuple], parent: Any = None) -> Any:
        msg = (parent.nested_type if parent is not None else fdp.message_type).add(name=name)
        for fname, number, ftype, label, type_name, oneof in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
            if oneof is not None:
                field.oneof_index = oneof
        return msg

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", [("value", 1, F.TYPE_BYTES, rep, None, None)])
    message("FloatList", [("value", 1, F.TYPE_FLOAT, rep, None, None)])
    message("Int64List", [("value", 1, F.TYPE_INT64, rep, None, None)])
    feature = message(
        "Feature",
        [
            ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tensorflow.BytesList", 0),
            ("float_list", 2, F.TYPE_MESSAGE, opt, ".tensorflow.FloatList", 0),
            ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tensorflow.Int64List", 0),
        ],
    )
    feature.oneof_decl.add(name="kind")
    features = message("Features", [("feature", 1, F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry", None)])
    entry = message(
        "FeatureEntry",
        [("key", 1, F.TYPE_STRING, opt, None, None), ("value", 2, F.TYPE_MESSAGE, opt, ".tensorflow.Feature", None)],
        parent=features,
    )
    entry.options.map_entry = True
    message("Example", [("features", 1, F.TYPE_MESSAGE, opt, ".tensorflow.Features", None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    classes = message_factory.GetMessageClassesForFiles([fdp.name], pool)
    return {name.split(".")[-1]: cls for name, cls in classes.items()}


_CLASSES = _build_example_classes()
Example = _CLASSES["Example"]
Features = _CLASSES["Features"]
Feature = _CLASSES["Feature"]
BytesList = _CLASSES["BytesList"]
FloatList = _CLASSES["FloatList"]
Int64List = _CLASSES["Int64List"]


def parse_example(data: bytes) -> dict[str, tuple[str, Any]]:
    """Decode a serialised ``tf.train.Example`` into ``key -> (kind, values)``.

    ``kind`` is ``"float"`` (float32 array), ``"int64"`` (int64 array) or ``"bytes"``
    (list of bytes); features with no value set have kind ``"empty"``.
    """
    ex = Example()
    ex.ParseFromString(data)
    out: dict[str, tuple[str, Any]] = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        if kind == "float_list":
            out[key] = ("float", np.asarray(feat.float_list.value, dtype=np.float32))
        elif kind == "int64_list":
            out[key] = ("int64", np.asarray(feat.int64_list.value, dtype=np.int64))
        elif kind == "bytes_list":
            out[key] = ("bytes", list(feat.bytes_list.value))
        else:
            out[key] = ("empty", None)
    return out


# ----------------------------------------------------------------------------- feature spec


class FeatureSpec:
    """One leaf of a TFDS feature spec.

    Attributes:
        kind: ``tensor``, ``image``, ``text`` or the TFDS class name for anything else.
        shape: Per-step (or per-episode) shape; ``-1`` for unknown dimensions.
        dtype: NumPy dtype name (``float32``, ``bool``, ...).
    """

    __slots__ = ("kind", "shape", "dtype")

    def __init__(self, kind: str, shape: tuple[int, ...], dtype: str) -> None:
        self.kind, self.shape, self.dtype = kind, shape, dtype

    def __repr__(self) -> str:
        return f"FeatureSpec({self.kind!r}, {self.shape}, {self.dtype!r})"


def parse_features_json(spec: Mapping[str, Any]) -> dict[str, FeatureSpec]:
    """Flatten a TFDS ``features.json`` into ``"steps/observation/state" -> FeatureSpec``."""
    out: dict[str, FeatureSpec] = {}

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, Mapping):
            raise FormatError(f"features.json: node {prefix!r} is not an object")
        if "featuresDict" in node:
            for k, v in node["featuresDict"].get("features", {}).items():
                walk(v, f"{prefix}/{k}" if prefix else k)
        elif "sequence" in node:
            walk(node["sequence"].get("feature", {}), prefix)
        elif "tensor" in node:
            t = node["tensor"]
            out[prefix] = FeatureSpec("tensor", _dims(t.get("shape", {}), prefix), str(t.get("dtype", "float32")))
        elif "image" in node:
            t = node["image"]
            out[prefix] = FeatureSpec("image", _dims(t.get("shape", {}), prefix), str(t.get("dtype", "uint8")))
        elif "text" in node:
            out[prefix] = FeatureSpec("text", (), "string")
        else:
            cls = str(node.get("pythonClassName", "unknown")).rsplit(".", 1)[-1]
            out[prefix] = FeatureSpec(cls, (), "unknown")

    walk(spec, "")
    return out


def _dims(shape: Any, where: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in (shape or {}).get("dimensions", []))
    except (TypeError, ValueError):
        raise FormatError(f"features.json: feature {where!r} has a bad shape {shape!r}") from None


def features_json(
    obs_dims: Mapping[str, int],
    action_dim: int | None = None,
    *,
    action_keys: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """A TFDS ``features.json`` for episodes written by :func:`encode_episode_example`.

    Args:
        obs_dims: ``observation key -> width``.
        action_dim: Width of a vector ``steps/action`` (when ``action_keys`` is None).
        action_keys: ``name -> width`` of a dict action, in vector order.
    """
    ns = "tensorflow_datasets.core.features."

    def tensor(shape: Sequence[int], dtype: str = "float32") -> dict[str, Any]:
        cls = "scalar.Scalar" if not shape else "tensor_feature.Tensor"
        return {
            "pythonClassName": ns + cls,
            "tensor": {"shape": {"dimensions": [str(s) for s in shape]}, "dtype": dtype, "encoding": "none"},
        }

    def fdict(features: Mapping[str, Any]) -> dict[str, Any]:
        return {"pythonClassName": ns + "features_dict.FeaturesDict", "featuresDict": {"features": dict(features)}}

    text = {"pythonClassName": ns + "text_feature.Text", "text": {}}
    if action_keys is not None:
        action = fdict({k: tensor([w]) for k, w in action_keys.items()})
    elif action_dim is not None:
        action = tensor([action_dim])
    else:
        raise ValueError("give action_dim or action_keys")
    steps = fdict(
        {
            "observation": fdict({k: tensor([d]) for k, d in obs_dims.items()}),
            "action": action,
            "reward": tensor([]),
            "discount": tensor([]),
            "is_first": tensor([], "bool"),
            "is_last": tensor([], "bool"),
            "is_terminal": tensor([], "bool"),
            "language_instruction": text,
        }
    )
    meta = fdict({k: text for k in _META_FIELDS})
    return fdict(
        {
            "steps": {"pythonClassName": ns + "dataset_feature.Dataset", "sequence": {"feature": steps, "length": "-1"}},
            "episode_metadata": meta,
        }
    )


# ----------------------------------------------------------------------------- encoding


def encode_episode_example(episode: Episode, *, action_keys: Mapping[str, int] | None = None) -> bytes:
    """Serialise an episode as one RLDS ``tf.train.Example`` (the OXE layout).

    ``steps/reward`` is 0 except the last step, which carries ``return_`` (or 1.0 for a
    success when ``return_`` is None); ``steps/is_terminal`` is set on the last step of a
    success. The task is written per step as ``steps/language_instruction``; the id,
    source, tier and metadata go under ``episode_metadata/``.

    Args:
        episode: The episode.
        action_keys: Write a dict action instead of a vector: ``name -> width``, whose
            widths split ``episode.actions`` columns in this order.
    """
    T = episode.length
    ex = Example()
    feats = ex.features.feature

    def put_float(key: str, arr: np.ndarray) -> None:
        feats[key].float_list.value.extend(np.asarray(arr, np.float32).reshape(-1).tolist())

    def put_int(key: str, arr: np.ndarray) -> None:
        feats[key].int64_list.value.extend(np.asarray(arr, np.int64).reshape(-1).tolist())

    def put_bytes(key: str, values: Sequence[bytes]) -> None:
        feats[key].bytes_list.value.extend(values)

    for k, v in episode.observations.items():
        put_float(f"steps/observation/{k}", v)
    if action_keys is None:
        put_float("steps/action", episode.actions)
    else:
        if sum(action_keys.values()) != episode.actions.shape[1]:
            raise ValueError(
                f"episode {episode.episode_id!r}: action_keys widths sum to {sum(action_keys.values())}, "
                f"actions have {episode.actions.shape[1]}"
            )
        start = 0
        for k, w in action_keys.items():
            put_float(f"steps/action/{k}", episode.actions[:, start : start + w])
            start += w
    reward = np.zeros(T, np.float32)
    if T:
        reward[-1] = episode.return_ if episode.return_ is not None else float(bool(episode.success))
    flags = {name: np.zeros(T, np.int64) for name in ("is_first", "is_last", "is_terminal")}
    if T:
        flags["is_first"][0] = flags["is_last"][-1] = 1
        flags["is_terminal"][-1] = int(bool(episode.success))
    put_float("steps/reward", reward)
    put_float("steps/discount", np.ones(T, np.float32))
    for name, v in flags.items():
        put_int(f"steps/{name}", v)
    put_bytes("steps/language_instruction", [episode.task.encode("utf-8")] * T)
    put_bytes("episode_metadata/episode_id", [episode.episode_id.encode("utf-8")])
    put_bytes("episode_metadata/source", [episode.source.encode("utf-8")])
    if episode.tier is not None:
        put_bytes("episode_metadata/tier", [episode.tier.encode("utf-8")])
    put_bytes("episode_metadata/metadata", [metadata_json(episode).encode("utf-8")])
    return ex.SerializeToString()


_SPLIT_TO_NATIVE = {"train": "train", "holdout": "val", "validation": "validation", "rollout": "rollout", "target": "target"}


def write_rlds(
    path: str | os.PathLike,
    episodes: Iterable[Episode],
    *,
    name: str = "dataset",
    episodes_per_shard: int = 100,
    action_keys: Mapping[str, int] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write episodes as an RLDS dataset folder: ``features.json`` plus TFRecord shards.

    Episodes are streamed (validated, encoded and written one at a time) into
    ``<name>-<split>.tfrecord-XXXXX-of-YYYYY`` files per split (holdout is written as
    TFDS's ``val``); shards are renamed once their count is known.

    Returns:
        The dataset folder.
    """
    path = pathlib.Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if episodes_per_shard <= 0:
        raise ValueError("episodes_per_shard must be positive")
    path.mkdir(parents=True, exist_ok=True)
    check = EpisodeValidator()
    written: dict[str, list[pathlib.Path]] = {}
    counts: dict[str, int] = {}
    handles: dict[str, BinaryIO] = {}
    try:
        for ep in episodes:
            check(ep)
            split = _SPLIT_TO_NATIVE[ep.split]
            n = counts.get(split, 0)
            if n % episodes_per_shard == 0:
                if split in handles:
                    handles.pop(split).close()
                tmp = path / f".{name}-{split}.part-{len(written.get(split, [])):05d}"
                written.setdefault(split, []).append(tmp)
                handles[split] = open(tmp, "wb")
            data = encode_episode_example(ep, action_keys=action_keys)
            length = struct.pack("<Q", len(data))
            handles[split].write(length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data)))
            counts[split] = n + 1
    except BaseException:
        for h in handles.values():
            h.close()
        for tmps in written.values():
            for t in tmps:
                t.unlink(missing_ok=True)
        raise
    for h in handles.values():
        h.close()
    if check.obs_dims is None:
        raise ValueError("write_rlds got no episodes")
    # Old shards go only once the new ones are complete, so a failed overwrite loses nothing.
    for old in path.glob("*.tfrecord-*"):
        old.unlink()
    for split, tmps in written.items():
        for i, t in enumerate(tmps):
            os.replace(t, path / f"{name}-{split}.tfrecord-{i:05d}-of-{len(tmps):05d}")
    spec = features_json(check.obs_dims, check.action_dim, action_keys=action_keys)
    (path / "features.json").write_text(json.dumps(spec, indent=1))
    return path


# ----------------------------------------------------------------------------- reader


class RLDSDataset:
    """Streaming reader of an RLDS / Open X-Embodiment TFRecord folder.

    Args:
        path: Folder with ``*.tfrecord-XXXXX-of-YYYYY`` shards (local path or fsspec URL).
        split_map: Native split (from the shard name) -> one of ``constants.SPLITS``.
        obs_keys: Observation keys (default: every numeric per-step feature under
            ``steps/observation/`` with at most one dimension).
        action_keys: Order of a dict action's keys (default: sorted).
        success: ``"terminal"`` (last ``is_terminal``), ``"reward"`` (any reward > 0) or
            ``"none"``.
        source: Source name (default: ``episode_metadata/source``, else the folder name,
            or its parent's when the folder is a TFDS version like ``0.1.0``).
        max_record_bytes: Largest record accepted.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split_map: Mapping[str, str] | None = None,
        obs_keys: Iterable[str] | None = None,
        action_keys: Sequence[str] | None = None,
        success: str = "terminal",
        source: str | None = None,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        if success not in SUCCESS_MODES:
            raise ValueError(f"success must be one of {SUCCESS_MODES}, got {success!r}")
        self.path = str(path)
        self._fs, self._root = url_to_fs(path)
        self._max = int(max_record_bytes)
        self._success = success
        self._split_map = dict(NATIVE_SPLIT_MAP if split_map is None else split_map)
        files = []
        for full in sorted(self._fs.ls(self._root, detail=False)):
            base = full.rstrip("/").rsplit("/", 1)[-1]
            m = SHARD_RE.match(base)
            if m:
                files.append((base, m.group("split")))
        if not files:
            raise FormatError(f"{self.path}: no '<name>-<split>.tfrecord-XXXXX-of-YYYYY' shards")
        self._shards = [b for b, _ in files]
        self._shard_split = {b: map_split(s, self._split_map, where=f"{self.path}/{b}") for b, s in files}
        parts = self._root.rstrip("/").split("/")
        is_version = re.fullmatch(r"\d+(\.\d+)*", parts[-1]) is not None and len(parts) > 1
        self._default_source = source if source is not None else (parts[-2] if is_version else parts[-1])
        self._source_override = source is not None
        self._spec = self._read_json("features.json")
        self._specs = parse_features_json(self._spec) if self._spec is not None else None
        self._obs_keys_opt = None if obs_keys is None else sorted(obs_keys)
        self._action_keys_opt = None if action_keys is None else list(action_keys)
        self._layout: tuple[dict[str, int], list[str] | None, int] | None = None
        self._action_widths: dict[str, int] = {}
        self._catalog: pa.Table | None = None

    def _read_json(self, name: str) -> Any:
        full = f"{self._root}/{name}"
        if not self._fs.isfile(full):
            return None
        with self._fs.open(full, "rb") as f:
            try:
                return json.loads(f.read())
            except json.JSONDecodeError as exc:
                raise FormatError(f"{self.path}/{name}: invalid JSON ({exc})") from None

    # -- layout -----------------------------------------------------------------------

    def _resolve_layout(self, first: dict[str, tuple[str, Any]] | None = None) -> tuple[dict[str, int], list[str] | None, int]:
        """Observation widths, dict-action key order (None for a vector) and action width."""
        if self._layout is not None:
            return self._layout
        if self._specs is not None:
            widths = {k: s.shape for k, s in self._specs.items() if s.kind == "tensor" and k.startswith("steps/")}
        else:
            if first is None:
                first = parse_example(next(iter_tfrecord(self._shard_path(self._shards[0]), max_record_bytes=self._max, fs=self._fs)))
            T = self._length(first, "<first record>")
            widths = {}
            for k, (kind, v) in first.items():
                if k.startswith("steps/") and kind in ("float", "int64"):
                    if len(v) % T:
                        raise FormatError(f"{self.path}: feature {k!r} has {len(v)} values, not a multiple of T={T}")
                    widths[k] = (len(v) // T,)
        obs_prefix = "steps/observation/"
        obs = {k[len(obs_prefix) :]: shp for k, shp in widths.items() if k.startswith(obs_prefix)}
        if self._obs_keys_opt is not None:
            missing = [k for k in self._obs_keys_opt if k not in obs]
            if missing:
                raise KeyError(f"{self.path}: observation keys {missing} not in the dataset (have {sorted(obs)})")
            obs = {k: obs[k] for k in self._obs_keys_opt}
        else:
            obs = {k: s for k, s in obs.items() if len(s) <= 1}
        obs_dims = {k: int(np.prod(s)) if s else 1 for k, s in obs.items()}
        if "steps/action" in widths:
            s = widths["steps/action"]
            action_keys, action_dim = None, int(np.prod(s)) if s else 1
        else:
            present = sorted(k[len("steps/action/") :] for k in widths if k.startswith("steps/action/"))
            if not present:
                raise FormatError(f"{self.path}: no steps/action feature")
            action_keys = self._action_keys_opt or present
            if sorted(action_keys) != present:
                raise KeyError(f"{self.path}: action_keys {action_keys} differ from the dataset's {present}")
            self._action_widths = {}
            for k in action_keys:
                s = widths[f"steps/action/{k}"]
                self._action_widths[k] = int(np.prod(s)) if s else 1
            action_dim = sum(self._action_widths.values())
        if any(d <= 0 for d in obs_dims.values()) or action_dim <= 0:
            raise FormatError(f"{self.path}: features with unknown (-1) or zero widths: {obs_dims}, action {action_dim}")
        self._layout = (obs_dims, action_keys, action_dim)
        return self._layout

    @property
    def obs_keys(self) -> list[str]:
        return sorted(self._resolve_layout()[0])

    @property
    def obs_dims(self) -> dict[str, int]:
        return dict(self._resolve_layout()[0])

    @property
    def action_dim(self) -> int:
        return self._resolve_layout()[2]

    @property
    def action_keys(self) -> list[str] | None:
        """Order of a dict action's keys in the flattened vector (None for a vector action)."""
        keys = self._resolve_layout()[1]
        return None if keys is None else list(keys)

    # -- public API -------------------------------------------------------------------

    def shards(self) -> list[str]:
        """TFRecord shard file names, sorted."""
        return list(self._shards)

    def iter_shard(self, unit: str) -> Iterator[Episode]:
        """Episodes of one shard, one record at a time."""
        yield from self._iter(unit, arrays=True)

    def episodes(self, ids: Iterable[str] | None = None, split: str | None = None) -> Iterator[Episode]:
        """Stream episodes shard by shard; shards of another split are not opened.

        Ids are matched while streaming (there is no index to consult first): unknown
        ids raise ``KeyError`` after the scan.
        """
        units = [u for u in self._shards if split is None or self._shard_split[u] == split]
        stream = (ep for u in units for ep in self._iter(u, arrays=True))
        yield from filter_stream(stream, ids, split)

    def catalog(self) -> pa.Table:
        """Episode-level table. Scans every record once (cached); step arrays are not kept."""
        if self._catalog is None:
            rows = [episode_row(ep) for u in self._shards for ep in self._iter(u, arrays=False)]
            ids = [r["episode_id"] for r in rows]
            if len(set(ids)) != len(ids):
                dup = next(e for e in ids if ids.count(e) > 1)
                raise FormatError(f"{self.path}: duplicate episode_id {dup!r}")
            self._catalog = pa.Table.from_pylist(rows, schema=EPISODE_SCHEMA)
        return self._catalog

    def __len__(self) -> int:
        info = self._read_json("dataset_info.json")
        if isinstance(info, dict) and isinstance(info.get("splits"), list):
            try:
                return sum(int(n) for s in info["splits"] for n in s.get("shardLengths", []))
            except (TypeError, ValueError):
                pass
        return self.catalog().num_rows

    # -- decoding ---------------------------------------------------------------------

    def _shard_path(self, unit: str) -> str:
        return f"{self._root}/{unit}"

    def _iter(self, unit: str, *, arrays: bool) -> Iterator[Episode]:
        if unit not in self._shard_split:
            raise KeyError(f"{unit!r} is not a shard of {self.path}")
        for i, data in enumerate(iter_tfrecord(self._shard_path(unit), max_record_bytes=self._max, fs=self._fs)):
            where = f"{self.path}/{unit}: record {i}"
            try:
                feats = parse_example(data)
            except DecodeError as exc:
                raise TFRecordError(f"{where}: not a tf.train.Example ({exc})") from None
            yield self._episode(feats, unit, i, where, arrays=arrays)

    def _length(self, feats: dict[str, tuple[str, Any]], where: str) -> int:
        for key in ("steps/is_first", "steps/is_last", "steps/reward"):
            if key in feats and feats[key][0] != "empty":
                T = len(feats[key][1])
                if T == 0:
                    raise FormatError(f"{where}: episode has length 0")
                return T
        raise FormatError(f"{where}: no steps/is_first, steps/is_last or steps/reward to give the episode length")

    def _episode(self, feats: dict[str, tuple[str, Any]], unit: str, index: int, where: str, *, arrays: bool) -> Episode:
        T = self._length(feats, where)
        obs_dims, action_keys, action_dim = self._resolve_layout(feats)

        def text(key: str) -> str | None:
            kind, v = feats.get(key, ("empty", None))
            if kind == "bytes" and v:
                return v[0].decode("utf-8", errors="replace")
            if kind == "int64" and len(v):
                return str(int(v[0]))
            return None

        eid = text("episode_metadata/episode_id") or f"{unit}#{index}"
        where = f"{where} (episode {eid!r})"

        def matrix(key: str, width: int) -> np.ndarray:
            kind, v = feats.get(key, ("empty", None))
            if kind not in ("float", "int64"):
                raise FormatError(f"{where}: feature {key!r} missing or not numeric")
            if v.size != T * width:
                raise FormatError(f"{where}: feature {key!r} has {v.size} values, expected T={T} x {width}")
            return v.astype(np.float32, copy=False).reshape(T, width)

        if arrays:
            obs = {k: matrix(f"steps/observation/{k}", d) for k, d in obs_dims.items()}
            if action_keys is None:
                actions = matrix("steps/action", action_dim)
            else:
                parts = [matrix(f"steps/action/{k}", self._action_widths[k]) for k in action_keys]
                actions = np.concatenate(parts, axis=1)
        else:
            obs, actions = {}, np.zeros((T, 1), np.float32)
        rewards = feats.get("steps/reward", ("empty", None))[1]
        if rewards is not None and len(rewards) != T:
            raise FormatError(f"{where}: steps/reward has {len(rewards)} values, expected {T}")
        terminal = feats.get("steps/is_terminal", ("empty", None))[1]
        if self._success == "terminal":
            success = None if terminal is None or len(terminal) != T else bool(terminal[-1])
        elif self._success == "reward":
            success = None if rewards is None else bool(np.any(rewards > 0))
        else:
            success = None
        meta_text = text("episode_metadata/metadata")
        if meta_text is not None:
            metadata = parse_metadata(meta_text, eid)
        else:
            metadata = {}
            for k, (kind, v) in feats.items():
                if k.startswith("episode_metadata/") and k[17:] not in _META_FIELDS:
                    if kind == "bytes" and len(v) == 1:
                        metadata[k[17:]] = v[0].decode("utf-8", errors="replace")
                    elif kind in ("float", "int64") and len(v) == 1:
                        metadata[k[17:]] = v[0].item()
        source = self._default_source if self._source_override else (text("episode_metadata/source") or self._default_source)
        ep = Episode(
            episode_id=eid,
            observations=obs,
            actions=actions,
            split=self._shard_split[unit],
            source=source,
            task=text("steps/language_instruction") or "",
            success=success,
            return_=None if rewards is None else float(np.sum(rewards, dtype=np.float64)),
            tier=text("episode_metadata/tier"),
            metadata=metadata,
        )
        if arrays:
            validate_episode(ep, obs_dims=obs_dims, action_dim=action_dim)
        return ep


def open_rlds(path: str | os.PathLike, **options: Any) -> RLDSDataset:
    """Open an RLDS TFRecord folder; options as :class:`RLDSDataset`."""
    return RLDSDataset(path, **options)
