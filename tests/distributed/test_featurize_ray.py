"""Featurisation on Ray actors: identical stores for any worker count, a killed worker is
retried, re-submission does no work, the driver's memory stays flat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from cupid_engine.distributed import RayExecutor
from cupid_engine.featurize import FeaturizeConfig, SyntheticSource, featurize
from cupid_engine.store import GradientStore
from _snapshot import tree_mtimes

pytestmark = pytest.mark.ray

CFG = FeaturizeConfig.for_method(k=32, shard_size=8, dtype="float32", batch_size=16, output="loss")


def _source(n=64):
    return SyntheticSource(n, steps=(3, 6), obs_dim=6, action_dim=2, episodes_per_unit=16, holdout_every=4)


def _arrays(path, run):
    r = GradientStore.open(path).run(run)
    ids = r.store.episode_ids()
    steps = np.concatenate([r.step_features(e) for e in ids])
    return {"steps": steps, "episodes": r.episode_features(), "gram": r.gram()}


def _markers_written(store_path) -> int:
    """Shard completion markers on disk (``runs/r/done/c/<shard>``), counted from the files
    themselves: the kill trigger must not depend on any reader-side state of the store."""
    root = os.path.join(os.fspath(store_path), "runs", "r", "done")
    return sum(1 for _, _, files in os.walk(root) for f in files if f != "zarr.json" and not f.endswith(".tmp"))

def test_two_workers_equal_one_and_resubmit_does_nothing(tmp_path, checkpoint):
    featurize(_source(), tmp_path / "one.zarr", "r", policy=checkpoint, config=CFG, progress=False)
    featurize(_source(), tmp_path / "two.zarr", "r", policy=checkpoint, config=CFG, progress=False, executor=RayExecutor(2))
    a, b = _arrays(tmp_path / "one.zarr", "r"), _arrays(tmp_path / "two.zarr", "r")
    for key in a:
        assert np.array_equal(a[key], b[key]), key  # bitwise
    # Same catalog / shard plan too.
    assert GradientStore.open(tmp_path / "one.zarr").catalog().equals(GradientStore.open(tmp_path / "two.zarr").catalog())

    before = tree_mtimes(tmp_path / "two.zarr")
    from cupid_engine.distributed.featurize import featurize_distributed

    summary = featurize_distributed(_source(), tmp_path / "two.zarr", "r", policy_path=checkpoint, config=CFG,
                                    workers=2, progress=False)
    assert summary["shards"] == 0  # nothing pending: no task was even submitted
    featurize(_source(), tmp_path / "two.zarr", "r", policy=checkpoint, config=CFG, progress=False, executor=RayExecutor(2))
    assert tree_mtimes(tmp_path / "two.zarr") == before


def test_killed_worker_is_retried_and_store_is_identical(tmp_path, checkpoint):
    src = _source(160)
    featurize(src, tmp_path / "ref.zarr", "r", policy=checkpoint, config=CFG, progress=False)

    from cupid_engine.distributed.featurize import featurize_distributed
    from cupid_engine.featurize.featurizer import Featurizer
    from cupid_engine.featurize.pipeline import prepare_run
    from cupid_engine.policies import load_policy, policy_hash

    store = GradientStore.create(tmp_path / "kill.zarr")
    f = Featurizer.from_config(load_policy(checkpoint), CFG, policy_hash=policy_hash(checkpoint))
    run = prepare_run(src, store, "r", f, CFG)
    total = len(run.pending_shards())
    killed = {}

    def kill_when_started(infos):
        victim = infos[0]["pid"]

        def watch():
            deadline = time.time() + 60
            while time.time() < deadline:
                left = total - _markers_written(tmp_path / "kill.zarr")
                if left < total:  # mid-job: some shards written, others not
                    os.kill(victim, signal.SIGKILL)
                    killed["pid"], killed["left"] = victim, left
                    return
                time.sleep(0.01)

        threading.Thread(target=watch, daemon=True).start()

    summary = featurize_distributed(src, store, "r", policy_path=checkpoint, config=CFG, workers=2, progress=False,
                                    on_workers=kill_when_started)
    assert killed and 0 < killed["left"] < total, (killed, total)
    assert summary["lost_workers"] == 1, summary  # its shards were re-queued to the survivor (or a replacement)
    run = store.run("r")
    assert run.is_complete()
    run.finalize()
    a, b = _arrays(tmp_path / "ref.zarr", "r"), _arrays(tmp_path / "kill.zarr", "r")
    for key in a:
        assert np.array_equal(a[key], b[key]), key


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import torch
    torch.set_num_threads(1)
    from cupid_engine.distributed.featurize import peak_rss_kb
    from cupid_engine.distributed import RayExecutor
    from cupid_engine.featurize import FeaturizeConfig, SyntheticSource, featurize
    from cupid_engine.store import GradientStore
    root, ckpt = sys.argv[1], sys.argv[2]
    cfg = FeaturizeConfig.for_method(k=16, shard_size=1000, dtype="float16", batch_size=4096, track="head")
    out = {}
    for n in (2000, 20000):
        src = SyntheticSource(n, steps=3, obs_dim=6, action_dim=2, episodes_per_unit=1000)
        store = GradientStore.create(f"{root}/s{n}.zarr")
        featurize(src, store, "r", policy=ckpt, config=cfg, progress=False, executor=RayExecutor(2))
        out[n] = peak_rss_kb()
        snap = store._index()
        # What the driver holds of the catalog: the O(#shards) plan, nothing per episode.
        out[f"per_episode_{n}"] = [snap._table is not None, sorted(snap._columns), snap._lookup is not None]
        out[f"shards_{n}"] = snap.plan.num_shards
    print(json.dumps(out))
    """
)


def test_driver_memory_flat_when_episodes_grow_10x(tmp_path, checkpoint):
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), checkpoint], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hwm = json.loads(proc.stdout.strip().splitlines()[-1])
    small, large = hwm["2000"], hwm["20000"]
    assert (large - small) / small < 0.20, hwm
    # RSS alone is a weak check at this size (a whole catalog of 20K episodes is ~20 MB):
    # also check that the driver never materialised per-episode catalog data.
    assert hwm["per_episode_20000"] == [False, [], False], hwm
    assert hwm["shards_20000"] == 20
