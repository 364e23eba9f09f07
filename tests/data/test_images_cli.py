"""End to end from the CLI: image datasets in three formats featurised with an image policy.

A LeRobot dataset with MP4 video, an RLDS folder with PNG images and step-level language,
and a robomimic file with ``obs/*`` camera arrays, each written by the engine in the
upstream layout, go through ``cupid-engine train`` (transformer: cameras + task text) and
``cupid-engine featurize``; the store's catalog carries the language as its task column.
"""

from __future__ import annotations

import numpy as np
import pytest

from .test_images import smooth_frames

pytestmark = pytest.mark.slow


def _episodes(rng, n=4, T=5, size=28):
    from cupid_engine.data import Episode

    return [
        Episode(
            episode_id=f"demo_{i}",
            observations={"state": rng.standard_normal((T, 3)).astype(np.float32)},
            actions=rng.standard_normal((T, 2)).astype(np.float32),
            task=["lift the red cube", "push the cube left"][i % 2],
            images={"agentview": smooth_frames(T, size, size, phase=i)},
        )
        for i in range(n)
    ]


def test_featurize_image_datasets_from_the_cli(tmp_path, rng):
    from cupid_engine.cli import main
    from cupid_engine.data import write_dataset, write_rlds, write_robomimic
    from cupid_engine.store import GradientStore

    eps = _episodes(rng)
    data = {
        "lerobot-video": write_dataset(tmp_path / "lerobot", eps, image_format="video"),
        "rlds": write_rlds(tmp_path / "rlds", eps),
        "robomimic": write_robomimic(tmp_path / "image.hdf5", eps),
    }
    policy = tmp_path / "policy"
    assert main(["train", "--data", str(data["lerobot-video"]), "--policy", "transformer", "--size", "tiny",
                 "--out", str(policy), "--steps", "2", "--batch-size", "8", "--no-progress"]) == 0
    for name, path in data.items():
        store = tmp_path / f"store-{name}"
        assert main(["featurize", "--policy", str(policy), "--data", str(path), "--store", str(store), "--run", "a",
                     "--k", "64", "--draws", "2", "--obs-keys", "state,agentview", "--no-progress"]) == 0, name
        gs = GradientStore.open(store)
        cat = gs.catalog()
        tasks = dict(zip(cat["episode_id"].to_pylist(), cat["task"].to_pylist()))
        assert tasks == {e.episode_id: e.task for e in eps}, name
