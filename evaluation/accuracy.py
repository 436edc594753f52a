"""
Accuracy: run a benchmark through a responder, score every item, summarise per language, print the paper's
Table-1 layout, write and read the outputs, and pair two conditions for the statistics of stats.py.

Accuracy is in percent; a language's score is the mean over its items, the average is the unweighted mean
over languages (as in the paper's tables). With several generation runs (sampling at temperature 0.1)
the table shows mean ± std over runs (stats.mean_std: ddof 1; one run shows the mean alone).

A language's "no answer" rate is the share of its outputs from which no answer could be read (no \\boxed{},
an unreadable letter or number): printed under the accuracy, since 0 % accuracy with 100 % unread answers
is a format problem, not a knowledge one.

A bench output directory holds predictions.jsonl (one row per item and run: benchmark, protocol, lang, id,
run, gold, pred, correct, parallel, output | scores), results.json (settings, summary, platform) and
table.csv.

Comparing two conditions (compare): a = e.g. full fine-tuning, b = SARA, each given as ONE OR MORE bench
outputs, one per training seed, paired in the order given (seed s of a with seed s of b).
- item level: an item's score is its accuracy averaged over generation runs and seeds; paired bootstrap
  per language and overall (stats.paired_bootstrap); overall resamples item ids jointly across languages
  where the benchmark's items are parallel. This measures test-item noise only.
- seed level (two or more seeds per side): per seed the difference b - a per language and overall;
  Student t interval over seeds (stats.t_interval), the training-seed noise on this test set.
"""
import csv
import json
from pathlib import Path

import numpy as np

from evaluation.benchmarks import get_benchmark, item_prompt
from evaluation.scoring import score_output
from jsonl import JsonlError, read_jsonl
from stats import holm, mean_std, paired_bootstrap, t_interval

ONE_RUN_NOTE = ("one run per condition: the intervals measure test-item noise only (another test set of the "
                "same size), not training-seed noise; give several bench outputs per side (one per seed) for "
                "seed-level intervals")


def run_benchmark(items_by_lang, respond, *, benchmark, protocol, runs=1, templates=None, progress=None,
                  on_language=None):
    """items_by_lang: {lang: items}; respond(prompts, run) -> outputs (texts, or 4 log-likelihoods each);
    on_language(lang) before each language's prompts (a ShifCon model shifts by the prompt's language).
    -> per-item records {benchmark, protocol, lang, id, run, gold, pred, correct, parallel, output | scores}."""
    cut = get_benchmark(benchmark).harness_cut if protocol == "harness" else (lambda item, out: out)
    records = []
    for lang, items in items_by_lang.items():
        if on_language is not None:
            on_language(lang)
        prompts = [item_prompt(it, benchmark, protocol, templates) for it in items]
        for run in range(runs):
            if progress:
                progress(f"{benchmark} {lang} run {run}: {len(items)} prompts")
            outputs = respond(prompts, run)
            if len(outputs) != len(items):
                raise RuntimeError(f"respond returned {len(outputs)} outputs for {len(items)} prompts")
            for it, out in zip(items, outputs):
                out = cut(it, out) if isinstance(out, str) else out
                pred, correct = score_output(it, out, protocol)
                rec = dict(benchmark=benchmark, protocol=protocol, lang=lang, id=it["id"], run=run,
                           gold=it["answer"], pred=pred, correct=bool(correct), parallel=it.get("parallel", False))
                rec["output" if isinstance(out, str) else "scores"] = out  # generated text, or 4 log-likelihoods
                records.append(rec)
            if progress:
                mine = [r for r in records if r["lang"] == lang and r["run"] == run]
                progress(f"{benchmark} {lang} run {run}: {100 * np.mean([r['correct'] for r in mine]):.2f}% of "
                         f"{len(items)} correct, {100 * np.mean([r['pred'] is None for r in mine]):.2f}% no answer")
    return records


def summarize(records):
    """records -> {"langs": {lang: {n, runs: [acc % per run], mean, std, no_answer %}},
    "average": {runs, mean, std}}: the average is the unweighted mean over languages, per run."""
    langs = {}
    for lang in dict.fromkeys(r["lang"] for r in records):
        mine = [r for r in records if r["lang"] == lang]
        runs = sorted({r["run"] for r in mine})
        accs = [100 * float(np.mean([r["correct"] for r in mine if r["run"] == k])) for k in runs]
        mean, std = mean_std(accs)
        langs[lang] = dict(n=sum(r["run"] == runs[0] for r in mine), runs=accs, mean=mean, std=std,
                           no_answer=100 * float(np.mean([r["pred"] is None for r in mine])))
    n_runs = {len(v["runs"]) for v in langs.values()}
    if len(n_runs) != 1:
        raise ValueError(f"languages have different numbers of runs: {n_runs}")
    avg_runs = [float(np.mean([v["runs"][k] for v in langs.values()])) for k in range(n_runs.pop())]
    mean, std = mean_std(avg_runs)
    no_answer = float(np.mean([v["no_answer"] for v in langs.values()]))
    return dict(langs=langs, average=dict(runs=avg_runs, mean=mean, std=std, no_answer=no_answer))


def _cell(d):
    if not d:
        return "-"
    return f"{d['mean']:.2f}" if d["std"] is None else f"{d['mean']:.2f}±{d['std']:.2f}"


def format_table(rows, langs, title=""):
    """rows: [(label, summary)] -> the paper's Table 1 layout: one row per model, one column per language
    plus Avg, cells "mean±std" in percent ("mean" alone for one run). When the rows' averages are over
    different language sets, a note under the table says so."""
    width = max([len("model")] + [len(label) for label, _ in rows])
    lines = [title] if title else []
    lines.append(f"{'model':<{width}}  " + "  ".join(f"{l:>12}" for l in langs + ["Avg"]))
    for label, s in rows:
        cells = [_cell(s["langs"].get(l)) for l in langs] + [_cell(s["average"])]
        lines.append(f"{label:<{width}}  " + "  ".join(f"{c:>12}" for c in cells))
    for label, s in rows:  # the rate of unread answers, so that a format failure is not read as 0 % knowledge
        if all("no_answer" in s["langs"][l] for l in s["langs"]) and "no_answer" in s["average"]:
            cells = [f"{s['langs'][l]['no_answer']:.2f}" if l in s["langs"] else "-" for l in langs]
            cells.append(f"{s['average']['no_answer']:.2f}")
            lines.append(f"{'':<{width}}  " + "  ".join(f"{c:>12}" for c in cells) + f"  <- {label}: no answer read (%)")
    sets = {label: list(s["langs"]) for label, s in rows}
    if len({frozenset(v) for v in sets.values()}) > 1:
        lines.append("warning: the Avg column is over different language sets: "
                     + "; ".join(f"{label}: {','.join(v)}" for label, v in sets.items()))
    return "\n".join(lines)


def write_bench_outputs(out_dir, records, summary, meta):
    """predictions.jsonl (one row per item and run), results.json, table.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump({**meta, **summary}, f, indent=1, ensure_ascii=False)
    n_runs = len(summary["average"]["runs"])
    fmt = lambda x: "" if x is None else f"{x:.4f}"
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["lang", "n", "mean", "std"] + [f"run_{k}" for k in range(n_runs)] + ["no_answer"])
        for lang, d in summary["langs"].items():
            w.writerow([lang, d["n"], fmt(d["mean"]), fmt(d["std"])] + [fmt(a) for a in d["runs"]]
                       + [fmt(d["no_answer"])])
        a = summary["average"]
        w.writerow(["avg", sum(d["n"] for d in summary["langs"].values()), fmt(a["mean"]), fmt(a["std"])]
                   + [fmt(x) for x in a["runs"]] + [fmt(a.get("no_answer"))])


def load_results(path):
    """A bench output dir or its results.json -> (path, dict); a missing, corrupt or foreign file is a
    clear error naming it."""
    p = Path(path) / "results.json" if Path(path).is_dir() else Path(path)
    try:
        res = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"{p}: no such file (expected a bench output dir or its results.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{p}: not valid JSON ({e}); rerun `eval.py bench` for it") from None
    missing = [k for k in ("benchmark", "protocol", "langs", "average") if not isinstance(res, dict) or k not in res]
    if missing:
        raise SystemExit(f"{p}: not an eval.py bench results.json (missing {missing})")
    return p, res


def load_predictions(path):
    """predictions.jsonl (or a bench output dir) -> {(benchmark, lang): {id: (gold, score, parallel)}}, score =
    the item's accuracy averaged over runs; parallel: the id names the same item in every language."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (expected a bench output dir or its predictions.jsonl)")
    acc = {}
    try:
        rows = read_jsonl(path)
    except JsonlError as e:
        raise SystemExit(f"{e}; rerun `eval.py bench` for it") from None
    for lineno, r in rows:
        missing = [k for k in ("benchmark", "lang", "id", "gold", "correct") if not isinstance(r, dict) or k not in r]
        if missing:
            raise SystemExit(f"{path}:{lineno}: not an eval.py prediction row (missing {missing})")
        key = (r["benchmark"], r["lang"])
        gold, hits, par = acc.setdefault(key, {}).get(r["id"], (r["gold"], [], bool(r.get("parallel", False))))
        hits.append(float(r["correct"]))
        acc[key][r["id"]] = (gold, hits, par)
    return {k: {i: (g, float(np.mean(h)), p) for i, (g, h, p) in v.items()} for k, v in acc.items()}


def pair_conditions(runs_a, runs_b, common_only=False):
    """Two conditions, each a list of load_predictions outputs (one per seed) -> dict(units, a, b, ids,
    seeds_a, seeds_b, notes): per unit (language, or benchmark:language across benchmarks) the common items'
    seed-averaged scores, ids for the joint bootstrap (None when no item is parallel), and per seed the
    per-unit score lists. A unit present in only one condition is an error unless common_only."""
    for side, runs in (("a", runs_a), ("b", runs_b)):
        if any(set(r) != set(runs[0]) for r in runs):
            raise SystemExit(f"the seeds of --{side} cover different languages: {[sorted(r) for r in runs]}")
    keys_a, keys_b = set(runs_a[0]), set(runs_b[0])
    only = [f"{k[0]}:{k[1]} only in --{side}" for side, mine, other in (("a", keys_a, keys_b), ("b", keys_b, keys_a))
            for k in sorted(mine - other)]
    if only and not common_only:
        raise SystemExit("languages differ between --a and --b (" + "; ".join(only) + "): the overall numbers "
                         "would be over different languages. Evaluate both on the same languages, or pass "
                         "--common-only to compare the common ones")
    keys = sorted(keys_a & keys_b, key=lambda k: list(runs_a[0]).index(k))
    if not keys:
        raise SystemExit("no common (benchmark, language) between --a and --b")
    several = len({k[0] for k in keys}) > 1
    out = dict(units=[], a={}, b={}, ids={}, seeds_a={}, seeds_b={}, notes=list(only))
    any_parallel = False
    for key in keys:
        ids = [i for i in runs_a[0][key] if all(i in r[key] for r in runs_a + runs_b)]
        most = max(len(r[key]) for r in runs_a + runs_b)
        if len(ids) < most:
            out["notes"].append(f"{key[0]}:{key[1]}: {len(ids)} common items (up to {most} in one output)")
        bad = [i for i in ids if len({r[key][i][0] for r in runs_a + runs_b}) > 1]
        if bad:
            raise SystemExit(f"{key}: gold answers differ for {len(bad)} items (e.g. {bad[0]}): different data?")
        if not ids:
            raise SystemExit(f"{key[0]}:{key[1]}: no common item ids between the outputs")
        unit = f"{key[0]}:{key[1]}" if several else key[1]
        out["units"].append(unit)
        for side, runs in (("a", runs_a), ("b", runs_b)):
            out[f"seeds_{side}"][unit] = [[r[key][i][1] for i in ids] for r in runs]
            out[side][unit] = np.mean(out[f"seeds_{side}"][unit], axis=0).tolist()
        par = [runs_a[0][key][i][2] for i in ids]
        any_parallel |= any(par)
        # a parallel item is one cluster across languages; any other item is its own cluster
        out["ids"][unit] = [f"{key[0]}#{i}" if p else f"{key[0]}#{key[1]}#{i}" for i, p in zip(ids, par)]
    if not any_parallel:
        out["ids"] = None
    return out


def compare_conditions(pairs, *, resamples=10000, seed=0):
    """pair_conditions output -> dict(bootstrap={unit: stats, "overall": ...} with Holm-adjusted p over the
    units, seeds=S, seed_level={unit and "overall": t interval} when S >= 2, note)."""
    boot = paired_bootstrap(pairs["a"], pairs["b"], ids=pairs["ids"], resamples=resamples, seed=seed)
    units = pairs["units"]
    for u, p in zip(units, holm([boot[u]["p"] for u in units])):
        boot[u]["p_holm"] = p
    S = len(next(iter(pairs["seeds_a"].values())))
    if S != len(next(iter(pairs["seeds_b"].values()))):
        raise SystemExit(f"--a has {S} seeds and --b {len(next(iter(pairs['seeds_b'].values())))}: seed-level "
                         "comparisons pair seed s of a with seed s of b; give the same number")
    result = dict(bootstrap=boot, seeds=S)
    if S < 2:
        result["note"] = ONE_RUN_NOTE
        return result
    # per seed: Δ per unit (percentage points) and its unweighted mean over units
    d_US = {u: [100 * (np.mean(pairs["seeds_b"][u][s]) - np.mean(pairs["seeds_a"][u][s])) for s in range(S)]
            for u in units}
    d_US["overall"] = [float(np.mean([d_US[u][s] for u in units])) for s in range(S)]
    result["seed_level"] = {u: dict(t_interval(d), deltas=d) for u, d in d_US.items()}
    result["note"] = (f"{S} seeds per condition: the t interval (df {S - 1}) measures training-seed noise on "
                      "this test set; the bootstrap (seed-averaged items) measures test-item noise")
    return result


def format_comparison(res, n_units, resamples, seed):
    """compare_conditions output -> the printed report."""
    boot = res["bootstrap"]
    lines = [f"paired bootstrap over items ({resamples} resamples, seed {seed}): Δ = b - a, percentage points, "
             f"95% CI; p_holm: Holm-adjusted over the {n_units} languages",
             f"{'lang':<14}{'n':>7}{'acc a':>9}{'acc b':>9}{'Δ':>8}   {'95% CI':<18}{'p':>7}{'p_holm':>8}"]
    for unit, s in boot.items():
        lines.append(f"{unit:<14}{s['n']:>7}{s['acc_a']:9.2f}{s['acc_b']:9.2f}{s['delta']:+8.2f}   "
                     f"[{s['lo']:+6.2f}, {s['hi']:+6.2f}]  {s['p']:7.4f}"
                     + (f"{s['p_holm']:8.4f}" if "p_holm" in s else ""))
    lines.append(f"overall: unweighted mean over languages; resampled {boot['overall']['resampling']}")
    for unit, t in res.get("seed_level", {}).items():
        lines.append(f"seed level {unit:<10} Δ per seed {', '.join(f'{d:+.2f}' for d in t['deltas'])}: mean "
                     f"{t['mean']:+.2f} [{t['lo']:+.2f}, {t['hi']:+.2f}] (t, df {t['df']}), p = {t['p']:.4f}")
    lines.append("note: " + res["note"])
    return "\n".join(lines)


def format_correlation(c):
    """The correlation entry of compare (band divergence change vs accuracy change) -> printed lines."""
    lines = [f"\nΔ{c['metric']} over layers {c['band'][0]}..{c['band'][1]} ({c['models'][1]} - {c['models'][0]}) vs "
             f"Δaccuracy, across {c['n']} languages: " + ", ".join(
                 f"{l} ({x:+.4f}, {y:+.2f})" for l, x, y in zip(c["langs"], c["delta_div"], c["delta_acc"]))]
    if "note" in c:
        lines.append(c["note"])
    else:
        lines.append(f"Pearson r = {c['pearson']:+.3f} (permutation p = {c['pearson_p']:.3f}), "
                     f"Spearman rho = {c['spearman']:+.3f} (p = {c['spearman_p']:.3f})")
    return "\n".join(lines)
