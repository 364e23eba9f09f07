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
at most one dimension (depth maps and other multi-dimensional tensors are skipped) unless
``obs_keys`` names them. Image features (TFDS ``Image``: one PNG/JPEG per step, decoded
lazily with Pillow; or a raw ``uint8 [H, W, C]`` tensor) become ``Episode.images``. Text
features are language, not observations: the step-level ``language_instruction`` (or
RT-1's ``observation/natural_language_instruction``) becomes the episode's ``task``.
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

from cupid_engine.data._util import NATIVE_SPLIT_MAP, filter_stream, map_split, select_keys, task_from_instructions, url_to_fs
from cupid_engine.data.episode import Episode, ImageSequence, decode_image, encode_png
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
# TFDS names shards NAME-SPLIT.tfrecord-00000-of-00128; rlds' EpisodeWriter leaves out -of-N.
SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<split>[A-Za-z0-9_]+)\.tfrecord-(?P<index>\d{5})(?:-of-(?P<count>\d{5}))?$")
VERSION_RE = re.compile(r"^\d+(\.\d+)*$")
"""A TFDS version folder (``1.0.0``) inside a builder folder."""
# Episode-level fields our writer adds under episode_metadata/ so a round trip is exact.
_META_FIELDS = ("episode_id", "source", "tier", "metadata")
# Step-level text features read as the episode's language instruction, in order of preference.
LANGUAGE_FEATURES = ("steps/language_instruction", "steps/observation/natural_language_instruction")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF")
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
    image_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """A TFDS ``features.json`` for episodes written by :func:`encode_episode_example`.

    Args:
        obs_dims: ``observation key -> width``.
        action_dim: Width of a vector ``steps/action`` (when ``action_keys`` is None).
        action_keys: ``name -> width`` of a dict action, in vector order.
        image_shapes: ``camera key -> (H, W, C)``, written as PNG ``Image`` features.
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
    def image(shape: Sequence[int]) -> dict[str, Any]:
        return {
            "pythonClassName": ns + "image_feature.Image",
            "image": {"shape": {"dimensions": [str(int(s)) for s in shape]}, "dtype": "uint8", "encodingFormat": "png"},
        }

    observation = {k: tensor([d]) for k, d in obs_dims.items()}
    observation.update({k: image(s) for k, s in (image_shapes or {}).items()})
    steps = fdict(
        {
            "observation": fdict(observation),
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
    for k in episode.images:
        # TFDS Image: one encoded image per step; PNG so the pixels come back exactly.
        put_bytes(f"steps/observation/{k}", [encode_png(f) for f in episode.image_array(k)])
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
    ``<name>-<split>.tfrecord-XXXXX-of-YYYYY`` files per split, with the TFDS
    ``dataset_info.json`` that ``tfds.builder_from_directory`` reads (holdout is written as
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
    spec = features_json(check.obs_dims, check.action_dim, action_keys=action_keys, image_shapes=check.image_shapes)
    (path / "features.json").write_text(json.dumps(spec, indent=1))
    (path / "dataset_info.json").write_text(json.dumps(_dataset_info(path, name, written, counts, episodes_per_shard), indent=2))
    return path


def _dataset_info(path: pathlib.Path, name: str, written: Mapping[str, list], counts: Mapping[str, int], per_shard: int) -> dict[str, Any]:
    """TFDS ``dataset_info.json`` for the shards just written (``tfds.builder_from_directory``
    needs it beside ``features.json``); the version is the folder name when it is one."""
    splits = []
    for split, tmps in sorted(written.items()):
        n = len(tmps)
        files = [path / f"{name}-{split}.tfrecord-{i:05d}-of-{n:05d}" for i in range(n)]
        splits.append(
            {
                "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                "name": split,
                "numBytes": str(sum(f.stat().st_size for f in files)),
                "shardLengths": [str(min(per_shard, counts[split] - i * per_shard)) for i in range(n)],
            }
        )
    version = path.name if VERSION_RE.match(path.name) and path.name.count(".") == 2 else "1.0.0"
    return {"fileFormat": "tfrecord", "name": name, "splits": splits, "version": version}


# ----------------------------------------------------------------------------- reader


class RLDSDataset:
    """Streaming reader of an RLDS / Open X-Embodiment TFRecord folder.

    Args:
        path: Folder with ``<name>-<split>.tfrecord-XXXXX[-of-YYYYY]`` shards, or a TFDS
            builder folder holding version folders (``<builder>/1.0.0/``), of which the
            newest is read unless ``version`` names one (local path or fsspec URL).
        split_map: Native split (from the shard name) -> one of ``constants.SPLITS``.
        obs_keys: Observation keys (default: every numeric per-step feature under
            ``steps/observation/`` with at most one dimension, except embeddings such as
            RT-1's ``natural_language_embedding``). What the default leaves out is listed
            by name and shape in :attr:`skipped_fields`; naming it here reads it
            (flattened per step).
        action_keys: Order of a dict action's keys (default: sorted).
        success: ``"terminal"`` (last ``is_terminal``), ``"reward"`` (any reward > 0) or
            ``"none"``.
        source: Source name (default: ``episode_metadata/source``, else the folder name,
            or its parent's when the folder is a TFDS version like ``0.1.0``).
        max_record_bytes: Largest record accepted.
        version: Version folder to read when ``path`` is a builder folder.

    The episode id is ``episode_metadata/episode_id``, else a top-level ``episode_id``,
    else ``<shard>#<record>``. Other episode-level values (``episode_metadata/*`` and
    top-level scalars such as the robomimic TFDS filter-key flags) go to ``metadata``.
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
        version: str | None = None,
    ) -> None:
        if success not in SUCCESS_MODES:
            raise ValueError(f"success must be one of {SUCCESS_MODES}, got {success!r}")
        self.path = str(path)
        self._fs, self._root = url_to_fs(path)
        self._max = int(max_record_bytes)
        self._success = success
        self._split_map = dict(NATIVE_SPLIT_MAP if split_map is None else split_map)
        self._root, self.version = resolve_builder_version(self._fs, self._root, version, where=self.path)
        files = [(b, SHARD_RE.match(b).group("split")) for b in shard_names(self._fs, self._root)]
        if not files:
            raise FormatError(f"{self.path}: no '<name>-<split>.tfrecord-XXXXX[-of-YYYYY]' shards")
        self._shards = [b for b, _ in files]
        self._shard_split = {b: map_split(s, self._split_map, where=f"{self.path}/{b}") for b, s in files}
        parts = self._root.rstrip("/").split("/")
        is_version = VERSION_RE.match(parts[-1]) is not None and len(parts) > 1
        self._default_source = source if source is not None else (parts[-2] if is_version else parts[-1])
        self._source_override = source is not None
        self._spec = self._read_json("features.json")
        self._specs = parse_features_json(self._spec) if self._spec is not None else None
        self._obs_keys_opt = None if obs_keys is None else sorted(obs_keys)
        self._action_keys_opt = None if action_keys is None else list(action_keys)
        self._layout: tuple[dict[str, int], list[str] | None, int] | None = None
        self._action_widths: dict[str, int] = {}
        self._skipped: dict[str, str] = {}
        self._images: dict[str, tuple[str, tuple[int, int, int]]] = {}
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
        skipped: dict[str, str] = {}
        if self._specs is not None:
            widths = {k: s.shape for k, s in self._specs.items() if s.kind == "tensor" and k.startswith("steps/")}
            for k, s in self._specs.items():
                if k.startswith("steps/") and k not in widths and s.kind not in ("text", "image"):
                    skipped[k] = f"{s.kind} {s.dtype} {list(s.shape)}"
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
        images = self._find_images(first, obs)
        obs = {k: s for k, s in obs.items() if k not in images}
        if self._obs_keys_opt is not None:
            lowdim, cameras = select_keys(
                self._obs_keys_opt, obs, images, where=self.path,
                skipped={k[len(obs_prefix) :]: v for k, v in skipped.items() if k.startswith(obs_prefix)},
            )
            obs = {k: obs[k] for k in lowdim}
            images = {k: images[k] for k in cameras}
        else:
            for k, s in sorted(obs.items()):
                dtype = self._specs[obs_prefix + k].dtype if self._specs is not None else "float32"
                if "embedding" in k:
                    skipped[obs_prefix + k] = f"embedding {dtype} {list(s)}"
                elif len(s) > 1:
                    skipped[obs_prefix + k] = f"{dtype} {list(s)} (not a vector)"
            obs = {k: s for k, s in obs.items() if obs_prefix + k not in skipped}
        used = {obs_prefix + k for k in obs} | {"steps/action"} | {k for k in widths if k.startswith("steps/action/")}
        for k, s in widths.items():
            # Step fields the reader interprets itself (flags, reward, discount) are not dropped.
            if k not in used and k not in skipped and not k.startswith(obs_prefix) and k not in _STEP_FIELDS:
                skipped[k] = f"tensor {self._specs[k].dtype if self._specs is not None else 'float32'} {list(s)}"
        self._skipped = skipped
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
        self._images = images
        self._layout = (obs_dims, action_keys, action_dim)
        return self._layout

    def _find_images(self, first: dict[str, tuple[str, Any]] | None, tensors: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, tuple[int, int, int]]]:
        """Camera key -> (``encoded`` | ``raw``, (H, W, C)) of the image observations.

        From ``features.json``: TFDS ``Image`` features (encoded per step) and ``uint8``
        tensors of rank 3 (raw pixels). Without it: byte features under
        ``steps/observation/`` holding one PNG/JPEG/... per step (shape from the first).
        """
        prefix = "steps/observation/"
        out: dict[str, tuple[str, tuple[int, int, int]]] = {}
        if self._specs is not None:
            for k, sp in self._specs.items():
                if not k.startswith(prefix):
                    continue
                key = k[len(prefix) :]
                if sp.kind == "image" or (sp.kind == "tensor" and sp.dtype == "uint8" and len(sp.shape) == 3 and key in tensors):
                    shape = tuple(sp.shape)
                    if len(shape) == 2:
                        shape = (*shape, 1)
                    if len(shape) != 3:
                        raise FormatError(f"{self.path}: image feature {k!r} has shape {list(sp.shape)}, expected [H, W, C]")
                    if min(shape) <= 0:
                        shape = self._first_image_shape(k)
                    out[key] = ("encoded" if sp.kind == "image" else "raw", shape)  # type: ignore[assignment]
            return out
        if first is None:
            first = parse_example(next(iter_tfrecord(self._shard_path(self._shards[0]), max_record_bytes=self._max, fs=self._fs)))
        T = self._length(first, "<first record>")
        for k, (kind, v) in first.items():
            if k.startswith(prefix) and kind == "bytes" and len(v) == T and bytes(v[0][:4]).startswith(_IMAGE_MAGIC):
                out[k[len(prefix) :]] = ("encoded", decode_image(v[0], what=f"{self.path}: first record, {k}").shape)
        return out

    def _first_image_shape(self, key: str) -> tuple[int, int, int]:
        """Frame shape of an image feature declared with unknown (-1) sizes: the first frame's."""
        first = parse_example(next(iter_tfrecord(self._shard_path(self._shards[0]), max_record_bytes=self._max, fs=self._fs)))
        kind, v = first.get(key, ("empty", None))
        if kind != "bytes" or not v:
            raise FormatError(f"{self.path}: image feature {key!r} has unknown size and no frame in the first record")
        return decode_image(v[0], what=f"{self.path}: first record, {key}").shape  # type: ignore[return-value]

    @property
    def obs_keys(self) -> list[str]:
        return sorted(self._resolve_layout()[0])

    @property
    def image_keys(self) -> list[str]:
        """Camera keys (``Episode.images``), sorted."""
        self._resolve_layout()
        return sorted(self._images)

    @property
    def image_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``camera key -> (H, W, C)`` of every frame."""
        self._resolve_layout()
        return {k: v[1] for k, v in self._images.items()}

    @property
    def skipped_fields(self) -> dict[str, str]:
        """Per-step features not read, ``name -> "kind dtype [shape]"`` (embeddings,
        tensors that are not vectors, feature types without a reader)."""
        self._resolve_layout()
        return dict(self._skipped)

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

        eid = text("episode_metadata/episode_id") or text("episode_id") or f"{unit}#{index}"
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
            images = {k: self._image_view(feats, k, kind, hwc, T, where) for k, (kind, hwc) in self._images.items()}
        else:
            obs, actions, images = {}, np.zeros((T, 1), np.float32), {}
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
                elif "/" not in k and k != "episode_id" and kind != "empty" and len(v) == 1:
                    # top-level episode features (e.g. robomimic TFDS filter-key flags)
                    metadata[k] = v[0].decode("utf-8", errors="replace") if kind == "bytes" else v[0].item()
        source = self._default_source if self._source_override else (text("episode_metadata/source") or self._default_source)
        task = ""
        for key in LANGUAGE_FEATURES:
            kind, v = feats.get(key, ("empty", None))
            if kind == "bytes" and v:
                if len(v) != T:
                    raise FormatError(f"{where}: {key} has {len(v)} values, expected one per step ({T})")
                task = task_from_instructions([b.decode("utf-8", errors="replace") for b in v], metadata)
                break
        ep = Episode(
            episode_id=eid,
            observations=obs,
            actions=actions,
            split=self._shard_split[unit],
            source=source,
            task=task,
            success=success,
            return_=None if rewards is None else float(np.sum(rewards, dtype=np.float64)),
            tier=text("episode_metadata/tier"),
            metadata=metadata,
            images=images,
        )
        if arrays:
            validate_episode(ep, obs_dims=obs_dims, action_dim=action_dim, image_shapes=self.image_shapes)
        return ep

    def _image_view(self, feats: dict[str, tuple[str, Any]], key: str, kind: str, hwc: tuple[int, int, int], T: int, where: str) -> Any:
        """One camera of one record: a lazy view over encoded frames, or the raw pixels."""
        name = f"steps/observation/{key}"
        fkind, v = feats.get(name, ("empty", None))
        what = f"{where}, {name}"
        n = int(np.prod(hwc))
        if kind == "encoded":
            if fkind != "bytes" or len(v) != T:
                got = "nothing" if fkind == "empty" else f"{fkind} x {len(v)}"
                raise FormatError(f"{what}: expected {T} encoded images, found {got}")
            return ImageSequence.from_encoded(v, hwc, what=what)
        if fkind == "int64" and v.size == T * n:
            if v.size and (v.min() < 0 or v.max() > 255):
                raise FormatError(f"{what}: raw uint8 image holds values outside 0..255")
            return v.astype(np.uint8).reshape(T, *hwc)
        if fkind == "bytes" and sum(len(b) for b in v) == T * n:
            return np.frombuffer(b"".join(v), np.uint8).reshape(T, *hwc)
        raise FormatError(f"{what}: raw image needs {T} x {list(hwc)} uint8 values, found {fkind} of size {0 if v is None else len(v)}")


_STEP_FIELDS = ("steps/reward", "steps/discount", "steps/is_first", "steps/is_last", "steps/is_terminal")


def shard_names(fs: Any, root: str) -> list[str]:
    """Sorted TFRecord shard file names directly inside ``root``."""
    names = [full.rstrip("/").rsplit("/", 1)[-1] for full in fs.ls(root, detail=False)]
    return sorted(n for n in names if SHARD_RE.match(n))


def builder_versions(fs: Any, root: str) -> list[str]:
    """Version folders of a TFDS builder folder that hold shards, oldest first."""
    out = []
    for full in fs.ls(root, detail=False):
        name = full.rstrip("/").rsplit("/", 1)[-1]
        if VERSION_RE.match(name) and fs.isdir(f"{root}/{name}") and shard_names(fs, f"{root}/{name}"):
            out.append(name)
    return sorted(out, key=lambda v: tuple(int(x) for x in v.split(".")))


def resolve_builder_version(fs: Any, root: str, version: str | None, *, where: str) -> tuple[str, str | None]:
    """``(folder holding the shards, version read)`` for a shard folder or a builder folder.

    Raises:
        FormatError: If ``version`` is not one of the builder's versions, or is given for
            a folder that holds shards itself.
    """
    if shard_names(fs, root):
        if version is not None and root.rstrip("/").rsplit("/", 1)[-1] != version:
            raise FormatError(f"{where}: holds shards itself; version={version!r} applies to builder folders only")
        last = root.rstrip("/").rsplit("/", 1)[-1]
        return root, (last if VERSION_RE.match(last) else None)
    versions = builder_versions(fs, root)
    if version is not None:
        if version not in versions:
            raise FormatError(f"{where}: no version {version!r} with shards (have {versions})")
        return f"{root}/{version}", version
    if versions:
        return f"{root}/{versions[-1]}", versions[-1]
    return root, None


def open_rlds(path: str | os.PathLike, **options: Any) -> RLDSDataset:
    """Open an RLDS TFRecord folder; options as :class:`RLDSDataset`."""
    return RLDSDataset(path, **options)
