"""Commands that read a dataset go through ``open_source``: the four formats, one code path."""

from __future__ import annotations

import json
import logging

import pytest

from cupid_engine.cli import main
from cupid_engine.data import open_source, write_dataset, write_replay_buffer, write_rlds, write_robomimic

from .helpers import make_episodes
from .test_skipped_fields import _replay_with_keypoints

WRITERS = {
    "lerobot": lambda p, e: write_dataset(p / "ds", e),
    "robomimic": lambda p, e: write_robomimic(p / "lift.hdf5", e),
    "rlds": lambda p, e: write_rlds(p / "rl" / "1.0.0", e),  # a TFDS builder folder, given as p / "rl"
    "replay": lambda p, e: write_replay_buffer(p / "r.zarr", e),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_train_reads_every_format(tmp_path, rng, capsys, fmt):
    path = WRITERS[fmt](tmp_path, make_episodes(rng, 4, splits=("train",)))
    data = str(tmp_path / "rl") if fmt == "rlds" else str(path)
    capsys.readouterr()
    rc = main(["train", "--data", data, "--policy", "mlp", "--size", "tiny", "--out", str(tmp_path / "pol"),
               "--steps", "2", "--batch-size", "8", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["episodes"] == 4


def test_train_and_featurize_list_unread_fields_once(tmp_path, rng, capsys, caplog):
    path = tmp_path / "kp.zarr"
    _replay_with_keypoints(path, rng)
    with caplog.at_level(logging.INFO, logger="cupid_engine"):
        assert main(["train", "--data", str(path), "--policy", "mlp", "--size", "tiny", "--out", str(tmp_path / "pol"),
                     "--steps", "1", "--no-progress"]) == 0
        assert main(["featurize", "--policy", str(tmp_path / "pol"), "--data", str(path), "--store", str(tmp_path / "st"),
                     "--run", "base", "--k", "8", "--dtype", "float32", "--no-progress"]) == 0
    notes = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    # once per dataset and process (both commands ran in this process)
    assert len(notes) == 1 and "data/keypoint float32 [9, 2] per step" in notes[0], notes


def test_train_version_of_a_builder_folder(tmp_path, rng, capsys):
    builder = tmp_path / "rl"
    write_rlds(builder / "1.0.0", make_episodes(rng, 3, splits=("train",)))
    write_rlds(builder / "1.1.0", make_episodes(rng, 5, splits=("train",)))
    base = ["train", "--data", str(builder), "--policy", "mlp", "--size", "tiny", "--steps", "1", "--no-progress"]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 5  # the newest
    assert main([*base, "--out", str(tmp_path / "b"), "--version", "1.0.0"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 3
    assert main([*base, "--out", str(tmp_path / "c"), "--version", "2.0"]) == 2
    assert "no version '2.0' with shards (have ['1.0.0', '1.1.0'])" in capsys.readouterr().err
    lerobot = write_dataset(tmp_path / "ds", make_episodes(rng, 2))
    with pytest.raises(ValueError, match="version= picks a TFDS builder version"):
        open_source(lerobot, version="1.0.0")
    assert main(["train", "--data", str(lerobot), "--policy", "mlp", "--out", str(tmp_path / "d"), "--version", "1.0.0"]) == 2
    assert "this is a lerobot dataset" in capsys.readouterr().err  # one line, no traceback
