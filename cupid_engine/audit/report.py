"""The curation report: ``index.html``, PNG figures and ``audit.json``.

:func:`write_report` turns an :class:`~cupid_engine.audit.gates.AuditResult` into a folder:

* ``index.html`` -- self-contained (inline CSS, figures embedded as data URIs as well as
  written beside it): benchmark card, decision table with the reason per gate, per-seed
  success tables, paired-statistics tables and the mechanism tables;
* ``paired_delta_r<ratio>.png`` -- per-seed deltas of each rule against matched random;
* ``success_r<ratio>.png`` -- per-seed success rate of every condition;
* ``composition_r<ratio>.png`` -- tier composition and mean length of each pruned set;
* ``sensitivity.png`` -- mean delta vs random across prune ratios (several ratios only);
* ``audit.json`` -- the whole result, strict JSON (NaN as null, inf as "inf").

Figures use matplotlib's Agg backend, selected per figure through ``Figure`` objects so
that writing a report never changes the caller's pyplot backend.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from cupid_engine.audit.gates import CANDIDATE, DEPLOY, DO_NOT_CLAIM, AuditResult
from cupid_engine.audit.results import FULL, HELDOUT, PRIMARY, RANDOM
from cupid_engine.constants import TIERS

_VERDICT_COLOR = {DEPLOY: "#1b7837", CANDIDATE: "#b35806", DO_NOT_CLAIM: "#b2182b"}
_TIER_COLOR = {"better": "#4daf4a", "okay": "#ffbf00", "worse": "#e41a1c", "unknown": "#999999"}

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f0f0f0} td.l,th.l{text-align:left}
.verdict{font-weight:bold;color:white;padding:2px 6px;border-radius:3px}
.pass{color:#1b7837;font-weight:bold} .fail{color:#b2182b;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
"""


def git_commit() -> str:
    """``git rev-parse HEAD`` of the source tree, or ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _rtag(ratio: float) -> str:
    return f"{ratio:g}".replace(".", "p")


def _f(x: Any, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return format(x, fmt)


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_esc(h)}</th>' for i, h in enumerate(header))
    body = []
    for r in rows:
        # Cells that start with "<" are pre-built HTML from this module (already escaped).
        tds = "".join(
            f'<td class="{"l" if i < left else ""}">{c if str(c).startswith("<") else _esc(c)}</td>'
            for i, c in enumerate(r)
        )
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ---------------------------------------------------------------------------- figures
def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    os.replace(tmp, path)


def _rules(result: AuditResult) -> list[str]:
    cfg = result.config
    return list(dict.fromkeys(list(cfg["methods"]) + list(cfg["baselines"])))


def _fig_paired(result: AuditResult, ratio: float, path: Path) -> None:
    rules = _rules(result)
    fig = _new_figure(max(4.0, 1.6 * len(rules) + 1.5), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for i, rule in enumerate(rules):
        for block, marker, dx in ((PRIMARY, "o", -0.12), (HELDOUT, "s", 0.12)):
            c = result.comparison(block, rule, RANDOM, ratio)
            if not c or not c["seeds"]:
                continue
            d = np.asarray(c["rule_success"]) - np.asarray(c["comparator_success"])
            jitter = np.linspace(-0.05, 0.05, d.size) if d.size > 1 else np.zeros(1)
            ax.scatter(i + dx + jitter, 100 * d, marker=marker, s=22, alpha=0.8,
                       color="C0" if block == PRIMARY else "C1",
                       label=f"{block} seeds" if i == 0 else None)
            st = c["stats"]
            lo, hi = st["ci_low"], st["ci_high"]
            if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
                ax.errorbar(i + dx, 100 * st["mean"], yerr=[[100 * (st["mean"] - lo)], [100 * (hi - st["mean"])]],
                            fmt="_", color="k", capsize=4, markersize=14)
    ax.axhline(0.0, color="grey", lw=1, ls="--")
    ax.set_xticks(range(len(rules)))
    ax.set_xticklabels(rules)
    ax.set_ylabel("success − matched random (pp)")
    ax.set_title(f"Paired deltas vs random, prune ratio {ratio:g} (bar: mean, bootstrap CI)")
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)


def _fig_success(result: AuditResult, ratio: float, path: Path) -> None:
    conds = [FULL, RANDOM] + _rules(result)
    data = result.data
    fig = _new_figure(max(4.0, 1.3 * len(conds) + 1.5), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for block, color, dx in ((PRIMARY, "C0", -0.12), (HELDOUT, "C1", 0.12)):
        seeds = data.seeds(block)
        for s in seeds:
            ys = [data.get(s, c, ratio) for c in conds]
            xs = [i + dx for i, y in enumerate(ys) if y is not None]
            vals = [100 * y.success for y in ys if y is not None]
            ax.plot(xs, vals, color=color, alpha=0.25, lw=0.8)
            ax.scatter(xs, vals, color=color, s=14, alpha=0.8)
        for i, c in enumerate(conds):
            vals = [data.get(s, c, ratio) for s in seeds]
            vals = [100 * v.success for v in vals if v is not None]
            if vals:
                ax.hlines(np.mean(vals), i + dx - 0.1, i + dx + 0.1, color="k", lw=2)
    ax.plot([], [], "o", color="C0", label="primary seeds")
    ax.plot([], [], "o", color="C1", label="held-out seeds")
    ax.set_xticks(range(len(conds)))
    ax.set_xticklabels(conds)
    ax.set_ylabel("closed-loop success (%)")
    ax.set_title(f"Success per seed and condition, prune ratio {ratio:g} (bar: mean)")
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)


def _fig_composition(result: AuditResult, ratio: float, path: Path) -> None:
    mech = result.mechanism[repr(float(ratio))]["rules"]
    rules = list(mech)
    tiers = [t for t in list(TIERS) + ["unknown"] if any(t in mech[r]["tiers"] for r in rules)]
    fig = _new_figure(max(6.0, 2.0 * len(rules) + 2.0), 3.6)
    ax1 = fig.add_subplot(1, 2, 1)
    bottom = np.zeros(len(rules))
    for t in tiers:
        vals = np.asarray([mech[r]["tiers"].get(t, 0) for r in rules], dtype=float)
        ax1.bar(rules, vals, bottom=bottom, color=_TIER_COLOR.get(t, "#777"), label=t)
        bottom += vals
    ax1.set_ylabel("pruned episodes (all seeds)")
    ax1.set_title("Tier composition of pruned sets")
    if tiers:
        ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.bar(rules, [mech[r]["mean_length_pruned"] for r in rules], color="C2")
    if rules:
        ax2.axhline(mech[rules[0]]["mean_length_all"], color="k", ls="--", lw=1, label="all episodes")
        ax2.legend(fontsize=8)
    ax2.set_ylabel("mean length of pruned episodes")
    ax2.set_title("Length of pruned sets")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(f"Pruned-set composition, prune ratio {ratio:g}")
    _save(fig, path)


def _fig_sensitivity(result: AuditResult, ratios: list[float], path: Path) -> None:
    fig = _new_figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for k, rule in enumerate(_rules(result)):
        xs, ms, los, his = [], [], [], []
        for r in ratios:
            c = result.comparison(PRIMARY, rule, RANDOM, r)
            if not c or not c["seeds"]:
                continue
            st = c["stats"]
            xs.append(r)
            ms.append(100 * st["mean"])
            los.append(100 * (st["mean"] - (st["ci_low"] if st["ci_low"] is not None else st["mean"])))
            his.append(100 * ((st["ci_high"] if st["ci_high"] is not None else st["mean"]) - st["mean"]))
        if xs:
            off = (k - len(_rules(result)) / 2) * 0.003
            ax.errorbar(np.asarray(xs) + off, ms, yerr=[los, his], marker="o", capsize=3, label=rule)
    ax.axhline(0.0, color="grey", ls="--", lw=1)
    ax.set_xlabel("prune ratio")
    ax.set_ylabel("mean delta vs random (pp)")
    ax.set_title("Prune-ratio sensitivity (primary seeds, bootstrap CI)")
    ax.legend(fontsize=8)
    _save(fig, path)


# ---------------------------------------------------------------------------- HTML
def _img(path: Path, alt: str) -> str:
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{b64}"><figcaption>{_esc(path.name)}</figcaption></figure>'


def _card(result: AuditResult, commit: str, date: str) -> str:
    cfg = result.config
    rows = [
        ["task", cfg["task"]], ["dataset", cfg["dataset"]],
        ["policy", json.dumps(cfg.get("policy", {}), sort_keys=True)],
        # What the learner was told (a scenario, its shift, the feature settings): without it the
        # card would not say which experiment the numbers come from.
        ["learner options",
         json.dumps(cfg["learner_options"], sort_keys=True, default=str) if cfg.get("learner_options") else "none"],
        ["methods", ", ".join(cfg["methods"])], ["baselines", ", ".join(cfg["baselines"]) or "none"],
        ["comparator", "matched random pruning (same seed, same ratio)"],
        ["prune ratios", ", ".join(f"{r:g}" for r in cfg["prune_ratios"])],
        ["primary seeds", ", ".join(map(str, cfg["seeds"]))],
        ["held-out seeds", ", ".join(map(str, cfg["heldout_seeds"])) or "none"],
        ["rollouts per condition", cfg["rollouts"]],
        ["episodes", len(result.data.episode_ids)],
        ["alpha (one-sided)", cfg["alpha"]],
        ["permutation draws / bootstrap resamples", f"{cfg['permutations']} / {cfg['bootstrap']}"],
        ["git commit", commit], ["date (UTC)", date],
    ]
    return _table(["field", "value"], rows, left=2)


def _decision_table(result: AuditResult) -> str:
    rows = []
    for d in result.decisions:
        color = _VERDICT_COLOR.get(d.verdict, "#555")
        cells = [d.method, f"{d.ratio:g}", f'<span class="verdict" style="background:{color}">{_esc(d.verdict)}</span>']
        for g in d.gates:
            cls = "pass" if g.passed else "fail"
            word = ("ok" if g.passed else "FLAG") if g.gate == 4 else ("pass" if g.passed else "fail")
            cells.append(f'<span class="{cls}">{word}</span> {_esc(g.reason)}')
        cells.append(_esc(d.reason))
        rows.append(cells)
    head = ["method", "ratio", "verdict", "gate 1: matched random", "gate 2: cheap baselines",
            "gate 3: held-out block", "gate 4: mechanism", "decision reason"]
    return _table(head, rows, left=8)


def _seed_table(result: AuditResult, ratio: float) -> str:
    data = result.data
    conds = [FULL, RANDOM] + _rules(result)
    rows = []
    for block in (PRIMARY, HELDOUT):
        for s in data.seeds(block):
            row: list[Any] = [s, block]
            for c in conds:
                cond = data.get(s, c, ratio)
                row.append(_f(cond.success) if cond else "–")
            rows.append(row)
    for block in (PRIMARY, HELDOUT):
        seeds = data.seeds(block)
        if not seeds:
            continue
        row = ["mean", block]
        for c in conds:
            vals = [x.success for s in seeds if (x := data.get(s, c, ratio)) is not None]
            row.append(_f(float(np.mean(vals))) if vals else "–")
        rows.append(row)
    return _table(["seed", "block"] + conds, rows, left=2)


def _stats_table(result: AuditResult, ratio: float) -> str:
    rows = []
    for c in result.comparisons:
        if abs(c["ratio"] - ratio) > 1e-12 or not c["seeds"]:
            continue
        st = c["stats"]
        rows.append([
            c["rule"], c["comparator"], c["block"], st["n"], _f(100 * st["mean"], "+.1f"),
            f"{st['wins']}/{st['losses']}/{st['ties']}", _f(st["t_stat"], ".2f"), _f(st["p_t"], ".4f"),
            _f(st["p_wilcoxon"], ".4f"), _f(st["p_sign"], ".4f"),
            _f(st["p_perm"], ".4f") + (" (exact)" if st["perm_exact"] else ""),
            f"[{_f(100 * st['ci_low'], '+.1f')}, {_f(100 * st['ci_high'], '+.1f')}]",
            _f(st["d_z"], ".2f"), _f(st["p_mu_pos"], ".3f"),
        ])
    head = ["rule", "vs", "block", "n", "mean Δ (pp)", "W/L/T", "t", "p (t)", "p (Wilcoxon)", "p (sign)",
            "p (perm)", "CI (pp)", "d_z", "P(μ>0)"]
    return _table(head, rows, left=3)


def _mechanism_tables(result: AuditResult, ratio: float) -> str:
    mech = result.mechanism[repr(float(ratio))]
    tiers = sorted({t for r in mech["rules"].values() for t in r["tiers"]})
    rows = [[rule, r["n_pruned"], _f(r["mean_length_pruned"], ".1f"), _f(r["mean_length_all"], ".1f")]
            + [r["tiers"].get(t, 0) for t in tiers] for rule, r in mech["rules"].items()]
    out = _table(["pruned by", "n pruned", "mean length pruned", "mean length all"] + tiers, rows)
    others = sorted({o for v in mech["overlap"].values() for o in v})
    rows = [[m] + [_f(v.get(o, math.nan), ".2f") for o in others] + [_f(mech["spearman_length"].get(m), "+.2f")]
            for m, v in mech["overlap"].items()]
    out += _table(["method"] + [f"Jaccard vs {o}" for o in others] + ["Spearman(score, length)"], rows)
    return out


def write_report(result: AuditResult, out_dir: str | os.PathLike) -> Path:
    """Write ``index.html``, the PNG figures and ``audit.json`` into ``out_dir``.

    Args:
        result: A finished audit (``AuditRunner.run()`` or ``load_result``).
        out_dir: Output folder (created if needed; existing report files are replaced).

    Returns:
        Path of ``index.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    ratios = result.data.ratios()
    sections = []
    for ratio in ratios:
        tag = _rtag(ratio)
        figs = {
            "paired": out / f"paired_delta_r{tag}.png",
            "success": out / f"success_r{tag}.png",
            "composition": out / f"composition_r{tag}.png",
        }
        _fig_paired(result, ratio, figs["paired"])
        _fig_success(result, ratio, figs["success"])
        _fig_composition(result, ratio, figs["composition"])
        sections.append(
            f"<h2>Prune ratio {ratio:g}</h2>"
            f"<h3>Per-seed success rates</h3>{_seed_table(result, ratio)}"
            f"{_img(figs['success'], 'success per seed')}"
            f"<h3>Paired statistics (one-sided, H1: rule &gt; comparator)</h3>{_stats_table(result, ratio)}"
            f"{_img(figs['paired'], 'paired deltas vs random')}"
            f"<h3>Mechanism</h3>{_mechanism_tables(result, ratio)}"
            f"{_img(figs['composition'], 'pruned-set composition')}"
        )
    if len(ratios) > 1:
        sens = out / "sensitivity.png"
        _fig_sensitivity(result, ratios, sens)
        sections.append(f"<h2>Prune-ratio sensitivity</h2>{_img(sens, 'prune-ratio sensitivity')}")
    payload = result.to_dict()
    payload["provenance"] = {"git_commit": commit, "date_utc": date}
    tmp = out / ".audit.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, allow_nan=False))
    os.replace(tmp, out / "audit.json")
    rules_text = (
        "Gate 1: mean Δ vs matched random &gt; 0, paired t and sign-flip permutation p &lt; α, bootstrap CI "
        "above 0 (primary seeds). Gate 2: the method loses to no cheap baseline (it loses when the baseline's "
        "mean success is higher by more than the margin, or the baseline is significantly better). Gate 3: on "
        "held-out seeds, mean Δ &gt; 0, more wins than losses and paired t p &lt; α. Gate 4: descriptive; "
        "flag when the pruned set is mostly explained by length. Verdict: deploy (1–3 pass), candidate "
        "signal (1 passes, 2 or 3 fails), do not claim (1 fails)."
    )
    doc = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Pruning audit: {_esc(result.config['task'])}</title><style>{_CSS}</style></head><body>"
        f"<h1>Pruning audit: {_esc(result.config['task'])} / {_esc(result.config['dataset'])}</h1>"
        f"<h2>Benchmark card</h2>{_card(result, commit, date)}"
        f"<h2>Decision table</h2><p>{rules_text}</p>{_decision_table(result)}"
        + "".join(sections)
        + "<p>Machine-readable results: <a href=\"audit.json\">audit.json</a>.</p></body></html>"
    )
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, index)
    return index


def load_result(path: str | os.PathLike) -> AuditResult:
    """Re-read ``audit.json`` and re-apply the gates (no retraining).

    The stored config is re-validated, so thresholds edited in the JSON take effect.
    """
    from cupid_engine.audit.gates import evaluate_audit
    from cupid_engine.audit.protocol import AuditConfig
    from cupid_engine.audit.results import AuditData

    payload = json.loads(Path(path).read_text())
    return evaluate_audit(AuditData.from_dict(payload["data"]), AuditConfig.from_dict(payload["config"]))
