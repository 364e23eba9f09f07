"""Fidelity benchmark: do the scores find the demonstrations that make the robot fail?

Per known-answer scenario (:mod:`cupid_engine.sim.scenarios`): generate the 2:1
demonstrations (``lift-cue``, the spurious-correlate scenario: its three context subsets,
known-bad = the light/white/shallow half; rollouts then also report success per context,
``base_success_by_context``), train a behaviour-cloning policy on all of them, roll it out under the
scenario's shift, featurise demos and rollouts into a gradient store, score with every
scorer, and compare each ranking with the ground truth the scorers never see
(``scenario_label`` in the episode metadata):

* AUROC that the known-bad class (the brittle majority) scores lower than the rest,
  with a bootstrap 95% CI over demos;
* known-bad among the ``k`` lowest (``k`` = number of known-bad demos; chance
  ``k·n_bad/n``, perfect ``k``);
* full mode: the policy retrained on each scorer's kept set (the ``n - k`` highest) at
  the SAME optimiser-step budget as the base policy, its success under the shift, with
  the oracle (minority only) and a random kept set of the same size beside it, over
  training seeds, with Wilson 95% CIs.

``--quick`` runs everything at toy sizes (a few demos, a tiny policy, a handful of rollouts,
no retraining) to check that the pipeline runs; its numbers mean nothing. The recorded
full runs are in ``docs/fidelity.md``. Everything is cached under ``--work`` keyed by its
inputs, so an interrupted run resumes.

Example::

    cupid-engine bench fidelity --quick --json /tmp/fid.json
    cupid-engine bench fidelity --scenarios lift-grasp --demos 60 --rollouts 50 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cupid_engine.constants import DEFAULT_SCORER

DEFAULT_SCORERS = ("cupid", "cupid-step", "cupid-quality", "length", "random")
ACCEPT_AUROC = 0.85
ACCEPT_ORACLE_FRACTION = 0.8
# What the default must beat on a spurious-correlate scenario (issue #13): length, random and
# the other of the paper's two performance scorers (the default itself is dropped from the list).
SPURIOUS_BASELINES = ("length", "random", "cupid-quality", "cupid")


def _h(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _json_dump(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# metrics


def auroc(scores: np.ndarray, bad: np.ndarray) -> float:
    """P(score of a random good demo > score of a random bad demo); ties count 1/2."""
    s, b = np.asarray(scores, np.float64), np.asarray(bad, bool)
    pos, neg = s[~b], s[b]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv))
    # average ranks for ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(allv))
    r[order] = ranks
    rp = r[: len(pos)].sum()
    return float((rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _class_resample(rng: np.random.Generator, bad: np.ndarray) -> np.ndarray:
    """Bootstrap indices of the demos, resampled within each class (known-bad, then the rest)."""
    ib, ig = np.flatnonzero(bad), np.flatnonzero(~bad)
    return np.concatenate([rng.choice(ib, len(ib)), rng.choice(ig, len(ig))])


def auroc_ci(scores: np.ndarray, bad: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap (over demos, stratified by class) 95% CI of :func:`auroc`."""
    rng = np.random.default_rng(seed)
    s, b = np.asarray(scores, np.float64), np.asarray(bad, bool)
    vals = []
    for _ in range(n_boot):
        idx = _class_resample(rng, b)
        vals.append(auroc(s[idx], b[idx]))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


ROLLOUT_BOOTSTRAP_SCORERS = ("cupid", "cupid-quality")


def rollout_bootstrap(store: Any, ids: list[str], bad: np.ndarray, *, scorer: str = "cupid", n_boot: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """A scorer's AUROC with a 95% CI that resamples the scoring rollouts too.

    :func:`auroc_ci` resamples demos only, as if the m rollouts behind the score were fixed;
    but another draw of m rollouts gives another score (session 7 measured a seed's AUROC
    moving by up to 0.11 between two rollout sets of one policy). Both scorers here are
    means over rollouts of per-rollout terms, so each bootstrap draw resamples the rollouts
    with replacement and recomputes the score from them, then resamples the demos within
    class: for ``cupid`` u from the whitened rollout sums and outcomes (return baseline
    included); for ``cupid-quality`` also the rows of the per-(rollout, demo) max-min and
    min-max reductions, and the min-max normalisation of both terms.

    Args:
        store: Store path or reader (run ``base``), scored with the scorer's defaults.
        ids: ``[N]`` demo ids in the order of ``bad``.
        bad: ``[N]`` known-bad mask.
        scorer: One of :data:`ROLLOUT_BOOTSTRAP_SCORERS`.

    Returns:
        ``{"auroc": point estimate (equal to the scorer's), "ci95": [lo, hi],
        "ci95_demos_only": [lo, hi], "rollouts": m}``.
    """
    import logging

    from cupid_engine.scorers.cupid import CupidConfig, cupid_scores, performance_inputs, rollout_direction
    from cupid_engine.scorers.quality import CupidQualityConfig, CupidQualityScorer, combine_quality
    from cupid_engine.store import open_store

    if scorer not in ROLLOUT_BOOTSTRAP_SCORERS:
        raise ValueError(f"rollout_bootstrap supports {ROLLOUT_BOOTSTRAP_SCORERS}, not {scorer!r}")
    st = open_store(str(store)) if isinstance(store, (str, os.PathLike)) else store
    cfg = CupidConfig() if scorer == "cupid" else CupidQualityConfig()
    run, _, pre, rollouts, demos, ret = performance_inputs(st, "base", cfg)
    s_r = pre.whiten(run.episode_features(rollouts)).double()
    pos = {e: i for i, e in enumerate(demos)}
    order = [pos[e] for e in ids]
    s_d = pre.whiten(run.episode_features(demos)).double()
    if scorer == "cupid-quality":
        q_ids, maxmin, minmax = CupidQualityScorer(cfg).reductions(st, "base")
        assert q_ids == demos

    def scores(j: np.ndarray) -> np.ndarray:
        perf = cupid_scores(s_d, rollout_direction(s_r[j], ret[j], baseline=cfg.baseline))
        if scorer == "cupid-quality":
            perf = combine_quality(perf, maxmin[j], minmax[j], alpha=cfg.alpha, weighting=cfg.weighting)
        return perf[order]

    b = np.asarray(bad, bool)
    point = scores(np.arange(len(rollouts)))
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    quiet = logging.getLogger("cupid_engine.scorers.cupid")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a one-outcome resample would log its b = 0 once per draw
    try:
        for i in range(n_boot):
            x = scores(rng.integers(0, len(rollouts), len(rollouts)))
            d = _class_resample(rng, b)
            vals[i] = auroc(x[d], b[d])
    finally:
        quiet.setLevel(level)
    return {"auroc": auroc(point, b), "ci95": [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))],
            "ci95_demos_only": list(auroc_ci(point, b, n_boot=n_boot, seed=seed)), "rollouts": len(rollouts)}


def paired_auroc_difference(a: list[np.ndarray], b: list[np.ndarray], bad: np.ndarray, *, n_boot: int = 2000,
                            seed: int = 0) -> dict[str, Any]:
    """Mean over seeds of AUROC(a) − AUROC(b) with a paired bootstrap 95% CI: demos are
    resampled (within class, per seed) and the same resample scores both scorers.

    Args:
        a, b: Per seed, ``[N]`` scores of the two scorers (same demos, same order).
        bad: ``[N]`` known-bad mask.
    """
    rng = np.random.default_rng(seed)
    bad = np.asarray(bad, bool)
    diff = float(np.mean([auroc(x, bad) - auroc(y, bad) for x, y in zip(a, b)]))
    vals = np.empty(n_boot)
    for i in range(n_boot):
        tot = 0.0
        for x, y in zip(a, b):
            idx = _class_resample(rng, bad)
            tot += auroc(np.asarray(x)[idx], bad[idx]) - auroc(np.asarray(y)[idx], bad[idx])
        vals[i] = tot / len(a)
    return {"mean_difference": diff, "ci95": [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]}


def removed_bad(scores: np.ndarray, bad: np.ndarray, k: int, *, seed: int = 0) -> int:
    """Known-bad demos among the ``k`` lowest scores (ties broken by a seeded permutation)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(scores))
    order = perm[np.argsort(np.asarray(scores)[perm], kind="stable")]
    return int(np.asarray(bad, bool)[order[:k]].sum())


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a binomial rate."""
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.96, successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


# ---------------------------------------------------------------------------------------
# pipeline pieces (cached under the work folder)


class Pipeline:
    """Datasets, policies, rollouts and stores for one scenario, cached under ``work``."""

    def __init__(self, work: Path, scenario: str, *, demos: int, data_seed: int, policy: dict, feature: dict):
        from cupid_engine.sim.scenarios import get_scenario

        self.sc = get_scenario(scenario)
        self.work = Path(work) / scenario
        self.work.mkdir(parents=True, exist_ok=True)
        self.demos, self.data_seed = int(demos), int(data_seed)
        self.policy_opts, self.feature_opts = dict(policy), dict(feature)
        self._episodes: list | None = None

    # data
    @property
    def dataset(self) -> Path:
        return self.work / f"demos-n{self.demos}-s{self.data_seed}"

    def episodes(self) -> list:
        from cupid_engine.data import open_dataset, write_dataset
        from cupid_engine.sim.scenarios import generate_scenario

        if self._episodes is None:
            if not (self.dataset / "meta" / "info.json").exists():
                write_dataset(
                    self.dataset, generate_scenario(self.sc.name, demos=self.demos, seed=self.data_seed), overwrite=True
                )
            self._episodes = list(open_dataset(self.dataset).episodes(split="train"))
        return self._episodes

    def labels(self) -> tuple[list[str], np.ndarray]:
        """``(ids, [N] bool known-bad)`` from the ground-truth metadata (benchmark side only)."""
        from cupid_engine.sim.scenarios import LABEL_KEY

        eps = self.episodes()
        return [e.episode_id for e in eps], np.array([e.metadata[LABEL_KEY] == self.sc.known_bad for e in eps])

    # policies
    def _policy_config(self):
        from cupid_engine.policies.registry import POLICIES

        o = dict(self.policy_opts)
        kind = o.pop("type", "mlp")
        o.pop("steps", None), o.pop("batch_size", None), o.pop("lr", None)
        cls = POLICIES[kind][0]
        # The scenario's keys: the task's vector, plus the cue keys of a context scenario.
        return cls(**o).replace(obs_keys=tuple(self.sc.obs_keys))

    def train(self, ids: list[str], seed: int) -> Path:
        """Policy trained on ``ids`` at the fixed step budget; cached by (ids, seed, options)."""
        from cupid_engine.policies import TrainConfig, save_policy, train_policy

        key = _h({"ids": sorted(ids), "seed": seed, "policy": self.policy_opts, "data": str(self.dataset)})
        out = self.work / "policies" / key
        if (out / "policy" / "done").exists():
            return out / "policy"
        keep = set(ids)
        eps = [e for e in self.episodes() if e.episode_id in keep]
        tc = TrainConfig(
            steps=int(self.policy_opts.get("steps", 3000)),
            batch_size=int(self.policy_opts.get("batch_size", 256)),
            lr=float(self.policy_opts.get("lr", 1e-3)),
            seed=int(seed),
        )
        pol = train_policy(self._policy_config(), eps, tc, progress=False)
        save_policy(pol, out / "policy")
        (out / "policy" / "done").write_text(json.dumps({"n": len(eps), "seed": seed}))
        return out / "policy"

    # rollouts
    def rollouts(self, policy: Path, *, n: int, seed: int, shifted: bool = True) -> Path:
        """``n`` rollouts of ``policy`` (under the shift when ``shifted``), as a dataset."""
        from cupid_engine.data import write_dataset
        from cupid_engine.sim import run_rollouts
        from cupid_engine.sim.scenarios import rollout_options

        out = Path(policy).parent / f"rollouts-n{n}-s{seed}-{'shift' if shifted else 'train'}"
        if (out / "meta" / "info.json").exists():
            return out
        eps = run_rollouts(str(policy), self.sc.task, episodes=n, seed=seed, **rollout_options(self.sc.name, shifted=shifted))
        write_dataset(out, eps, overwrite=True)
        return out

    @staticmethod
    def success(rollouts: Path) -> tuple[int, int]:
        from cupid_engine.data import open_dataset

        eps = list(open_dataset(rollouts).episodes())
        return int(sum(bool(e.success) for e in eps)), len(eps)

    @staticmethod
    def success_by_context(rollouts: Path) -> dict[str, tuple[int, int]] | None:
        """Context scenarios: ``{"heavy": (s, n), "light": (s, n)}`` from each rollout's
        ``env_knobs``; None for rollouts without a context."""
        from cupid_engine.data import open_dataset

        out: dict[str, list[int]] = {}
        for e in open_dataset(rollouts).episodes():
            knobs = e.metadata.get("env_knobs") or {}
            if "context_heavy" not in knobs:
                return None
            c = out.setdefault("heavy" if knobs["context_heavy"] else "light", [0, 0])
            c[0] += bool(e.success)
            c[1] += 1
        return {k: (v[0], v[1]) for k, v in sorted(out.items())}

    # features
    def store(self, policy: Path, rollouts: Path) -> Path:
        """Gradient store (run ``base``) of the demos and ``rollouts`` under ``policy``."""
        from cupid_engine.data import open_dataset
        from cupid_engine.featurize import FeaturizeConfig, ProjectionConfig, featurize
        from cupid_engine.store import GradientStore

        fo = self.feature_opts
        root = Path(rollouts).parent / f"store-{_h([fo, str(rollouts)])}"
        if (root / "done").exists():
            return root / "store.zarr"
        root.mkdir(parents=True, exist_ok=True)
        store = GradientStore.create(str(root / "store.zarr"), overwrite=True)
        cfg = FeaturizeConfig(
            output=fo.get("output", "energy"),
            draws=int(fo.get("draws", 16)),
            projection=ProjectionConfig(method=fo.get("method", "tensorsketch"), k=int(fo.get("k", 1024))),
        )
        featurize(open_dataset(self.dataset), store, "base", policy=str(policy), config=cfg, split="train", progress=False)
        featurize(open_dataset(rollouts), store, "base", policy=str(policy), config=cfg, progress=False)
        (root / "done").write_text("ok")
        return root / "store.zarr"


def score_store(store: Path, scorers: list[str], ids: list[str], seed: int) -> dict[str, np.ndarray]:
    """``scorer -> [N]`` scores aligned with ``ids``."""
    import cupid_engine as ce

    out = {}
    for name in scorers:
        opts: dict[str, Any] = {}
        if name == "qoq":
            opts["validation"] = "failed-rollouts"
        if name == "random":
            opts["seed"] = seed
        try:
            table = ce.score(name, store=str(store), run="base", **opts)
        except ValueError as e:  # e.g. a contrast with no successful rollout: recorded, never hidden
            print(f"  scorer {name} cannot score this store: {e}", flush=True)
            out[name] = str(e)
            continue
        m = dict(zip(table.column("episode_id").to_pylist(), table.column("score").to_pylist()))
        out[name] = np.array([m[i] for i in ids], np.float64)
    return out


# ---------------------------------------------------------------------------------------
# the benchmark


def policy_and_features(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The policy and feature options of ``args`` (these dicts are part of every cache key)."""
    if args.policy == "mlp":
        policy = {"type": "mlp", "hidden_sizes": tuple(args.hidden), "steps": args.steps, "batch_size": args.batch_size,
                  "horizon": args.chunk, "n_action_steps": args.action_steps or args.chunk}
        feature = {"output": args.output or "energy", "k": args.k, "method": "tensorsketch"}
    else:  # diffusion: the paper's policy class, which commits to one mode per query
        chunk = 16 if args.chunk == 1 else args.chunk
        policy = {"type": "diffusion", "steps": args.steps, "batch_size": args.batch_size, "horizon": chunk,
                  "n_action_steps": args.action_steps or chunk // 2, "n_obs_steps": args.obs_steps}
        feature = {"output": args.output or "square", "k": args.k, "method": "tensorsketch", "draws": args.draws}
        if getattr(args, "quick", False):
            policy["down_dims"] = (8, 16)
    return policy, feature


def run_scenario(args: argparse.Namespace, scenario: str, log) -> dict[str, Any]:
    policy, feature = policy_and_features(args)
    pl = Pipeline(Path(args.work), scenario, demos=args.demos, data_seed=args.data_seed, policy=policy, feature=feature)
    t0 = time.time()
    ids, bad = pl.labels()
    k = int(bad.sum())
    n = len(ids)
    seeds = [int(s) for s in args.seeds.split(",")]
    res: dict[str, Any] = {
        "scenario": scenario,
        "kind": pl.sc.kind,
        "description": pl.sc.description,
        "demos": n,
        "known_bad": int(bad.sum()),
        "k": k,
        "chance_removed_bad": k * int(bad.sum()) / n,
        "policy": policy,
        "features": feature,
        "rollouts": args.rollouts,
        "seeds": seeds,
        "per_seed": [],
    }
    good_ids = [i for i, b in zip(ids, bad) if not b]
    per_seed_scores: list[dict[str, Any]] = []
    for seed in seeds:
        base = pl.train(ids, seed)
        r_score = pl.rollouts(base, n=args.rollouts, seed=1000 + seed)
        s_base = pl.success(r_score)
        by_ctx = pl.success_by_context(r_score)
        log(f"[{scenario} seed {seed}] base policy under shift: {s_base[0]}/{s_base[1]}"
            + (f" by context {by_ctx}" if by_ctx else "") + f" ({time.time() - t0:.0f}s)")
        store = pl.store(base, r_score)
        scores = score_store(store, list(args.scorers), ids, seed)
        per_seed_scores.append(scores)
        row: dict[str, Any] = {"seed": seed, "base_success_scoring_rollouts": s_base, "scorers": {}}
        if by_ctx:
            row["base_success_by_context"] = by_ctx
        for name, s in scores.items():
            if isinstance(s, str):
                row["scorers"][name] = {"auroc": float("nan"), "auroc_ci": [float("nan")] * 2, "removed_bad": None,
                                        "error": s}
                continue
            a = auroc(s, bad)
            lo, hi = auroc_ci(s, bad, seed=seed)
            row["scorers"][name] = {"auroc": a, "auroc_ci": [lo, hi], "removed_bad": removed_bad(s, bad, k, seed=seed)}
            log(f"[{scenario} seed {seed}] {name:14s} AUROC {a:.3f} [{lo:.2f}, {hi:.2f}]  removed-bad {row['scorers'][name]['removed_bad']}/{k}")
        for name in ROLLOUT_BOOTSTRAP_SCORERS:
            if isinstance(scores.get(name), (str, type(None))):
                continue
            boot = rollout_bootstrap(store, ids, bad, scorer=name, seed=seed)
            row["scorers"][name]["auroc_ci_demos_and_rollouts"] = boot["ci95"]
            log(f"[{scenario} seed {seed}] {name} AUROC CI resampling demos and the {boot['rollouts']} rollouts: "
                f"[{boot['ci95'][0]:.2f}, {boot['ci95'][1]:.2f}]")
        if not args.quick:
            evals = {}
            kept_sets = {"all": ids, "oracle": good_ids}
            curate = set(args.curate.split(",")) if args.curate else set(scores)
            if curate != {"none"}:  # "none": all data vs oracle only (attribution rows + the scenario's gap)
                rng = np.random.default_rng(seed)
                kept_sets["random"] = list(rng.choice(ids, n - k, replace=False))
            for name, s in scores.items():
                if name == "random" or isinstance(s, str) or name not in curate:
                    continue
                order = np.argsort(-s, kind="stable")
                kept_sets[name] = [ids[i] for i in order[: n - k]]
            for name, kept in kept_sets.items():
                pol = base if name == "all" else pl.train(kept, seed)
                ev = pl.rollouts(pol, n=args.rollouts, seed=5000 + seed)
                evals[name] = pl.success(ev)
                ctx = pl.success_by_context(ev)
                if ctx:
                    row.setdefault("curated_success_by_context", {})[name] = ctx
                log(f"[{scenario} seed {seed}] retrained on {name:14s} ({len(kept)} demos): {evals[name][0]}/{evals[name][1]}"
                    + (f" by context {ctx}" if ctx else ""))
            row["curated_success"] = evals
        res["per_seed"].append(row)
    # The default against every other scorer, paired over the same demos and seeds.
    ref = args.default_scorer
    if all(not isinstance(sc.get(ref), (str, type(None))) for sc in per_seed_scores):
        res["paired_vs_default"] = {
            name: paired_auroc_difference([sc[ref] for sc in per_seed_scores], [sc[name] for sc in per_seed_scores],
                                          bad, seed=0)
            for name in per_seed_scores[0]
            if name != ref and all(not isinstance(sc.get(name), (str, type(None))) for sc in per_seed_scores)
        }
        for name, d in res["paired_vs_default"].items():
            log(f"[{scenario}] {ref} − {name}: AUROC {d['mean_difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    res["seconds"] = time.time() - t0
    return res


def summarise(results: list[dict[str, Any]], default_scorer: str) -> dict[str, Any]:
    """Pooled tables and the acceptance block."""
    acc = []
    for r in results:
        for name in r["per_seed"][0]["scorers"]:
            aucs = [s["scorers"][name]["auroc"] for s in r["per_seed"]]
            rb = [np.nan if s["scorers"][name]["removed_bad"] is None else s["scorers"][name]["removed_bad"]
                  for s in r["per_seed"]]
            r.setdefault("summary", {})[name] = {"auroc_mean": float(np.mean(aucs)), "removed_bad_mean": float(np.mean(rb))}
        if "curated_success" in r["per_seed"][0]:
            pooled = {}
            for name in r["per_seed"][0]["curated_success"]:
                s = sum(p["curated_success"][name][0] for p in r["per_seed"])
                t = sum(p["curated_success"][name][1] for p in r["per_seed"])
                pooled[name] = {"success": s, "n": t, "rate": s / t if t else float("nan"), "ci95": wilson(s, t)}
            r["curated_pooled"] = pooled
        summ = r.get("summary", {}).get(default_scorer)
        if summ is not None:
            row = {
                "scenario": r["scenario"],
                "scorer": default_scorer,
                "auroc": summ["auroc_mean"],
                "auroc_pass": summ["auroc_mean"] >= ACCEPT_AUROC,
            }
            if r.get("kind") == "spurious":  # issue #13: beat length, random and the other performance scorer there
                wanted = [b for b in SPURIOUS_BASELINES if b != default_scorer]
                base = {b: r["summary"][b]["auroc_mean"] for b in wanted if b in r["summary"]}
                row["baselines_auroc"] = base
                row["beats_baselines"] = (len(base) == len(wanted)
                                          and all(summ["auroc_mean"] > v for v in base.values()))
                paired = r.get("paired_vs_default", {})
                # Beating a baseline beyond noise: the paired 95% CI of the difference above 0.
                row["beats_baselines_significantly"] = (
                    all(b in paired for b in wanted) and all(paired[b]["ci95"][0] > 0 for b in wanted))
            if "curated_pooled" in r and default_scorer in r["curated_pooled"]:
                cur, ora = r["curated_pooled"][default_scorer]["rate"], r["curated_pooled"]["oracle"]["rate"]
                row.update({"curated": cur, "oracle": ora, "oracle_fraction": cur / ora if ora else float("nan")})
                row["curated_pass"] = bool(ora and cur / ora >= ACCEPT_ORACLE_FRACTION)
            acc.append(row)
    return {"acceptance": acc, "criteria": {"auroc": ACCEPT_AUROC, "oracle_fraction": ACCEPT_ORACLE_FRACTION}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cupid_engine.sim.scenarios import SCENARIOS

    p.add_argument("--quick", action="store_true", help="toy sizes, no retraining (checks the pipeline only)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenario names")
    p.add_argument("--scorers", default=",".join(DEFAULT_SCORERS), help="comma-separated scorer names")
    p.add_argument("--curate", default=None,
                   help="full mode: comma-separated scorers whose kept sets are retrained and rolled out (default: "
                   "every scorer; each costs one training per seed, the others get AUROC and removed-bad only); "
                   "'none': retrain nothing but the oracle (no random set either)")
    p.add_argument("--default-scorer", default=DEFAULT_SCORER,
                   help=f"scorer the acceptance rows judge (default: the project default, {DEFAULT_SCORER})")
    p.add_argument("--demos", type=int, default=60, help="demonstrations per scenario (split by its ratio)")
    p.add_argument("--rollouts", type=int, default=50, help="rollouts per condition (scoring and evaluation)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (paired across conditions)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps of EVERY policy (fixed budget)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--policy", choices=("mlp", "diffusion"), default="diffusion",
                   help="policy class: diffusion (UNet, DDIM; picks one mode per query, as the paper's) or a "
                   "deterministic MLP (regresses to the mean of the modes)")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256, 256], help="MLP widths")
    p.add_argument("--obs-steps", type=int, default=2, help="diffusion observation window")
    p.add_argument("--draws", type=int, default=16, help="diffusion (t, noise) draws per sample when featurising")
    p.add_argument("--chunk", type=int, default=1, help="action-chunk length (policy horizon; 1 means 16 for diffusion)")
    p.add_argument("--action-steps", type=int, default=None, help="actions executed per query (default: --chunk)")
    p.add_argument("--output", default=None, help="featuriser output function (default: energy for mlp, square "
                   "for diffusion)")
    p.add_argument("--k", type=int, default=1024, help="projection size")
    p.add_argument("--work", default=None, help="cache folder (default: a temporary folder for --quick, "
                   "/work/scratch/fidelity/bench otherwise)")
    p.add_argument("--json", default=None, help="write the results here")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_fidelity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    if args.quick:
        args.demos, args.rollouts, args.seeds = min(args.demos, 6), min(args.rollouts, 3), args.seeds.split(",")[0]
        args.steps, args.hidden, args.k, args.draws = min(args.steps, 30), [16], min(args.k, 64), min(args.draws, 2)
    if isinstance(args.scorers, str):
        args.scorers = [s for s in args.scorers.split(",") if s]
    tmp = None
    if args.work is None:
        if args.quick:
            tmp = tempfile.TemporaryDirectory(prefix="cupid-fidelity-")
            args.work = tmp.name
        else:
            args.work = os.environ.get("CUPID_FIDELITY_WORK", "/work/scratch/fidelity/bench")

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        results = [run_scenario(args, s.strip(), log) for s in args.scenarios.split(",") if s.strip()]
    finally:
        if tmp is not None:
            tmp.cleanup()
    out = {"benchmark": "fidelity", "quick": bool(args.quick), "results": results}
    out.update(summarise(results, args.default_scorer))
    for row in out["acceptance"]:
        log("acceptance " + json.dumps(row, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    run(build_parser().parse_args())
