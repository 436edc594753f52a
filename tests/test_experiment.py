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


def bootstrap_by_loop(diff, items, n_resamples, rng_seed=0):
    """The documented resampling scheme, written out as loops: diff {(seed, id): value},
    items {id: group}."""
    seeds = sorted({s for s, _ in diff})
    groups = sorted(set(items.values()))
    members = {g: [i for i in items if items[i] == g] for g in groups}
    rng = np.random.default_rng(rng_seed)
    seed_idx = rng.integers(0, len(seeds), (n_resamples, len(seeds)))
    group_idx = rng.integers(0, len(groups), (n_resamples, len(groups)))
    stats = []
    for r in range(n_resamples):
        values = [diff[seeds[s], i] for s in seed_idx[r] for g in group_idx[r] for i in members[groups[g]]]
        stats.append(sum(values) / len(values))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(np.mean(list(diff.values()))), float(lo), float(hi)


def test_table_has_every_language_and_condition(quick):
    md, summary = quick["md"], quick["summary"]
    assert summary["langs"] == ["sw", "hi", "bn", "te", "ne"]
    header = next(line for line in md.splitlines() if line.startswith("| lang | items |"))
    assert all(label in header for label in LABELS) and all(f"Δ ({c})" in header for c in "bcd")
    for lang in summary["langs"] + ["all"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {lang} | {summary['n_items'][lang]} |"))
        assert row.count("[") == 3  # three paired intervals
        assert set(summary["ce"][lang]) == {"base", "plain", "band", "all", "random"}
    assert summary["verdict"] in ("helped", "no detectable effect", "hurt")
    assert f"— {summary['verdict']}.**" in md
    for png in ("routing_js.png", "heldout_ce.png"):
        if importlib.util.find_spec("matplotlib"):
            assert (quick["results"] / png).stat().st_size > 10_000


@pytest.mark.parametrize("lang", ["te", "all"])
def test_paired_statistics_are_recomputed_from_the_per_item_numbers(quick, lang):
    rows, summary = quick["rows"], quick["summary"]
    ce = lambda c: {(int(r["seed"]), r["id"]): float(r["ce"]) for r in rows
                    if r["condition"] == c and lang in ("all", r["lang"])}
    plain, band = ce("plain"), ce("band")
    assert plain.keys() == band.keys() and len(plain) == summary["n_items"][lang] * len(summary["seeds"])
    diff = {k: band[k] - plain[k] for k in plain}
    items = {r["id"]: r["group"] for r in rows if r["condition"] == "plain" and lang in ("all", r["lang"])}
    want = bootstrap_by_loop(diff, items, summary["n_resamples"])
    assert np.allclose(summary["delta"][lang]["band"], want, rtol=0, atol=1e-9), (summary["delta"][lang]["band"], want)
    assert f"{want[0]:+.3f} [{want[1]:+.3f}, {want[2]:+.3f}]" in quick["md"]
    assert want[1] <= want[0] <= want[2]
    per_seed = [np.mean([v for (s, _), v in plain.items() if s == seed]) for seed in summary["seeds"]]
    assert abs(summary["ce"][lang]["plain"][0] - np.mean(per_seed)) < 1e-9


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
    base = torch.load(run / "base.pt", weights_only=False)
    model = MoETransformer(MoEConfig.from_dict(base["config"]))
    model.load_state_dict(torch.load(run / "ckpt" / "state.pt", weights_only=False)["model"])
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
            digests[cond] = [r["batch"] for r in rows if "batch" in r]
            assert not any(r["phase"] == "pretrain" for r in rows)  # stage 0 ran once, in the base run
        assert len(digests["plain"]) > 0 and all(d == digests["plain"] for d in digests.values())
    band, rand = summary["band"], summary["random_bands"]
    assert all(r != band and r[1] - r[0] == band[1] - band[0] for r in rand.values())


def test_bootstrap_vectorised_equals_loops_and_detects_a_shift():
    driver = load_driver()
    rng = np.random.default_rng(5)
    ids = [f"p{i:02d}-{lang}" for i in range(12) for lang in ("sw", "hi")]
    group = [i.split("-")[0] for i in ids]
    diff = rng.normal(0.0, 1.0, (3, len(ids)))
    got = driver.paired_bootstrap(diff, group, 500)
    want = bootstrap_by_loop({(s, i): diff[s, j] for s in range(3) for j, i in enumerate(ids)}, dict(zip(ids, group)), 500)
    assert np.allclose(got, want, atol=1e-12)
    shifted = driver.paired_bootstrap(diff * 0.01 - 1.0, group, 500)
    assert shifted[2] < 0 and driver.verdict(*shifted[1:]) == "helped"
    assert driver.verdict(*driver.paired_bootstrap(diff * 0.01 + 1.0, group, 500)[1:]) == "hurt"
