"""The explorer site holds the store's and the score tables' numbers, and nothing heavy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cupid_engine.explorer import build_site, episode_hash
from cupid_engine.explorer.frames import frame_steps
from cupid_engine.explorer.site import _write_js
from cupid_engine.index import top_influencers
from cupid_engine.scorers.table import read_table
from cupid_engine.store import open_store


def _load(path: Path) -> tuple[str, dict]:
    m = re.fullmatch(r'window\.cupidData\((".*?"),(.*)\);\n', path.read_text(encoding="utf-8"), re.S)
    assert m, path
    return json.loads(m.group(1)), json.loads(m.group(2).replace("<\\/", "</"))


@pytest.fixture(scope="module")
def site(explorer_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    index = build_site(explorer_run["store"], "base", out, scores=explorer_run["scores"], data=explorer_run["data"],
                       audit=explorer_run["audit"], top=3, page_size=5, fraction=0.25)
    assert index == out / "index.html"
    return out


def test_overview_numbers_come_from_the_store_and_tables(site, explorer_run):
    key, o = _load(site / "data" / "overview.js")
    assert key == "overview"
    cat = open_store(explorer_run["store"]).catalog().to_pylist()
    rollouts = [r for r in cat if r["split"] == "rollout"]
    assert o["counts"]["rollouts"] == len(rollouts) == 4
    assert o["counts"]["successes"] == sum(bool(r["success"]) for r in rollouts)
    assert o["counts"]["train"] == 12
    assert o["labels"] == {"strategy": ["majority", "minority"], "tier": ["better", "okay", "worse"]}
    # The filtered-set composition is the lowest 25% of each table, counted by label.
    for method, path in explorer_run["scores"].items():
        rows = sorted(read_table(path).to_pylist(), key=lambda r: (r["score"], r["episode_id"]))[:3]
        strategy = {e.episode_id: e.metadata["strategy"] for e in explorer_run["demos"]}
        want = {}
        for r in rows:
            want[strategy[r["episode_id"]]] = want.get(strategy[r["episode_id"]], 0) + 1
        comp = o["composition"][method]["strategy"]
        assert comp["counts"] == want and comp["filtered"] == 3
        assert comp["expected_random"] == {"majority": 2.0, "minority": 1.0}
        # Every training demo lands in exactly one histogram bin of its label value.
        assert sum(sum(c) for c in o["histograms"][method]["tier"]["counts"].values()) == 12
    assert o["audit"]["decisions"][0]["verdict"] == "do not claim"
    assert o["audit"]["deltas"][0]["mean"] == pytest.approx(-0.02)
    assert o["pages"] == {"rollouts": 1, "demos": 3}
    first_failed = next(r["episode_id"] for r in cat if r["split"] == "rollout" and r["success"] is False)
    assert o["featured"]["rollout"]["id"] == first_failed and len(o["featured"]["demos"]) == 3
    assert o["featured"]["rollout"]["frames"] is not None


def test_rollout_pages_match_top_influencers(site, explorer_run):
    store = open_store(explorer_run["store"])
    for ep in explorer_run["rollouts"]:
        _, page = _load(site / "data" / "r" / f"{episode_hash(ep.episode_id)}.js")
        ref = top_influencers(store, "base", ep.episode_id, k=3, sign=1.0)
        assert [d["id"] for d in page["demos"]] == ref.table.column("episode_id").to_pylist()
        np.testing.assert_allclose([d["a"] for d in page["demos"]], ref.table.column("score").to_pylist(), rtol=1e-3)
        for d, st in zip(page["demos"], ref.steps):
            assert len(d["rollout_profile"]) == ep.length and len(d["aligned"]) == ep.length
            assert len(d["demo_profile"]) == d["length"]
            # The profiles split the same total a(τ, ξ) over steps.
            assert sum(d["rollout_profile"]) == pytest.approx(st.score, rel=1e-3)
            assert sum(d["demo_profile"]) == pytest.approx(st.score, rel=1e-3)
            assert all(0 <= s < d["length"] for s in d["aligned"])
        assert page["rollout"]["frames"]["steps"] == frame_steps(ep.length, 48)


def test_demo_pages_hold_every_score_and_no_step_data(site, explorer_run):
    tables = {m: {r["episode_id"]: r for r in read_table(p).to_pylist()} for m, p in explorer_run["scores"].items()}
    for ep in explorer_run["demos"]:
        path = site / "data" / "d" / f"{episode_hash(ep.episode_id)}.js"
        _, page = _load(path)
        for m, t in tables.items():
            assert page["scores"][m]["score"] == pytest.approx(t[ep.episode_id]["score"], rel=1e-4, abs=1e-9)
            assert page["scores"][m]["rank"] == t[ep.episode_id]["rank"]
        assert len(page["rollouts"]) == 4
        assert "profile" not in path.read_text()
    # Paged lists: 12 demos in pages of 5.
    sizes = [len(_load(site / "data" / "demos" / f"p{p}.js")[1]["rows"]) for p in range(3)]
    assert sizes == [5, 5, 2]


def test_filmstrips_show_the_source_frames(site, explorer_run):
    from PIL import Image

    ep = explorer_run["rollouts"][0]
    _, page = _load(site / "data" / "r" / f"{episode_hash(ep.episode_id)}.js")
    fr = page["rollout"]["frames"]
    sprite = np.asarray(Image.open(site / fr["src"]).convert("RGB")).astype(np.float64)
    src = np.asarray(ep.images["agentview"]).astype(np.float64)
    assert sprite.shape == (src.shape[1], src.shape[2] * len(fr["steps"]), 3)
    for i, step in enumerate(fr["steps"]):
        tile = sprite[:, i * fr["w"] : (i + 1) * fr["w"]]
        mse = np.mean((tile - src[step]) ** 2)
        assert 10 * np.log10(255**2 / mse) > 28  # JPEG at quality 90, 4:4:4


def test_state_only_data_says_so(explorer_run, tmp_path):
    from cupid_engine.data import write_dataset

    demos = [type(e)(**{**e.__dict__, "images": {}}) for e in explorer_run["demos"]]
    write_dataset(tmp_path / "state_only", demos)
    build_site(explorer_run["store"], "base", tmp_path / "site", data=[tmp_path / "state_only"], top=2)
    _, o = _load(tmp_path / "site" / "data" / "overview.js")
    assert any("state-only" in n for n in o["notes"])
    assert any("in none of the datasets" in n for n in o["notes"])  # the rollouts were not given
    assert not (tmp_path / "site" / "img").exists()


def test_ids_are_never_file_names_and_scripts_cannot_break_out(tmp_path):
    h = episode_hash("../../etc/passwd")
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    _write_js(tmp_path / "x.js", "k", {"id": "</script><script>alert(1)</script>"})
    assert "</script>" not in (tmp_path / "x.js").read_text()
    assert _load(tmp_path / "x.js")[1]["id"] == "</script><script>alert(1)</script>"


def test_bad_arguments_are_refused(explorer_run, tmp_path):
    with pytest.raises(ValueError, match="frames"):
        build_site(explorer_run["store"], "base", tmp_path, frames="some")
    with pytest.raises(ValueError, match="fraction"):
        build_site(explorer_run["store"], "base", tmp_path, fraction=1.5)


def test_report_cli(explorer_run, tmp_path, capsys):
    from cupid_engine.cli import main

    argv = ["report", "--store", explorer_run["store"], "--run", "base", "--out", str(tmp_path / "s"), "--top", "2"]
    for name, path in explorer_run["scores"].items():
        argv += ["--scores", str(path) if name == "cupid" else f"{name}={path}"]
    for d in explorer_run["data"]:
        argv += ["--data", str(d)]
    assert main(argv) == 0
    assert "index.html" in capsys.readouterr().out
    _, o = _load(tmp_path / "s" / "data" / "overview.js")
    assert o["methods"] == ["cupid", "length", "random"]
