"""Gradient store: catalog, shard plan, round trips, validation, corruption, URLs."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pyarrow as pa
import pytest
import torch
import zarr
from _store_writer import episode_table, shard_features, write_shards

# Submodule imports: they resolve whatever state the shared editable install is in.
from cupid_engine.store.config import RunConfig
from cupid_engine.store.gradient_store import (
    CorruptChunkError,
    GradientStore,
    SchemaVersionError,
    create_store,
    open_store,
)
from _snapshot import tree_bytes

K = 12


@pytest.fixture
def store(tmp_path) -> GradientStore:
    st = create_store(str(tmp_path / "s.zarr"), chunk_rows=16, episode_chunk_rows=4)
    st.add_episodes(episode_table(11), shard_size=3)
    return st


def _full_features(store, k):
    """``{episode_id: [T, k]}`` of the deterministic writer features."""
    out = {}
    for s in range(store.num_shards):
        ids, lengths = store.shard_episodes(s)
        x = shard_features(s, int(lengths.sum()), k)
        for eid, a, b in zip(ids, np.cumsum(lengths) - lengths, np.cumsum(lengths)):
            out[eid] = x[a:b]
    return out


# ---------------------------------------------------------------- catalog / plan
def test_shard_plan_is_chunk_aligned_and_append_only(tmp_path):
    st = create_store(str(tmp_path / "s.zarr"), chunk_rows=16, episode_chunk_rows=4)
    st.add_episodes(episode_table(7), shard_size=3)
    before = st.catalog()
    st.add_episodes(episode_table(5, prefix="ro", seed=1), shard_size=2)
    cat = open_store(str(tmp_path / "s.zarr")).catalog()
    assert cat.slice(0, 7).equals(before)
    assert cat.column("shard").to_pylist() == [0, 0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 5]
    shard = np.array(cat.column("shard").to_pylist())
    off = np.array(cat.column("row_offset").to_pylist())
    slot = np.array(cat.column("episode_slot").to_pylist())
    length = np.array(cat.column("length").to_pylist())
    for s in np.unique(shard):
        rows = np.flatnonzero(shard == s)
        assert off[rows[0]] % 16 == 0 and slot[rows[0]] % 4 == 0
        # Episodes of a shard are contiguous, and shards never overlap.
        np.testing.assert_array_equal(off[rows[1:]], off[rows[:-1]] + length[rows[:-1]])
    assert np.all(off[1:] >= off[:-1] + length[:-1])
    assert cat.column("return").null_count == cat.num_rows  # optional column filled with nulls
    assert st.episode_ids("rollout") == [e for e, s in zip(cat["episode_id"].to_pylist(), cat["split"].to_pylist()) if s == "rollout"]


def test_add_episodes_rejects_bad_rows_by_name(store):
    n = store.catalog().num_rows
    with pytest.raises(ValueError, match="duplicate episode_id 'ep_0003'"):
        store.add_episodes(pa.table({"episode_id": ["new", "ep_0003"], "split": ["train"] * 2, "length": [3, 4]}))
    with pytest.raises(ValueError, match="'zero'.*length must be > 0"):
        store.add_episodes(pa.table({"episode_id": ["zero"], "split": ["train"], "length": [0]}))
    with pytest.raises(ValueError, match="split 'bogus'"):
        store.add_episodes(pa.table({"episode_id": ["x"], "split": ["bogus"], "length": [3]}))
    with pytest.raises(ValueError, match="metadata is not valid JSON"):
        store.add_episodes(pa.table({"episode_id": ["x"], "split": ["train"], "length": [3], "metadata": ["{"]}))
    assert store.catalog(refresh=True).num_rows == n  # nothing appended


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"], ids=lambda d: d)
def test_round_trip_every_dtype(store, dtype):
    run = store.create_run("r", RunConfig(k=K, dtype=dtype, gram_splits=("train", "holdout")))
    write_shards(store, run, range(store.num_shards))
    run.finalize()
    feats = _full_features(store, K)
    ids = store.episode_ids()
    for eid in ids:
        want, got = feats[eid], run.step_features(eid)
        assert got.dtype == np.float32 and got.shape == want.shape
        if dtype == "float32":
            np.testing.assert_array_equal(got, want)
        elif dtype == "float16":
            np.testing.assert_allclose(got, want, rtol=2**-11, atol=2**-24)
        elif dtype == "bfloat16":
            np.testing.assert_allclose(got, want, rtol=2**-8, atol=0)
        else:  # int8: error per element within half a quantisation step of its row
            step = np.abs(want).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(got - want) <= step / 2 * (1 + 1e-5) + 1e-12)
    # Episode sums come from the fp32 features before quantisation: exact for every dtype.
    sums = np.stack([feats[e].astype(np.float64).sum(0).astype(np.float32) for e in ids])
    np.testing.assert_array_equal(run.episode_features(), sums)
    np.testing.assert_array_equal(run.episode_features(ids[::-3]), sums[::-3])
    blocks = list(run.iter_episode_features(block=4))
    assert [len(b[0]) for b in blocks] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), sums)
    assert [e for b in blocks for e in b[0]] == ids


def test_gram_equals_numpy_float64(store):
    run = store.create_run("r", RunConfig(k=K, dtype="float16"))
    write_shards(store, run, range(store.num_shards))
    gram = run.finalize()
    feats = _full_features(store, K)
    train = [e for e, s in zip(store.episode_ids(), store.catalog()["split"].to_pylist()) if s == "train"]
    x = np.concatenate([feats[e] for e in train]).astype(np.float64)
    np.testing.assert_allclose(gram, x.T @ x, rtol=1e-12, atol=1e-10)
    np.testing.assert_array_equal(run.gram(), gram)
    assert run.gram_count == x.shape[0]
    assert open_store(store.url).run("r").gram_count == x.shape[0]


def test_torch_input_and_memory_url():
    url = f"memory://cupid-test-{uuid.uuid4().hex}/s.zarr"
    st = create_store(url, chunk_rows=8, episode_chunk_rows=2)
    st.add_episodes(episode_table(5), shard_size=2)
    run = st.create_run("r", RunConfig(k=4))
    for s in range(st.num_shards):
        ids, lengths = st.shard_episodes(s)
        x = shard_features(s, int(lengths.sum()), 4)
        run.write_shard(s, ids, torch.from_numpy(x.copy()), lengths)
    run.finalize()
    again = open_store(url, mode="r")
    assert again.runs() == ["r"] and again.run("r").is_complete()
    ids, lengths = st.shard_episodes(0)
    np.testing.assert_array_equal(again.run("r").step_features(ids[0]), shard_features(0, int(lengths.sum()), 4)[: lengths[0]])
    with pytest.raises(PermissionError):
        again.add_episodes(episode_table(1, prefix="zz"))


# ---------------------------------------------------------------- configs
def test_config_mismatch_on_reopen_raises(store):
    cfg = RunConfig(k=K, dtype="float16", featurizer={"checkpoint": "abc", "output": "square"})
    run = store.create_run("r", cfg)
    write_shards(store, run, [0])
    same = open_store(store.url, mode="r+").create_run("r", RunConfig.from_dict(cfg.to_dict()))
    assert same.shard_done(0) and same.pending_shards() == list(range(1, store.num_shards))
    with pytest.raises(ValueError, match=r"different config \(dtype: stored 'float16' != requested 'int8'; k:"):
        store.create_run("r", cfg.replace(k=K + 1, dtype="int8"))
    with pytest.raises(ValueError, match="featurizer"):
        store.create_run("r", cfg.replace(featurizer={"checkpoint": "other", "output": "square"}))
    with pytest.raises(ValueError, match="dtype must be one of"):
        RunConfig(k=4, dtype="float64")


def test_schema_version_mismatch_raises(store):
    g = zarr.open_group(store.url, mode="r+")
    meta = dict(g.attrs["cupid_engine"])
    meta["schema_version"] = 999
    g.attrs["cupid_engine"] = meta
    with pytest.raises(SchemaVersionError, match="999"):
        open_store(store.url)


# ---------------------------------------------------------------- validation
def test_bad_shards_raise_and_write_nothing(store):
    run = store.create_run("r", RunConfig(k=K, dtype="int8"))
    root = os.path.join(store.url, "runs", "r")
    before = tree_bytes(root)
    ids, lengths = store.shard_episodes(1)
    x = shard_features(1, int(lengths.sum()), K)
    bad = x.copy()
    bad[lengths[0] + 2, 5] = np.nan  # second episode, step 2
    with pytest.raises(ValueError, match=rf"episode '{ids[1]}' step 2 has a non-finite"):
        run.write_shard(1, ids, bad, lengths)
    bad = x.copy()
    bad[-1, 0] = -np.inf
    with pytest.raises(ValueError, match=rf"episode '{ids[-1]}' step {lengths[-1] - 1} has a non-finite"):
        run.write_shard(1, ids, torch.from_numpy(bad), lengths)
    with pytest.raises(ValueError, match=rf"expected \[{lengths.sum()}, {K}\]"):
        run.write_shard(1, ids, x[:, :-1], lengths)
    empty = lengths.copy()
    empty[0] = 0
    with pytest.raises(ValueError, match=rf"episode '{ids[0]}' is empty"):
        run.write_shard(1, ids, x[lengths[0] :], empty)
    with pytest.raises(ValueError, match="do not match the shard plan"):
        run.write_shard(1, ids[::-1], x, lengths[::-1])
    with pytest.raises(ValueError, match="lengths do not match the catalog"):
        run.write_shard(1, ids, x[:-1], lengths - np.eye(len(lengths), dtype=np.int64)[-1])
    with pytest.raises(ValueError, match="not in the catalog's shard plan"):
        run.write_shard(99, ids, x, lengths)
    assert tree_bytes(root) == before
    assert not run.shard_done(1)


def test_sync_after_catalog_grows(store):
    run = store.create_run("r", RunConfig(k=K))
    write_shards(store, run, range(store.num_shards))
    old = store.num_shards
    store.add_episodes(episode_table(4, prefix="ro", seed=3), shard_size=4)
    assert run.pending_shards() == [old]
    ids, lengths = store.shard_episodes(old)
    with pytest.raises(RuntimeError, match=r"call run.sync\(\)"):
        run.write_shard(old, ids, shard_features(old, int(lengths.sum()), K), lengths)
    with pytest.raises(RuntimeError, match="not written yet"):
        run.finalize()
    partial = run.finalize(allow_partial=True)
    partial_count = run.gram_count
    run.sync()
    write_shards(store, run, [old])
    assert run.is_complete()
    full = run.finalize()
    new_train = sum(n for n, s in zip(lengths, store.catalog()["split"].to_pylist()[-len(ids):]) if s == "train")
    assert run.gram_count == partial_count + new_train
    x = shard_features(old, int(lengths.sum()), K).astype(np.float64)
    mask = np.repeat([s == "train" for s in store.catalog()["split"].to_pylist()[-len(ids):]], lengths)
    np.testing.assert_allclose(full - partial, x[mask].T @ x[mask], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(run.step_features(ids[-1]), shard_features(old, int(lengths.sum()), K)[-lengths[-1] :])
    with pytest.raises(KeyError, match="unknown episode"):
        run.episode_features(["nope"])


# ---------------------------------------------------------------- corruption
def _chunk_file(root, array, chunk):
    return os.path.join(root, array, "c", str(chunk), "0")


def test_flipped_byte_is_found_by_verify_and_reads(store, capsys):
    from cupid_engine.cli import main

    run = store.create_run("r", RunConfig(k=K, dtype="float16"))
    write_shards(store, run, range(store.num_shards))
    run.finalize()
    ids, lengths = store.shard_episodes(1)
    cat = store.catalog()
    row0 = cat["row_offset"].to_pylist()[cat["episode_id"].to_pylist().index(ids[0])]
    path = _chunk_file(os.path.join(store.url, "runs", "r"), "steps", row0 // 16)
    data = bytearray(open(path, "rb").read())
    data[7] ^= 0x40
    open(path, "wb").write(bytes(data))

    report = open_store(store.url).verify()
    assert not report.ok and len(report.problems) == 1
    (p,) = report.problems
    assert (p.run, p.array, p.chunk) == ("r", "steps", row0 // 16)
    assert ids[0] in p.episode_ids and set(p.episode_ids) <= set(ids)
    with pytest.raises(CorruptChunkError, match=ids[0]):
        open_store(store.url).run("r").step_features(ids[0])
    # Other episodes stay readable.
    other = store.shard_episodes(0)[0][0]
    assert open_store(store.url).run("r").step_features(other).shape[1] == K

    assert main(["store", "verify", store.url]) == 1
    assert "CORRUPT" in capsys.readouterr().out
    assert main(["store", "info", store.url]) == 0
    assert "k=12 dtype=float16" in capsys.readouterr().out


def test_corrupt_episode_sums_name_the_episodes(store):
    run = store.create_run("r", RunConfig(k=K))
    write_shards(store, run, range(store.num_shards))
    path = _chunk_file(os.path.join(store.url, "runs", "r"), "episodes", 0)
    data = bytearray(open(path, "rb").read())
    data[0] ^= 1
    open(path, "wb").write(bytes(data))
    first = store.episode_ids()[0]
    with pytest.raises(CorruptChunkError, match=first):
        run.episode_features()
    assert first in open_store(store.url).verify().corrupt_episode_ids()


def test_torn_chunk_of_unfinished_shard_is_rewritten(store):
    run = store.create_run("r", RunConfig(k=K, dtype="int8"))
    write_shards(store, run, range(store.num_shards))
    run.finalize()
    want = {n: np.asarray(run._group[n][...]) for n in run._group.array_keys()}
    root = os.path.join(store.url, "runs", "r")
    # Simulate a writer killed mid-shard: torn chunks and no marker.
    last = store.num_shards - 1
    row0 = store.catalog()["row_offset"].to_pylist()[-1] // 16
    slot0 = store.catalog()["episode_slot"].to_pylist()[-1] // 4
    for array, chunk in (("steps", row0), ("scales", row0), ("episodes", slot0), ("gram_parts", last)):
        p = _chunk_file(root, array, chunk)
        if os.path.exists(p):
            open(p, "wb").write(open(p, "rb").read()[:5])
    run._group["done"][last] = 0
    run = open_store(store.url, mode="r+").run("r")
    assert run.pending_shards() == [last]
    write_shards(store, run, run.pending_shards())
    run.finalize()
    for n, a in want.items():
        np.testing.assert_array_equal(np.asarray(run._group[n][...]), a, err_msg=n)
    assert open_store(store.url).verify().ok


def test_store_create_and_open_modes(tmp_path):
    p = str(tmp_path / "s.zarr")
    with pytest.raises(FileNotFoundError):
        open_store(p)
    st = open_store(p, mode="a")
    assert st.catalog().num_rows == 0 and st.runs() == []
    with pytest.raises(FileExistsError):
        create_store(p)
    st.add_episodes(episode_table(2))
    assert create_store("file://" + p, overwrite=True).catalog().num_rows == 0
    with pytest.raises(ValueError, match="mode"):
        open_store(p, mode="w")
    info = json.loads(json.dumps(open_store(p).info()))
    assert info["episodes"] == 0


def test_iter_shard_steps_mirrors_write_shard(store):
    run = store.create_run("r", RunConfig(k=K, dtype="bfloat16"))
    write_shards(store, run, range(store.num_shards))
    seen = []
    for s, ids, lengths, x in run.iter_shard_steps():
        assert (ids, list(lengths)) == (store.shard_episodes(s)[0], list(store.shard_episodes(s)[1]))
        np.testing.assert_allclose(x, shard_features(s, int(lengths.sum()), K), rtol=2**-8)
        seen.append(s)
    assert seen == list(range(store.num_shards))
    # The direct reader and zarr's own decoder agree on every stored byte.
    for eid in store.episode_ids():
        cat = store.catalog()
        i = cat["episode_id"].to_pylist().index(eid)
        r0, n = cat["row_offset"][i].as_py(), cat["length"][i].as_py()
        raw = run._group["steps"][r0 : r0 + n]
        np.testing.assert_array_equal(run._read_rows("steps", r0, r0 + n), raw)


@pytest.mark.parametrize("compressor", ["none", "blosc-lz4", "zstd"], ids=lambda c: c)
def test_compressors_round_trip_through_both_paths(store, compressor):
    from cupid_engine.store.chunks import _direct_dir

    run = store.create_run("r", RunConfig(k=K, dtype="int8", compressor=compressor))
    # Only the uncompressed local layout is written by the direct chunk writer.
    assert (_direct_dir(run._array("steps")) is not None) == (compressor == "none")
    write_shards(store, run, range(store.num_shards))
    run.finalize()
    ref = store.create_run("ref", RunConfig(k=K, dtype="int8"))
    write_shards(store, ref, range(store.num_shards))
    ref.finalize()
    for name in ("steps", "scales", "episodes", "gram_parts", "gram_count_parts", "done", "gram"):
        np.testing.assert_array_equal(run._group[name][...], ref._group[name][...], err_msg=name)
    assert store.verify().ok


def test_stale_worker_handle_sees_driver_sync(store):
    worker = open_store(store.url, mode="r+").create_run("r", RunConfig(k=K))
    store.add_episodes(episode_table(3, prefix="late", seed=5), shard_size=3)
    store.run("r").sync()
    new = store.num_shards - 1
    write_shards(worker.store, worker, [new])
    assert store.run("r").shard_done(new)
