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
- SteerMoE's log-softmax runs in at least fp32 and the result stays there: in bf16 (their vLLM
  dtype) max + 0.01 can round back to max (bf16 spacing is 2^-5 at |x| in [4, 8)), and the boosted
  expert would only tie.
- Chen's rule leaves an entry untouched bit for bit where λ·s·|z| is 0 (no -0.0 -> +0.0 rewrite), so
  λ = 0 is exactly the unsteered model.

Neither rule is a standard architecture: a serving engine (vLLM, SGLang) runs them only with a patched
model file, as both authors did. Here they need the built-in generator (model.MoETransformer.generate).
"""

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
