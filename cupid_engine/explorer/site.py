"""The influence explorer: a self-contained static site of one featurised run.

Layout of ``out/`` (open ``index.html`` from disk; no server, no framework)::

    index.html  app.js  app.css        one template and its script, copied verbatim
    data/overview.js                    counts, label groups, score histograms, filtered-set
                                        composition, audit decisions (when given)
    data/rollouts/p<N>.js               paged lists (``page_size`` rows each)
    data/demos/p<N>.js
    data/r/<h>.js                       one rollout: outcome, top demos, per-step profiles
    data/d/<h>.js                       one demo: scores of every method, rollouts it influenced most
    img/<h>.jpg                         filmstrip sprites (episodes with images only)

Page data are small JavaScript files that call ``window.cupidData(key, {...})`` rather
than JSON: browsers refuse ``fetch`` of local files, but load local scripts. ``<h>`` is a
hash of the episode id: ids are data, never file names. Per-step data exist only for each
rollout's top demos, never for the whole dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cupid_engine.explorer import collect
from cupid_engine.explorer.frames import filmstrip

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
TEMPLATE_FILES = ("index.html", "app.js", "app.css")
HIST_BINS = 20


def episode_hash(episode_id: str) -> str:
    """File-name-safe key of an episode id (16 hex digits of its SHA-256)."""
    return hashlib.sha256(episode_id.encode("utf-8")).hexdigest()[:16]


def _num(x: Any, digits: int = 5) -> Any:
    """A JSON-safe rounded float (None for NaN/inf)."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _nums(a: Any, digits: int = 4) -> list:
    return [_num(v, digits) for v in np.asarray(a, dtype=np.float64).tolist()]


def _write_js(path: Path, key: str, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    # "</" cannot end the script early when a page inlines it; ids are data.
    text = text.replace("</", "<\\/")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"window.cupidData({json.dumps(key)},{text});\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_scores(scores: Mapping[str, Any]) -> dict[str, dict[str, tuple[float, int]]]:
    """method name -> episode id -> (score, rank)."""
    from cupid_engine.scorers.table import as_table

    out = {}
    for name, src in scores.items():
        t = as_table(src)
        out[name] = {
            eid: (float(s), int(r))
            for eid, s, r in zip(t.column("episode_id").to_pylist(), t.column("score").to_pylist(),
                                 t.column("rank").to_pylist())
        }
    return out


def _histograms(values: dict[str, float], groups: dict[str, list[str]], bins: int = HIST_BINS) -> dict[str, Any]:
    """Shared-bin histograms of one method's scores per label value (``groups``: value -> ids)."""
    finite = np.array([v for v in values.values() if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {"edges": [], "counts": {}}
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = {}
    for value, ids in groups.items():
        v = np.array([values[i] for i in ids if i in values and math.isfinite(values[i])], dtype=np.float64)
        counts[value] = np.histogram(v, bins=edges)[0].tolist()
    return {"edges": _nums(edges, 5), "counts": counts}


def _composition(values: dict[str, float], ids: list[str], label_of: dict[str, str], fraction: float) -> dict[str, Any]:
    """Label counts among the lowest-scoring ``fraction`` of ``ids``, and random filtering's expectation."""
    scored = [i for i in ids if i in values]
    n_drop = max(1, int(round(fraction * len(scored)))) if scored else 0
    dropped = sorted(scored, key=lambda i: (values[i], i))[:n_drop]
    total: dict[str, int] = {}
    for i in scored:
        total[label_of.get(i, "")] = total.get(label_of.get(i, ""), 0) + 1
    got: dict[str, int] = {}
    for i in dropped:
        got[label_of.get(i, "")] = got.get(label_of.get(i, ""), 0) + 1
    frac = n_drop / len(scored) if scored else 0.0
    return {
        "filtered": n_drop,
        "counts": got,
        "expected_random": {k: _num(frac * v, 4) for k, v in total.items()},
    }


def _audit_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Decision table and paired deltas vs matched random from an ``audit.json``."""
    payload = json.loads(Path(path).read_text())
    decisions = [
        {"method": d.get("method"), "ratio": d.get("ratio"), "verdict": d.get("verdict"), "reason": d.get("reason")}
        for d in payload.get("decisions", [])
    ]
    deltas = []
    for c in payload.get("comparisons", []):
        st = c.get("stats") or {}
        if c.get("comparator") != "random":
            continue
        deltas.append({
            "rule": c.get("rule"), "block": c.get("block"), "ratio": c.get("ratio"),
            "mean": _num(st.get("mean")), "ci_low": _num(st.get("ci_low")), "ci_high": _num(st.get("ci_high")),
            "n": st.get("n"),
        })
    return {"decisions": decisions, "deltas": deltas}


def _frames_by_id(data: Sequence[str | os.PathLike], wanted: set[str], *, camera: str | None,
                  max_frames: int, size: int) -> tuple[dict[str, Any], list[str]]:
    """Filmstrips of the ``wanted`` episodes found in the datasets ``data``; notes on what had none."""
    from cupid_engine.data import open_source

    strips: dict[str, Any] = {}
    notes = []
    for path in data:
        src = open_source(path)
        have = set(src.catalog().column("episode_id").to_pylist()) & (wanted - set(strips))
        if not have:
            continue
        no_images = 0
        for ep in src.episodes(ids=sorted(have)):
            strip = filmstrip(ep, camera=camera, max_frames=max_frames, size=size)
            if strip is None:
                no_images += 1
            strips[ep.episode_id] = strip
        if no_images:
            notes.append(f"{no_images} episode(s) of {os.fspath(path)} have no images (a state-only dataset): "
                         "no frames are shown for them")
    missing = wanted - set(strips)
    if data and missing:
        notes.append(f"{len(missing)} shown episode(s) are in none of the datasets given with --data: no frames")
    return strips, notes


def build_site(
    store: StoreReader | str | os.PathLike,
    run: str | Sequence[str],
    out: str | os.PathLike,
    *,
    scores: Mapping[str, Any] | None = None,
    data: Sequence[str | os.PathLike] = (),
    audit: str | os.PathLike | None = None,
    top: int = 5,
    per_demo: int = 5,
    page_size: int = 200,
    fraction: float = 0.3,
    frames: str = "shown",
    camera: str | None = None,
    max_frames: int = 48,
    thumb_size: int = 96,
    title: str | None = None,
    damping: float | None = None,
) -> Path:
    """Write the explorer site of one run; returns ``out/index.html``.

    Args:
        store: Open store or path.
        run: Run name (or several: a checkpoint ensemble).
        out: Output folder (created; the site's own files are replaced).
        scores: Method name -> score table (or its Parquet path).
        data: Datasets holding the episodes (for frames); any format ``open_source`` reads.
        audit: An ``audit.json`` whose decisions and paired deltas the overview shows.
        top: Influencing demos per rollout page.
        per_demo: Rollouts listed per demo page.
        page_size: Rows per list page.
        fraction: Fraction of lowest-scoring training demos whose composition is plotted.
        frames: ``shown`` (rollouts and the demos in some rollout's top list), ``all``
            (every episode: large sites), or ``none``.
        camera: Camera key of the frames (default: first in sorted order).
        max_frames: Frames per filmstrip.
        thumb_size: Long side of a frame in pixels.
        title: Page title.
        damping: Relative damping (default: the preconditioner's).
    """
    from cupid_engine.index.query import _catalog_rows, _open_store

    if frames not in ("shown", "all", "none"):
        raise ValueError(f"frames must be shown, all or none, got {frames!r}")
    if top < 1 or per_demo < 1 or page_size < 1:
        raise ValueError("top, per_demo and page_size must be >= 1")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    st = _open_store(store)
    runs = [run] if isinstance(run, str) else list(run)
    kw = {} if damping is None else {"damping": damping}
    inf = collect.influences(st, runs, top=top, per_demo=per_demo, **kw)
    method_scores = _read_scores(scores or {})
    catalog = st.catalog()
    in_catalog = set(catalog.column("episode_id").to_pylist())
    listed = set(inf.demos) | set(inf.rollouts)
    for vals in method_scores.values():
        listed |= set(vals) & in_catalog
    rows = {r["episode_id"]: r for r in _catalog_rows(st, sorted(listed)).to_pylist()}
    demo_ids = [i for i in catalog.column("episode_id").to_pylist() if i in rows and rows[i]["split"] != "rollout"]
    rollout_ids = inf.rollouts
    demo_rows = [rows[i] for i in demo_ids]
    groups = collect.labels(demo_rows)
    ep_labels = {i: collect.episode_labels(rows[i]) for i in demo_ids}

    out = Path(out)
    for sub in ("data", "img"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in TEMPLATE_FILES:
        shutil.copyfile(STATIC / name, out / name)
    if title:
        html = (out / "index.html").read_text(encoding="utf-8")
        import html as _html

        (out / "index.html").write_text(html.replace("<title>cupid_engine explorer</title>",
                                                     f"<title>{_html.escape(title)}</title>"), encoding="utf-8")

    # Frames.
    if frames == "none" or not data:
        wanted: set[str] = set()
    elif frames == "all":
        wanted = set(demo_ids) | set(rollout_ids)
    else:
        wanted = set(rollout_ids) | {d for lst in inf.top_demos.values() for d, _ in lst}
    strips, notes = _frames_by_id(data, wanted, camera=camera, max_frames=max_frames, size=thumb_size)
    if not data and frames != "none":
        notes.append("no dataset given (--data): no frames are shown")
    frame_info: dict[str, Any] = {}
    for eid, strip in strips.items():
        if strip is None:
            continue
        h = episode_hash(eid)
        (out / "img").mkdir(parents=True, exist_ok=True)
        (out / "img" / f"{h}.jpg").write_bytes(strip.jpeg)
        frame_info[eid] = {"src": f"img/{h}.jpg", **strip.describe()}

    def ref(eid: str) -> dict[str, Any]:
        r = rows.get(eid, {})
        return {"id": eid, "h": episode_hash(eid), "split": r.get("split"), "success": r.get("success"),
                "length": r.get("length"), "labels": ep_labels.get(eid, {}), "frames": frame_info.get(eid)}

    # Rollout pages.
    for rid in rollout_ids:
        det = collect.rollout_detail(st, runs, rid, inf.top_demos[rid], **kw)
        total = np.sum(det.rollout_profiles, axis=0) if det.rollout_profiles else np.zeros(int(rows[rid]["length"]))
        _write_js(out / "data" / "r" / f"{episode_hash(rid)}.js", f"r/{episode_hash(rid)}", {
            "rollout": ref(rid),
            "return": rows[rid].get("return"),
            "task": rows[rid].get("task"),
            "total_profile": _nums(total),
            "demos": [
                {**ref(eid), "a": _num(a), "rollout_profile": _nums(rp), "demo_profile": _nums(dp),
                 "aligned": [int(x) for x in al]}
                for (eid, a), rp, dp, al in zip(det.demos, det.rollout_profiles, det.demo_profiles, det.aligned)
            ],
        })

    # Demo pages.
    for eid in demo_ids:
        sc = {m: {"score": _num(v[eid][0]), "rank": v[eid][1], "of": len(v)} for m, v in method_scores.items()
              if eid in v}
        _write_js(out / "data" / "d" / f"{episode_hash(eid)}.js", f"d/{episode_hash(eid)}", {
            "demo": ref(eid),
            "task": rows[eid].get("task"),
            "scores": sc,
            "rollouts": [{**ref(r), "a": _num(a)} for r, a in inf.top_rollouts.get(eid, [])],
        })

    # Paged lists.
    methods = list(method_scores)
    rollout_list = []
    for rid in rollout_ids:
        best = inf.top_demos[rid][0] if inf.top_demos[rid] else (None, None)
        rollout_list.append({"id": rid, "h": episode_hash(rid), "success": rows[rid].get("success"),
                             "length": rows[rid].get("length"), "top": best[0], "top_h":
                             episode_hash(best[0]) if best[0] else None, "a": _num(best[1])})
    demo_list = [{"id": e, "h": episode_hash(e), "split": rows[e]["split"], "length": rows[e].get("length"),
                  "labels": ep_labels[e], "scores": [_num(method_scores[m][e][0]) if e in method_scores[m] else None
                                                      for m in methods]} for e in demo_ids]
    pages = {}
    for name, lst in (("rollouts", rollout_list), ("demos", demo_list)):
        n = max(1, math.ceil(len(lst) / page_size))
        pages[name] = n
        for p in range(n):
            _write_js(out / "data" / name / f"p{p}.js", f"{name}/p{p}",
                      {"page": p, "pages": n, "total": len(lst), "methods": methods,
                       "rows": lst[p * page_size : (p + 1) * page_size]})

    # Overview.
    train_ids = [e for e in demo_ids if rows[e]["split"] == "train"]
    outcomes = [rows[r].get("success") for r in rollout_ids]
    known = [o for o in outcomes if o is not None]
    label_groups = {}
    for lab, vals in groups.items():
        label_groups[lab] = {v: [e for e in demo_ids if ep_labels[e].get(lab) == v] for v in vals}
    values = {m: {e: sr[0] for e, sr in method_scores[m].items()} for m in methods}
    hist = {m: {lab: _histograms(values[m], g) for lab, g in label_groups.items()} or
            {"all": _histograms(values[m], {"all": list(values[m])})} for m in methods}
    comp = {m: {lab: _composition(values[m], train_ids, {e: ep_labels[e].get(lab, "") for e in train_ids},
                                  fraction) for lab in groups} for m in methods}
    run_info = {}
    for n in runs:
        r = st.run(n)
        cfg = getattr(r, "config", None)
        run_info[n] = {"k": int(r.k), "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None}
    # The first failed rollout (else the first rollout) and its top demos, with frames, up front.
    failed = [r for r in rollout_ids if rows[r].get("success") is False]
    pick = (failed or rollout_ids or [None])[0]
    featured = None if pick is None else {
        "rollout": ref(pick),
        "demos": [{**ref(e), "a": _num(a)} for e, a in inf.top_demos[pick]],
    }
    overview = {
        "title": title or "cupid_engine explorer",
        "featured": featured,
        "runs": run_info,
        "counts": {"train": len(train_ids), "demos": len(demo_ids), "rollouts": len(rollout_ids),
                   "successes": sum(bool(o) for o in known), "known_outcomes": len(known)},
        "labels": groups,
        "methods": methods,
        "histograms": hist,
        "composition": comp,
        "fraction": fraction,
        "pages": pages,
        "page_size": page_size,
        "audit": _audit_summary(audit) if audit else None,
        "notes": notes,
        "influence_sign": "a(rollout, demo) = q_rollout . s_demo with sign +1: how much up-weighting the demo "
                          "raises the rollout's likelihood (for a failure: the demos that made it more likely)",
    }
    _write_js(out / "data" / "overview.js", "overview", overview)
    for note in notes:
        log.info("explorer: %s", note)
    return out / "index.html"
