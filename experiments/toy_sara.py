"""
The controlled toy experiment: what SARA does, on real parallel text, on a CPU.

    python experiments/toy_sara.py            # the full study: 3 seeds x 4 conditions, results in experiments/results/
    python experiments/toy_sara.py --quick    # 2 seeds, tiny model, a few minutes (CI: tests/test_experiment.py)

For each seed, train.py's stage 0 pretrains a small MoE on the bundled UDHR text (data/udhr) with
English and the other non-target languages plentiful and the five target languages scarce
(pretrain_target_fraction). That model is "the original model". Then four fine-tunings start from
the identical base.pt, see identical batches in identical order and take the same number of steps:
    (a) plain   lambda_js = 0 (the JS term is logged, never differentiated)
    (b) band    SARA on a contiguous band of middle layers (the paper's method)
    (c) all     SARA on every MoE layer            (paper, Table 2: worse than plain)
    (d) random  SARA on a random band of the same size, drawn per seed, never the band of (b)
The band of (b) follows the paper's rule: middle layers at the bottom of the per-layer divergence
curve of the original model, i.e. among the contiguous windows of `band_size` layers that leave out
the first and the last layer, the one with the lowest mean JS between target and anchor routing,
measured on the TRAINING items (never on the held-out ones), averaged over seeds. The driver
asserts that the four runs of a seed saw the same batches (train.py's per-step `batch` digests)
and the same step-0 loss (same weights).

Measured on the held-out split of train.py (split_train_val(samples, val_fraction, seed=0), by
UDHR paragraph). A held-out paragraph is unseen as a RESPONSE in fine-tuning, but each UDHR row's
prompt is the preceding paragraph, so most held-out paragraphs are the prompt of a training row.
Stage 0 pretrains on the training split only (split by group), so a held-out row is never trained on as
a response; only the tokenizer's BPE merges saw every paragraph. The study reports only the held-out rows whose
response is no training row's prompt (unseen_heldout, asserted; 22 of 65 with the committed data):
  - per item: mean cross-entropy over response tokens (nats/token), the quantity train.py trains on;
  - per item and MoE layer: JS(original model's pooled routing on the English anchor || model's
    pooled routing on the target text) -- the quantity SARA pulls down (sara_loss.py), before
    (the base model) and after (each fine-tuned model); also the same-model JS (fine-tuned model on
    English vs on the target), the paper's Figure 5 view.
Statistics: mean +- std over seeds of per-seed means; for (b)-(a), (c)-(a), (d)-(a) a paired
comparison at the SEED level: per seed the mean over items of the paired difference, then a 95%
Student t interval over seeds and its two-sided p (stats.t_interval). The items of one seed share a
model: they are not independent replicates, the seeds are (with 3 seeds the interval is wide). A
verdict ("helped", "no detectable effect", "hurt") is read off the interval of (b)-(a) over all
languages. What this study cannot show: transfer. Nothing is learned in English that the target
languages could use (English is not high-resource here: the same paragraphs as every language),
and the metric is language-model loss; experiments/transfer.py is the study built for that.

Design decisions:
- train.py runs as a subprocess, so the experiment exercises the exact training code a reader runs.
  Runs go to out/toy_sara[_quick]/ (ignored by git); a finished run whose arguments are unchanged
  is reused, anything else is redone from scratch.
- Every setting that matters is passed on the command line (recorded in summary.json); none is left
  to configs/toy.py, so an edit there does not silently change this study.
- The fine-tuned weights are read from the run's final training checkpoint (ckpt/state.pt, written
  at the last step) with export_hf=False: the same tensors as the Hugging Face export, without the
  extra copy. The driver recomputes train.py's own final val_ce and val_js_per_layer from its
  per-item numbers and asserts they agree, so a wrongly loaded model cannot go unnoticed.
- train.py processes run --jobs at a time (default 2), each with cpu_count // jobs threads; the
  three stage-0 runs all at once (they are the longest, and all must finish before the band is
  chosen). Measured on a 2-core machine shared with other jobs (load average 1-5): the full study
  took 23 and 25 min wall in two runs (identical numbers), --quick 1 min.
"""
import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
from data.parallel import collate, group_key, load_parallel_jsonl, split_train_val, tokenize_samples  # noqa: E402
from evaluation.figures import pyplot  # noqa: E402  matplotlib, optional
from evaluation.routing import choose_band  # noqa: E402
from loop import read_metrics  # noqa: E402  metrics.jsonl without its header rows
from provenance import platform_info  # noqa: E402
from sara_loss import js_divergence, pool_routing  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
import stats  # noqa: E402  seed-level t-interval, mean/std

# -----------------------------------------------------------------------------
# settings: the train.py overrides shared by every run, and the study's own
MODEL = dict(vocab_size=4096, hidden_size=64, n_layers=6, n_heads=4, n_kv_heads=2, intermediate_size=128,
             n_experts=8, top_k=2, moe_intermediate_size=64, qk_norm=True, norm_topk_prob=True,
             max_position_embeddings=512, router_aux_loss_coef=0.01,
             # the committed results were made with the per-expert loop; the grouped CPU path (the
             # default since) is the same function in another floating-point order: pinned so that
             # this code reproduces them
             expert_impl="loop")
FULL = dict(
    seeds=[0, 1, 2], band_size=3,
    train=dict(model_config=MODEL, pretrain_iters=300, pretrain_lr=3e-3, pretrain_target_fraction=0.2,
               data_path="data/udhr/parallel.jsonl", tokenizer_path="data/udhr/bpe.tiktoken",
               train_langs=["sw", "hi", "bn", "te", "ne"], anchor_lang="en", val_fraction=0.25, max_len=160,
               lambda_js=1.5, lambda_lb=-1.0, anchor_mode="offline", epochs=6, global_batch=16, micro_batch=16,
               lr=1e-3, warmup_frac=0.1, min_lr_frac=0.0, weight_decay=0.01, grad_clip=1.0,
               device="cpu", dtype="float32", export_hf=False, log_interval=1, ckpt_interval=10 ** 6),
)
QUICK = dict(
    seeds=[0, 1], band_size=3,
    train={**FULL["train"], "model_config": {**MODEL, "hidden_size": 32, "n_heads": 2, "n_kv_heads": 1,
                                            "n_experts": 4, "moe_intermediate_size": 32},
           "pretrain_iters": 40, "epochs": 1, "max_len": 128},
)
CONDITIONS = ["plain", "band", "all", "random"]  # (a), (b), (c), (d)
LABELS = {"base": "base (before)", "plain": "(a) plain", "band": "(b) SARA band", "all": "(c) SARA all",
          "random": "(d) random band"}


# -----------------------------------------------------------------------------
# running train.py
def train_args(settings, out_dir, seed, **extra):
    kw = {**settings["train"], "out_dir": out_dir, "seed": seed, **extra}
    return ["configs/toy.py"] + [f"--{k}={v!r}" for k, v in kw.items()]


def run_train(args, out_dir, threads, done_file, stamp=None, prepare=None):
    """Run train.py unless out_dir holds a finished run (done_file) with the same stamp (default:
    the arguments). Anything else is wiped first: metrics.jsonl appends, a half-run would pollute it.
    prepare(): called on the fresh out_dir before train.py starts (e.g. to place base.pt)."""
    stamp = stamp or args
    stamp_file = os.path.join(out_dir, "args.json")
    if os.path.exists(done_file) and os.path.exists(stamp_file) and json.load(open(stamp_file)) == stamp:
        return "reused"
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    if prepare:
        prepare()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(os.path.join(out_dir, "train.log"), "w") as logf:
        res = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = open(os.path.join(out_dir, "train.log")).read()[-3000:]
        raise SystemExit(f"train.py failed in {out_dir} (exit {res.returncode}):\n{tail}")
    json.dump(stamp, open(stamp_file, "w"))
    return f"{time.time() - t0:.0f}s"


def pool_map(fn, jobs, n_workers):
    with ThreadPoolExecutor(n_workers) as ex:
        return list(ex.map(lambda j: fn(*j), jobs))


def file_digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# data and models, exactly as train.py builds them
def load_split(settings):
    """-> (tokenizer, train examples, held-out examples, kept) of the target languages, in train.py's
    order; kept[i] is True for the held-out items the study reports on (see unseen_heldout)."""
    t = settings["train"]
    tok = load_tokenizer(os.path.join(ROOT, t["tokenizer_path"]))
    samples = load_parallel_jsonl(os.path.join(ROOT, t["data_path"]))
    train, val = split_train_val(samples, t["val_fraction"], seed=0)
    targets = lambda rows: [s for s in rows if s["lang"] in t["train_langs"]]
    train, val = targets(train), targets(val)
    train_ex, val_ex = tokenize_samples(tok, train, t["max_len"])[0], tokenize_samples(tok, val, t["max_len"])[0]
    # kept is decided on the rows, then read for the examples tokenize_samples kept (it drops a row whose
    # prompt fills max_len), by id: position i of the rows is not position i of the examples
    kept_by_id = dict(zip((s["id"] for s in val), unseen_heldout(train, val)))
    return tok, train_ex, val_ex, [kept_by_id[e["id"]] for e in val_ex]


def unseen_heldout(train, val):
    """Each UDHR row's prompt is the preceding paragraph, so a held-out paragraph is often the PROMPT
    of a training row (43 of 65 with the committed split): the model was trained on its text. Only
    held-out rows whose response is no training row's prompt are reported; asserted here."""
    train_prompts = {s["prompt"].strip() for s in train}
    kept = [s["response"].strip() not in train_prompts for s in val]
    assert not train_prompts & {s["response"].strip() for s, k in zip(val, kept) if k}
    if not any(kept):
        raise SystemExit("every held-out response is the prompt of a training row: no unseen item to report")
    return kept


def load_base(run_dir):
    """The original model of a seed: train.py's base.pt, read by checkpoint.load_base (weights_only)."""
    return checkpoint.load_base(os.path.join(run_dir, "base.pt"))[0]


def load_finetuned(run_dir):
    """The weights of the last step: train.py's final checkpoint (see the docstring)."""
    model = load_base(run_dir)
    state = torch.load(os.path.join(run_dir, "ckpt", "state.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def score(model, examples, pad_id, batch_size=16):
    """-> nll (N,) summed over response tokens, n_tok (N,), pooled routing on the target text and
    on the English anchor, each (N, L, E)."""
    nll, n_tok, target, anchor = [], [], [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = collate(chunk, pad_id)
        out = model(b["input_ids"], attention_mask=b["attention_mask"])
        labels_BT = b["labels"][:, 1:]  # position t predicts token t + 1
        tok_nll_BT = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), labels_BT, ignore_index=-100, reduction="none")
        nll.append(tok_nll_BT.double().sum(1))
        n_tok.append((labels_BT != -100).sum(1))
        target.append(pool_routing(out.router_logits, b["attention_mask"]))
        a = collate([dict(input_ids=e["anchor_input_ids"]) for e in chunk], pad_id)
        anchor.append(pool_routing(model(a["input_ids"], attention_mask=a["attention_mask"]).router_logits, a["attention_mask"]))
    return torch.cat(nll), torch.cat(n_tok), torch.cat(target), torch.cat(anchor)


# -----------------------------------------------------------------------------
# statistics
def seed_interval(diff_SI):
    """Paired comparison at the SEED level: each seed's mean difference over the items, then a
    Student t interval over seeds (stats.t_interval). Items of one seed share a model and are not
    independent replicates; the seeds are. -> [mean, lo, hi, p]."""
    t = stats.t_interval(np.asarray(diff_SI).mean(1))
    return [t["mean"], t["lo"], t["hi"], t["p"]]


def verdict(lo, hi):
    return "helped" if hi < 0 else "hurt" if lo > 0 else "no detectable effect"


# -----------------------------------------------------------------------------
# the study
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 seeds, tiny model, all four conditions (CI)")
    p.add_argument("--out", default=None, help="where the training runs go (default out/toy_sara[_quick])")
    p.add_argument("--results", default=None, help="tables and figures (default experiments/results, quick: <out>/results)")
    p.add_argument("--jobs", type=int, default=2, help="train.py processes at once")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="override the seeds")
    p.add_argument("--reanalyse", action="store_true",
                   help="no training: recompute the tables and figures from <results>/per_item.csv and summary.json "
                        "of an earlier full run (keeps only the reported held-out rows)")
    args = p.parse_args()
    settings = QUICK if args.quick else FULL
    if args.reanalyse:
        return reanalyse(os.path.abspath(args.results or os.path.join(ROOT, "experiments", "results")), settings)
    if args.seeds:
        settings = {**settings, "seeds": args.seeds}
    out = os.path.abspath(args.out or os.path.join(ROOT, "out", "toy_sara_quick" if args.quick else "toy_sara"))
    default_results = os.path.join(out, "results") if args.quick else os.path.join(ROOT, "experiments", "results")
    results = os.path.abspath(args.results or default_results)
    os.makedirs(results, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    torch.set_num_threads(threads)  # the driver's own forwards: on a shared machine, 2 threads can be slower than 1
    t_start, load_start = time.time(), os.getloadavg()
    seeds, n_layers = settings["seeds"], settings["train"]["model_config"]["n_layers"]
    tok, train_set, val_set, kept = load_split(settings)
    steps_per_epoch = max(1, len(train_set) // settings["train"]["global_batch"])
    print(f"{len(train_set)} training / {len(val_set)} held-out items ({sum(kept)} reported: their text is no training prompt); seeds {seeds}; {args.jobs} jobs x {threads} threads")

    # --- stage 0 per seed: the original model (train.py writes base.pt after stage 0; it has no
    # "stop after stage 0" switch and needs epochs >= 1, so this run also fine-tunes one epoch, unused)
    base_dir = lambda s: os.path.join(out, f"seed{s}", "base")
    jobs = [(train_args(settings, base_dir(s), s, epochs=1, eval_interval=10 ** 6), base_dir(s), threads,
             os.path.join(base_dir(s), "base.pt")) for s in seeds]
    # all seeds at once: three 1-thread processes on 2 cores finish sooner than two rounds of two
    took_base = pool_map(run_train, jobs, min(len(seeds), 2 * args.jobs))
    for s, took in zip(seeds, took_base):
        print(f"seed {s}: base model ({took})")

    # --- the band: bottom of the base models' per-layer JS curve on the training items
    base_train_js = []
    for s in seeds:
        _, _, tgt, anc = score(load_base(base_dir(s)), train_set, tok.pad_id)
        base_train_js.append(js_divergence(anc, tgt).mean(0).tolist())  # (L,)
    curve = np.mean(base_train_js, axis=0)
    k = settings["band_size"]
    start = choose_band(curve, k)[0]  # the middle window with the lowest mean JS (evaluation/routing.py)
    band = [start, start + k - 1]
    others = [w for w in range(n_layers - k + 1) if w != start]
    random_band = {s: int(np.random.default_rng(1000 + s).choice(others)) for s in seeds}
    print(f"base JS per layer (train items): {np.round(curve, 4).tolist()} -> band {band}; random bands "
          f"{ {s: [w, w + k - 1] for s, w in random_band.items()} }")

    # --- stage 3: four fine-tunings per seed from the same base.pt
    def layers_of(cond, s):
        return {"plain": band, "band": band, "all": [0, n_layers - 1], "random": [random_band[s], random_band[s] + k - 1]}[cond]

    run_dir = lambda s, c: os.path.join(out, f"seed{s}", c)
    jobs = []
    for s in seeds:
        base_pt = os.path.join(base_dir(s), "base.pt")
        for c in CONDITIONS:
            a = train_args(settings, run_dir(s, c), s, sara_band=tuple(layers_of(c, s)), eval_interval=steps_per_epoch,
                           **({"lambda_js": 0.0} if c == "plain" else {}))
            copy_base = lambda src=base_pt, dst=os.path.join(run_dir(s, c), "base.pt"): shutil.copy(src, dst)
            # base.pt in out_dir: train.py skips stage 0 and every condition starts from the same weights
            jobs.append((a, run_dir(s, c), threads, os.path.join(run_dir(s, c), "ckpt", "COMPLETE"),
                         a + [f"base.pt {file_digest(base_pt)}"], copy_base))
    took_ft = pool_map(run_train, jobs, args.jobs)
    for job, took in zip(jobs, took_ft):
        print(f"{os.path.relpath(job[1], out)}: fine-tuned ({took})")

    # --- same batches, same start: the ablations are matched
    for s in seeds:
        rows = {c: read_metrics(os.path.join(run_dir(s, c), "metrics.jsonl")) for c in CONDITIONS}
        steps = {c: [(r["step"], r["batch"]) for r in rows[c] if "batch" in r and r["phase"] != "pretrain"] for c in CONDITIONS}
        n_steps = settings["train"]["epochs"] * steps_per_epoch
        assert all(steps[c] == steps["plain"] for c in CONDITIONS) and len(steps["plain"]) == n_steps, \
            f"seed {s}: the conditions did not see the same batches"
        ce0 = [next(r["ce"] for r in rows[c] if r.get("step") == 0 and "ce" in r and r["phase"] != "pretrain")
               for c in CONDITIONS]
        assert max(ce0) - min(ce0) <= 1e-5 * abs(ce0[0]), f"seed {s}: step-0 loss differs across conditions: {ce0}"
    print("checked: per seed, all four conditions saw identical batches and started from identical weights")

    # --- evaluation: per item, per model
    items = [dict(id=e["id"], lang=e["lang"], group=group_key(e)) for e in val_set]  # group: the UDHR paragraph
    per_item = []  # rows of the CSV
    js_anchor = {}  # (seed, cond) -> (N, L): JS(original model on English || model on target)
    ce = {}  # (seed, cond) -> (N,) mean response CE
    for s in seeds:
        base = load_base(base_dir(s))
        nll, n, tgt0, anc0 = score(base, val_set, tok.pad_id)
        ce[s, "base"], js_anchor[s, "base"] = (nll / n).numpy(), js_divergence(anc0, tgt0).numpy()
        self_js = {"base": js_anchor[s, "base"]}
        for c in CONDITIONS:
            nll, n, tgt, anc = score(load_finetuned(run_dir(s, c)), val_set, tok.pad_id)
            ce[s, c] = (nll / n).numpy()
            js_anchor[s, c] = js_divergence(anc0, tgt).numpy()  # to the ORIGINAL model's English routing
            self_js[c] = js_divergence(anc, tgt).numpy()  # to its own English routing
            check_against_train_py(run_dir(s, c), nll, n, js_anchor[s, c], settings["train"]["micro_batch"])
        for c in ["base"] + CONDITIONS:
            for i, it in enumerate(items):
                if not kept[i]:  # its text was a training prompt: not held out (see unseen_heldout)
                    continue
                per_item.append(dict(seed=s, condition=c, lang=it["lang"], group=it["group"], id=it["id"], n_tokens=int(n[i]),
                                     ce=round(float(ce[s, c][i]), 6),  # every statistic is computed from these rounded values
                                     **{f"js_anchor_l{l}": round(float(js_anchor[s, c][i, l]), 7) for l in range(n_layers)},
                                     **{f"js_self_l{l}": round(float(self_js[c][i, l]), 7) for l in range(n_layers)}))
    print("checked: the recomputed held-out CE and per-layer JS match train.py's own final evaluation")

    with open(os.path.join(results, "per_item.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(per_item[0]))
        w.writeheader()
        w.writerows(per_item)
    summary = summarize(per_item, settings, band, {s: layers_of("random", s) for s in seeds}, n_layers)
    summary.update(command=" ".join(["python", "experiments/toy_sara.py"] + (["--quick"] if args.quick else [])),
                   settings=settings, band_selection_curve=curve.tolist(), wall_s=time.time() - t_start,
                   runs_reused=sum(t == "reused" for t in took_base + took_ft), runs=len(took_base + took_ft),
                   loadavg_start=load_start, loadavg_end=os.getloadavg(), cpu_count=os.cpu_count(), jobs=args.jobs,
                   platform=platform_info("cpu"),
                   curves=val_curves(seeds, run_dir))
    json.dump(summary, open(os.path.join(results, "summary.json"), "w"), indent=1)
    md = report(summary)
    open(os.path.join(results, "results.md"), "w").write(md)
    figures(summary, results)
    print(md)


def reanalyse(results, settings):
    """The statistics of an earlier run recomputed by this code from its per-item file: the training is
    unchanged, only the reported items and the interval differ. Writes the same files as a run."""
    old = json.load(open(os.path.join(results, "summary.json")))
    _, _, val_set, kept = load_split(settings)
    keep = {e["id"] for e, k in zip(val_set, kept) if k}
    rows = list(csv.DictReader(open(os.path.join(results, "per_item.csv"))))
    rows = [{k: (v if k in ("condition", "lang", "group", "id") else float(v) if "." in v or "e" in v else int(v))
             for k, v in r.items()} for r in rows if r["id"] in keep]
    with open(os.path.join(results, "per_item.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = summarize(rows, settings, old["band"], {int(k): v for k, v in old["random_bands"].items()}, old["n_layers"])
    summary.update({k: old[k] for k in ("command", "band_selection_curve", "wall_s", "runs_reused", "runs", "loadavg_start",
                                        "loadavg_end", "cpu_count", "jobs", "curves")}, settings=settings,
                   reanalysed="statistics recomputed with --reanalyse from the per-item file of this run")
    json.dump(summary, open(os.path.join(results, "summary.json"), "w"), indent=1)
    md = report(summary) + "\nRe-analysed (`python experiments/toy_sara.py --reanalyse`) from the per-item file of that run: " \
        "same training, only the held-out rows whose text is no training prompt, seed-level t intervals.\n"
    open(os.path.join(results, "results.md"), "w").write(md)
    figures(summary, results)
    print(md)


def check_against_train_py(d, nll, n, js_NL, micro_batch):
    """train.py's last eval row: val_ce is the per-micro-batch token mean weighted by batch size;
    val_js_per_layer is the mean over items of the per-item JS. Recompute both from our numbers."""
    last = [r for r in read_metrics(os.path.join(d, "metrics.jsonl")) if "val_ce" in r][-1]
    ce = sum(float(nll[i:i + micro_batch].sum() / n[i:i + micro_batch].sum()) * len(nll[i:i + micro_batch])
             for i in range(0, len(nll), micro_batch)) / len(nll)
    assert abs(ce - last["val_ce"]) < 1e-4, f"{d}: held-out CE {ce} != train.py's {last['val_ce']}"
    assert np.allclose(js_NL.mean(0), last["val_js_per_layer"], atol=2e-5), f"{d}: per-layer JS differs from train.py's"


def val_curves(seeds, run_dir):
    """{cond: [(step, mean val_ce over seeds)]} from train.py's per-epoch evaluations."""
    curves = {}
    for c in CONDITIONS:
        rows = [read_metrics(os.path.join(run_dir(s, c), "metrics.jsonl")) for s in seeds]
        per_seed = [[(r["step"], r["val_ce"]) for r in rs if "val_ce" in r] for rs in rows]
        curves[c] = [(st, float(np.mean([ps[j][1] for ps in per_seed]))) for j, (st, _) in enumerate(per_seed[0])]
    return curves


def summarize(per_item, settings, band, random_bands, n_layers):
    """All the numbers of the report, from the per-item rows only."""
    seeds, langs = settings["seeds"], settings["train"]["train_langs"]
    conds = ["base"] + CONDITIONS
    pick = lambda r, s, c, lang: r["seed"] == s and r["condition"] == c and lang in (None, r["lang"])  # lang None: all
    col = lambda key, c, lang: np.array([[r[key] for r in per_item if pick(r, s, c, lang)] for s in seeds])  # (S, I)
    groups = lambda lang: [r["group"] for r in per_item if pick(r, seeds[0], "plain", lang)]  # (I,)
    out = dict(langs=langs, seeds=seeds, band=band, random_bands=random_bands, n_layers=n_layers,
               ce={}, delta={}, js={}, js_self={}, n_items={})
    for lang in langs + [None]:
        key = lang or "all"
        out["n_items"][key] = len(groups(lang))
        out["ce"][key] = {c: stats.mean_std(col("ce", c, lang).mean(1)) for c in conds}
        out["delta"][key] = {c: seed_interval(col("ce", c, lang) - col("ce", "plain", lang)) for c in ["band", "all", "random"]}
        for name, prefix in (("js", "js_anchor"), ("js_self", "js_self")):
            out[name][key] = {c: [stats.mean_std(col(f"{prefix}_l{l}", c, lang).mean(1)) for l in range(n_layers)] for c in conds}
    d, lo, hi, _ = out["delta"]["all"]["band"]
    out["verdict"] = verdict(lo, hi)
    return out


# -----------------------------------------------------------------------------
# report
def fmt(ms, digits=3):
    m, s = ms
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_ci(t):
    return f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}] (p {t[3]:.2f})"


def band_mean(per_layer, layers):
    """Mean over the band's layers of the per-layer means (over seeds)."""
    return float(np.mean([per_layer[l][0] for l in layers]))


def report(S):
    langs, band, L = S["langs"], S["band"], S["n_layers"]
    band_layers = list(range(band[0], band[1] + 1))
    conds = ["base"] + CONDITIONS
    lines = [f"Seeds {S['seeds']}; SARA band = layers {band[0]}–{band[1]} of 0–{L - 1} (bottom of the base models' "
             f"JS curve); random bands per seed: {S['random_bands']}. Held-out response cross-entropy "
             "(nats/token) on the held-out items whose text is no training row's prompt, mean ± std over seeds; "
             "Δ = condition − (a) plain: per seed the mean paired difference over items, then a 95% Student t "
             f"interval over the {len(S['seeds'])} seeds and its two-sided p.", "",
             "| lang | items | " + " | ".join(LABELS[c] for c in conds) + " | Δ (b) band | Δ (c) all | Δ (d) random |",
             "|---" * (len(conds) + 5) + "|"]
    for key in langs + ["all"]:
        lines.append(f"| {key} | {S['n_items'][key]} | " + " | ".join(fmt(S["ce"][key][c]) for c in conds) + " | "
                     + " | ".join(fmt_ci(S["delta"][key][c]) for c in ["band", "all", "random"]) + " |")
    lines += ["", f"Routing: JS(original model on English ‖ model on target), nats, mean over held-out items; "
              f"band mean = layers {band[0]}–{band[1]}.", "",
              "| lang | " + " | ".join(LABELS[c] for c in conds) + " |", "|---" * (len(conds) + 1) + "|"]
    for key in langs + ["all"]:
        lines.append(f"| {key} | " + " | ".join(f"{band_mean(S['js'][key][c], band_layers):.4f}" for c in conds) + " |")
    lines.append("| all, same model¹ | " + " | ".join(f"{band_mean(S['js_self']['all'][c], band_layers):.4f}"
                                                    for c in conds) + " |")
    lines += ["", "¹ JS(the model itself on English ‖ on the target), the paper's Figure 5 view; "
              "for the base model both views agree."]
    lines += ["", "Per layer, all languages (mean ± std over seeds):", "",
              "| layer | " + " | ".join(LABELS[c] for c in conds) + " |", "|---" * (len(conds) + 1) + "|"]
    for l in range(L):
        mark = " (band)" if l in band_layers else ""
        lines.append(f"| {l}{mark} | " + " | ".join(fmt(S["js"]["all"][c][l], 4) for c in conds) + " |")
    d = S["delta"]["all"]
    lines += ["", f"**Verdict: SARA on the band vs plain fine-tuning: Δ held-out CE = {fmt_ci(d['band'])} nats/token "
              f"(95% CI) — {S['verdict']}.** All layers: {fmt_ci(d['all'])} — {verdict(*d['all'][1:3])}; "
              f"random band: {fmt_ci(d['random'])} — {verdict(*d['random'][1:3])}. Band JS to the anchor: "
              f"{band_mean(S['js']['all']['base'], band_layers):.4f} before, "
              f"{band_mean(S['js']['all']['plain'], band_layers):.4f} after plain, "
              f"{band_mean(S['js']['all']['band'], band_layers):.4f} after SARA band.", "",
              f"Command: `{S['command']}`; wall time {S['wall_s'] / 60:.1f} min on {S['cpu_count']} cores "
              f"({S['jobs']} train.py processes at a time), load average {S['loadavg_start'][0]:.1f} at start, "
              f"{S['loadavg_end'][0]:.1f} at end; {S['runs_reused']} of {S['runs']} train.py runs reused from an earlier invocation."]
    return "\n".join(lines) + "\n"


def figures(S, results):
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no figures (pip install matplotlib)")
        return
    langs, L, band = S["langs"], S["n_layers"], S["band"]
    colors = {"base": "black", "plain": "tab:blue", "band": "tab:green", "all": "tab:red", "random": "tab:orange"}
    keys = langs + ["all"]
    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(10, 6), sharey=True, sharex=True)
    axes = axes.flatten()
    for ax, key in zip(axes, keys):
        ax.axvspan(band[0] - 0.5, band[1] + 0.5, color="tab:green", alpha=0.08)
        for c in ["base"] + CONDITIONS:
            m = np.array([x[0] for x in S["js"][key][c]])
            s = np.array([x[1] or 0.0 for x in S["js"][key][c]])
            ax.plot(range(L), m, marker="o" if c != "base" else None, ls="-" if c != "base" else "--",
                    color=colors[c], label=LABELS[c], ms=3)
            ax.fill_between(range(L), m - s, m + s, color=colors[c], alpha=0.15)
        ax.set_title(key if key != "all" else "all languages")
    for ax in axes[len(axes) // 2:]:
        ax.set_xlabel("MoE layer")
    for ax in axes[::len(axes) // 2]:
        ax.set_ylabel("JS to the English anchor (nats)")
    axes[len(keys) - 1].legend(fontsize=7, title="(d): a different band per seed", title_fontsize=7)
    fig.suptitle("Routing divergence from the original model's English routing, held-out items (shaded: SARA band)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(results, "routing_js.png"), dpi=90)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for j, c in enumerate(["band", "all", "random"]):
        y = np.arange(len(keys)) + (j - 1) * 0.22
        d = np.array([S["delta"][k][c][:3] for k in keys])
        xerr = [d[:, 0] - d[:, 1], d[:, 2] - d[:, 0]]
        ax1.errorbar(d[:, 0], y, xerr=xerr, fmt="o", color=colors[c], label=LABELS[c], capsize=3)
    ax1.axvline(0, color="gray", lw=1)
    ax1.set_yticks(range(len(keys)), keys)
    ax1.invert_yaxis()
    ax1.set_xlabel("Δ held-out CE vs (a) plain (nats/token), 95% t interval over seeds")
    ax1.legend(fontsize=7)
    ax1.set_title("paired difference to plain fine-tuning, per language", fontsize=9)
    for c in CONDITIONS:
        st, v = zip(*S["curves"][c])
        ax2.plot(st, v, "o-", color=colors[c], label=LABELS[c], ms=3)
    ax2.set_xlabel("fine-tuning step")
    ax2.set_ylabel("held-out CE (train.py eval, mean over seeds)")
    ax2.legend(fontsize=7)
    ax2.set_title("held-out CE during fine-tuning (one eval per epoch)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(results, "heldout_ce.png"), dpi=90)
    plt.close("all")


if __name__ == "__main__":
    main()
