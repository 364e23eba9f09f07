"""`cupid-engine demo --obs image` end to end at tiny sizes: frames reach the report site."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.sim]


def _load(path: Path) -> dict:
    m = re.fullmatch(r'window\.cupidData\((".*?"),(.*)\);\n', path.read_text(encoding="utf-8"), re.S)
    assert m, path
    return json.loads(m.group(2).replace("<\\/", "</"))


def test_image_demo_writes_frames_of_rollouts_and_influencers(tmp_path, capsys):
    pytest.importorskip("robosuite")
    from PIL import Image

    from cupid_engine.data import open_source
    from cupid_engine.demo import DemoConfig, run_demo

    cfg = DemoConfig.image(demos_per_tier=2, tiers=("better", "worse"), train_steps=3, batch_size=8, rollouts=2,
                           rollout_horizon=12, image_size=32, k=32, draws=1)
    index = run_demo(cfg, tmp_path)
    assert index.is_file()
    rollouts = list(open_source(str(tmp_path / "data" / "lift_rollouts")).episodes())
    assert len(rollouts) == 2
    for ep in rollouts:
        frames = np.asarray(ep.image_array("agentview"))
        assert frames.shape == (ep.length, 32, 32, 3) and frames.std() > 5
    demos = list(open_source(str(tmp_path / "data" / "lift_mh")).episodes())
    assert len(demos) == 4 and all(np.asarray(d.image_array("agentview")).shape[1:] == (32, 32, 3) for d in demos)
    store_meta = json.loads((tmp_path / "featurize.done.json").read_text())
    assert store_meta["config"]["output"] == "square"

    # The overview page leads with a rollout's frames next to its top influencers' frames.
    site = tmp_path / "site"
    overview = _load(site / "data" / "overview.js")
    featured = overview["featured"]
    shown = [featured["rollout"], *featured["demos"]]
    assert featured["rollout"]["split"] == "rollout" and featured["demos"]
    for ref in shown:
        assert ref["frames"]["camera"] == "agentview"
        strip = np.asarray(Image.open(site / ref["frames"]["src"]))
        assert strip.shape[0] == ref["frames"]["h"] and strip.std() > 5, ref["id"]

    # A re-run resumes from the cached stages.
    capsys.readouterr()
    run_demo(cfg, tmp_path)
    out = capsys.readouterr().out
    assert all(f"[demo] {s}: cached" in out for s in ("generate", "train", "rollout", "featurize", "score"))
