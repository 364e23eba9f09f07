"""The RLDS layout on disk: shard names, ``tf.train.Example`` classes, TFDS feature specs.

* ``tf.train.Example`` protobuf classes, built at runtime from a ``FileDescriptorProto``
  in a private descriptor pool (no protoc, no TensorFlow, no clash with TensorFlow's own
  classes if it is installed), and :func:`parse_example`;
* the TFDS ``features.json`` spec: :func:`parse_features_json` (read) and
  :func:`features_json` (write);
* shard and version folder names (:data:`SHARD_RE`, :data:`VERSION_RE`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from cupid_engine.data.schema import FormatError

# TFDS names shards NAME-SPLIT.tfrecord-00000-of-00128; rlds' EpisodeWriter leaves out -of-N.
SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<split>[A-Za-z0-9_]+)\.tfrecord-(?P<index>\d{5})(?:-of-(?P<count>\d{5}))?$")
VERSION_RE = re.compile(r"^\d+(\.\d+)*$")
"""A TFDS version folder (``1.0.0``) inside a builder folder."""
# Episode-level fields our writer adds under episode_metadata/ so a round trip is exact.
META_FIELDS = ("episode_id", "source", "tier", "metadata")


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
    meta = fdict({k: text for k in META_FIELDS})
    return fdict(
        {
            "steps": {"pythonClassName": ns + "dataset_feature.Dataset", "sequence": {"feature": steps, "length": "-1"}},
            "episode_metadata": meta,
        }
    )
