"""Store writes overlapped with compute (``shards.ShardWriter``): same bytes, bounded, errors surface, shards whole."""

from __future__ import annotations

import threading
import time

import pytest

from cupid_engine.data import open_dataset, write_dataset
from cupid_engine.featurize import FeaturizeConfig, Featurizer, featurize
from cupid_engine.featurize import pipeline as pipeline_mod
from cupid_engine.featurize import shards as shards_mod
from cupid_engine.policies import MLPPolicyConfig, TrainConfig, train_policy
from cupid_engine.store import GradientStore
from cupid_engine.store.run import Run

from fz_helpers import make_episodes
from _snapshot import tree_bytes


@pytest.fixture
def setup(tmp_path):
    episodes = make_episodes(n=9, length=5)
    data = write_dataset(tmp_path / "data", episodes, episodes_per_file=3)
    policy = train_policy(MLPPolicyConfig.tiny(), episodes, TrainConfig(steps=3, batch_size=16), progress=False)
    cfg = FeaturizeConfig.for_method(k=32, shard_size=2, dtype="float16", batch_size=4, output="loss")
    return open_dataset(data), policy, cfg, tmp_path


def _run(src, policy, cfg, path, *, overlap):
    f = Featurizer.from_config(policy, cfg)
    store = GradientStore.create(path)
    run = pipeline_mod.prepare_run(src, store, "r", f, cfg)
    pipeline_mod.featurize_shards(src, store, "r", run.pending_shards(), config=cfg, featurizer=f,
                                  progress=False, overlap_writes=overlap)
    return store, store.run("r")


def test_overlapped_writes_give_the_same_store_bytes(setup):
    src, policy, cfg, tmp = setup
    _, seq = _run(src, policy, cfg, tmp / "seq.zarr", overlap=False)
    _, ovl = _run(src, policy, cfg, tmp / "ovl.zarr", overlap=True)
    assert seq.is_complete() and ovl.is_complete() and len(seq.pending_shards()) == 0
    a, b = tree_bytes(tmp / "seq.zarr" / "runs" / "r"), tree_bytes(tmp / "ovl.zarr" / "runs" / "r")
    assert a.keys() == b.keys() and len(a) > 5
    assert [k for k in a if a[k] != b[k]] == []


def test_writes_are_bounded_and_in_order(setup, monkeypatch):
    src, policy, cfg, tmp = setup
    real_write, real_compute = Run.write_shard, shards_mod.compute_shard_features
    lock, state = threading.Lock(), {"flight": 0, "max": 0, "written": [], "computed": []}

    def write(self, shard_id, *a, **kw):
        with lock:
            state["flight"] += 1
            state["max"] = max(state["max"], state["flight"])
        assert threading.current_thread() is not threading.main_thread()
        time.sleep(0.05)  # a slow disk: compute of the next shard runs meanwhile
        real_write(self, shard_id, *a, **kw)
        with lock:
            state["flight"] -= 1
            state["written"].append(shard_id)

    def compute(*a, **kw):
        with lock:  # when shard n is computed, at most one earlier shard is still unwritten
            state["computed"].append(len(state["written"]))
        return real_compute(*a, **kw)

    monkeypatch.setattr(Run, "write_shard", write)
    monkeypatch.setattr(shards_mod, "compute_shard_features", compute)
    _, run = _run(src, policy, cfg, tmp / "s.zarr", overlap=True)
    n = len(state["computed"])
    assert n == run.num_shards >= 4 and run.is_complete()
    assert state["max"] == 1
    assert state["written"] == sorted(state["written"])
    assert all(done >= i - 1 for i, done in enumerate(state["computed"])), state["computed"]


def test_failed_background_write_is_raised_naming_the_shard_and_resumes(setup, monkeypatch):
    src, policy, cfg, tmp = setup
    real_write = Run.write_shard

    def write(self, shard_id, ids, *a, **kw):
        if shard_id == 2:
            raise OSError(28, "No space left on device")
        real_write(self, shard_id, ids, *a, **kw)

    monkeypatch.setattr(Run, "write_shard", write)
    with pytest.raises(OSError, match="No space left") as info:
        featurize(src, tmp / "s.zarr", "r", policy=policy, config=cfg, progress=False)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "shard 2 (episodes 'ep003'..'ep004'" in notes and "background writer" in notes
    run = GradientStore.open(tmp / "s.zarr").run("r")
    pending = run.pending_shards()
    assert 2 in pending and 0 not in pending and 1 not in pending  # earlier shards whole, the failed one not marked
    monkeypatch.setattr(Run, "write_shard", real_write)
    done = featurize(src, tmp / "s.zarr", "r", policy=policy, config=cfg, progress=False)
    assert done.is_complete()
    _, ref = _run(src, policy, cfg, tmp / "ref.zarr", overlap=False)
    a, b = tree_bytes(tmp / "ref.zarr" / "runs" / "r" / "steps"), tree_bytes(tmp / "s.zarr" / "runs" / "r" / "steps")
    assert a == b


def test_compute_error_waits_for_the_write_in_flight(setup, monkeypatch):
    src, policy, cfg, tmp = setup
    real_write, real_compute = Run.write_shard, shards_mod.compute_shard_features
    calls = []

    def slow_write(self, *a, **kw):
        time.sleep(0.2)
        real_write(self, *a, **kw)

    def compute(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("compute failed on the third shard")
        return real_compute(*a, **kw)

    monkeypatch.setattr(Run, "write_shard", slow_write)
    monkeypatch.setattr(shards_mod, "compute_shard_features", compute)
    with pytest.raises(RuntimeError, match="third shard"):
        featurize(src, tmp / "s.zarr", "r", policy=policy, config=cfg, progress=False)
    run = GradientStore.open(tmp / "s.zarr").run("r")
    # Shard 1's write was in flight when shard 2's compute failed: it was finished, not abandoned.
    assert run.shard_done(0) and run.shard_done(1) and not run.shard_done(2)
    assert not any(t.name.startswith("cupid-shard-writer") for t in threading.enumerate())
