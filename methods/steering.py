"""Inference-time routing steering (training-free): change a layer's router logits so that tokens of
any language are sent to the experts English uses. Two published rules, both from the authors' code.

Notation: L MoE layers (positions in out.router_logits, as in sara_loss), E experts, K experts chosen
per token (top_k), T tokens of one layer's router call, G guiding languages.

Statistics (both rules). An expert's activation frequency at a layer is the fraction of real
(non-pad) tokens that have it among their top-k router logits (the experts a softmax top-k router
chooses): freq[l, e] = #{tokens t : e ∈ top-k(z_t)} / #tokens; Σ_e freq[l, e] = K.

(a) Shared-expert steering, Chen et al. 2026 (arXiv 2601.14050; code
github.com/conctsai/Multilingualism-in-Mixture-of-Experts-LLMs, steer/vllm_steer_polymath.py and the
patched vLLM qwen3_moe.py). For each guiding language g and layer l keep the TOP_N most frequent
experts (others 0), and normalise across the guiding languages:
    share[g, l, e] = kept[g, l, e] / (Σ_g' kept[g', l, e] + 1e-10).
Expert e is "shared" at layer l when some guiding language uses it (share > 0 for some g) and no
language dominates it (share < SHARE_THRESHOLD for every g). Its strength s[l, e] is the FIRST guiding
language's share (English's: their guides are "en,zh" in that order); every other expert has s = 0.
On the steered layers the router logits of every token become
    z_e  <-  z_e + λ · s_e · |z_e|
before the top-k (their setting: Qwen3-30B-A3B, layers 10-39, λ = 0.022; 0.034 with Chinese first).

(b) SteerMoE, Fayyaz et al. 2025 (arXiv 2509.09660; code github.com/adobe-research/SteerMoE,
src/utils.py steer_moe and src/modeling_vllm/*). Each (layer, expert) gets the difference of its
activation frequencies between two sets of inputs, here English (a) minus the target language (b).
Pairs are ranked by |difference| over ALL layers at once; the n_boost first with a positive
difference are boosted, except that a layer gets at most K boosted experts (later ones are skipped,
as their code does); the n_suppress first with a negative difference are suppressed. On each token:
    lp = log_softmax(z);  lp_e <- max(lp) + 0.01 for boosted e;  lp_e <- min(lp) − 0.01 for suppressed e
and lp replaces the router logits. A boosted expert is then always among the token's top-k (at most
K per layer), and a suppressed one never is (while E − n_suppressed ≥ K).

Decisions (ours):
- SteerMoE's log-softmax runs in at least fp32 and the result stays there, also in a bf16 model: the
  router chooses the experts from the fp32 values (router.py casts only the gate weights back). In bf16
  (their vLLM dtype) max + 0.01 can round back to max (bf16 spacing is 2^-5 at |x| in [4, 8)), and the
  boosted expert would only tie (tests/test_methods_steering_runtime.py, the bf16 test: 128 near-uniform
  experts, top-1; the rounded version lost the tie on the first token).
- Chen's rule leaves an entry untouched bit for bit where λ·s·|z| is 0 (no -0.0 -> +0.0 rewrite), so
  λ = 0 is exactly the unsteered model.

Neither rule is a standard architecture: a serving engine (vLLM, SGLang) runs them only with a patched
model file, as both authors did. Here they need the built-in generator (model.MoETransformer.generate).
"""

import math

import torch

from sara_loss import _as_layer_list, _compute_dtype

# Chen et al.'s defaults (scripts/run_steer_polymath.sh)
LAMBDA = 0.022  # with English as the first guide; 0.034 with Chinese first
TOP_N = 20  # experts kept per language and layer before normalising
SHARE_THRESHOLD = 0.7  # "shared": every guiding language's share below this
GUIDES = ("en", "zh")  # guiding languages, the first one's share is the strength
STEER_LAYERS = range(10, 40)  # Qwen3-30B-A3B, 0-based, 10..39 inclusive
# SteerMoE's margin above the token's largest (below its smallest) log-probability
STEERMOE_MARGIN = 0.01


# -----------------------------------------------------------------------------
# statistics

def expert_counts(router_logits, attention_mask, top_k):
    """How many real tokens chose each expert at each layer.

    router_logits: out.router_logits, L x (B, T, E) (or a stacked (B, L, T, E) tensor).
    attention_mask: (B, T), 1 = real token, 0 = padding; None = all real.
    Returns (counts_LE int64, n_tokens int): add them over batches, then divide (expert_frequencies).
    """
    logits_list = _as_layer_list(router_logits)
    B, T, E = logits_list[0].shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k <= E:
        raise ValueError(f"top_k must be an int in 1..{E} (the experts per token); got {top_k!r}")
    if attention_mask is None:
        keep_BT = torch.ones(B, T, dtype=torch.bool, device=logits_list[0].device)
    elif tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be (B, T) = {(B, T)}")
    else:
        keep_BT = attention_mask != 0
    counts = []
    for logits_BTE in logits_list:
        ids_NK = logits_BTE[keep_BT].topk(top_k, dim=-1).indices  # N real tokens, their K experts
        counts.append(torch.bincount(ids_NK.flatten(), minlength=E))
    return torch.stack(counts), int(keep_BT.sum())


def expert_frequencies(router_logits, attention_mask, top_k):
    """freq[l, e]: fraction of real tokens that route to expert e at layer l, float64 (L, E)."""
    counts_LE, n = expert_counts(router_logits, attention_mask, top_k)
    if n == 0:
        raise ValueError("attention_mask has no real token: no frequencies to compute")
    return counts_LE.to(torch.float64) / n


# -----------------------------------------------------------------------------
# (a) Chen et al.: shared experts, z <- z + λ s |z|

def shared_expert_strengths(freq_GLE, layers=None, top_n=TOP_N, threshold=SHARE_THRESHOLD):
    """s[l, e]: the first guiding language's share of each shared expert, 0 elsewhere.

    freq_GLE: (G, L, E) activation frequencies of the G guiding languages (first = the one steered
        towards, English). layers: the layers to steer (others get s = 0); None = all.
    Returns (L, E), the dtype of freq_GLE.
    """
    if freq_GLE.dim() != 3:
        raise ValueError(f"freq_GLE must be (G, L, E), one (L, E) table per guiding language; got {tuple(freq_GLE.shape)}")
    G, L, E = freq_GLE.shape
    if not 0 < top_n <= E:
        raise ValueError(f"top_n={top_n} must be in 1..{E} (the number of experts)")
    top = freq_GLE.topk(top_n, dim=-1)
    kept_GLE = torch.zeros_like(freq_GLE).scatter(-1, top.indices, top.values)
    share_GLE = kept_GLE / (kept_GLE.sum(0, keepdim=True) + 1e-10)  # normalised across languages
    shared_LE = (share_GLE > 0).any(0) & (share_GLE < threshold).all(0)
    strength_LE = torch.where(shared_LE, share_GLE[0], 0.0)
    if layers is not None:
        steered_L = torch.zeros(L, dtype=torch.bool, device=freq_GLE.device)
        steered_L[list(layers)] = True
        strength_LE = torch.where(steered_L[:, None], strength_LE, 0.0)
    return strength_LE


def chen_steer_logits(router_logits_TE, strength_E, lam=LAMBDA):
    """One layer: z_e + λ · s_e · |z_e| (entries with a zero adjustment are returned untouched)."""
    if strength_E.shape != router_logits_TE.shape[-1:]:
        raise ValueError(f"strength_E {tuple(strength_E.shape)} must have one entry per expert "
                         f"(router_logits_TE is {tuple(router_logits_TE.shape)})")
    adj_TE = (lam * strength_E.to(router_logits_TE.dtype)) * router_logits_TE.abs()
    return torch.where(adj_TE == 0, router_logits_TE, router_logits_TE + adj_TE)


# -----------------------------------------------------------------------------
# (b) SteerMoE: boost to max + 0.01, suppress to min - 0.01

def steermoe_expert_signs(freq_a_LE, freq_b_LE, n_boost, n_suppress, top_k):
    """+1 boosted, -1 suppressed, 0 untouched, per (layer, expert): (L, E) int8.

    freq_a_LE: activation frequencies on the behaviour to promote (English); freq_b_LE: on the other
    set (the target language). Ranked by |freq_a - freq_b| over all layers (ties: lower layer, then
    lower expert first); at most top_k boosted per layer. Fewer candidates than asked is an error.
    """
    if freq_a_LE.shape != freq_b_LE.shape or freq_a_LE.dim() != 2:
        raise ValueError(f"freq_a_LE {tuple(freq_a_LE.shape)} and freq_b_LE {tuple(freq_b_LE.shape)} must both be (L, E)")
    L, E = freq_a_LE.shape
    diff = (freq_a_LE.double() - freq_b_LE.double()).flatten().tolist()
    order = sorted(range(L * E), key=lambda i: -abs(diff[i]))  # stable: ties keep (layer, expert) order
    boost = [i for i in order if diff[i] > 0][:n_boost]
    suppress = [i for i in order if diff[i] < 0][:n_suppress]
    if len(boost) < n_boost or len(suppress) < n_suppress:
        raise ValueError(f"asked for {n_boost} boosted and {n_suppress} suppressed experts, but only "
                         f"{len(boost)} have a positive and {len(suppress)} a negative frequency difference")
    signs = [0] * (L * E)
    boosted_L = [0] * L
    for i in boost:
        if boosted_L[i // E] < top_k:  # their cap: no more than K boosted experts in one layer
            signs[i] = 1
            boosted_L[i // E] += 1
    for i in suppress:
        signs[i] = -1
    return torch.tensor(signs, dtype=torch.int8).view(L, E)


def steermoe_steer_logits(router_logits_TE, signs_E, margin=STEERMOE_MARGIN):
    """One layer: log_softmax of the logits, boosted experts set to the token's max + margin,
    suppressed ones to its min - margin. Returns (T, E) in at least fp32 (see the module docstring)."""
    if signs_E.shape != router_logits_TE.shape[-1:]:
        raise ValueError(f"signs_E {tuple(signs_E.shape)} must have one entry per expert "
                         f"(router_logits_TE is {tuple(router_logits_TE.shape)})")
    logp_TE = torch.log_softmax(router_logits_TE.to(_compute_dtype(router_logits_TE.dtype)), dim=-1)
    hi_T1 = logp_TE.max(-1, keepdim=True).values + margin
    lo_T1 = logp_TE.min(-1, keepdim=True).values - margin
    signs_E = signs_E.to(logp_TE.device)
    return torch.where(signs_E > 0, hi_T1, torch.where(signs_E < 0, lo_T1, logp_TE))


# -----------------------------------------------------------------------------
# at inference: statistics file -> RoutingIntervention per steered layer (eval.py bench, sample.py)
#
#   python -m methods.steering --checkpoint DIR --data parallel.jsonl --langs en,zh,sw --out stats.json
#
# The statistics (activation frequencies per language, over every real token of each sample's chat-formatted
# prompt + response, eval mode) are tied to the model they were measured on: its expert count, top_k and
# MoE layers are stored with them, and a model that differs is an error. Measure them on the model that is
# steered (a SARA-trained model: its own statistics; the steering then combines with SARA's weights).
# Neither rule runs in a serving engine here: eval.py refuses --steering with --engine-url.

RULES = ("chen", "steermoe")
# how the caller spells its settings, for the error messages: eval.py's argparse flags (the default), and the
# --key=value settings of sample.py and compare.py
DASHED_FLAGS = dict(rule="--steering-rule", strength="--steering-strength", layers="--steering-layers",
                    target="--steering-target")
SETTING_FLAGS = dict(rule="--steering_rule", strength="--steering_strength", layers="--steering_layers",
                     target="--steering_target")


@torch.no_grad()
def routing_statistics(model, tok, samples, *, batch_size=16, max_len=512, system=None):
    """-> {"n_experts", "top_k", "moe_layers", "n_layers", "freq": {lang: (L, E) nested list}, "n_tokens": {lang}}."""
    from data.parallel import collate
    cfg, device = model.config, next(model.parameters()).device
    by_lang = {}
    for s in samples:
        p, r = tok.encode_chat(s["prompt"], s["response"], system=system)
        by_lang.setdefault(s["lang"], []).append((p + r)[:max_len])
    model.eval()
    freq, n_tokens = {}, {}
    for lang, seqs in sorted(by_lang.items()):
        total, n = 0, 0
        for i in range(0, len(seqs), batch_size):
            batch = {k: v.to(device) for k, v in collate([dict(input_ids=x) for x in seqs[i:i + batch_size]], tok.pad_id).items()}
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)
            counts, m = expert_counts(out.router_logits, batch["attention_mask"], cfg.top_k)
            total, n = total + counts.cpu(), n + m
        freq[lang], n_tokens[lang] = (total.double() / n).tolist(), n
    return dict(n_experts=cfg.n_experts, top_k=cfg.top_k, moe_layers=list(cfg.moe_layers), n_layers=cfg.n_layers,
                freq=freq, n_tokens=n_tokens)


def pool_languages(stats, langs, name):
    """Add to stats (routing_statistics's) the frequencies of langs' tokens taken together, as language `name`:
    freq = Σ_lang count / Σ_lang n_tokens (each count = freq · n_tokens, an integer). E.g. SteerMoE's second
    set when several target languages are steered at once (compare.py: "sw+hi"). -> stats."""
    counts = sum(torch.tensor(stats["freq"][l], dtype=torch.float64) * stats["n_tokens"][l] for l in langs).round()
    n = sum(stats["n_tokens"][l] for l in langs)
    stats["freq"][name], stats["n_tokens"][name] = (counts / n).tolist(), n
    return stats


def load_statistics(path):
    import json
    try:
        with open(path) as f:
            stats = json.load(f)
        missing = [k for k in ("n_experts", "top_k", "moe_layers", "freq") if k not in stats]
    except (OSError, ValueError) as err:
        raise ValueError(f"--steering {path}: cannot read the statistics ({err}); write them with "
                         "`python -m methods.steering --checkpoint ... --out FILE`") from None
    if missing:
        raise ValueError(f"--steering {path}: not a statistics file (no {missing})")
    return stats


def steering_interventions(stats, cfg, rule, strength, layers, target=None, guides=GUIDES, path="--steering",
                           names=DASHED_FLAGS):
    """{decoder layer: router.RoutingIntervention} for the steered layers (inclusive decoder-layer pair
    `layers`). rule "chen": strength = λ (z <- z + λ s |z|, guides[0] the language steered towards; λ = 0
    leaves every logit untouched bit for bit); "steermoe": strength = n, the number of (layer, expert)
    pairs boosted and the number suppressed (English minus `target`'s frequencies; 0 = no intervention).
    Every mismatch between statistics, model and flags is a ValueError naming what to change, with the flags
    spelled as names says (DASHED_FLAGS: eval.py's; SETTING_FLAGS: sample.py's and compare.py's)."""
    from router import RoutingIntervention
    check_settings(cfg, rule, strength, layers, names)
    if stats["n_experts"] != cfg.n_experts or list(stats["moe_layers"]) != list(cfg.moe_layers):
        raise ValueError(f"{path}: measured on a model with {stats['n_experts']} experts and MoE layers {stats['moe_layers']}, "
                         f"this one has {cfg.n_experts} and {list(cfg.moe_layers)}: measure them on this model")
    start, end = layers
    pos = {l: cfg.moe_layers.index(l) for l in range(start, end + 1)}  # decoder layer -> row of the tables
    table = lambda lang: torch.tensor(stats["freq"][lang], dtype=torch.float64)
    if rule == "chen":
        absent = [g for g in guides if g not in stats["freq"]]
        if absent:
            raise ValueError(f"{path}: no statistics for the guiding language(s) {absent} (has {sorted(stats['freq'])})")
        # (TOP_N = 20 of Qwen3's 128 experts; a model with fewer than 20 keeps all of them)
        s_LE = shared_expert_strengths(torch.stack([table(g) for g in guides]), layers=list(pos.values()),
                                       top_n=min(TOP_N, cfg.n_experts))
        return {l: RoutingIntervention(logit_fn=lambda z, s=s_LE[p]: chen_steer_logits(z, s.to(z.device), lam=strength))
                for l, p in pos.items()}
    if not target or target not in stats["freq"] or guides[0] not in stats["freq"]:
        raise ValueError(f"{names['target']} {target!r}: steermoe needs the statistics of the target language and of "
                         f"{guides[0]!r} ({path} has {sorted(stats['freq'])})")
    if strength == 0:
        return {}
    rows = list(pos.values())
    signs = steermoe_expert_signs(table(guides[0])[rows], table(target)[rows], int(strength), int(strength), cfg.top_k)
    # fp32 even in a bf16 model: the router chooses from these and casts only the gate weights back (router.py)
    return {l: RoutingIntervention(logit_fn=lambda z, s=signs[i]: steermoe_steer_logits(z, s))
            for i, l in enumerate(pos)}


def check_settings(cfg, rule, strength, layers, names=DASHED_FLAGS):
    """The checks that need the model's config only (no statistics): rule, strength, the inclusive pair of
    decoder layers `layers`. A ValueError naming the flag (spelled as names says); compare.py calls this
    before training anything."""
    if rule not in RULES:
        raise ValueError(f"{names['rule']} {rule!r}: one of {RULES}")
    if rule == "chen" and not math.isfinite(strength):
        raise ValueError(f"{names['strength']} {strength}: for chen, the finite lambda of z + lambda * s * |z|")
    if rule == "steermoe" and (not math.isfinite(strength) or strength != int(strength) or strength < 0):
        raise ValueError(f"{names['strength']} {strength}: for steermoe, the number of boosted (and suppressed) experts, "
                         "an integer >= 0")
    start, end = layers
    if not 0 <= start <= end < cfg.n_layers:
        raise ValueError(f"{names['layers']} {start},{end}: outside the model's decoder layers 0..{cfg.n_layers - 1}")
    dense = [l for l in range(start, end + 1) if l not in cfg.moe_layers]
    if dense:
        raise ValueError(f"{names['layers']} {start},{end}: layers {dense} are dense (no router to steer); "
                         f"MoE layers: {list(cfg.moe_layers)}")


def set_steering(model, edits):
    """Set the interventions on the model for good (a model loaded to be evaluated or sampled from); every
    other MoE layer is reset to no intervention (None: bit for bit the unsteered layer)."""
    for block in model.layers:
        if getattr(block, "is_moe", False):
            block.mlp.intervention = None
    for l, edit in edits.items():
        model.layers[l].mlp.intervention = edit
    return model


def default_layers(cfg):
    """The steered layers when none are given: every MoE layer but the first and last (the middle, where
    SARA's band lies; the paper's bands leave out the early and late layers)."""
    moe = list(cfg.moe_layers)
    return (moe[1], moe[-2]) if len(moe) > 2 else (moe[0], moe[-1])


def parse_layers(text, cfg, names=DASHED_FLAGS):
    """"start,end" -> (start, end), an inclusive pair of decoder layers; "" or None -> default_layers(cfg)."""
    if not text:
        return default_layers(cfg)
    try:
        start, end = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{names['layers']} {text!r}: an inclusive pair start,end of decoder layers, e.g. 1,2") from None
    return start, end


def main(argv=None):
    import argparse
    import json
    import sys
    from checkpoint import load_model_and_tokenizer
    from data.parallel import load_parallel_jsonl
    p = argparse.ArgumentParser(description="expert activation frequencies per language, for --steering")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", default="")
    p.add_argument("--data", required=True, help="parallel JSONL (data/parallel.py format)")
    p.add_argument("--langs", required=True, help="comma-separated, e.g. en,zh,sw")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    langs = args.langs.split(",")
    samples = [x for x in load_parallel_jsonl(args.data) if x["lang"] in langs]
    absent = [l for l in langs if not any(x["lang"] == l for x in samples)]
    if absent:
        raise SystemExit(f"--langs: {absent} not in {args.data}")
    model, tok = load_model_and_tokenizer(args.checkpoint, args.tokenizer, device=args.device)
    stats = routing_statistics(model, tok, samples, batch_size=args.batch_size, max_len=args.max_len)
    stats["checkpoint"], stats["data"] = args.checkpoint, args.data
    with open(args.out, "w") as f:
        json.dump(stats, f)
    print(f"wrote {args.out}: {stats['n_tokens']} tokens per language", file=sys.stderr)


if __name__ == "__main__":
    main()
