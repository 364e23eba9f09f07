"""Ground-truth view of a recorded audit on a known-answer scenario.

``cupid-engine audit`` decides from retrained success only; it never sees which demos the
scenario planted as known bad. This script joins an audit's ``audit.json`` (its score
tables and pruned sets) with the scenario's labels (``scenario_label`` in the episode
metadata, the benchmark side only) and prints, per seed:

* the AUROC that each scored rule ranks the known-bad class below the rest
  (:func:`bench_fidelity.auroc`, ties count 1/2);
* how many known-bad demos each pruned condition removed (chance: pruned x share).

The labels come from the dataset the audit trained on (``--data``), or, without it, from
the scenario generated again from the audit config's ``learner_options`` (``scenario``,
``demos``, ``data_seed``); either way the episode ids must match the audit's exactly.

``--contexts`` also re-runs every condition's evaluation rollouts from the audit's cache
(``SimLearner.evaluation_rollouts``: the same initial states, shift and policy), checks
that each reproduces the recorded success rate exactly, and splits success by the rollout
context a scenario records (``env_knobs`` ``context_*`` flags, e.g. heavy / light cube on
``lift-cue``). Run it from the directory the audit ran in (the config's ``dataset`` is
relative to it); it costs one evaluation per condition (about 40 s each for `lift-cue`).

Example::

    python benchmarks/audit_labels.py docs/runs/audit_lift_grasp.json --json /tmp/labels.json
    cd AUDIT_DIR && python benchmarks/audit_labels.py audit.json --data data/lift_cue --contexts
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fidelity import auroc  # noqa: E402


def _tag(c: Mapping[str, Any]) -> str:
    """A condition's name in the views: ``full`` or ``rule@ratio``."""
    return c["method"] if c["method"] == "full" else f"{c['method']}@{c['ratio']:g}"


def label_view(audit: Mapping[str, Any], labels: Mapping[str, str], known_bad: str) -> dict[str, Any]:
    """Per-seed AUROC of every score table and known-bad count of every pruned set.

    Args:
        audit: a loaded ``audit.json`` (its ``data`` block: ``episodes``, ``scores``,
            ``conditions``).
        labels: episode id -> scenario label, for exactly the audit's episodes.
        known_bad: the label a rule should rank lowest.

    Returns:
        ``{"known_bad", "n", "n_bad", "seeds": {seed: {"auroc": {rule: a},
        "pruned_bad": {"rule@ratio": [bad, pruned]}, "success": {"rule@ratio": s}}},
        "mean_auroc": {rule: a}, "pruned_bad_total": {"rule@ratio": [bad, pruned]}}``.

    Raises:
        ValueError: the label set and the audit's episodes differ, or no demo carries
            ``known_bad``.
    """
    ids = list(audit["data"]["episodes"]["episode_id"])
    if set(ids) != set(labels):
        missing, extra = sorted(set(ids) - set(labels))[:3], sorted(set(labels) - set(ids))[:3]
        raise ValueError(f"labels do not match the audit's episodes (missing {missing}, extra {extra})")
    bad = {i for i in ids if labels[i] == known_bad}
    if not bad:
        raise ValueError(f"no episode is labelled {known_bad!r}; labels seen: {sorted(set(labels.values()))}")
    seeds: dict[str, dict[str, Any]] = defaultdict(lambda: {"auroc": {}, "pruned_bad": {}, "success": {}})
    for key, table in audit["data"]["scores"].items():
        seed, rule = key.split("|", 1)
        order = list(table)
        s = np.array([table[i] for i in order], np.float64)
        b = np.array([i in bad for i in order])
        seeds[seed]["auroc"][rule] = auroc(s, b)
    for c in audit["data"]["conditions"]:
        row = seeds[str(c["seed"])]
        row["success"][_tag(c)] = c["success"]
        if c["method"] != "full":
            row["pruned_bad"][_tag(c)] = [sum(i in bad for i in c["pruned"]), len(c["pruned"])]
    rules = sorted({r for v in seeds.values() for r in v["auroc"]})
    tags = sorted({t for v in seeds.values() for t in v["pruned_bad"]})
    return {
        "known_bad": known_bad,
        "n": len(ids),
        "n_bad": len(bad),
        "seeds": dict(sorted(seeds.items(), key=lambda kv: int(kv[0]))),
        "mean_auroc": {r: float(np.mean([v["auroc"][r] for v in seeds.values() if r in v["auroc"]])) for r in rules},
        "pruned_bad_total": {
            t: [sum(v["pruned_bad"][t][j] for v in seeds.values() if t in v["pruned_bad"]) for j in (0, 1)]
            for t in tags
        },
    }


def by_context(episodes: Sequence[Any]) -> dict[str, list[int]]:
    """Successes and counts per rollout context: ``{"heavy=1,white=1": [successes, n]}``.

    The context is the set of ``context_*`` knobs in the episodes' ``env_knobs`` that are
    0 or 1 in every episode (a knob that takes any other value, such as a noisy cue, is not
    a context); episodes without any fall under ``"all"``.
    """
    knobs = [(e.metadata or {}).get("env_knobs", {}) for e in episodes]
    keys = sorted({k for kn in knobs for k in kn if k.startswith("context_")})
    flags = [k for k in keys if all(kn.get(k) in (0.0, 1.0) for kn in knobs)]
    out: dict[str, list[int]] = {}
    for e, kn in zip(episodes, knobs):
        tag = ",".join(f"{k[len('context_'):]}={int(kn[k])}" for k in flags) or "all"
        row = out.setdefault(tag, [0, 0])
        row[0] += int(bool(e.success))
        row[1] += 1
    return dict(sorted(out.items()))


def context_view(audit: Mapping[str, Any]) -> dict[str, Any]:
    """Re-run each condition's evaluation from the audit's cache; success per context.

    Returns:
        ``{"conditions": [{"seed", "method", "ratio", "success", "by_context"}],
        "totals": {tag: {context: [successes, n]}}}``.

    Raises:
        RuntimeError: a re-run does not reproduce the recorded success rate, or a
            condition's checkpoint is not in the cache.
    """
    from cupid_engine.audit.config import AuditConfig
    from cupid_engine.audit.protocol import AuditRunner
    from cupid_engine.audit.sim_learner import make_learner

    config = AuditConfig.from_dict(dict(audit["config"]))
    learner = make_learner(config)
    runner = AuditRunner(config, learner)
    rows, totals = [], {}
    for c in sorted(audit["data"]["conditions"], key=lambda c: (c["seed"], c["method"], c["ratio"])):
        checkpoint = runner.cached_checkpoint(c["seed"], c["method"], c["ratio"])
        if checkpoint is None:
            raise RuntimeError(f"seed {c['seed']} {c['method']} @ {c['ratio']}: no checkpoint in {config.cache_dir}")
        eps = learner.evaluation_rollouts(checkpoint, c["seed"], c["rollouts"])
        success = float(np.mean([bool(e.success) for e in eps]))
        if success != c["success"]:
            raise RuntimeError(f"seed {c['seed']} {c['method']} @ {c['ratio']}: re-run success {success} "
                               f"differs from the recorded {c['success']}")
        ctx = by_context(eps)
        rows.append({"seed": c["seed"], "method": c["method"], "ratio": c["ratio"], "success": success,
                     "by_context": ctx})
        tag = _tag(c)
        for k, (won, n) in ctx.items():
            t = totals.setdefault(tag, {}).setdefault(k, [0, 0])
            t[0] += won
            t[1] += n
        print(f"seed {c['seed']} {tag}: {success:.2f} " + " ".join(f"{k} {w}/{n}" for k, (w, n) in ctx.items()),
              flush=True)
    return {"conditions": rows, "totals": totals}


def scenario_labels(audit: Mapping[str, Any], data: str | None) -> tuple[dict[str, str], str]:
    """``(episode id -> label, known-bad label)`` from ``data`` or the regenerated scenario."""
    from cupid_engine.sim.scenarios import LABEL_KEY, generate_scenario, get_scenario

    opts = audit["config"]["learner_options"]
    sc = get_scenario(opts["scenario"])
    if data is not None:
        from cupid_engine.data import open_dataset

        eps = list(open_dataset(data).episodes(split="train"))
    else:
        eps = generate_scenario(sc.name, demos=int(opts["demos"]), seed=int(opts.get("data_seed", 0)))
    return {e.episode_id: e.metadata[LABEL_KEY] for e in eps}, sc.known_bad


def _print(view: dict[str, Any]) -> None:
    print(f"known bad: {view['known_bad']} ({view['n_bad']} of {view['n']})")
    rules = list(view["mean_auroc"])
    tags = list(view["pruned_bad_total"])
    print("seed | " + " | ".join(f"AUROC {r}" for r in rules) + " | " + " | ".join(f"bad pruned {t}" for t in tags))
    for seed, v in view["seeds"].items():
        a = " | ".join(f"{v['auroc'][r]:.3f}" if r in v["auroc"] else "-" for r in rules)
        p = " | ".join("{}/{}".format(*v["pruned_bad"][t]) if t in v["pruned_bad"] else "-" for t in tags)
        print(f"{seed} | {a} | {p}")
    a = " | ".join(f"{view['mean_auroc'][r]:.3f}" for r in rules)
    p = " | ".join("{}/{}".format(*view["pruned_bad_total"][t]) for t in tags)
    print(f"all | {a} | {p}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("audit", help="audit.json written by `cupid-engine audit`")
    p.add_argument("--data", default=None, help="the audit's dataset (default: regenerate the scenario)")
    p.add_argument("--contexts", action="store_true",
                   help="re-run the evaluations from the audit's cache and split success by rollout context")
    p.add_argument("--json", default=None, help="write the view here")
    args = p.parse_args(argv)
    audit = json.loads(Path(args.audit).read_text())
    labels, known_bad = scenario_labels(audit, args.data)
    view = label_view(audit, labels, known_bad)
    _print(view)
    if args.contexts:
        view["contexts"] = context_view(audit)
        for tag, ctx in view["contexts"]["totals"].items():
            print(f"all seeds {tag}: " + " ".join(f"{k} {w}/{n}" for k, (w, n) in ctx.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(view, indent=1, sort_keys=True))
    return view


if __name__ == "__main__":
    main()
