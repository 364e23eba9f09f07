"""``hooks.retain_freed_memory``: glibc keeps freed blocks for the next batch (fewer page
faults per hook call, issue 19). It must change no number: the features of several batches
are the same bytes with and without it (each run in a fresh process, since the allocator
setting is process-wide), and results of successive calls never share memory."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from cupid_engine.featurize import Featurizer, ProjectionConfig
from cupid_engine.featurize import hooks as H
from cupid_engine.policies import MLPPolicy, MLPPolicyConfig

# Batches of several sizes and values in one process: later calls get memory the earlier
# ones freed (with the setting: reused heap blocks holding stale values, not zeroed pages
# from the OS), so a read of uninitialised memory anywhere on the path would show here.
_CHILD = r"""
import hashlib, sys
import torch
torch.set_num_threads(1)
from cupid_engine.featurize import Featurizer, ProjectionConfig
from cupid_engine.featurize import hooks as H
from cupid_engine.policies import MLPPolicy, MLPPolicyConfig
torch.manual_seed(0)
p = MLPPolicy(MLPPolicyConfig(obs_dim=9, action_dim=3, hidden_sizes=(64, 64))).eval()
f = Featurizer(p, "loss", ProjectionConfig(k=1024, seed=5), policy_hash="t")
g = torch.Generator().manual_seed(1)
h = hashlib.sha256()
for B in (37, 300, 37, 300, 129):
    c = p.config
    batch = {"obs": torch.randn(B, c.n_obs_steps, c.obs_dim, generator=g),
             "action": torch.randn(B, c.horizon, c.action_dim, generator=g),
             "episode_key": torch.arange(B, dtype=torch.int64) * 7919, "step": torch.arange(B, dtype=torch.int64)}
    y = f(batch)
    h.update(y.numpy().tobytes())
print(H.retain_freed_memory(), h.hexdigest())
"""


def _child(retain: bool) -> tuple[str, str]:
    env = dict(os.environ, CUPID_RETAIN_FREED_MEMORY="1" if retain else "0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, digest = out.stdout.split()[-2:]
    return applied, digest


def test_same_bytes_with_and_without_retained_memory():
    on, off = _child(True), _child(False)
    assert off[0] == "False"  # the opt-out is honoured
    if platform.libc_ver()[0] == "glibc":
        assert on[0] == "True"  # the setting was in effect in that run
    assert on[1] == off[1]


def test_successive_calls_do_not_alias():
    torch.manual_seed(0)
    p = MLPPolicy(MLPPolicyConfig(obs_dim=9, action_dim=3, hidden_sizes=(64, 64))).eval()
    f = Featurizer(p, "loss", ProjectionConfig(k=1024, seed=5), policy_hash="t")
    g = torch.Generator().manual_seed(2)
    c = p.config

    def batch(B):
        return {"obs": torch.randn(B, c.n_obs_steps, c.obs_dim, generator=g),
                "action": torch.randn(B, c.horizon, c.action_dim, generator=g),
                "episode_key": torch.arange(B, dtype=torch.int64) * 7919, "step": torch.arange(B, dtype=torch.int64)}

    b1, b2 = batch(40), batch(40)
    y1 = f(b1)
    kept = y1.clone()
    y2 = f(b2)
    assert y1.untyped_storage().data_ptr() != y2.untyped_storage().data_ptr()
    assert torch.equal(y1, kept)  # the second call wrote nothing into the first result
    assert not torch.equal(y1, y2)
    assert torch.equal(f(b1), kept)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc mallopt only")
def test_retain_freed_memory_is_once_per_process_and_reports():
    first = H.retain_freed_memory()
    assert H.retain_freed_memory() is first
    assert first is (os.environ.get("CUPID_RETAIN_FREED_MEMORY", "1") != "0")


@pytest.mark.parametrize("env,want", [({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "False")])
def test_process_level_choices_are_left_alone(env, want):
    """A process that chose its malloc settings keeps them (the opt-out: above)."""
    code = "from cupid_engine.featurize import hooks as H; print(H.retain_freed_memory())"
    full = {k: v for k, v in os.environ.items() if k not in ("MALLOC_TRIM_THRESHOLD_", "CUPID_RETAIN_FREED_MEMORY")}
    out = subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == want
