"""Fixtures for the Ray featurisation tests: a tiny policy checkpoint, a synthetic source."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture
def checkpoint(tmp_path):
    from cupid_engine.policies import MLPPolicy, MLPPolicyConfig, save_policy

    torch.manual_seed(0)
    policy = MLPPolicy(MLPPolicyConfig.tiny(obs_dim=6, action_dim=2))
    return str(save_policy(policy, tmp_path / "policy"))


def _cluster_pids(temp_dir):
    """Pids of every process of the cluster rooted at ``temp_dir`` (all carry it in argv)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in argv and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids


def _stop_cluster(temp_dir):
    """End the cluster's processes by pid (never `ray stop`: it would kill other users' Ray too)."""
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = _cluster_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while pids and time.time() < deadline and _cluster_pids(temp_dir):
            time.sleep(0.2)


@pytest.fixture
def two_node_cluster():
    """A head and a worker node (1 CPU each) started with `ray start` on this machine.

    Yields ``{"address", "temp_dir"}``; every process is ended by pid at teardown. The temp
    dir is short (Unix socket paths) and unique, so the cluster's processes are exactly
    those whose argv holds it.
    """
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="ce17r", dir="/tmp")
    with socket.socket() as s:  # a free port for the GCS
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        for args in (["--head", f"--port={port}", "--include-dashboard=false"], [f"--address=127.0.0.1:{port}"]):
            proc = subprocess.run([ray_cli, "start", *args, *common], env=env, capture_output=True, text=True,
                                  timeout=180)
            if proc.returncode != 0:
                raise RuntimeError(f"ray start {' '.join(args)} failed: {proc.stderr[-2000:]}")
        yield {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir}
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
