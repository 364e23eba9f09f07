"""The ``StoreReader``/``RunReader`` protocols describe every store a scorer reads: the
gradient store, its chunk-caching wrapper and the in-memory array store, with the same
numbers through each."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from _store_writer import episode_table, write_shards

from cupid_engine.scorers._cache import cached
from cupid_engine.scorers.arrays import ArrayRun, ArrayStore
from cupid_engine.store.config import RunConfig
from cupid_engine.store.gradient_store import create_store
from cupid_engine.store.reader import RunReader, StoreReader

K = 8


@pytest.fixture
def stores(tmp_path):
    st = create_store(str(tmp_path / "s.zarr"), chunk_rows=16, episode_chunk_rows=4)
    st.add_episodes(episode_table(9), shard_size=3)
    run = st.create_run("r", RunConfig(k=K, dtype="float32"))
    write_shards(st, run, range(st.num_shards))
    run.finalize()
    cat = st.catalog()
    steps = {e: run.step_features(e) for e in cat.column("episode_id").to_pylist()}
    arrays = ArrayStore(cat, {"r": ArrayRun("r", steps, cat)})
    return {"zarr": st, "cached": cached(st), "arrays": arrays}


def _members(proto) -> list[str]:
    return [n for n in dir(proto) if not n.startswith("_") and n not in ("register",)]


def _binds(proto, impl, name: str) -> None:
    """Every parameter of the protocol's method is accepted by the implementation, by name."""
    want = inspect.signature(getattr(proto, name))
    got = inspect.signature(getattr(impl, name))
    kwargs = {p: None for p in list(want.parameters)[1:]}  # skip self
    got.bind(**kwargs)  # raises TypeError naming the parameter it lacks


@pytest.mark.parametrize("kind", ["zarr", "cached", "arrays"])
def test_every_store_satisfies_the_protocols(stores, kind):
    store = stores[kind]
    run = store.run("r")
    assert isinstance(store, StoreReader) and isinstance(run, RunReader)
    for proto, obj in ((StoreReader, store), (RunReader, run)):
        for name in _members(proto):
            if callable(getattr(proto, name, None)) and not isinstance(inspect.getattr_static(proto, name), property):
                _binds(proto, obj, name)
    # The values a scorer reads, with the shapes the protocol documents.
    ids = store.catalog().column("episode_id").to_pylist()
    assert run.k == K and run.gram().shape == (K, K) and run.gram().dtype == np.float64
    assert run.step_features(ids[0]).shape == (store.catalog().column("length")[0].as_py(), K)
    assert run.episode_features().shape == (len(ids), K)
    blocks = list(run.iter_episode_features(block=4))
    assert [e for b, _ in blocks for e in b] == ids
    assert tuple(run.config.gram_splits) == ("train",)


def test_the_same_numbers_through_every_reader(stores):
    ref = stores["zarr"].run("r")
    ids = stores["zarr"].catalog().column("episode_id").to_pylist()
    for kind in ("cached", "arrays"):
        run = stores[kind].run("r")
        assert run.gram_count == ref.gram_count, kind
        np.testing.assert_allclose(run.gram(), ref.gram(), rtol=1e-12, err_msg=kind)
        np.testing.assert_array_equal(run.episode_features(ids[2:5]), ref.episode_features(ids[2:5]), err_msg=kind)
        for e in ids:
            np.testing.assert_array_equal(run.step_features(e), ref.step_features(e), err_msg=kind)
