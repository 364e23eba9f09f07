"""The report renders: HTML parses, PNGs open, audit.json is strict JSON; the CLI runs."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from cupid_engine.audit.protocol import AuditRunner
from cupid_engine.audit.report import load_result, write_report
from cupid_engine.audit.synthetic import SyntheticLearner


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    from .conftest import make_config

    root = tmp_path_factory.mktemp("report")
    cfg = make_config(root, seeds=(0, 1, 2, 3, 4), heldout_seeds=(10, 11, 12), prune_ratios=(0.1, 0.2),
                      rollouts=100)
    result = AuditRunner(cfg, SyntheticLearner(cfg.learner_options)).run()
    index = write_report(result, root / "out")
    return index.parent, result


def test_html_parses_and_has_the_sections(report_dir):
    out, result = report_dir
    parser = _Collector()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    parser.close()
    text = " ".join(parser.text)
    assert parser.tags.count("table") >= 5 and parser.tags.count("img") >= 7
    for needle in ("Benchmark card", "Decision table", "git commit", "rollouts per condition",
                   "Prune-ratio sensitivity", "gate 1", "cupid", "null", "learner options", '"signal"'):
        assert needle in text, needle
    for d in result.decisions:
        assert d.verdict in text


def test_pngs_exist_and_open(report_dir):
    out, _ = report_dir
    names = ["paired_delta_r0p1.png", "success_r0p1.png", "composition_r0p1.png",
             "paired_delta_r0p2.png", "success_r0p2.png", "composition_r0p2.png", "sensitivity.png"]
    for name in names:
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000, name
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG"


def test_audit_json_is_strict_and_reloads(report_dir):
    out, result = report_dir
    payload = json.loads((out / "audit.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert payload["provenance"]["git_commit"]
    assert len(payload["decisions"]) == 4  # 2 methods x 2 ratios
    again = load_result(out / "audit.json")
    assert [(d.method, d.ratio, d.verdict) for d in again.decisions] == [
        (d.method, d.ratio, d.verdict) for d in result.decisions]


def _toml(tmp_path: Path) -> Path:
    path = tmp_path / "audit.toml"
    path.write_text(
        'task = "lift"\ndataset = "synthetic"\nmethods = ["cupid"]\nbaselines = ["length"]\n'
        'seeds = [0, 1, 2, 3, 4]\nheldout_seeds = [9, 10]\nrollouts = 50\npermutations = 500\n'
        f'bootstrap = 500\ncache_dir = "{tmp_path / "cache"}"\n[policy]\ntype = "mlp"\n'
    )
    return path


def main(argv):
    """``cupid-engine`` with only the audit command registered (isolates other commands)."""
    import argparse

    from cupid_engine.cli import audit

    parser = argparse.ArgumentParser(prog="cupid-engine")
    audit.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_synthetic(tmp_path, capsys):
    rc = main(["audit", "--config", str(_toml(tmp_path)), "--out", str(tmp_path / "rep"), "--learner", "synthetic"])
    assert rc == 0
    assert (tmp_path / "rep" / "index.html").is_file() and (tmp_path / "rep" / "audit.json").is_file()
    assert "index.html" in capsys.readouterr().out


def test_cli_seed_shares_fill_the_cache_then_one_run_reports(tmp_path, capsys):
    cfg = str(_toml(tmp_path))
    for share in ("0,3,9", "1,2,4,10"):
        rc = main(["audit", "--config", cfg, "--only-seeds", share, "--learner", "synthetic"])
        out = capsys.readouterr().out
        assert rc == 0 and "no report written" in out and f"seeds [{share.replace(',', ', ')}]" in out
    assert not (tmp_path / "rep").exists()
    rc = main(["audit", "--config", cfg, "--out", str(tmp_path / "rep"), "--learner", "synthetic"])
    assert rc == 0 and (tmp_path / "rep" / "audit.json").is_file()
    # Every condition came from the shares' cache; the report equals a one-process run's.
    shared = json.loads((tmp_path / "rep" / "audit.json").read_text())
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    assert main(["audit", "--config", str(_toml(fresh_dir)), "--out", str(fresh_dir / "rep"),
                 "--learner", "synthetic"]) == 0
    fresh = json.loads((fresh_dir / "rep" / "audit.json").read_text())
    assert shared["data"]["conditions"] == fresh["data"]["conditions"]
    assert [d["verdict"] for d in shared["decisions"]] == [d["verdict"] for d in fresh["decisions"]]


def test_cli_seed_shares_refuse_bad_input(tmp_path, capsys):
    cfg = str(_toml(tmp_path))
    assert main(["audit", "--config", cfg, "--only-seeds", "0,77", "--learner", "synthetic"]) == 2
    assert "seeds [77] are not in the config" in capsys.readouterr().err
    assert main(["audit", "--config", cfg, "--only-seeds", "0,x", "--learner", "synthetic"]) == 2
    assert "--only-seeds takes integers" in capsys.readouterr().err
    assert main(["audit", "--config", cfg, "--learner", "synthetic"]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["audit", "--config", cfg, "--only-seeds", "0", "--out", str(tmp_path / "r"),
                 "--learner", "synthetic"]) == 2
    assert "--out would be ignored" in capsys.readouterr().err and not (tmp_path / "r").exists()
