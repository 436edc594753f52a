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

As a training component (method=live_kl; docs/method.md, "Alignment methods"), class LiveKL(Component):
    prepare      nothing to precompute; train.py freezes what live_kl_freeze leaves frozen BEFORE wrapping
                 the model (trainable_parameter_names, band_end = the last layer of sara_band/sara_layer_list)
    extend_batch the English source (anchor_input_ids) of each anchored row of the micro-batch, labels all
                 -100: ONE forward of [target; English] (two forwards of a DDP module before one backward
                 break DDP's reducer), L_CE over the target rows only, gradients through both sides
    loss         {"kl": Term(L_KL, 200 α)}: a per-micro-batch mean over its pairs, as their batchmean is
    evaluate     val_kl and val_js (band mean): held-out target vs the CURRENT model's English
    (the other parts of methods/base.py: nothing; live_kl changes nothing at inference)
Where ours differs from a target-only forward: L_LB and L_z (means over every real token of the forward)
include the English tokens, which also go through the routers. α = 0 adds no rows and no term: plain
fine-tuning bit for bit (the KL is not logged then; it would cost a second forward).

Decisions (ours):
- Pooling reuses sara_loss.pool_routing: softmax and pooling in fp32 whatever the logits' dtype (their
  code takes the softmax in the model dtype, bf16). Every other operation is theirs, eps included.
- Their multi-GPU workaround that also unfreezes embeddings, every norm and lm_head in "routers" mode
  (to keep FSDP's root module trainable) is not reproduced: it changes which weights the method trains.
"""

import math
import re

import torch

from anchors import forward_and_pool
from data.parallel import IGNORE_INDEX
from sara_loss import _kl, _layer_indices, pool_routing, sara_loss
from methods.base import Component
from step_loss import Term

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


# -----------------------------------------------------------------------------
# the training component

class LiveKL(Component):
    """band: positions in out.router_logits (sara.band_positions); alpha: their α (the term's weight is 200 α)."""

    def __init__(self, band, alpha=ALPHA):
        self.band, self.alpha = band, alpha
        self.weight = KL_MULTIPLIER * alpha

    @classmethod
    def prepare(cls, run, band):
        return cls(band, run.s.live_kl_alpha)

    def extend_batch(self, micro):
        """The English sources of the micro-batch's anchored rows, in order; labels -100 (no CE on them)."""
        if self.weight == 0:
            return []
        return [dict(input_ids=e["anchor_input_ids"], labels=[IGNORE_INDEX] * len(e["anchor_input_ids"]))
                for e in micro if e["has_anchor"]]

    def loss(self, out, batch, net, run):
        n = len(batch["examples"])
        paired = [i for i, e in enumerate(batch["examples"]) if e["has_anchor"]]
        if self.weight == 0:
            return {}
        if not paired:  # no pair in this micro-batch: the term is 0 (no gradient)
            return dict(kl=Term(torch.zeros((), device=out.loss.device), self.weight))
        rows = torch.tensor(paired, device=out.loss.device)
        mask = batch["mask"]
        kl = live_kl([l[rows] for l in out.router_logits], None if mask is None else mask[rows],
                     [l[n:] for l in out.router_logits], None if mask is None else mask[n:], self.band, check=False)
        return dict(kl=Term(kl, self.weight))

    def evaluate(self, net, examples, pooled, run):
        """pooled: anchors.forward_and_pool of the model on the examples' target side; the English side
        is pooled here with the same (current) model."""
        has = [i for i, e in enumerate(examples) if e["has_anchor"]]
        if not has:
            return {}
        english = forward_and_pool(net, [examples[i]["anchor_input_ids"] for i in has], pad_id=run.pad_id,
                                   batch_size=run.s.micro_batch, autocast=run.autocast, device=run.dist.device).routing
        target = pooled.routing[has]
        idx = _layer_indices(self.band, target.shape[1])
        return dict(val_kl=kl_batchmean(renormalise(english[:, idx]), renormalise(target[:, idx])).mean().item(),
                    val_js=sara_loss(target, english, self.band, check=False).item())

    def describe(self, res):
        return f"  val KL(band) {res.get('val_kl', math.nan):.4f}  val JS(band, current English) {res.get('val_js', math.nan):.4f}"
