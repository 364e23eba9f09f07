"""Gradient store safety: never replace foreign data, undo a failed command, fingerprints."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _store_writer import episode_table, write_shards

from cupid_engine.errors import NotAStoreError, StoreExistsError, StoreNotFoundError, UserError
from cupid_engine.store import catalog as _catalog
from cupid_engine.store.config import RunConfig
from cupid_engine.store.gradient_store import GradientStore, create_store, open_store
from cupid_engine.store.undo import StoreUndo
from _snapshot import tree_sha256

K = 8


@pytest.fixture
def store(tmp_path) -> GradientStore:
    st = create_store(str(tmp_path / "s.zarr"), chunk_rows=16, episode_chunk_rows=4)
    st.add_episodes(episode_table(7), shard_size=3)
    run = st.create_run("r", RunConfig(k=K))
    write_shards(st, run, range(st.num_shards))
    run.finalize()
    return st


# ---------------------------------------------------------------- creating over foreign data
@pytest.mark.parametrize("overwrite", [False, True])
def test_create_refuses_a_non_empty_folder_that_is_not_a_store(tmp_path, overwrite):
    folder = tmp_path / "mine"
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "info.json").write_text("{}")
    (folder / "notes.txt").write_text("x")
    before = tree_sha256(folder)
    with pytest.raises(NotAStoreError, match=r"LeRobot dataset.*meta, notes\.txt") as exc:
        create_store(folder, overwrite=overwrite)
    assert isinstance(exc.value, UserError) and "nothing there was changed" in str(exc.value)
    assert tree_sha256(folder) == before
    with pytest.raises(NotAStoreError, match="not a gradient store"):
        GradientStore.open(folder, mode="a")  # "create when missing" must not create over it
    assert tree_sha256(folder) == before


def test_create_refuses_a_file_and_a_foreign_zarr_group(tmp_path):
    f = tmp_path / "demo.hdf5"
    f.write_bytes(b"\x89HDF")
    with pytest.raises(NotAStoreError, match="is a file"):
        create_store(f)
    import zarr

    zarr.open_group(str(tmp_path / "z"), mode="w").attrs["x"] = 1
    before = tree_sha256(tmp_path / "z")
    with pytest.raises(NotAStoreError, match="Zarr group that is not"):
        create_store(tmp_path / "z", overwrite=True)
    assert tree_sha256(tmp_path / "z") == before


def test_overwrite_replaces_only_a_store_and_empty_folders_are_fine(tmp_path, store):
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        create_store(store.url)
    fresh = create_store(store.url, overwrite=True)
    assert fresh.num_episodes == 0 and fresh.runs() == []
    (tmp_path / "empty").mkdir()
    assert create_store(tmp_path / "empty").num_episodes == 0


def test_open_names_what_is_missing(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no gradient store") as exc:
        open_store(tmp_path / "absent")
    assert isinstance(exc.value, FileNotFoundError)


# ---------------------------------------------------------------- undo
def test_undo_puts_catalog_and_runs_back_byte_for_byte(store):
    before = tree_sha256(store.url)
    for name in ("r", "other"):  # an existing run grown, a new run created
        undo = StoreUndo(store, run=name)
        store.add_episodes(episode_table(5, prefix="new"), shard_size=2)
        if name == "r":
            store.run("r").sync()  # grows the run's arrays (their zarr.json)
        else:
            store.create_run("other", RunConfig(k=K))
        undo.restore()
        assert tree_sha256(store.url) == before
        assert store.num_episodes == 7 and store.runs() == ["r"]


def test_undo_leaves_another_process_catalog_and_runs_alone(store):
    undo = StoreUndo(store, run="mine")
    other = open_store(store.url, mode="a")  # another driver: its own handle
    other.add_episodes(episode_table(2, prefix="theirs"), shard_size=2)
    other.create_run("theirs", RunConfig(k=K))
    undo.restore()
    st = open_store(store.url)
    assert st.num_episodes == 9 and "theirs" in st.runs()
    assert not [n for n in os.listdir(store.url) if ".undo-" in n]


def test_undo_of_an_unchanged_store_leaves_nothing_behind(store):
    before = tree_sha256(store.url)
    StoreUndo(store).restore()
    assert tree_sha256(store.url) == before
    undo = StoreUndo(store)
    store.add_episodes(episode_table(2, prefix="kept"), shard_size=2)
    undo.release()
    assert store.num_episodes == 9 and not [n for n in os.listdir(store.url) if ".undo-" in n]


def test_undo_removes_a_store_it_created(tmp_path):
    (tmp_path / "empty").mkdir()
    st = create_store(tmp_path / "empty")
    st.add_episodes(episode_table(3), shard_size=2)
    StoreUndo(st, created=True, had_folder=True).restore()
    assert (tmp_path / "empty").is_dir() and not os.listdir(tmp_path / "empty")
    st = create_store(tmp_path / "new")
    StoreUndo(st, created=True, had_folder=False).restore()
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- fingerprints
def test_fingerprint_is_content():
    a = np.arange(12, dtype=np.float32).reshape(6, 2)
    obs = {"pos": np.ones((6, 3), np.float32), "vel": np.zeros((6, 1), np.float32)}
    fp = _catalog.episode_fingerprint(a, obs)
    assert fp == _catalog.episode_fingerprint(a.astype(np.float64), dict(reversed(list(obs.items()))))
    b = a.copy()
    b[5, 1] = np.nextafter(b[5, 1], np.inf)
    assert _catalog.episode_fingerprint(b, obs) != fp
    assert _catalog.episode_fingerprint(a, {"pos": obs["pos"], "v": obs["vel"]}) != fp  # a key renamed
    assert _catalog.episode_fingerprint(a.reshape(4, 3), obs) != fp  # same bytes, other shape
    cam = np.zeros((6, 8, 8, 3), np.uint8)
    with_cam = _catalog.episode_fingerprint(a, obs, images={"agentview": cam})
    assert with_cam != fp and with_cam == _catalog.episode_fingerprint(a, obs, images={"agentview": cam + 1})
    assert _catalog.episode_fingerprint(a, obs, images={"agentview": cam[:, :4]}) != with_cam  # resolution
    assert _catalog.episode_fingerprint(a, obs, task="lift the cube") != fp  # the instruction


def test_fingerprints_are_stored_and_replaced_with_invalidated_shards(store):
    ids = store.episode_ids()
    assert store.catalog().column("fingerprint").null_count == len(ids)  # none given
    t = pa.table({"episode_id": ["fp1", "fp2"], "split": ["train", "train"], "length": [3, 4],
                  "fingerprint": ["aa", "bb"]})
    store.add_episodes(t, shard_size=2)
    store.run("r").sync()
    write_shards(store, store.run("r"), store.run("r").pending_shards())
    store.run("r").finalize()
    assert store.catalog_rows(["fp2"], ["fingerprint"]).column(0).to_pylist() == ["bb"]
    shards = store.set_fingerprints({"fp2": "cc"})
    assert shards == [store.num_shards - 1]
    assert store.catalog_rows(["fp1", "fp2"], ["fingerprint"]).column(0).to_pylist() == ["aa", "cc"]
    assert store.episode_ids() == ids + ["fp1", "fp2"]  # nothing moved
    run = store.run("r")
    assert run.info()["finalized"]
    run.invalidate_shards(shards)
    assert run.pending_shards() == shards and not run.info()["finalized"]


def test_legacy_catalog_without_fingerprints_reads_and_grows(store):
    path = os.path.join(store.url, _catalog.CATALOG_NAME)
    legacy = pq.read_table(path).drop_columns(["fingerprint"])
    assert legacy.column_names == _catalog.LEGACY_NAMES
    pq.write_table(legacy, path)
    st = open_store(store.url, mode="a")
    assert st.catalog().column("fingerprint").null_count == 7
    assert st.run("r").episode_features(["ep_0003"]).shape == (1, K)
    st.add_episodes(pa.table({"episode_id": ["x"], "split": ["train"], "length": [2], "fingerprint": ["ff"]}))
    assert pq.read_schema(path).names == _catalog.CATALOG_SCHEMA.names
    assert st.catalog().column("fingerprint").to_pylist() == [None] * 7 + ["ff"]


def test_finalized_means_the_gram_covers_the_current_catalog(store):
    run = store.run("r")
    assert run.finalized_current() and run.info()["finalized"]
    store.add_episodes(episode_table(2, prefix="late"), shard_size=2)
    assert not run.finalized_current() and not run.info()["finalized"]


def _append_slowly(url: str, prefix: str) -> None:
    import time

    st = open_store(url, mode="a")

    def tables():
        for i in range(3):
            time.sleep(0.05)  # widen the window in which the other driver runs
            yield episode_table(4, prefix=f"{prefix}{i}")

    st.append_episodes(tables(), shard_size=2)


def test_two_drivers_appending_at_once_keep_both(store):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_slowly, args=(store.url, p)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    ids = open_store(store.url).episode_ids()
    assert len(ids) == 7 + 24 and len(set(ids)) == len(ids)


def test_leftovers_of_killed_commands_are_removed(store):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f"catalog.parquet.undo-{dead}", f"catalog.parquet.tmp-{dead}"):
        with open(os.path.join(store.url, name), "wb") as f:
            f.write(b"x")
    alive = os.path.join(store.url, f"catalog.parquet.undo-{os.getppid()}")
    with open(alive, "wb") as f:
        f.write(b"x")
    StoreUndo(store).release()
    left = sorted(n for n in os.listdir(store.url) if n.startswith("catalog.parquet."))
    assert left == [os.path.basename(alive)]
    os.remove(alive)
