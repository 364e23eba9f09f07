"""The robosuite learner through the real audit command, at toy sizes (slow, sim)."""

from __future__ import annotations

import json

import pytest

from cupid_engine.cli import main

pytestmark = [pytest.mark.sim, pytest.mark.slow]


def test_audit_cli_with_the_sim_learner_runs_and_resumes(tmp_path):
    cfg = tmp_path / "audit.toml"
    cfg.write_text(
        f"""
task = "lift"
dataset = "{tmp_path / 'lift_mh'}"
methods = ["cupid"]
baselines = ["length", "loss"]
prune_ratios = [0.34]
seeds = [0, 1]
heldout_seeds = [2]
rollouts = 2
workers = 1
cache_dir = "{tmp_path / 'cache'}"
permutations = 1000
bootstrap = 500

[policy]
type = "mlp"
steps = 30
batch_size = 64

[learner_options]
demos_per_tier = 1
score_rollouts = 2
size = "tiny"
k = 256
"""
    )
    out = tmp_path / "report"
    assert main(["audit", "--config", str(cfg), "--out", str(out), "--learner", "sim"]) == 0
    audit = json.loads((out / "audit.json").read_text())
    assert (out / "index.html").exists()
    assert {d["method"] for d in audit["decisions"]} == {"cupid"}
    assert all(d["verdict"] in ("deploy", "candidate signal", "do not claim") for d in audit["decisions"])
    # The cached re-run trains nothing: every checkpoint is reused.
    before = sorted(p.name for p in (tmp_path / "cache").rglob("model.safetensors"))
    assert main(["audit", "--config", str(cfg), "--out", str(out), "--learner", "sim"]) == 0
    after = sorted(p.name for p in (tmp_path / "cache").rglob("model.safetensors"))
    assert before == after and before
