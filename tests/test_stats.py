"""stats.py against independent references: scipy (special.betainc, stats.t, ttest_1samp, rankdata,
pearsonr, spearmanr), hand computations, loops written out, and a simulated parallel-item data set."""
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats

import stats as S


def test_mean_std_convention():
    m, s = S.mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and s == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                                                        + (4 - 7 / 3) ** 2) / 2))
    assert S.mean_std([3.5]) == (3.5, None)  # one value: no spread can be estimated
    with pytest.raises(ValueError):
        S.mean_std([])


@pytest.mark.parametrize("a, b", [(0.5, 0.5), (1.0, 0.5), (2.5, 0.5), (50.0, 0.5), (3.0, 7.0), (0.1, 20.0),
                                  (500.0, 0.5)])
def test_betainc_matches_scipy(a, b):
    for x in [0.0, 1e-8, 0.01, 0.2, 0.5, 0.77, 0.99, 1 - 1e-9, 1.0]:
        assert S.betainc(a, b, x) == pytest.approx(scipy.special.betainc(a, b, x), rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 29, 100, 2000])
def test_student_t_matches_scipy(df):
    for t in [-40.0, -6.3, -2.0, -0.3, 0.0, 0.1, 1.0, 2.2, 5.0, 120.0]:
        assert S.t_cdf(t, df) == pytest.approx(scipy.stats.t.cdf(t, df), abs=1e-10)
        assert S.t_sf2(t, df) == pytest.approx(2 * scipy.stats.t.sf(abs(t), df), rel=1e-8, abs=1e-14)
    for q in [0.0005, 0.025, 0.05, 0.3, 0.5, 0.8, 0.975, 0.995, 0.9999]:
        assert S.t_ppf(q, df) == pytest.approx(scipy.stats.t.ppf(q, df), rel=1e-9, abs=1e-9)


def test_t_interval_matches_scipy():
    rng = np.random.default_rng(1)
    for x in ([0.8, 1.9, -0.2], rng.normal(0.3, 1.0, size=7), [2.0, 2.5]):
        r = S.t_interval(x)
        ref = scipy.stats.ttest_1samp(x, 0.0)
        lo, hi = scipy.stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=scipy.stats.sem(x))
        assert r["p"] == pytest.approx(ref.pvalue, rel=1e-8)
        assert (r["lo"], r["hi"]) == pytest.approx((lo, hi), rel=1e-9)
        assert r["df"] == len(x) - 1
    assert S.t_interval([1.0, 1.0, 1.0]) == dict(mean=1.0, lo=1.0, hi=1.0, p=0.0, se=0.0, df=2, n=3)
    with pytest.raises(ValueError, match="at least 2"):
        S.t_interval([0.4])


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone: 0.06
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert S.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert S.holm([0.2]) == [0.2]


def test_joint_bootstrap_two_items_exact():
    """Two ids x and y, both in two languages. A resample is {x,x} (1/4) -> mean(1, 3) = 2, {x,y} (1/2)
    -> mean(2, 4) = 3, or {y,y} (1/4) -> 4: the 95% interval is [2, 4], P*(stat <= 0) = 0."""
    d = {"sw": {"x": 1.0, "y": 3.0}, "hi": {"x": 3.0, "y": 5.0}}
    r = S.joint_bootstrap(d, resamples=4000, seed=0)
    assert r["mean"] == 3.0 and (r["lo"], r["hi"]) == (2.0, 4.0) and r["p"] == 0.0 and r["n_ids"] == 2


def test_joint_bootstrap_partly_parallel_mean_by_hand():
    d = {"sw": {"x": 1.0, "y": 3.0, "z": 8.0}, "hi": {"x": 3.0}}  # hi lacks y and z
    r = S.joint_bootstrap(d, resamples=500, seed=0)
    assert r["mean"] == pytest.approx((4.0 + 3.0) / 2) and r["n_ids"] == 3
    assert r["dropped"] > 0  # resamples without x have no value for hi (P = (2/3)^3 = 0.30)
    assert abs(r["dropped"] / 500 - 8 / 27) < 0.07


def simulate_parallel(K=5, N=400, rho=0.25, seed=0):
    """Per-item differences (points) correlated across the K translations of an item: d_ik = 2 + u_i + e_ik,
    Var(u) = rho * 25, Var(e) = (1 - rho) * 25, so corr(d_ik, d_il) = rho."""
    rng = np.random.default_rng(seed)
    u = rng.normal(0, math.sqrt(rho) * 5, size=N)
    return np.array([2 + u + rng.normal(0, math.sqrt(1 - rho) * 5, size=N) for _ in range(K)])  # (K, N)


def test_joint_bootstrap_matches_direct_computation_and_independent_is_too_narrow():
    d_KN = simulate_parallel()
    K, N = d_KN.shape
    langs = [f"l{k}" for k in range(K)]
    a = {l: np.zeros(N) for l in langs}
    b = {l: d_KN[k] / 100 for k, l in enumerate(langs)}  # scores whose paired difference is d (in points)
    ids = {l: [f"item{i}" for i in range(N)] for l in langs}
    joint = S.paired_bootstrap(a, b, ids=ids, resamples=4000, seed=0)["overall"]
    indep = S.paired_bootstrap(a, b, resamples=4000, seed=0)["overall"]
    assert joint["delta"] == pytest.approx(d_KN.mean()) == indep["delta"]
    # direct computation: the overall statistic is the mean over items of the item's mean over languages,
    # so its bootstrap standard error is the plug-in std of those item means / sqrt(N)
    se_joint = d_KN.mean(0).std(ddof=0) / math.sqrt(N)
    se_indep = math.sqrt(sum(d_KN[k].var(ddof=0) / N for k in range(K))) / K  # languages independent
    z = scipy.stats.norm.ppf(0.975)
    assert joint["hi"] - joint["lo"] == pytest.approx(2 * z * se_joint, rel=0.05)
    assert indep["hi"] - indep["lo"] == pytest.approx(2 * z * se_indep, rel=0.05)
    # the independent interval is too narrow by about sqrt(1 + (K - 1) rho) = sqrt(2)
    ratio = (joint["hi"] - joint["lo"]) / (indep["hi"] - indep["lo"])
    assert ratio == pytest.approx(math.sqrt(1 + (K - 1) * 0.25), rel=0.12) and ratio > 1.25
    assert "jointly" in joint["resampling"] and joint["n_ids"] == N
    # per-language rows do not depend on the overall scheme (same draws, made first)
    with_ids, without = S.paired_bootstrap(a, b, ids=ids, resamples=300), S.paired_bootstrap(a, b, resamples=300)
    assert all(with_ids[l] == without[l] for l in langs)


def test_paired_bootstrap_rejects_bad_ids():
    with pytest.raises(ValueError, match="2 ids for 3 items"):
        S.paired_bootstrap({"sw": [1, 0, 1]}, {"sw": [1, 1, 1]}, ids={"sw": ["a", "b"]})
    with pytest.raises(ValueError, match="duplicate item ids"):
        S.paired_bootstrap({"sw": [1, 0]}, {"sw": [1, 1]}, ids={"sw": ["a", "a"]})


def test_seed_item_bootstrap_matches_loops():
    """The documented two-way scheme written out as loops (seeds drawn, then groups, same rng)."""
    rng = np.random.default_rng(3)
    diff = rng.normal(size=(3, 8))
    group = ["p1", "p1", "p2", "p3", "p3", "p3", "p4", "p2"]
    R = 300
    r = S.seed_item_bootstrap(diff, group, resamples=R, seed=7)
    names = sorted(set(group))
    g = np.random.default_rng(7)
    seed_idx, group_idx = g.integers(0, 3, (R, 3)), g.integers(0, len(names), (R, len(names)))
    stat = []
    for k in range(R):
        vals = [diff[s, i] for s in seed_idx[k] for gi in group_idx[k] for i in range(8) if group[i] == names[gi]]
        stat.append(sum(vals) / len(vals))
    lo, hi = np.percentile(stat, [2.5, 97.5])
    assert r["mean"] == pytest.approx(diff.mean()) and (r["lo"], r["hi"]) == pytest.approx((lo, hi), abs=1e-12)


def test_rank_and_correlations_match_scipy():
    rng = np.random.default_rng(0)
    for x, y in [(rng.normal(size=7), rng.normal(size=7)), ([1, 2, 2, 3, 5, 5, 5], [3, 1, 2, 2, 9, 0, 4])]:
        np.testing.assert_allclose(S.rankdata(x), scipy.stats.rankdata(x))
        assert S.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
        assert S.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    # exact permutation test: a perfect monotone relation over 5 languages; 2 of 120 orders reach |r| = 1
    assert S.permutation_p([1, 2, 3, 4, 5], [2, 4, 5, 8, 9], S.spearman) == pytest.approx(2 / 120)
    res = S.correlate({"sw": -0.03, "hi": -0.01, "bn": -0.02, "te": 0.0}, {"sw": 3.0, "hi": 1.0, "bn": 2.5, "te": 0.5,
                                                                          "ne": 9.0})
    assert res["langs"] == ["sw", "hi", "bn", "te"] and res["spearman"] == pytest.approx(-1.0)
    assert "note" in S.correlate({"sw": 1.0, "hi": 2.0}, {"sw": 1.0, "hi": 2.0})


def test_paired_bootstrap():
    a = {"sw": [1, 0, 0, 1, 0, 1, 0, 0], "hi": [0, 0, 1, 1]}
    b = {"sw": [1, 1, 0, 1, 1, 1, 0, 1], "hi": [0, 0, 1, 1]}
    res = S.paired_bootstrap(a, b, resamples=2000, seed=0)
    assert res["hi"]["delta"] == 0 and (res["hi"]["lo"], res["hi"]["hi"], res["hi"]["p"]) == (0, 0, 1.0)
    assert res["sw"]["delta"] == 37.5 and res["sw"]["acc_a"] == 37.5 and res["sw"]["acc_b"] == 75.0
    assert 0 < res["sw"]["lo"] < 37.5 < res["sw"]["hi"] <= 75 and res["sw"]["p"] < 0.05
    assert res["overall"]["delta"] == pytest.approx(18.75) and res["overall"]["n"] == 12
    assert res["overall"]["lo"] == pytest.approx(res["sw"]["lo"] / 2)  # hi adds exactly 0 to every resample
    assert S.paired_bootstrap(a, b, resamples=2000, seed=0) == res  # fixed seed: reproducible
    with pytest.raises(ValueError, match="same non-zero length"):
        S.paired_bootstrap({"sw": [1, 0]}, {"sw": [1]})


def test_min_detectable_effect_by_formula_and_noncentral_t():
    for n in (3, 5, 10, 30):
        mde = S.min_detectable_effect(2.0, n)
        want = (scipy.stats.t.ppf(0.975, n - 1) + scipy.stats.t.ppf(0.8, n - 1)) * 2.0 / math.sqrt(n)
        assert mde == pytest.approx(want, rel=1e-9)
        nc, tc = mde / 2.0 * math.sqrt(n), scipy.stats.t.ppf(0.975, n - 1)
        power = 1 - scipy.stats.nct.cdf(tc, n - 1, nc) + scipy.stats.nct.cdf(-tc, n - 1, nc)
        assert 0.76 < power < 0.81  # the approximation is close to the nominal 0.8
    with pytest.raises(ValueError):
        S.min_detectable_effect(1.0, 1)
