"""
The SARA comparison in the gated world (experiments/gated_world.py), on the product's training loop.

    python experiments/gated_sara.py            # beta 2, seeds 0-4, every condition -> experiments/results/gated_world/sara/
    python experiments/gated_sara.py --quick    # 2 seeds, short training (CI: tests/test_gated_world.py)

Declared before any run (experiments/results/gated_world/report.md): from one base model per seed, in the world
of beta = COMPARE["beta"], on identical batches of the bridge entities' target-language Q/A:
    (a) plain   CE + lambda_LB * LB                       (lambda_JS = 0)
    (b) band    (a) + lambda_JS * L_JS on the middle band (SARA, eq. 9; anchors = the base model's pooled routing of
                each row's English version under the English prior)
PRIMARY endpoint: target accuracy on test-entity facts, (b) - (a), one difference per seed, paired t interval over
the seeds (stats.t_interval). Manipulation check: band JS(target || English) on the test questions, (b) < (a).
Secondary conditions (not in the decision), same base, batches, lambda_JS and anchors unless said:
    all           SARA on every layer (0-3)
    layer3        SARA on layer 3 only: a layer outside the band, where the world has no gate
    frozen_router (b) with every router gate weight W_g frozen (methods.controls.frozen_router_names)
    mismatched    (b) with each row anchored on ANOTHER fact's English routing (methods.controls.mismatched_rows,
                  items = (entity, relation): the other question template of the same fact is not "another item")

Training: train_steps -> gated_world.train_steps_under_prior -> loop.train_phase (eq. 12 by step_loss.py) with
methods.sara.Sara as the method (lambda_JS = 0 for plain: computed, logged, never differentiated, so bit-identical
to no term) and this driver's batches as the loop's `schedule`; the per-row language prior is set on the routers
before each step's forward by gated_world.LanguagePrior (the loop's begin_step; one micro-batch per step).
"""
import argparse
import copy
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gated_world as G  # noqa: E402  (puts the repository root on sys.path)
import stats  # noqa: E402
from methods.controls import frozen_router_names, mismatched_rows  # noqa: E402
from methods.sara import Sara  # noqa: E402
from model import MoEConfig, MoETransformer  # noqa: E402
from provenance import platform_info  # noqa: E402
from router import intervene  # noqa: E402
from sara_loss import moe_positions, pool_routing  # noqa: E402

ROOT = G.ROOT
COMPARE = dict(beta=2.0, seeds=[0, 1, 2, 3, 4], finetune_epochs=10, finetune_batch=32, finetune_lr=3e-3,
               lambda_js=1.5)
QUICK_COMPARE = {**COMPARE, "seeds": [0, 1], "finetune_epochs": 2, "finetune_batch": 16}
# name -> (SARA layers: "band" = the middle band, "all", or a list; lambda_JS on?; routers frozen?; anchors mismatched?)
CONDITIONS = dict(plain=("band", False, False, False), band=("band", True, False, False), all=("all", True, False, False),
                  layer3=([3], True, False, False), frozen_router=("band", True, True, False),
                  mismatched=("band", True, False, True))


def train_steps(model, batches, anchors, *, lambda_js, band, prior, settings, lr):
    """Fine-tune `model` in place, one optimizer step per batch, with the product's loop (loop.train_phase via
    gated_world.train_steps_under_prior): eq. 12, CE + lambda_LB * LB + lambda_JS * L_JS over `band` (decoder
    layers; methods.sara.Sara), every forward under its rows' language prior. batches: lists of
    gated_world.finetuning_rows; anchors: per batch (B, L, E) pooled anchor routing. Parameters with
    requires_grad False stay as they are (no gradient: AdamW skips them). -> loop records (one per step)."""
    examples, schedule, table = [], [], {}
    for step, (rows, anchor_BLE) in enumerate(zip(batches, anchors)):
        first = len(examples)
        for i, r in enumerate(rows):
            key = f"{step}:{i}"
            table[key] = anchor_BLE[i]
            examples.append(dict(id=key, input_ids=r["ids"], labels=r["labels"], lang=r["lang"], has_anchor=True))
        schedule.append((step, [list(range(first, len(examples)))]))  # one micro-batch per step
    sara = Sara(table, moe_positions(model.config.moe_layers, band), lambda_js)
    return G.train_steps_under_prior(model, examples, schedule, settings, lr, prior, inner=sara, phase="finetune")


def batches_digest(batches):
    return hashlib.sha256(json.dumps([[r["ids"] for r in b] for b in batches]).encode()).hexdigest()[:12]


def finetune_order(n_rows, compare, seed):
    """Row indices of each fine-tuning step: the same for every condition of a seed."""
    rng = np.random.default_rng(3000 + seed)
    B, steps = compare["finetune_batch"], []
    for _ in range(compare["finetune_epochs"]):
        perm = rng.permutation(n_rows)
        steps += [perm[i:i + B] for i in range(0, n_rows - B + 1, B)]
    return steps


@torch.no_grad()
def anchor_routing(model, rows, prior):
    """(N, L, E) pooled routing (eq. 1-2) of each row's English version, under the English prior."""
    ids, mask = G.collate([r["anchor_ids"] for r in rows])
    with intervene(model, G.language_prior(["en"] * len(rows), prior, model.config)):
        return pool_routing(model(ids, attention_mask=mask).router_logits, mask)


def compare_seed(settings, compare, seed, train=None, conditions=None):
    """One seed: base model in the world of compare["beta"], then each condition from it on identical batches
    (asserted). train: the training function (default train_steps). -> dict(seed, band_layers, base, batches
    (digest), per condition: gated_world.measure(...) record + train_ce / train_js (last step) + wall_s)."""
    train = train or train_steps
    conditions = list(conditions or CONDITIONS)
    vocab = G.make_vocab(settings)
    world = G.build_world(settings, seed, vocab)
    s = world["split"]
    en, tgt = G.pretraining_rows(world, vocab)
    ft = G.finetuning_rows(world, vocab, s["bridge"])
    G.check_splits(world, vocab, en, tgt, ft)
    torch.manual_seed(seed)
    model = MoETransformer(MoEConfig(vocab_size=len(vocab.itos), **settings["model"]))
    prior = G.world_prior(settings, compare["beta"], model.config)
    t0 = time.time()
    G.pretrain(model, en, tgt, settings, seed, prior)
    items = sum((G.eval_items(world, vocab, s[k], k) for k in ("test", "shared", "control")), [])
    anchors = anchor_routing(model, ft, prior)  # the ORIGINAL model's, once
    mismatched = anchors[torch.as_tensor(mismatched_rows([(r["ent"], r["rel"]) for r in ft], seed))]
    cfg = model.config
    band = [l for l in cfg.moe_layers if 0 < l < cfg.n_layers - 1]
    order = finetune_order(len(ft), compare, seed)
    base = copy.deepcopy(model.state_dict())
    out = dict(seed=seed, band_layers=band, base=G.measure(model, items, prior, seed), base_wall_s=round(time.time() - t0, 1))
    batches = [[ft[j] for j in idx] for idx in order]
    out["batches"] = batches_digest(batches)
    for cond in conditions:
        layers, js_on, frozen, mis = CONDITIONS[cond]
        layers = band if layers == "band" else list(cfg.moe_layers) if layers == "all" else layers
        t0 = time.time()
        model.load_state_dict(base)
        frozen_names = set(frozen_router_names(model)) if frozen else set()
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen_names)  # before train_phase builds its optimizer
        table = mismatched if mis else anchors
        assert batches_digest(batches) == out["batches"], "the batches changed between conditions"
        records = train(model, batches, [table[torch.as_tensor(idx)] for idx in order], lambda_js=compare["lambda_js"] if js_on else 0.0,
                        band=layers, prior=prior, settings=settings, lr=compare["finetune_lr"])
        for p in model.parameters():
            p.requires_grad_(True)
        if frozen:
            assert all(torch.equal(dict(model.named_parameters())[n], base[n]) for n in frozen_names), "a frozen router moved"
        model.eval()
        res = G.measure(model, items, prior, seed)
        last = (records or [{}])[-1]
        res.update(sara_layers=layers, train_ce=last.get("ce"), train_js=last.get("js"), wall_s=round(time.time() - t0, 1))
        out[cond] = res
    return out


def band_mean(values, band):
    return float(np.mean([values[l] for l in band]))


def primary(records):
    """records: compare_seed results -> the declared primary contrast (b) - (a) of target accuracy over seeds."""
    d = np.array([r["band"]["tgt"] - r["plain"]["tgt"] for r in records])
    return dict(per_seed=d.tolist(), **(stats.t_interval(d) if len(d) >= 2 else dict(mean=float(d.mean()), lo=None, hi=None, p=None)))


def analyse(records, conditions):
    """The declared rule (report.md) on the primary contrast, the manipulation check and the ceiling; every other
    condition against plain (secondary, no decision). Intervals: paired 95% t over seeds."""
    band = records[0]["band_layers"]
    col = lambda cond, f: np.array([f(r[cond]) for r in records], dtype=np.float64)
    ci = lambda x: dict(per_seed=x.tolist(), **(stats.t_interval(x) if len(x) >= 2 else dict(mean=float(x.mean()), lo=None, hi=None, p=None)))
    prim = primary(records)
    js_plain, js_band = col("plain", lambda m: band_mean(m["js"], band)), col("band", lambda m: band_mean(m["js"], band))
    ceiling = col("plain", lambda m: m["oracle"]["band"] - m["tgt"])
    manip = bool(js_band.mean() < js_plain.mean())
    if prim.get("lo") is not None and prim["lo"] > 0:
        verdict = "supported"
    elif manip and prim.get("hi") is not None and prim["hi"] < 0.25 * ceiling.mean():
        verdict = "falsified"
    else:
        verdict = "inconclusive"
    per_cond = {}
    for cond in ["base"] + list(conditions):
        per_cond[cond] = dict(
            en=col(cond, lambda m: m["en"]).tolist(), tgt=col(cond, lambda m: m["tgt"]).tolist(),
            oracle_band=col(cond, lambda m: m["oracle"]["band"]).tolist(),
            ceiling=ci(col(cond, lambda m: m["oracle"]["band"] - m["tgt"])),
            js_band=col(cond, lambda m: band_mean(m["js"], band)).tolist(),
            topk_band=col(cond, lambda m: band_mean(m["topk"], band)).tolist(),
            js=np.mean([r[cond]["js"] for r in records], 0).tolist(), topk=np.mean([r[cond]["topk"] for r in records], 0).tolist(),
            control=float(np.mean([r[cond]["control"] for r in records])))
        if cond not in ("base", "plain"):
            per_cond[cond]["tgt_minus_plain"] = ci(col(cond, lambda m: m["tgt"]) - col("plain", lambda m: m["tgt"]))
            per_cond[cond]["en_minus_plain"] = ci(col(cond, lambda m: m["en"]) - col("plain", lambda m: m["en"]))
    return dict(primary=prim, manipulation=dict(js_plain=js_plain.tolist(), js_band=js_band.tolist(), passed=manip),
                ceiling_plain=ci(ceiling), quarter_ceiling=0.25 * float(ceiling.mean()), verdict=verdict, conditions=per_cond)


def tables(S):
    A, lines = S["analysis"], []
    p = A["primary"]
    lines += [f"Primary (declared): target accuracy, band − plain = {G.fmt_ci(p)} (paired 95% t, {len(p['per_seed'])} seeds; "
              f"per seed {', '.join(f'{x:+.3f}' for x in p['per_seed'])}). Manipulation check (band JS, band < plain): "
              f"{np.mean(A['manipulation']['js_band']):.4f} vs {np.mean(A['manipulation']['js_plain']):.4f}: "
              f"{'passed' if A['manipulation']['passed'] else 'FAILED'}. Ceiling after plain (oracle band − target): "
              f"{G.fmt_ci(A['ceiling_plain'])}; a quarter of it {A['quarter_ceiling']:.3f}. Verdict: **{A['verdict']}**.", "",
              "| condition | English | target | target − plain [95% t] | English − plain [95% t] | oracle, band | ceiling (oracle − target) | "
              "pooled JS, band | top-2 agreement, band | control |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cond, a in A["conditions"].items():
        lines.append(f"| {cond} | {G.fmt(a['en'])} | {G.fmt(a['tgt'])} | {G.fmt_ci(a['tgt_minus_plain']) if 'tgt_minus_plain' in a else '—'} | "
                     f"{G.fmt_ci(a['en_minus_plain']) if 'en_minus_plain' in a else '—'} | {G.fmt(a['oracle_band'])} | "
                     f"{G.fmt_ci(a['ceiling'])} | {G.fmt(a['js_band'], 4)} | {G.fmt(a['topk_band'])} | {a['control']:.3f} |")
    lines += ["", "Per layer (mean over seeds): pooled JS (target ‖ English) / token-level top-2 agreement with the aligned English token.", "",
              "| condition | " + " | ".join(f"layer {l}" for l in range(len(A["conditions"]["base"]["js"]))) + " |",
              "|---|" + "---|" * len(A["conditions"]["base"]["js"])]
    for cond, a in A["conditions"].items():
        lines.append(f"| {cond} | " + " | ".join(f"{j:.3f} / {t:.2f}" for j, t in zip(a["js"], a["topk"])) + " |")
    return "\n".join(lines) + "\n"


def run_seed(job):
    settings, compare, seed, conditions = job
    torch.set_num_threads(1)
    t0 = time.time()
    out = compare_seed(settings, compare, seed, conditions=conditions)
    out["wall_s"] = round(time.time() - t0, 1)
    out["platform"] = platform_info("cpu")  # per seed: seeds may run in separate processes (--seeds) and be merged (--report)
    print(f"seed {seed}: " + "  ".join(f"{c} tgt {out[c]['tgt']:.3f} en {out[c]['en']:.3f}" for c in ["base"] + conditions)
          + f" ({out['wall_s']:.0f}s)", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 seeds, short pretraining and fine-tuning (CI)")
    p.add_argument("--results", default=None, help="default experiments/results/gated_world/sara (quick: out/gated_sara_quick)")
    p.add_argument("--jobs", type=int, default=2, help="seeds run at once, one process and one thread each")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="override the seeds (e.g. to run them in separate processes)")
    p.add_argument("--report", nargs="*", default=None, metavar="RUNS_JSONL",
                   help="no training: summary and tables from these runs.jsonl files (default: the results folder's)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated, plain and band required; of {list(CONDITIONS)}")
    args = p.parse_args()
    conditions = [c for c in args.conditions.split(",") if c]
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not {"plain", "band"} <= set(conditions):
        raise SystemExit(f"--conditions={args.conditions!r}: unknown {bad}; must include plain and band; choose from {list(CONDITIONS)}")
    if args.jobs < 1:
        raise SystemExit(f"--jobs={args.jobs}: must be at least 1")
    settings, compare = (G.QUICK, QUICK_COMPARE) if args.quick else (G.FULL, COMPARE)
    results = os.path.abspath(args.results or os.path.join(ROOT, *(("out", "gated_sara_quick") if args.quick
                                                                   else ("experiments", "results", "gated_world", "sara"))))
    if args.seeds:
        compare = {**compare, "seeds": args.seeds}
    os.makedirs(results, exist_ok=True)
    t0 = time.time()
    jobs = [(settings, compare, seed, conditions) for seed in compare["seeds"]]
    partial = os.path.join(results, "runs.jsonl")  # each seed's record as it finishes (an interrupted run keeps them)
    records = []
    if args.report is not None:
        for path in args.report or [partial]:
            with open(path) as f:
                records += [json.loads(line) for line in f if line.strip()]
        seeds = sorted(r["seed"] for r in records)
        if len(set(seeds)) != len(seeds) or any(set(conditions) - set(r) for r in records):
            raise SystemExit(f"--report {args.report}: seeds {seeds} (each once?) and conditions {conditions} (in every record?)")
        compare = {**compare, "seeds": seeds}
        with open(partial + ".tmp", "w") as f:  # the merged records, then in place of runs.jsonl
            f.writelines(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["seed"]))
        os.replace(partial + ".tmp", partial)
    elif args.jobs > 1:
        open(partial, "w").close()
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            it = pool.imap_unordered(run_seed, jobs)
            for rec in it:
                records.append(rec)
                with open(partial, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    else:
        open(partial, "w").close()
        for job in jobs:
            records.append(run_seed(job))
            with open(partial, "a") as f:
                f.write(json.dumps(records[-1]) + "\n")
    records.sort(key=lambda r: r["seed"])
    cmd = "python experiments/gated_sara.py" + (" --quick" if args.quick else "") + \
          ("" if conditions == list(CONDITIONS) else f" --conditions {','.join(conditions)}") + \
          (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
    if args.report is not None:
        wall = sum(r["wall_s"] for r in records)  # the training runs' own, summed (they may have run in parallel)
    S = dict(command=cmd, settings=settings, compare=compare, conditions=conditions, analysis=analyse(records, conditions),
             runs=records, wall_s=round(time.time() - t0, 1), jobs=args.jobs, platform=platform_info("cpu"))
    if args.report is not None:
        S.update(command=f"{cmd} --report", wall_s=None, seed_wall_s_sum=round(wall, 1), jobs=None,
                 note="summary from runs.jsonl records; each record's own wall_s is its seed's wall time")
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump(S, f, indent=1)
    md = tables(S)
    with open(os.path.join(results, "tables.md"), "w") as f:
        f.write(f"Command: `{S['command']}`; " + (f"{S['wall_s'] / 60:.1f} min wall, {args.jobs} processes of 1 thread" if S["wall_s"]
                else f"from runs.jsonl; per-seed wall times {[r['wall_s'] for r in records]} s") + ".\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
