"""compare.py: --quick end to end (a row per method and per steering row, identical batches, results.json, the
held-out CE checked against the loop's), --reanalyse without training, steering rows added to finished runs
(strength 0 equal to the unsteered row bit for bit; SteerMoE on the pooled target languages), a run on other
batches refused, bad flags refused before training, and the table's paired interval against a hand computation."""
import json
import os
import subprocess
import sys

import pytest

import compare as C
from compare import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["plain", "sara", "live_kl", "shifcon", "frozen_routers", "mismatched", "sara_all_layers", "sara_random_band"]
STEERED = ["original+steering", "plain+steering", "sara+steering"]


def compare(*args):
    return subprocess.run([sys.executable, "compare.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def rows_of(stdout):
    return {line.split()[0]: line for line in stdout.splitlines() if line and line.split()[0] in METHODS + STEERED}


def test_quick_comparison_then_reanalyse(tmp_path):
    """Measured: 77 s on 2 busy cores (load 4-5), 63 s without the steering rows and their two re-analyses."""
    out = tmp_path / "cmp"
    res = compare("--quick", "--jobs", "2", "--out_dir", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = rows_of(res.stdout)
    assert sorted(rows) == sorted(METHODS + STEERED) and "original (before)" in res.stdout
    assert "(reference)" in rows["plain"] and all("[" in rows[m] for m in METHODS if m != "plain")  # t intervals
    results = json.loads((out / "results.json").read_text())
    assert results["platform"]["torch"] and results["seeds"] == [1, 2]
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    assert len([r for r in runs if r[0] in METHODS]) == 2 * len(METHODS) and len(runs) == 2 * (len(METHODS) + len(STEERED) + 1)
    for seed in (1, 2):  # identical batches, from the runs' own metrics.jsonl
        digests = {m: runs[m, seed]["batches"] for m in METHODS}
        assert len(digests["plain"]) >= 2 and all(d == digests["plain"] for d in digests.values())
    assert runs["plain", 1]["batches"] != runs["plain", 2]["batches"]  # (the seed does pick the order)
    s = {m: runs[m, 1]["settings"] for m in METHODS}  # each method's settings recorded with its results
    assert s["plain"]["lambda_js"] == 0 and s["live_kl"]["method"] == "live_kl" and s["frozen_routers"]["freeze_routers"]
    assert s["mismatched"]["anchor_shuffle"] and s["sara"]["lambda_js"] > 0 and s["shifcon"]["method"] == "shifcon"
    assert s["sara_all_layers"]["sara_layer_list"] == [0, 1, 2]  # the quick toy's 3 MoE layers; its SARA band is (1, 1)
    assert [tuple(runs["sara_random_band", seed]["settings"]["sara_band"]) for seed in (1, 2)] != [(1, 1)] * 2
    assert all(runs["sara_random_band", seed]["settings"]["sara_band"] in ([0, 0], [2, 2]) for seed in (1, 2))
    assert results["methods"]["sara_random_band"]["1"]["sara_band"] == runs["sara_random_band", 1]["settings"]["sara_band"]
    assert runs["plain", 1]["val_ce"] != runs["sara", 1]["val_ce"]  # the methods did differ
    for (m, seed), r in runs.items():  # compare's own held-out CE is the loop's (metrics.jsonl), ShifCon's shifted
        if m not in STEERED:
            assert (r["inference"] is None) == (m != "shifcon") and abs(r["val_ce"] - r["val_ce_loop"]) < 1e-4, (m, seed)
    assert runs["shifcon", 1]["inference"]["kind"] == "shifcon" and os.path.exists(runs["shifcon", 1]["inference"]["vectors"])
    check_steering_rows(out, runs, rule="chen", strength=0.022)

    again = compare("--reanalyse", "--quick", "--jobs", "2", "--out_dir", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[seed" not in again.stdout and rows_of(again.stdout) == rows  # nothing trained or evaluated, the same table

    # steering on finished runs (the documented command): SteerMoE, the target languages pooled
    moe = compare("--reanalyse", "--quick", "--out_dir", str(out), "--methods", "sara+steering",
                  "--steering_rule", "steermoe", "--steering_strength", "1")
    assert moe.returncode == 0, moe.stderr[-3000:]
    assert "evaluated again" in moe.stdout and sorted(rows_of(moe.stdout)) == ["plain", "sara", "sara+steering"]
    moe_runs = {(r["method"], r["seed"]): r for r in json.loads((out / "results.json").read_text())["runs"]}
    check_steering_rows(out, moe_runs, rule="steermoe", strength=1, rows=["sara+steering"])
    # the oracle: strength 0 (chen's lambda) is the unsteered row, bit for bit
    zero = compare("--reanalyse", "--quick", "--out_dir", str(out), "--methods", "original+steering,sara+steering",
                   "--steering_strength", "0")
    assert zero.returncode == 0, zero.stderr[-3000:]
    zero_runs = {(r["method"], r["seed"]): r for r in json.loads((out / "results.json").read_text())["runs"]}
    for seed in (1, 2):
        for steered, plain in (("sara+steering", "sara"), ("original+steering", "original")):
            assert zero_runs[steered, seed]["inference"]["strength"] == 0
            assert (zero_runs[steered, seed]["val_ce"], zero_runs[steered, seed]["js_band"]) == \
                   (zero_runs[plain, seed]["val_ce"], zero_runs[plain, seed]["js_band"])
        assert moe_runs["sara+steering", seed]["js_band"] != zero_runs["sara", seed]["js_band"]  # SteerMoE acted

    (out / "seed1" / "shifcon" / "hf" / "shifcon.json").unlink()  # a ShifCon export without its vectors is never
    (out / "seed1" / "shifcon" / "eval.json").unlink()               # evaluated unshifted in its place
    lost = compare("--reanalyse", "--quick", "--out_dir", str(out), "--methods", "shifcon")
    assert lost.returncode != 0 and "shifcon.json is missing" in lost.stderr, lost.stderr[-2000:]

    metrics = out / "seed2" / "live_kl" / "metrics.jsonl"  # a run that saw other batches is refused
    metrics.write_text(metrics.read_text().replace(runs["live_kl", 2]["batches"][1][1], "0" * 12))
    bad = compare("--reanalyse", "--quick", "--out_dir", str(out))
    assert bad.returncode != 0 and "seed 2: ['live_kl'] did not train on the same batches" in bad.stderr


def check_steering_rows(out, runs, rule, strength, rows=STEERED):
    """The steering rows of a finished comparison: what ran is recorded, and the statistics file of each is
    measured on the model it steers, on train.py's TRAINING rows (token counts by hand: the chat-formatted
    rows cut at max_len=64), the target languages pooled."""
    from data.parallel import load_parallel_jsonl, split_train_val
    from tokenizer import load_tokenizer
    from settings import TOY_TOKENIZER
    tok = load_tokenizer(TOY_TOKENIZER)
    train, _ = split_train_val(load_parallel_jsonl(os.path.join(ROOT, "data", "udhr", "parallel.jsonl")), 0.15, seed=0)
    n = {lang: sum(min(len(sum(tok.encode_chat(x["prompt"], x["response"]), [])), 64) for x in train if x["lang"] == lang)
         for lang in ("en", "zh", "sw", "hi")}
    for m in rows:
        for seed in (1, 2):
            r = runs[m, seed]
            assert r["inference"]["rule"] == rule and r["inference"]["strength"] == strength
            assert r["inference"]["layers"] == [1, 1]  # the SARA band of --quick, sara_band=(1, 1)
            assert r["inference"]["target"] == ("sw+hi" if rule == "steermoe" else None)
            assert r["trained_as"] == {"original+steering": None, "plain+steering": "plain", "sara+steering": "sara"}[m]
            stats = json.loads((out / f"seed{seed}" / m / "steering_stats.json").read_text())
            assert stats["n_tokens"] == dict(n, **{"sw+hi": n["sw"] + n["hi"]})
    if "plain+steering" in rows:  # measured on each model: SARA's routing is not plain's
        stats = [json.loads((out / "seed1" / m / "steering_stats.json").read_text())["freq"] for m in ("plain+steering", "sara+steering")]
        assert stats[0] != stats[1]


def test_compare_refuses_bad_arguments_before_training(tmp_path):
    res = compare("--out_dir", str(tmp_path), "--methods", "plain,sara2")
    assert res.returncode != 0 and "sara2" in res.stderr and "unknown" in res.stderr
    res = compare("--out_dir", str(tmp_path), "--seed=3")
    assert res.returncode != 0 and "compare.py sets" in res.stderr
    res = compare("--out_dir", str(tmp_path), "--quick", "--lambda_js=-1")
    assert res.returncode != 0 and "lambda_js" in res.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize("argv, message", [
    (["--steering_rule", "mean"], "--steering_rule 'mean': one of ('chen', 'steermoe')"),
    (["--steering_rule", "steermoe"], "--steering_rule steermoe: give --steering_strength N"),
    (["--steering_rule", "steermoe", "--steering_strength", "0.5"], "--steering_strength 0.5: for steermoe, the number"),
    (["--steering_rule", "steermoe", "--steering_strength", "13"], "--steering_strength 13: at most 3 (layer, expert) pairs"),
    (["--steering_strength", "nan"], "--steering_strength nan: for chen, the finite lambda"),
    (["--steering_layers", "1,5"], "--steering_layers 1,5: outside the model's decoder layers 0..2"),
    (["--steering_layers", "1"], "--steering_layers '1': an inclusive pair start,end"),
    (["--steering_guides", "en"], "chen needs two or more guiding languages"),
    (["--steering_guides", "en,xx"], "--steering_guides en,xx: no training rows of ['xx']"),
    (["--sara_layer_list=[0, 2]"], "--steering_layers: the default is the SARA band, but sara_layer_list=[0, 2] is not contiguous"),
    (["--methods", "plain,sara", "--steering_layers", "1,1"], "['--steering_layers']: no steering row in --methods"),
])
def test_bad_steering_flags_are_refused_before_training(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        C.main(["--quick", "--out_dir", str(tmp_path / "cmp"), *argv])
    assert message in str(err.value) + capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was started


def test_table_interval_is_the_paired_t_interval_of_per_seed_differences():
    runs = [dict(method=m, seed=s, val_ce=ce, js_band=js)
            for m, s, ce, js in [("plain", 1, 2.0, 0.10), ("plain", 2, 2.2, 0.12), ("plain", 3, 2.1, 0.11),
                                 ("sara", 1, 1.9, 0.05), ("sara", 2, 2.0, 0.06), ("sara", 3, 2.1, 0.04)]]
    text = table(runs, ["plain", "sara"], [1, 2, 3])
    # by hand: differences -0.1, -0.2, 0.0: mean -0.1, sd 0.1, se 0.1/sqrt(3); t_0.975,2 = 4.302653
    half = 4.302653 * 0.1 / 3 ** 0.5
    assert f"-0.1000 [{-0.1 - half:+.4f}, {-0.1 + half:+.4f}]" in rows_of(text)["sara"]
    assert f"{(1.9 + 2.0 + 2.1) / 3:>9.4f}" in rows_of(text)["sara"]
