"""
Evaluation for SARA (Dong et al., Findings of ACL 2026): the paper's benchmarks, the routing-divergence
analysis of its Figure 5, and statistics. The command line only; the work is in evaluation/ and stats.py.

    python eval.py bench   --checkpoint DIR --benchmark global_mmlu --data DIR_OR_FILE --langs sw,hi,bn,te,ne
                           [--protocol generative|loglik|harness] [--runs 3] [--out results/NAME]
    python eval.py table   results/fft results/sara              # Table-1 style rows from bench outputs
    python eval.py routing --checkpoint DIR [--compare DIR2] --data data/udhr/parallel.jsonl --anchor en
                           [--out results/routing] [--width K [--edges]]
    python eval.py band    --routing-csv results/routing/routing.csv --width K [--edges]
    python eval.py compare --a results/fft [more seeds] --b results/sara [more seeds]
                           [--routing-csv CSV --band S,E]

Files and prompts: evaluation/benchmarks.py. Answer parsing: evaluation/scoring.py. Protocols:
evaluation/generate.py. Tables and pairing: evaluation/accuracy.py. Routing and the band rule:
evaluation/routing.py. Statistics: stats.py. Checkpoints are read by checkpoint.load_model_and_tokenizer.

Every flag is checked before any work: the sampling flags by model.sampling_problems (the check sample.py and
stage1.py share), seeds, --band, and, before the weights are read, every prompt against the model's context
(model.context_problem; a directory's config.json gives the context without the weights).
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from checkpoint import CheckpointError, checkpoint_tokenizer, load_model_and_tokenizer
from engine import (DEFAULT_RETRIES, DEFAULT_TIMEOUT, EngineError, check_engine, check_url, make_engine_responder,
                    settings_problems)
from evaluation.accuracy import (compare_conditions, format_comparison, format_correlation, format_table, load_predictions, load_results,
                                 pair_conditions, run_benchmark, summarize, write_bench_outputs)
from evaluation.benchmarks import BENCHMARKS, PROTOCOLS, check_protocol, item_prompt, load_benchmarks, load_templates
from evaluation.figures import FIGURES_SKIPPED, plot_routing
from evaluation.generate import encode_prompt, make_generative_responder, make_loglik_responder, peek_context
from methods import shifcon
from evaluation.routing import (METRICS, band_divergence_change, band_from_rows, format_routing, models_in,
                                read_routing_csv, routing_distributions, routing_divergence, write_routing_csv)
from model import context_problem, sampling_problems
from provenance import platform_info
from stats import correlate

SEED_MAX = 2 ** 63 - 1  # torch.Generator.manual_seed and numpy's default_rng take 0 .. 2**63 - 1 here


def load_model(checkpoint, tokenizer, dtype, device):
    """-> (model, tokenizer) by checkpoint.load_model_and_tokenizer; its errors (a missing checkpoint, a .pt
    without --tokenizer, a tokenizer larger than the model's vocabulary) as one line naming the file."""
    if not Path(checkpoint).exists():
        raise SystemExit(f"--checkpoint {checkpoint}: no such file or directory")
    try:
        return load_model_and_tokenizer(checkpoint, tokenizer or "", dtype=_dtype(dtype), device=device)
    except CheckpointError as err:
        raise SystemExit(f"--checkpoint {checkpoint}: {err}") from None


def peek_checkpoint(checkpoint, tokenizer):
    """-> (context or None, tokenizer), without reading the weights: the tokenizer (checkpoint.checkpoint_tokenizer),
    and a directory's config.json (a .pt holds its config with its weights: None, checked after loading)."""
    try:
        tok = checkpoint_tokenizer(checkpoint, tokenizer or "")
    except CheckpointError as err:
        raise SystemExit(f"--checkpoint {checkpoint}: {err}") from None
    return peek_context(Path(checkpoint)), tok


def _dtype(name):
    return getattr(torch, name) if name else None  # None: as stored


def _label(path):
    p = Path(path)
    return p.parent.name + "/" + p.name if p.name in ("hf", "base.pt") else p.name


def _say(msg):
    print(msg, file=sys.stderr, flush=True)


def check_bench_args(args):
    check_protocol(args.benchmark, args.protocol)
    if args.engine_url and (args.protocol != "generative" or not args.engine_model):
        raise SystemExit("--engine-url needs --engine-model (the served model's name) and serves the generative "
                         "protocol only (chat completions give no option log-likelihoods and apply a chat template)")
    if args.steering and args.engine_url:
        raise SystemExit("--steering runs in the built-in generator only: a serving engine (--engine-url) runs the "
                         "model unsteered; pass --checkpoint instead")
    if not args.steering and (args.steering_layers or args.steering_target):
        raise SystemExit("--steering-layers/--steering-target need --steering FILE")
    if args.engine_url and args.checkpoint and args.shifcon != "off" and shifcon.find_vectors(args.checkpoint):
        raise SystemExit(f"--checkpoint {args.checkpoint} is a ShifCon model ({shifcon.VECTORS_FILE}): a serving engine "
                         "(--engine-url) runs its weights without the shift, which is not ShifCon; evaluate it with "
                         "--checkpoint alone (the built-in generator), or pass --shifcon off to mean the unshifted weights")
    if not args.checkpoint and not args.engine_url:
        raise SystemExit("bench needs --checkpoint, or --engine-url and --engine-model")
    if args.engine_url:  # the URL (never echoed: it may hold a password) and the client's settings, up front
        try:
            check_url(args.engine_url, "--engine-url")
        except EngineError as err:
            raise SystemExit(str(err)) from None
        problems = settings_problems(args.engine_timeout, args.engine_retries, args.engine_concurrency,
                                     names=("--engine-timeout", "--engine-retries", "--engine-concurrency"))
        if problems:
            raise SystemExit("; ".join(problems))
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file or directory")
    if args.protocol == "harness" and args.templates:
        raise SystemExit("--templates does not apply to the harness protocol (it asks with lm-evaluation-harness's "
                         "own prompts)")
    langs = args.langs.split(",")
    if not all(langs) or len(set(langs)) != len(langs):
        raise SystemExit(f"--langs {args.langs!r}: expected distinct comma-separated codes, e.g. sw,hi")
    # the one sampling check (model.sampling_problems) decides; the messages keep eval.py's wording
    bad = {p.split("=", 1)[0] for p in sampling_problems(args.temperature, args.top_p, args.max_new_tokens,
                                                         names=("--temperature", "--top-p", "--max-new-tokens"))}
    for flag, value, ok, want in [
            ("--runs", args.runs, args.runs >= 1, ">= 1"), ("--temperature", args.temperature, "--temperature" not in bad, ">= 0 (0: greedy)"),
            ("--top-p", args.top_p, "--top-p" not in bad, "in (0, 1]"), ("--max-new-tokens", args.max_new_tokens, "--max-new-tokens" not in bad, ">= 1"),
            ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"), ("--limit", args.limit, args.limit is None or args.limit >= 1, ">= 1"),
            ("--engine-concurrency", args.engine_concurrency, args.engine_concurrency >= 1, ">= 1"),
            ("--seed", args.seed, 0 <= args.seed <= SEED_MAX - args.runs, "in 0..2**63 - 1 - --runs (run r samples with seed + r)")]:
        if not ok:
            raise SystemExit(f"{flag} must be {want}, got {value}" + ("" if _finite(value) else " (not a finite number)"))


def _finite(value):
    return not isinstance(value, float) or math.isfinite(value)


def check_prompts_fit(items, templates, args, tok, context):
    """Every prompt + what the protocol adds must fit the context, checked before any weight is read;
    the message names the longest prompt's item and says what fits."""
    chat = args.protocol != "harness"
    generating = args.protocol == "generative" or args.benchmark == "mgsm"
    new = args.max_new_tokens if generating else 1  # log-likelihood: the option letter (checked exactly later)
    longest, where = 0, None
    for lang, its in items.items():
        for it in its:
            n = len(encode_prompt(tok, item_prompt(it, args.benchmark, args.protocol, templates), chat=chat,
                                  system=args.system))
            if n > longest:
                longest, where = n, f"{lang} item {it['id']}"
    problem = context_problem(longest, new, context, what=f"the longest prompt ({where})")
    if problem is None:
        return
    if not generating:
        raise SystemExit(f"the model's context is {context} tokens: {problem}")
    fits = (f"--max-new-tokens {context - longest} or less fits every prompt" if longest < context
            else "shorten the prompts (--templates) or --limit the items")
    raise SystemExit(f"--max-new-tokens {args.max_new_tokens}: the model's context is {context} tokens; {problem}; {fits}")


def make_responder(args, items, templates):
    """-> (respond(prompts, run), on_language or None): an OpenAI-compatible server (engine.py), or the checkpoint
    run here (its prompts checked against the context before the weights are read, where the context is known
    without them; a ShifCon checkpoint shifted by each language's prompts, told through on_language)."""
    if args.engine_url:  # same call signature as make_generative_responder
        return make_engine_responder(args.engine_url, args.engine_model, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                     concurrency=args.engine_concurrency, timeout=args.engine_timeout,
                                     retries=args.engine_retries, system=args.system), None
    context, tok = peek_checkpoint(args.checkpoint, args.tokenizer)
    if context is not None:
        check_prompts_fit(items, templates, args, tok, context)
    model, tok = load_model(args.checkpoint, args.tokenizer, args.dtype, args.device)
    if context is None:
        check_prompts_fit(items, templates, args, tok, model.config.max_position_embeddings)
    shift = shifcon_hook(model, args.checkpoint, list(items), args.shifcon)
    if args.steering:  # generation and log-likelihood both run the steered routers (methods/steering.py)
        from methods import steering
        try:
            edits = steering.steering_interventions(
                steering.load_statistics(args.steering), model.config, args.steering_rule, args.steering_strength,
                steering.parse_layers(args.steering_layers, model.config), target=args.steering_target, path=args.steering)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        steering.set_steering(model, edits)
    chat = args.protocol != "harness"
    on_language = shift.set_rows if shift is not None else None
    if args.protocol == "loglik" or (args.protocol == "harness" and args.benchmark != "mgsm"):
        return make_loglik_responder(model, tok, batch_size=args.batch_size, system=args.system, chat=chat), on_language
    if args.protocol == "harness":  # mgsm_direct: greedy
        return make_generative_responder(model, tok, max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0,
                                         batch_size=args.batch_size, seed=args.seed, chat=False, progress=_say), on_language
    return make_generative_responder(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, batch_size=args.batch_size, seed=args.seed, system=args.system,
                                     progress=_say), on_language


def shifcon_hook(model, checkpoint, langs, mode):
    """A ShifCon checkpoint (shifcon.json next to its weights) runs with its shift unless --shifcon off
    (methods/shifcon.install_for_inference); said on stderr either way. -> the hook or None."""
    try:
        hook = shifcon.install_for_inference(model, checkpoint, langs, mode, unshifted="pass --shifcon off")
    except ValueError as err:
        raise SystemExit(f"--checkpoint {checkpoint}: {err}") from None
    path = shifcon.find_vectors(checkpoint)
    if path:
        _say(f"ShifCon: {path} " + (f"shifts {langs} at residual positions {hook.forward}, {hook.back}" if hook
                                    else "is NOT applied (--shifcon off): the model runs unshifted"))
    return hook


def _protocol_line(args, runs):
    if args.protocol == "generative":
        return f"generative, {runs} run(s), T={args.temperature}, top-p {args.top_p}"
    if args.protocol == "loglik":
        return "log-likelihood of the letter, 1 run"
    return ("lm-evaluation-harness's way: " + ("its prompt, no chat template, greedy, last number of the reply"
            if args.benchmark == "mgsm" else "its prompt, no chat template, log-likelihood of ' A'..' D'") + ", 1 run")


def cmd_bench(args):
    check_bench_args(args)
    try:
        if args.engine_url:  # a wrong URL or model name fails now, not after the benchmarks are read
            check_engine(args.engine_url, args.engine_model, timeout=min(args.engine_timeout, 30.0))
        langs = args.langs.split(",")
        items = load_benchmarks(args.benchmark, args.data, langs, args.limit, progress=_say)
        templates = load_templates(args.templates, args.benchmark, langs)
        runs = 1 if args.protocol != "generative" else args.runs
        respond, on_language = make_responder(args, items, templates)
        records = run_benchmark(items, respond, benchmark=args.benchmark, protocol=args.protocol, runs=runs,
                                templates=templates, progress=_say, on_language=on_language)
    except EngineError as err:  # one line, as stage1.py prints it; the server's side of the story is in its log
        raise SystemExit(f"engine: {err}") from None
    summary = summarize(records)
    label = args.label or _label(args.checkpoint or args.engine_model)
    harness = args.protocol == "harness"
    meta = dict(benchmark=args.benchmark, protocol=args.protocol, checkpoint=args.checkpoint, label=label,
                engine_url=args.engine_url, engine_model=args.engine_model, runs=runs,
                temperature=0.0 if harness else args.temperature, top_p=1.0 if harness else args.top_p,
                max_new_tokens=args.max_new_tokens, seed=args.seed, templates=args.templates, system=args.system,
                steering=dict(file=args.steering, rule=args.steering_rule, strength=args.steering_strength,
                              layers=args.steering_layers, target=args.steering_target) if args.steering else None,
                shifcon=args.shifcon if args.checkpoint and not args.engine_url and shifcon.find_vectors(args.checkpoint) else None,
                platform=platform_info(None if args.engine_url else args.device))
    out = args.out or f"results/{args.benchmark}-{args.protocol}-{label.replace('/', '-')}"
    write_bench_outputs(out, records, summary, meta)
    title = BENCHMARKS[args.benchmark].title
    print(format_table([(label, summary)], langs, f"{title} accuracy (%), {_protocol_line(args, runs)}"))
    print(f"wrote {out}/predictions.jsonl, results.json, table.csv")
    return summary


def cmd_table(args):
    rows, langs, titles = [], [], set()
    loaded = [load_results(path) for path in args.results]
    several = len({(res["benchmark"], res["protocol"]) for _, res in loaded}) > 1
    for p, res in loaded:
        label = res.get("label") or p.parent.name  # rows of several benchmarks/protocols say which is which
        rows.append((f"{label} [{res['benchmark']}, {res['protocol']}]" if several else label, res))
        langs += [l for l in res["langs"] if l not in langs]
        title = BENCHMARKS[res["benchmark"]].title if res["benchmark"] in BENCHMARKS else res["benchmark"]
        titles.add(f"{title} ({res['protocol']}, "
                   f"{len(res['average']['runs'])} run(s))")
    print(format_table(rows, langs, "accuracy (%): " + ", ".join(sorted(titles))
                       + "; ± = std over the generation runs of one checkpoint (sampling noise, not seeds)"))


def cmd_routing(args):
    from data.parallel import load_parallel_jsonl
    samples = load_parallel_jsonl(args.data)
    langs = args.langs.split(",") if args.langs else None
    present = sorted({s["lang"] for s in samples})  # checked before any model runs (codes are case-sensitive)
    for flag, codes in (("--anchor", [args.anchor]), ("--langs", langs or [])):
        if [c for c in codes if c not in present]:
            raise SystemExit(f"{flag}: {[c for c in codes if c not in present]} not in {args.data} (its languages: {present})")
    if args.max_len < 2 or args.width < 0:
        raise SystemExit(f"--max-len must be >= 2 (got {args.max_len}) and --width >= 0 (got {args.width})")
    keep = set(langs + [args.anchor]) if langs else None
    samples = [s for s in samples if keep is None or s["lang"] in keep]
    checkpoints = [(args.checkpoint, args.tokenizer)] + (
        [(args.compare, args.compare_tokenizer or args.tokenizer)] if args.compare else [])
    labels = args.labels.split(",") if args.labels else [_label(c) for c, _ in checkpoints]
    if len(labels) != len(checkpoints) or len(set(labels)) != len(labels):
        raise SystemExit(f"--labels needs {len(checkpoints)} distinct names; got {labels}")
    rows = []
    for (ckpt, tok_path), label in zip(checkpoints, labels):
        model, tok = load_model(ckpt, tok_path, args.dtype, args.device)
        max_len = min(args.max_len, model.config.max_position_embeddings)
        shift = shifcon_hook(model, ckpt, sorted({s["lang"] for s in samples}), args.shifcon)
        dists = routing_distributions(model, tok, samples, batch_size=args.batch_size, max_len=max_len,
                                      system=args.system, set_rows=shift.set_rows if shift else None)
        rows += [dict(model=label, **r) for r in routing_divergence(dists, args.anchor, langs, model.config.moe_layers)]
        _say(f"{label}: routing of {len(samples)} sequences, {len(model.config.moe_layers)} MoE layers")
        del model
    out = Path(args.out)
    write_routing_csv(out / "routing.csv", rows)
    print(format_routing(rows, args.metric))
    band = None
    if args.width:
        b = band_from_rows(rows, args.width, metric=args.metric, edges=args.edges)
        band = (b["start"], b["end"])
        print(_band_line(b, args.width))
    paths = plot_routing(rows, out, args.metric, band)
    print(f"wrote {out / 'routing.csv'}" + (", " + ", ".join(map(str, paths)) if paths else ""))
    if paths is None:
        print(FIGURES_SKIPPED.format(out / "routing.csv"))
    return rows


def _band_line(b, width):
    where = "any window" if b["edges"] else "middle windows (first and last MoE layer excluded)"
    return (f"band of {width} layers with the lowest mean {b['metric']} ({b['model']}, {where}): layers "
            f"{b['start']}..{b['end']} (inclusive), mean {b['mean']:.4f}  ->  "
            f"python train.py --sara_band=[{b['start']},{b['end']}]")


def cmd_band(args):
    b = band_from_rows(read_routing_csv(args.routing_csv), args.width, args.model, args.metric, args.edges)
    print("per-layer mean over languages: " + ", ".join(f"L{l} {v:.4f}" for l, v in zip(b["layers"], b["curve"])))
    print(_band_line(b, args.width))
    return b


def parse_band(text):
    """--band "START,END" -> (start, end), decoder layers inclusive; anything else is an error naming it."""
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) > int(m.group(2)):
        raise SystemExit(f"--band {text!r}: expected START,END with START <= END (decoder layers, inclusive), e.g. 7,34")
    return int(m.group(1)), int(m.group(2))


def cmd_compare(args):
    if args.resamples < 1:
        raise SystemExit(f"--resamples must be >= 1 (e.g. 10000), got {args.resamples}")
    if not 0 <= args.seed <= SEED_MAX:
        raise SystemExit(f"--seed must be in 0..2**63 - 1, got {args.seed}")
    if args.routing_csv and not args.band:  # before any work
        raise SystemExit("--routing-csv needs --band START,END (decoder layers, inclusive; see `eval.py band`)")
    band = parse_band(args.band) if args.band else None
    pairs = pair_conditions([load_predictions(p) for p in args.a], [load_predictions(p) for p in args.b],
                            args.common_only)
    for note in pairs["notes"]:
        _say("warning: " + note)
    res = compare_conditions(pairs, resamples=args.resamples, seed=args.seed)
    print(format_comparison(res, len(pairs["units"]), args.resamples, args.seed))
    result = dict(a=list(map(str, args.a)), b=list(map(str, args.b)), resamples=args.resamples, seed=args.seed,
                  warnings=pairs["notes"], **res, platform=platform_info())
    if args.routing_csv:
        rows = [r for p in args.routing_csv for r in read_routing_csv(p)]
        models = models_in(rows)
        if len(models) != 2:
            raise SystemExit(f"the routing table(s) must hold exactly two models (a, b); found {models}")
        ddiv = band_divergence_change(rows, band, models[0], models[1], args.metric)
        corr = correlate(ddiv, {u: s["delta"] for u, s in res["bootstrap"].items() if u != "overall"})
        result["correlation"] = dict(band=band, metric=args.metric, models=models, **corr)
        print(format_correlation(result["correlation"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"wrote {args.out}")
    return result


def build_parser():
    p = argparse.ArgumentParser(description="SARA evaluation: benchmarks, routing analysis, statistics",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(q, required=True):
        q.add_argument("--checkpoint", required=required, help="Hugging Face checkpoint dir, or train.py's base.pt")
        q.add_argument("--tokenizer", default=None, help="tokenizer path (default: the checkpoint dir)")
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: the checkpoint's own")
        q.add_argument("--batch-size", type=int, default=16)
        q.add_argument("--system", default=None, help="optional system message")
        q.add_argument("--shifcon", default="auto", choices=["auto", "off"],
                       help="a ShifCon checkpoint (shifcon.json) runs with its shift (auto) or without it (off)")

    q = sub.add_parser("bench", help="Global-MMLU / BELEBELE / MGSM accuracy per language")
    model_args(q, required=False)  # required unless --engine-url
    q.add_argument("--engine-url", "--engine_url", default=None,
                   help="generate with an OpenAI-compatible server (e.g. http://localhost:8000/v1; engine.py)")
    q.add_argument("--engine-model", "--engine_model", default=None, help="the served model's name")
    q.add_argument("--engine-concurrency", type=int, default=16, help="requests in flight at once")
    q.add_argument("--engine-timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for one reply before retrying (default {DEFAULT_TIMEOUT:g})")
    q.add_argument("--engine-retries", type=int, default=DEFAULT_RETRIES,
                   help=f"retries of a failed or timed-out request (default {DEFAULT_RETRIES})")
    q.add_argument("--steering", default=None, help="routing statistics file (python -m methods.steering): steer the "
                   "routers at inference (built-in generator only)")
    q.add_argument("--steering-rule", default="chen", choices=["chen", "steermoe"])
    q.add_argument("--steering-strength", type=float, default=0.022,
                   help="chen: lambda (0.022: Chen et al.); steermoe: experts boosted and suppressed")
    q.add_argument("--steering-layers", default=None, help="start,end decoder layers (default: every MoE layer but the first and last)")
    q.add_argument("--steering-target", default=None, help="steermoe: the language steered away from")
    q.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    q.add_argument("--data", required=True, help="file, directory, or pattern with {lang}")
    q.add_argument("--langs", required=True, help="comma-separated, e.g. sw,hi,bn,te,ne")
    q.add_argument("--protocol", default="generative", choices=PROTOCOLS,
                   help="generative (the paper's), loglik (our prompt, letter log-likelihood), harness "
                        "(lm-evaluation-harness's prompts and scoring, for comparison with published numbers)")
    q.add_argument("--runs", type=int, default=3, help="generation runs (sampling seeds seed..seed+runs-1)")
    q.add_argument("--temperature", type=float, default=0.1)
    q.add_argument("--top-p", type=float, default=1.0)
    q.add_argument("--max-new-tokens", type=int, default=1024)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--templates", default=None, help="JSON file of prompt templates per benchmark/language")
    q.add_argument("--limit", type=int, default=None, help="first N items per language")
    q.add_argument("--label", default=None, help="row name in the table (default: from the checkpoint path)")
    q.add_argument("--out", default=None, help="output dir (default results/<benchmark>-<protocol>-<label>)")
    q.set_defaults(fn=cmd_bench)

    q = sub.add_parser("table", help="paper-style table from several bench outputs")
    q.add_argument("results", nargs="+", help="bench output dirs or their results.json")
    q.set_defaults(fn=cmd_table)

    q = sub.add_parser("routing", help="per-layer JS divergence of each language's routing to the anchor's")
    model_args(q)
    q.add_argument("--compare", default=None, help="a second checkpoint (e.g. after SARA), side by side")
    q.add_argument("--compare-tokenizer", default=None, help="default: --tokenizer, else the --compare dir")
    q.add_argument("--labels", default=None, help="names of the two models, e.g. before,after")
    q.add_argument("--data", default="data/udhr/parallel.jsonl", help="parallel JSONL (data/parallel.py format)")
    q.add_argument("--anchor", default="en")
    q.add_argument("--langs", default=None, help="default: every language in the data but the anchor")
    q.add_argument("--max-len", type=int, default=512)
    q.add_argument("--metric", default="js_norm", choices=METRICS, help="for the printout, figures and band")
    q.add_argument("--width", type=int, default=0, help="also choose a band of this many layers")
    q.add_argument("--edges", action="store_true", help="let the band include the first or last MoE layer")
    q.add_argument("--out", default="results/routing")
    q.set_defaults(fn=cmd_routing)

    q = sub.add_parser("band", help="the K-layer middle window with the lowest divergence (bottom of the U)")
    q.add_argument("--routing-csv", required=True)
    q.add_argument("--width", type=int, required=True)
    q.add_argument("--model", default=None, help="which model of the table (default: the first)")
    q.add_argument("--metric", default="js_norm", choices=METRICS)
    q.add_argument("--edges", action="store_true", help="let the band include the first or last MoE layer")
    q.set_defaults(fn=cmd_band)

    q = sub.add_parser("compare", help="paired bootstrap (items) and t interval (seeds) of two conditions")
    q.add_argument("--a", required=True, nargs="+", help="bench output dir(s) or predictions.jsonl, one per seed")
    q.add_argument("--b", required=True, nargs="+", help="the same for the other condition, seeds in the same order")
    q.add_argument("--common-only", action="store_true", help="compare only the languages both sides have")
    q.add_argument("--resamples", type=int, default=10000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--routing-csv", nargs="+", default=None,
                   help="routing table(s) holding the two models, a first (eval.py routing --compare)")
    q.add_argument("--band", default=None, help="START,END decoder layers, inclusive")
    q.add_argument("--metric", default="js_norm", choices=METRICS)
    q.add_argument("--out", default=None, help="write the numbers as JSON here")
    q.set_defaults(fn=cmd_compare)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
