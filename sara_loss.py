"""SARA's routing-alignment loss (Dong et al., Findings of ACL 2026; docs/method.md lists where each
equation of the paper lives in the code; each is labelled once, at the line that computes it).

Per token t and MoE layer l the router's DENSE distribution over all E experts,
    R_l(t) = softmax(h_t W_g)                       before any top-k, no temperature,
is averaged over the real (non-padding) tokens of the sequence,
    P̄_l = Σ_t m_t R_l(t) / Σ_t m_t,
and the pooled routing Q̄_l of the model being fine-tuned on a target-language sequence is pulled
towards the pooled routing P̄_l of the ORIGINAL model on the parallel anchor sequence:
    JS(P‖Q) = ½ KL(P‖M) + ½ KL(Q‖M),  M = ½(P + Q),  natural log, 0 ≤ JS ≤ ln 2,
    L_JS = mean over the batch and over the layers l of the band of JS(P̄_l ‖ Q̄_l).

Notation: B sequences, T tokens, L MoE layers (position in `out.router_logits`; this equals the
decoder layer index when every layer is MoE, as in both of the paper's models), E experts,
N rows of an analysis set. Names carry shape suffixes (probs_BTE is (B, T, E)).

Design decisions (the released code got each of these wrong, see docs/method.md):
- 0·log 0 = 0 exactly, with a double torch.where and no clamping. Clamping to 1e-8 without
  renormalising biases JS; and the plain where()/torch.xlogy give NaN gradients exactly where a
  softmax has underflowed to 0 (about 104 nats below the maximum logit in fp32).
- Softmax, pooling and JS run in fp32 (float64 stays float64) whatever the logits' dtype or the
  autocast state; the released code took the router softmax in bf16.
- A sample without an anchor is excluded (weight 0 in value and gradient). The released code
  compared it with a zero vector clamped to 1e-8, a bogus term of ≈ ½ ln 2 ≈ 0.35 per layer.
  A batch without anchors gives an exact 0.0 whose gradient is exactly zero.
- Anchors are detached: they are constants, computed once by the original model.
- The band is an explicit list of layer indices; layer_band(start, end) spells the paper's
  inclusive band. A 2-element list is two layers, never a (start, end) pair.
- Shape checks always run (free). Value checks (entries ≥ 0, sums = 1, every sequence has a real
  token) read the data back to the host, a sync: they run only with check=True (the default).
  A training loop that trusts its inputs passes check=False and stays sync-free.
"""

import math
import operator

import torch

LN2 = math.log(2.0)  # the largest possible JS (disjoint supports), in nats


# -----------------------------------------------------------------------------
# the pooled dense routing distribution of each sequence at each layer

def pool_routing(router_logits, attention_mask=None, *, check=True):
    """Mean dense routing distribution of each sequence at each MoE layer.

    router_logits: the raw gate logits h_t W_g, before any top-k, as the model returns them in
        `out.router_logits`: a tuple/list with one (B, T, E) tensor per MoE layer, in layer order.
        One stacked (B, L, T, E) tensor is accepted too.
    attention_mask: (B, T), 1/True = real token, 0/False = padding; None = all tokens real.
        Padding positions may hold any finite logits; left or right padding gives the same result.
    check: verify that the mask is 0/1 and that every sequence has a real token (host sync).
    Returns P̄ (B, L, E), fp32 (float64 for float64 logits); each row sums to 1.
    """
    logits_list = _as_layer_list(router_logits)  # L x (B, T, E)
    B, T, E = logits_list[0].shape
    dtype = _compute_dtype(*(x.dtype for x in logits_list))
    if attention_mask is None:
        if T == 0:
            raise ValueError(f"router_logits have T = 0 tokens (shape {(B, T, E)}): nothing to pool")
        keep_BT1, n_B1 = None, T
    else:
        _check_mask("attention_mask", attention_mask, (B, T), logits_list[0].device, check)
        keep_BT = attention_mask != 0
        keep_BT1 = keep_BT[:, :, None]
        n_B1 = keep_BT.sum(1, keepdim=True).to(dtype)  # Σ_t m_t, (B, 1)
    pooled = []
    for logits_BTE in logits_list:
        # eq. 1-2: dense softmax over ALL experts. Cast first so that it runs in fp32 even for bf16
        # logits; only elementwise ops and sums follow, which autocast never lowers to bf16.
        probs_BTE = torch.softmax(logits_BTE.to(dtype), dim=-1)
        if keep_BT1 is not None:
            probs_BTE = torch.where(keep_BT1, probs_BTE, 0.0)  # eq. 6: m_t drops padding
        pooled.append(probs_BTE.sum(1) / n_B1)  # eq. 7: mean over the real tokens, (B, E)
    return torch.stack(pooled, dim=1)  # (B, L, E)


# -----------------------------------------------------------------------------
# Jensen-Shannon divergence

def js_divergence(p, q, *, check=True):
    """Jensen-Shannon divergence over the last dim, natural log.

    JS(P‖Q) = ½ KL(P‖M) + ½ KL(Q‖M), M = ½(P + Q): symmetric, 0 ≤ JS ≤ ln 2, = ln 2 exactly
    for disjoint supports.
    p, q: (..., E) probability distributions, same shape. Any float dtype; computed in fp32, or
        float64 if either input is float64.
    check: verify entries ≥ 0 and sums within 1e-3 of 1 (1e-2 for 16-bit inputs) (host sync).
    Returns (...): the leading shape.
    Exact where probabilities are 0 (0·log 0 = 0) with finite gradients there, see _kl.
    """
    _check_same_shape("p", p, "q", q)
    if p.dim() == 0 or p.shape[-1] == 0:
        raise ValueError(f"p and q need a non-empty last (expert) dim; got shape {tuple(p.shape)}")
    dtype = _compute_dtype(p.dtype, q.dtype)
    if check:
        _check_distribution("p", p, dtype)
        _check_distribution("q", q, dtype)
    p, q = p.to(dtype), q.to(dtype)
    m = 0.5 * (p + q)
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)  # eq. 8


def _kl(p, m):
    """KL(p‖m) = Σ_e p_e (log p_e − log m_e) over the last dim, for m ≥ p/2 (m_e > 0 where p_e > 0)."""
    # The "double where": log() sees a harmless 1 where p_e = 0, so neither the value nor the
    # gradient ever touches log 0 (a single where, or torch.xlogy, gives 0·(−inf) = NaN in
    # backward). The gradient w.r.t. a zero p_e then leaves out p_e·log p_e, whose derivative is
    # −inf there; through a softmax that entry is multiplied by ∂p_e/∂z = p_e(…) = 0, so the
    # gradient w.r.t. the logits is the correct (finite) limit.
    pos = p > 0
    log_ratio = torch.where(pos, p, 1.0).log() - torch.where(pos, m, 1.0).log()
    return torch.where(pos, p * log_ratio, 0.0).sum(-1)


# -----------------------------------------------------------------------------
# the SARA loss

def layer_band(start, end):
    """The paper's inclusive, 0-based layer band [start, end], e.g. layer_band(7, 34) for Qwen3-30B-A3B."""
    start, end = _as_int("start", start), _as_int("end", end)
    if not 0 <= start <= end:
        raise ValueError(f"layer band needs 0 <= start <= end (inclusive); got start={start}, end={end}")
    return range(start, end + 1)


def moe_positions(moe_layers, layers):
    """Decoder-layer indices -> their positions in out.router_logits, which lists the MoE layers
    only (moe_layers = MoEConfig.moe_layers). A layer that is not an MoE layer is a ValueError."""
    bad = [l for l in layers if l not in moe_layers]
    if bad:
        raise ValueError(f"layers {bad} are not MoE layers (MoE layers: {list(moe_layers)})")
    return [list(moe_layers).index(l) for l in layers]


def sara_loss(target_dist, anchor_dist, layers, anchor_mask=None, *, check=True, reduction="mean"):
    """L_JS: mean over anchored samples and selected layers of JS(P̄_anchor ‖ Q̄_target).

    target_dist: (B, L, E) pooled routing (pool_routing) of the model being trained, on the
        target-language sequences. The gradient flows through this side only.
    anchor_dist: (B, L, E) pooled routing of the ORIGINAL model on the parallel anchor sequences,
        precomputed. Detached here: constants.
    layers: indices into the L axis to align, an iterable of distinct ints, 0-based. The paper's
        inclusive band Ls..Le is layer_band(Ls, Le) == range(Ls, Le + 1).
    anchor_mask: (B,) bool, True where sample b has an anchor; None = every sample has one.
        Samples without an anchor are left out of the mean (their anchor rows may hold anything,
        NaN included). With no anchored sample the loss is an exact 0.0 with an all-zero gradient.
    check: validate the distributions and mask values (host sync); shapes are always checked.
    reduction: "mean" over anchored samples, or "sum" over them (a caller that averages over more
        than one micro-batch divides by its own count of anchored samples).
    Returns a 0-dim tensor, fp32 (float64 if either input is float64).
    """
    _check_same_shape("target_dist", target_dist, "anchor_dist", anchor_dist)
    if target_dist.dim() != 3 or target_dist.shape[0] == 0:
        raise ValueError(f"target_dist and anchor_dist must be (B, L, E) with B > 0; got {tuple(target_dist.shape)}")
    B, L, E = target_dist.shape
    idx = _layer_indices(layers, L)
    if idx == list(range(idx[0], idx[-1] + 1)):
        idx = slice(idx[0], idx[-1] + 1)  # a contiguous band is a view: no index tensor to copy
    target_BlE = target_dist[:, idx]  # l: the selected layers
    anchor_BlE = anchor_dist.detach()[:, idx]  # anchors are constants: no gradient into them
    if anchor_mask is not None:
        _check_mask("anchor_mask", anchor_mask, (B,), target_dist.device, check)
        has_B = anchor_mask != 0
        # Rows without an anchor take a copy of the (detached) target in place of whatever they
        # hold, only so that their term is finite; where() below drops it, so neither its value nor
        # its gradient reaches the loss. Boolean indexing would do the same with a host sync.
        anchor_BlE = torch.where(has_B[:, None, None], anchor_BlE, target_BlE.detach())
    if check:
        dtype = _compute_dtype(target_dist.dtype, anchor_dist.dtype)
        _check_distribution("target_dist[:, layers]", target_BlE, dtype)
        _check_distribution("anchor_dist[:, layers] (anchored rows)", anchor_BlE, dtype)
    js_B = js_divergence(anchor_BlE, target_BlE, check=False).mean(1)  # eq. 9: mean over the band, then the batch
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
    if anchor_mask is None:
        return js_B.mean() if reduction == "mean" else js_B.sum()
    total = torch.where(has_B, js_B, 0.0).sum()
    return total / has_B.sum().clamp(min=1) if reduction == "mean" else total  # mean over anchored


# -----------------------------------------------------------------------------
# analysis: per-layer divergence between two sets of pooled distributions (paper Fig. 5)
# normalized=True divides by ln 2, giving values in [0, 1] (JS measured in bits). Why this
# "entropy normalisation": JS(P‖Q) is the mutual information between the expert e drawn from M
# and the fair coin Z saying which of P, Q it came from, so JS ≤ H(Z) = ln 2 and JS / H(Z) is
# the fraction of Z's entropy that routing reveals. The other bound, JS ≤ H(M), would mix changes
# in divergence with changes in how spread the routing is, and depends on E.
# Value checks always run here (host sync): this is analysis code, not the training hot path.

def layer_divergence(dist_a, dist_b, mask=None, *, normalized=False):
    """Per-layer mean JS between paired rows: out[l] = mean_n JS(dist_a[n, l] ‖ dist_b[n, l]).

    dist_a, dist_b: (N, L, E) pooled routing (pool_routing), row n of each from the same item
        (e.g. the English and the Swahili version). mask: (N,) bool, rows to use; None = all.
    normalized: divide by ln 2 (see the note above): values in [0, 1].
    Returns (L,), fp32 (float64 if either input is float64).
    """
    _check_same_shape("dist_a", dist_a, "dist_b", dist_b)
    if dist_a.dim() != 3:
        raise ValueError(f"dist_a and dist_b must be (N, L, E); got {tuple(dist_a.shape)}")
    if mask is not None:
        _check_mask("mask", mask, dist_a.shape[:1], dist_a.device, check=True)
        dist_a, dist_b = dist_a[mask != 0], dist_b[mask != 0]
    if dist_a.shape[0] == 0:
        raise ValueError("layer_divergence: no rows to compare (N = 0 or mask all False)")
    js_L = js_divergence(dist_a, dist_b).mean(0)
    return js_L / LN2 if normalized else js_L


def pooled_layer_divergence(dist_a, dist_b, *, normalized=False):
    """Per-layer JS between the two sets' pooled routing: JS(mean_n dist_a[n, l] ‖ mean_n dist_b[n, l]).

    The paper's routing analysis compares each language's pooled distribution with English's.
    dist_a: (Na, L, E), dist_b: (Nb, L, E); the rows need not be paired. For paired sets this is
    ≤ layer_divergence(dist_a, dist_b) (JS is jointly convex).
    normalized: divide by ln 2 (see the note above): values in [0, 1].
    Returns (L,), fp32 (float64 if either input is float64).
    """
    for name, d in (("dist_a", dist_a), ("dist_b", dist_b)):
        if d.dim() != 3 or d.shape[0] == 0:
            raise ValueError(f"{name} must be (N, L, E) with N > 0; got {tuple(d.shape)}")
    _check_same_shape("mean of dist_a", dist_a[0], "mean of dist_b", dist_b[0])
    dtype = _compute_dtype(dist_a.dtype, dist_b.dtype)
    _check_distribution("dist_a", dist_a, dtype)
    _check_distribution("dist_b", dist_b, dtype)
    js_L = js_divergence(dist_a.to(dtype).mean(0), dist_b.to(dtype).mean(0), check=False)  # checked above
    return js_L / LN2 if normalized else js_L


# -----------------------------------------------------------------------------
# validation helpers

def _compute_dtype(*dtypes):
    # at least fp32: bf16/fp16 are upcast, float64 stays float64
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _check_same_shape(name_a, a, name_b, b):
    for name, x in ((name_a, a), (name_b, b)):
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor; got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def _check_distribution(name, p, dtype):
    """Entries ≥ 0 and sums ≈ 1 over the last dim. NOTE: host sync (one .tolist())."""
    if p.numel() == 0:
        return
    tol = 1e-2 if p.dtype.itemsize <= 2 else 1e-3  # 16-bit storage rounds each entry by ~4e-3
    p = p.detach().to(dtype)
    lo, dev = torch.stack([p.min(), (p.sum(-1) - 1).abs().max()]).tolist()
    if not (lo >= 0 and dev <= tol):  # written so that NaN fails too
        raise ValueError(
            f"{name} {tuple(p.shape)} must hold probability distributions over its last dim "
            f"(entries >= 0, sums within {tol:g} of 1); found min entry {lo:.3g}, max |sum - 1| {dev:.3g}")


def _check_mask(name, mask, shape, device, check):
    if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must be a {tuple(shape)} tensor; got {tuple(getattr(mask, 'shape', ()))} {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the distributions are on {device}")
    if not check or mask.numel() == 0:
        return
    # NOTE: host sync (one .tolist())
    nonbinary = ((mask != 0) & (mask != 1)).any()
    empty_rows = (mask != 0).sum(-1) == 0 if mask.dim() == 2 else torch.zeros(1, dtype=torch.bool, device=device)
    bad_values, any_empty = torch.stack([nonbinary, empty_rows.any()]).tolist()
    if bad_values:
        raise ValueError(f"{name} {tuple(mask.shape)} must hold only 0/1 (or bools)")
    if any_empty:
        rows = torch.nonzero(empty_rows).flatten().tolist()
        raise ValueError(f"{name} {tuple(mask.shape)}: sequence(s) {rows} have no real tokens; "
                         "their routing distribution is undefined (drop them from the batch)")


def _as_layer_list(router_logits):
    if torch.is_tensor(router_logits):
        if router_logits.dim() != 4:
            raise ValueError(f"router_logits as one tensor must be stacked (B, L, T, E); got {tuple(router_logits.shape)}. "
                             "Pass out.router_logits: a tuple with one (B, T, E) tensor per MoE layer.")
        return list(router_logits.unbind(1))
    logits_list = list(router_logits)
    if not logits_list:
        raise ValueError("router_logits is empty: the model returned no MoE layers")
    for l, x in enumerate(logits_list):
        if not torch.is_tensor(x) or x.dim() != 3 or not x.is_floating_point():
            hint = " (flattened (B*T, E)? reshape to (B, T, E))" if torch.is_tensor(x) and x.dim() == 2 else ""
            raise ValueError(f"router_logits[{l}] must be a (B, T, E) float tensor; got "
                             f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)}{hint}")
        if x.shape != logits_list[0].shape or x.device != logits_list[0].device:
            raise ValueError(f"router_logits[{l}] {tuple(x.shape)} on {x.device} differs from router_logits[0] "
                             f"{tuple(logits_list[0].shape)} on {logits_list[0].device}: every MoE layer sees the same tokens")
    if logits_list[0].shape[-1] == 0:
        raise ValueError(f"router_logits have E = 0 experts: {tuple(logits_list[0].shape)}")
    return logits_list


def _as_int(name, x):
    if isinstance(x, bool):
        raise ValueError(f"{name} must be an int, got bool {x}")
    try:
        return operator.index(x)  # ints, numpy ints, 0-dim integer tensors
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(x).__name__} {x!r}") from None


def _layer_indices(layers, L):
    if isinstance(layers, (int, str)) or torch.is_tensor(layers) and layers.dim() == 0:
        raise ValueError(f"layers must be an iterable of layer indices, e.g. layer_band(7, 34); got {layers!r}")
    idx = [_as_int("layers entry", l) for l in layers]
    if not idx:
        raise ValueError("layers is empty: choose at least one layer to align")
    bad = [l for l in idx if not 0 <= l < L]
    if bad:
        raise ValueError(f"layers {bad} out of range: the distributions have L = {L} layers (valid 0..{L - 1})")
    if len(set(idx)) != len(idx):
        raise ValueError(f"layers {idx} contain duplicates: each layer would be counted twice")
    return idx
