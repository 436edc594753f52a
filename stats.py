"""
Statistics shared by the evaluation (eval.py, evaluation/) and the experiments (experiments/toy_sara.py).
numpy and the standard library only: scipy is the tests' oracle, never imported here.

API (every interval is a two-sided `ci` interval, default 95%):
  mean_std(values)                      -> (mean, std): std is the sample std (ddof=1), None for one value
  paired_bootstrap(a, b, ids=None, ...) -> {unit: {n, acc_a, acc_b, delta, lo, hi, p}, "overall": {...}}
                                           item-level paired bootstrap per unit (e.g. language); "overall"
                                           resamples item ids JOINTLY across units when `ids` is given
  joint_bootstrap(d, ...)               -> {mean, lo, hi, p, n_ids, dropped}: the overall statistic alone,
                                           d = {unit: {item id: difference}}
  seed_item_bootstrap(diff_SI, group_I) -> {mean, lo, hi, p}: seeds AND item groups resampled (two-way)
  t_interval(x)                         -> {mean, lo, hi, p, se, df, n}: Student t interval of the mean and
                                           the two-sided p of mean = 0 (a seed-level paired comparison:
                                           x = per-seed differences)
  t_cdf(t, df), t_ppf(q, df), betainc(a, b, x)   Student t and the regularized incomplete beta
  min_detectable_effect(sd, n)          -> the smallest true mean difference a paired t test over n seeds
                                           detects with the given power (ci 0.95, power 0.8 by default)
  holm(pvalues)                         -> Holm-adjusted p-values, in the input order
  rankdata, pearson, spearman, permutation_p(x, y, stat), correlate(delta_div, delta_acc)

Conventions, one for the whole project:
- std: sample standard deviation, ddof = 1. With one value it is undefined and returned as None (a
  printed 0 would read as "no noise"); tables then print the mean alone and say "1 run".
- bootstrap: percentile interval (numpy's default linear interpolation between order statistics),
  p = 2 * min(P*(stat <= 0), P*(stat >= 0)), capped at 1; `resamples` draws from
  np.random.default_rng(seed). Item-level statistics are in the caller's units (eval: percentage points).
- What an interval covers. An item-level bootstrap of one run per condition measures test-item noise
  only: how much the difference would move on another test set of the same size. It says nothing about
  training-seed noise (another fine-tuning run of the same condition). For that, train several seeds
  per condition: t_interval over the per-seed differences (fixed test set, seed noise), or
  seed_item_bootstrap (both sources at once, as in experiments/toy_sara.py).

Why the joint bootstrap. Global-MMLU, BELEBELE and MGSM are parallel: the same item is translated into
every language. If a method's effect on an item is correlated across its K translations (correlation
rho), the per-language differences are not independent, and resampling each language on its own gives an
interval for the mean over languages that is too narrow by about sqrt(1 + (K - 1) rho). Resampling item
ids jointly (one draw picks an item in every language at once) keeps that correlation. Measured in
tests/test_stats.py on a simulation with K = 5 languages, 400 items, rho = 0.25 (10,000 resamples): joint
interval 0.647 points wide, direct computation (item means' plug-in standard error x 2 x 1.96) 0.637,
independent per language 0.445, too narrow by 1.45 (sqrt(1 + 4 x 0.25) = 1.41).

Student t without scipy: the CDF is the regularized incomplete beta, I_x(df/2, 1/2) with
x = df / (df + t^2), evaluated by its continued fraction (modified Lentz); the quantile inverts the CDF by
bisection to machine precision. Agrees with scipy.stats.t to 1e-10 (tests/test_stats.py).
"""
import itertools
import math

import numpy as np


# -----------------------------------------------------------------------------
# mean and spread

def mean_std(values):
    """-> (mean, sample std with ddof=1), std None for a single value."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std of no values")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


# -----------------------------------------------------------------------------
# bootstrap

def _interval(boot, ci):
    lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    p = min(1.0, 2 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))))
    return float(lo), float(hi), float(p)


def _resample_means(d, rng, resamples):
    """(resamples,) means of d over items drawn with replacement (blocks bound the memory)."""
    boot = np.empty(resamples)
    step = max(1, 2_000_000 // d.size)
    for s in range(0, resamples, step):
        k = min(step, resamples - s)
        boot[s:s + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(1)
    return boot


def _counts(rng, G, k):
    """(k, G) multiplicities of G ids drawn with replacement, k times."""
    idx = rng.integers(0, G, size=(k, G)) + G * np.arange(k)[:, None]
    return np.bincount(idx.ravel(), minlength=k * G).reshape(k, G)


def joint_bootstrap(d, *, resamples=10000, seed=0, ci=0.95, rng=None):
    """The mean over units (unweighted) of each unit's mean difference, resampling item ids jointly.

    d: {unit: {item id: difference}}. One resample draws G ids with replacement from the union of all
    units' ids (G = its size); each unit's mean is over the drawn ids it holds, with multiplicity. An id
    absent from a unit simply does not count there, so partly parallel data is fine. A resample that
    draws none of some unit's ids has no value for that unit and is dropped (counted in `dropped`; only
    possible with very few items). -> {mean, lo, hi, p, n_ids, dropped}."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    units = list(d)
    ids = list(dict.fromkeys(i for u in units for i in d[u]))
    pos = {i: g for g, i in enumerate(ids)}
    G, U = len(ids), len(units)
    if G == 0:
        raise ValueError("joint_bootstrap: no items")
    val_UG, has_UG = np.zeros((U, G)), np.zeros((U, G))
    for k, u in enumerate(units):
        for i, x in d[u].items():
            val_UG[k, pos[i]], has_UG[k, pos[i]] = x, 1.0
    mean = float(np.mean([(val_UG[k] * has_UG[k]).sum() / has_UG[k].sum() for k in range(U)]))
    boot = np.empty(resamples)
    step = max(1, 2_000_000 // G)
    for s in range(0, resamples, step):
        k = min(step, resamples - s)
        w_RG = _counts(rng, G, k)
        num_RU, den_RU = w_RG @ (val_UG * has_UG).T, w_RG @ has_UG.T
        with np.errstate(invalid="ignore", divide="ignore"):
            boot[s:s + k] = (num_RU / den_RU).mean(1)  # nan where a unit got no item
    ok = ~np.isnan(boot)
    lo, hi, p = _interval(boot[ok], ci)
    return dict(mean=mean, lo=lo, hi=hi, p=p, n_ids=G, dropped=int((~ok).sum()))


def paired_bootstrap(a, b, *, ids=None, resamples=10000, seed=0, ci=0.95):
    """Paired bootstrap of b - a, per unit and overall, in percentage points (scores in [0, 1] x 100).

    a, b: {unit (e.g. language): [per-item score]}, items paired by position. ids: optional {unit: [item
    id per item]}: ids shared across units mark the same (translated) item. Per unit: `resamples` draws
    of its items with replacement, the same draw for a and b. "overall" = the unweighted mean over units
    of the per-unit differences; with ids its interval resamples ids jointly across units
    (joint_bootstrap), without ids each unit is resampled on its own (stratified; right only when the
    units' items are independent). -> {unit: {n, acc_a, acc_b, delta, lo, hi, p}, "overall": {...,
    resampling}}."""
    rng = np.random.default_rng(seed)
    out, boots = {}, []
    for unit in a:
        x, y = np.asarray(a[unit], np.float64), np.asarray(b[unit], np.float64)
        if x.shape != y.shape or x.size == 0:
            raise ValueError(f"{unit}: paired scores need the same non-zero length; got {x.size} and {y.size}")
        if ids is not None and len(ids[unit]) != x.size:
            raise ValueError(f"{unit}: {len(ids[unit])} ids for {x.size} items")
        d = 100 * (y - x)
        boots.append(_resample_means(d, rng, resamples))
        lo, hi, p = _interval(boots[-1], ci)
        out[unit] = dict(n=int(x.size), acc_a=100 * float(x.mean()), acc_b=100 * float(y.mean()),
                         delta=float(d.mean()), lo=lo, hi=hi, p=p)
    overall = dict(n=sum(v["n"] for v in out.values()), acc_a=float(np.mean([v["acc_a"] for v in out.values()])),
                   acc_b=float(np.mean([v["acc_b"] for v in out.values()])),
                   delta=float(np.mean([v["delta"] for v in out.values()])))
    if ids is None:
        lo, hi, p = _interval(np.mean(boots, axis=0), ci)
        overall.update(lo=lo, hi=hi, p=p, resampling="each unit on its own (items independent across units)")
    else:
        d = {u: dict(zip(ids[u], 100 * (np.asarray(b[u], np.float64) - np.asarray(a[u], np.float64)))) for u in a}
        if any(len(d[u]) != len(ids[u]) for u in a):
            raise ValueError("paired_bootstrap: duplicate item ids within a unit")
        j = joint_bootstrap(d, resamples=resamples, ci=ci, rng=rng)
        overall.update(lo=j["lo"], hi=j["hi"], p=j["p"], n_ids=j["n_ids"],
                       resampling=f"item ids jointly across units ({j['n_ids']} ids)")
    out["overall"] = overall
    return out


def seed_item_bootstrap(diff_SI, group_I, resamples=10000, seed=0, ci=0.95):
    """Two-way bootstrap of the mean of diff over (seed, item): each resample draws S seeds and G item
    groups with replacement and averages diff over every drawn seed x every item of every drawn group
    (with multiplicity). diff_SI: (S, I) paired differences (same item, same seed); group_I: the group of
    each item (e.g. a paragraph carrying all its languages), groups numbered in sorted order of their
    names. Draw order (fixed, so results reproduce): seed_idx = rng.integers(0, S, (R, S)), then
    group_idx = rng.integers(0, G, (R, G)), rng = np.random.default_rng(seed). -> {mean, lo, hi, p}."""
    diff_SI = np.asarray(diff_SI, dtype=np.float64)
    S, I = diff_SI.shape
    names = sorted(set(group_I))
    g_I = np.array([names.index(g) for g in group_I])
    G = len(names)
    rng = np.random.default_rng(seed)
    seed_idx = rng.integers(0, S, (resamples, S))
    group_idx = rng.integers(0, G, (resamples, G))
    w_RS = np.stack([np.bincount(r, minlength=S) for r in seed_idx])
    w_RG = np.stack([np.bincount(r, minlength=G) for r in group_idx])
    sum_SG = np.zeros((S, G))
    np.add.at(sum_SG.T, g_I, diff_SI.T)  # sum of diff over the items of each group
    n_G = np.bincount(g_I, minlength=G)
    stat_R = np.einsum("rs,sg,rg->r", w_RS, sum_SG, w_RG) / (S * (w_RG @ n_G))
    lo, hi, p = _interval(stat_R, ci)
    return dict(mean=float(diff_SI.mean()), lo=lo, hi=hi, p=p)


# -----------------------------------------------------------------------------
# Student t (seed-level intervals)

def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b) for a, b > 0, 0 <= x <= 1: continued fraction (modified
    Lentz), on the side of x where it converges fast (x < (a + 1) / (a + b + 2)), else by symmetry."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x = {x} is outside [0, 1]")
    if x == 0.0 or x == 1.0:
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (
        math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, dd = 1.0, 1.0 - (a + b) * x / (a + 1)
    dd = 1.0 / (dd if abs(dd) > tiny else tiny)
    f = dd
    for m in range(1, 10000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step d_{2m}
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step d_{2m+1}
            dd = 1.0 + num * dd
            dd = 1.0 / (dd if abs(dd) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= dd * c
        if abs(dd * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f


def t_sf2(t, df):
    """Two-sided tail P(|T| >= |t|) of Student's t with df degrees of freedom (no cancellation)."""
    return betainc(df / 2, 0.5, df / (df + t * t)) if t != 0 else 1.0


def t_cdf(t, df):
    tail = 0.5 * t_sf2(t, df)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q, df):
    """Quantile of Student's t: the t with t_cdf(t, df) = q, by bisection (CDF is monotone)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q = {q} is outside (0, 1)")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return 0.5 * (lo + hi)


def t_interval(x, ci=0.95):
    """Student t interval for the mean of x and the two-sided p of mean = 0, df = n - 1, se = std(ddof=1)
    / sqrt(n). For a seed-level paired comparison, x = the per-seed differences (b - a on seed s). Needs
    n >= 2; with a zero spread the interval is the point and p is 0 (mean != 0) or 1."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n < 2:
        raise ValueError(f"t_interval needs at least 2 values (seeds); got {n}")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    se, df = sd / math.sqrt(n), n - 1
    if se == 0:
        return dict(mean=mean, lo=mean, hi=mean, p=float(mean == 0), se=0.0, df=df, n=n)
    half = t_ppf(1 - (1 - ci) / 2, df) * se
    return dict(mean=mean, lo=mean - half, hi=mean + half, p=t_sf2(mean / se, df), se=se, df=df, n=n)


def min_detectable_effect(sd, n, ci=0.95, power=0.8):
    """The true mean difference that a two-sided paired t test over n seeds (level 1 - ci) detects with
    probability `power`, given the per-seed differences' std sd: (t_{1-a/2, n-1} + t_{power, n-1}) sd / sqrt(n).
    The usual approximation of the noncentral t: the achieved power is 0.766 for n = 3, 0.791 for n = 5,
    0.799 for n = 10 (nominal 0.8; scipy.stats.nct, tests/test_stats.py)."""
    if n < 2:
        raise ValueError(f"min_detectable_effect needs n >= 2 seeds; got {n}")
    return (t_ppf(1 - (1 - ci) / 2, n - 1) + t_ppf(power, n - 1)) * sd / math.sqrt(n)


def holm(pvalues):
    """Holm's step-down adjustment (family-wise error), in the input order: the i-th smallest p becomes
    max over j <= i of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="mergesort")
    adj = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
    out = np.empty_like(adj)
    out[order] = adj
    return out.tolist()


# -----------------------------------------------------------------------------
# ranks and correlation

def rankdata(x):
    """Ranks 1..n, ties get the mean of the ranks they span (as scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def spearman(x, y):
    """Pearson of average ranks."""
    return pearson(rankdata(x), rankdata(y))


def permutation_p(x, y, stat, *, resamples=10000, seed=0):
    """Two-sided p of stat(x, y) under random pairing: exact over all n! orders for n <= 8, else
    `resamples` random permutations from np.random.default_rng(seed)."""
    obs = abs(stat(x, y))
    y = np.asarray(y, np.float64)
    if len(y) <= 8:
        perms = (np.array(p) for p in itertools.permutations(range(len(y))))
    else:
        rng = np.random.default_rng(seed)
        perms = (rng.permutation(len(y)) for _ in range(resamples))
    hits = [abs(stat(x, y[p])) >= obs - 1e-12 for p in perms]
    return float(np.mean(hits))


def correlate(delta_div, delta_acc):
    """{lang: change in divergence}, {lang: change in accuracy} -> Pearson / Spearman with permutation
    p-values over the common languages (a note instead below 3 languages)."""
    langs = [l for l in delta_div if l in delta_acc]
    res = dict(langs=langs, n=len(langs), delta_div=[delta_div[l] for l in langs],
               delta_acc=[delta_acc[l] for l in langs])
    if len(langs) < 3:
        return {**res, "note": "correlation needs at least 3 languages"}
    x, y = res["delta_div"], res["delta_acc"]
    return {**res, "pearson": pearson(x, y), "pearson_p": permutation_p(x, y, pearson),
            "spearman": spearman(x, y), "spearman_p": permutation_p(x, y, spearman)}
