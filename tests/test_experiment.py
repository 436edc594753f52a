"""experiments/toy_sara.py: the --quick study end to end (this is the CI run of the experiment), and
its statistics recomputed here, independently, from the per-item numbers it writes."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["base (before)", "(a) plain", "(b) SARA band", "(c) SARA all", "(d) random band"]


def load_driver():
    spec = importlib.util.spec_from_file_location("toy_sara", os.path.join(ROOT, "experiments", "toy_sara.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy_sara")
    cmd = [sys.executable, "experiments/toy_sara.py", "--quick", "--out", str(tmp / "runs"), "--results", str(tmp / "results")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    summary = json.load(open(tmp / "results" / "summary.json"))
    rows = list(csv.DictReader(open(tmp / "results" / "per_item.csv")))
    return dict(runs=tmp / "runs", results=tmp / "results", summary=summary, rows=rows,
                md=(tmp / "results" / "results.md").read_text())


def test_table_has_every_language_and_condition(quick):
    md, summary = quick["md"], quick["summary"]
    assert summary["langs"] == ["sw", "hi", "bn", "te", "ne"]
    header = next(line for line in md.splitlines() if line.startswith("| lang | items |"))
    assert all(label in header for label in LABELS) and all(f"Δ ({c})" in header for c in "bcd")
    for lang in summary["langs"] + ["all"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {lang} | {summary['n_items'][lang]} |"))
        assert row.count("[") == 3 and row.count("(p ") == 3  # three paired intervals with p
        assert set(summary["ce"][lang]) == {"base", "plain", "band", "all", "random"}
    assert summary["verdict"] in ("helped", "no detectable effect", "hurt")
    assert summary["platform"]["torch"] == torch.__version__  # where the numbers were made
    assert f"— {summary['verdict']}.**" in md
    for png in ("routing_js.png", "heldout_ce.png"):
        if importlib.util.find_spec("matplotlib"):
            assert (quick["results"] / png).stat().st_size > 10_000


@pytest.mark.parametrize("lang", ["te", "all"])
def test_seed_level_interval_recomputed_from_the_per_item_numbers(quick, lang):
    # the oracle: scipy's t distribution on the per-seed mean differences, computed here from the CSV
    from scipy import stats as sps
    rows, summary = quick["rows"], quick["summary"]
    ce = lambda c: {(int(r["seed"]), r["id"]): float(r["ce"]) for r in rows
                    if r["condition"] == c and lang in ("all", r["lang"])}
    plain, band = ce("plain"), ce("band")
    assert plain.keys() == band.keys() and len(plain) == summary["n_items"][lang] * len(summary["seeds"])
    per_seed = np.array([np.mean([band[k] - plain[k] for k in plain if k[0] == s]) for s in summary["seeds"]])
    n = len(per_seed)
    se = per_seed.std(ddof=1) / np.sqrt(n)
    half = sps.t.ppf(0.975, n - 1) * se
    p = 2 * sps.t.sf(abs(per_seed.mean()) / se, n - 1)
    want = [per_seed.mean(), per_seed.mean() - half, per_seed.mean() + half, p]
    assert np.allclose(summary["delta"][lang]["band"], want, rtol=1e-6, atol=1e-9), (summary["delta"][lang]["band"], want)
    assert f"{want[0]:+.3f} [{want[1]:+.3f}, {want[2]:+.3f}] (p {want[3]:.2f})" in quick["md"]
    plain_per_seed = [np.mean([v for (s, _), v in plain.items() if s == seed]) for seed in summary["seeds"]]
    assert abs(summary["ce"][lang]["plain"][0] - np.mean(plain_per_seed)) < 1e-9


def test_reported_items_are_not_training_prompts(quick):
    # independent of the driver: rebuild train.py's split here and compare texts
    from data.parallel import load_parallel_jsonl, split_train_val
    t = quick["summary"]["settings"]["train"]
    samples = load_parallel_jsonl(os.path.join(ROOT, t["data_path"]))
    train, val = split_train_val(samples, t["val_fraction"], seed=0)
    prompts = {s["prompt"].strip() for s in train if s["lang"] in t["train_langs"]}
    by_id = {s["id"]: s for s in val}
    reported = {r["id"] for r in quick["rows"]}
    assert reported and all(by_id[i]["response"].strip() not in prompts for i in reported)
    val_targets = [s for s in val if s["lang"] in t["train_langs"]]
    # every held-out target row that is not a training prompt is reported (the filter drops no more)
    assert reported == {s["id"] for s in val_targets if s["response"].strip() not in prompts}
    assert len(reported) < len(val_targets)  # the committed data has such rows: the filter is exercised


def test_one_held_out_loss_recomputed_from_the_checkpoint(quick):
    # the model's own loss (labels= path, one sequence, no padding) vs the batched per-item CE in the CSV
    from data.parallel import load_parallel_jsonl, tokenize_samples
    from model import MoEConfig, MoETransformer
    from tokenizer import load_tokenizer
    row = next(r for r in quick["rows"] if r["condition"] == "band" and r["lang"] == "hi")
    t = quick["summary"]["settings"]["train"]
    sample = next(s for s in load_parallel_jsonl(os.path.join(ROOT, t["data_path"])) if s["id"] == row["id"])
    example = tokenize_samples(load_tokenizer(os.path.join(ROOT, t["tokenizer_path"])), [sample], t["max_len"])[0][0]
    run = quick["runs"] / f"seed{row['seed']}" / "band"
    base = torch.load(run / "base.pt", weights_only=True)
    model = MoETransformer(MoEConfig.from_dict(base["config"]))
    model.load_state_dict(torch.load(run / "ckpt" / "state.pt", weights_only=True)["model"])
    with torch.no_grad():
        loss = model.eval()(torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss
    assert abs(loss.item() - float(row["ce"])) < 1e-4
    assert int(row["n_tokens"]) == sum(l != -100 for l in example["labels"][1:])


def test_the_four_conditions_are_matched(quick):
    summary = quick["summary"]
    for seed in summary["seeds"]:
        digests = {}
        for cond in ("plain", "band", "all", "random"):
            rows = [json.loads(l) for l in open(quick["runs"] / f"seed{seed}" / cond / "metrics.jsonl")]
            assert rows[0]["header"] and rows[0]["platform"]["torch"] == torch.__version__  # where it was made
            rows = [r for r in rows if "header" not in r]
            digests[cond] = [r["batch"] for r in rows if "batch" in r]
            assert not any(r["phase"] == "pretrain" for r in rows)  # stage 0 ran once, in the base run
        assert len(digests["plain"]) > 0 and all(d == digests["plain"] for d in digests.values())
    band, rand = summary["band"], summary["random_bands"]
    assert all(r != band and r[1] - r[0] == band[1] - band[0] for r in rand.values())


def test_verdict_reads_the_interval():
    driver = load_driver()
    assert driver.verdict(-0.3, -0.1) == "helped" and driver.verdict(0.1, 0.2) == "hurt"
    assert driver.verdict(-0.1, 0.1) == "no detectable effect"
    # seed_interval: per-seed means first (3 seeds x 4 items, hand-computed t interval, df = 2)
    diff = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    mean, lo, hi, p = driver.seed_interval(diff)
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t_{0.975, 2} x sd 1 / sqrt(3)
    t = 2.0 / (1.0 / np.sqrt(3))
    p_df2 = 1 - t / np.sqrt(2 + t * t)  # two-sided Student t tail for df = 2, closed form
    assert np.allclose([mean, lo, hi, p], [2.0, 2.0 - half, 2.0 + half, p_df2], atol=1e-9)


def test_reanalyse_reproduces_the_run(quick, tmp_path):
    # --reanalyse recomputes the tables from the per-item file alone: on a run's own files it must
    # print the run's numbers (this is how the committed full-study tables were re-derived)
    import shutil
    shutil.copytree(quick["results"], tmp_path / "r")
    res = subprocess.run([sys.executable, "experiments/toy_sara.py", "--quick", "--reanalyse", "--results", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    again = (tmp_path / "r" / "results.md").read_text()
    assert again.startswith(quick["md"]) and "Re-analysed" in again[len(quick["md"]):]
    assert json.load(open(tmp_path / "r" / "summary.json"))["delta"] == quick["summary"]["delta"]
