"""
Routers of a top-k Mixture-of-Experts layer, and the router losses.

Notation (shapes in comments): N tokens (batch and time flattened), H hidden size, E experts,
K experts chosen per token.

A router maps each token's hidden state h (H,) to
  - raw gate logits      h @ W_g^T            (E,)   <- what SARA pools (sara_loss.pool_routing)
  - top-k expert ids                          (K,)
  - top-k combine weights                     (K,)
Every router here takes x (..., H) and returns (weights (N, K), expert_ids (N, K), logits (..., E)),
N = the number of tokens, logits not a view (FSDP2 warns about views among a module's outputs); the MoE layer in
model.py does the rest. Both take an optional edit_logits (a function (..., E) -> (..., E), applied to the gate
logits before any expert is chosen): the hook of RoutingIntervention below. An edit may return a wider dtype than
the gate's (SteerMoE's fp32 log-probabilities of a bf16 model, methods/steering.py): the experts are chosen from
the edited logits as returned, and those are the logits the router returns; only the gate weights go back to the
gate's dtype, so the residual stream keeps the model's. (Rounding the edit back to bf16 made SteerMoE's
max + 0.01 tie with the maximum: tests/test_methods_steering_runtime.py, the bf16 test.) Two routers cover the
models SARA is applied to:
  - TopKRouter: softmax over ALL experts, then top-k, optionally renormalised over the chosen k
    (Qwen3-MoE, Mixtral, OLMoE).
  - SparseMixerRouter: Phi-3.5-MoE's "sparsemixer" top-2 (arXiv 2409.12136), which picks experts
    by argmax at inference and by Gumbel sampling in training, with a straight-through multiplier.
Numerics (dtype of each step) follow the released checkpoints' reference code exactly, so that
bf16 outputs are bit-identical to transformers' eager path (see docs/architectures.md).

RoutingIntervention / intervene (end of the file): one per-layer hook on model.MoE that can add a prior to the
router logits, rewrite them (steering rules), impose given experts and gate weights, randomise the routing,
remove the layer's output, or record what was routed. Analyses (evaluation/routing.py's routing oracle) and
experiments (experiments/gated_world.py's per-sequence language prior) go through it; with no intervention set
(the default) the layer runs exactly as without the hook, bit for bit (tests/test_routing_intervention.py).
"""
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn


class TopKRouter(nn.Module):
    """
    softmax(h W_g^T) over all E experts -> top-k -> (optional) renormalise over the k.
    softmax_after_topk=True (GPT-OSS): top-k of the logits, then softmax over the k chosen logits, in
    the logits' dtype, as transformers' GptOssTopKRouter does. (The same function as softmax -> top-k
    -> renormalise, up to rounding.) bias=True: the gate has a bias (GPT-OSS), and the returned logits
    include it: they are the raw logits the router ranks, h W_g^T + b, which SARA pools.
    """

    def __init__(self, hidden_size, n_experts, top_k, norm_topk_prob=True, bias=False, softmax_after_topk=False):
        super().__init__()
        self.gate = nn.Linear(hidden_size, n_experts, bias=bias)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.softmax_after_topk = softmax_after_topk

    def forward(self, x, edit_logits=None):  # x: (..., H), e.g. (B, T, H) or (N, H)
        logits = self.gate(x)  # (..., E), model dtype, as the checkpoints do
        dtype = logits.dtype  # the gate weights' dtype: the experts' inputs stay in it
        if edit_logits is not None:  # an intervention: the experts are chosen from the edited logits, in THEIR
            logits = edit_logits(logits)  # dtype (an fp32 edit of a bf16 model is not rounded back: see the docstring)
        scores = logits.reshape(-1, logits.shape[-1])  # (N, E)
        if self.softmax_after_topk:
            top, expert_ids = torch.topk(scores, self.top_k, dim=-1)  # (N, K) each
            return torch.softmax(top, dim=-1).to(dtype), expert_ids, logits  # softmax in the logits' dtype
        # softmax over ALL experts in fp32 (float64 stays float64, for gradcheck)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # eq. 3: the K chosen experts, (N, K) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # eq. 4: gate weights over the chosen K
        return weights.to(dtype), expert_ids, logits


# -----------------------------------------------------------------------------
# Phi-3.5-MoE's sparsemixer

class _StraightThroughMultiplier(torch.autograd.Function):
    """
    Forward: the chosen expert's gate value g times a constant (1 if the sample agrees with the
    argmax or a coin says so, 1/3 otherwise -- the midpoint rule of the sparsemixer paper).
    Backward: g * (onehot(chosen) - masked_probs) * grad_out, the gradient of g as if the choice
    were fixed, WITHOUT the midpoint constant (this is the estimator Phi-3.5-MoE was trained with).
    """

    @staticmethod
    def forward(ctx, scores, gate_value, chosen, masked_probs, midpoint):
        # scores (N, E) only for autograd bookkeeping; gate_value, midpoint (N, 1); chosen (N, 1)
        ctx.save_for_backward(gate_value, chosen, masked_probs)
        return gate_value * midpoint

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (N, 1)
        gate_value, chosen, masked_probs = ctx.saved_tensors
        grad_out = grad_out * gate_value
        grad_scores = masked_probs * grad_out.mul(-1)  # (N, E)
        grad_scores.scatter_add_(dim=-1, index=chosen, src=grad_out)
        return grad_scores, None, None, None, None


def _sparsemixer_pick(scores, masked_scores, jitter_eps, training):
    """
    One round of sparsemixer. scores: (N, E) raw logits; masked_scores: scores with the experts
    already taken set to -inf. Returns (multiplier (N, 1), chosen (N, 1)).
    """
    with torch.no_grad():
        # Mask experts whose logit is relatively far below the best remaining one. Note the
        # relative distance is measured on the ORIGINAL scores also in round two (as released).
        top, top_id = masked_scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=top)
        far = ((top - scores) / factor) > (2 * jitter_eps)
    masked = masked_scores.masked_fill(far, float("-inf"))
    if training:  # Gumbel-max sampling from softmax(masked)
        gumbel = torch.empty_like(masked).exponential_().log()
        chosen = (masked - gumbel).max(dim=-1)[1].unsqueeze(-1)
    else:
        chosen = top_id
    masked_probs = torch.softmax(masked, dim=-1)  # model dtype, as released
    gate_value = masked_probs.gather(dim=-1, index=chosen)  # (N, 1)
    if not training:
        return gate_value, chosen
    # Heun's third-order midpoint: weight 1 if the sample is the argmax (or with prob. 1/4), else 1/3
    is_argmax = chosen == masked_probs.max(dim=-1, keepdim=True)[1]
    coin = torch.rand_like(gate_value) > 0.75
    midpoint = torch.add(0.3333, is_argmax | coin, alpha=0.6667).type_as(masked_probs)
    return _StraightThroughMultiplier.apply(scores, gate_value, chosen, masked_probs, midpoint), chosen


def sparsemixer(scores, jitter_eps, training):
    """Top-2 sparsemixer. scores: (N, E) -> weights (N, 2) (not renormalised), expert ids (N, 2)."""
    w1, id1 = _sparsemixer_pick(scores, scores, jitter_eps, training)
    masked_scores = torch.scatter(scores, -1, id1, float("-inf"))  # take expert 1 out
    w2, id2 = _sparsemixer_pick(scores, masked_scores, jitter_eps, training)
    return torch.cat((w1, w2), dim=-1), torch.cat((id1, id2), dim=-1)


class SparseMixerRouter(nn.Module):
    """Phi-3.5-MoE's router: a bias-free gate, top-2 by sparsemixer, optional input jitter."""

    def __init__(self, hidden_size, n_experts, top_k=2, jitter_eps=0.01, input_jitter=0.0, clean_logits=False):
        super().__init__()
        if top_k != 2:
            raise ValueError(f"sparsemixer is defined for top_k=2 only, got top_k={top_k}")
        self.gate = nn.Linear(hidden_size, n_experts, bias=False)
        self.top_k = top_k
        self.jitter_eps = jitter_eps
        self.input_jitter = input_jitter
        self.clean_logits = clean_logits

    def forward(self, x, edit_logits=None):  # x: (..., H), e.g. (B, T, H) or (N, H)
        clean = x
        if self.training and self.input_jitter > 0:
            # multiplicative noise U(1-j, 1+j) on the router input only (out of place, unlike
            # transformers 5.x, which jitters the shared hidden state in place and twice)
            x = x * torch.empty_like(x).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
        logits = self.gate(x)  # (..., E)
        dtype = logits.dtype  # the gate weights' dtype (an edit may return fp32: chosen from, weights cast back)
        if edit_logits is not None:  # an intervention: the experts are chosen from the edited logits
            logits = edit_logits(logits)
        weights, expert_ids = sparsemixer(logits.reshape(-1, logits.shape[-1]), self.jitter_eps, self.training)
        weights = weights.to(dtype)
        if self.clean_logits and x is not clean:
            # the returned logits (which the SARA term pools, and the router losses use) are those
            # of the un-jittered input: softmax(h W_g) exactly; the routing itself stays jittered
            logits = self.gate(clean)
            if edit_logits is not None:
                logits = edit_logits(logits)
        return weights, expert_ids, logits


# -----------------------------------------------------------------------------
# router losses

def load_balancing_loss(router_logits, top_k, attention_mask=None):
    """
    Switch/GShard load-balancing loss, summed over layers the way the checkpoints' code does it:
        aux = E * sum_e f_e * P_e
    f_e = fraction of (token, slot) assignments that went to expert e, counted over all layers
          (sums to K, not 1: each token contributes K assignments),
    P_e = mean router probability of expert e over all layers' tokens.
    The top-k here is the softmax top-k (also for sparsemixer models, as in transformers).
    router_logits: sequence of (B, T, E) or (N, E) tensors, one per MoE layer.
    attention_mask: (B, T), 1 = real token; padding tokens are excluded from both f and P.
    Returns a scalar fp32 tensor.
    """
    n_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    n_tokens = router_logits[0].numel() // n_experts
    if attention_mask is None:
        mask = torch.ones(n_tokens, device=device)
    else:
        mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)  # (N,)
    assignments = torch.zeros(n_experts, device=device)  # sum over layers of f_e numerators
    prob_mass = torch.zeros(n_experts, device=device)  # sum over layers of P_e numerators
    for layer_logits in router_logits:  # one layer at a time: memory O(N E), not O(L N E)
        # softmax in the logits' dtype, then fp32, as the checkpoints' code does (bf16 parity)
        probs = torch.softmax(layer_logits.reshape(-1, n_experts), dim=-1).float()
        chosen = torch.topk(probs, top_k, dim=-1)[1]  # (N, K)
        # scatter_add rather than bincount/one_hot: no host sync, no (N, K, E) tensor
        assignments = assignments.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
        prob_mass = prob_mass + (probs * mask[:, None]).sum(dim=0)
    n_rows = mask.sum() * len(router_logits)
    return n_experts * torch.sum((assignments / n_rows) * (prob_mass / n_rows))  # eq. 11: L_LB


def router_z_loss(router_logits, attention_mask=None):
    """
    The router z-loss of ST-MoE (Zoph et al. 2022, arXiv 2202.08906; ST-MoE's eq. 5, not SARA's): mean over real tokens of logsumexp(logits)^2,
    averaged over layers. Keeps gate logits small, which keeps the fp32/bf16 softmax stable.
    """
    n_experts = router_logits[0].shape[-1]
    logits = torch.stack([lg.reshape(-1, n_experts) for lg in router_logits]).float()  # (L, N, E)
    z = torch.logsumexp(logits, dim=-1) ** 2  # (L, N)
    if attention_mask is None:
        return z.mean()
    mask = attention_mask.reshape(-1).to(device=z.device, dtype=torch.float32)
    return (z * mask).sum() / (mask.sum() * z.shape[0])


# -----------------------------------------------------------------------------
# interventions on routing (model.MoE.intervention)

@dataclass
class RoutingIntervention:
    """
    A change to one MoE layer's routing, set as model.MoE.intervention (None: the layer is untouched). Steps, in
    the order the layer applies them (B sequences, T positions, E experts, K experts per token):
      1. logits   z <- z + logit_bias (any shape that broadcasts to (B, T, E): (B, 1, E) is a per-sequence
                  prior, (E,) one for every token), then z <- logit_fn(z) (a function (B, T, E) -> (B, T, E):
                  inference-time steering rules, e.g. z + lam * s_E * z.abs(), or raising chosen experts above
                  the token's maximum). The router chooses experts and gate weights from the edited z, and the
                  layer returns the edited z (what sara_loss pools and the router losses see).
      2. routing  where `where` (B, T) bool is True (default: every token) the chosen experts and weights are
                  replaced: by expert_ids (B, T, K) long and weights (B, T, K) (impose; weights as given, not
                  renormalised), or by K distinct experts drawn uniformly with the torch.Generator `randomise`
                  (the router's own K weights kept, in their order).
      3. output   remove_output=True: the layer adds nothing to the residual stream (its router still runs).
    record=True keeps the routing the experts ran with in .recorded = (expert_ids, weights), (B, T, K) each.
    Gradients flow through steps 1 and 3 as usual; imposed weights are constants.
    """
    logit_bias: torch.Tensor = None
    logit_fn: object = None
    expert_ids: torch.Tensor = None
    weights: torch.Tensor = None
    randomise: torch.Generator = None
    where: torch.Tensor = None
    remove_output: bool = False
    record: bool = False
    recorded: tuple = None

    def __post_init__(self):
        if (self.expert_ids is None) != (self.weights is None):
            raise ValueError("RoutingIntervention: give expert_ids and weights together (both (B, T, K)), or neither")
        if self.expert_ids is not None and self.randomise is not None:
            raise ValueError("RoutingIntervention: impose (expert_ids, weights) or randomise, not both")
        if self.logit_fn is not None and not callable(self.logit_fn):
            raise ValueError(f"RoutingIntervention: logit_fn must be a function (B, T, E) -> (B, T, E), "
                             f"got {type(self.logit_fn).__name__}")

    def edit_logits(self, logits):  # logits (B, T, E) -> (B, T, E); the router calls this before choosing
        if self.logit_bias is not None:
            try:
                fits = torch.broadcast_shapes(self.logit_bias.shape, logits.shape) == logits.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"RoutingIntervention.logit_bias has shape {tuple(self.logit_bias.shape)}, which "
                                 f"does not broadcast to the router logits {tuple(logits.shape)} (B, T, E)")
            logits = logits + self.logit_bias.to(device=logits.device, dtype=logits.dtype)
        if self.logit_fn is not None:
            edited = self.logit_fn(logits)
            if edited.shape != logits.shape:
                raise ValueError(f"RoutingIntervention.logit_fn returned shape {tuple(edited.shape)}, expected "
                                 f"{tuple(logits.shape)} (B, T, E)")
            logits = edited
        return logits

    def route(self, weights, expert_ids, B, T, n_experts):
        """The router's weights, expert_ids (N, K), N = B*T -> the ones the experts run with (N, K)."""
        K = expert_ids.shape[-1]
        new_w, new_ids = weights, expert_ids
        if self.expert_ids is not None:
            for name, t in (("expert_ids", self.expert_ids), ("weights", self.weights)):
                if tuple(t.shape) != (B, T, K):
                    raise ValueError(f"RoutingIntervention.{name} has shape {tuple(t.shape)}, expected (B, T, K) = "
                                     f"{(B, T, K)} (this layer's input and top_k)")
            ids = self.expert_ids.to(expert_ids.device)
            if ids.dtype.is_floating_point or bool(((ids < 0) | (ids >= n_experts)).any()):
                raise ValueError(f"RoutingIntervention.expert_ids must be integer ids in [0, {n_experts}); got "
                                 f"dtype {ids.dtype}, range [{ids.min().item()}, {ids.max().item()}]")
            new_ids = ids.reshape(B * T, K).long()
            new_w = self.weights.to(device=weights.device, dtype=weights.dtype).reshape(B * T, K)
        elif self.randomise is not None:
            draw = torch.rand(B * T, n_experts, generator=self.randomise, device=self.randomise.device)
            new_ids = draw.argsort(dim=-1)[:, :K].to(expert_ids.device)  # K distinct, uniformly
        if self.where is not None and new_ids is not expert_ids:
            if tuple(self.where.shape) != (B, T):
                raise ValueError(f"RoutingIntervention.where has shape {tuple(self.where.shape)}, expected (B, T) = {(B, T)}")
            keep_mine = ~self.where.to(expert_ids.device).reshape(B * T, 1).bool()
            new_ids = torch.where(keep_mine, expert_ids, new_ids)
            new_w = torch.where(keep_mine, weights, new_w)
        if self.record:
            self.recorded = (new_ids.detach().reshape(B, T, K), new_w.detach().reshape(B, T, K))
        return new_w, new_ids


def merge_intervention(edits, layer, **fields):
    """edits[layer] (an intervention a forward runs with anyway, e.g. a language prior) with `fields` set, or a
    new RoutingIntervention(**fields) if edits has none for that layer. edits: {layer: RoutingIntervention} or None."""
    base = (edits or {}).get(layer)
    return dataclasses.replace(base, **fields) if base is not None else RoutingIntervention(**fields)


@contextmanager
def intervene(model, by_layer):
    """with intervene(model, {decoder_layer_index: RoutingIntervention, ...}): set the interventions on those MoE
    layers, and on exit put back what was there before (normally None). Raises before setting anything if a
    layer does not exist or is not an MoE layer."""
    layers = model.layers
    moe = [i for i, b in enumerate(layers) if getattr(b, "is_moe", False)]
    for i, edit in by_layer.items():
        if i not in moe:
            raise ValueError(f"intervene: layer {i} is not an MoE layer of this model (MoE layers: {moe})")
        if not isinstance(edit, RoutingIntervention):
            raise ValueError(f"intervene: layer {i}: expected a RoutingIntervention, got {type(edit).__name__}")
    before = {i: layers[i].mlp.intervention for i in by_layer}
    try:
        for i, edit in by_layer.items():
            layers[i].mlp.intervention = edit
        yield model
    finally:
        for i, edit in before.items():
            layers[i].mlp.intervention = edit
