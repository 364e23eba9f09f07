"""Losing a node mid-job: its shards run on the survivor and the store equals an
uninterrupted run; a re-run on the smaller cluster adapts instead of hanging (issue 17).

Uses a real 2-node cluster on this machine (`ray start --head` + `ray start --address`,
1 CPU each); the worker node's raylet is SIGKILLed once some shards are written."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from cupid_engine.distributed import RayExecutor
from cupid_engine.featurize import FeaturizeConfig, SyntheticSource, featurize
from cupid_engine.store import GradientStore

pytestmark = pytest.mark.ray

CFG = FeaturizeConfig.for_method(k=64, shard_size=4, dtype="float32", batch_size=16, output="loss")


def _source(n):
    return SyntheticSource(n, steps=(20, 40), obs_dim=6, action_dim=2, episodes_per_unit=16, holdout_every=4)


def _arrays(path):
    r = GradientStore.open(path).run("r")
    steps = np.concatenate([r.step_features(e) for e in r.store.episode_ids()])
    return {"steps": steps, "episodes": r.episode_features(), "gram": r.gram()}


def _raylet_of(node_id, temp_dir):
    """Pid of the raylet of ``node_id`` in the cluster rooted at ``temp_dir``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"/raylet") and f"--node_id={node_id}".encode() in argv \
                and any(temp_dir.encode() in a for a in argv):
            return int(entry)
    raise AssertionError(f"no raylet for node {node_id}")



def _markers_written(store_path) -> int:
    """Shard completion markers on disk (``runs/r/done/c/<shard>``), counted from the files
    themselves: the kill trigger must not depend on any reader-side state of the store."""
    root = os.path.join(os.fspath(store_path), "runs", "r", "done")
    return sum(1 for _, _, files in os.walk(root) for f in files if f != "zarr.json" and not f.endswith(".tmp"))

def test_lost_node_shards_run_on_survivor(tmp_path, checkpoint, two_node_cluster):
    import ray

    from cupid_engine.distributed.featurize import featurize_distributed
    from cupid_engine.featurize.featurizer import Featurizer
    from cupid_engine.featurize.pipeline import prepare_run
    from cupid_engine.policies import load_policy, policy_hash

    src = _source(96)
    featurize(src, tmp_path / "ref.zarr", "r", policy=checkpoint, config=CFG, progress=False)  # in-process

    store = GradientStore.create(tmp_path / "kill.zarr")
    f = Featurizer.from_config(load_policy(checkpoint), CFG, policy_hash=policy_hash(checkpoint))
    total = len(prepare_run(src, store, "r", f, CFG).pending_shards())
    killed = {}

    def kill_worker_node(infos):
        head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
        assert len({i["node_id"] for i in infos}) == 2, infos  # one worker per node
        victim = next(i for i in infos if i["node_id"] != head)
        raylet = _raylet_of(victim["node_id"], two_node_cluster["temp_dir"])

        def watch():
            deadline = time.time() + 120
            while time.time() < deadline:
                left = total - _markers_written(tmp_path / "kill.zarr")
                if left < total - 1:  # mid-job: some shards written, most not
                    os.kill(raylet, signal.SIGKILL)
                    os.kill(victim["pid"], signal.SIGKILL)
                    killed.update(left=left, pid=victim["pid"])
                    return
                time.sleep(0.01)

        threading.Thread(target=watch, daemon=True).start()

    summary = featurize_distributed(src, store, "r", policy_path=checkpoint, config=CFG, workers=2, progress=False,
                                    address=two_node_cluster["address"], on_workers=kill_worker_node,
                                    start_timeout=90)
    assert killed and 0 < killed["left"] < total, (killed, total)
    assert summary["lost_workers"] == 1, summary
    run = store.run("r")
    assert run.is_complete()
    run.finalize()
    a, b = _arrays(tmp_path / "ref.zarr"), _arrays(tmp_path / "kill.zarr")
    for key in a:
        assert np.array_equal(a[key], b[key]), key  # bitwise

    # The cluster now has one live node of 1 CPU: asking for 2 workers must not hang.
    t0 = time.time()
    featurize(_source(24), tmp_path / "small.zarr", "r", policy=checkpoint, config=CFG, progress=False,
              executor=RayExecutor(2, two_node_cluster["address"]))
    assert GradientStore.open(tmp_path / "small.zarr").run("r").is_complete()
    assert time.time() - t0 < 150
