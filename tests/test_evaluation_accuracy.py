"""evaluation/accuracy.py: the accuracy arithmetic with forced answers (a stub responder), tables and
their warnings, outputs on disk, and pairing two conditions (languages, items, seeds) for stats.py."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

import evaluation.accuracy as A
import evaluation.benchmarks as B

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


def mmlu_items():
    return {l: B.load_benchmark("global_mmlu", FIX / "global_mmlu", l)[0] for l in ("sw", "hi")}


def test_accuracy_arithmetic_with_a_stub_responder(tmp_path):
    items = mmlu_items()
    template = B.get_template({}, "global_mmlu", "generative", "sw")
    gold = {B.build_prompt(it, template): it["answer"] for its in items.values() for it in its}
    first = {B.build_prompt(its[0], template) for its in items.values()}

    def respond(prompts, run):  # run 0: all right; run 1: each language's first item wrong, another unboxed
        out = []
        for p in prompts:
            letter = gold[p] if run == 0 or p not in first else "ABCD"[("ABCD".index(gold[p]) + 1) % 4]
            out.append(f"Reasoning... the answer is \\boxed{{({letter})}}.")
        return out

    records = A.run_benchmark(items, respond, benchmark="global_mmlu", protocol="generative", runs=2)
    assert len(records) == 2 * (4 + 3)
    s = A.summarize(records)
    assert s["langs"]["sw"]["runs"] == [100.0, 75.0] and s["langs"]["sw"]["n"] == 4
    assert s["langs"]["hi"]["runs"] == pytest.approx([100.0, 200 / 3])
    assert s["langs"]["sw"]["mean"] == 87.5 and s["langs"]["sw"]["std"] == pytest.approx(25 / math.sqrt(2))
    assert s["average"]["runs"] == pytest.approx([100.0, (75 + 200 / 3) / 2])  # unweighted over languages
    assert s["average"]["std"] == pytest.approx(np.std([100.0, (75 + 200 / 3) / 2], ddof=1))
    table = A.format_table([("stub", s)], ["sw", "hi"])
    assert "87.50±17.68" in table and "83.33±23.57" in table and "85.42±20.62" in table
    A.write_bench_outputs(tmp_path, records, s, dict(label="stub"))
    rows = [json.loads(l) for l in open(tmp_path / "predictions.jsonl", encoding="utf-8")]
    assert sum(r["correct"] for r in rows) == 7 + 5 and rows[0]["output"].startswith("Reasoning")
    csv_rows = B.read_rows(tmp_path / "table.csv")
    assert [r["lang"] for r in csv_rows] == ["sw", "hi", "avg"] and float(csv_rows[0]["mean"]) == 87.5


def test_one_run_prints_the_mean_alone_and_different_language_sets_warn():
    one = dict(langs={"sw": dict(mean=50.0, std=None)}, average=dict(mean=50.0, std=None))
    two = dict(langs={"sw": dict(mean=40.0, std=2.0), "hi": dict(mean=60.0, std=1.0)},
               average=dict(mean=50.0, std=1.5))
    table = A.format_table([("one", one), ("two", two)], ["sw", "hi"])
    assert "50.00 " in table and "50.00±" not in table.splitlines()[1] and "40.00±2.00" in table
    assert table.splitlines()[-1] == "warning: the Avg column is over different language sets: one: sw; two: sw,hi"
    assert "warning" not in A.format_table([("two", two), ("again", two)], ["sw", "hi"])


def test_corrupt_or_foreign_results_json_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"benchmark": "mgsm", "langs": {', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"run/results\.json: not valid JSON"):
        A.load_results(tmp_path / "run")
    (tmp_path / "other.json").write_text('{"accuracy": 3}', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"other\.json: not an eval\.py bench results\.json"):
        A.load_results(tmp_path / "other.json")
    with pytest.raises(SystemExit, match="no such file"):
        A.load_results(tmp_path / "missing")


def preds(scores, parallel=True, bench="mgsm"):
    """{lang: [score per item]} -> the load_predictions layout, ids 0..n-1."""
    return {(bench, l): {str(i): ("1", float(x), parallel) for i, x in enumerate(v)} for l, v in scores.items()}


def test_a_language_on_one_side_only_is_not_dropped_silently():
    a, b = preds({"sw": [1, 0], "hi": [1, 1]}), preds({"sw": [1, 1], "hi": [0, 1], "bn": [1, 1]})
    with pytest.raises(SystemExit, match="mgsm:bn only in --b"):
        A.pair_conditions([a], [b])
    with pytest.raises(SystemExit, match="mgsm:bn only in --a"):
        A.pair_conditions([b], [a])
    pairs = A.pair_conditions([a], [b], common_only=True)
    assert pairs["units"] == ["sw", "hi"] and pairs["notes"] == ["mgsm:bn only in --b"]


def test_pairing_uses_joint_ids_only_for_parallel_items():
    a, b = preds({"sw": [1, 0, 0], "hi": [1, 1, 0]}), preds({"sw": [1, 1, 0], "hi": [0, 1, 1]})
    pairs = A.pair_conditions([a], [b])
    assert pairs["ids"] == {"sw": ["mgsm#0", "mgsm#1", "mgsm#2"], "hi": ["mgsm#0", "mgsm#1", "mgsm#2"]}
    res = A.compare_conditions(pairs, resamples=200)
    assert "jointly" in res["bootstrap"]["overall"]["resampling"] and res["seeds"] == 1
    assert "test-item noise only" in res["note"] and "seed_level" not in res
    assert res["bootstrap"]["sw"]["delta"] == pytest.approx(100 / 3) and res["bootstrap"]["hi"]["delta"] == 0
    assert res["bootstrap"]["sw"]["p_holm"] >= res["bootstrap"]["sw"]["p"]
    a, b = preds({"sw": [1, 0, 0]}, parallel=False), preds({"sw": [1, 1, 0]}, parallel=False)
    pairs = A.pair_conditions([a], [b])
    assert pairs["ids"] is None
    assert "on its own" in A.compare_conditions(pairs, resamples=200)["bootstrap"]["overall"]["resampling"]


def test_seed_level_interval_by_hand():
    """Three seeds per condition, 4 items in sw and hi. Per seed Δ (points): sw 25, 50, 0; hi 0, 25, 25;
    overall (mean over languages) 12.5, 37.5, 12.5 -> t interval over the three."""
    a = [preds({"sw": [1, 0, 0, 0], "hi": [1, 1, 0, 0]})] * 3
    b = [preds({"sw": [1, 1, 0, 0], "hi": [1, 1, 0, 0]}), preds({"sw": [1, 1, 1, 0], "hi": [1, 1, 1, 0]}),
         preds({"sw": [1, 0, 0, 0], "hi": [1, 1, 0, 1]})]
    res = A.compare_conditions(A.pair_conditions(a, b), resamples=200)
    seed = res["seed_level"]
    assert seed["sw"]["deltas"] == pytest.approx([25, 50, 0]) and seed["hi"]["deltas"] == pytest.approx([0, 25, 25])
    assert seed["overall"]["deltas"] == pytest.approx([12.5, 37.5, 12.5])
    m, sd = 62.5 / 3, float(np.std([12.5, 37.5, 12.5], ddof=1))
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, df 2}
    assert seed["overall"]["mean"] == pytest.approx(m) and seed["overall"]["df"] == 2
    assert (seed["overall"]["lo"], seed["overall"]["hi"]) == pytest.approx((m - half, m + half))
    # the item-level bootstrap runs on seed-averaged items: sw item 1 is 1 - 0 in 2 of 3 seeds
    assert res["bootstrap"]["sw"]["delta"] == pytest.approx(100 * (2 / 3 + 1 / 3 + 0) / 4)
    assert res["seeds"] == 3 and "training-seed noise" in res["note"]
    with pytest.raises(SystemExit, match="--a has 3 seeds and --b 2"):
        A.compare_conditions(A.pair_conditions(a, b[:2]))
