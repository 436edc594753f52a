"""Live-English routing alignment with KL: the routing-alignment baseline of Bandarkar et al. 2026,
"Cross-Lingual Alignment for Decoder-Only Models using MoE Routers" (public code:
github.com/lucasbandarkar/xl_moe_alignment, contrastive_training/contrastive_trainer.py and train.py).
The paper text could not be read; everything here follows the authors' public code.

How it differs from SARA (sara_loss.py): the English side is LIVE. Each target-language sequence and
its English source go through the model being trained in the same step, and the gradient of the
alignment term flows into BOTH sides; there is no frozen original model and no stored anchor. The
divergence is a one-sided KL, not a Jensen-Shannon divergence, and it is scaled by a large constant.

Notation: B paired sequences, T tokens (target and English may have different T), L MoE layers (a
position in out.router_logits, as in sara_loss), E experts; l ranges over the band's layers.

Per band layer l and pair b, in our words:
    q_b,l  = mean over the real (non-pad) tokens of softmax(router logits)   (pooled as SARA's eq. 1-2, 6-7)
    q'     = q / (Σ_e q_e + 1e-9)                                            (their renormalisation)
    KL_b,l = Σ_e q'_en,e · (log q'_en,e − log(q'_target,e + 1e-9))           (0·log 0 = 0)
    L_KL   = mean over l of (Σ_b KL_b,l / B)      -- F.kl_div(log(q_t + 1e-9), q_en, 'batchmean')
    L      = L_CE(target side only) + 200 · α · L_KL
The 200 is their fixed multiplier for router-space alignment; α is their `--contrastive_alpha`.

Defaults of the authors' code (named constants below):
- α = 0.1 (ALPHA): the value of their launch examples (0.1-0.2); the argparse default is 1.0.
- The band is 1-indexed and inclusive in their command line (`--min_layer 7 --max_layer 19` for
  Marco-Nano, 4-17 for gpt-oss-20b); in our 0-based positions that is layer_band(min - 1, max - 1).
- Freezing (`--freezing_mode`, default 0), see trainable_parameter_names: 0 "early_layers" (train
  only the layers up to the band's end), 1 "routers" (the routers up to the band's end only),
  2 "none" (nothing frozen).
- lr 1e-6 (6e-7 to 1.2e-6 in examples), warmup-stable-decay, effective batch 32, one epoch of 200k
  pairs, AdamW β2 0.99, gradient clipping 1.0, pure bf16.

Decisions (ours):
- Pooling reuses sara_loss.pool_routing: softmax and pooling in fp32 whatever the logits' dtype (their
  code takes the softmax in the model dtype, bf16). Every other operation is theirs, eps included.
- Their multi-GPU workaround that also unfreezes embeddings, every norm and lm_head in "routers" mode
  (to keep FSDP's root module trainable) is not reproduced: it changes which weights the method trains.
"""

import re

from sara_loss import _kl, _layer_indices, pool_routing

ALPHA = 0.1  # their launch examples; their argparse default is 1.0
KL_MULTIPLIER = 200.0  # their fixed scale of the router-space term
EPS = 1e-9  # their epsilon, both in the renormalisation and inside the log
FREEZE_MODES = ("early_layers", "routers", "none")  # their --freezing_mode 0, 1, 2

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # decoder-layer index in a parameter name
_ROUTER = ".mlp.router."  # MoE.router (router.py): its gate linear holds the router weight W_g


# -----------------------------------------------------------------------------
# the loss

def renormalise(pooled_BLE):
    """q / (Σ_e q_e + 1e-9), as their code does after pooling (a no-op up to ~1e-9 for softmax means)."""
    return pooled_BLE / (pooled_BLE.sum(-1, keepdim=True) + EPS)


def kl_batchmean(english_BlE, target_BlE):
    """Per layer: Σ_b KL(q_en ‖ q_target + 1e-9) / B, i.e. F.kl_div(log(q_t + 1e-9), q_en, 'batchmean').

    english_BlE, target_BlE: (B, l, E) renormalised pooled routing. Returns (l,).
    Exact 0·log 0 = 0 with a finite gradient where q_en has an exact 0 (sara_loss._kl).
    """
    return _kl(english_BlE, target_BlE + EPS).sum(0) / english_BlE.shape[0]


def live_kl(target_logits, target_mask, english_logits, english_mask, layers, *, check=True):
    """L_KL: mean over the band's layers of the batch-mean KL(q_English ‖ q_target).

    target_logits, english_logits: out.router_logits of the model being trained on the target
        sequences and on their English sources (L x (B, T, E) each; T may differ between the two).
        Neither side is detached: the gradient flows into both, as in the authors' code.
    target_mask, english_mask: (B, T) 1 = real token, 0 = padding (None = all real).
    layers: positions in router_logits to align (e.g. sara_loss.layer_band(6, 18) for their 7..19).
    Returns a 0-dim tensor, fp32 (float64 for float64 logits).
    """
    L = len(target_logits)
    if len(english_logits) != L:
        raise ValueError(f"target_logits has {L} layers but english_logits has {len(english_logits)}")
    idx = _layer_indices(layers, L)
    target_BlE = renormalise(pool_routing([target_logits[l] for l in idx], target_mask, check=check))
    english_BlE = renormalise(pool_routing([english_logits[l] for l in idx], english_mask, check=check))
    if target_BlE.shape != english_BlE.shape:
        raise ValueError(f"pooled target routing {tuple(target_BlE.shape)} and English routing "
                         f"{tuple(english_BlE.shape)} differ: pass B pairs with the same experts on both sides")
    return kl_batchmean(english_BlE, target_BlE).mean()


def live_kl_loss(ce, kl, alpha=ALPHA):
    """L = L_CE + 200 · α · L_KL (CE on the target side only)."""
    return ce + KL_MULTIPLIER * alpha * kl


# -----------------------------------------------------------------------------
# which parameters train

def router_parameter_names(model, up_to_layer=None):
    """Names of the router parameters (the gate linear W_g of every MoE layer, `layers.i.mlp.router.gate.weight`),
    of the decoder layers i <= up_to_layer when given. Dense (mlp-only) layers have none."""
    return [name for name, _ in model.named_parameters()
            if _ROUTER in "." + name and (up_to_layer is None or _layer_of(name) <= up_to_layer)]


def trainable_parameter_names(model, mode="early_layers", band_end=None):
    """The parameters the authors' code leaves trainable, by name, in model.named_parameters() order.

    mode: "early_layers" (their --freezing_mode 0, the default): every parameter of the decoder
        layers 0..band_end, plus, of layer band_end + 1, the router and every parameter whose name
        contains "att" (self_attn.* and post_attention_layernorm, exactly as their substring test
        does); embeddings, the final norm and lm_head are frozen.
          "routers" (mode 1): the routers of layers 0..band_end only.
          "none" (mode 2): everything.
    band_end: the last decoder layer of the band, 0-based (their --max_layer minus 1). Required
        unless mode is "none".
    """
    names = [name for name, _ in model.named_parameters()]
    if mode == "none":
        return names
    if mode not in FREEZE_MODES:
        raise ValueError(f"freezing mode {mode!r} is not one of {FREEZE_MODES}")
    n_layers = 1 + max((_layer_of(n) for n in names if _layer_of(n) is not None), default=-1)  # wrappers too
    if isinstance(band_end, bool) or not isinstance(band_end, int) or not 0 <= band_end < n_layers:
        raise ValueError(f"band_end must be a decoder-layer index in 0..{n_layers - 1} for mode {mode!r}; got {band_end!r}")
    if mode == "routers":
        return router_parameter_names(model, up_to_layer=band_end)
    out = []
    for name in names:
        layer = _layer_of(name)
        if layer is None or layer > band_end + 1:
            continue
        if layer <= band_end or _ROUTER in "." + name or "att" in name:
            out.append(name)
    return out


def _layer_of(name):
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None
