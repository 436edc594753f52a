"""
SARA as a training component (docs/method.md, "Alignment methods"): the equations are in sara_loss.py,
this file wires them into the loop.

    prepare  the anchors: the ORIGINAL model's pooled routing on each sample's English (anchor) side,
             eval mode, no grad, computed once and cached (anchors.py); or "online" (an ablation: the
             current model's routing, recomputed at every micro-batch)
    loss     {"js": λ_JS · L_JS}: eq. 9 over the band, the mean over EVERY anchored sample of the step
             (all micro-batches and ranks), so that a micro-batch without anchors does not dilute λ_JS
    evaluate val_js (band mean) and val_js_per_layer on the held-out samples that have an anchor
    (the other parts of methods/base.py: nothing; SARA changes training only, not inference)

λ_JS = 0 is plain fine-tuning: the term is computed and logged, never differentiated (step_loss.py).
"""
import math

import torch

from anchors import anchor_fingerprint, build_anchors, load_or_build_anchors, lookup_anchors
from configurator import ConfigError
from sara_loss import layer_band, layer_divergence, moe_positions, pool_routing, sara_loss
from methods.base import Component
from step_loss import Term


def band_positions(s, sources, moe_layers):
    """-> (decoder layers of the band, their positions in out.router_logits), from sara_layer_list or
    the inclusive sara_band; a layer that is not an MoE layer is a ConfigError naming the setting."""
    try:
        layers = list(s.sara_layer_list) or list(layer_band(*s.sara_band))
        return layers, moe_positions(moe_layers, layers)
    except ValueError as err:
        key = "sara_layer_list" if s.sara_layer_list else "sara_band"
        raise ConfigError(f"{key}={getattr(s, key)!r} ({sources[key]}): {err}") from None


def check_anchors(s, train_set):
    """A method that reads the English side needs anchors (SARA with λ_JS > 0, live_kl with α > 0,
    ShifCon): fewer than min_anchor_fraction of the training samples with one is an error (before any
    model is loaded) that gives the count per language; so is, for ShifCon, a language with none."""
    n_anchored = sum(e["has_anchor"] for e in train_set)
    needs = dict(sara=s.lambda_js > 0, live_kl=s.live_kl_alpha > 0, shifcon=True)[s.method]
    without = [l for l in s.train_langs if not any(e["has_anchor"] and e["lang"] == l for e in train_set)]
    if s.method == "shifcon" and without:
        raise ConfigError(f"ShifCon needs each language's pairs for its language vector: {without} have no training "
                          f"sample with an anchor in anchor_lang={s.anchor_lang!r}; drop them from train_langs")
    if needs and n_anchored < max(1, s.min_anchor_fraction * len(train_set)):
        by_lang = {l: (sum(e["has_anchor"] for e in train_set if e["lang"] == l), sum(e["lang"] == l for e in train_set))
                   for l in s.train_langs}
        raise ConfigError(f"{dict(sara='SARA', live_kl='live_kl', shifcon='ShifCon')[s.method]} needs anchors: {n_anchored} of {len(train_set)} training samples have an anchor in "
                          f"anchor_lang={s.anchor_lang!r} (per language, with/total: {by_lang}; min_anchor_fraction="
                          f"{s.min_anchor_fraction}). Check anchor_lang against the data, or set lambda_js=0 (method='sara') for plain fine-tuning.")


class Sara(Component):
    """anchors: {sample id: (L, E) pooled routing of the original model on its anchor}, or "online";
    band: positions in out.router_logits (band_positions); weight: λ_JS."""

    def __init__(self, anchors, band, weight):
        self.anchors, self.band, self.weight = anchors, band, weight
        self.n_anchored = 0

    @classmethod
    def prepare(cls, run, model, examples, band, cache_path, model_digest, tok_digest):
        """Stage 2: the anchors of every example (train + val) from `model`, the ORIGINAL model, before any
        fine-tuning; cached at cache_path under a fingerprint of model, tokenizer and anchor sequences."""
        if run.s.anchor_mode == "online":
            return cls("online", band, run.s.lambda_js)
        try:
            anchors = load_or_build_anchors(
                cache_path, model, examples, pad_id=run.pad_id, batch_size=run.s.micro_batch,
                fingerprint=anchor_fingerprint(model_digest, tok_digest, examples), rank=run.dist.rank,
                world=run.dist.world, autocast=run.autocast, device=run.dist.device, log=run.log)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        return cls(anchors, band, run.s.lambda_js)

    def _table(self, net, examples, run, batch_size):
        if self.anchors != "online":
            return self.anchors
        return build_anchors(net, examples, pad_id=run.pad_id, batch_size=batch_size, autocast=run.autocast,
                             device=run.dist.device)

    def begin_step(self, micro_batches, run):
        """The step's count of anchored samples over all micro-batches (and ranks): L_JS's denominator."""
        self.n_anchored = sum(e["has_anchor"] and (self.anchors == "online" or e["id"] in self.anchors)
                              for m in micro_batches for e in m)

    def loss(self, out, batch, net, run):
        target_dist = pool_routing(out.router_logits, batch["mask"], check=False)  # (B, L, E)
        anchor_dist, has = lookup_anchors(self._table(net, batch["examples"], run, len(batch["examples"])),
                                         batch["examples"], target_dist)
        with torch.set_grad_enabled(self.weight > 0):
            js_sum = sara_loss(target_dist, anchor_dist, self.band, anchor_mask=has, check=False, reduction="sum")
            # DDP/FSDP average gradients over ranks: scale by world so that the result is the sum
            # over every rank's anchored samples divided by their number
            js = js_sum / (max(self.n_anchored, 1) / run.dist.world)
        return dict(js=Term(js, self.weight, step_share=True))

    def evaluate(self, net, examples, pooled, run):
        """pooled: anchors.forward_and_pool of the model on the examples' target side."""
        anchor_dist, has = lookup_anchors(self._table(net, examples, run, run.s.micro_batch), examples, pooled.routing)
        if not has.any():  # the means are over samples that have an anchor
            return {}
        return dict(val_js=sara_loss(pooled.routing[has], anchor_dist[has], self.band, check=False).item(),
                    val_js_per_layer=[round(x, 5) for x in layer_divergence(anchor_dist[has], pooled.routing[has]).tolist()])

    def describe(self, res):
        return f"  val JS(band) {res.get('val_js', math.nan):.4f}  JS per MoE layer {res.get('val_js_per_layer')}"
