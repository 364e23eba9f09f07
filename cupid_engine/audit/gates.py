"""The four gates of the pruning audit and the decision table.

A pruning method is a deployment recommendation only if it passes gates 1-3; gate 4
explains what it prunes. The rules (all one-sided at ``alpha``, on paired per-seed
success-rate deltas; see :mod:`cupid_engine.audit.stats`):

Gate 1 -- matched random (primary seeds). ``d = method - random`` (same seed, same
    ratio). **Pass** iff ``n >= 2``, ``mean(d) > 0``, paired-t ``p < alpha``, sign-flip
    permutation ``p < alpha`` and the ``1 - alpha`` percentile bootstrap CI of the mean
    lies above 0. Requiring the parametric, the permutation and the bootstrap check keeps
    one heavy-tailed seed from carrying the claim. With ``n`` seeds the permutation p
    cannot fall below ``2**-n``; the reason says so when ``2**-n >= alpha`` (n <= 4 at
    alpha = 0.05), i.e. when the block is too small to pass at all.

Gate 2 -- cheap baselines (primary seeds). For each baseline ``b`` (length, loss,
    TracIn ...), ``d = method - b``. The method **loses to the trivial rule** ``b`` when
    ``mean(d) < -margin`` (the baseline has the higher mean success by more than the
    non-inferiority margin, 0 by default: a cheaper rule that does better on average is
    the better deployment choice, as in the audit paper's length result) or when the
    baseline is significantly better (paired t on ``b - method``, ``p < alpha``). It
    **beats** ``b`` when ``mean(d) > 0`` and the paired t on ``d`` gives ``p < alpha``;
    otherwise it **ties**. **Pass** iff at least one baseline was run, every baseline
    has paired seeds, and the method loses to none.

Gate 3 -- held-out block. ``d = method - random`` on the held-out seeds, with nothing
    changed. **Pass** iff ``n >= 2``, ``mean(d) > 0``, more wins than losses (direction
    replicates) and the paired-t ``p < alpha`` (significance replicates). The held-out
    block is usually small, so the parametric test is the only one that can reject
    there; no held-out seeds means the gate fails as "not evaluated".

Gate 4 -- mechanism (all seeds, descriptive). Mean Jaccard overlap between the method's
    pruned set and those of random and each baseline, mean length and tier composition
    of every pruned set, and the mean Spearman correlation between the method's scores
    and episode length. **Flag** ("mostly explained by length") when the Jaccard with
    the length rule's pruned set is ``>= length_jaccard_flag`` (0.7) or
    ``|Spearman(score, length)| >= length_spearman_flag`` (0.8). The flag does not
    change the verdict; it is reported beside it (gate "passes" when not flagged).

Decision per (method, ratio): **deploy** if gates 1, 2 and 3 pass; **candidate signal**
if gate 1 passes and gate 2 or 3 fails; **do not claim** if gate 1 fails.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from cupid_engine.audit.results import FULL, HELDOUT, LENGTH, PRIMARY, RANDOM, AuditData
from cupid_engine.audit.stats import PairedStats, json_safe, paired_summary, paired_t

DEPLOY = "deploy"
CANDIDATE = "candidate signal"
DO_NOT_CLAIM = "do not claim"
VERDICTS = (DEPLOY, CANDIDATE, DO_NOT_CLAIM)


@dataclasses.dataclass(frozen=True)
class GateParams:
    """Thresholds of the gates (taken from :class:`~cupid_engine.audit.protocol.AuditConfig`)."""

    alpha: float = 0.05
    permutations: int = 50_000
    bootstrap: int = 10_000
    stats_seed: int = 0
    noninferiority_margin: float = 0.0
    length_jaccard_flag: float = 0.7
    length_spearman_flag: float = 0.8

    @classmethod
    def from_config(cls, config: Any) -> "GateParams":
        """Pick the gate thresholds out of an ``AuditConfig`` (or any object with them)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class GateResult:
    """Outcome of one gate for one (method, ratio).

    Attributes:
        gate: 1-4.
        name: Short name.
        passed: Whether the gate passed (gate 4: not flagged).
        reason: The rule applied, in words and numbers.
        details: Machine-readable numbers behind the reason.
    """

    gate: int
    name: str
    passed: bool
    reason: str
    details: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Decision:
    """One row of the decision table."""

    method: str
    ratio: float
    verdict: str
    gates: tuple[GateResult, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))


@dataclasses.dataclass
class AuditResult:
    """Everything the report needs: config, raw data, paired comparisons, decisions.

    Attributes:
        config: ``AuditConfig.to_dict()``.
        data: Raw conditions.
        comparisons: One dict per (block, rule, comparator, ratio): seeds, success rates
            of both sides, and the :class:`PairedStats` as a dict.
        mechanism: ``ratio -> {"rules": {rule: composition}, "overlap": {method: {other: jaccard}},
            "spearman_length": {method: rho}}``.
        decisions: The decision table.
    """

    config: dict[str, Any]
    data: AuditData
    comparisons: list[dict[str, Any]]
    mechanism: dict[str, Any]
    decisions: list[Decision]

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-safe dict (written as ``audit.json``)."""
        return json_safe({
            "config": self.config,
            "data": self.data.to_dict(),
            "comparisons": self.comparisons,
            "mechanism": self.mechanism,
            "decisions": [dataclasses.asdict(d) for d in self.decisions],
        })

    def comparison(self, block: str, rule: str, comparator: str, ratio: float) -> dict[str, Any] | None:
        """The stored comparison, or None."""
        for c in self.comparisons:
            if (c["block"], c["rule"], c["comparator"]) == (block, rule, comparator) and abs(c["ratio"] - ratio) < 1e-12:
                return c
        return None


# ---------------------------------------------------------------------------- helpers
def _fmt_p(p: float) -> str:
    return "nan" if math.isnan(p) else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def _pp(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:+.1f}pp"


def _summary(data: AuditData, block: str, a: str, b: str, ratio: float, p: GateParams) -> tuple[dict, PairedStats]:
    seeds, ya, yb = data.paired(block, a, b, ratio)
    st = paired_summary(ya - yb, seed=p.stats_seed, permutations=p.permutations, bootstrap=p.bootstrap, alpha=p.alpha)
    rec = {
        "block": block, "rule": a, "comparator": b, "ratio": ratio, "seeds": seeds,
        "rule_success": ya.tolist(), "comparator_success": yb.tolist(), "stats": st.to_dict(),
    }
    return rec, st


def _stats_text(st: PairedStats) -> str:
    return (
        f"n={st.n}, mean {_pp(st.mean)}, {st.wins}/{st.n} wins, paired t p={_fmt_p(st.p_t)}, "
        f"permutation p={_fmt_p(st.p_perm)}, {100 * st.ci_level:.0f}% CI [{_pp(st.ci_low)}, {_pp(st.ci_high)}]"
    )


# ---------------------------------------------------------------------------- gates
def gate_random(st: PairedStats, p: GateParams) -> GateResult:
    """Gate 1: the method beats matched random pruning on the primary seeds."""
    checks = {
        "n>=2": st.n >= 2,
        "mean>0": st.n >= 1 and st.mean > 0,
        "p_t<alpha": st.p_t < p.alpha,
        "p_perm<alpha": st.p_perm < p.alpha,
        "ci_low>0": st.n >= 1 and st.ci_low > 0,
    }
    passed = all(checks.values())
    failed = [k for k, v in checks.items() if not v]
    reason = ("beats matched random: " if passed else f"fails ({', '.join(failed)}): ") + _stats_text(st)
    if st.n >= 1 and 2.0 ** (-st.n) >= p.alpha:
        reason += (f"; note: with {st.n} seeds the permutation p cannot go below 2^-{st.n} = "
                   f"{2.0 ** (-st.n):.3f} >= alpha, so this block is too small to pass")
    return GateResult(1, "matched random", passed, reason, {"checks": checks, "stats": st.to_dict()})


def gate_baselines(method: str, data: AuditData, ratio: float, baselines: list[str], p: GateParams) -> GateResult:
    """Gate 2: the method does not lose to any cheap baseline on the primary seeds."""
    rows = {}
    parts = []
    for b in baselines:
        seeds, ym, yb = data.paired(PRIMARY, method, b, ratio)
        d = ym - yb
        st = paired_summary(d, seed=p.stats_seed, permutations=p.permutations, bootstrap=p.bootstrap, alpha=p.alpha)
        p_worse = paired_t(-d)[2]
        if st.n == 0:
            status = "missing"
        elif st.mean < -p.noninferiority_margin or p_worse < p.alpha:
            status = "loses"
        elif st.mean > 0 and st.p_t < p.alpha:
            status = "beats"
        else:
            status = "ties"
        rows[b] = {"status": status, "mean_method": float(ym.mean()) if ym.size else math.nan,
                   "mean_baseline": float(yb.mean()) if yb.size else math.nan,
                   "p_method_better": st.p_t, "p_baseline_better": p_worse, "stats": st.to_dict()}
        parts.append(f"{status} {b} (mean {_pp(st.mean)}, {st.wins}/{st.n} wins, "
                     f"p(method>b)={_fmt_p(st.p_t)}, p(b>method)={_fmt_p(p_worse)})")
    if not rows:
        return GateResult(2, "cheap baselines", False, "no cheap baseline was run: not evaluated", {"baselines": {}})
    losers = [b for b, r in rows.items() if r["status"] == "loses"]
    missing = [b for b, r in rows.items() if r["status"] == "missing"]
    passed = not losers and not missing
    if passed:
        head = "competitive with every cheap baseline: "
    elif losers:
        head = f"loses to a trivial rule ({', '.join(losers)}): "
    else:
        head = f"not evaluated against {', '.join(missing)} (no paired seeds): "
    return GateResult(2, "cheap baselines", passed, head + "; ".join(parts),
                      {"baselines": rows, "margin": p.noninferiority_margin})


def gate_heldout(st: PairedStats | None, p: GateParams) -> GateResult:
    """Gate 3: direction and significance replicate on the held-out seeds."""
    if st is None or st.n == 0:
        return GateResult(3, "held-out block", False, "no held-out seeds: not evaluated", {"stats": None})
    checks = {
        "n>=2": st.n >= 2,
        "mean>0": st.mean > 0,
        "wins>losses": st.wins > st.losses,
        "p_t<alpha": st.p_t < p.alpha,
    }
    passed = all(checks.values())
    failed = [k for k, v in checks.items() if not v]
    reason = ("replicates on held-out seeds: " if passed else f"does not replicate ({', '.join(failed)}): ") + _stats_text(st)
    return GateResult(3, "held-out block", passed, reason, {"checks": checks, "stats": st.to_dict()})


def _jaccard(a: set, b: set) -> float:
    u = a | b
    return len(a & b) / len(u) if u else 1.0


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy import stats

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def mechanism(data: AuditData, ratio: float, methods: list[str], rules: list[str]) -> dict[str, Any]:
    """Gate-4 descriptives at one ratio over every seed of both blocks.

    Returns:
        ``{"rules": {rule: {n_pruned, mean_length_pruned, mean_length_all, tiers: {tier: count}}},
        "overlap": {method: {other: mean Jaccard}}, "spearman_length": {method: mean rho}}``.
    """
    info = data.info()
    all_len = float(np.mean(data.lengths)) if data.lengths else math.nan
    seeds = sorted({c.seed for c in data.conditions})
    comp: dict[str, Any] = {}
    for rule in [RANDOM] + rules:
        pruned = [e for s in seeds if (c := data.get(s, rule, ratio)) is not None for e in c.pruned]
        tiers: dict[str, int] = {}
        for e in pruned:
            t = info[e][1] or "unknown"
            tiers[t] = tiers.get(t, 0) + 1
        comp[rule] = {
            "n_pruned": len(pruned),
            "mean_length_pruned": float(np.mean([info[e][0] for e in pruned])) if pruned else math.nan,
            "mean_length_all": all_len,
            "tiers": tiers,
        }
    overlap: dict[str, dict[str, float]] = {}
    rho: dict[str, float] = {}
    ids = data.episode_ids
    lengths = np.asarray(data.lengths, dtype=np.float64)
    for m in methods:
        overlap[m] = {}
        for other in [RANDOM] + [r for r in rules if r != m]:
            vals = [
                _jaccard(set(cm.pruned), set(co.pruned))
                for s in seeds
                if (cm := data.get(s, m, ratio)) is not None and (co := data.get(s, other, ratio)) is not None
            ]
            overlap[m][other] = float(np.mean(vals)) if vals else math.nan
        rhos = [
            _spearman(np.asarray([data.scores[(s, m)][e] for e in ids]), lengths)
            for s in seeds if (s, m) in data.scores
        ]
        rhos = [r for r in rhos if not math.isnan(r)]
        rho[m] = float(np.mean(rhos)) if rhos else math.nan
    return {"rules": comp, "overlap": overlap, "spearman_length": rho}


def gate_mechanism(method: str, mech: dict[str, Any], p: GateParams) -> GateResult:
    """Gate 4: descriptive mechanism plus the "mostly explained by length" flag."""
    comp = mech["rules"]
    jl = mech["overlap"].get(method, {}).get(LENGTH, math.nan)
    rho = mech["spearman_length"].get(method, math.nan)
    flag = method != LENGTH and (
        (not math.isnan(jl) and jl >= p.length_jaccard_flag)
        or (not math.isnan(rho) and abs(rho) >= p.length_spearman_flag)
    )
    mine = comp.get(method, {})
    rnd = comp.get(RANDOM, {})
    tiers = ", ".join(f"{k} {v}" for k, v in sorted(mine.get("tiers", {}).items()))
    reason = (
        f"pruned {mine.get('n_pruned', 0)} episodes over all seeds ({tiers or 'no tiers'}), mean length "
        f"{mine.get('mean_length_pruned', math.nan):.1f} vs {rnd.get('mean_length_pruned', math.nan):.1f} for random "
        f"and {mine.get('mean_length_all', math.nan):.1f} overall; Jaccard with length rule "
        f"{'n/a' if math.isnan(jl) else f'{jl:.2f}'}, Spearman(score, length) "
        f"{'n/a' if math.isnan(rho) else f'{rho:+.2f}'}"
    )
    if flag:
        reason = "FLAG mostly explained by length: " + reason
    return GateResult(4, "mechanism", not flag, reason,
                      {"flag_length": flag, "jaccard_length": jl, "spearman_length": rho,
                       "overlap": mech["overlap"].get(method, {}), "composition": mine})


def decide(method: str, ratio: float, gates: tuple[GateResult, ...]) -> Decision:
    """Apply the decision table to gates 1-4 of one (method, ratio)."""
    g1, g2, g3, g4 = gates
    if not g1.passed:
        verdict = DO_NOT_CLAIM
        why = "gate 1 fails: no evidence the ranking beats deleting the same amount of data at random"
    elif g2.passed and g3.passed:
        verdict = DEPLOY
        why = "gates 1-3 pass: beats matched random, no cheap baseline does better, replicates on held-out seeds"
    else:
        verdict = CANDIDATE
        failed = [f"gate {g.gate} ({g.name})" for g in (g2, g3) if not g.passed]
        why = "gate 1 passes but " + " and ".join(failed) + " fail(s): report as a candidate signal, not a deployment"
    if not g4.passed:
        why += "; mechanism flag: the pruned set is mostly explained by episode length"
    return Decision(method, ratio, verdict, gates, why)


def evaluate_audit(data: AuditData, config: Any) -> AuditResult:
    """Compute every paired comparison, the four gates and the decision table.

    Args:
        data: Raw conditions from :meth:`AuditRunner.run_data` (or ``audit.json``).
        config: The :class:`~cupid_engine.audit.protocol.AuditConfig`.
    """
    p = GateParams.from_config(config)
    methods = list(config.methods)
    baselines = [b for b in config.baselines]
    rules = list(dict.fromkeys(methods + baselines))
    comparisons: list[dict[str, Any]] = []
    mech_all: dict[str, Any] = {}
    decisions: list[Decision] = []
    for ratio in data.ratios():
        for block in (PRIMARY, HELDOUT):
            if not data.seeds(block):
                continue
            for rule in rules:
                rec, _ = _summary(data, block, rule, RANDOM, ratio, p)
                comparisons.append(rec)
                rec, _ = _summary(data, block, rule, FULL, ratio, p)
                comparisons.append(rec)
        mech = mechanism(data, ratio, methods, rules)
        mech_all[repr(float(ratio))] = mech
        for m in methods:
            _, st1 = _summary(data, PRIMARY, m, RANDOM, ratio, p)
            st3 = _summary(data, HELDOUT, m, RANDOM, ratio, p)[1] if data.seeds(HELDOUT) else None
            gates = (
                gate_random(st1, p),
                gate_baselines(m, data, ratio, [b for b in baselines if b != m], p),
                gate_heldout(st3, p),
                gate_mechanism(m, mech, p),
            )
            decisions.append(decide(m, ratio, gates))
    return AuditResult(config.to_dict(), data, comparisons, mech_all, decisions)
