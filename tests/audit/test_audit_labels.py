"""benchmarks/audit_labels.py: the ground-truth view of an audit, on a hand-built audit.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "audit_labels.py"


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("audit_labels_under_test", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _audit():
    ids = [f"e{i}" for i in range(6)]
    # e0-e2 are known bad. Seed 1: the rule ranks them strictly lowest (AUROC 1); seed 2: it
    # ranks one bad demo (e2) above every good one and ties e0 with e3 (AUROC 5.5 / 9, see the test).
    s1 = dict(zip(ids, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]))
    s2 = dict(zip(ids, [0.5, 0.1, 0.95, 0.5, 0.6, 0.9]))
    conds = [
        {"method": "full", "ratio": 0.0, "pruned": [], "seed": 1, "success": 0.5},
        {"method": "cupid-quality", "ratio": 0.5, "pruned": ["e0", "e1", "e2"], "seed": 1, "success": 0.9},
        {"method": "random", "ratio": 0.5, "pruned": ["e0", "e3", "e4"], "seed": 1, "success": 0.6},
        {"method": "cupid-quality", "ratio": 0.5, "pruned": ["e1", "e0", "e3"], "seed": 2, "success": 0.7},
        {"method": "random", "ratio": 0.5, "pruned": ["e5", "e3", "e4"], "seed": 2, "success": 0.4},
    ]
    return {"data": {"episodes": {"episode_id": ids},
                     "scores": {"1|cupid-quality": s1, "2|cupid-quality": s2}, "conditions": conds}}


def test_label_view_counts_and_auroc(mod):
    labels = {f"e{i}": ("bad" if i < 3 else "good") for i in range(6)}
    view = mod.label_view(_audit(), labels, "bad")
    assert (view["n"], view["n_bad"]) == (6, 3)
    assert view["seeds"]["1"]["auroc"]["cupid-quality"] == 1.0
    # Seed 2, good scores {0.5, 0.6, 0.9} against bad {0.5, 0.1, 0.95}: good wins
    # (0.5: 0.5 tie + 1 + 0) + (0.6: 1 + 1 + 0) + (0.9: 1 + 1 + 0) = 5.5 of 9.
    assert view["seeds"]["2"]["auroc"]["cupid-quality"] == pytest.approx(5.5 / 9)
    assert view["mean_auroc"]["cupid-quality"] == pytest.approx((1 + 5.5 / 9) / 2)
    assert view["seeds"]["1"]["pruned_bad"] == {"cupid-quality@0.5": [3, 3], "random@0.5": [1, 3]}
    assert view["pruned_bad_total"] == {"cupid-quality@0.5": [5, 6], "random@0.5": [1, 6]}
    assert view["seeds"]["1"]["success"]["full"] == 0.5
    json.dumps(view)  # the --json output is plain JSON


def test_label_view_refuses_mismatched_labels(mod):
    labels = {f"e{i}": "bad" for i in range(5)}
    with pytest.raises(ValueError, match="do not match the audit's episodes"):
        mod.label_view(_audit(), labels, "bad")
    with pytest.raises(ValueError, match="no episode is labelled 'worse'"):
        mod.label_view(_audit(), {f"e{i}": "bad" for i in range(6)}, "worse")


def test_by_context_splits_on_binary_context_flags_only(mod):
    from types import SimpleNamespace as E

    def ep(heavy, white, ok, cue=0.3):
        knobs = {"context_heavy": heavy, "context_white": white, "context_weight_cue": cue, "mass_scale": 1.0}
        return E(metadata={"env_knobs": knobs}, success=ok)

    eps = [ep(1.0, 1.0, True), ep(1.0, 1.0, False), ep(0.0, 1.0, True, cue=1.0), ep(1.0, 1.0, True)]
    assert mod.by_context(eps) == {"heavy=0,white=1": [1, 1], "heavy=1,white=1": [2, 3]}
    # Episodes of a task without contexts fall under one bucket.
    assert mod.by_context([E(metadata={}, success=True), E(metadata=None, success=None)]) == {"all": [1, 2]}
