"""
A world in which routing decides whether knowledge is reached, so that a routing-alignment method (SARA) CAN help:
built and measured here with inference-time interventions BEFORE any SARA run.

    python experiments/gated_world.py            # beta in {0, 1, 2, 4} x 3 seeds -> experiments/results/gated_world/
    python experiments/gated_world.py --quick    # beta in {0, 2} x 2 seeds, short training (CI: tests/test_gated_world.py)

Why: in experiments/transfer.py an ORACLE that gives each target-language token the experts and gate weights of its
aligned English token does not raise target accuracy (review: 0.170 -> 0.174), and English recall depends on which
experts run almost only in layer 0. There, no routing-alignment method can help, whatever it does to routing.

The world (the facts, entities and templates of experiments/transfer_world.py, imported): the target language
`tgt` is English with a tag token after <bos> (`<bos> <tgt> the color of Bakira is red .`), and the routers of
the middle layers 1..L-2 (settings["prior_layers"] = "middle"; "all" = every layer) get a fixed PER-SEQUENCE
prior: +beta on experts 0..E/2-1 for English sequences, +beta on E/2..E-1 for target sequences, in pretraining and
at evaluation (router.RoutingIntervention(logit_bias=(B, 1, E)): the model's one routing hook, not a fork of the
model). Why the middle layers only, measured while sizing (seed 0, beta 2, one run each, 1,000 steps): with the
prior on every layer the oracle on the middle band recovered 0.02-0.06 of a 0.11-0.18 English-target gap (the
oracle on all layers recovered all of it): the gate sat largely in the edge layers, which the paper's band rule
excludes; with the prior on layers 1-2 only, the band oracle recovered 0.16 of a 0.17 gap. Entity splits as in transfer.py: shared (facts in English and in the
target in pretraining), test (facts ONLY in English, in pretraining: what we measure), bridge (English facts in
pretraining; their target Q/A are the fine-tuning rows of the later SARA comparison, with English anchors),
control (never shown: must stay at chance). beta = 0 is the control world: both languages use the same experts.

Measured per (beta, seed) on the base model, test entities, 8 candidate values per relation (chance 1/8):
    accuracy    English and target questions, each with its own language's prior;
    oracle      target questions with the routing of the aligned English tokens imposed
                (evaluation.routing.oracle_interventions) on: all layers, the middle band (layers 1..L-2, what
                the paper's band rule may choose), each single layer. Oracle gain = oracle - target accuracy:
                the ceiling of what any routing alignment can gain. Sanity, asserted: imposing the target's own
                routing changes no answer;
    where       English accuracy with routing randomised (uniform K distinct experts, the router's weights) at
                one layer, and with one layer's MoE output removed;
    routing     per layer, pooled JS(target question || English question) of the router distributions the layers
                return (prior included: what SARA's loss would pool) and token-level top-k agreement over
                aligned tokens.
Sizing (2-core machine shared with other jobs; one run each): English accuracy on test facts after 1,000 steps
was the limiting quantity. With 16/12/12/6 shared/test/bridge/control entities (160 facts to learn) it was 0.17-0.25
at beta 0 (3 seeds), 0.55-0.88 at beta 1, 0.56 at beta 2 (run stopped after 6 of 12 base models); with 8/8/8/4
(96 facts), beta 2, seed 1: English 1.00, target 0.83, band oracle 1.00. Earlier, 700-1,500 steps at lr 5e-3 / 1e-2
with 160 facts gave 0.24-0.73 (1,500 steps at 1e-2: 0.24). A base model costs ~70 CPU-seconds.

Training runs the product's loop (loop.train_phase, eq. 12 by step_loss.py), never a copy of it: pretrain and the
SARA comparison's fine-tuning (experiments/gated_sara.py, declared in results/gated_world/report.md) both go through
train_steps_under_prior, whose LanguagePrior sets each step's per-row prior on the routers before the forward.
The move from this file's former loop is bit-identical (tests/test_gated_world.py keeps that loop as the oracle).
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402
from evaluation.routing import oracle_interventions, record_routing  # noqa: E402
from methods.base import Component  # noqa: E402
from model import MoEConfig, MoETransformer  # noqa: E402
from provenance import platform_info  # noqa: E402
from router import RoutingIntervention, intervene, merge_intervention  # noqa: E402
from sara_loss import js_divergence, pool_routing  # noqa: E402
from transfer_world import QUESTIONS, RELATIONS, Vocab, build_world, qa_row, render, statement_rows  # noqa: E402

MODEL = dict(hidden_size=48, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=96, n_experts=8, top_k=2,
             moe_intermediate_size=96, qk_norm=True, norm_topk_prob=True, max_position_embeddings=32,
             router_aux_loss_coef=0.01, expert_impl="loop")
FULL = dict(betas=[0.0, 1.0, 2.0, 4.0], seeds=[0, 1, 2], model=MODEL,
            n_entities=dict(shared=8, test=8, bridge=8, control=4), target_share=0.25,
            prior_layers="middle", pretrain_steps=1000, pretrain_batch=32, pretrain_lr=5e-3, warmup_frac=0.1, weight_decay=0.01, grad_clip=1.0)
QUICK = {**FULL, "betas": [0.0, 2.0], "seeds": [0, 1], "n_entities": dict(shared=6, test=6, bridge=6, control=4),
         "pretrain_steps": 60}
LANGS = ("en", "tgt")


# -----------------------------------------------------------------------------
# the world: English, and English with a tag
def make_vocab(settings):
    vocab = Vocab(sum(settings["n_entities"].values()))
    vocab.itos.append("<tgt>")
    vocab.stoi["<tgt>"] = vocab.tgt = len(vocab.itos) - 1
    return vocab


def tagged(ids, vocab):
    """An English token sequence <bos> w1 w2 ... -> the target's <bos> <tgt> w1 w2 ..."""
    assert ids[0] == vocab.bos
    return [vocab.bos, vocab.tgt] + ids[1:]


def english_position(T_target):
    """For each target position, the English position it expresses (-1: the tag, no English counterpart)."""
    return [0, -1] + list(range(1, T_target - 1))


def pretraining_rows(world, vocab):
    """English statements and Q/A of shared, test and bridge entities; the same for shared entities in the target."""
    s = world["split"]
    en = [dict(r, lang="en") for r in statement_rows(world, vocab, s["shared"] + s["test"] + s["bridge"], "en")]
    tgt = [dict(ids=tagged(r["ids"], vocab), ent=r["ent"], lang="tgt") for r in statement_rows(world, vocab, s["shared"], "en")]
    return en, tgt


def finetuning_rows(world, vocab, ents):
    """Target Q/A about ents (labels on the answer), each with its English version: the anchor of the SARA run."""
    rows = []
    for e in ents:
        for r in RELATIONS:
            for qi in range(len(QUESTIONS)):
                en = qa_row(world, vocab, e, r, "en", qi)
                rows.append(dict(ids=tagged(en["ids"], vocab), labels=[-100] + en["labels"], anchor_ids=en["ids"],
                                 ent=e, rel=r, qi=qi, lang="tgt"))
    return rows


def eval_items(world, vocab, ents, split):
    items = []
    for e in ents:
        for r in RELATIONS:
            for qi in range(len(QUESTIONS)):
                q = [vocab.bos] + vocab.encode(render(QUESTIONS[qi], "en", e, r)[0])
                cands = [vocab.stoi[v] for v in RELATIONS[r]]  # every value is one token
                gold = RELATIONS[r].index(world["facts"][e, r])
                for lang in LANGS:
                    items.append(dict(split=split, ent=e, rel=r, qi=qi, lang=lang, cands=cands, gold=gold,
                                      prompt=q if lang == "en" else tagged(q, vocab), english=q))
    return items


def check_splits(world, vocab, en, tgt, ft):
    s = world["split"]
    ids = lambda ents: set(vocab.encode(ents))
    if {t for r in ft for t in r["ids"] + r["anchor_ids"]} & ids(s["test"] + s["control"]):
        raise AssertionError("fine-tuning rows mention a test or control entity")
    if {t for r in en + tgt for t in r["ids"]} & ids(s["control"]):
        raise AssertionError("pretraining rows mention a control entity")
    if {t for r in tgt for t in r["ids"]} & ids(s["test"] + s["bridge"]):
        raise AssertionError("target-language pretraining rows mention a test or bridge entity")


# -----------------------------------------------------------------------------
# the language prior (a per-sequence router bias through the model's routing hook)
def world_prior(settings, beta, cfg):
    """-> dict(beta, layers): the prior of one world; settings["prior_layers"] = "all" or "middle" (1..L-2)."""
    if settings["prior_layers"] not in ("all", "middle"):
        raise SystemExit(f"prior_layers={settings['prior_layers']!r}: must be 'all' or 'middle'")
    layers = cfg.moe_layers if settings["prior_layers"] == "all" else [l for l in cfg.moe_layers if 0 < l < cfg.n_layers - 1]
    return dict(beta=float(beta), layers=layers)


def language_prior(langs, prior, cfg):
    """{each of prior["layers"]: RoutingIntervention(logit_bias (B, 1, E))}: +beta on the first half of the
    experts for English sequences, on the second half for target ones. beta = 0: no intervention at all."""
    beta = prior["beta"]
    if beta == 0:
        return {}
    E = cfg.n_experts
    bias = torch.zeros(len(langs), 1, E)
    for b, lang in enumerate(langs):
        half = slice(0, E // 2) if lang == "en" else slice(E // 2, E)
        bias[b, 0, half] = beta
    return {l: RoutingIntervention(logit_bias=bias) for l in prior["layers"]}


def collate(seqs, pad=0):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


# -----------------------------------------------------------------------------
# training: the product's loop (loop.train_phase, eq. 12 via step_loss.py), never a copy of it
class LanguagePrior(Component):
    """The per-row language prior during training, in loop.train_phase's method slot: begin_step (which the
    loop calls before a step's forwards) sets, through the routing hook (router.intervene), the prior of the
    step's rows on the routers of prior["layers"]; loss delegates to `inner` (methods.sara.Sara, or None: no
    term). A step must be ONE micro-batch (begin_step sees the whole step, not which micro-batch is next):
    checked. close() removes the prior. Why here and not in loop.py: the loop needs no change for it."""

    def __init__(self, model, prior, inner=None):
        self.model, self.prior, self.inner = model, prior, inner
        self.ce_weight = inner.ce_weight if inner is not None else 1.0
        self._stack = contextlib.ExitStack()

    def begin_step(self, micro_batches, run):
        if len(micro_batches) != 1:
            raise ValueError(f"LanguagePrior: a step of {len(micro_batches)} micro-batches; the per-row prior "
                             "needs one micro-batch per step (schedule: [(step, [indices])])")
        self._stack.close()  # the previous step's prior off, this step's on
        self._stack.enter_context(intervene(self.model, language_prior([e["lang"] for e in micro_batches[0]],
                                                                       self.prior, self.model.config)))
        if self.inner is not None:
            self.inner.begin_step(micro_batches, run)

    def extend_batch(self, micro):
        """Rows a method appends to the micro-batch's forward (the loop asks every method): the inner method's.
        The prior covers the micro-batch's own rows only, so an inner method that appends rows is an error."""
        extra = self.inner.extend_batch(micro) if hasattr(self.inner, "extend_batch") else []
        if extra:
            raise ValueError(f"LanguagePrior: {type(self.inner).__name__} appends {len(extra)} rows to the forward; "
                             "the per-row prior has no language for them")
        return extra

    def loss(self, out, batch, net, run):
        return self.inner.loss(out, batch, net, run) if self.inner is not None else {}

    def close(self):
        self._stack.close()


def train_steps_under_prior(model, examples, schedule, settings, lr, prior, inner=None, phase="gated"):
    """loop.train_phase on `examples` (dicts: id, input_ids, labels, lang; has_anchor for SARA) with the fixed
    `schedule` (list of (step, [indices]): one micro-batch per step), each forward under its rows' language
    prior; inner: the method (methods.sara.Sara) or None (eq. 12 without method terms). AdamW (betas 0.9,
    0.999) with decay on matrices, linear warmup then cosine to 0, grad clip, lambda_LB = the model's
    router_aux_loss_coef. -> loop records (one per step: ce, lb, loss, js with SARA)."""
    from loop import Dist, Run, train_phase
    from settings import TrainSettings
    s = TrainSettings(beta2=0.999, weight_decay=settings["weight_decay"], warmup_frac=settings["warmup_frac"],
                      grad_clip=settings["grad_clip"], lambda_js=getattr(inner, "weight", 0.0), log_interval=1,
                      eval_interval=10 ** 9, ckpt_interval=10 ** 9)
    method = LanguagePrior(model, prior, inner)
    model.train()
    try:
        records = train_phase(Run(s, Dist(), pad_id=0, quiet=True), phase, model, examples, len(schedule), lr,
                              method, None, None, schedule=iter(schedule))
    finally:
        method.close()
    model.eval()
    return records


def pretrain(model, en, tgt, settings, seed, prior):
    """Language modelling on every token; each row is a target row with probability target_share; each
    sequence's routers carry its language's prior. -> mean CE of the last 20 steps."""
    rng = np.random.default_rng(2000 + seed)
    examples = [dict(id=f"{r['lang']}{i}", input_ids=r["ids"], labels=r["ids"], lang=r["lang"])
                for i, r in enumerate(en + tgt)]
    B, schedule = settings["pretrain_batch"], []
    for step in range(settings["pretrain_steps"]):
        n_t = rng.binomial(B, settings["target_share"])
        rows = rng.integers(len(en), size=B - n_t).tolist() + (len(en) + rng.integers(len(tgt), size=n_t)).tolist()
        schedule.append((step, [rows]))
    records = train_steps_under_prior(model, examples, schedule, settings, settings["pretrain_lr"], prior, phase="pretrain")
    return float(np.mean([r["ce"] for r in records[-20:]]))


# -----------------------------------------------------------------------------
# measurement
@torch.no_grad()
def correct(model, items, prior, extra=None):
    """Per item: 1 if the gold value has the highest log-probability among the relation's 8 candidates after the
    question. Each item runs under its language's prior; extra(batch) -> {layer: RoutingIntervention} adds
    interventions (merged into the prior's) for that batch."""
    out = np.zeros(len(items), dtype=int)
    for lang in LANGS:
        ks = [k for k, it in enumerate(items) if it["lang"] == lang]
        if not ks:
            continue
        batch = [items[k] for k in ks]
        ids, mask = collate([it["prompt"] for it in batch])
        edits = language_prior([lang] * len(batch), prior, model.config)
        for l, e in (extra(batch) if extra else {}).items():
            edits[l] = merge_intervention(edits, l, **{f: getattr(e, f) for f in ("expert_ids", "weights", "randomise",
                                                                                   "where", "remove_output")})
        with intervene(model, edits):
            logits = model(ids, attention_mask=mask).logits
        last = logits[torch.arange(len(batch)), mask.sum(1) - 1].float()  # (B, V): the answer's first token
        cand = torch.tensor([it["cands"] for it in batch])
        out[ks] = (last.gather(1, cand).argmax(1) == torch.tensor([it["gold"] for it in batch])).numpy()
    return out


def oracle_edits(model, batch, prior, layers, own=False):
    """Impose on the target batch the routing of the aligned English tokens (own=True: the target's own)."""
    cfg = model.config
    tgt_ids, tgt_mask = collate([it["prompt"] for it in batch])
    tgt_prior = language_prior(["tgt"] * len(batch), prior, cfg)
    if own:
        align = torch.arange(tgt_ids.shape[1]).expand_as(tgt_ids).masked_fill(tgt_mask == 0, -1)
        return oracle_interventions(model, tgt_ids, tgt_mask, align, layers, tgt_prior, tgt_prior)
    en_ids, en_mask = collate([it["english"] for it in batch])
    align = torch.full_like(tgt_ids, -1)
    for b, it in enumerate(batch):
        align[b, :len(it["prompt"])] = torch.tensor(english_position(len(it["prompt"])))
    return oracle_interventions(model, en_ids, en_mask, align, layers,
                                language_prior(["en"] * len(batch), prior, cfg), tgt_prior)


@torch.no_grad()
def routing_match(model, items, prior):
    """Per layer, mean over test questions: pooled JS(target || English) of the returned router distributions,
    and token-level top-k agreement over aligned tokens (the tag left out). -> (js (L,), topk (L,))."""
    cfg = model.config
    tgt = [it for it in items if it["lang"] == "tgt"]
    t_ids, t_mask = collate([it["prompt"] for it in tgt])
    e_ids, e_mask = collate([it["english"] for it in tgt])
    with intervene(model, language_prior(["tgt"] * len(tgt), prior, cfg)):
        t_logits = model(t_ids, attention_mask=t_mask).router_logits
    with intervene(model, language_prior(["en"] * len(tgt), prior, cfg)):
        e_logits = model(e_ids, attention_mask=e_mask).router_logits
    js = js_divergence(pool_routing(e_logits, e_mask), pool_routing(t_logits, t_mask)).mean(0)  # (L,)
    layers = cfg.moe_layers
    t_rec = record_routing(model, t_ids, t_mask, layers, language_prior(["tgt"] * len(tgt), prior, cfg))
    e_rec = record_routing(model, e_ids, e_mask, layers, language_prior(["en"] * len(tgt), prior, cfg))
    agree = []
    for l in layers:
        a, b = t_rec[l][0][:, 2:], e_rec[l][0][:, 1:]  # target w_j at j + 1 (after the tag); (B, T-2, K) each
        m = e_mask[:, 1:].bool()  # the same real positions
        hit = (a[..., :, None] == b[..., None, :]).any(-1).float().mean(-1)  # (B, T-2): |top-k & top-k| / k
        agree.append(float(hit[m].mean()))
    return js.tolist(), agree


def measure(model, items, prior, seed):
    cfg = model.config
    L = cfg.n_layers
    sel = lambda split, lang: [k for k, it in enumerate(items) if it["split"] == split and it["lang"] == lang]
    own = correct(model, items, prior)
    acc = lambda c, split, lang: float(np.mean(c[sel(split, lang)]))
    test = [it for it in items if it["split"] == "test"]
    test_tgt = [it for it in test if it["lang"] == "tgt"]
    test_en = [it for it in test if it["lang"] == "en"]
    res = dict(en=acc(own, "test", "en"), tgt=acc(own, "test", "tgt"), shared_en=acc(own, "shared", "en"),
               shared_tgt=acc(own, "shared", "tgt"), control=float(np.mean(own[[k for k, it in enumerate(items)
                                                                                if it["split"] == "control"]])))
    own_tgt = own[sel("test", "tgt")]
    # sanity: imposing the target's own routing on every layer changes no answer
    same = correct(model, test_tgt, prior, lambda b: oracle_edits(model, b, prior, cfg.moe_layers, own=True))
    assert (same == own_tgt).all(), "imposing the target's own routing changed answers"
    sets = {"all": cfg.moe_layers, "band": list(range(1, L - 1)), **{f"L{l}": [l] for l in cfg.moe_layers}}
    res["oracle"] = {name: float(correct(model, test_tgt, prior, lambda b, ls=ls: oracle_edits(model, b, prior, ls)).mean())
                     for name, ls in sets.items()}
    gen = lambda l: torch.Generator().manual_seed(10_000 * seed + l)
    res["random_en"] = [float(correct(model, test_en, prior, lambda b, l=l: {l: RoutingIntervention(randomise=gen(l))}).mean())
                        for l in cfg.moe_layers]
    res["random_tgt"] = [float(correct(model, test_tgt, prior, lambda b, l=l: {l: RoutingIntervention(randomise=gen(l))}).mean())
                         for l in cfg.moe_layers]
    res["removed_en"] = [float(correct(model, test_en, prior, lambda b, l=l: {l: RoutingIntervention(remove_output=True)}).mean())
                         for l in cfg.moe_layers]
    res["js"], res["topk"] = routing_match(model, test, prior)
    return res


# -----------------------------------------------------------------------------
# one base model per (beta, seed)
def run_one(job):
    settings, beta, seed = job
    torch.set_num_threads(1)
    t0 = time.time()
    vocab = make_vocab(settings)
    world = build_world(settings, seed, vocab)
    s = world["split"]
    en, tgt = pretraining_rows(world, vocab)
    check_splits(world, vocab, en, tgt, finetuning_rows(world, vocab, s["bridge"]))
    torch.manual_seed(seed)
    model = MoETransformer(MoEConfig(vocab_size=len(vocab.itos), **settings["model"]))
    prior = world_prior(settings, beta, model.config)
    ce = pretrain(model, en, tgt, settings, seed, prior)
    items = sum((eval_items(world, vocab, s[k], k) for k in ("test", "shared", "control")), [])
    res = measure(model, items, prior, seed)
    res.update(beta=beta, seed=seed, pretrain_ce=ce, wall_s=round(time.time() - t0, 1))
    print(f"beta {beta:g} seed {seed}: en {res['en']:.3f} tgt {res['tgt']:.3f} oracle band {res['oracle']['band']:.3f} "
          f"all {res['oracle']['all']:.3f} control {res['control']:.3f} ({res['wall_s']:.0f}s)", flush=True)
    return res


def analyse(runs, settings):
    out = {}
    for beta in settings["betas"]:
        rs = sorted([r for r in runs if r["beta"] == beta], key=lambda r: r["seed"])
        v = lambda f: np.array([f(r) for r in rs], dtype=np.float64)
        gain_band = v(lambda r: r["oracle"]["band"] - r["tgt"])
        gain_all = v(lambda r: r["oracle"]["all"] - r["tgt"])
        gap = v(lambda r: r["en"] - r["tgt"])
        recovered = v(lambda r: r["oracle"]["band"] - r["tgt"]) / np.where(gap > 0, gap, np.nan)
        ci = lambda x: stats.t_interval(x) if len(x) >= 2 else dict(mean=float(x.mean()), lo=None, hi=None, p=None)
        out[f"{beta:g}"] = dict(
            seeds=[r["seed"] for r in rs], en=v(lambda r: r["en"]).tolist(), tgt=v(lambda r: r["tgt"]).tolist(),
            oracle_band=v(lambda r: r["oracle"]["band"]).tolist(), oracle_all=v(lambda r: r["oracle"]["all"]).tolist(),
            gain_band=dict(per_seed=gain_band.tolist(), **ci(gain_band)), gain_all=dict(per_seed=gain_all.tolist(), **ci(gain_all)),
            gap=dict(per_seed=gap.tolist(), **ci(gap)), recovered_band=recovered.tolist(),
            oracle_layer={k: float(np.mean([r["oracle"][k] for r in rs])) for k in rs[0]["oracle"]},
            random_en=np.mean([r["random_en"] for r in rs], 0).tolist(), random_tgt=np.mean([r["random_tgt"] for r in rs], 0).tolist(),
            removed_en=np.mean([r["removed_en"] for r in rs], 0).tolist(), js=np.mean([r["js"] for r in rs], 0).tolist(),
            topk=np.mean([r["topk"] for r in rs], 0).tolist(), control=float(np.mean([r["control"] for r in rs])),
            shared_tgt=float(np.mean([r["shared_tgt"] for r in rs])))
    return out


def fmt(x, nd=3):
    m, s = stats.mean_std(x)
    return f"{m:.{nd}f}" + (f" ± {s:.{nd}f}" if s is not None else "")


def fmt_ci(c):
    return f"{c['mean']:+.3f}" + (f" [{c['lo']:+.3f}, {c['hi']:+.3f}]" if c.get("lo") is not None else "")


def tables(S):
    A, L = S["by_beta"], S["settings"]["model"]["n_layers"]
    lines = ["| beta | English | target | oracle, band (layers 1–%d) | oracle, all layers | oracle gain, band [95%% t] | "
             "oracle gain, all [95%% t] | share of the English–target gap recovered (band) | control |" % (L - 2),
             "|---|---|---|---|---|---|---|---|---|"]
    for b, a in A.items():
        lines.append(f"| {b} | {fmt(a['en'])} | {fmt(a['tgt'])} | {fmt(a['oracle_band'])} | {fmt(a['oracle_all'])} | "
                     f"{fmt_ci(a['gain_band'])} | {fmt_ci(a['gain_all'])} | "
                     f"{fmt([x for x in a['recovered_band'] if x == x], 2) if any(x == x for x in a['recovered_band']) else 'n/a'} | "
                     f"{a['control']:.3f} |")
    lines += ["", "Per layer, mean over seeds: English accuracy with that layer's routing randomised / its MoE output "
              "removed; target accuracy with English routing imposed on that layer only; pooled JS (target ‖ English) "
              "and token-level top-2 agreement (chance 0.25) on the test questions.", "",
              "| beta | layer | English, random routing | English, MoE output removed | target, random routing | "
              "target, oracle on this layer | pooled JS | top-2 agreement |", "|---|---|---|---|---|---|---|---|"]
    for b, a in A.items():
        for l in range(L):
            lines.append(f"| {b} | {l} | {a['random_en'][l]:.3f} | {a['removed_en'][l]:.3f} | {a['random_tgt'][l]:.3f} | "
                         f"{a['oracle_layer'][f'L{l}']:.3f} | {a['js'][l]:.4f} | {a['topk'][l]:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="beta {0, 2} x 2 seeds, short training (CI)")
    p.add_argument("--results", default=None, help="default experiments/results/gated_world (quick: out/gated_world_quick)")
    p.add_argument("--jobs", type=int, default=2, help="base models trained at once, one process and one thread each")
    args = p.parse_args()
    if args.jobs < 1:
        raise SystemExit(f"--jobs={args.jobs}: must be at least 1")
    settings = QUICK if args.quick else FULL
    results = os.path.abspath(args.results or os.path.join(ROOT, *(("out", "gated_world_quick") if args.quick
                                                                   else ("experiments", "results", "gated_world"))))
    os.makedirs(results, exist_ok=True)
    t0 = time.time()
    jobs = [(settings, beta, seed) for seed in settings["seeds"] for beta in settings["betas"]]  # whole seeds first
    partial = os.path.join(results, "runs.jsonl")  # each base model's record as it finishes (an interrupted run keeps them)
    open(partial, "w").close()
    runs = []

    def keep(res):
        runs.append(res)
        with open(partial, "a") as f:
            f.write(json.dumps(res) + "\n")
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            for res in pool.imap_unordered(run_one, jobs):
                keep(res)
    else:
        for job in jobs:
            keep(run_one(job))
    S = dict(command="python experiments/gated_world.py" + (" --quick" if args.quick else ""), settings=settings,
             by_beta=analyse(runs, settings), runs=runs, wall_s=round(time.time() - t0, 1), jobs=args.jobs,
             job_wall_s_sum=round(sum(r["wall_s"] for r in runs), 1), platform=platform_info("cpu"))
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump(S, f, indent=1)
    md = tables(S)
    with open(os.path.join(results, "tables.md"), "w") as f:
        f.write(f"Command: `{S['command']}`; {S['wall_s'] / 60:.1f} min wall, {args.jobs} processes of 1 thread.\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
