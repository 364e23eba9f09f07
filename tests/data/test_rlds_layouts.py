"""RLDS layouts written by the upstream tools: EpisodeWriter shard names, TFDS builder
folders, top-level episode ids, and per-step features the reader does not use by default."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from cupid_engine.data import FormatError, RLDSDataset, detect_format, open_source
from cupid_engine.data.rlds import Example, encode_episode_example, features_json, write_rlds, write_tfrecord

from .helpers import assert_same_episode, make_episodes


def _records_without_metadata_id(eps):
    """Encoded episodes whose id sits at the top level (``episode_id``), as TFDS builders
    such as robomimic_mh write it, instead of under ``episode_metadata/``."""
    out = []
    for ep in eps:
        ex = Example()
        ex.ParseFromString(encode_episode_example(ep))
        feats = ex.features.feature
        del feats["episode_metadata/episode_id"]
        feats["episode_id"].bytes_list.value.append(ep.episode_id.encode())
        feats["better"].int64_list.value.append(1)  # a top-level filter-key flag
        out.append(ex.SerializeToString())
    return out


def test_episode_writer_shard_names_and_top_level_episode_id(tmp_path, rng):
    eps = make_episodes(rng, 5, splits=("train",))
    root = tmp_path / "my_rlds"
    root.mkdir()
    records = _records_without_metadata_id(eps)
    # rlds' EpisodeWriter: NAME-SPLIT.tfrecord-00000, no -of-N
    write_tfrecord(root / "my_rlds-train.tfrecord-00000", records[:3])
    write_tfrecord(root / "my_rlds-train.tfrecord-00001", records[3:])
    (root / "features.json").write_text(json.dumps(features_json({"gripper": 1, "state": 5}, 3)))
    assert detect_format(root) == "rlds"
    ds = open_source(root)
    assert isinstance(ds, RLDSDataset)
    assert ds.shards() == ["my_rlds-train.tfrecord-00000", "my_rlds-train.tfrecord-00001"]
    got = list(ds.episodes())
    assert [e.episode_id for e in got] == [e.episode_id for e in eps]
    for a, b in zip(eps, got, strict=True):
        assert_same_episode(a, b, fields=("episode_id", "split", "task", "success", "return_", "tier", "metadata"))
    ds2 = RLDSDataset(root)
    assert [e.episode_id for e in ds2.episodes(ids=[eps[4].episode_id])] == [eps[4].episode_id]
    # without our metadata JSON, top-level scalars become metadata
    ex = Example()
    ex.ParseFromString(records[0])
    del ex.features.feature["episode_metadata/metadata"]
    plain = tmp_path / "plain"
    plain.mkdir()
    write_tfrecord(plain / "plain-train.tfrecord-00000", [ex.SerializeToString()])
    ep = next(RLDSDataset(plain).episodes())
    assert ep.episode_id == eps[0].episode_id and ep.metadata == {"better": 1}


def _version(builder, version, eps):
    d = builder / version
    d.mkdir(parents=True)
    write_tfrecord(d / f"{builder.name}-train.tfrecord-00000-of-00001", [encode_episode_example(e) for e in eps])
    (d / "features.json").write_text(json.dumps(features_json({"gripper": 1, "state": 5}, 3)))


def test_tfds_builder_folder_picks_newest_or_named_version(tmp_path, rng):
    builder = tmp_path / "fractal20220817_data"
    old, new = make_episodes(rng, 2, prefix="old", splits=("train",)), make_episodes(rng, 3, prefix="new", splits=("train",))
    _version(builder, "0.1.0", old)
    _version(builder, "0.10.0", new)  # newer than 0.9.x: compared as numbers, not text
    _version(builder, "0.9.0", old)
    (builder / "1.0.0").mkdir()  # an empty version folder (download in progress) is not a version
    assert detect_format(builder) == "rlds"
    ds = open_source(builder)
    assert ds.version == "0.10.0" and [e.episode_id for e in ds.episodes()] == [e.episode_id for e in new]
    assert {e.source for e in ds.episodes()} == {"unit"}
    pinned = open_source(builder, version="0.1.0")
    assert pinned.version == "0.1.0" and [e.episode_id for e in pinned.episodes()] == [e.episode_id for e in old]
    with pytest.raises(FormatError, match=r"no version '2\.0\.0' with shards \(have \['0\.1\.0', '0\.9\.0', '0\.10\.0'\]\)"):
        RLDSDataset(builder, version="2.0.0")
    with pytest.raises(FormatError, match="builder folders only"):
        RLDSDataset(builder / "0.1.0", version="0.9.0")
    assert RLDSDataset(builder / "0.1.0", version="0.1.0").version == "0.1.0"


def _rt1_like(root, rng, n=2):
    """RT-1 (fractal) step features: a 512-d instruction embedding and a [3, 3] rotation."""
    ns = "tensorflow_datasets.core.features."

    def tensor(shape):
        return {"pythonClassName": ns + "tensor_feature.Tensor", "tensor": {"shape": {"dimensions": [str(s) for s in shape]}, "dtype": "float32", "encoding": "none"}}

    spec = features_json({"base_pose_tool_reached": 7}, 3)
    obs = spec["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]["observation"]["featuresDict"]["features"]
    obs["natural_language_embedding"] = tensor([512])
    obs["orientation_matrix"] = tensor([3, 3])
    steps = spec["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]
    steps["language_embedding"] = tensor([16])
    root.mkdir(parents=True)
    (root / "features.json").write_text(json.dumps(spec))
    eps = make_episodes(rng, n, obs_dims={"base_pose_tool_reached": 7}, splits=("train",))
    records, extra = [], []
    for ep in eps:
        ex = Example()
        ex.ParseFromString(encode_episode_example(ep))
        f = ex.features.feature
        cols = {
            "steps/observation/natural_language_embedding": rng.standard_normal((ep.length, 512)).astype(np.float32),
            "steps/observation/orientation_matrix": rng.standard_normal((ep.length, 3, 3)).astype(np.float32),
            "steps/language_embedding": rng.standard_normal((ep.length, 16)).astype(np.float32),
        }
        for k, v in cols.items():
            f[k].float_list.value.extend(v.reshape(-1).tolist())
        records.append(ex.SerializeToString())
        extra.append(cols)
    write_tfrecord(root / "fractal-train.tfrecord-00000-of-00001", records)
    return eps, extra


def test_embeddings_and_non_vector_tensors_are_reported_not_read(tmp_path, rng, caplog):
    root = tmp_path / "fractal" / "0.1.0"
    eps, extra = _rt1_like(root, rng)
    with caplog.at_level(logging.INFO, logger="cupid_engine.data"):
        ds = open_source(root)
        ds.obs_keys
    assert ds.obs_keys == ["base_pose_tool_reached"]
    assert ds.skipped_fields == {
        "steps/observation/natural_language_embedding": "embedding float32 [512]",
        "steps/observation/orientation_matrix": "float32 [3, 3] (not a vector)",
        "steps/language_embedding": "tensor float32 [16]",
    }
    notes = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert len(notes) == 1, notes
    for name in ("natural_language_embedding", "embedding float32 [512]", "orientation_matrix", "[3, 3]", "steps/language_embedding"):
        assert name in notes[0]
    assert all(set(e.observations) == {"base_pose_tool_reached"} for e in ds.episodes())
    chosen = RLDSDataset(root, obs_keys=["base_pose_tool_reached", "natural_language_embedding", "orientation_matrix"])
    assert chosen.obs_dims == {"base_pose_tool_reached": 7, "natural_language_embedding": 512, "orientation_matrix": 9}
    for ep, cols in zip(chosen.episodes(), extra, strict=True):
        np.testing.assert_array_equal(ep.observations["orientation_matrix"], cols["steps/observation/orientation_matrix"].reshape(ep.length, 9))
        np.testing.assert_array_equal(ep.observations["natural_language_embedding"], cols["steps/observation/natural_language_embedding"])
    assert "steps/observation/natural_language_embedding" not in chosen.skipped_fields


def test_writer_adds_the_tfds_dataset_info(tmp_path, rng):
    """tfds.builder_from_directory needs dataset_info.json beside features.json."""
    eps = make_episodes(rng, 5)  # 3 train, 2 holdout (written as TFDS "val")
    root = write_rlds(tmp_path / "mine" / "2.1.0", eps, name="mine", episodes_per_shard=2)
    info = json.loads((root / "dataset_info.json").read_text())
    assert info["name"] == "mine" and info["version"] == "2.1.0" and info["fileFormat"] == "tfrecord"
    splits = {s["name"]: s for s in info["splits"]}
    assert splits["train"]["shardLengths"] == ["2", "1"] and splits["val"]["shardLengths"] == ["2"]
    assert all(s["filepathTemplate"] == "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}" for s in info["splits"])
    size = sum(p.stat().st_size for p in root.glob("mine-train.tfrecord-*"))
    assert splits["train"]["numBytes"] == str(size)
    assert len(RLDSDataset(tmp_path / "mine")) == 5
    assert json.loads((write_rlds(tmp_path / "plain", eps[:1]) / "dataset_info.json").read_text())["version"] == "1.0.0"
