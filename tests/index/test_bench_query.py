"""Smoke test of benchmarks/bench_query.py at tiny sizes (the numbers are not checked)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_query.py"


def test_bench_query_runs_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_query_smoke", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out_path = tmp_path / "q.json"
    args = mod.build_parser().parse_args([
        "--sizes", "300", "--k", "16", "--queries", "3", "--hnsw-max", "300", "--ef-search", "16",
        "--bandwidth-mib", "8", "--rollout-steps", "60", "--demo-steps", "90", "--quality-k", "16",
        "--episode-len", "10", "--naive-pairs", "0", "--rerank", "20", "--rerank-depths", "10",
        "--spectrum", "isotropic", "--ivf-nlist", "4", "--ivf-nprobe", "4", "--json", str(out_path),
    ])
    out = mod.run(args)
    saved = json.loads(out_path.read_text())
    assert saved["acceptance"].keys() == out["acceptance"].keys()
    kinds = {r["kind"] for r in saved["results"]}
    assert {"exact", "hnsw", "quality", "sq8", "sq8_uncertified", "default", "ivf_flat", "ivf_sq8"} <= kinds
    # Probing all 4 lists scans everything: IVFFlat is then exact, IVF-SQ8 re-scores exactly.
    assert all(r["recall_at_10"] == 1.0 for r in saved["results"] if r["kind"].startswith("ivf"))
    # The default index's acceptance row: one entry per size, exact recall, load noted.
    default = saved["acceptance"]["default_index"]
    assert [r["n"] for r in default["rows"]] == [300] and default["rows"][0]["recall_at_10"] == 1.0
    assert default["rows"][0]["index"] in ("flat", "sq8") and default["rows"][0]["load"] >= 0
    sq8 = [r for r in saved["results"] if r["kind"] == "sq8"][0]
    assert sq8["recall_at_10"] == 1.0 and sq8["certify"]  # the certified re-rank is exact
    quality = [r for r in saved["results"] if r["kind"] == "quality"]
    # The first method is the reference; every other one carries its difference to it.
    assert len(quality) >= 2 and "max_abs_diff_vs_first" not in quality[0]
    assert all(r["max_abs_diff_vs_first"] < 1e-3 for r in quality[1:])
