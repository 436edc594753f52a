"""
One comparison of alignment methods (docs/method.md, "Comparing methods"): every method fine-tunes the SAME
original model on the SAME batches, once per seed; each is evaluated the same way; one table compares each
with plain fine-tuning by a seed-level paired t interval (stats.t_interval over the per-seed differences).

    python compare.py --quick --out_dir out/compare_quick                       # toy, CPU, ~1-2 min
    python compare.py --out_dir out/compare --seeds 1,2,3 configs/toy.py        # the toy experiment
    python compare.py --out_dir out/cmp --launcher "torchrun --nproc_per_node 8" \\
        configs/qwen3_30b_a3b.py --init_from=DIR --data_path=FILE --seeds 1,2,3  # real checkpoints, GPUs (not run here)
    python compare.py --reanalyse --out_dir out/compare                         # the table again, no training

Every argument compare.py does not know is handed to train.py unchanged (config files, --key=value), and
checked (settings.TrainSettings) before anything runs. Each run is one train.py process (the product's
path; --launcher "torchrun ..." runs it on many GPUs) in out_dir/seed<S>/<method>, with its method's
settings appended (METHODS below; lambda_js etc. given on the command line apply to the rest). A toy run
from scratch first makes the stage-0 model once per seed (out_dir/seed<S>/base, train.py with epochs=0)
and copies its base.pt into every method's directory, so all methods start from the same weights (the
seed also picks stage 0's data order, so each seed has its own original model). With --init_from the
checkpoint is the original model of every run.

Same batches: train.py logs a digest of each step's samples (metrics.jsonl "batch"; log_interval=1
here); the digests of every method of a seed must be identical, or the comparison stops with an error.

Evaluated per run, on the held-out items (data.parallel.split_train_val, as train.py splits):
  val_ce     held-out CE of the fine-tuned model (the loop's last evaluation, metrics.jsonl)
  js_band    routing divergence to English: the mean over the target languages and the band's layers of
             the per-item JS between the item's pooled routing and its English item's, both under the
             fine-tuned model itself (evaluation.routing, js_paired), from the exported out_dir/.../hf
Row "original": the same measures of the model before fine-tuning. Benchmark accuracy needs real
checkpoints: run `eval.py bench` on each run's hf directory (docs/evaluation.md); the toy data has none.

results.json (out_dir): platform_info, compare.py's argv, and per run its method, seed, train.py
settings (metrics.jsonl header), batch digests and measures; --reanalyse re-reads the run directories
(nothing is trained or evaluated again when a run's eval.json exists) and prints the table.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from jsonl import read_jsonl
from provenance import platform_info
from settings import TOY_TOKENIZER, TrainSettings
from stats import t_interval

ROOT = os.path.dirname(os.path.abspath(__file__))
# each method's train.py settings (appended after the user's: they win). docs/method.md, docs/baselines.md
METHODS = dict(
    plain=dict(lambda_js=0.0),  # plain fine-tuning: the SARA component with weight 0
    sara=dict(),
    live_kl=dict(method="live_kl"),  # Bandarkar et al.
    frozen_routers=dict(lambda_js=0.0, freeze_routers=True),  # control (a): plain with W_g frozen
    sara_frozen_routers=dict(freeze_routers=True),
    mismatched=dict(anchor_shuffle=True),  # control (b): SARA on a non-parallel English row's routing
    shifcon=dict(method="shifcon"),  # Zhang et al.: shift into English's subspace + contrastive term
)
DEFAULT_METHODS = "plain,sara,live_kl,frozen_routers,mismatched"
# --quick: a 3-layer toy, 2 seeds, one short epoch (the CI test); measured in the test's docstring
QUICK = ["--model_config={'vocab_size': 4096, 'hidden_size': 32, 'n_layers': 3, 'n_heads': 2, 'n_kv_heads': 1, "
         "'intermediate_size': 64, 'n_experts': 4, 'top_k': 2, 'moe_intermediate_size': 32, 'qk_norm': True}",
         "--pretrain_iters=6", "--epochs=1", "--global_batch=8", "--micro_batch=8", "--max_len=64",
         "--train_langs=['sw', 'hi']", "--sara_band=(1, 1)", "--lr=3e-3", "--eval_interval=1000"]
OWN_KEYS = ("out_dir", "seed", "export_hf", "log_interval")  # compare.py sets these for every run


def parse(argv):
    # allow_abbrev=False: "--seed=3" (a train.py setting) must not pass for an abbreviation of --seeds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, of {list(METHODS)}; plain is always run")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds; >= 2 for the t intervals")
    p.add_argument("--launcher", default="", help='e.g. "torchrun --nproc_per_node 8"; default: this Python')
    p.add_argument("--quick", action="store_true", help="a tiny toy comparison on CPU (the CI test)")
    p.add_argument("--reanalyse", action="store_true", help="tabulate the runs in out_dir again, without training")
    p.add_argument("--jobs", type=int, default=1, help="train.py processes at once (CPU toy; 1 with a GPU launcher)")
    p.add_argument("--eval_device", default="auto", help="device for the routing evaluation (auto: cuda if present)")
    args, train_args = p.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: {unknown} unknown; choose from {list(METHODS)}")
    args.methods = ["plain"] + [m for m in methods if m != "plain"]
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds={args.seeds!r}: comma-separated integers, e.g. 1,2,3")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds={args.seeds}: each seed once")
    own = [a for a in train_args if a.startswith("--") and a[2:].split("=")[0] in OWN_KEYS]
    if own:
        p.error(f"{own}: compare.py sets {OWN_KEYS} itself (use --out_dir and --seeds)")
    args.train_args = (QUICK if args.quick else []) + train_args
    return args


def flag(key, value):
    return f"--{key}={value!r}" if isinstance(value, str) else f"--{key}={value}"


def run_dir(out_dir, seed, method):
    return os.path.join(out_dir, f"seed{seed}", method)


def train(args, settings, seed, method, log):
    """One train.py process for (seed, method); the stage-0 base.pt of the seed copied in first."""
    d = run_dir(args.out_dir, seed, method)
    extra = dict(METHODS.get(method, {}), export_hf=True) if method != "base" else dict(epochs=0, export_hf=False)
    cmd = shlex.split(args.launcher) if args.launcher else [sys.executable]
    cmd += [os.path.join(ROOT, "train.py"), *args.train_args, flag("seed", seed), flag("out_dir", d),
            flag("log_interval", 1), *[flag(k, v) for k, v in extra.items()]]
    if method != "base" and settings.init_from == "scratch":
        os.makedirs(d, exist_ok=True)
        base = os.path.join(run_dir(args.out_dir, seed, "base"), "base.pt")
        if not os.path.exists(os.path.join(d, "base.pt")):
            shutil.copyfile(base, os.path.join(d, "base.pt"))
    log(f"[seed {seed}] {method}: train.py {' '.join(a for a in cmd if a.startswith('--') and 'model_config' not in a)}")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(d, "train.log"), "w") as f:
        f.write(res.stdout + res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"compare: train.py failed for seed {seed}, method {method!r} (exit {res.returncode}); "
                         f"its output is in {d}/train.log:\n{res.stderr[-2000:]}")


def step_records(d):
    """(header, step records, evaluation records) of a run's metrics.jsonl, the fine-tuning phase only."""
    rows = [r for _, r in read_jsonl(os.path.join(d, "metrics.jsonl"), torn_tail_ok=True)]
    header = [r for r in rows if r.get("header")][-1]
    tuned = [r for r in rows if not r.get("header") and r.get("phase") != "pretrain"]
    return header, [r for r in tuned if "batch" in r], [r for r in tuned if "val_ce" in r]


@torch.no_grad()
def routing_js(model, tok, settings, device):
    """Mean over target languages and band layers of the per-item JS to English (js_paired), the model's own."""
    from data.parallel import load_parallel_jsonl, split_train_val
    from evaluation.routing import routing_distributions, routing_divergence
    from sara_loss import layer_band
    _, val = split_train_val(load_parallel_jsonl(settings.data_path), settings.val_fraction, seed=0)
    val = [x for x in val if x["lang"] in settings.train_langs + [settings.anchor_lang]]
    model.to(device)
    dists = routing_distributions(model, tok, val, batch_size=settings.micro_batch, max_len=settings.max_len,
                                  system=settings.system_prompt or None)
    band = set(settings.sara_layer_list or layer_band(*settings.sara_band))
    rows = routing_divergence(dists, settings.anchor_lang, langs=settings.train_langs, layers=model.config.moe_layers)
    return float(np.mean([r["js_paired"] for r in rows if r["layer"] in band]))


def evaluate(args, settings, seed, method):
    """-> the run's measures, cached in its eval.json (what --reanalyse reads)."""
    from checkpoint import load_model_and_tokenizer
    d = run_dir(args.out_dir, seed, method)
    path = os.path.join(d, "eval.json")
    if os.path.exists(path):
        return json.load(open(path))
    device = args.eval_device if args.eval_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    header, steps, evals = step_records(d)
    if not os.path.exists(os.path.join(d, "hf", "config.json")):
        raise SystemExit(f"compare: {d}/hf has no exported model to evaluate (see 'HF export' in {d}/train.log)")
    res = dict(val_ce=evals[-1]["val_ce"], val_ce_before=evals[0]["val_ce"] if evals[0]["step"] < 0 else None)
    # (the toy's tiktoken BPE is not written into hf/: tokenizer_path names it, "" = the directory's own)
    model, tok = load_model_and_tokenizer(os.path.join(d, "hf"), tokenizer=settings.tokenizer_path, dtype=dtype, device=device)
    res["js_band"] = routing_js(model, tok, settings, device)
    if method == "plain":  # the original model, once per seed (the same for every method of the seed)
        original = os.path.join(d, "base.pt") if settings.init_from == "scratch" else settings.init_from
        # a base.pt carries no tokenizer: the one train.py used for it (tokenizer_path, else the toy BPE)
        pt_tok = settings.tokenizer_path or (TOY_TOKENIZER if original.endswith(".pt") else "")
        model, tok = load_model_and_tokenizer(original, tokenizer=pt_tok, dtype=dtype, device=device)
        res["js_band_before"] = routing_js(model, tok, settings, device)
    json.dump(res, open(path, "w"), indent=1)
    return res


def collect(args, settings):
    """Every run's settings, batch digests and measures; the same batches for every method of a seed."""
    runs = []
    for seed in args.seeds:
        digests = {}
        for method in args.methods:
            header, steps, _ = step_records(run_dir(args.out_dir, seed, method))
            digests[method] = [(r["step"], r["batch"]) for r in steps]
            runs.append(dict(method=method, seed=seed, dir=run_dir(args.out_dir, seed, method),
                             settings=header["settings"], platform=header["platform"], batches=digests[method],
                             **evaluate(args, settings, seed, method)))
        differ = [m for m in args.methods if digests[m] != digests["plain"] or not digests[m]]
        if differ:
            raise SystemExit(f"compare: seed {seed}: {differ} did not train on the same batches as plain "
                             f"(metrics.jsonl 'batch' digests differ or are missing): the comparison is not paired")
    return runs


def table(runs, methods, seeds):
    """One row per method: mean over seeds, and the paired t interval of (method - plain) over seeds."""
    by = {(r["method"], r["seed"]): r for r in runs}
    lines = [f"{'method':<22}{'val CE':>9}  {'delta CE vs plain [95% t CI], p':<38}{'JS band':>9}  {'delta JS vs plain [95% t CI]':<30}"]
    before = [by["plain", s] for s in seeds]
    lines.append(f"{'original (before)':<22}{np.mean([r['val_ce_before'] for r in before if r['val_ce_before'] is not None] or [np.nan]):>9.4f}  "
                 f"{'':<38}{np.mean([r['js_band_before'] for r in before]):>9.2e}")
    for m in methods:
        ce = [by[m, s]["val_ce"] for s in seeds]
        js = [by[m, s]["js_band"] for s in seeds]
        cells = []
        for key in ("val_ce", "js_band"):
            if m == "plain":
                cells.append("(reference)")
            elif len(seeds) < 2:
                cells.append("n/a (one seed)")
            else:
                t = t_interval([by[m, s][key] - by["plain", s][key] for s in seeds])
                cells.append(f"{t['mean']:+.4f} [{t['lo']:+.4f}, {t['hi']:+.4f}] p={t['p']:.3f}" if key == "val_ce" else
                             f"{t['mean']:+.2e} [{t['lo']:+.2e}, {t['hi']:+.2e}]")
        lines.append(f"{m:<22}{np.mean(ce):>9.4f}  {cells[0]:<38}{np.mean(js):>9.2e}  {cells[1]:<30}")
    lines.append(f"({len(seeds)} seeds {seeds}; identical batches per seed checked; JS: per-item JS to English, "
                 f"band mean, the model's own routing)")
    return "\n".join(lines)


def main(argv):
    args = parse(argv)
    settings, _ = TrainSettings.from_argv(args.train_args + [flag("seed", args.seeds[0])])  # every value checked first
    log = lambda msg: print(msg, flush=True)
    if not args.reanalyse:
        os.makedirs(args.out_dir, exist_ok=True)
        todo = lambda stage: [(seed, m) for seed in args.seeds for m in stage
                              if not os.path.exists(os.path.join(run_dir(args.out_dir, seed, m), "hf" if m != "base" else "",
                                                                 "config.json" if m != "base" else "base.pt"))]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each job is a train.py process
            for stage in (["base"] if settings.init_from == "scratch" else [], args.methods):
                list(pool.map(lambda job: train(args, settings, *job, log), todo(stage)))
    elif not os.path.isdir(args.out_dir):
        raise SystemExit(f"--reanalyse: {args.out_dir} does not exist (run the comparison first)")
    runs = collect(args, settings)
    text = table(runs, args.methods, args.seeds)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(dict(platform=platform_info(), argv=argv, methods={m: METHODS[m] for m in args.methods},
                       train_args=args.train_args, seeds=args.seeds, runs=runs, table=text), f, indent=1)
    print(text)
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
