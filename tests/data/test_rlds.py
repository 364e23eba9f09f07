"""RLDS TFRecord: record framing and CRCs, Example parsing, OXE layouts, round trips."""

from __future__ import annotations

import json
import struct

import google_crc32c
import numpy as np
import pytest

from cupid_engine.data import EpisodeError, FormatError
from cupid_engine.data.rlds import (
    Example,
    RLDSDataset,
    TFRecordError,
    encode_episode_example,
    features_json,
    iter_tfrecord,
    masked_crc32c,
    parse_example,
    write_rlds,
    write_tfrecord,
)

from .helpers import assert_same_episode, make_episodes


def test_masked_crc_matches_definition(rng):
    for n in (0, 1, 7, 300):
        data = rng.bytes(n)
        crc = int.from_bytes(google_crc32c.Checksum(data).digest(), "big")
        assert masked_crc32c(data) == ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def test_tfrecord_round_trip_and_framing(tmp_path, rng):
    records = [rng.bytes(int(n)) for n in (0, 5, 1000)]
    path = write_tfrecord(tmp_path / "x.tfrecord", records)
    raw = path.read_bytes()
    assert len(raw) == sum(16 + len(r) for r in records)
    assert struct.unpack("<Q", raw[:8])[0] == 0
    assert list(iter_tfrecord(path)) == records


def _three_record_file(tmp_path, rng):
    records = [rng.bytes(40) for _ in range(3)]
    return write_tfrecord(tmp_path / "d-train.tfrecord-00000-of-00001", records), records


@pytest.mark.parametrize("where, message", [(16 + 40 + 12 + 7, "data CRC mismatch"), (16 + 40 + 3, "length CRC mismatch")], ids=["payload", "length"])
def test_flipped_byte_names_file_and_record(tmp_path, rng, where, message):
    path, _ = _three_record_file(tmp_path, rng)
    raw = bytearray(path.read_bytes())
    raw[where] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(TFRecordError, match=rf"d-train\.tfrecord-00000-of-00001: record 1 .*{message}"):
        list(iter_tfrecord(path))


@pytest.mark.parametrize("cut", [1, 4, 20, 50], ids=["crc", "crc-part", "data", "header"])
def test_truncated_file(tmp_path, rng, cut):
    path, records = _three_record_file(tmp_path, rng)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - cut])
    got = []
    with pytest.raises(TFRecordError, match=r"record 2 .*truncated"):
        for r in iter_tfrecord(path):
            got.append(r)
    assert got == records[:2]


def test_length_bounded_before_allocation(tmp_path, rng):
    path, _ = _three_record_file(tmp_path, rng)
    with pytest.raises(TFRecordError, match="record 0 .*exceeds max_record_bytes=16"):
        list(iter_tfrecord(path, max_record_bytes=16))
    # A huge forged length with a valid length CRC is refused, not allocated.
    length = struct.pack("<Q", 1 << 60)
    path.write_bytes(length + struct.pack("<I", masked_crc32c(length)) + b"x" * 10)
    with pytest.raises(TFRecordError, match="exceeds"):
        list(iter_tfrecord(path))


def test_example_classes_parse_their_own_wire_format():
    ex = Example()
    ex.features.feature["a"].float_list.value.extend([1.5, -2.0])
    ex.features.feature["b"].int64_list.value.extend([3, 1 << 40])
    ex.features.feature["c"].bytes_list.value.append(b"\x00hi")
    data = ex.SerializeToString()
    # Hand-check the wire format of one field: Example.features (1) -> map entry (1).
    assert data[0] == 0x0A
    got = parse_example(data)
    np.testing.assert_array_equal(got["a"][1], np.array([1.5, -2.0], np.float32))
    np.testing.assert_array_equal(got["b"][1], [3, 1 << 40])
    assert got["c"] == ("bytes", [b"\x00hi"])


def test_round_trip_exact(tmp_path, rng):
    eps = make_episodes(rng, 7)
    root = write_rlds(tmp_path / "mine", iter(eps), name="mine", episodes_per_shard=2)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["dataset_info.json", "features.json"] + [f"mine-train.tfrecord-{i:05d}-of-00002" for i in range(2)] + [
        f"mine-val.tfrecord-{i:05d}-of-00002" for i in range(2)
    ]
    ds = RLDSDataset(root)
    assert ds.obs_keys == ["gripper", "state"] and ds.action_dim == 3 and ds.action_keys is None
    got = {e.episode_id: e for e in ds.episodes()}
    assert len(ds) == 7 and sorted(got) == [e.episode_id for e in eps]
    for e in eps:
        assert_same_episode(e, got[e.episode_id])
    assert ds.shards()[0] == "mine-train.tfrecord-00000-of-00002"
    assert [e.episode_id for e in ds.iter_shard(ds.shards()[0])] == ["ep_000", "ep_002"]
    assert {e.split for e in ds.episodes(split="holdout")} == {"holdout"}
    assert [e.episode_id for e in ds.episodes(ids=["ep_003"])] == ["ep_003"]
    with pytest.raises(KeyError, match="nope"):
        list(ds.episodes(ids=["nope"]))
    cat = ds.catalog()
    assert sorted(cat.column("episode_id").to_pylist()) == [e.episode_id for e in eps]


def test_dict_action_order(tmp_path, rng):
    eps = make_episodes(rng, 3, action_dim=7, splits=("train",))
    keys = {"world_vector": 3, "rotation_delta": 3, "gripper_closedness_action": 1}
    root = write_rlds(tmp_path / "d", eps, action_keys=keys)
    sorted_ds = RLDSDataset(root)
    assert sorted_ds.action_keys == ["gripper_closedness_action", "rotation_delta", "world_vector"]
    got = next(sorted_ds.episodes())
    np.testing.assert_array_equal(got.actions, np.concatenate([eps[0].actions[:, 6:], eps[0].actions[:, 3:6], eps[0].actions[:, :3]], 1))
    given = RLDSDataset(root, action_keys=list(keys))
    assert_same_episode(eps[0], next(given.episodes()))


def _oxe_fixture(root, rng, n=3):
    """A fractal-style OXE folder: features.json with image, text and dict action."""
    root.mkdir(parents=True)
    ns = "tensorflow_datasets.core.features."
    tensor = lambda shape, dtype="float32": {  # noqa: E731
        "pythonClassName": ns + ("scalar.Scalar" if not shape else "tensor_feature.Tensor"),
        "tensor": {"shape": {"dimensions": [str(s) for s in shape]}, "dtype": dtype, "encoding": "none"},
    }
    fdict = lambda f: {"pythonClassName": ns + "features_dict.FeaturesDict", "featuresDict": {"features": f}}  # noqa: E731
    spec = fdict(
        {
            "steps": {
                "pythonClassName": ns + "dataset_feature.Dataset",
                "sequence": {
                    "feature": fdict(
                        {
                            "action": fdict({"world_vector": tensor([3]), "rotation_delta": tensor([3]), "gripper_closedness_action": tensor([1])}),
                            "observation": fdict(
                                {
                                    "image": {"pythonClassName": ns + "image_feature.Image", "image": {"shape": {"dimensions": ["8", "8", "3"]}, "dtype": "uint8", "encodingFormat": "jpeg"}},
                                    "base_pose_tool_reached": tensor([7]),
                                    "natural_language_embedding": tensor([4]),
                                    "depth": tensor([2, 2]),
                                }
                            ),
                            "reward": tensor([]),
                            "is_first": tensor([], "bool"),
                            "is_last": tensor([], "bool"),
                            "is_terminal": tensor([], "bool"),
                            "language_instruction": {"pythonClassName": ns + "text_feature.Text", "text": {}},
                        }
                    ),
                    "length": "-1",
                },
            },
            "episode_metadata": fdict({"file_path": {"pythonClassName": ns + "text_feature.Text", "text": {}}}),
        }
    )
    (root / "features.json").write_text(json.dumps(spec))
    (root / "dataset_info.json").write_text(json.dumps({"name": "fractal20220817_data", "splits": [{"name": "train", "shardLengths": [str(n)]}]}))
    records, truth = [], []
    for i in range(n):
        T = int(rng.integers(2, 6))
        ex = Example()
        f = ex.features.feature
        cols = {
            "steps/observation/base_pose_tool_reached": rng.standard_normal((T, 7)),
            "steps/observation/natural_language_embedding": rng.standard_normal((T, 4)),
            "steps/observation/depth": rng.standard_normal((T, 4)),
            "steps/action/world_vector": rng.standard_normal((T, 3)),
            "steps/action/rotation_delta": rng.standard_normal((T, 3)),
            "steps/action/gripper_closedness_action": rng.standard_normal((T, 1)),
        }
        for k, v in cols.items():
            f[k].float_list.value.extend(v.astype(np.float32).reshape(-1).tolist())
        f["steps/observation/image"].bytes_list.value.extend([b"\xff\xd8jpeg"] * T)
        reward = np.zeros(T, np.float32)
        reward[-1] = float(i != 1)
        f["steps/reward"].float_list.value.extend(reward.tolist())
        f["steps/is_first"].int64_list.value.extend([1] + [0] * (T - 1))
        f["steps/is_last"].int64_list.value.extend([0] * (T - 1) + [1])
        f["steps/is_terminal"].int64_list.value.extend([0] * (T - 1) + [int(i != 1)])
        f["steps/language_instruction"].bytes_list.value.extend([b"pick coke can"] * T)
        f["episode_metadata/file_path"].bytes_list.value.append(f"/data/ep{i}.npz".encode())
        records.append(ex.SerializeToString())
        truth.append(cols)
    write_tfrecord(root / f"fractal20220817_data-train.tfrecord-00000-of-00001", records)
    return truth


def test_reads_oxe_layout(tmp_path, rng):
    root = tmp_path / "fractal20220817_data" / "0.1.0"
    truth = _oxe_fixture(root, rng)
    ds = RLDSDataset(root)
    assert len(ds) == 3
    # The image (encoded bytes), the embedding and the 2-D depth map are not low-dimensional observations.
    assert ds.obs_keys == ["base_pose_tool_reached"]
    assert ds.action_keys == ["gripper_closedness_action", "rotation_delta", "world_vector"] and ds.action_dim == 7
    got = list(ds.episodes())
    assert [e.episode_id for e in got] == [f"fractal20220817_data-train.tfrecord-00000-of-00001#{i}" for i in range(3)]
    assert [e.success for e in got] == [True, False, True]
    assert [e.return_ for e in got] == [1.0, 0.0, 1.0]
    assert {e.task for e in got} == {"pick coke can"} and {e.source for e in got} == {"fractal20220817_data"}
    assert got[2].metadata == {"file_path": "/data/ep2.npz"} and got[0].split == "train" and got[0].tier is None
    for ep, cols in zip(got, truth):
        np.testing.assert_array_equal(ep.observations["base_pose_tool_reached"], cols["steps/observation/base_pose_tool_reached"].astype(np.float32))
        want = np.concatenate([cols[f"steps/action/{k}"] for k in ds.action_keys], axis=1).astype(np.float32)
        np.testing.assert_array_equal(ep.actions, want)
    with_depth = RLDSDataset(root, obs_keys=["depth"], action_keys=["world_vector", "rotation_delta", "gripper_closedness_action"])
    ep = next(with_depth.episodes())
    np.testing.assert_array_equal(ep.observations["depth"], truth[0]["steps/observation/depth"].astype(np.float32))
    by_reward = RLDSDataset(root, success="reward")
    assert by_reward.catalog().column("success").to_pylist() == [True, False, True]


def test_infers_layout_without_features_json(tmp_path, rng):
    eps = make_episodes(rng, 2, splits=("train",))
    root = write_rlds(tmp_path / "x", eps)
    (root / "features.json").unlink()
    ds = RLDSDataset(root)
    assert ds.obs_dims == {"gripper": 1, "state": 5} and ds.action_dim == 3
    for a, b in zip(eps, ds.episodes()):
        assert_same_episode(a, b)


def test_corrupt_shard_through_reader(tmp_path, rng):
    root = write_rlds(tmp_path / "x", make_episodes(rng, 3, splits=("train",)))
    shard = root / "dataset-train.tfrecord-00000-of-00001"
    raw = bytearray(shard.read_bytes())
    raw[-30] ^= 0x80
    shard.write_bytes(bytes(raw))
    with pytest.raises(TFRecordError, match=r"dataset-train\.tfrecord-00000-of-00001: record 2 .*data CRC mismatch"):
        list(RLDSDataset(root).episodes())


def test_writer_rejects_bad_episodes_and_unknown_splits(tmp_path, rng):
    eps = make_episodes(rng, 2)
    eps[1].actions[0, 0] = np.inf
    with pytest.raises(EpisodeError, match=r"'ep_001'.*'action'"):
        write_rlds(tmp_path / "x", eps)
    assert not any(p.name.endswith(("-of-00001",)) or ".part-" in p.name for p in (tmp_path / "x").iterdir())
    root = write_rlds(tmp_path / "y", make_episodes(rng, 1, splits=("train",)))
    (root / "dataset-train.tfrecord-00000-of-00001").rename(root / "dataset-dev.tfrecord-00000-of-00001")
    with pytest.raises(FormatError, match="'dev'.*split_map"):
        RLDSDataset(root)
    assert len(list(RLDSDataset(root, split_map={"dev": "validation"}).episodes(split="validation"))) == 1


def test_features_json_spec_shapes(rng):
    spec = features_json({"state": 5}, action_keys={"a": 2, "b": 1})
    steps = spec["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]
    assert steps["observation"]["featuresDict"]["features"]["state"]["tensor"]["shape"] == {"dimensions": ["5"]}
    assert list(steps["action"]["featuresDict"]["features"]) == ["a", "b"]
    ep = make_episodes(rng, 1, action_dim=4)[0]
    with pytest.raises(ValueError, match="widths sum to 3, actions have 4"):
        encode_episode_example(ep, action_keys={"a": 2, "b": 1})


def test_bad_records_named(tmp_path, rng):
    root = write_rlds(tmp_path / "x", make_episodes(rng, 2, splits=("train",)))
    shard = root / "dataset-train.tfrecord-00000-of-00001"
    good = list(iter_tfrecord(shard))
    write_tfrecord(shard, [good[0], b"\xff\xff\xff"])
    with pytest.raises(TFRecordError, match="record 1: not a tf.train.Example"):
        list(RLDSDataset(root).episodes())
    # A well-formed Example whose action does not fill [T, A].
    ex = Example()
    ex.ParseFromString(good[1])
    del ex.features.feature["steps/action"].float_list.value[-1]
    write_tfrecord(shard, [good[0], ex.SerializeToString()])
    with pytest.raises(FormatError, match=r"record 1 \(episode 'ep_001'\): feature 'steps/action' has \d+ values"):
        list(RLDSDataset(root).episodes())


def test_failed_overwrite_keeps_old(tmp_path, rng):
    root = write_rlds(tmp_path / "x", make_episodes(rng, 2, splits=("train",)))
    with pytest.raises(FileExistsError):
        write_rlds(root, make_episodes(rng, 1))
    bad = make_episodes(rng, 3, splits=("train",))
    bad[2].actions[0, 0] = np.nan
    with pytest.raises(EpisodeError):
        write_rlds(root, bad, overwrite=True)
    assert len(list(RLDSDataset(root).episodes())) == 2
    assert sorted(p.name for p in root.iterdir()) == ["dataset-train.tfrecord-00000-of-00001", "dataset_info.json", "features.json"]
    write_rlds(root, make_episodes(rng, 3, splits=("train",)), overwrite=True)
    assert len(list(RLDSDataset(root).episodes())) == 3
