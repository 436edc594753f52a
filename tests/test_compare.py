"""compare.py: --quick end to end (a row per method, identical batches, results.json), --reanalyse without
training, a run on other batches refused, and the table's paired interval against a hand computation."""
import json
import os
import subprocess
import sys

import pytest

from compare import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["plain", "sara", "live_kl", "frozen_routers", "mismatched"]


def compare(*args):
    return subprocess.run([sys.executable, "compare.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def rows_of(stdout):
    return {line.split()[0]: line for line in stdout.splitlines() if line and line.split()[0] in METHODS}


def test_quick_comparison_then_reanalyse(tmp_path):
    out = tmp_path / "cmp"
    res = compare("--quick", "--jobs", "2", "--out_dir", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = rows_of(res.stdout)
    assert sorted(rows) == sorted(METHODS) and "original (before)" in res.stdout
    assert "(reference)" in rows["plain"] and all("[" in rows[m] for m in METHODS if m != "plain")  # t intervals
    results = json.loads((out / "results.json").read_text())
    assert results["platform"]["torch"] and results["seeds"] == [1, 2]
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    assert len(runs) == 10
    for seed in (1, 2):  # identical batches, from the runs' own metrics.jsonl
        digests = {m: runs[m, seed]["batches"] for m in METHODS}
        assert len(digests["plain"]) >= 2 and all(d == digests["plain"] for d in digests.values())
    assert runs["plain", 1]["batches"] != runs["plain", 2]["batches"]  # (the seed does pick the order)
    s = {m: runs[m, 1]["settings"] for m in METHODS}  # each method's settings recorded with its results
    assert s["plain"]["lambda_js"] == 0 and s["live_kl"]["method"] == "live_kl" and s["frozen_routers"]["freeze_routers"]
    assert s["mismatched"]["anchor_shuffle"] and s["sara"]["lambda_js"] > 0
    assert runs["plain", 1]["val_ce"] != runs["sara", 1]["val_ce"]  # the methods did differ

    again = compare("--reanalyse", "--quick", "--jobs", "2", "--out_dir", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[seed" not in again.stdout and rows_of(again.stdout) == rows  # nothing trained, the same table

    metrics = out / "seed2" / "live_kl" / "metrics.jsonl"  # a run that saw other batches is refused
    metrics.write_text(metrics.read_text().replace(runs["live_kl", 2]["batches"][1][1], "0" * 12))
    bad = compare("--reanalyse", "--quick", "--out_dir", str(out))
    assert bad.returncode != 0 and "seed 2: ['live_kl'] did not train on the same batches" in bad.stderr


def test_compare_refuses_bad_arguments_before_training(tmp_path):
    res = compare("--out_dir", str(tmp_path), "--methods", "plain,sara2")
    assert res.returncode != 0 and "sara2" in res.stderr and "unknown" in res.stderr
    res = compare("--out_dir", str(tmp_path), "--seed=3")
    assert res.returncode != 0 and "compare.py sets" in res.stderr
    res = compare("--out_dir", str(tmp_path), "--quick", "--lambda_js=-1")
    assert res.returncode != 0 and "lambda_js" in res.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


def test_table_interval_is_the_paired_t_interval_of_per_seed_differences():
    runs = [dict(method=m, seed=s, val_ce=ce, js_band=js, val_ce_before=3.0, js_band_before=0.5)
            for m, s, ce, js in [("plain", 1, 2.0, 0.10), ("plain", 2, 2.2, 0.12), ("plain", 3, 2.1, 0.11),
                                 ("sara", 1, 1.9, 0.05), ("sara", 2, 2.0, 0.06), ("sara", 3, 2.1, 0.04)]]
    text = table(runs, ["plain", "sara"], [1, 2, 3])
    # by hand: differences -0.1, -0.2, 0.0: mean -0.1, sd 0.1, se 0.1/sqrt(3); t_0.975,2 = 4.302653
    half = 4.302653 * 0.1 / 3 ** 0.5
    assert f"-0.1000 [{-0.1 - half:+.4f}, {-0.1 + half:+.4f}]" in rows_of(text)["sara"]
    assert f"{(1.9 + 2.0 + 2.1) / 3:>9.4f}" in rows_of(text)["sara"]
