"""
One comparison of alignment methods (docs/method.md, "Comparing methods"): every method fine-tunes the SAME
original model on the SAME batches, once per seed; each is evaluated the same way; one table compares each
with plain fine-tuning by a seed-level paired t interval (stats.t_interval over the per-seed differences).

    python compare.py --quick --out_dir out/compare_quick                       # toy, CPU, ~1-2 min
    python compare.py --out_dir out/compare --seeds 1,2,3 configs/toy.py        # the toy experiment
    python compare.py --out_dir out/cmp --launcher "torchrun --nproc_per_node 8" \\
        configs/qwen3_30b_a3b.py --init_from=DIR --data_path=FILE --seeds 1,2,3  # real checkpoints, GPUs (not run here)
    python compare.py --reanalyse --out_dir out/compare                         # the table again, no training
    python compare.py --reanalyse --quick --out_dir out/compare_quick --methods sara+steering \\
        --steering_rule steermoe --steering_strength 1   # SARA + SteerMoE rows added to finished runs, no training

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

Rows. Every trained method is a row; "original (before)" is the model before fine-tuning; the steering
rows are training-free: a model of the seed evaluated with inference-time routing steering (methods/
steering.py; docs/baselines.md), STEERED below: original+steering (the original model), plain+steering
(the plain run), sara+steering (the SARA run: the combination SARA + steering). A steering row trains
nothing, but pulls in the run it steers (--methods sara+steering trains plain and sara). Its statistics
(methods.steering.routing_statistics) are measured on the model it steers, on train.py's TRAINING rows
(data.parallel.split_train_val) of the guiding languages (--steering_guides, English first) and of the
target languages (train_langs, pooled into one set "sw+hi" for SteerMoE's second set), and saved as
out_dir/seed<S>/<row>/steering_stats.json (`eval.py bench --steering FILE` reuses it on the same model).
--steering_rule, --steering_strength, --steering_layers (default: the SARA band, sara_band or a contiguous
sara_layer_list) are checked against the model's config and the data before anything trains.

Evaluated per row by this file's own code (evaluate: one model loaded, install_inference installs what
the row runs at inference, if anything), on the held-out items (data.parallel.split_train_val, as
train.py splits):
  val_ce     held-out CE, computed as train.py's loop does (the train_langs' held-out rows, tokenized as
             train.py does; mean over micro-batches of their token-mean CE, weighted by size). For a row
             with no inference hook it is checked against the loop's own evaluation in metrics.jsonl (the
             last one; the original model's: the plain run's evaluation before fine-tuning): an error
             above 1e-4 with fp32 weights, recorded as val_ce_loop either way
  js_band    routing divergence to English: the mean over the target languages and the band's layers of
             the per-item JS between the item's pooled routing and its English item's, both under the
             evaluated model itself, hook included (evaluation.routing, js_paired)
of the exported out_dir/seed<S>/<method>/hf (the original model: its base.pt, or init_from). Benchmark
accuracy needs real checkpoints: run `eval.py bench` on each run's hf directory (docs/evaluation.md;
with --steering on a steering row's statistics file); the toy data has none.

results.json (out_dir): platform_info, compare.py's argv, and per row its method, seed, train.py
settings (metrics.jsonl header), batch digests, what ran at inference and the measures; each row's
measures are cached in out_dir/seed<S>/<row>/eval.json, with its inference settings: --reanalyse
re-reads the run directories (nothing is trained, and no row evaluated again whose eval.json was made
with the same inference settings; a steering row whose settings changed is evaluated again) and prints
the table.
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
from methods import steering
from provenance import platform_info
from sara_loss import layer_band
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
    sara_all_layers=dict(),  # ablation: SARA on every MoE layer (method_settings: sara_layer_list = the model's)
    sara_random_band=dict(),  # ablation: SARA on a band of the same width elsewhere, drawn per seed (method_settings)
)
ORIGINAL = "original"  # the row of the model before fine-tuning (always in the table)
# training-free rows: the model of the named run (or the original model) with inference-time routing steering
STEERED = {"original+steering": ORIGINAL, "plain+steering": "plain", "sara+steering": "sara"}
DEFAULT_METHODS = ("plain,sara,live_kl,shifcon,frozen_routers,mismatched,sara_all_layers,sara_random_band,"
                   "original+steering,plain+steering,sara+steering")
STATS_FILE = "steering_stats.json"
# --quick: a 3-layer toy, 2 seeds, one short epoch (the CI test); measured in the test's docstring
QUICK = ["--model_config={'vocab_size': 4096, 'hidden_size': 32, 'n_layers': 3, 'n_heads': 2, 'n_kv_heads': 1, "
         "'intermediate_size': 64, 'n_experts': 4, 'top_k': 2, 'moe_intermediate_size': 32, 'qk_norm': True}",
         "--pretrain_iters=6", "--epochs=1", "--global_batch=8", "--micro_batch=8", "--max_len=64",
         "--train_langs=['sw', 'hi']", "--sara_band=(1, 1)", "--lr=3e-3", "--eval_interval=1000"]
OWN_KEYS = ("out_dir", "seed", "export_hf", "log_interval")  # compare.py sets these for every run
CE_TOLERANCE = 1e-4  # compare's held-out CE against the loop's (fp32): the same numbers in another order


def parse(argv):
    # allow_abbrev=False: "--seed=3" (a train.py setting) must not pass for an abbreviation of --seeds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, of {list(METHODS) + list(STEERED)}; plain is always run")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds; >= 2 for the t intervals")
    p.add_argument("--launcher", default="", help='e.g. "torchrun --nproc_per_node 8"; default: this Python')
    p.add_argument("--quick", action="store_true", help="a tiny toy comparison on CPU (the CI test)")
    p.add_argument("--reanalyse", action="store_true", help="tabulate the runs in out_dir again, without training")
    p.add_argument("--jobs", type=int, default=1, help="train.py processes at once (CPU toy; 1 with a GPU launcher)")
    p.add_argument("--eval_device", default="auto", help="device for the evaluation (auto: cuda if present)")
    g = p.add_argument_group("steering rows (methods/steering.py, docs/baselines.md)")
    g.add_argument("--steering_rule", default=None, help="chen (default) or steermoe")
    g.add_argument("--steering_strength", type=float, default=None,
                   help=f"chen: lambda (default {steering.LAMBDA}); steermoe: experts boosted and suppressed (required)")
    g.add_argument("--steering_layers", default=None, help="start,end inclusive decoder layers (default: the SARA band)")
    g.add_argument("--steering_guides", default=None,
                   help=f"comma-separated guiding languages, the one steered towards first (default {','.join(steering.GUIDES)})")
    args, train_args = p.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and m not in STEERED and m != ORIGINAL]
    if unknown:
        p.error(f"--methods: {unknown} unknown; choose from {list(METHODS) + list(STEERED)}")
    # trained: plain first, then each method in the order asked for, a steering row's run before it
    wanted = [STEERED.get(m, m) for m in methods]
    args.methods = list(dict.fromkeys(["plain"] + [m for m in wanted if m in METHODS]))
    # rows: the original model, then every trained method, each followed by the steering rows of its model
    steered_by = {base: [m for m in STEERED if STEERED[m] == base and m in methods] for base in [ORIGINAL] + args.methods}
    args.rows = [row for base in steered_by for row in [base] + steered_by[base]]
    steering_flags = [f"--{k}" for k in ("steering_rule", "steering_strength", "steering_layers", "steering_guides")
                      if getattr(args, k) is not None]
    if steering_flags and not any(m in STEERED for m in methods):
        p.error(f"{steering_flags}: no steering row in --methods (add e.g. {','.join(STEERED)})")
    args.steering_rule = args.steering_rule or "chen"
    if args.steering_rule not in steering.RULES:
        p.error(f"--steering_rule {args.steering_rule!r}: one of {steering.RULES}")
    if args.steering_strength is None:
        if args.steering_rule == "steermoe" and any(m in STEERED for m in methods):
            p.error("--steering_rule steermoe: give --steering_strength N, the number of (layer, expert) pairs boosted "
                    "(and suppressed); its authors set it per experiment")
        args.steering_strength = steering.LAMBDA
    args.steering_guides = [g.strip() for g in (args.steering_guides or ",".join(steering.GUIDES)).split(",") if g.strip()]
    if args.steering_rule == "chen" and len(args.steering_guides) < 2:
        p.error(f"--steering_guides {args.steering_guides}: chen needs two or more guiding languages "
                f"(an expert is shared when no one language dominates it)")
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


def method_settings(method, settings, seed, cfg):
    """The train.py settings a method's run adds (METHODS), with the two band ablations resolved against the
    model's MoE layers: sara_all_layers -> every MoE layer; sara_random_band -> a contiguous band of the SARA
    band's width at a start drawn per seed (numpy default_rng(1000 + seed)) among the starts whose layers are
    all MoE layers, never the SARA band's own start. Recorded per run in results.json."""
    band = list(settings.sara_layer_list) or list(layer_band(*settings.sara_band))
    if method == "sara_all_layers":
        return dict(sara_layer_list=list(cfg.moe_layers))
    if method == "sara_random_band":
        width = len(band)
        starts = [s for s in range(cfg.n_layers - width + 1)
                  if s != min(band) and all(l in cfg.moe_layers for l in range(s, s + width))]
        if not starts:
            raise SystemExit(f"compare: sara_random_band: no other band of {width} MoE layers in a model with MoE layers "
                             f"{cfg.moe_layers} (the SARA band is {band})")
        start = int(np.random.default_rng(1000 + seed).choice(starts))
        return dict(sara_layer_list=[], sara_band=(start, start + width - 1))
    return dict(METHODS[method])


def train(args, settings, seed, method, log):
    """One train.py process for (seed, method); the stage-0 base.pt of the seed copied in first."""
    d = run_dir(args.out_dir, seed, method)
    extra = (dict(method_settings(method, settings, seed, original_config(settings)), export_hf=True) if method != "base"
             else dict(epochs=0, export_hf=False))
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


# -----------------------------------------------------------------------------
# what is evaluated: the data (train.py's split), the model of a row, what it runs at inference

def split(settings):
    """train.py's (train rows, held-out rows) of data_path (data.parallel.split_train_val, seed 0)."""
    from data.parallel import load_parallel_jsonl, split_train_val
    return split_train_val(load_parallel_jsonl(settings.data_path), settings.val_fraction, seed=0)


def original_model(args, settings, seed):
    """-> (path, tokenizer) of the model before fine-tuning: the seed's base.pt (toy), else init_from."""
    path = os.path.join(run_dir(args.out_dir, seed, "plain"), "base.pt") if settings.init_from == "scratch" else settings.init_from
    # a base.pt carries no tokenizer: the one train.py used for it (tokenizer_path, else the toy BPE)
    return path, settings.tokenizer_path or (TOY_TOKENIZER if path.endswith(".pt") else "")


def row_model(args, settings, seed, row):
    """-> (path, tokenizer) of the weights a row evaluates: its run's exported hf/ (a steering row: the run it steers)."""
    base = STEERED.get(row, row)
    if base == ORIGINAL:
        return original_model(args, settings, seed)
    d = run_dir(args.out_dir, seed, base)
    if not os.path.exists(os.path.join(d, "hf", "config.json")):
        raise SystemExit(f"compare: {d}/hf has no exported model to evaluate (see 'HF export' in {d}/train.log)")
    # (the toy's tiktoken BPE is not written into hf/: tokenizer_path names it, "" = the directory's own)
    return os.path.join(d, "hf"), settings.tokenizer_path


def steering_target(settings):
    """SteerMoE's second set: the target languages' rows, pooled under one name (e.g. "sw+hi")."""
    return "+".join(settings.train_langs)


def steering_settings(args, settings):
    """The steering of every steering row, flags resolved (the default layers: the SARA band)."""
    return dict(rule=args.steering_rule, strength=args.steering_strength, layers=list(args.steering_layers),
                guides=args.steering_guides, target=steering_target(settings) if args.steering_rule == "steermoe" else None)


def install_inference(row, model, tok, args, settings, d):
    """What row runs at inference besides its weights, installed on model (model=None: only described).
    -> its description (recorded in eval.json and results.json; a cached eval.json made with another one
    is evaluated again), None for the weights alone. The one place a row's inference hook is chosen."""
    if METHODS.get(row, {}).get("method") == "shifcon":  # the shift by each row's language, its exported vectors
        from methods import shifcon
        desc = dict(kind="shifcon", vectors=os.path.join(d, "hf", shifcon.VECTORS_FILE))
        if model is not None and not os.path.exists(desc["vectors"]):  # never evaluated unshifted in its place
            raise ValueError(f"{desc['vectors']} is missing: the ShifCon run's export has no language vectors; "
                             f"delete {d} and rerun to train it again")
        if model is not None:
            shifcon.install_for_inference(model, os.path.join(d, "hf"), settings.train_langs + [settings.anchor_lang])
        return desc
    if row in STEERED:  # inference-time routing steering, statistics of the steered model itself
        desc = dict(kind="steering", statistics=os.path.join(d, STATS_FILE), **steering_settings(args, settings))
        if model is not None:
            stats = steering_statistics(model, tok, settings, args.steering_guides, desc["statistics"])
            edits = steering.steering_interventions(stats, model.config, desc["rule"], desc["strength"], tuple(desc["layers"]),
                                                    target=desc["target"], guides=tuple(desc["guides"]),
                                                    path=desc["statistics"], names=steering.SETTING_FLAGS)
            steering.set_steering(model, edits)
        return desc
    return None


def inference_text(inference):
    """install_inference's description in a few words, for the log and the table."""
    if inference is None:
        return "the weights alone"
    if inference["kind"] == "shifcon":
        return "ShifCon's shift by each row's language"
    if inference["kind"] == "steering":
        return (f"{inference['rule']}, strength {inference['strength']:g}, layers {inference['layers'][0]}.."
                f"{inference['layers'][1]}")
    return json.dumps(inference)


def steering_statistics(model, tok, settings, guides, path):
    """Expert activation frequencies of model on the TRAINING rows of the guiding and target languages, plus
    the target languages pooled (steering_target); written to path once (the model of a run does not change)."""
    langs = list(dict.fromkeys([*guides, settings.anchor_lang, *settings.train_langs]))
    if os.path.exists(path):
        stats = steering.load_statistics(path)
        if set(langs) <= set(stats["freq"]):
            return stats  # (else the guides changed: measured again, every language)
    rows = [x for x in split(settings)[0] if x["lang"] in langs]
    stats = steering.routing_statistics(model, tok, rows, batch_size=settings.micro_batch, max_len=settings.max_len,
                                        system=settings.system_prompt or None)
    if len(settings.train_langs) > 1:
        steering.pool_languages(stats, settings.train_langs, steering_target(settings))
    stats.update(data=settings.data_path, rows=f"train split (val_fraction={settings.val_fraction}, seed 0)",
                 platform=platform_info(str(next(model.parameters()).device)))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, path)
    return stats


def resolve_steering(args, settings):
    """The steering flags checked against the original model's config and the data, BEFORE any training;
    args.steering_layers resolved (default: the SARA band). SystemExit naming the flag otherwise."""
    cfg = original_config(settings)
    band = settings.sara_layer_list or list(layer_band(*settings.sara_band))
    given = args.steering_layers is not None
    if not given:
        if sorted(band) != list(range(min(band), max(band) + 1)):
            raise SystemExit(f"compare: --steering_layers: the default is the SARA band, but sara_layer_list={band} is "
                             "not contiguous: give --steering_layers start,end")
        args.steering_layers = (min(band), max(band))
    try:
        if given:
            args.steering_layers = steering.parse_layers(args.steering_layers, cfg, names=steering.SETTING_FLAGS)
        steering.check_settings(cfg, args.steering_rule, args.steering_strength, args.steering_layers, steering.SETTING_FLAGS)
    except ValueError as err:
        raise SystemExit(f"compare: {err}" + ("" if given else f" (the default: the SARA band, layers {band})")) from None
    if args.steering_rule == "steermoe":
        start, end = args.steering_layers
        most = sum(l in cfg.moe_layers for l in range(start, end + 1)) * (cfg.n_experts - 1)
        if args.steering_strength > most:  # a layer's frequencies sum to top_k in both sets: E - 1 differ by sign at most
            raise SystemExit(f"compare: --steering_strength {args.steering_strength:g}: at most {most} (layer, expert) "
                             f"pairs can be boosted on layers {start}..{end} of {cfg.n_experts} experts")
    try:
        present = {x["lang"] for x in split(settings)[0]}
    except (OSError, ValueError) as err:
        raise SystemExit(f"compare: data_path: {err}") from None
    absent = [g for g in args.steering_guides if g not in present]
    if absent:  # (the target languages' absence is train.py's error)
        raise SystemExit(f"compare: --steering_guides {','.join(args.steering_guides)}: no training rows of {absent} in "
                         f"{settings.data_path} (its training rows: {sorted(present)})")


def original_config(settings):
    """The MoEConfig of the original model, without its weights (a toy base.pt: read whole, it is small)."""
    from checkpoint import load_base
    from hf_config import config_from_hf
    from model import MoEConfig
    try:
        if settings.init_from == "scratch":
            return MoEConfig(**settings.model_config)
        if settings.init_from.endswith(".pt"):
            return load_base(settings.init_from)[0].config
        with open(os.path.join(settings.init_from, "config.json")) as f:
            return config_from_hf(json.load(f))
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(f"compare: init_from={settings.init_from!r}: {err}") from None


# -----------------------------------------------------------------------------
# the measures

def row_languages(model):
    """set_rows of a residual hook that needs each row's language (ShifCon's shift), else None."""
    return getattr(model.residual_hook, "set_rows", None)


@torch.no_grad()
def held_out_ce(model, tok, settings, device):
    """train.py's held-out CE (loop.evaluate): the train_langs' held-out rows, tokenized as train.py does;
    the mean over micro-batches of their token-mean CE, weighted by the micro-batch's size."""
    from anchors import forward_and_pool
    from data.parallel import tokenize_samples
    rows = [x for x in split(settings)[1] if x["lang"] in settings.train_langs]
    examples, _ = tokenize_samples(tok, rows, settings.max_len, settings.system_prompt or None)
    mb = settings.micro_batch
    set_rows = row_languages(model)
    out = forward_and_pool(model, [e["input_ids"] for e in examples], labels=[e["labels"] for e in examples],
                           pad_id=tok.pad_id, batch_size=mb, device=device,
                           before_batch=(lambda rows: set_rows([e["lang"] for e in examples[rows]])) if set_rows else None)
    from loop import held_out_ce as loop_held_out_ce
    return loop_held_out_ce(out, mb)  # (the loop's own formula: the check against metrics.jsonl compares like with like)


@torch.no_grad()
def routing_js(model, tok, settings, device):
    """Mean over target languages and band layers of the per-item JS to English (js_paired), the model's own."""
    from evaluation.routing import routing_distributions, routing_divergence
    val = [x for x in split(settings)[1] if x["lang"] in settings.train_langs + [settings.anchor_lang]]
    dists = routing_distributions(model, tok, val, batch_size=settings.micro_batch, max_len=settings.max_len,
                                  system=settings.system_prompt or None, set_rows=row_languages(model))
    band = set(settings.sara_layer_list or layer_band(*settings.sara_band))
    rows = routing_divergence(dists, settings.anchor_lang, langs=settings.train_langs, layers=model.config.moe_layers)
    return float(np.mean([r["js_paired"] for r in rows if r["layer"] in band]))


def loop_ce(args, seed, row):
    """The training loop's own held-out CE of a row's weights (metrics.jsonl), or None: the run's last
    evaluation; the original model's: the plain run's evaluation before fine-tuning, if it made one."""
    base = STEERED.get(row, row)
    _, _, evals = step_records(run_dir(args.out_dir, seed, "plain" if base == ORIGINAL else base))
    if base == ORIGINAL:
        return evals[0]["val_ce"] if evals and evals[0]["step"] < 0 else None
    return evals[-1]["val_ce"]


def evaluate(args, settings, seed, row, log=print):
    """-> the row's measures, all computed here from its model (row_model) with its inference hook
    (install_inference); cached in the row's eval.json (what --reanalyse reads)."""
    from checkpoint import load_model_and_tokenizer
    d = run_dir(args.out_dir, seed, row)
    path = os.path.join(d, "eval.json")
    inference = install_inference(row, None, None, args, settings, d)
    if os.path.exists(path):
        cached = json.load(open(path))
        if "inference" in cached and cached["inference"] == inference:
            return cached
        was = inference_text(cached["inference"]) if "inference" in cached else "no inference settings (an older compare.py)"
        log(f"[seed {seed}] {row}: evaluated again, with {inference_text(inference)} (its eval.json: {was})")
    os.makedirs(d, exist_ok=True)
    device = args.eval_device if args.eval_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    source, tokenizer = row_model(args, settings, seed, row)
    model, tok = load_model_and_tokenizer(source, tokenizer=tokenizer, dtype=dtype, device=device)
    try:
        install_inference(row, model, tok, args, settings, d)
    except ValueError as err:  # e.g. fewer experts differ between the two sets than --steering_strength asks for
        raise SystemExit(f"compare: seed {seed}, row {row!r}: {err}") from None
    res = dict(val_ce=held_out_ce(model, tok, settings, device), js_band=routing_js(model, tok, settings, device),
               model=source, inference=inference, eval_dtype=str(next(model.parameters()).dtype))
    if inference is None or inference["kind"] == "shifcon":  # what the loop evaluated (ShifCon: shifted): the same number
        res["val_ce_loop"] = loop_ce(args, seed, row)
        exact = res["eval_dtype"] == "torch.float32" and settings.dtype == "float32"
        if exact and res["val_ce_loop"] is not None and abs(res["val_ce"] - res["val_ce_loop"]) > CE_TOLERANCE:
            raise SystemExit(f"compare: seed {seed}, row {row!r}: held-out CE {res['val_ce']:.6f} of {source} differs from "
                             f"the loop's {res['val_ce_loop']:.6f} (metrics.jsonl) by more than {CE_TOLERANCE}: "
                             "the evaluation does not see the model or rows the loop saw")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    return res


def collect(args, settings, log=print):
    """Every row's settings, batch digests and measures; the same batches for every method of a seed (checked
    for every seed before any row is evaluated)."""
    digests, headers = {}, {}
    for seed in args.seeds:
        for method in args.methods:
            headers[seed, method], steps, _ = step_records(run_dir(args.out_dir, seed, method))
            digests[seed, method] = [(r["step"], r["batch"]) for r in steps]
        differ = [m for m in args.methods if digests[seed, m] != digests[seed, "plain"] or not digests[seed, m]]
        if differ:
            raise SystemExit(f"compare: seed {seed}: {differ} did not train on the same batches as plain "
                             f"(metrics.jsonl 'batch' digests differ or are missing): the comparison is not paired")
    runs = []
    for seed in args.seeds:
        for row in args.rows:
            base = STEERED.get(row, row)
            trained = base != ORIGINAL
            runs.append(dict(method=row, seed=seed, dir=run_dir(args.out_dir, seed, row), trained_as=base if trained else None,
                             settings=headers[seed, base]["settings"] if trained else None,
                             platform=headers[seed, base if trained else "plain"]["platform"],
                             batches=digests[seed, base] if trained else [], **evaluate(args, settings, seed, row, log)))
    return runs


def table(runs, rows, seeds):
    """One row per row: mean over seeds, and the paired t interval of (row - plain) over seeds."""
    by = {(r["method"], r["seed"]): r for r in runs}
    lines = [f"{'method':<22}{'val CE':>9}  {'delta CE vs plain [95% t CI], p':<38}{'JS band':>9}  {'delta JS vs plain [95% t CI]':<30}"]
    for m in rows:
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
        name = "original (before)" if m == ORIGINAL else m
        lines.append(f"{name:<22}{np.mean(ce):>9.4f}  {cells[0]:<38}{np.mean(js):>9.2e}  {cells[1]:<30}")
    steered = [by[m, seeds[0]]["inference"] for m in rows if m in STEERED]
    note = f"; +steering: {inference_text(steered[0])}, no retraining" if steered else ""
    lines.append(f"({len(seeds)} seeds {seeds}; identical batches per seed checked; JS: per-item JS to English, "
                 f"band mean, the model's own routing{note})")
    return "\n".join(lines)


def main(argv):
    args = parse(argv)
    settings, _ = TrainSettings.from_argv(args.train_args + [flag("seed", args.seeds[0])])  # every value checked first
    log = lambda msg: print(msg, flush=True)
    if any(r in STEERED for r in args.rows):
        resolve_steering(args, settings)
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
    runs = collect(args, settings, log)
    text = table(runs, args.rows, args.seeds)
    steered = {r: STEERED[r] for r in args.rows if r in STEERED}
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        cfg = original_config(settings)
        json.dump(dict(platform=platform_info(), argv=argv, rows=args.rows,
                       methods={m: {seed: method_settings(m, settings, seed, cfg) for seed in args.seeds} for m in args.methods},
                       steering=dict(rows=steered, **steering_settings(args, settings)) if steered else None,
                       train_args=args.train_args, seeds=args.seeds, runs=runs, table=text), f, indent=1)
    print(text)
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
