"""The demo's report folder: ``index.html`` plus PNG figures, and the console summary.

Figures: score distributions per quality tier (one panel per method) and the tier
composition of the demos each method would filter out. Tables: the tier table of the
filtered sets (removal rate of worse-tier demos relative to random filtering) and the
top influencers of one failed rollout with the steps carrying the influence.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from cupid_engine.constants import TIERS


def failed_rollout_query(store_path: str, k: int = 10):
    """Top influencers of the first failed rollout (or the first rollout if none failed)."""
    from cupid_engine.index import top_influencers
    from cupid_engine.store import open_store

    store = open_store(store_path)
    cat = store.catalog().to_pylist()
    rollouts = [r for r in cat if r["split"] == "rollout"]
    if not rollouts:
        return None
    failed = [r for r in rollouts if r.get("success") is False]
    pick = (failed or rollouts)[0]["episode_id"]
    # sign=+1 ranks demos by a(tau, xi) itself: the demos that most raise the likelihood of
    # this (failed) rollout, i.e. "which demos made it fail". The default sign R(tau) = -1
    # would rank the demos that most oppose the failure.
    result = top_influencers(store, "base", pick, k=k, sign=1.0)
    print()
    print(result)
    return result


def tier_table(tables: dict[str, Any], fraction: float) -> list[dict[str, Any]]:
    """Per method: tier counts among the lowest-scoring ``fraction`` of training demos."""
    rows = []
    base_rate = None
    for method, table in tables.items():
        t = table.to_pylist()
        t = [r for r in t if r.get("split", "train") == "train"]
        n_drop = max(1, int(round(fraction * len(t))))
        dropped = sorted(t, key=lambda r: r["score"])[:n_drop]
        counts = {tier: sum(1 for r in dropped if r.get("tier") == tier) for tier in TIERS}
        total_worse = sum(1 for r in t if r.get("tier") == "worse")
        rate = counts["worse"] / total_worse if total_worse else float("nan")
        rows.append({"method": method, "filtered": n_drop, **counts, "worse_removed_rate": rate})
        if method == "random":
            base_rate = rate
    # Random filtering removes each tier at the filtered fraction in expectation.
    expected_random = fraction
    for r in rows:
        r["vs_random_expected"] = r["worse_removed_rate"] / expected_random if expected_random else float("nan")
        r["vs_random_draw"] = r["worse_removed_rate"] / base_rate if base_rate else float("nan")
    return rows


def _plots(tables: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    methods = list(tables)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.0 * len(methods), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        t = [r for r in tables[method].to_pylist() if r.get("split", "train") == "train"]
        data = [[r["score"] for r in t if r.get("tier") == tier] for tier in TIERS]
        present = [(tier, d) for tier, d in zip(TIERS, data) if d]
        if present:
            ax.boxplot([d for _, d in present], tick_labels=[tier for tier, _ in present], showfliers=False)
            for i, (_, d) in enumerate(present):
                jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(d))
                ax.scatter(np.full(len(d), i + 1) + jitter, d, s=6, alpha=0.5)
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("score distribution per quality tier (higher = keep)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "score_distributions.png", dpi=110)
    plt.close(fig)
    names.append("score_distributions.png")

    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.2))
    bottom = np.zeros(len(rows))
    colors = {"better": "#4c9a2a", "okay": "#e0b530", "worse": "#c0392b"}
    for tier in TIERS:
        vals = np.array([r[tier] / r["filtered"] for r in rows])
        ax.bar([r["method"] for r in rows], vals, bottom=bottom, label=tier, color=colors[tier])
        bottom += vals
    ax.set_ylabel("share of filtered demos")
    ax.set_title("tier composition of the filtered set", fontsize=10)
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    fig.savefig(out / "filtered_composition.png", dpi=110)
    plt.close(fig)
    names.append("filtered_composition.png")
    return names


def _html_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(cfg, out: Path, *, summaries: dict[str, Any], query) -> Path:
    from cupid_engine.scorers import read_table

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    tables = {m: read_table(p) for m, p in summaries["score"]["scores"].items()}
    rows = tier_table(tables, cfg.filter_fraction)
    figs = _plots(tables, rows, report)
    cols = ["method", "filtered", *TIERS, "worse_removed_rate", "vs_random_expected", "vs_random_draw"]
    print()
    print(f"filtering the lowest {cfg.filter_fraction:.0%} of demos — tier counts among the filtered:")
    print("  " + "  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print("  " + "  ".join(f"{r[c]:>14.3g}" if isinstance(r[c], float) else f"{str(r[c]):>14}" for c in cols))
    q_html = "<p>No rollouts.</p>"
    q_json = None
    if query is not None:
        qrows = []
        for row, st in zip(query.table.to_pylist(), query.steps):
            qrows.append({**row, "top rollout steps": ", ".join(f"{i}" for i, _ in st.rollout_steps),
                          "top demo steps": ", ".join(f"{i}" for i, _ in st.demo_steps)})
        qcols = [c for c in ["rank", "episode_id", "score", "tier", "length", "top rollout steps", "top demo steps"]
                 if any(c in r for r in qrows)]
        q_html = (f"<p>Failed rollout <b>{html.escape(query.rollout)}</b>: the training demos whose influence most "
                  f"raises the likelihood of this rollout (ranked by a(&tau;, &xi;), sign {query.sign:+g}), and the "
                  f"rollout and demo steps that carry it.</p>" + _html_table(qrows, qcols))
        q_json = {"rollout": query.rollout, "sign": query.sign, "top": qrows}
    ro = summaries["rollout"]
    obs_html = ""
    if getattr(cfg, "obs", "state") == "image":
        obs_html = (f" Observations: camera frames ({html.escape(', '.join(cfg.cameras))}, "
                    f"{cfg.image_size}x{cfg.image_size}) and the low-dim state; rollouts see live renders.")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cupid_engine demo report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}img{{max-width:100%}}</style></head><body>
<h1>cupid_engine demo: {html.escape(cfg.task)}, mixed-quality demonstrations</h1>
<p>{cfg.demos_per_tier} scripted demos per tier ({", ".join(cfg.tiers)}), {html.escape(cfg.policy)} policy trained
for {cfg.train_steps} steps, {ro['episodes']} rollouts with success rate {ro['success_rate']:.0%};
features: {html.escape(cfg.method)} k={cfg.k}, output {html.escape(cfg.output)}.{obs_html}</p>
<p>Influence explorer (rollouts and their top influencing demos, with frames where the data has them):
<a href="../site/index.html">site/index.html</a>.</p>
<h2>Score distributions per tier</h2><img src="score_distributions.png" alt="score distributions">
<h2>Filtering the lowest {cfg.filter_fraction:.0%}</h2>
<p><code>vs_random_expected</code>: worse-tier removal rate over the filtered fraction (what random filtering
removes in expectation); <code>vs_random_draw</code>: over the seeded random draw.</p>
{_html_table(rows, cols)}<img src="filtered_composition.png" alt="filtered composition">
<h2>Which demos made this rollout fail?</h2>{q_html}
<h2>Run</h2><pre>{html.escape(json.dumps({"config": cfg.to_dict(), "stages": summaries}, indent=2, default=str))}</pre>
</body></html>"""
    index = report / "index.html"
    index.write_text(page)
    (report / "summary.json").write_text(
        json.dumps({"config": cfg.to_dict(), "tier_table": rows, "query": q_json, "figures": figs}, indent=2, default=str)
    )
    print(f"\n[demo] report written to {index}")
    return index
