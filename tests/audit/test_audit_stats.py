"""Every paired statistic against scipy, brute-force enumeration or a closed form."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from cupid_engine.audit import stats as S

VECTORS = {
    "paper_like_10": [0.05, 0.08, -0.01, 0.1, 0.03, 0.06, 0.02, 0.09, 0.04, 0.013],
    "odd_7": [0.3, -0.1, 0.25, 0.05, 0.4, -0.2, 0.12],
    "negative_5": [-0.1, -0.3, 0.05, -0.2, -0.15],
    "two": [0.1, 0.3],
}


@pytest.mark.parametrize("name", list(VECTORS), ids=list(VECTORS))
def test_paired_t_matches_scipy(name):
    d = np.asarray(VECTORS[name])
    t, df, p = S.paired_t(d)
    ref = stats.ttest_1samp(d, 0.0, alternative="greater")
    assert t == pytest.approx(ref.statistic, rel=1e-12)
    assert df == d.size - 1
    assert p == pytest.approx(ref.pvalue, rel=1e-10)
    # Same test written as paired samples (method, comparator).
    comparator = np.linspace(0.2, 0.6, d.size)
    ref_rel = stats.ttest_rel(comparator + d, comparator, alternative="greater")
    assert p == pytest.approx(ref_rel.pvalue, rel=1e-8)


@pytest.mark.parametrize("name", list(VECTORS), ids=list(VECTORS))
def test_posterior_is_student_t_cdf(name):
    d = np.asarray(VECTORS[name])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    assert S.prob_mean_positive(d) == pytest.approx(stats.t.cdf(t, d.size - 1), rel=1e-10)
    assert S.prob_mean_positive(d) == pytest.approx(1.0 - S.paired_t(d)[2], abs=1e-12)


@pytest.mark.parametrize("n", [5, 9, 13], ids=lambda n: f"n{n}")
def test_wilcoxon_exact_matches_scipy_without_ties(n, rng):
    d = rng.normal(0.3, 1.0, n)
    w, p, exact = S.wilcoxon_signed_rank(d)
    ref = stats.wilcoxon(d, alternative="greater", method="exact")
    assert exact
    assert w == pytest.approx(ref.statistic)
    assert p == pytest.approx(ref.pvalue, rel=1e-10)


def test_wilcoxon_with_ties_and_zeros_matches_exact_permutation():
    d = np.array([0.1, -0.1, 0.2, 0.2, 0.0, 0.3, -0.05, 0.1])
    w, p, exact = S.wilcoxon_signed_rank(d)
    nz = d[d != 0]
    ranks = stats.rankdata(np.abs(nz))
    obs = ranks[nz > 0].sum()
    # Brute force: every sign pattern of the mid-ranks is equally likely under H0.
    null = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=nz.size)]
    assert exact and w == pytest.approx(obs)
    assert p == pytest.approx(np.mean(np.asarray(null) >= obs - 1e-12), rel=1e-12)
    ref = stats.wilcoxon(d, alternative="greater", zero_method="wilcox",
                         method=stats.PermutationMethod(n_resamples=10**6))
    assert p == pytest.approx(ref.pvalue, rel=1e-9)


def test_wilcoxon_large_n_matches_scipy_normal_approximation(rng):
    d = np.round(rng.normal(0.1, 1.0, 40), 1)  # rounding creates ties
    d = d[d != 0]
    w, p, exact = S.wilcoxon_signed_rank(d)
    ref = stats.wilcoxon(d, alternative="greater", method="approx", correction=False)
    assert not exact
    assert p == pytest.approx(ref.pvalue, rel=1e-9)


@pytest.mark.parametrize("d", [[1, 1, 1, -1, 0, 1], [0.2, -0.1, -0.3], [1] * 9 + [-1]], ids=["ties", "mostly_neg", "9of10"])
def test_sign_test_matches_binomtest(d):
    wins, losses, p = S.sign_test(np.asarray(d, dtype=float))
    assert p == pytest.approx(stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue, rel=1e-12)


def test_sign_test_paper_value():
    # The audit paper: 9/10 wins, one-sided sign test p = 0.011 = 11/1024.
    assert S.sign_test(np.array([1.0] * 9 + [-1.0]))[2] == pytest.approx(11 / 1024)


@pytest.mark.parametrize("name", ["paper_like_10", "odd_7", "negative_5"])
def test_permutation_exact_matches_enumeration(name):
    d = np.asarray(VECTORS[name])
    p, exact, draws = S.sign_flip_permutation(d, draws=50_000)
    sums = [np.dot(s, d) for s in itertools.product([1.0, -1.0], repeat=d.size)]
    assert exact and draws == 2**d.size
    assert p == pytest.approx(np.mean(np.asarray(sums) >= d.sum() - 1e-12), rel=1e-12)


def test_permutation_monte_carlo_is_seeded_and_close_to_exact(rng):
    d = rng.normal(0.2, 1.0, 18)
    p_exact, exact, _ = S.sign_flip_permutation(d, draws=2**18)
    assert exact
    p1, ex1, n1 = S.sign_flip_permutation(d, draws=20_000, rng=np.random.default_rng(3))
    p2, _, _ = S.sign_flip_permutation(d, draws=20_000, rng=np.random.default_rng(3))
    assert not ex1 and n1 == 20_000 and p1 == p2
    assert abs(p1 - p_exact) < 4 * math.sqrt(p_exact * (1 - p_exact) / 20_000) + 1e-4


def test_bootstrap_matches_direct_numpy():
    d = np.asarray(VECTORS["paper_like_10"])
    s = S.paired_summary(d, seed=7, bootstrap=5000, permutations=1000, alpha=0.1)
    # Documented stream: second child of SeedSequence(seed); one integers() call.
    rng = np.random.default_rng(np.random.SeedSequence(7).spawn(2)[1])
    means = d[rng.integers(0, d.size, size=(5000, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.05, 0.95])
    assert (s.ci_low, s.ci_high) == (pytest.approx(lo, abs=1e-15), pytest.approx(hi, abs=1e-15))
    assert s.ci_level == pytest.approx(0.9)


def test_summary_closed_forms_and_to_dict():
    d = np.asarray(VECTORS["odd_7"])
    s = S.paired_summary(d, seed=1)
    assert s.n == 7 and (s.wins, s.losses, s.ties) == (5, 2, 0)
    assert s.mean == pytest.approx(d.mean()) and s.median == pytest.approx(np.median(d))
    assert s.d_z == pytest.approx(d.mean() / d.std(ddof=1))
    assert s.perm_exact and s.perm_draws == 128
    assert S.PairedStats.from_dict(S.json_safe(s.to_dict())) == s


def test_degenerate_inputs_do_not_crash():
    s0 = S.paired_summary([])
    assert s0.n == 0 and math.isnan(s0.mean) and s0.p_t == s0.p_perm == s0.p_sign == s0.p_wilcoxon == 1.0
    s1 = S.paired_summary([0.2])
    assert math.isnan(s1.sd) and math.isnan(s1.t_stat) and math.isnan(s1.d_z) and math.isnan(s1.p_mu_pos)
    assert s1.p_t == 1.0 and s1.ci_low == s1.ci_high == 0.2
    pos = S.paired_summary([0.1, 0.1, 0.1])
    assert pos.t_stat == math.inf and pos.p_t == 0.0 and pos.d_z == math.inf and pos.p_mu_pos == 1.0
    neg = S.paired_summary([-0.1, -0.1])
    assert neg.t_stat == -math.inf and neg.p_t == 1.0 and neg.p_mu_pos == 0.0
    zero = S.paired_summary([0.0, 0.0, 0.0])
    assert zero.t_stat == 0.0 and zero.p_t == 1.0 and zero.d_z == 0.0 and zero.p_mu_pos == 0.5
    assert zero.p_sign == 1.0 and zero.p_wilcoxon == 1.0 and zero.ties == 3
    assert S.json_safe(pos.to_dict())["t_stat"] == "inf"
    with pytest.raises(ValueError):
        S.paired_summary([0.1, float("nan")])
