"""Gradient store across processes: SIGKILL mid-shard + resume, concurrent writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from _store_writer import REPO, episode_table, snapshot, write_shards

from cupid_engine.store.config import RunConfig
from cupid_engine.store.gradient_store import create_store, open_store

WRITER = os.path.join(os.path.dirname(__file__), "_store_writer.py")
CFG = RunConfig(k=24, dtype="int8", gram_splits=("train", "rollout"))


def _make(path):
    st = create_store(str(path), chunk_rows=32, episode_chunk_rows=4)
    st.add_episodes(episode_table(48, max_len=120), shard_size=3)
    st.create_run("r", CFG)
    return st


def _writer(path, shards):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, WRITER, str(path), "r", ",".join(map(str, shards))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture
def reference(tmp_path):
    """Snapshot of an uninterrupted, sequential, in-process write."""
    st = _make(tmp_path / "ref.zarr")
    run = st.run("r")
    write_shards(st, run, range(st.num_shards))
    run.finalize()
    return snapshot(run)


def _assert_same(snap, reference):
    assert snap.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(snap[name], reference[name], err_msg=name)


def test_sigkill_mid_shard_then_resume_is_bit_identical(tmp_path, reference):
    st = _make(tmp_path / "s.zarr")
    n = st.num_shards
    proc = _writer(tmp_path / "s.zarr", range(n))
    try:
        for line in proc.stdout:
            if line.strip() == "begin 5":  # shards 0..4 have markers; 5 is in flight
                break
        else:
            pytest.fail(f"writer ended early: {proc.stderr.read()}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run = open_store(tmp_path / "s.zarr", mode="r+").run("r")
    pending = run.pending_shards()
    assert all(run.shard_done(s) for s in range(5))
    assert 0 < len(pending) < n and pending == list(range(pending[0], n))
    # Resume: skip finished shards, rewrite the rest (including the torn one).
    write_shards(run.store, run, [s for s in range(n) if not run.shard_done(s)])
    run.finalize()
    _assert_same(snapshot(run), reference)
    assert open_store(tmp_path / "s.zarr").verify().ok


def test_two_concurrent_writers_equal_sequential(tmp_path, reference):
    st = _make(tmp_path / "s.zarr")
    n = st.num_shards
    # Interleaved shards: neighbours go to different processes, so chunk alignment matters.
    procs = [_writer(tmp_path / "s.zarr", range(i, n, 2)) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    run = open_store(tmp_path / "s.zarr", mode="r+").run("r")
    assert run.is_complete()
    run.finalize()
    _assert_same(snapshot(run), reference)
