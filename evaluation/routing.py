"""
Routing analysis (the paper's Figure 5) and the choice of the SARA band.

On parallel text in the data/parallel.py format: each sequence is the chat-formatted prompt + response (as
SARA's anchors), the model runs in eval mode, and its dense router softmax is averaged over the real tokens
(anchors.forward_and_pool -> sara_loss.pool_routing: the same pooling as the loss). Only groups present in
both the language and the anchor language are used (paired). Per MoE layer and language:
  js        JS(mean over the language's sequences || mean over the same items' anchor sequences)
            (sara_loss.pooled_layer_divergence: the language-level comparison of Figure 5)
  js_paired mean over items of JS(item || its anchor) (sara_loss.layer_divergence: what L_JS measures per layer)
  *_norm    the same divided by ln 2 (sara_loss's normalized=True): JS in bits, in [0, 1], where 1 = disjoint
            routing. The paper calls its curves "entropy-normalized" without a definition; ln 2 = H(fair coin)
            is the bound on JS itself and does not depend on the number of experts.
Each model is compared with its OWN anchor-language routing (before vs after = two models, two anchors).
Natural log throughout. Notation: N items/sequences, L MoE layers, E experts.

The band rule (one rule, used by `eval.py band` and experiments/toy_sara.py): the contiguous window of K MoE
layers with the lowest mean (over languages) divergence, i.e. the bottom of the U, among the MIDDLE windows:
a window may not contain the first or the last MoE layer. Both of the paper's bands leave out early and late
layers (Qwen3 7-34 of 0-47, Phi-3.5 13-26 of 0-31); a measured curve need not be U-shaped, and without the
constraint its minimum may sit at an edge. edges=True (`--edges`) allows the edge windows explicitly.
Earliest window on ties. Reported in decoder-layer indices, as train.py takes them.

The routing oracle (record_routing, oracle_interventions, routing_oracle_loss): run target-language inputs with
the routing of their aligned English tokens imposed on chosen MoE layers -- each target token gets exactly the
top-k experts and gate weights its English token was routed to -- and measure the change in loss (or, in an
experiment, accuracy). That change is the ceiling of what any routing-alignment method (SARA included) can gain
on that model and data: no alignment of routing makes a token's routing more English than its English token's
own. A ceiling near zero means the model's knowledge does not depend on WHICH experts run in those layers.
Through router.RoutingIntervention (the model's one routing hook). Alignment: align (B, T) long, for each target
position the anchor position whose routing it takes, -1 = keep its own (e.g. a language tag with no English
counterpart).
"""
import csv
import math
from pathlib import Path

import numpy as np
import torch

from anchors import forward_and_pool
from data.parallel import group_key
from evaluation.benchmarks import read_rows
from router import intervene, merge_intervention
from sara_loss import layer_divergence, pooled_layer_divergence

def routing_distributions(model, tok, samples, *, batch_size=16, max_len=512, system=None, set_rows=None):
    """Pooled dense routing of every sample's chat-formatted prompt + response (eval mode, no grad;
    anchors.forward_and_pool, the pooling of the loss). -> {lang: (groups, (N, L, E) fp32 tensor on the CPU)}.
    set_rows(langs): told the languages of each batch's rows before its forward (a ShifCon model's shift)."""
    seqs = []
    for s in samples:
        p, r = tok.encode_chat(s["prompt"], s["response"], system=system)
        seqs.append((p + r)[:max_len])
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    before = None if set_rows is None else lambda rows: set_rows([samples[i]["lang"] for i in order[rows]])
    pooled = forward_and_pool(model, [seqs[i] for i in order], pad_id=tok.pad_id, batch_size=batch_size,
                              before_batch=before).routing
    dists = [None] * len(seqs)
    for i, d in zip(order, pooled):
        dists[i] = d
    by_lang = {}
    for s, d in zip(samples, dists):
        groups, rows = by_lang.setdefault(s["lang"], ([], []))
        groups.append(group_key(s))
        rows.append(d)
    return {lang: (g, torch.stack(rows)) for lang, (g, rows) in by_lang.items()}


def routing_divergence(dists, anchor, langs=None, layers=None):
    """dists from routing_distributions -> rows {lang, anchor, layer, moe_index, n_items, js, js_norm,
    js_paired, js_paired_norm}, one per (language, MoE layer), on the items present in both languages.
    layers: decoder-layer index of each MoE layer (default 0..L-1)."""
    if anchor not in dists:
        raise SystemExit(f"anchor language {anchor!r} is not in the data (languages: {sorted(dists)})")
    a_groups, a_dist = dists[anchor]
    a_index = {g: i for i, g in enumerate(a_groups)}
    rows = []
    for lang in langs or [l for l in dists if l != anchor]:
        if lang not in dists:
            raise SystemExit(f"language {lang!r} is not in the data (languages: {sorted(dists)})")
        groups, dist = dists[lang]
        pairs = [(i, a_index[g]) for i, g in enumerate(groups) if g in a_index]
        if not pairs:
            raise SystemExit(f"language {lang!r} shares no item (group) with the anchor {anchor!r}")
        mine, theirs = dist[[i for i, _ in pairs]], a_dist[[j for _, j in pairs]]  # (N, L, E) each
        js = pooled_layer_divergence(mine, theirs)
        js_paired = layer_divergence(theirs, mine)
        for l in range(dist.shape[1]):
            rows.append(dict(lang=lang, anchor=anchor, layer=layers[l] if layers else l, moe_index=l,
                             n_items=len(pairs), js=js[l].item(), js_norm=js[l].item() / math.log(2),
                             js_paired=js_paired[l].item(), js_paired_norm=js_paired[l].item() / math.log(2)))
    return rows


ROUTING_COLUMNS = ["model", "lang", "anchor", "layer", "moe_index", "n_items", "js", "js_norm", "js_paired",
                   "js_paired_norm"]
METRICS = ("js", "js_norm", "js_paired", "js_paired_norm")


def write_routing_csv(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=ROUTING_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{r[k]:.8g}" if isinstance(r[k], float) else r[k] for k in ROUTING_COLUMNS})


def read_routing_csv(path):
    rows = read_rows(path)
    for r in rows:
        for k in ("layer", "moe_index", "n_items"):
            r[k] = int(r[k])
        for k in METRICS:
            r[k] = float(r[k])
    return rows


def curves(rows, model, metric="js_norm"):
    """-> (layers, {lang: [value per layer]}) for one model of a routing table."""
    mine = [r for r in rows if r["model"] == model]
    if not mine:
        raise SystemExit(f"model {model!r} is not in the routing table (models: {models_in(rows)})")
    layers = sorted({r["layer"] for r in mine})
    by_lang = {}
    for r in sorted(mine, key=lambda r: r["layer"]):
        by_lang.setdefault(r["lang"], []).append(r[metric])
    return layers, by_lang


def models_in(rows):
    return list(dict.fromkeys(r["model"] for r in rows))


def choose_band(curve, width, edges=False):
    """-> (start, end) positions in curve, inclusive: the window of `width` consecutive layers with the lowest
    mean of curve (the bottom of the U), the earliest on ties; by default among the middle windows only
    (neither the first nor the last layer), with edges=True among all windows (see the module docstring)."""
    curve = np.asarray(curve, dtype=np.float64)
    if not 1 <= width <= len(curve):
        raise SystemExit(f"band width {width} must be between 1 and the number of MoE layers ({len(curve)})")
    starts = range(len(curve) - width + 1) if edges else range(1, len(curve) - width)
    if not starts:
        raise SystemExit(f"band width {width} leaves no middle window in {len(curve)} MoE layers (the first and "
                         "last layers are excluded): choose a smaller width, or allow the edges (--edges)")
    start = min(starts, key=lambda s: float(np.mean(curve[s:s + width])))
    return start, start + width - 1


def band_from_rows(rows, width, model=None, metric="js_norm", edges=False):
    """-> dict(model, start, end (decoder indices, inclusive), mean, curve, layers, metric, edges) from a
    routing table; the curve is the mean over languages per layer. model: default the first in the table
    (the original)."""
    model = model or models_in(rows)[0]
    layers, by_lang = curves(rows, model, metric)
    curve = np.mean(np.array(list(by_lang.values())), axis=0)
    s, e = choose_band(curve, width, edges)
    return dict(model=model, start=layers[s], end=layers[e], mean=float(curve[s:e + 1].mean()),
                curve=curve.tolist(), layers=layers, metric=metric, edges=edges)


def format_routing(rows, metric="js_norm"):
    lines = []
    for model in models_in(rows):
        layers, by_lang = curves(rows, model, metric)
        lines.append(f"[{model}] {metric} per MoE layer (decoder index)")
        lines.append(f"{'lang':<6}" + "".join(f"{'L' + str(l):>8}" for l in layers) + f"{'mean':>8}")
        for lang, vals in list(by_lang.items()) + [("mean", np.mean(list(by_lang.values()), axis=0).tolist())]:
            lines.append(f"{lang:<6}" + "".join(f"{v:8.4f}" for v in vals) + f"{np.mean(vals):8.4f}")
    return "\n".join(lines)



def band_divergence_change(rows, band, model_a, model_b, metric="js_norm"):
    """{lang: mean over the band's layers of metric(b) - metric(a)} from routing tables."""
    out = {}
    for model, sign in ((model_a, -1), (model_b, 1)):
        layers, by_lang = curves(rows, model, metric)
        keep = [k for k, l in enumerate(layers) if band[0] <= l <= band[1]]
        if not keep:
            raise SystemExit(f"band {band} holds none of the layers {layers}")
        for lang, vals in by_lang.items():
            out.setdefault(lang, []).append(sign * float(np.mean([vals[k] for k in keep])))
    return {l: sum(v) for l, v in out.items() if len(v) == 2}


# -----------------------------------------------------------------------------
# the routing oracle
@torch.no_grad()
def record_routing(model, ids, mask, layers, edits=None):
    """-> {layer: (expert_ids (B, T, K), weights (B, T, K))}, the routing each of `layers` (decoder indices) ran
    with on ids/mask (B, T); `edits` {layer: RoutingIntervention} are applied as in any other forward."""
    recs = {l: merge_intervention(edits, l, record=True) for l in set(layers) | set(edits or {})}
    with intervene(model, recs):
        model(ids, attention_mask=mask)
    return {l: recs[l].recorded for l in layers}


def oracle_interventions(model, anchor_ids, anchor_mask, align, layers, anchor_edits=None, target_edits=None):
    """Interventions for the TARGET forward that impose, on each of `layers`, the routing of the aligned anchor
    (English) tokens. anchor_ids/anchor_mask (B, Ta); align (B, T) long: anchor position per target position, -1
    = keep the target token's own routing. anchor_edits / target_edits: {layer: RoutingIntervention} each forward
    runs with anyway (kept in the result for every layer). -> {layer: RoutingIntervention}."""
    align = torch.as_tensor(align, dtype=torch.long)
    if align.dim() != 2 or align.shape[0] != anchor_ids.shape[0]:
        raise ValueError(f"align has shape {tuple(align.shape)}, expected (B, T) with B = {anchor_ids.shape[0]} "
                         "anchor sequences")
    Ta = anchor_ids.shape[1]
    if bool((align >= Ta).any()):
        raise ValueError(f"align points past the anchor sequences (max {align.max().item()}, anchor length {Ta})")
    used = align >= 0
    pos = align.clamp(min=0)
    if bool((anchor_mask.gather(1, pos) == 0)[used].any()):
        raise ValueError("align points at anchor padding (anchor_mask = 0) for some target positions")
    recorded = record_routing(model, anchor_ids, anchor_mask, layers, anchor_edits)
    edits = dict(target_edits or {})
    for l, (ids_BTK, w_BTK) in recorded.items():
        idx = pos[..., None].expand(-1, -1, ids_BTK.shape[-1])  # (B, T, K)
        edits[l] = merge_intervention(target_edits, l, expert_ids=ids_BTK.gather(1, idx), weights=w_BTK.gather(1, idx), where=used)
    return edits


@torch.no_grad()
def routing_oracle_loss(model, target_ids, target_mask, labels, anchor_ids, anchor_mask, align, layers,
                        anchor_edits=None, target_edits=None):
    """Mean CE on labels (B, T; -100 ignored) of the target inputs with their own routing and with the aligned
    anchor tokens' routing imposed on `layers` -> dict(own, imposed, delta = imposed - own) in nats/token."""
    with intervene(model, dict(target_edits or {})):
        own = model(target_ids, attention_mask=target_mask, labels=labels).loss.item()
    edits = oracle_interventions(model, anchor_ids, anchor_mask, align, layers, anchor_edits, target_edits)
    with intervene(model, edits):
        imposed = model(target_ids, attention_mask=target_mask, labels=labels).loss.item()
    return dict(own=own, imposed=imposed, delta=imposed - own, layers=sorted(layers))

