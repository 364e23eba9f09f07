"""A hostile user at the command line: every mistake is one line, exit 2, and the store is untouched.

Each case runs the real CLI (``cupid_engine.cli.main``) on real LeRobot datasets, real
checkpoints and real Zarr stores, then checks three things: the exit code is 2, the
one-line message names the culprit (file, episode or field), and every file of the
store (or of the folder mistaken for one) hashes the same as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from cupid_engine.cli import main
from cupid_engine.data import write_dataset
from cupid_engine.data.episode import Episode
from cupid_engine.featurize import FeaturizeConfig, featurize
from cupid_engine.policies import MLPPolicyConfig, TrainConfig, load_policy, save_policy, train_policy
from cupid_engine.store import GradientStore
from _snapshot import tree_sha256

K = 16


def _episodes(n: int, *, seed: int, prefix: str = "ep", split: str | None = None, length: int = 6) -> list[Episode]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = length + i % 2
        obs = np.cumsum(rng.normal(scale=0.2, size=(T, 4)), axis=0).astype(np.float32)
        act = np.tanh(obs[:, :2] + rng.normal(scale=0.05, size=(T, 2))).astype(np.float32)
        sp = split or ("holdout" if i % 3 == 2 else "train")
        out.append(Episode(episode_id=f"{prefix}{i:03d}", observations={"pos": obs}, actions=act, split=sp,
                           source=f"{prefix}-data", success=bool(i % 2) if sp == "rollout" else None))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Demos (6, train/holdout), rollouts (3), a tiny policy and a store holding the demos in run 'r'."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hostile")
    demos = _episodes(6, seed=0)
    data = write_dataset(root / "demos", demos, episodes_per_file=3)
    rollouts = write_dataset(root / "rollouts", _episodes(3, seed=1, prefix="ro", split="rollout"), episodes_per_file=3)
    policy = train_policy(MLPPolicyConfig.tiny(), demos, TrainConfig(steps=2, batch_size=16), progress=False)
    ckpt = save_policy(policy, root / "policy")
    cfg = FeaturizeConfig.for_method(k=K, shard_size=2, dtype="float32", output="energy")
    featurize(str(data), root / "base.zarr", "r", policy=str(ckpt), config=cfg, progress=False)
    return {"root": root, "data": data, "rollouts": rollouts, "ckpt": ckpt, "base": root / "base.zarr",
            "demos": demos}


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def _user_error(capsys, *argv) -> str:
    """Run a command that must fail as a user error; return its one line."""
    rc, err = _cli(capsys, *argv)
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


def _featurize_args(world, store, *, run="r", data=None, ckpt=None, extra=()):
    return ["featurize", "--policy", ckpt or world["ckpt"], "--data", data or world["data"], "--store", store,
            "--run", run, "--k", K, "--shard-size", 2, "--dtype", "float32", "--output", "energy", "--no-progress",
            *extra]


@pytest.fixture
def store(world, tmp_path):
    """A private copy of the base store."""
    dst = tmp_path / "store.zarr"
    shutil.copytree(world["base"], dst)
    return dst


# ----------------------------------------------------------------------------- data loss
@pytest.mark.parametrize("overwrite", [False, True])
def test_store_path_that_is_a_dataset_is_refused(world, tmp_path, capsys, overwrite):
    data = tmp_path / "demos"
    shutil.copytree(world["data"], data)
    before = tree_sha256(data)
    line = _user_error(capsys, *_featurize_args(world, data, data=world["data"],
                                                extra=["--overwrite"] if overwrite else []))
    assert "LeRobot dataset" in line and str(data) in line
    assert tree_sha256(data) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_empty_folder_is_never_replaced(world, tmp_path, capsys, overwrite):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    line = _user_error(capsys, *_featurize_args(world, folder, extra=["--overwrite"] if overwrite else []))
    assert "notes.txt" in line and "not a gradient store" in line
    assert (folder / "notes.txt").read_text() == "keep me" and os.listdir(folder) == ["notes.txt"]


def test_overwrite_replaces_a_store_only_on_success(world, store, capsys):
    before = tree_sha256(store)
    _user_error(capsys, *_featurize_args(world, store, run="x", extra=["--overwrite", "--split", "rollout"]))
    assert tree_sha256(store) == before  # the failed replacement left the old store as it was
    rc, _ = _cli(capsys, *_featurize_args(world, store, run="fresh", extra=["--overwrite"]))
    assert rc == 0 and GradientStore.open(store).runs() == ["fresh"]
    assert not [n for n in os.listdir(store.parent) if n.startswith(".store.zarr.")]


# ----------------------------------------------------------------------------- poisoned store
def _poison_length(data, episode_index: int, value: int) -> None:
    """Rewrite the dataset's episode metadata to claim ``value`` steps for one episode."""
    for rel in ("meta/episodes/chunk-000/file-000.parquet", "meta/cupid_engine/episodes.parquet"):
        path = os.path.join(data, rel)
        if not os.path.exists(path):
            continue
        t = pq.read_table(path)
        if "length" not in t.column_names:
            continue
        for col in ("length", "dataset_to_index"):
            if col in t.column_names:
                values = t.column(col).to_pylist()
                values[episode_index] = value if col == "length" else values[episode_index] - values[0] + value
                t = t.set_column(t.column_names.index(col), col,
                                 pc.cast(pa.array(values, pa.int64()), t.schema.field(col).type))
        pq.write_table(t, path)


def test_metadata_length_lie_registers_nothing(world, tmp_path, store, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(world["data"], bad)
    _poison_length(bad, 0, 999_999_999_998_853)
    new = tmp_path / "new.zarr"
    line = _user_error(capsys, *_featurize_args(world, new, data=bad))
    assert "'ep000'" in line and "length" in line and "999999999998853" in line
    assert not new.exists()  # the store this command would have created is gone again
    before = tree_sha256(store)
    line = _user_error(capsys, *_featurize_args(world, store, run="other", data=bad))
    assert "'ep000'" in line
    assert tree_sha256(store) == before
    # Not poisoned: the correct data still featurises.
    rc, _ = _cli(capsys, *_featurize_args(world, new))
    assert rc == 0 and GradientStore.open(new).run("r").info()["finalized"]


def test_changed_content_under_a_stored_id_is_refused(world, tmp_path, store, capsys):
    changed = write_dataset(tmp_path / "changed", _episodes(6, seed=7), episodes_per_file=3)
    before = tree_sha256(store)
    for run in ("r", "new-run"):  # the finished run, and a new run over the same catalog
        line = _user_error(capsys, *_featurize_args(world, store, run=run, data=changed))
        assert "'ep000'" in line and "other content" in line and str(changed) in line
        assert tree_sha256(store) == before


def test_replace_rewrites_changed_episodes_in_every_run(world, tmp_path, store, capsys):
    eps = world["demos"]
    eps2 = [Episode(e.episode_id, {"pos": e.observations["pos"] + (0.5 if e.episode_id == "ep004" else 0.0)},
                    e.actions, split=e.split, source=e.source) for e in eps]
    changed = write_dataset(tmp_path / "changed", eps2, episodes_per_file=3)
    other = _featurize_args(world, store, run="r-loss")
    other[other.index("--output") + 1] = "loss"
    assert main([str(a) for a in other]) == 0
    old = GradientStore.open(store).run("r").step_features("ep004")
    rc, _ = _cli(capsys, *_featurize_args(world, store, data=changed, extra=["--replace"]))
    assert rc == 0
    s = GradientStore.open(store)
    new = s.run("r").step_features("ep004")
    assert s.run("r").info()["finalized"] and not np.allclose(new, old)
    np.testing.assert_array_equal(s.run("r").step_features("ep000"), GradientStore.open(world["base"]).run("r")
                                  .step_features("ep000"))
    info = s.run("r-loss").info()  # the other run's copy of ep004 is stale: its shard is to be redone
    assert not info["finalized"] and info["shards_done"] == info["shards_total"] - 1
    # Without --replace the (now stored) new content is accepted; the old one is refused.
    line = _user_error(capsys, *_featurize_args(world, store, data=world["data"]))
    assert "'ep004'" in line and "--replace" in line
    # A replacement may not change an episode's length.
    eps3 = eps2[:4] + [Episode("ep004", {"pos": eps2[4].observations["pos"][:-1]}, eps2[4].actions[:-1],
                               split=eps2[4].split)] + eps2[5:]
    shorter = write_dataset(tmp_path / "shorter", eps3, episodes_per_file=3)
    before = tree_sha256(store)
    line = _user_error(capsys, *_featurize_args(world, store, data=shorter, extra=["--replace"]))
    assert "'ep004'" in line and "length changed" in line
    assert tree_sha256(store) == before


def test_colliding_ids_of_another_dataset_are_refused(world, tmp_path, store, capsys):
    other = write_dataset(tmp_path / "other", _episodes(3, seed=3, split="rollout"), episodes_per_file=3)
    before = tree_sha256(store)
    line = _user_error(capsys, *_featurize_args(world, store, data=other))
    assert "'ep000'" in line and "'ep-data'" in line  # names the id and the source holding it
    assert tree_sha256(store) == before


# ----------------------------------------------------------------------------- empty and out-of-reach work
def test_split_without_episodes_is_an_error(world, tmp_path, store, capsys):
    before = tree_sha256(store)
    line = _user_error(capsys, *_featurize_args(world, store, run="ro", extra=["--split", "rollout"]))
    assert "split 'rollout'" in line and "train 4" in line
    assert tree_sha256(store) == before and GradientStore.open(store).runs() == ["r"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _user_error(capsys, *_featurize_args(world, empty, extra=["--split", "rollout"]))
    assert empty.is_dir() and not os.listdir(empty)  # the empty folder is left empty


def test_huge_k_is_refused_before_allocating(world, store, capsys):
    before = tree_sha256(store)
    args = _featurize_args(world, store, run="huge")
    args[args.index("--k") + 1] = 100_000_000
    line = _user_error(capsys, *args)
    assert "GiB" in line and "k=100000000" in line and "--k" in line
    assert tree_sha256(store) == before


def test_failed_featurisation_leaves_no_run_behind(world, tmp_path, store, capsys):
    policy = load_policy(world["ckpt"])
    with torch.no_grad():
        next(policy.parameters()).fill_(float("nan"))
    nan_ckpt = save_policy(policy, tmp_path / "nan-policy")
    before = tree_sha256(store)
    line = _user_error(capsys, *_featurize_args(world, store, run="nan", ckpt=nan_ckpt))
    assert "non-finite" in line and "episode 'ep000'" in line
    assert tree_sha256(store) == before


# ----------------------------------------------------------------------------- two datasets, one store
def test_second_dataset_and_second_run(world, store, capsys):
    rc, _ = _cli(capsys, *_featurize_args(world, store, data=world["rollouts"]))
    assert rc == 0
    s = GradientStore.open(store)
    assert s.run("r").info()["finalized"] and len(s.episode_ids()) == 9
    # A second run with another output: demos first (rollout shards pending), then rollouts.
    args = _featurize_args(world, store, run="r2")
    args[args.index("--output") + 1] = "loss"
    rc, _ = _cli(capsys, *args)
    assert rc == 0
    info = GradientStore.open(store).run("r2").info()
    assert not info["finalized"] and info["shards_done"] < info["shards_total"]
    assert main(["store", "info", str(store)]) == 0
    r2 = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("r2 ")]
    assert r2 and "finalized" not in r2[0]
    rc, _ = _cli(capsys, *(args[:4] + [world["rollouts"]] + args[5:]))
    assert rc == 0 and GradientStore.open(store).run("r2").info()["finalized"]


def test_store_info_does_not_call_a_grown_catalog_finalized(world, store, capsys):
    import pyarrow as pa

    from cupid_engine.errors import StoreError

    s = GradientStore.open(store, mode="a")
    s.add_episodes(pa.table({"episode_id": ["late"], "split": ["train"], "length": [3]}))
    assert main(["store", "info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "finalized" not in out.split("runs:")[1] and "shards" in out.split("runs:")[1]
    run = s.create_run("unreduced", s.run("r").config)
    with pytest.raises(StoreError, match="not finalized") as exc:
        run.gram()
    assert "run.finalize()" not in str(exc.value) and "cupid-engine featurize --run unreduced" in str(exc.value)


# ----------------------------------------------------------------------------- bad files
def test_corrupt_data_file_names_the_file(world, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(world["data"], bad)
    path = bad / "data" / "chunk-000" / "file-001.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    new = tmp_path / "s.zarr"
    line = _user_error(capsys, *_featurize_args(world, new, data=bad))
    assert "file-001" in line
    assert not new.exists()


def test_corrupt_dataset_metadata_names_the_dataset(world, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(world["data"], bad)
    (bad / "meta" / "info.json").write_text("{truncated")
    line = _user_error(capsys, *_featurize_args(world, tmp_path / "s.zarr", data=bad))
    assert str(bad) in line and "JSONDecodeError" in line  # the reader does not say which JSON file
    assert not (tmp_path / "s.zarr").exists()


def test_corrupt_store_chunk_names_the_episodes(world, store, capsys, tmp_path):
    line = _user_error(capsys, "score", "cupid", "--store", store, "--run", "r", "--out", tmp_path / "o.parquet")
    assert "no episodes selected by 'rollout'" in line  # the demos-only store has no rollouts yet
    assert main([str(a) for a in _featurize_args(world, store, data=world["rollouts"])]) == 0
    chunk = store / "runs" / "r" / "episodes" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    line = _user_error(capsys, "score", "cupid", "--store", store, "--run", "r", "--out", tmp_path / "o.parquet")
    assert "corrupt chunk" in line and "'ep000'" in line
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize("damage", ["catalog.parquet", "zarr.json", "runs/r/zarr.json", "runs/r/steps/zarr.json"])
def test_damaged_store_files_are_named(world, store, capsys, damage):
    path = store / damage
    path.write_bytes(path.read_bytes()[:40])
    before = tree_sha256(store)
    commands = [["store", "info", store], ["score", "cupid", "--store", store, "--run", "r", "--out",
                                             store.parent / "o.parquet"]]
    if "steps" not in damage:  # a damaged array of run r does not stop a new run
        commands.append(_featurize_args(world, store, run="new"))
    for argv in commands:
        line = _user_error(capsys, *argv)
        # names the damaged file, or the folder holding it (zarr does not say which child failed)
        assert (str(path) in line or str(path.parent.parent) in line) and "damaged" in line
    assert tree_sha256(store) == before


def test_bad_checkpoints_name_the_file(world, tmp_path, capsys):
    cfg_bad = tmp_path / "cfg"
    shutil.copytree(world["ckpt"], cfg_bad)
    (cfg_bad / "config.json").write_text("{not json")
    line = _user_error(capsys, *_featurize_args(world, tmp_path / "a.zarr", ckpt=cfg_bad))
    assert str(cfg_bad / "config.json") in line
    st_bad = tmp_path / "st"
    shutil.copytree(world["ckpt"], st_bad)
    (st_bad / "model.safetensors").write_bytes(b"\xff" * 64)
    line = _user_error(capsys, *_featurize_args(world, tmp_path / "b.zarr", ckpt=st_bad))
    assert str(st_bad / "model.safetensors") in line and "safetensors" in line
    line = _user_error(capsys, *_featurize_args(world, tmp_path / "c.zarr", ckpt=tmp_path / "nowhere"))
    assert "nowhere" in line and "not a policy checkpoint" in line
    assert not any((tmp_path / n).exists() for n in ("a.zarr", "b.zarr", "c.zarr"))


def test_missing_and_foreign_stores(world, tmp_path, capsys):
    line = _user_error(capsys, "store", "info", tmp_path / "absent")
    assert "no gradient store" in line and "absent" in line
    line = _user_error(capsys, "store", "verify", world["data"])
    assert "LeRobot dataset" in line


@pytest.mark.parametrize("extra,needle", [(["--track", "nosuchmodule"], "nosuchmodule"),
                                          (["--device", "tpu"], "--device"), (["--batch-size", "0"], "batch_size")])
def test_bad_featurize_options_are_one_line(world, tmp_path, capsys, extra, needle):
    line = _user_error(capsys, *_featurize_args(world, tmp_path / "s.zarr", extra=extra))
    assert needle in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("option,needle", [("damping=abc", "'abc'"), ("dampin=1", "dampin")])
def test_bad_scorer_options_are_one_line(world, tmp_path, capsys, option, needle):
    line = _user_error(capsys, "score", "cupid", "--store", world["base"], "--run", "r", "--out",
                       tmp_path / "o.parquet", "--set", option)
    assert needle in line and "damping" in line


# ----------------------------------------------------------------------------- the error path itself
def test_debug_shows_the_traceback(tmp_path):
    from cupid_engine.errors import UserError

    with pytest.raises(UserError, match="no gradient store"):
        main(["store", "info", str(tmp_path / "absent"), "--debug"])


def test_bugs_keep_their_traceback(world, monkeypatch):
    def boom(self):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(GradientStore, "info", boom)
    with pytest.raises(ZeroDivisionError):
        main(["store", "info", str(world["base"])])


def test_third_party_info_logs_are_hidden(world, capsys):
    assert main(["store", "info", str(world["base"])]) == 0
    assert not logging.getLogger("faiss.loader").isEnabledFor(logging.INFO)
    assert logging.getLogger("cupid_engine.featurize").isEnabledFor(logging.INFO)


# ----------------------------------------------------------------------------- read-only store
def _make_read_only(path) -> list[str] | None:
    """Make ``path`` unwritable even for root; returns the undo command (None: cannot here)."""
    if os.geteuid() != 0:
        for d, _, files in os.walk(path):
            for n in files:
                os.chmod(os.path.join(d, n), 0o444)
            os.chmod(d, 0o555)
        return ["chmod", "-R", "u+w", str(path)]
    # root ignores permission bits: the immutable attribute binds it too (ext4/xfs/btrfs)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(path)],
                                                        capture_output=True).returncode:
        return None
    return ["chattr", "-R", "-i", str(path)]


def test_read_only_store_answers_queries(world, tmp_path, capsys):
    """``query`` on a store nobody may write: index in the user cache, no faiss INFO noise."""
    store, cache = tmp_path / "store.zarr", tmp_path / "cache"
    shutil.copytree(world["base"], store)
    assert main([str(a) for a in _featurize_args(world, store, data=world["rollouts"])]) == 0
    undo = _make_read_only(store)
    if undo is None:
        pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    try:
        before = tree_sha256(store)
        env = dict(os.environ, CUPID_ENGINE_CACHE_DIR=str(cache))
        cmd = [sys.executable, "-m", "cupid_engine", "query", "--store", str(store), "--run", "r",
               "--episode", "ro001", "--top", "3"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        assert "AVX" not in res.stderr and "faiss.loader" not in res.stderr, res.stderr
        assert tree_sha256(store) == before and not (store / "index").exists()
        assert any(n.endswith(".faiss") for _, _, ns in os.walk(cache) for n in ns)
        out = tmp_path / "scores.parquet"
        assert main(["score", "cupid", "--store", str(store), "--run", "r", "--out", str(out)]) == 0
        assert pq.read_table(out).num_rows == 4 and tree_sha256(store) == before
    finally:
        subprocess.run(undo, check=True)
