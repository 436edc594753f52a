"""
A controlled study in which knowledge TRANSFER is possible and measurable: facts learned in English,
asked in other languages. Runs on a CPU, in one process.

    python experiments/transfer.py            # the full study: 5 seeds x 5 conditions -> experiments/results/transfer/
    python experiments/transfer.py --quick    # 2 seeds, short training (CI: tests/test_transfer.py)

The world (drawn per seed; built in experiments/transfer_world.py). Entities (proper nouns, one
token each, SHARED by all languages) have one value for each of 4 relations (8 candidate values per
relation, chance = 1/8). Facts are stated in 3 paraphrase templates and asked in 2 question/answer
templates. Four languages say the same thing with their own tokens (only entity names are shared):
    en   the anchor language, English-like;
    ren  every word renamed (its own token ids), same word order;
    ord  renamed and another word order (each run of words between punctuation reversed);
    sub  every word split into two sub-tokens from a small syllable inventory.
Entity splits (disjoint, drawn per seed):
    shared   facts in English AND the target languages in pretraining (how the languages relate);
    test     facts ONLY in English in pretraining, never in fine-tuning: what we measure;
    bridge   facts in English in pretraining; their target-language Q/A only in fine-tuning, each
             with its English version as the anchor (SARA's training data);
    control  never shown anywhere (leakage check: accuracy must be at chance).
Pretraining: all English statements and Q/A of shared, test and bridge entities; target-language
rows (shared entities only) are target_share = 20% of the rows, half of them English-target
translation pairs of a statement (parallel text; the model's only direct view of the lexicons).
Measured on seed 0 while sizing the study (one run each, 2-core machine shared with other jobs):
with batch 64, 1,000 steps, lr 3e-3 or 1e-2 and no translation pairs, plain fine-tuning ended at
English accuracy 0.42-0.48 and target accuracy 0.13-0.18 on the test facts; with the settings
below (batch 32, 2,000 steps, lr 1e-2, translation pairs; several knobs changed at once): English
0.94, target 0.25. A seed costs ~2.5 CPU-minutes; the full study took 26 min wall.

Conditions, all from the identical base model of a seed, on identical batches (asserted):
    (a) plain     lambda_JS = 0 (the JS term is computed and logged, never differentiated)
    (b) band      SARA (sara_loss.py, eq. 9) on the band chosen from the BASE model's routing on the
                  fine-tuning items only (bottom of its per-layer JS curve, middle windows)
    (c) all       SARA on every MoE layer
    (d) other     SARA on a band of the same width that does not overlap (b), drawn per seed
    (e) positive  (a) plus the test entities' target-language Q/A in fine-tuning: the upper bound
                  (each batch = (a)'s batch + its share of those rows; (a)'s rows asserted inside)
Metric (per item = test entity x relation x language x question template): log-likelihood of
each candidate value of the relation (in that language) after the question; correct if the true
value has the highest. Target accuracy pools ren/ord/sub; English accuracy on the same facts shows
forgetting; transfer ratio = (acc_target - chance) / (acc_en - chance). Mechanism: routing
agreement between a target question and its English version, per layer, (i) at the token level
(aligned token pairs: mean |top-k experts of the target token & top-k of its English token| / k,
chance k/E) and (ii) pooled over the sequence (JS, what the loss aligns).

Statistics, declared here before any run: PRIMARY endpoint = target accuracy (b) - (a) on test
entities, one number per seed, paired t-interval over seeds and its two-sided p. Secondary
contrasts (Holm-corrected over the family): (c) - (a), (d) - (a), (e) - (a), (b) - (d). (The
declaration also named a minimum detectable effect at the observed seed-to-seed SD of the primary
difference: that is post-hoc power, which says nothing the interval does not, and with 5 seeds the
observed SD is itself uncertain; the report gives the interval and what its bounds exclude instead.)
Added after the run, not declared: target accuracy CONDITIONAL on English being correct for the same
fact and question template, per seed (conditional_transfer). Fine-tuning costs English accuracy
(forgetting), which lowers unconditional target accuracy without saying anything about transfer;
the conditional rate asks only how often a fact the model still knows in English is also answered
in the target languages. Computed from per_item.csv.gz (the committed full run: rendered by --report).
"""
import argparse
import copy
import csv
import gzip
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402  seed-level t-interval, Holm, mean/std
from anchors import forward_and_pool  # noqa: E402
from evaluation.figures import pyplot  # noqa: E402  matplotlib, optional
from evaluation.routing import choose_band  # noqa: E402
from model import MoEConfig, MoETransformer  # noqa: E402
from data.parallel import collate  # noqa: E402
from loop import Dist, Run, train_phase  # noqa: E402
from methods.sara import Sara  # noqa: E402
from provenance import platform_info  # noqa: E402
from sara_loss import js_divergence, layer_band, pool_routing  # noqa: E402
from settings import TrainSettings  # noqa: E402
from transfer_world import (RELATIONS, TARGETS, Vocab, assert_no_entity, build_world, eval_items,  # noqa: E402
                            finetuning_data, pretraining_data)

PRIMARY = ("band", "plain")  # the endpoint, declared before the runs
SECONDARY = [("all", "plain"), ("other", "plain"), ("positive", "plain"), ("band", "other")]
CONDITIONS = ["plain", "band", "all", "other", "positive"]
LABELS = {"base": "base (before)", "plain": "(a) plain", "band": "(b) SARA band", "all": "(c) SARA all",
          "other": "(d) other band", "positive": "(e) positive control"}

# -----------------------------------------------------------------------------
# settings
MODEL = dict(hidden_size=64, n_layers=6, n_heads=4, n_kv_heads=2, intermediate_size=128, n_experts=8, top_k=2,
             moe_intermediate_size=64, qk_norm=True, norm_topk_prob=True, max_position_embeddings=64,
             router_aux_loss_coef=0.01, expert_impl="loop")
FULL = dict(seeds=[0, 1, 2, 3, 4], model=MODEL, n_entities=dict(shared=24, test=12, bridge=12, control=8),
            target_share=0.2, parallel_share=0.5, pretrain_steps=2000, pretrain_batch=32, pretrain_lr=1e-2,
            finetune_epochs=10, finetune_batch=32, finetune_lr=3e-3, lambda_js=1.5, band_width=2,
            warmup_frac=0.1, weight_decay=0.01, grad_clip=1.0)
QUICK = {**FULL, "seeds": [0, 1], "n_entities": dict(shared=12, test=8, bridge=8, control=8), "pretrain_steps": 100,
         "pretrain_batch": 32, "finetune_epochs": 2}

# -----------------------------------------------------------------------------
# batches, training: train.py's own loop (loop.train_phase) and loss (step_loss.py, eq. 12)
def digest(indices):
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]


def train(model, batches, settings, lr, js_weight=0.0, band=None):
    """batches: list of (rows, anchor_dist (B, L, E) or None), one optimizer step each, in this order.
    Runs loop.train_phase, the loop of train.py: eq. 12 (CE + lambda_LB * LB + z-loss + lambda_JS * L_JS
    over `band`, the mean over the step's anchored samples) with methods/sara.py as the component. With
    js_weight = 0 the JS term is logged, not differentiated. -> [dict(step, ce, js or None)]."""
    examples, schedule, anchors = [], [], {}
    for step, (rows, anchor_dist) in enumerate(batches):
        first = len(examples)
        for i, r in enumerate(rows):
            key = f"{step}:{i}"
            if anchor_dist is not None:
                anchors[key] = anchor_dist[i]
            examples.append(dict(id=key, input_ids=r["ids"], labels=r.get("labels", r["ids"]),
                                 has_anchor=anchor_dist is not None))
        schedule.append((step, [list(range(first, len(examples)))]))  # one micro-batch per step
    s = TrainSettings(lambda_js=js_weight, beta2=0.999, weight_decay=settings["weight_decay"], warmup_frac=settings["warmup_frac"],
                      grad_clip=settings["grad_clip"], log_interval=1, eval_interval=10 ** 9, ckpt_interval=10 ** 9)
    method = Sara(anchors, band, js_weight) if anchors else None
    model.train()
    records = train_phase(Run(s, Dist(), pad_id=0, quiet=True), "transfer", model, examples, len(batches), lr, method,
                          None, None, schedule=iter(schedule))
    model.eval()
    return [dict(step=r["step"], ce=round(r["ce"], 4), js=round(r["js"], 5) if "js" in r else None) for r in records]


def pretrain_batches(en, tgt, par, settings, seed):
    """Each row is target-language with probability target_share (of those, a translation pair with
    probability parallel_share), else English."""
    rng = np.random.default_rng(2000 + seed)
    B, out = settings["pretrain_batch"], []
    for _ in range(settings["pretrain_steps"]):
        n_t = rng.binomial(B, settings["target_share"])
        n_p = rng.binomial(n_t, settings["parallel_share"])
        rows = [en[i] for i in rng.integers(len(en), size=B - n_t)] + [tgt[i] for i in rng.integers(len(tgt), size=n_t - n_p)]
        out.append((rows + [par[i] for i in rng.integers(len(par), size=n_p)], None))
    return out


def finetune_order(n_rows, settings, seed):
    """Row indices of each fine-tuning step: the same for every condition of a seed."""
    rng = np.random.default_rng(3000 + seed)
    B, steps = settings["finetune_batch"], []
    for _ in range(settings["finetune_epochs"]):
        perm = rng.permutation(n_rows)
        steps += [perm[i:i + B] for i in range(0, n_rows - B + 1, B)]
    return steps


# -----------------------------------------------------------------------------
# measurement
def pooled(model, seqs):
    """Pooled dense routing (eq. 1-2, 6-7) of each token sequence: (N, L, E)."""
    return forward_and_pool(model, seqs, pad_id=0, batch_size=256).routing


@torch.no_grad()
def candidate_logliks(model, items, batch=1024):
    """(items, 8) log p(candidate | question), summed over the candidate's tokens. Items whose
    candidates are all one token need one forward of the question; others one per candidate."""
    score = torch.zeros(len(items), 8, dtype=torch.float64)
    single = [k for k, it in enumerate(items) if all(len(c) == 1 for c in it["cands"])]
    for i in range(0, len(single), batch):
        ks = single[i:i + batch]
        b = collate([dict(input_ids=items[k]["prompt"]) for k in ks], pad_id=0)
        ids, mask = b["input_ids"], b["attention_mask"]
        last = mask.sum(1) - 1  # the question's last token predicts the answer's first
        logp_BV = torch.log_softmax(model(ids, attention_mask=mask).logits[torch.arange(len(ks)), last].float(), -1)
        cand_B8 = torch.tensor([[c[0] for c in items[k]["cands"]] for k in ks])
        score[ks] = logp_BV.gather(1, cand_B8).double()
    multi = [(k, c) for k, it in enumerate(items) if k not in set(single) for c in range(8)]
    for i in range(0, len(multi), batch):
        chunk = multi[i:i + batch]
        rows = [dict(input_ids=items[k]["prompt"] + items[k]["cands"][c],
                     labels=[-100] * len(items[k]["prompt"]) + items[k]["cands"][c]) for k, c in chunk]
        b = collate(rows, pad_id=0)
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        logp_BTV = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), -1)
        target_BT = labels[:, 1:]  # position t predicts token t + 1
        tok_BT = logp_BTV[:, :-1].gather(-1, target_BT.clamp(min=0)[..., None])[..., 0]
        score[[k for k, _ in chunk], [c for _, c in chunk]] = torch.where(target_BT != -100, tok_BT, 0.0).double().sum(1)
    return score.numpy()


def accuracy_items(model, items):
    """Per item: correct (the gold value has the highest log-likelihood among the relation's 8
    candidates) and the margin log p(gold) - max log p(other)."""
    score = candidate_logliks(model, items)
    gold = np.array([it["gold"] for it in items])
    other = score.copy()
    other[np.arange(len(items)), gold] = -np.inf
    margin = score[np.arange(len(items)), gold] - other.max(1)
    return (margin > 0).astype(int), margin


@torch.no_grad()
def routing_agreement(model, items):
    """Per target-language item and layer: token-level top-k overlap with its English version
    over aligned token pairs, and pooled JS. -> dict lang -> (topk (L,), js (L,))."""
    k = model.config.top_k
    en = {(it["ent"], it["rel"], it["qi"]): it for it in items if it["lang"] == "en"}
    res = {}
    for lang in TARGETS:
        tgt = [it for it in items if it["lang"] == lang]
        pairs = [(it, en[it["ent"], it["rel"], it["qi"]]) for it in tgt]
        overlap, js = [], []
        for i in range(0, len(pairs), 256):
            chunk = pairs[i:i + 256]
            bt, be = (collate([dict(input_ids=x["prompt"]) for x in side], pad_id=0) for side in zip(*chunk))
            ids_t, mask_t, ids_e, mask_e = bt["input_ids"], bt["attention_mask"], be["input_ids"], be["attention_mask"]
            rt, re_ = model(ids_t, attention_mask=mask_t).router_logits, model(ids_e, attention_mask=mask_e).router_logits
            top_t = torch.stack([x.topk(k, -1).indices for x in rt], 1)  # (B, L, T, k)
            top_e = torch.stack([x.topk(k, -1).indices for x in re_], 1)
            for b, (t, e) in enumerate(chunk):
                # aligned pairs: target token j <-> the English token at the same English position;
                # <bos> (j = 0) is left out: the same token with no context routes identically
                pos_e = {s: j for j, s in enumerate(e["src"])}
                jt = torch.arange(1, len(t["src"]))
                je = torch.tensor([pos_e[s] for s in t["src"][1:]])
                a, bb = top_t[b][:, jt], top_e[b][:, je]  # (L, n, k)
                inter = (a[..., :, None] == bb[..., None, :]).any(-1).sum(-1).float() / k  # (L, n)
                overlap.append(inter.mean(1))
            js.append(js_divergence(pool_routing(re_, mask_e), pool_routing(rt, mask_t)))  # (B, L)
        res[lang] = (torch.stack(overlap).mean(0).numpy(), torch.cat(js).mean(0).numpy())
    return res


def other_band(band, width, n_layers, seed):
    starts = [s for s in range(n_layers - width + 1) if s + width - 1 < band[0] or s > band[-1]]
    if not starts:
        raise SystemExit(f"no band of width {width} avoids {band} in {n_layers} layers")
    s = starts[np.random.default_rng(4000 + seed).integers(len(starts))]
    return list(layer_band(s, s + width - 1))


# -----------------------------------------------------------------------------
# one seed: the base model, the five fine-tunings, the measurements
def run_seed(settings, seed, vocab, say=print):
    t0 = time.time()
    world = build_world(settings, seed, vocab)
    s = world["split"]
    en, tgt, par = pretraining_data(world, vocab)
    ft = finetuning_data(world, vocab, s["bridge"])
    pos = finetuning_data(world, vocab, s["test"])
    assert_no_entity(ft, s["test"] + s["control"], vocab, "fine-tuning data of (a)-(d)")
    assert_no_entity(en + tgt + par, s["control"], vocab, "pretraining data")
    assert_no_entity(tgt + par, s["test"] + s["bridge"], vocab, "target-language pretraining data")
    assert len(pos) == len(ft)  # (e) adds one test row per bridge row at each step

    torch.manual_seed(seed)
    cfg = MoEConfig(vocab_size=len(vocab.itos), **settings["model"])
    model = MoETransformer(cfg)
    pre_log = train(model, pretrain_batches(en, tgt, par, settings, seed), settings, settings["pretrain_lr"])
    base_state = copy.deepcopy(model.state_dict())
    base_digest = digest([int(v.double().sum().mul(1e6).round()) for v in base_state.values()])
    say(f"seed {seed}: pretrained {settings['pretrain_steps']} steps, final CE {np.mean([r['ce'] for r in pre_log[-20:]]):.3f} "
        f"({time.time() - t0:.0f}s)")

    items = eval_items(world, vocab, s["test"], "test") + eval_items(world, vocab, s["control"], "control")
    anchors = pooled(model, [r["anchor_ids"] for r in ft])  # (N, L, E), the ORIGINAL model, once
    curve = js_divergence(anchors, pooled(model, [r["ids"] for r in ft])).mean(0).numpy()  # (L,), fine-tuning items only
    band = list(layer_band(*choose_band(curve, settings["band_width"])))  # middle windows only
    other = other_band(band, settings["band_width"], cfg.n_layers, seed)
    bands = dict(plain=band, band=band, all=list(range(cfg.n_layers)), other=other, positive=band)
    weights = dict(plain=0.0, band=settings["lambda_js"], all=settings["lambda_js"], other=settings["lambda_js"], positive=0.0)
    order = finetune_order(len(ft), settings, seed)
    pos_order = finetune_order(len(pos), settings, seed + 10_000)

    records = {"base": measure(model, items)}
    seen, logs = {}, {}
    for cond in CONDITIONS:
        model.load_state_dict(base_state)
        assert digest([int(v.double().sum().mul(1e6).round()) for v in model.state_dict().values()]) == base_digest
        batches = []
        for i, idx in enumerate(order):
            rows, a = [ft[j] for j in idx], anchors[torch.as_tensor(idx)]
            if cond == "positive":
                rows = rows + [pos[j] for j in pos_order[i]]
                a = None  # lambda_JS = 0: (a) plus data
            batches.append((rows, a))
        seen[cond] = [digest([t for r in rows[:len(idx)] for t in r["ids"]]) for (rows, _), idx in zip(batches, order)]
        logs[cond] = train(model, batches, settings, settings["finetune_lr"], weights[cond], bands[cond])
        records[cond] = measure(model, items)
        say(f"seed {seed}: {cond:<8} target acc {records[cond]['acc']['target']:.3f}  en {records[cond]['acc']['en']:.3f}  "
            f"control {records[cond]['acc']['control']:.3f}  ({time.time() - t0:.0f}s)")
    # identical batches for (a)-(d); (e)'s batches start with (a)'s rows
    assert all(seen[c] == seen["plain"] for c in CONDITIONS), "fine-tuning batches differ between conditions"
    keys = [(it["split"], it["ent"], it["rel"], it["lang"], it["qi"]) for it in items]
    return dict(seed=seed, band=band, other=other, keys=keys, seen=seen, curve=curve.tolist(), base_digest=base_digest,
                records=records, pretrain_ce=pre_log[-1]["ce"], finetune_ce={c: logs[c][-1]["ce"] for c in CONDITIONS},
                finetune_js={c: logs[c][-1]["js"] for c in CONDITIONS}, split=s, n_ft=len(ft), wall_s=time.time() - t0)


def measure(model, items):
    correct, margin = accuracy_items(model, items)
    for it, c, m in zip(items, correct, margin):
        it["_c"], it["_m"] = int(c), float(m)
    sel = lambda f: [it["_c"] for it in items if f(it)]
    acc = dict(target=float(np.mean(sel(lambda it: it["split"] == "test" and it["lang"] != "en"))),
               en=float(np.mean(sel(lambda it: it["split"] == "test" and it["lang"] == "en"))),
               control=float(np.mean(sel(lambda it: it["split"] == "control"))))
    for lang in TARGETS:
        acc[lang] = float(np.mean(sel(lambda it: it["split"] == "test" and it["lang"] == lang)))
    routing = routing_agreement(model, [it for it in items if it["split"] == "test"])
    return dict(acc=acc, correct=correct.tolist(), margin=np.round(margin, 3).tolist(),
                topk={l: v[0].tolist() for l, v in routing.items()}, js={l: v[1].tolist() for l, v in routing.items()})


# -----------------------------------------------------------------------------
# the study: seeds, statistics, outputs
def seed_worker(job):
    settings, seed = job
    torch.set_num_threads(1)  # one core per seed: tiny ops, a second thread only adds synchronisation
    return run_seed(settings, seed, Vocab(sum(settings["n_entities"].values())))


def analyse(runs, settings):
    seeds = [r["seed"] for r in runs]
    chance = 1 / 8
    acc = {c: {m: [r["records"][c]["acc"][m] for r in runs] for m in runs[0]["records"][c]["acc"]} for c in ["base"] + CONDITIONS}
    ratio = {c: [(t - chance) / (e - chance) if e - chance > 0.05 else None for t, e in zip(acc[c]["target"], acc[c]["en"])]
             for c in acc}

    def contrast(x, y, metric="target"):
        d = np.array(acc[x][metric]) - np.array(acc[y][metric])
        return dict(per_seed=d.tolist(), **stats.t_interval(d))

    primary = contrast(*PRIMARY)
    secondary = {f"{x}-{y}": contrast(x, y) for x, y in SECONDARY}
    for key, p_holm in zip(secondary, stats.holm([v["p"] for v in secondary.values()])):
        secondary[key]["p_holm"] = p_holm
    forgetting = {f"{c}-plain": contrast(c, "plain", "en") for c in CONDITIONS[1:]}
    # routing: per condition, per layer, mean over target languages, per seed
    topk = {c: np.array([[r["records"][c]["topk"][l] for l in TARGETS] for r in runs]).mean(1) for c in acc}  # (S, L)
    js = {c: np.array([[r["records"][c]["js"][l] for l in TARGETS] for r in runs]).mean(1) for c in acc}
    in_band = lambda m: [float(m[i][runs[i]["band"]].mean()) for i in range(len(runs))]
    mech = {c: dict(topk_band=in_band(topk[c]), topk_all=topk[c].mean(1).tolist(), js_band=in_band(js[c]), js_all=js[c].mean(1).tolist())
            for c in acc}
    d_topk = np.array(mech["band"]["topk_band"]) - np.array(mech["plain"]["topk_band"])
    control = np.array([acc[c]["control"] for c in acc]).mean()
    n_control = settings["n_entities"]["control"] * len(RELATIONS) * len(seeds)  # distinct facts: the unit of independence
    return dict(seeds=seeds, chance=chance, acc=acc, ratio=ratio, primary=primary, secondary=secondary, forgetting=forgetting,
                topk_layers={c: topk[c].mean(0).tolist() for c in acc}, js_layers={c: js[c].mean(0).tolist() for c in acc},
                mechanism=mech, mechanism_topk_band_delta=dict(per_seed=d_topk.tolist(), **stats.t_interval(d_topk)),
                control=dict(mean=float(control), tolerance=float(4 * math.sqrt(chance * (1 - chance) / n_control)), n_facts=n_control))


def conditional_transfer(per_item_path, contrast=("band", "plain")):
    """P(target correct | English correct on the same fact and question template), test entities, from a
    per_item.csv.gz (write_items). -> dict(rate={condition: [per seed]}, n={condition: [per seed: target items
    whose English twin is correct]}, seeds, contrast=(b) - (a) paired t interval over seeds)."""
    with gzip.open(per_item_path, "rt", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    en_ok = {(r["seed"], r["condition"], r["entity"], r["relation"], r["template"]): r["correct"] == "1"
             for r in rows if r["lang"] == "en"}
    hits = {}
    for r in rows:
        if r["lang"] != "en" and en_ok[(r["seed"], r["condition"], r["entity"], r["relation"], r["template"])]:
            hits.setdefault(r["condition"], {}).setdefault(int(r["seed"]), []).append(r["correct"] == "1")
    seeds = sorted({int(r["seed"]) for r in rows})
    rate = {c: [float(np.mean(by[s])) if by.get(s) else None for s in seeds] for c, by in hits.items()}
    n = {c: [len(by.get(s, [])) for s in seeds] for c, by in hits.items()}
    d = np.array(rate[contrast[0]], dtype=np.float64) - np.array(rate[contrast[1]], dtype=np.float64)
    return dict(rate=rate, n=n, seeds=seeds, contrast=list(contrast), diff=dict(per_seed=d.tolist(), **stats.t_interval(d)))


def fmt_ms(values, nd=3):
    values = [v for v in values if v is not None]  # a transfer ratio is undefined at English chance
    if not values:
        return "n/a"
    m, s = stats.mean_std(values)
    return f"{m:.{nd}f}" + (f" ± {s:.{nd}f}" if s is not None else "")


def fmt_ci(c, nd=3):
    return f"{c['mean']:+.{nd}f} [{c['lo']:+.{nd}f}, {c['hi']:+.{nd}f}]"


def report(S):
    conds = ["base"] + CONDITIONS
    band = lambda d: ", ".join(f"{v[0]}–{v[-1]}" for v in d.values())
    lines = [f"Seeds {S['seeds']}; chance = {S['chance']:.3f}; layer bands per seed (b): {band(S['bands'])}; "
             f"(d): {band(S['other_bands'])}. "
             "Accuracy on test entities (facts seen only in English in pretraining), mean ± std over seeds.", "",
             "| condition | target (ren+ord+sub) | ren | ord | sub | English | transfer ratio | control | token top-k agreement, band | pooled JS, band |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in conds:
        a, m = S["acc"][c], S["mechanism"][c]
        lines.append(f"| {LABELS[c]} | {fmt_ms(a['target'])} | {fmt_ms(a['ren'])} | {fmt_ms(a['ord'])} | {fmt_ms(a['sub'])} | "
                     f"{fmt_ms(a['en'])} | {fmt_ms(S['ratio'][c], 2)} | {fmt_ms(a['control'])} | {fmt_ms(m['topk_band'])} | {fmt_ms(m['js_band'], 4)} |")
    p = S["primary"]
    lines += ["", "Paired differences of target accuracy over seeds (t-interval, 95%):", "",
              "| contrast | mean [95% CI] | p | p (Holm) |", "|---|---|---|---|",
              f"| **primary: (b) band − (a) plain** | {fmt_ci(p)} | {p['p']:.3f} | — |"]
    for k, v in S["secondary"].items():
        x, y = k.split("-")
        lines.append(f"| {LABELS[x]} − {LABELS[y]} | {fmt_ci(v)} | {v['p']:.3f} | {v['p_holm']:.3f} |")
    for k, v in S["forgetting"].items():
        lines.append(f"| English accuracy: {LABELS[k.split('-')[0]]} − (a) | {fmt_ci(v)} | {v['p']:.3f} | (not in the family) |")
    d = S["mechanism_topk_band_delta"]
    lines.append(f"| token top-k agreement in the band: (b) − (a) | {fmt_ci(d)} | {d['p']:.3f} | (mechanism, not in the family) |")
    lines += ["", f"What the primary interval excludes: a true effect of (b) − (a) below {p['lo']:+.3f} or above {p['hi']:+.3f} "
              f"(two-sided 95% t interval over {len(S['seeds'])} seeds). No power statement is made: power computed from the "
              "observed spread of the same 5 differences is post-hoc and adds nothing to the interval."]
    if S.get("conditional"):
        C = S["conditional"]
        x, y = C["contrast"]
        lines += ["", "Target accuracy given English correct on the same fact and question template (not declared before the "
                  "run; removes the English-forgetting confound from the transfer measure), mean ± std over seeds "
                  "(per seed: the target items whose English twin is correct):", "",
                  "| condition | P(target correct \\| English correct) | items per seed |", "|---|---|---|"]
        for c in conds:
            if c in C["rate"]:
                lines.append(f"| {LABELS[c]} | {fmt_ms(C['rate'][c])} | {', '.join(str(k) for k in C['n'][c])} |")
        d = C["diff"]
        lines += ["", f"{LABELS[x]} − {LABELS[y]}: {fmt_ci(d)} (p {d['p']:.3f}; paired 95% t interval over seeds)."]
    lines += ["",
              f"Control entities (never shown): accuracy {S['control']['mean']:.3f} (chance {S['chance']:.3f}, "
              f"tolerance ± {S['control']['tolerance']:.3f} = 4 binomial SE over {S['control']['n_facts']} facts × seeds).",
              "", "Per layer (mean over seeds and target languages): token-level top-k agreement with the English question "
              f"(chance {S['settings']['model']['top_k'] / S['settings']['model']['n_experts']:.2f})", "",
              "| layer | " + " | ".join(LABELS[c] for c in conds) + " |", "|---" * (len(conds) + 1) + "|"]
    for l in range(S["settings"]["model"]["n_layers"]):
        lines.append(f"| {l} | " + " | ".join(f"{S['topk_layers'][c][l]:.3f}" for c in conds) + " |")
    lines += ["", f"Command: `{S['command']}`; wall time {S['wall_s'] / 60:.1f} min on {S['cpu_count']} cores "
              f"({S['jobs']} seed processes at a time, 1 thread each), load average {S['loadavg_start'][0]:.1f} at start, "
              f"{S['loadavg_end'][0]:.1f} at end."]
    return "\n".join(lines) + "\n"


def figure(S, path):
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no figure")
        return
    conds = ["base"] + CONDITIONS
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(conds))
    for j, (m, color) in enumerate([("target", "tab:green"), ("en", "tab:blue"), ("control", "gray")]):
        vals = np.array([S["acc"][c][m] for c in conds])  # (C, S)
        ax1.bar(x + (j - 1) * 0.27, vals.mean(1), 0.27, yerr=vals.std(1, ddof=1) if vals.shape[1] > 1 else None,
                color=color, label={"target": "target languages", "en": "English", "control": "control entities"}[m], capsize=2)
        for i in range(len(conds)):
            ax1.plot(np.full(vals.shape[1], x[i] + (j - 1) * 0.27), vals[i], "k.", ms=3)
    ax1.axhline(S["chance"], color="k", ls=":", lw=1, label="chance")
    ax1.set_xticks(x, [LABELS[c].replace(" ", "\n", 1) for c in conds], fontsize=7)
    ax1.set_ylabel("accuracy on test-entity facts")
    ax1.legend(fontsize=7)
    ax1.set_title("facts learned in English, asked in other languages (dots: seeds)", fontsize=9)
    for c in conds:
        ax2.plot(S["topk_layers"][c], marker="o", ms=3, label=LABELS[c], ls="--" if c == "base" else "-")
    ax2.axhline(S["settings"]["model"]["top_k"] / S["settings"]["model"]["n_experts"], color="k", ls=":", lw=1)
    ax2.set_xlabel("MoE layer")
    ax2.set_ylabel("token-level top-k agreement with English")
    ax2.legend(fontsize=7)
    ax2.set_title("routing of a target question vs its English version", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_items(runs, path):
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "condition", "split", "entity", "relation", "lang", "template", "correct", "margin"])
        for r in runs:
            for c in ["base"] + CONDITIONS:
                rec = r["records"][c]
                for key, ok, m in zip(r["keys"], rec["correct"], rec["margin"]):
                    w.writerow([r["seed"], c, *key, ok, m])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 seeds, short training: the pipeline and its invariants (CI)")
    p.add_argument("--results", default=None, help="default experiments/results/transfer (quick: out/transfer_quick)")
    p.add_argument("--jobs", type=int, default=2, help="seeds trained at once, one process and one thread each")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="override the seeds")
    p.add_argument("--report", action="store_true", help="no training: rewrite results.md and the figure from summary.json")
    args = p.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    if args.seeds:
        settings["seeds"] = args.seeds
    results = os.path.abspath(args.results or os.path.join(ROOT, "out", "transfer_quick") if args.quick
                              else args.results or os.path.join(ROOT, "experiments", "results", "transfer"))
    os.makedirs(results, exist_ok=True)
    if args.report:
        S = json.load(open(os.path.join(results, "summary.json")))
        items = os.path.join(results, "per_item.csv.gz")
        if "conditional" not in S and os.path.exists(items):  # a summary written before conditional_transfer existed
            S["conditional"] = conditional_transfer(items)
        open(os.path.join(results, "results.md"), "w").write(report(S))
        return figure(S, os.path.join(results, "transfer.png"))
    t0, load0 = time.time(), os.getloadavg()
    print(f"primary endpoint: target accuracy {LABELS[PRIMARY[0]]} − {LABELS[PRIMARY[1]]}; seeds {settings['seeds']}")
    jobs = [(settings, s) for s in settings["seeds"]]
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            runs = pool.map(seed_worker, jobs)
    else:
        runs = [seed_worker(j) for j in jobs]
    S = analyse(runs, settings)
    S.update(settings=settings, primary_endpoint=list(PRIMARY), secondary_contrasts=[list(x) for x in SECONDARY],
             bands={r["seed"]: r["band"] for r in runs}, other_bands={r["seed"]: r["other"] for r in runs},
             base_curves={r["seed"]: r["curve"] for r in runs}, batch_digests={r["seed"]: r["seen"] for r in runs},
             pretrain_ce={r["seed"]: r["pretrain_ce"] for r in runs}, finetune_ce={r["seed"]: r["finetune_ce"] for r in runs},
             seed_wall_s={r["seed"]: round(r["wall_s"]) for r in runs}, splits={r["seed"]: r["split"] for r in runs},
             command="python experiments/transfer.py" + (" --quick" if args.quick else ""), jobs=args.jobs,
             platform=platform_info("cpu"), cpu_count=os.cpu_count(), loadavg_start=load0, loadavg_end=os.getloadavg(), wall_s=time.time() - t0)
    json.dump(S, open(os.path.join(results, "summary.json"), "w"), indent=1)
    write_items(runs, os.path.join(results, "per_item.csv.gz"))
    S["conditional"] = conditional_transfer(os.path.join(results, "per_item.csv.gz"))
    json.dump(S, open(os.path.join(results, "summary.json"), "w"), indent=1)
    md = report(S)
    open(os.path.join(results, "results.md"), "w").write(md)
    figure(S, os.path.join(results, "transfer.png"))
    print(md)
    if abs(S["control"]["mean"] - S["chance"]) > S["control"]["tolerance"]:
        print(f"WARNING: control accuracy {S['control']['mean']:.3f} is not at chance: something leaks")


if __name__ == "__main__":
    main()

