"""Paired seed-level statistics for the pruning audit.

Every audit comparison reduces to one vector of paired per-seed deltas
``d_s = Y_s(method) - Y_s(comparator)`` (closed-loop success rates of two policies
trained on the same seed and evaluated on the same rollout seeds). This module computes
the complementary one-sided checks of the audit protocol on that vector:

* paired t-test (H1: mean > 0) -- parametric;
* Wilcoxon signed-rank test (one-sided, zeros dropped) -- rank-based;
* sign test (one-sided binomial on wins among non-zero deltas);
* sign-flip permutation test on the mean (exact enumeration when ``2**n`` does not
  exceed the draw budget, otherwise seeded Monte-Carlo draws);
* percentile bootstrap confidence interval of the mean (seeded);
* Cohen's ``d_z`` (mean / sd of the deltas);
* ``P(mu > 0)`` under a seed-level normal model.

They are robustness checks on one pre-specified paired claim, not separate discoveries,
so no multiple-testing correction is applied (as in the audit paper).

Degenerate inputs never raise: with ``n < 2`` every dispersion-based quantity is NaN and
every p-value is 1.0 (no evidence); with zero variance the t statistic and ``d_z`` are
``+inf``/``-inf`` by the sign of the mean (p = 0 / 1) and an all-zero vector gives
``t = d_z = 0`` and p = 1. The documented rules are in :func:`paired_summary`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np
from scipy import special as _special
from scipy import stats as _stats

_EXACT_WILCOXON_MAX_N = 20
"""Exact (enumerated) Wilcoxon null up to this many non-zero deltas; normal beyond."""

_PERM_CHUNK = 8192
"""Sign-flip draws per chunk, so that 50K draws of a long vector stay small in memory."""


def _rel_tol(d: np.ndarray) -> float:
    # Statistics computed by two different summation orders differ in the last bits;
    # a permuted statistic within this tolerance of the observed one counts as "as extreme".
    scale = float(np.max(np.abs(d))) if d.size else 0.0
    return 1e-9 * max(scale, 1e-300) * max(d.size, 1)


@dataclasses.dataclass(frozen=True)
class PairedStats:
    """Summary of one paired comparison (method minus comparator, per seed).

    Attributes:
        n: Number of paired seeds.
        mean: Mean delta.
        sd: Sample standard deviation of the deltas (ddof=1); NaN when ``n < 2``.
        median: Median delta (NaN when ``n == 0``).
        wins: Seeds with delta > 0.
        losses: Seeds with delta < 0.
        ties: Seeds with delta == 0 (dropped by the sign and Wilcoxon tests).
        t_stat: Paired t statistic ``mean / (sd / sqrt(n))``.
        df: Degrees of freedom of the t-test (``n - 1``).
        p_t: One-sided paired t-test p-value (H1: mean > 0).
        wilcoxon_stat: Sum of the ranks of the positive deltas (``W+``, zeros dropped).
        p_wilcoxon: One-sided Wilcoxon signed-rank p-value.
        wilcoxon_exact: Whether ``p_wilcoxon`` comes from full enumeration.
        p_sign: One-sided sign-test p-value ``P(Binom(wins + losses, 1/2) >= wins)``.
        p_perm: One-sided sign-flip permutation p-value of the mean.
        perm_exact: Whether ``p_perm`` enumerates all ``2**n`` sign patterns.
        perm_draws: Number of sign patterns evaluated (``2**n`` when exact).
        ci_low: Lower bound of the percentile bootstrap CI of the mean.
        ci_high: Upper bound of the percentile bootstrap CI of the mean.
        ci_level: Two-sided confidence level of the CI (``1 - alpha``).
        bootstrap: Number of bootstrap resamples.
        d_z: Cohen's ``d_z = mean / sd``.
        p_mu_pos: Posterior ``P(mu > 0)`` under the normal model with a flat prior.
        alpha: Significance level the summary was computed for.
        seed: Seed of the permutation and bootstrap streams.
    """

    n: int
    mean: float
    sd: float
    median: float
    wins: int
    losses: int
    ties: int
    t_stat: float
    df: int
    p_t: float
    wilcoxon_stat: float
    p_wilcoxon: float
    wilcoxon_exact: bool
    p_sign: float
    p_perm: float
    perm_exact: bool
    perm_draws: int
    ci_low: float
    ci_high: float
    ci_level: float
    bootstrap: int
    d_z: float
    p_mu_pos: float
    alpha: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (floats may be NaN/inf; see ``json_safe``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PairedStats":
        """Inverse of :meth:`to_dict` (also accepts the output of ``json_safe``)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            v = data[f.name]
            if f.type in ("float", float):
                v = _from_json_float(v)
            kwargs[f.name] = v
        return cls(**kwargs)


def json_safe(value: Any) -> Any:
    """Recursively map NaN to ``None`` and +-inf to ``"inf"``/``"-inf"`` for strict JSON."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def _from_json_float(v: Any) -> float:
    if v is None:
        return math.nan
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return float(v)


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the permutation and the bootstrap.

    Spawning from one SeedSequence means changing the number of permutation draws never
    changes the bootstrap resamples (and vice versa).
    """
    perm_ss, boot_ss = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(perm_ss), np.random.default_rng(boot_ss)


def paired_t(d: np.ndarray) -> tuple[float, int, float]:
    """One-sided paired t-test on deltas (H1: mean > 0).

    Args:
        d: ``[n]`` paired deltas.

    Returns:
        ``(t, df, p)``. Degenerate cases: ``n < 2`` gives ``(nan, max(n-1, 0), 1.0)``;
        zero variance gives ``t = +inf, p = 0`` if the mean is positive, ``t = -inf,
        p = 1`` if negative and ``t = 0, p = 1`` if all deltas are zero.
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n < 2:
        return math.nan, max(n - 1, 0), 1.0
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0.0 or sd < 1e-15 * max(abs(mean), 1e-300):
        if mean > 0:
            return math.inf, n - 1, 0.0
        if mean < 0:
            return -math.inf, n - 1, 1.0
        return 0.0, n - 1, 1.0
    t = mean / (sd / math.sqrt(n))
    return t, n - 1, float(_stats.t.sf(t, n - 1))


def _wilcoxon_exact_p(ranks: np.ndarray, w_obs: float) -> float:
    """``P(W+ >= w_obs)`` by enumerating every sign pattern of the given ranks.

    Exact under the null of symmetric deltas, including tied (mid-)ranks, which the
    classical integer-rank table does not cover.
    """
    n = ranks.size
    count = 0
    total = 0
    tol = 1e-9 * max(float(ranks.sum()), 1.0)
    # Enumerate in blocks of 2**min(n, 14) patterns to keep memory bounded at n = 20.
    block_bits = min(n, 14)
    low = ((np.arange(2**block_bits)[:, None] >> np.arange(block_bits)) & 1).astype(np.float64)
    low_sum = low @ ranks[:block_bits]
    rest = ranks[block_bits:]
    for high in itertools.product((0.0, 1.0), repeat=n - block_bits):
        offset = float(np.dot(high, rest)) if rest.size else 0.0
        count += int(np.count_nonzero(low_sum + offset >= w_obs - tol))
        total += low_sum.size
    return count / total


def wilcoxon_signed_rank(d: np.ndarray) -> tuple[float, float, bool]:
    """One-sided Wilcoxon signed-rank test (H1: deltas shifted above zero).

    Zero deltas are dropped (Wilcoxon's convention, as ``scipy.stats.wilcoxon`` with
    ``zero_method="wilcox"``); tied absolute values get mid-ranks. Up to
    20 non-zero deltas the null distribution of ``W+`` is enumerated exactly (this
    equals scipy's exact table when there are no ties); beyond, the normal
    approximation with tie-corrected variance and no continuity correction is used.

    Args:
        d: ``[n]`` paired deltas.

    Returns:
        ``(W+, p, exact)``; with no non-zero delta, ``(0.0, 1.0, True)``.
    """
    d = np.asarray(d, dtype=np.float64)
    nz = d[d != 0]
    m = nz.size
    if m == 0:
        return 0.0, 1.0, True
    ranks = _stats.rankdata(np.abs(nz))
    w_plus = float(ranks[nz > 0].sum())
    if m <= _EXACT_WILCOXON_MAX_N:
        return w_plus, _wilcoxon_exact_p(ranks, w_plus), True
    mean = m * (m + 1) / 4.0
    _, counts = np.unique(ranks, return_counts=True)
    var = m * (m + 1) * (2 * m + 1) / 24.0 - float((counts**3 - counts).sum()) / 48.0
    if var <= 0:
        return w_plus, 1.0, False
    z = (w_plus - mean) / math.sqrt(var)
    return w_plus, float(_stats.norm.sf(z)), False


def sign_test(d: np.ndarray) -> tuple[int, int, float]:
    """One-sided sign test: ``P(Binom(wins + losses, 1/2) >= wins)``, ties dropped.

    Returns:
        ``(wins, losses, p)``; with no non-zero delta, p = 1.
    """
    d = np.asarray(d, dtype=np.float64)
    wins = int(np.count_nonzero(d > 0))
    losses = int(np.count_nonzero(d < 0))
    m = wins + losses
    if m == 0:
        return wins, losses, 1.0
    return wins, losses, float(_stats.binom.sf(wins - 1, m, 0.5))


def sign_flip_permutation(
    d: np.ndarray, *, draws: int = 50_000, rng: np.random.Generator | None = None
) -> tuple[float, bool, int]:
    """One-sided sign-flip permutation test of the mean delta.

    Under H0 the method labels are exchangeable within a seed, so each delta's sign is
    a fair coin. When ``2**n <= draws`` all sign patterns are enumerated and
    ``p = #{patterns with mean >= observed} / 2**n`` (the identity included). Otherwise
    ``draws`` random patterns are drawn and ``p = (1 + #{>= observed}) / (1 + draws)``
    (the identity counted once, which keeps the Monte-Carlo p-value valid).

    Args:
        d: ``[n]`` paired deltas.
        draws: Monte-Carlo budget; also the enumeration threshold.
        rng: Generator for the Monte-Carlo draws (``default_rng(0)`` if None).

    Returns:
        ``(p, exact, patterns_evaluated)``; ``n == 0`` gives ``(1.0, True, 1)``.
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n == 0:
        return 1.0, True, 1
    obs = float(d.sum())
    tol = _rel_tol(d)
    if n < 63 and 2**n <= draws:
        signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        sums = signs @ d
        return float(np.count_nonzero(sums >= obs - tol)) / 2**n, True, 2**n
    rng = rng if rng is not None else np.random.default_rng(0)
    count = 0
    done = 0
    while done < draws:
        k = min(_PERM_CHUNK, draws - done)
        signs = rng.integers(0, 2, size=(k, n), dtype=np.int8) * 2 - 1
        count += int(np.count_nonzero(signs @ d >= obs - tol))
        done += k
    return (1.0 + count) / (1.0 + draws), False, draws


def bootstrap_ci(
    d: np.ndarray,
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    rng: np.random.Generator | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean delta.

    Draws ``idx = rng.integers(0, n, size=(resamples, n))`` in one call, takes the
    row means and returns their ``(1-level)/2`` and ``(1+level)/2`` quantiles
    (numpy's default linear interpolation).

    Returns:
        ``(low, high)``; ``n == 0`` gives NaNs and ``n == 1`` the single value twice.
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n == 0:
        return math.nan, math.nan
    if n == 1:
        return float(d[0]), float(d[0])
    rng = rng if rng is not None else np.random.default_rng(0)
    idx = rng.integers(0, n, size=(resamples, n))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def cohens_dz(d: np.ndarray) -> float:
    """Cohen's ``d_z = mean / sd`` (ddof=1) of paired deltas.

    NaN when ``n < 2``; with zero variance ``+-inf`` by the sign of the mean, 0 if
    all deltas are zero.
    """
    d = np.asarray(d, dtype=np.float64)
    if d.size < 2:
        return math.nan
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0.0 or sd < 1e-15 * max(abs(mean), 1e-300):
        return math.copysign(math.inf, mean) if mean != 0 else 0.0
    return mean / sd


def prob_mean_positive(d: np.ndarray) -> float:
    """Posterior ``P(mu > 0)`` under a normal seed-level model with a flat prior.

    Model: ``d_s ~ N(mu, sigma^2)`` i.i.d. with the reference prior
    ``p(mu, log sigma) ∝ 1``. The marginal posterior of ``mu`` is then
    ``mean + (sd / sqrt(n)) * t_{n-1}``, so ``P(mu > 0 | d) = T_{n-1}(mean / (sd /
    sqrt(n)))`` -- numerically ``1 - p_t`` of the one-sided t-test. We chose this
    prior because it adds no tuning knob and makes the Bayesian summary a
    descriptive restatement of the t-test in probability terms (as the audit
    paper uses it), rather than a separate, prior-driven piece of evidence.

    Returns:
        The probability; NaN when ``n < 2``; with zero variance 1, 0 or 0.5 by the sign
        of the mean.
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n < 2:
        return math.nan
    t, df, _ = paired_t(d)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if t == 0.0 and float(d.std(ddof=1)) == 0.0:
        return 0.5
    return float(_special.stdtr(df, t))


def paired_summary(
    d: Any,
    *,
    seed: int = 0,
    permutations: int = 50_000,
    bootstrap: int = 10_000,
    alpha: float = 0.05,
) -> PairedStats:
    """All paired statistics of the audit on one vector of per-seed deltas.

    Args:
        d: ``[n]`` deltas ``method - comparator``, one per paired seed (non-finite
            values raise).
        seed: Seed of the permutation and bootstrap generators (independent streams
            spawned from one ``SeedSequence``, see :func:`_streams`).
        permutations: Sign-flip draws; the test is exact when ``2**n <= permutations``.
        bootstrap: Bootstrap resamples for the ``1 - alpha`` percentile CI.
        alpha: Significance level; sets the CI level (two-sided ``1 - alpha``).

    Returns:
        A :class:`PairedStats`. Degenerate inputs: ``n == 0`` gives NaN location and
        p-values of 1; ``n == 1`` gives NaN sd, t, ``d_z`` and ``P(mu>0)``, p = 1 for
        the t-test, and a CI that collapses to the single delta.
    """
    arr = np.asarray(d, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError("paired deltas must be finite")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if permutations < 1 or bootstrap < 1:
        raise ValueError("permutations and bootstrap must be >= 1")
    n = arr.size
    perm_rng, boot_rng = _streams(seed)
    t, df, p_t = paired_t(arr)
    w, p_w, w_exact = wilcoxon_signed_rank(arr)
    wins, losses, p_sign = sign_test(arr)
    p_perm, perm_exact, perm_n = sign_flip_permutation(arr, draws=permutations, rng=perm_rng)
    lo, hi = bootstrap_ci(arr, resamples=bootstrap, level=1.0 - alpha, rng=boot_rng)
    return PairedStats(
        n=n,
        mean=float(arr.mean()) if n else math.nan,
        sd=float(arr.std(ddof=1)) if n >= 2 else math.nan,
        median=float(np.median(arr)) if n else math.nan,
        wins=wins,
        losses=losses,
        ties=n - wins - losses,
        t_stat=float(t),
        df=int(df),
        p_t=float(p_t),
        wilcoxon_stat=w,
        p_wilcoxon=float(p_w),
        wilcoxon_exact=bool(w_exact),
        p_sign=float(p_sign),
        p_perm=float(p_perm),
        perm_exact=bool(perm_exact),
        perm_draws=int(perm_n),
        ci_low=lo,
        ci_high=hi,
        ci_level=1.0 - alpha,
        bootstrap=int(bootstrap),
        d_z=cohens_dz(arr),
        p_mu_pos=prob_mean_positive(arr),
        alpha=float(alpha),
        seed=int(seed),
    )
