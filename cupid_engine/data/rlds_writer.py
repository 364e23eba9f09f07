"""RLDS writer: episodes as OXE-layout ``tf.train.Example`` records in TFDS shards.

For fixtures and exports: :func:`encode_episode_example` (one episode, one record) and
:func:`write_rlds` (a TFDS-readable folder: shards, ``features.json``,
``dataset_info.json``). Read back with :class:`cupid_engine.data.rlds.RLDSDataset`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np

from cupid_engine.data.episode import Episode, encode_png
from cupid_engine.data.rlds_spec import VERSION_RE, Example, features_json
from cupid_engine.data.schema import EpisodeValidator, metadata_json
from cupid_engine.data.tfrecord import frame_record

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
            handles[split].write(frame_record(encode_episode_example(ep, action_keys=action_keys)))
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
