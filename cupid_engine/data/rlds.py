"""RLDS TFRecord shards (Open X-Embodiment) read without TensorFlow.

Open X-Embodiment ships each dataset as TFDS-built RLDS: a folder with
``features.json`` (the TFDS feature spec), ``dataset_info.json`` and shards
``<name>-<split>.tfrecord-00000-of-00128``. Each record is one serialised
``tf.train.Example`` holding a whole episode, with the step features flattened and
concatenated over steps: ``steps/observation/<key>``, ``steps/action`` (or a dict
``steps/action/<key>``), ``steps/is_first``, ``steps/is_last``, ``steps/is_terminal``,
``steps/reward``, ``steps/language_instruction``, plus ``episode_metadata/<key>``.

This module owns :class:`RLDSDataset`, the streaming reader (one record, i.e. one
episode, in memory). Its parts live beside it: TFRecord framing and CRCs in
:mod:`cupid_engine.data.tfrecord`, the ``tf.train.Example`` classes and TFDS feature
spec in :mod:`cupid_engine.data.rlds_spec`, the writer in
:mod:`cupid_engine.data.rlds_writer`; their public names are re-exported here.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError

from cupid_engine.data._util import NATIVE_SPLIT_MAP, filter_stream, first_duplicate, map_split, select_keys, task_from_instructions, url_to_fs
from cupid_engine.data.episode import Episode, ImageSequence, decode_image
from cupid_engine.data.rlds_spec import (
    META_FIELDS,
    SHARD_RE,
    VERSION_RE,
    BytesList,
    Example,
    Feature,
    Features,
    FeatureSpec,
    FloatList,
    Int64List,
    features_json,
    parse_example,
    parse_features_json,
)
from cupid_engine.data.rlds_writer import encode_episode_example, write_rlds
from cupid_engine.data.schema import (
    EPISODE_SCHEMA,
    FormatError,
    episode_row,
    parse_metadata,
    validate_episode,
)
from cupid_engine.data.tfrecord import DEFAULT_MAX_RECORD_BYTES, TFRecordError, iter_tfrecord, masked_crc32c, write_tfrecord

__all__ = [
    "SHARD_RE",
    "VERSION_RE",
    "BytesList",
    "Example",
    "Feature",
    "FeatureSpec",
    "Features",
    "FloatList",
    "Int64List",
    "RLDSDataset",
    "TFRecordError",
    "builder_versions",
    "encode_episode_example",
    "features_json",
    "iter_tfrecord",
    "masked_crc32c",
    "open_rlds",
    "parse_example",
    "parse_features_json",
    "resolve_builder_version",
    "shard_names",
    "write_rlds",
    "write_tfrecord",
]

SUCCESS_MODES = ("terminal", "reward", "none")
# Step-level text features read as the episode's language instruction, in order of preference.
LANGUAGE_FEATURES = ("steps/language_instruction", "steps/observation/natural_language_instruction")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF")


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
            if (dup := first_duplicate(ids)) is not None:
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
                if k.startswith("episode_metadata/") and k[17:] not in META_FIELDS:
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
