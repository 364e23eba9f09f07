"""Round trip of an engine-written dataset through the real lerobot package (manual check).

Not a pytest module: lerobot 0.6.1 needs Python >= 3.12 and torch < 2.12, so it runs in a
separate environment (see docs/lerobot_roundtrip.md)::

    # 1. write a dataset with the engine (project venv)
    .venv/bin/python tests/data/lerobot_roundtrip.py write OUT_DIR
    # 2. load / delete_episodes / resume + save_episode with lerobot (lerobot venv)
    LEROBOT_VENV/bin/python tests/data/lerobot_roundtrip.py lerobot OUT_DIR
    # 3. read what lerobot wrote back with the engine (project venv)
    .venv/bin/python tests/data/lerobot_roundtrip.py readback OUT_DIR

Each step prints what it checked and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

TASKS = ["lift the cube", "stack the red block on the green one"]
VIDEO = "--video" in sys.argv  # the camera as an MP4 video feature (lossy) instead of PNG images
IMAGES = VIDEO or "--images" in sys.argv


def _frames(rng, T):
    """Smooth moving gradients: noise would measure the codec, not the layout."""
    if not VIDEO:
        return rng.integers(0, 256, (T, 12, 16, 3), dtype=np.uint8)
    y, x = np.mgrid[0:32, 0:32]
    phase = rng.uniform(0, 6)
    return np.stack(
        [np.stack([128 + 100 * np.sin(x / 6 + phase + t / 3), 128 + 100 * np.cos(y / 5 + t / 4), np.full_like(x, 40 * (t % 5), dtype=float)], -1) for t in range(T)]
    ).astype(np.uint8)


class _Ep:
    """The fields of one test episode (plain, so the lerobot side needs no engine import)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @property
    def length(self):
        return self.actions.shape[0]


def _episodes():
    rng = np.random.default_rng(7)
    out = []
    for i in range(6):
        T = int(rng.integers(3, 9))
        images = {"agentview": _frames(rng, T)} if IMAGES else {}
        out.append(
            _Ep(
                episode_id=f"demo_{i}",
                observations={"state": rng.standard_normal((T, 5)).astype(np.float32), "gripper": rng.standard_normal((T, 1)).astype(np.float32)},
                actions=rng.standard_normal((T, 3)).astype(np.float32),
                split="holdout" if i == 4 else "train",
                source="roundtrip",
                task=TASKS[i % 2],
                success=i % 3 != 2,
                return_=float(i % 3 != 2),
                tier=("better", "okay", "worse")[i % 3],
                metadata={"i": i},
                images=images,
            )
        )
    return out


def write(out: pathlib.Path) -> None:
    from cupid_engine.data import Episode, write_dataset

    eps = [Episode(**{k: v for k, v in e.__dict__.items()}) for e in _episodes()]
    path = write_dataset(out / "engine_ds", eps, fps=10, episodes_per_file=4, overwrite=True, image_format="video" if VIDEO else "png")
    print("wrote", path)


def lerobot_side(out: pathlib.Path) -> None:
    import lerobot
    import torch
    from lerobot.datasets import LeRobotDataset
    from lerobot.datasets.dataset_tools import delete_episodes

    print("lerobot", lerobot.__version__, "torch", torch.__version__, "python", sys.version.split()[0])
    root = out / "engine_ds"
    backend = {"video_backend": "pyav"} if VIDEO else {}  # torchcodec needs a system FFmpeg
    ds = LeRobotDataset("local/engine_ds", root=root, **backend)
    eps = _episodes()
    assert ds.meta.total_episodes == len(eps), ds.meta.total_episodes
    assert ds.num_frames == sum(e.length for e in eps), ds.num_frames
    assert ds.meta.stats is not None, "meta.stats is None"
    for key in ("observation.state", "action", "timestamp"):
        for stat in ("min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"):
            assert stat in ds.meta.stats[key], (key, stat)
    allstate = np.concatenate([e.observations["state"] for e in eps])
    np.testing.assert_allclose(ds.meta.stats["observation.state"]["mean"], allstate.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ds.meta.stats["observation.state"]["std"], allstate.std(0), rtol=1e-5, atol=1e-6)
    print("LeRobotDataset: episodes", ds.meta.total_episodes, "frames", ds.num_frames, "stats keys", sorted(ds.meta.stats))
    _compare_stats_with_lerobot(root, ds, eps)
    k, psnrs = 0, []
    for e in eps:
        for t in range(e.length):
            item = ds[k]
            assert item["task"] == e.task, (k, item["task"], e.task)
            np.testing.assert_array_equal(item["observation.state"].numpy(), e.observations["state"][t])
            np.testing.assert_array_equal(item["action"].numpy(), e.actions[t])
            if e.images:
                got = (item["observation.images.agentview"].numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0)
                if VIDEO:
                    psnrs.append(_psnr(got, e.images["agentview"][t]))
                else:
                    np.testing.assert_array_equal(got, e.images["agentview"][t])
            k += 1
    print("every frame: task string, observation.state and action equal to the engine's episodes")
    if psnrs:
        assert min(psnrs) > 30, min(psnrs)
        print(f"video frames decoded by lerobot (pyav): PSNR vs the source frames min {min(psnrs):.1f} dB, mean {np.mean(psnrs):.1f} dB")

    deleted = delete_episodes(ds, episode_indices=[1, 3], output_dir=out / "deleted", repo_id="local/deleted")
    keep = [e for i, e in enumerate(eps) if i not in (1, 3)]
    assert deleted.meta.total_episodes == len(keep)
    k = 0
    for e in keep:
        for t in range(e.length):
            item = deleted[k]
            assert item["task"] == e.task
            np.testing.assert_array_equal(item["action"].numpy(), e.actions[t])
            k += 1
    print("delete_episodes([1, 3]):", deleted.meta.total_episodes, "episodes left, tasks and actions equal")

    resumed = LeRobotDataset.resume("local/engine_ds", root=root, **backend)
    extra_state = np.arange(15, dtype=np.float32).reshape(3, 5) / 10
    for t in range(3):
        frame = {
            "observation.state": extra_state[t],
            "observation.gripper": np.array([0.5], np.float32),
            "action": np.array([t, t, t], np.float32),
            "task": "a task lerobot added",
        }
        if eps[0].images:
            frame["observation.images.agentview"] = np.zeros(eps[0].images["agentview"].shape[1:], np.uint8)
        resumed.add_frame(frame)
    resumed.save_episode()
    resumed.finalize()
    again = LeRobotDataset("local/engine_ds", root=root, **backend)
    assert again.meta.total_episodes == len(eps) + 1
    assert again[again.num_frames - 1]["task"] == "a task lerobot added"
    assert again[0]["task"] == eps[0].task
    print("resume + add_frame + save_episode + finalize: reloaded with", again.meta.total_episodes, "episodes")
    _check_layout_on_lerobot_datasets(out, eps)
    _visualise(out, backend)
    (out / "lerobot_ok.json").write_text(json.dumps({"lerobot": lerobot.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}))


def _visualise(out: pathlib.Path, backend: dict) -> None:
    """lerobot's visualiser (lerobot-dataset-viz) on the engine's dataset, saved to .rrd files."""
    try:
        from lerobot.scripts.lerobot_dataset_viz import visualize_dataset
    except ImportError as exc:  # lerobot[viz] (rerun-sdk) not installed
        print("visualiser not run:", exc)
        return
    from lerobot.datasets import LeRobotDataset

    ds = LeRobotDataset("local/engine_ds", root=out / "engine_ds", **backend)
    sizes = []
    for ep in range(ds.meta.total_episodes):
        rrd = visualize_dataset(ds, episode_index=ep, batch_size=4, num_workers=0, save=True, output_dir=out / "viz")
        assert rrd.exists() and rrd.stat().st_size > 0
        sizes.append(rrd.stat().st_size)
    print(f"lerobot-dataset-viz (save mode): one .rrd per episode for all {len(sizes)} episodes ({min(sizes)}-{max(sizes)} bytes)")


def _psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _compare_stats_with_lerobot(root, ds, eps) -> None:
    """Our per-episode stats/* columns and stats.json against lerobot's own functions."""
    import pandas as pd
    from lerobot.datasets.compute_stats import aggregate_stats, compute_episode_stats

    meta = pd.concat([pd.read_parquet(f) for f in sorted((root / "meta/episodes").glob("*/*.parquet"))])
    theirs_all, worst_q = [], 0.0
    start = 0
    for i, e in enumerate(eps):
        T = e.length
        data = {
            "observation.state": e.observations["state"],
            "observation.gripper": e.observations["gripper"][:, 0],
            "action": e.actions,
            "timestamp": (np.arange(T) / ds.meta.fps).astype(np.float32),
            "frame_index": np.arange(T),
            "episode_index": np.full(T, i),
            "index": np.arange(start, start + T),
            "task_index": np.full(T, ds.meta.get_task_index(e.task)),
        }
        start += T
        theirs = compute_episode_stats(data, ds.meta.features)
        theirs_all.append(theirs)
        row = meta[meta["episode_index"] == i].iloc[0]
        for feat, st in theirs.items():
            for stat, value in st.items():
                ours = np.asarray(row[f"stats/{feat}/{stat}"], dtype=np.float64)
                value = np.asarray(value, dtype=np.float64)
                assert ours.shape == value.shape, (feat, stat, ours.shape, value.shape)
                if stat.startswith("q"):
                    # lerobot: a 5000-bin histogram estimate of the same order statistic
                    width = (np.asarray(st["max"], np.float64) - np.asarray(st["min"], np.float64)) / 5000
                    err = np.abs(ours - value) - width
                    assert np.all(err <= 1e-6), (i, feat, stat, ours, value)
                    worst_q = max(worst_q, float(np.max(np.abs(ours - value) / np.maximum(width, 1e-12))))
                else:
                    np.testing.assert_allclose(ours, value, rtol=2e-5, atol=2e-6, err_msg=f"{i} {feat} {stat}")
    agg = aggregate_stats(theirs_all)
    for feat, st in agg.items():
        counts = np.array([float(t[feat]["count"][0]) for t in theirs_all])
        widths = np.stack([(np.asarray(t[feat]["max"], np.float64) - np.asarray(t[feat]["min"], np.float64)) / 5000 for t in theirs_all])
        bound = np.tensordot(counts, widths, axes=1) / counts.sum()  # count-weighted bin width
        for stat, value in st.items():
            if stat.startswith("q"):
                assert np.all(np.abs(ds.meta.stats[feat][stat] - value) <= bound + 1e-6), (feat, stat)
            else:
                np.testing.assert_allclose(ds.meta.stats[feat][stat], value, rtol=2e-5, atol=2e-6, err_msg=f"{feat} {stat}")
    print(f"per-episode stats equal lerobot's compute_episode_stats (quantiles within {worst_q:.2f} histogram bins); stats.json equals its aggregate_stats")


def _check_layout_on_lerobot_datasets(out: pathlib.Path, eps) -> None:
    """The layout checker of the tests, run on what lerobot itself wrote."""
    from lerobot.datasets import LeRobotDataset

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from lerobot_v3_layout import check_v3_layout

    features = {
        "observation.state": {"dtype": "float32", "shape": (5,), "names": None},
        "observation.gripper": {"dtype": "float32", "shape": (1,), "names": None},
        "action": {"dtype": "float32", "shape": (3,), "names": None},
    }
    if eps[0].images:
        features["observation.images.agentview"] = {
            "dtype": "video" if VIDEO else "image", "shape": eps[0].images["agentview"].shape[1:], "names": ["height", "width", "channels"]
        }
    native = LeRobotDataset.create("local/native", fps=10, features=features, root=out / "native", use_videos=VIDEO)
    for e in eps:
        for t in range(e.length):
            frame = {"observation.state": e.observations["state"][t], "observation.gripper": e.observations["gripper"][t], "action": e.actions[t], "task": e.task}
            if e.images:
                frame["observation.images.agentview"] = e.images["agentview"][t]
            native.add_frame(frame)
        native.save_episode()
    native.finalize()
    for name in ("native", "engine_ds", "deleted"):
        problems = check_v3_layout(out / name)
        assert not problems, (name, problems)
    print("layout checker: no problems on lerobot's own dataset, on the engine's after resume, and on delete_episodes' output")


def readback(out: pathlib.Path) -> None:
    from cupid_engine.data import open_dataset

    eps = _episodes()
    ds = open_dataset(out / "engine_ds")
    got = list(ds.episodes())
    assert [e.episode_id for e in got[: len(eps)]] == [e.episode_id for e in eps]
    assert [e.split for e in got[: len(eps)]] == [e.split for e in eps]
    assert got[-1].episode_id == f"episode_{len(eps):06d}" and got[-1].task == "a task lerobot added"
    for a, b in zip(eps, got):
        np.testing.assert_array_equal(a.actions, b.actions)
        assert a.task == b.task and a.tier == b.tier and a.metadata == b.metadata
    print("engine reads the resumed dataset:", len(got), "episodes; engine fields kept for the first", len(eps))
    dele = list(open_dataset(out / "deleted").episodes())
    keep = [e for i, e in enumerate(eps) if i not in (1, 3)]
    assert [e.task for e in dele] == [e.task for e in keep]
    for a, b in zip(keep, dele):
        np.testing.assert_array_equal(a.actions, b.actions)
    print("engine reads lerobot's delete_episodes output:", len(dele), "episodes, tasks and actions equal")


if __name__ == "__main__":
    step, out = sys.argv[1], pathlib.Path(sys.argv[2])
    {"write": write, "lerobot": lerobot_side, "readback": readback}[step](out)
