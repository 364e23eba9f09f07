"""``cupid-engine train --keep/--exclude/--episodes`` with a fixed optimiser-step budget."""

from __future__ import annotations

import json
import math

import torch

from cupid_engine.cli import main
from cupid_engine.policies.training import TrainConfig

FULL_SAMPLES = 12 * 12  # 12 training demos of 12 steps, one sample per step


def _train(loop, tmp_path, capsys, name, *args):
    capsys.readouterr()
    rc = main(["train", "--data", loop["data"], "--policy", "mlp", "--size", "tiny", "--out", str(tmp_path / name),
               "--batch-size", "64", "--no-progress", *args])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if rc == 0 else None), captured.err


def test_keep_a_curated_table_with_the_full_step_budget(loop, tmp_path, capsys):
    scores, keep = str(tmp_path / "s.parquet"), str(tmp_path / "keep.parquet")
    assert main(["score", "cupid", "--store", loop["store"], "--run", "base", "--out", scores]) == 0
    assert main(["curate", "keep", "--scores", scores, "--k", "4", "--out", keep]) == 0
    budget = TrainConfig().epochs * math.ceil(FULL_SAMPLES / 64)
    rc, info, err = _train(loop, tmp_path, capsys, "p1", "--keep", keep, "--lr", "1e-3")
    assert rc == 0 and info["episodes"] == 4 and info["samples"] == 48
    assert info["steps"] == budget and info["step_budget"] == "fixed"
    assert f"fixed step budget: {budget} optimizer steps" in err and "--keep" in err
    assert info["selection"].startswith("4 episodes (--keep")
    # The full split at the default epochs takes exactly that many steps.
    rc, full, err = _train(loop, tmp_path, capsys, "full")
    assert rc == 0 and full["episodes"] == 12 and full["steps"] == budget and full["step_budget"] == "epochs"


def test_exclude_ids_and_episodes_and_epochs(loop, tmp_path, capsys):
    ids = tmp_path / "removed.txt"
    ids.write_text("demo_00\ndemo_03\n# a comment\n\ndemo_06\n")
    rc, info, err = _train(loop, tmp_path, capsys, "p2", "--exclude", str(ids), "--steps", "3")
    assert rc == 0 and info["episodes"] == 9 and info["steps"] == 3 and info["step_budget"] == "steps"
    assert "minus 3 excluded" in err
    rc, info, err = _train(loop, tmp_path, capsys, "p3", "--episodes", "demo_01,demo_02", "--epochs", "2")
    assert rc == 0 and info["episodes"] == 2 and info["steps"] == 2  # 24 samples: one batch an epoch
    assert "trained by epochs on a subset" in err
    # The full training split keeps the plain epoch behaviour and prints no subset note.
    rc, info, err = _train(loop, tmp_path, capsys, "p4", "--steps", "2")
    assert rc == 0 and info["episodes"] == 12 and "train:" not in err


def test_bad_selections_are_one_line_errors(loop, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("demo_01\nnot_an_episode\n")
    for args, needle in (
        (["--keep", str(bad)], "1 episode(s) to keep are not in the dataset (first: ['not_an_episode'])"),
        (["--exclude", str(bad)], "to exclude are not in the dataset"),
        (["--keep", str(tmp_path / "missing.parquet")], "is not a file"),
        (["--keep", str(bad), "--episodes", "demo_01"], "--keep and --episodes"),
        (["--episodes", "hold_0", "--split", "train"], "no episodes left to train on"),
    ):
        rc, _, err = _train(loop, tmp_path, capsys, "x", *args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (args, err)


def test_weights_zero_equals_exclusion(loop, tmp_path, capsys):
    ids = tmp_path / "removed.txt"
    ids.write_text("demo_00\ndemo_03\ndemo_06\n")
    csv = tmp_path / "w.csv"
    csv.write_text("episode_id,w\n" + "".join(f"demo_{i:02d},{0 if i in (0, 3, 6) else 1}\n" for i in range(12)))
    rc, excl, _ = _train(loop, tmp_path, capsys, "ex", "--exclude", str(ids), "--steps", "4")
    assert rc == 0
    rc, wtd, err = _train(loop, tmp_path, capsys, "wt", "--weights", str(csv), "--weight-column", "w", "--steps", "4")
    assert rc == 0 and wtd["episodes"] == 12 and wtd["kept_samples"] == 9 * 12 and "weighted by" in err
    # Weight 0 drops the samples before anything else: the same parameters as leaving them out.
    assert wtd["content_hash"] == excl["content_hash"]
    rc, wtd, err = _train(loop, tmp_path, capsys, "wt2", "--weights", str(csv), "--weight-column", "w")
    assert rc == 0 and wtd["step_budget"] == "fixed"
    assert wtd["steps"] == TrainConfig().epochs * math.ceil(FULL_SAMPLES / 64)
    csv.write_text("episode_id,w\ndemo_00,1\n")
    rc, _, err = _train(loop, tmp_path, capsys, "wt3", "--weights", str(csv), "--weight-column", "w")
    assert rc == 2 and "no weight for 11 episode(s)" in err
    rc, _, err = _train(loop, tmp_path, capsys, "wt4", "--weights", str(csv))
    assert rc == 2 and "has no column 'weight'" in err


def test_checkpoint_every_saves_loadable_intermediate_weights(loop, tmp_path, capsys):
    from cupid_engine.policies.checkpoint import load_policy

    rc, info, err = _train(loop, tmp_path, capsys, "ck", "--steps", "7", "--checkpoint-every", "3")
    assert rc == 0, err
    names = [p.rsplit("/", 1)[-1] for p in info["checkpoints"]]
    assert names == ["step-000003", "step-000006"]
    snap = load_policy(info["checkpoints"][1])
    final = load_policy(info["out"])
    meta = json.loads((tmp_path / "ck" / "checkpoints" / "step-000006" / "config.json").read_text())
    assert meta["train_info"]["steps"] == 6 and meta["train_config"]["steps"] == 7
    assert any(not torch.equal(a, b) for a, b in zip(snap.parameters(), final.parameters()))
    # A second run into the same folder is refused before training, naming the folder.
    rc, _, err = _train(loop, tmp_path, capsys, "ck", "--steps", "7")
    assert rc != 0 and "already holds a checkpoint" in err and "ck" in err
    rc, _, err = _train(loop, tmp_path, capsys, "ck0", "--steps", "2", "--checkpoint-every", "0")
    assert rc != 0 and "--checkpoint-every must be >= 1" in err
