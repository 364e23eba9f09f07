"""Images and language through every reader and writer: exact pixels, video PSNR, task text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cupid_engine.data import Episode, FormatError, ImageSequence, UnknownKeyError, open_dataset, open_source, write_dataset
from cupid_engine.data.episode import decode_image, encode_png
from cupid_engine.data.schema import EpisodeError, EpisodeValidator


def smooth_frames(T: int, h: int = 48, w: int = 40, phase: float = 0.0) -> np.ndarray:
    """``uint8 [T, h, w, 3]`` smooth moving patterns: codec-friendly, each frame different."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for t in range(T):
        r = 128 + 100 * np.sin(0.12 * x + 0.6 * t + phase)
        g = 128 + 100 * np.cos(0.1 * y - 0.4 * t)
        b = 128 + 90 * np.sin(0.08 * (x + y) + 0.9 * t)
        out.append(np.stack([r, g, b], -1))
    return np.clip(np.stack(out), 0, 255).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def image_episodes(rng: np.random.Generator, n: int = 5, *, noise: bool = True) -> list[Episode]:
    out = []
    for i in range(n):
        T = int(rng.integers(3, 8))
        images = {"agentview": smooth_frames(T, phase=i)}
        if noise:  # random pixels: only a lossless path gets them back
            images["wrist"] = rng.integers(0, 256, (T, 8, 10, 3), dtype=np.uint8)
        out.append(
            Episode(
                episode_id=f"img_{i:03d}",
                observations={"state": rng.standard_normal((T, 4)).astype(np.float32)},
                actions=rng.standard_normal((T, 2)).astype(np.float32),
                split=("train", "holdout")[i % 2],
                task=f"put the {('red', 'blue')[i % 2]} block in the bowl",
                images=images,
            )
        )
    return out


# ----------------------------------------------------------------------------- Episode


def test_image_sequence_is_an_array_view(rng):
    frames = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    seq = ImageSequence.from_encoded([encode_png(f) for f in frames])
    assert seq.shape == (6, 5, 7, 3) and seq.dtype == np.uint8 and len(seq) == 6
    np.testing.assert_array_equal(np.asarray(seq), frames)
    np.testing.assert_array_equal(seq[2], frames[2])
    np.testing.assert_array_equal(seq[-1], frames[-1])
    np.testing.assert_array_equal(seq[1:4], frames[1:4])
    np.testing.assert_array_equal(seq[[0, 5]], frames[[0, 5]])
    with pytest.raises(IndexError):
        seq[6]


def test_episode_rejects_bad_images(rng):
    T = 3
    with pytest.raises(ValueError, match="uint8"):
        Episode("e", {}, np.zeros((T, 1)), images={"cam": np.zeros((T, 4, 4, 3), np.float32)})
    with pytest.raises(ValueError, match=r"images.cam.*\[3, H, W, C\]"):
        Episode("e", {}, np.zeros((T, 1)), images={"cam": np.zeros((T + 1, 4, 4, 3), np.uint8)})
    with pytest.raises(ValueError, match="both"):
        Episode("e", {"cam": np.zeros((T, 1))}, np.zeros((T, 1)), images={"cam": np.zeros((T, 4, 4, 3), np.uint8)})


def test_validator_fixes_camera_shapes(rng):
    check = EpisodeValidator()
    check(Episode("a", {}, np.zeros((2, 1)), images={"cam": np.zeros((2, 4, 4, 3), np.uint8)}))
    with pytest.raises(EpisodeError, match=r"observation.images.cam.*\(5, 4, 3\)"):
        check(Episode("b", {}, np.zeros((2, 1)), images={"cam": np.zeros((2, 5, 4, 3), np.uint8)}))
    with pytest.raises(EpisodeError, match="camera keys"):
        check(Episode("c", {}, np.zeros((2, 1))))


def test_decode_image_names_bad_bytes():
    with pytest.raises(ValueError, match="frame 3"):
        decode_image(b"not an image", what="frame 3")


# ----------------------------------------------------------------------------- LeRobot


def test_lerobot_png_round_trip_is_exact(tmp_path, rng):
    eps = image_episodes(rng)
    path = write_dataset(tmp_path / "ds", eps, episodes_per_file=2)
    info = json.loads((path / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.agentview"]["dtype"] == "image"
    assert info["features"]["observation.images.wrist"]["shape"] == [8, 10, 3]
    ds = open_dataset(path)
    assert ds.image_keys == ["agentview", "wrist"] and ds.obs_keys == ["state"]
    assert ds.image_shapes == {"agentview": (48, 40, 3), "wrist": (8, 10, 3)}
    assert ds.catalog()["task"].to_pylist() == [e.task for e in eps]
    got = list(ds.episodes())
    for a, b in zip(eps, got):
        assert isinstance(b.images["agentview"], ImageSequence)
        for k in a.images:
            np.testing.assert_array_equal(b.image_array(k), a.images[k], err_msg=f"{a.episode_id} {k}")
        assert b.task == a.task


def test_lerobot_video_frames_match_at_codec_quality(tmp_path, rng):
    eps = image_episodes(rng, noise=False)
    path = write_dataset(tmp_path / "ds", eps, episodes_per_file=2, image_format="video")
    info = json.loads((path / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.agentview"]["dtype"] == "video"
    assert (path / "videos" / "observation.images.agentview" / "chunk-000" / "file-002.mp4").is_file()
    ds = open_source(path)
    values = []
    for a, b in zip(eps, ds.episodes()):
        src, dec = a.images["agentview"], b.image_array("agentview")
        assert dec.shape == src.shape and dec.dtype == np.uint8
        for t in range(len(src)):
            p = psnr(dec[t], src[t])
            values.append(p)
            # Right frame, not a neighbour: every other frame of the episode is further away.
            assert all(p > psnr(dec[t], src[u]) for u in range(len(src)) if u != t), (a.episode_id, t)
        np.testing.assert_array_equal(b.images["agentview"][1:3], dec[1:3])
    print(f"video PSNR (libx264 crf 18, yuv420p, 48x40): min {min(values):.1f} dB, mean {np.mean(values):.1f} dB")
    assert min(values) > 32.0


def test_lerobot_obs_keys_selects_and_names_unknown(tmp_path, rng):
    path = write_dataset(tmp_path / "ds", image_episodes(rng, 2))
    only = open_dataset(path, obs_keys=["agentview"])
    ep = next(only.episodes())
    assert only.obs_keys == [] and only.image_keys == ["agentview"]
    assert list(ep.images) == ["agentview"] and ep.observations == {}
    with pytest.raises(UnknownKeyError, match=r"'front'.*low-dimensional keys \['state'\] and image keys \['agentview', 'wrist'\]"):
        open_dataset(path, obs_keys=["state", "front"])


# ----------------------------------------------------------------------------- RLDS


def _jpeg(frame: np.ndarray, quality: int = 95) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _rt1_fixture(root, rng, n: int = 3) -> list[dict]:
    """An RT-1 (fractal) style folder: JPEG image, raw uint8 wrist tensor, the instruction
    as observation/natural_language_instruction (text) beside its embedding."""
    from cupid_engine.data.rlds import Example, write_tfrecord

    root.mkdir(parents=True)
    ns = "tensorflow_datasets.core.features."
    tensor = lambda shape, dtype="float32": {  # noqa: E731
        "pythonClassName": ns + ("scalar.Scalar" if not shape else "tensor_feature.Tensor"),
        "tensor": {"shape": {"dimensions": [str(s) for s in shape]}, "dtype": dtype, "encoding": "none"},
    }
    fdict = lambda f: {"pythonClassName": ns + "features_dict.FeaturesDict", "featuresDict": {"features": f}}  # noqa: E731
    text = {"pythonClassName": ns + "text_feature.Text", "text": {}}
    image = {"pythonClassName": ns + "image_feature.Image", "image": {"shape": {"dimensions": ["16", "20", "3"]}, "dtype": "uint8", "encodingFormat": "jpeg"}}
    steps = fdict(
        {
            "action": tensor([2]),
            "observation": fdict(
                {
                    "image": image,
                    "wrist": tensor([4, 6, 3], "uint8"),
                    "state": tensor([3]),
                    "natural_language_instruction": text,
                    "natural_language_embedding": tensor([8]),
                }
            ),
            "reward": tensor([]),
            "is_first": tensor([], "bool"),
            "is_last": tensor([], "bool"),
            "is_terminal": tensor([], "bool"),
        }
    )
    spec = fdict({"steps": {"pythonClassName": ns + "dataset_feature.Dataset", "sequence": {"feature": steps, "length": "-1"}}})
    (root / "features.json").write_text(json.dumps(spec))
    records, truth = [], []
    for i in range(n):
        T = int(rng.integers(2, 6))
        frames = smooth_frames(T, 16, 20, phase=i)
        wrist = rng.integers(0, 256, (T, 4, 6, 3), dtype=np.uint8)
        blobs = [_jpeg(f) for f in frames]
        instruction = ["pick rxbar chocolate from bottom drawer", "place coke can upright"][i % 2]
        ex = Example()
        f = ex.features.feature
        f["steps/observation/image"].bytes_list.value.extend(blobs)
        f["steps/observation/wrist"].int64_list.value.extend(wrist.reshape(-1).tolist())
        f["steps/observation/state"].float_list.value.extend(rng.standard_normal(T * 3).astype(np.float32).tolist())
        f["steps/observation/natural_language_embedding"].float_list.value.extend([0.5] * (T * 8))
        f["steps/observation/natural_language_instruction"].bytes_list.value.extend([instruction.encode()] * T)
        f["steps/action"].float_list.value.extend(rng.standard_normal(T * 2).astype(np.float32).tolist())
        f["steps/reward"].float_list.value.extend([0.0] * (T - 1) + [1.0])
        f["steps/is_first"].int64_list.value.extend([1] + [0] * (T - 1))
        f["steps/is_last"].int64_list.value.extend([0] * (T - 1) + [1])
        f["steps/is_terminal"].int64_list.value.extend([0] * (T - 1) + [1])
        records.append(ex.SerializeToString())
        truth.append({"frames": frames, "blobs": blobs, "wrist": wrist, "task": instruction})
    write_tfrecord(root / "fractal20220817_data-train.tfrecord-00000-of-00001", records)
    return truth


def test_rlds_rt1_images_and_language(tmp_path, rng):
    from cupid_engine.data import RLDSDataset

    root = tmp_path / "fractal20220817_data" / "0.1.0"
    truth = _rt1_fixture(root, rng)
    ds = RLDSDataset(root)
    assert ds.image_keys == ["image", "wrist"] and ds.image_shapes == {"image": (16, 20, 3), "wrist": (4, 6, 3)}
    # The instruction is language (the task), not an observation.
    assert "natural_language_instruction" not in ds.obs_keys and "state" in ds.obs_keys
    assert ds.catalog()["task"].to_pylist() == [t["task"] for t in truth]
    for want, ep in zip(truth, ds.episodes()):
        assert ep.task == want["task"]
        got = ep.image_array("image")
        # Stored JPEG: exactly the pixels the JPEG decodes to, and close to the source.
        np.testing.assert_array_equal(got, np.stack([decode_image(b) for b in want["blobs"]]))
        assert psnr(got, want["frames"]) > 30
        np.testing.assert_array_equal(ep.image_array("wrist"), want["wrist"])  # raw uint8: exact


def test_rlds_obs_keys_names_cameras_and_unknowns(tmp_path, rng):
    from cupid_engine.data import RLDSDataset

    root = tmp_path / "rt1"
    _rt1_fixture(root, rng, n=1)
    only = RLDSDataset(root, obs_keys=["image"])
    ep = next(only.episodes())
    assert only.obs_keys == [] and list(ep.images) == ["image"]
    with pytest.raises(UnknownKeyError, match=r"\['rgb'\] not found; the dataset has low-dimensional keys .*'state'.* and image keys \['image', 'wrist'\]"):
        RLDSDataset(root, obs_keys=["rgb", "state"]).obs_keys


def test_rlds_write_read_exact_images_and_task(tmp_path, rng):
    from cupid_engine.data import RLDSDataset, write_rlds

    eps = image_episodes(rng, 4)
    root = write_rlds(tmp_path / "rlds", eps, episodes_per_shard=2)
    spec = json.loads((root / "features.json").read_text())
    obs = spec["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]["observation"]
    assert obs["featuresDict"]["features"]["agentview"]["image"]["encodingFormat"] == "png"
    for reader in (RLDSDataset(root), RLDSDataset(root, obs_keys=["state", "agentview", "wrist"])):
        got = {e.episode_id: e for e in reader.episodes()}
        for a in eps:
            b = got[a.episode_id]
            assert b.task == a.task
            for k in a.images:
                np.testing.assert_array_equal(b.image_array(k), a.images[k], err_msg=f"{a.episode_id} {k}")
    (root / "features.json").unlink()  # without the spec, images are found by their bytes
    assert RLDSDataset(root).image_shapes == {"agentview": (48, 40, 3), "wrist": (8, 10, 3)}


# ----------------------------------------------------------------------------- robomimic


def test_robomimic_image_obs_exact_and_selectable(tmp_path, rng):
    import h5py

    from cupid_engine.data import RobomimicDataset, write_robomimic

    eps = image_episodes(rng, 3)
    path = write_robomimic(tmp_path / "image.hdf5", eps)
    with h5py.File(path, "r") as f:  # the layout robomimic's dataset_states_to_obs writes
        assert f["data/demo_0/obs/agentview"].dtype == np.uint8 and f["data/demo_0/next_obs/wrist"].ndim == 4
        # A depth map beside the cameras: float, so not an image and not low-dimensional.
        with h5py.File(tmp_path / "copy.hdf5", "w") as g:
            for name in f:
                f.copy(name, g)
            for name in g["data"]:
                T = g[f"data/{name}/actions"].shape[0]
                g.create_dataset(f"data/{name}/obs/agentview_depth", data=np.zeros((T, 4, 4, 1), np.float32))
    ds = RobomimicDataset(path)
    assert ds.obs_keys == ["state"] and ds.image_keys == ["agentview", "wrist"]
    for a, b in zip(eps, ds.episodes()):
        assert b.task == a.task
        for k in a.images:
            np.testing.assert_array_equal(b.image_array(k), a.images[k])
            np.testing.assert_array_equal(b.images[k][1:3], a.images[k][1:3])
    depth = RobomimicDataset(tmp_path / "copy.hdf5")
    assert depth.image_keys == ["agentview", "wrist"]
    with pytest.raises(UnknownKeyError, match=r"'agentview_depth' is float32 \[4, 4, 1\]"):
        RobomimicDataset(tmp_path / "copy.hdf5", obs_keys=["agentview_depth"])
    only = RobomimicDataset(path, obs_keys=["wrist"])
    assert only.obs_keys == [] and list(next(only.episodes()).images) == ["wrist"]


# ----------------------------------------------------------------------------- replay buffer


def test_replay_img_round_trip_and_bad_pixels(tmp_path, rng):
    import zarr

    from cupid_engine.data import ReplayBufferDataset, write_replay_buffer

    eps = image_episodes(rng, 3)
    path = write_replay_buffer(tmp_path / "buf.zarr", eps)
    ds = ReplayBufferDataset(path)
    assert ds.image_keys == ["agentview", "wrist"] and ds.obs_keys == ["state"]
    for a, b in zip(eps, ds.episodes()):
        for k in a.images:
            np.testing.assert_array_equal(b.image_array(k), a.images[k])
    # Float pixels that are not integers 0..255 cannot be images: refused by name, on access.
    root = zarr.open_group(str(path), mode="r+")
    n = root["data/wrist"].shape[0]
    root.create_array("data/img", shape=(n, 8, 10, 3), dtype="float32")[:] = 0.5
    ep = next(ReplayBufferDataset(path, obs_keys=["img"]).episodes())
    with pytest.raises(FormatError, match=r"data/img rows 0:\d+: float32 pixels are not integers in 0..255"):
        ep.image_array("img")


# ----------------------------------------------------------------------------- language, pickling, v2.1 video


def test_changing_instruction_is_kept_in_metadata():
    from cupid_engine.data._util import task_from_instructions

    meta: dict = {}
    assert task_from_instructions(["open drawer"] * 3 + ["pick can"] * 2, meta) == "open drawer"
    assert meta == {"instructions": [[0, "open drawer"], [3, "pick can"]]}
    same: dict = {}
    assert task_from_instructions(["stack"] * 4, same) == "stack" and same == {}


def test_image_sequence_pickles_as_pixels(tmp_path, rng):
    import pickle

    path = write_dataset(tmp_path / "ds", image_episodes(rng, 1))
    ep = next(open_dataset(path).episodes())
    back = pickle.loads(pickle.dumps(ep))
    assert isinstance(back.images["wrist"], np.ndarray)
    np.testing.assert_array_equal(back.images["wrist"], ep.image_array("wrist"))


@pytest.mark.parametrize("codec", ["libx264", "libsvtav1"])
def test_lerobot_v21_per_episode_videos(tmp_path, rng, codec):
    """lerobot v2.1 layout: one MP4 per episode and camera (AV1 is lerobot's default codec)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cupid_engine.data.video import VideoWriter

    root = tmp_path / "v21"
    (root / "meta").mkdir(parents=True)
    lengths = [4, 6]
    truth = []
    features = {
        "observation.state": {"dtype": "float32", "shape": [2], "names": None},
        "observation.images.top": {"dtype": "video", "shape": [48, 64, 3], "names": ["height", "width", "channel"]},
        "action": {"dtype": "float32", "shape": [1], "names": None},
    }
    info = {"codebase_version": "v2.1", "fps": 10, "chunks_size": 1000, "features": features,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "splits": {"train": "0:2"}}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "episodes.jsonl").write_text(
        "".join(json.dumps({"episode_index": i, "tasks": ["fold the towel"], "length": T}) + "\n" for i, T in enumerate(lengths))
    )
    start = 0
    for i, T in enumerate(lengths):
        (root / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "observation.state": [list(map(float, rng.standard_normal(2))) for _ in range(T)],
            "action": [[0.0]] * T, "episode_index": [i] * T, "frame_index": list(range(T)),
            "index": list(range(start, start + T)), "timestamp": [t / 10 for t in range(T)],
        }), root / "data" / "chunk-000" / f"episode_{i:06d}.parquet")
        start += T
        frames = smooth_frames(T, 48, 64, phase=i)
        vdir = root / "videos" / "chunk-000" / "observation.images.top"
        vdir.mkdir(parents=True, exist_ok=True)
        w = VideoWriter(str(vdir / f"episode_{i:06d}.mp4"), 48, 64, 10, codec=codec)
        w.write(frames)
        w.close()
        truth.append(frames)
    ds = open_dataset(root)
    assert ds.image_keys == ["top"] and ds.catalog()["task"].to_pylist() == ["fold the towel"] * 2
    for want, ep in zip(truth, ds.episodes()):
        got = ep.image_array("top")
        assert got.shape == want.shape
        assert min(psnr(got[t], want[t]) for t in range(len(want))) > 28, codec
        np.testing.assert_array_equal(ep.images["top"][2:4], got[2:4])  # a seek into the middle agrees


def test_lerobot_video_odd_frame_size(tmp_path):
    # yuv420p needs even sizes: the writer pads one edge row/column, the reader crops it.
    frames = smooth_frames(5, 21, 15)
    ep = Episode("odd", {}, np.zeros((5, 1), np.float32), images={"cam": frames})
    path = write_dataset(tmp_path / "ds", [ep], image_format="video")
    got = next(open_dataset(path).episodes()).image_array("cam")
    assert got.shape == (5, 21, 15, 3)
    assert min(psnr(got[t], frames[t]) for t in range(5)) > 30
