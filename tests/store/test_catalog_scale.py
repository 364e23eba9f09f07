"""Catalog at scale: per-shard reads, columnar look-ups, streaming appends, old files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _store_writer import episode_table, shard_features

from cupid_engine.store import catalog as catalog_mod
from cupid_engine.store import catalog_io
from cupid_engine.store import gradient_store as gs_mod
from cupid_engine.store.config import RunConfig
from cupid_engine.store.gradient_store import GradientStore, create_store, open_store

K = 8


def _reference_catalog(tables, shard_size, chunk_rows, episode_chunk_rows):
    """The shard plan computed whole in memory, one plan group per table."""
    cat = catalog_mod.empty_catalog()
    for t in tables:
        cat = catalog_mod.plan(catalog_mod.normalize(t), cat, shard_size=shard_size, chunk_rows=chunk_rows,
                               episode_chunk_rows=episode_chunk_rows)
    return cat


@pytest.fixture
def small_groups(monkeypatch):
    """Row groups of >= 10 rows, so that a small catalog spans many of them."""
    monkeypatch.setattr(catalog_mod, "ROW_GROUP_ROWS", 10)


def test_streamed_append_equals_whole_plan_and_groups_hold_whole_shards(tmp_path, small_groups):
    tables = [episode_table(7, prefix="a"), episode_table(12, prefix="b", seed=1), episode_table(5, prefix="c", seed=2)]
    st = create_store(str(tmp_path / "s.zarr"), chunk_rows=16, episode_chunk_rows=4)
    assert st.append_episodes(iter(tables[:2]), shard_size=3) == 19
    st.add_episodes(tables[2], shard_size=4)
    cat = open_store(str(tmp_path / "s.zarr")).catalog()
    ref = _reference_catalog(tables[:2], 3, 16, 4)
    ref = catalog_mod.plan(catalog_mod.normalize(tables[2]), ref, shard_size=4, chunk_rows=16, episode_chunk_rows=4)
    assert cat.equals(ref)
    # Each table starts a fresh shard: 7 -> 3+3+1, 12 -> 3*4, 5 -> 4+1.
    assert np.bincount(cat.column("shard").to_numpy()).tolist() == [3, 3, 1, 3, 3, 3, 3, 4, 1]
    meta = pq.ParquetFile(str(tmp_path / "s.zarr" / "catalog.parquet")).metadata
    bounds = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    shard_starts = np.flatnonzero(np.diff(np.concatenate([[-1], cat.column("shard").to_numpy()])))
    assert set(bounds[:-1]) <= set(shard_starts)  # no shard spans two row groups
    assert meta.num_row_groups > 1


def test_shard_plan_matches_catalog(tmp_path, small_groups):
    st = create_store(str(tmp_path / "s.zarr"), chunk_rows=16, episode_chunk_rows=4)
    st.append_episodes([episode_table(23), episode_table(9, prefix="r", seed=3)], shard_size=4)
    cat = st.catalog()
    plan = open_store(str(tmp_path / "s.zarr")).shard_plan()
    shard = cat.column("shard").to_numpy()
    off, length = cat.column("row_offset").to_numpy(), cat.column("length").to_numpy()
    slot = cat.column("episode_slot").to_numpy()
    ids = cat.column("episode_id").to_pylist()
    assert plan.num_shards == shard.max() + 1 and plan.num_episodes == cat.num_rows
    for s in range(plan.num_shards):
        rows = np.flatnonzero(shard == s)
        assert (plan.first[s], plan.first[s + 1]) == (rows[0], rows[-1] + 1)
        assert plan.row0[s] == off[rows[0]] and plan.rows[s] == off[rows[-1]] + length[rows[-1]] - off[rows[0]]
        assert plan.slot0[s] == slot[rows[0]] and plan.first_ids[s] == ids[rows[0]]
    np.testing.assert_array_equal(plan.slots(np.arange(cat.num_rows)), slot)
    assert plan.extent() == catalog_mod.extent(cat)


def test_worker_reads_only_its_shard_rows(tmp_path, small_groups, monkeypatch):
    path = str(tmp_path / "s.zarr")
    st = create_store(path, chunk_rows=16, episode_chunk_rows=4)
    st.append_episodes([episode_table(60)], shard_size=5)
    st.create_run("r", RunConfig(k=K))
    read = []
    orig = gs_mod._CatalogSnapshot.row_group

    def spy(self, g, columns=None):
        t = orig(self, g, columns)
        read.append((g, t.num_rows))
        return t

    worker = open_store(path, mode="r+")  # a fresh handle, as in a worker process
    monkeypatch.setattr(gs_mod._CatalogSnapshot, "row_group", spy)
    s = 7
    ids, lengths = worker.shard_episodes(s)
    worker.run("r").write_shard(s, ids, shard_features(s, int(lengths.sum()), K), lengths)
    snap = worker._index()
    # Rows were read from the one row group holding shard 7 (twice: its ids, then
    # write_shard's check), no whole column, no whole table, no id look-up structure.
    g = int(np.searchsorted(snap.group_first, 35, side="right")) - 1
    assert read == [(g, snap.group_first[g + 1] - snap.group_first[g])] * 2 and read[0][1] < 10 + 5
    assert snap._table is None and snap._columns == {} and snap._lookup is None
    assert ids == [f"ep_{i:04d}" for i in range(35, 40)]
    assert worker.run("r").shard_done(s)


def test_positions_exact_under_hash_collisions(tmp_path, monkeypatch):
    # Every id hashes alike: look-ups and the duplicate check must still be exact.
    monkeypatch.setattr(catalog_io, "_id_hashes", lambda values: np.zeros(len(values), np.int64))
    st = create_store(str(tmp_path / "s.zarr"))
    st.add_episodes(episode_table(30), shard_size=7)
    st.add_episodes(episode_table(4, prefix="x", seed=1), shard_size=7)  # distinct ids: accepted
    ids = st.episode_ids()
    np.testing.assert_array_equal(st.positions([ids[17], ids[3], ids[31]]), [17, 3, 31])
    assert st.contains(["ep_0005", "nope"]).tolist() == [True, False]
    with pytest.raises(KeyError, match="nope"):
        st.positions(["nope"])
    with pytest.raises(ValueError, match="duplicate episode_id 'ep_0002'"):
        st.add_episodes(pa.table({"episode_id": ["new", "ep_0002"], "split": ["train"] * 2, "length": [3, 4]}))
    assert st.catalog(refresh=True).num_rows == 34


def test_failed_streamed_append_changes_nothing(tmp_path):
    st = create_store(str(tmp_path / "s.zarr"))
    st.add_episodes(episode_table(5), shard_size=2)
    before = (tmp_path / "s.zarr" / "catalog.parquet").read_bytes()
    bad = pa.table({"episode_id": ["z"], "split": ["train"], "length": [0]})
    with pytest.raises(ValueError, match="'z'.*length must be > 0"):
        st.append_episodes(iter([episode_table(6, prefix="ok"), bad]), shard_size=2)
    dup = episode_table(3, prefix="d")
    with pytest.raises(ValueError, match="duplicate episode_id 'd_0001'"):
        st.append_episodes([dup, dup.slice(1, 1)], shard_size=2)  # repeated across tables
    assert (tmp_path / "s.zarr" / "catalog.parquet").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "s.zarr").iterdir() if "tmp" in p.name) == []
    assert st.append_episodes([], shard_size=2) == 0


def test_catalog_rows_in_requested_order(tmp_path, small_groups):
    st = create_store(str(tmp_path / "s.zarr"))
    st.add_episodes(episode_table(40), shard_size=6)
    want = ["ep_0033", "ep_0002", "ep_0019", "ep_0002"]
    got = open_store(str(tmp_path / "s.zarr")).catalog_rows(want, ["episode_id", "length"])
    full = {r["episode_id"]: r["length"] for r in st.catalog().to_pylist()}
    assert got.column("episode_id").to_pylist() == want
    assert got.column("length").to_pylist() == [full[e] for e in want]


def test_store_written_as_one_row_group_reads_the_same(tmp_path):
    # Catalogs written before row groups were aligned to shards (one group, any size).
    path = tmp_path / "s.zarr"
    st = create_store(str(path), chunk_rows=16, episode_chunk_rows=4)
    st.append_episodes([episode_table(17), episode_table(6, prefix="b", seed=1)], shard_size=4)
    cat = st.catalog()
    pq.write_table(cat, str(path / "catalog.parquet"))  # the old writer: whole table at once
    old = open_store(str(path), mode="r+")
    assert old.catalog().equals(cat)
    for s in range(old.num_shards):
        ids, lengths = old.shard_episodes(s)
        rows = cat.filter(pa.compute.equal(cat.column("shard"), s))
        assert ids == rows.column("episode_id").to_pylist()
        assert lengths.tolist() == rows.column("length").to_pylist()
    old.add_episodes(episode_table(3, prefix="c", seed=2), shard_size=4)  # appends rewrite it in groups
    assert open_store(str(path)).catalog().slice(0, cat.num_rows).equals(cat)


def test_plan_memory_is_per_shard_not_per_episode(tmp_path):
    small = create_store(str(tmp_path / "a.zarr"))
    small.append_episodes([episode_table(40)], shard_size=20)
    big = create_store(str(tmp_path / "b.zarr"))
    big.append_episodes([episode_table(4000, max_len=3)], shard_size=2000)
    a, b = open_store(str(tmp_path / "a.zarr")).shard_plan(), open_store(str(tmp_path / "b.zarr")).shard_plan()
    assert a.num_shards == b.num_shards == 2
    size = lambda p: sum(x.nbytes for x in (p.first, p.row0, p.rows, p.slot0))  # noqa: E731
    assert size(a) == size(b)
    assert isinstance(GradientStore.open(str(tmp_path / "b.zarr"))._index().plan, catalog_mod.ShardPlan)
