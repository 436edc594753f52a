"""
Stage 2 of SARA (docs/method.md): the anchors. One pass of the ORIGINAL model -- eval mode, no
grad, before any fine-tuning -- over the anchor (e.g. English) side of every training sample gives
each sample one pooled routing distribution per MoE layer, (L, E). They are the constants that
the SARA loss pulls the target-language routing towards, computed once and cached on disk.

    forward_and_pool(model, sequences, *, pad_id, batch_size, labels=None, autocast=None, device=None,
                     before_batch=None) -> Pooled(nll, n_targets, routing)
        The one "run a model over a list of sequences and pool its routing" helper (training
        evaluation, stage 2, the routing analysis, the experiments). sequences: N lists of token
        ids; labels: None or N lists of the same lengths (-100 = not a target; position t's logits
        predict labels[t + 1]); before_batch(slice) is called before the forward of sequences[slice].
        Runs in eval mode with no grad (the model's mode is restored),
        batch_size sequences at a time, in the given order, right-padded.
        nll: None, or (N,) float64 CPU, the summed next-token NLL of each sequence's targets;
        n_targets: None, or (N,) long, how many targets each has (nll / n_targets = its mean CE);
        routing: (N, L, E) fp32 CPU, the pooled dense routing of every sequence (sara_loss.pool_routing).
    anchor_fingerprint(model_digest, tokenizer_fingerprint, examples) -> str
    build_anchors(model, examples, *, pad_id, batch_size, rank=0, world=1, autocast=None, device=None)
        -> {sample id: (L, E) fp32 CPU}   (every rank returns all of them)
    load_or_build_anchors(path, model, examples, *, fingerprint, pad_id, batch_size, rank=0, world=1,
                          autocast=None, device=None, log=print) -> {sample id: (L, E)}
    lookup_anchors(anchors, examples, like) -> ((B, L, E) anchor distributions, (B,) bool has_anchor)

`examples` are data/parallel.py's tokenized samples ({"id", "anchor_input_ids", "has_anchor", ...}).
A sample without an anchor has no entry, never a made-up one: lookup_anchors marks it, and the
SARA loss leaves it out.
"""
import hashlib
import json
import math
import os
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from data.parallel import collate
from sara_loss import pool_routing

_NLL_CHUNK = 1024  # tokens per lm_head call when computing NLL: (1024, V) logits at a time


class Pooled(NamedTuple):
    nll: Optional[torch.Tensor]  # (N,) float64, summed NLL over each sequence's targets, or None
    n_targets: Optional[torch.Tensor]  # (N,) long, or None
    routing: torch.Tensor  # (N, L, E) fp32


def _inner(model):
    """The MoETransformer inside DDP / torch.compile wrappers (FSDP2 wraps in place)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@torch.no_grad()
def forward_and_pool(model, sequences, *, pad_id, batch_size, labels=None, autocast=None, device=None,
                     before_batch=None):
    """See the module docstring."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if labels is not None and [len(x) for x in labels] != [len(s) for s in sequences]:
        raise ValueError("labels must have one list per sequence, of the same length")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("forward_and_pool: an empty sequence has no routing to pool")
    device = device or next(model.parameters()).device
    autocast = autocast if autocast is not None else nullcontext()
    lm_head = _inner(model).lm_head
    was_training = model.training
    model.eval()
    nll, n_targets, routing = [], [], []
    for start in range(0, len(sequences), batch_size):
        rows = [dict(input_ids=s) for s in sequences[start:start + batch_size]]
        if labels is not None:
            for r, lab in zip(rows, labels[start:start + batch_size]):
                r["labels"] = lab
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        if before_batch is not None:  # e.g. ShifCon's hook learns the rows' languages
            before_batch(slice(start, start + len(rows)))
        # one sequence has no padding: no mask lets attention use its fused causal kernel
        mask = batch["attention_mask"] if len(rows) > 1 else None
        with autocast:
            out = model(batch["input_ids"], attention_mask=mask, return_hidden=True)  # no (B, T, V) logits
            if labels is not None:
                targets_BT = batch["labels"][:, 1:]  # position t predicts token t + 1
                h_BTH = out.hidden[:, :-1]
                for b in range(len(rows)):
                    total = torch.zeros((), dtype=torch.float64, device=device)
                    for s in range(0, h_BTH.shape[1], _NLL_CHUNK):
                        logits = lm_head(h_BTH[b, s:s + _NLL_CHUNK]).float()  # (chunk, V)
                        total += F.cross_entropy(logits, targets_BT[b, s:s + _NLL_CHUNK], ignore_index=-100,
                                                 reduction="sum").double()
                    nll.append(total)
                n_targets.append((targets_BT != -100).sum(1))
        routing.append(pool_routing(out.router_logits, mask, check=False).float().cpu())  # (b, L, E)
    model.train(was_training)
    if hasattr(model, "reshard"):  # FSDP2 keeps the root's parameters gathered after a forward
        model.reshard()  # that no backward follows: free them again
    if labels is None:
        return Pooled(None, None, torch.cat(routing))
    return Pooled(torch.stack(nll).cpu(), torch.cat(n_targets).cpu(), torch.cat(routing))


# -----------------------------------------------------------------------------
# stage 2: build, fingerprint, cache

def anchor_fingerprint(model_digest, tokenizer_fingerprint, examples):
    """What the anchors depend on: the original model's weights, the tokenizer, and every anchor
    sequence (chat format and max_len included, since they are the token ids)."""
    h = hashlib.sha256()
    h.update(model_digest.encode())
    h.update(tokenizer_fingerprint.encode())
    for e in examples:
        if e["has_anchor"]:
            h.update(e["id"].encode())
            h.update(json.dumps(e["anchor_input_ids"]).encode())
    return h.hexdigest()[:16]


def build_anchors(model, examples, *, pad_id, batch_size, rank=0, world=1, autocast=None, device=None):
    """Pooled routing of `model` on the anchor side of every example that has one. Each rank does a
    share (batch_size at a time) and every rank gets all of them. Every rank runs the same number
    of forwards (FSDP's collectives need it): a rank with nothing left reruns a dummy."""
    with_anchor = [e for e in examples if e["has_anchor"]]
    mine = with_anchor[rank::world]
    n_rounds = -(-len(with_anchor) // (batch_size * world))
    result = {}
    for i in range(n_rounds):
        chunk = mine[i * batch_size:(i + 1) * batch_size]
        seqs = [e["anchor_input_ids"] for e in (chunk or with_anchor[:1])]
        routing = forward_and_pool(model, seqs, pad_id=pad_id, batch_size=len(seqs), autocast=autocast,
                                   device=device).routing
        result.update({e["id"]: d for e, d in zip(chunk, routing)})
    if world > 1:
        import torch.distributed as dist
        parts = [None] * world
        dist.all_gather_object(parts, result)
        result = {k: v for p in parts for k, v in p.items()}
    return result


# An anchor row is a distribution: pool_routing's softmax runs in fp32 even under bf16 autocast, and its
# rows sum to 1 within 1.2e-7 (measured on tests/test_anchors.py's model); 1e-3 flags a damaged value only.
_ROW_SUM_TOL = 1e-3


def _check_cached(path, cached, shape):
    """The cache file's contents as plain data, or a ValueError naming the file and the problem:
    every anchor a (L, E) float tensor of distributions (finite, >= 0, each layer's row sums to 1)."""
    if not (isinstance(cached, dict) and isinstance(cached.get("fingerprint"), str)
            and isinstance(cached.get("anchors"), dict)):
        raise ValueError(f"{path}: not an anchors file (expected {{'fingerprint': str, 'anchors': {{id: tensor}}}}); "
                         "delete it to rebuild")
    for key, d in cached["anchors"].items():
        if not (isinstance(key, str) and isinstance(d, torch.Tensor) and tuple(d.shape) == shape):
            raise ValueError(f"{path}: anchor of sample {key!r} is not a {shape} tensor; delete it to rebuild")
        if not d.is_floating_point():
            raise ValueError(f"{path}: anchor of sample {key!r} is a {d.dtype} tensor, not probabilities; "
                             "delete it to rebuild")
        if not torch.isfinite(d).all():
            raise ValueError(f"{path}: anchor of sample {key!r} holds NaN/Inf (the cache is corrupt, not the "
                             "data); delete it to rebuild")
        if (d < 0).any():
            raise ValueError(f"{path}: anchor of sample {key!r} holds negative probabilities (min {d.min().item():.3g}; "
                             "the cache is corrupt); delete it to rebuild")
        sums = d.double().sum(-1)  # (L,)
        if ((sums - 1).abs() > _ROW_SUM_TOL).any():
            layer = int((sums - 1).abs().argmax())
            raise ValueError(f"{path}: anchor of sample {key!r} is not a routing distribution (MoE layer {layer} "
                             f"sums to {sums[layer].item():.6g}, not 1; the cache is corrupt); delete it to rebuild")


def load_or_build_anchors(path, model, examples, *, fingerprint, pad_id, batch_size, rank=0, world=1,
                          autocast=None, device=None, log=print):
    """The cached anchors at `path` if their fingerprint matches, else built (build_anchors) and
    written atomically by rank 0. A cache that cannot be read, or holds a wrong shape or NaN, is an
    error naming the file (read with weights_only: a crafted file cannot run code)."""
    cfg = _inner(model).config
    shape = (len(cfg.moe_layers), cfg.n_experts)
    if os.path.exists(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":  # what torch.save writes: a zip archive
            raise ValueError(f"{path}: unreadable anchors cache (not a torch file: starts with {head!r}); "
                             "delete it to rebuild")
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: unreadable anchors cache ({type(err).__name__}: "
                             f"{(str(err).splitlines() or [''])[0]}); delete it to rebuild") from None
        _check_cached(path, cached, shape)
        if cached["fingerprint"] == fingerprint:
            # the same inputs, yet a sample without its anchor: it would silently leave the JS term
            missing = [e["id"] for e in examples if e["has_anchor"] and e["id"] not in cached["anchors"]]
            if missing:
                raise ValueError(f"{path}: no anchor for {len(missing)} samples that have one (e.g. {missing[:3]}; "
                                 "the cache is damaged); delete it to rebuild")
            log(f"anchors: {len(cached['anchors'])} loaded from {path}")
            return cached["anchors"]
        log(f"anchors: {path} is stale (fingerprint {cached['fingerprint']} != {fingerprint}); rebuilding")
    anchors = build_anchors(model, examples, pad_id=pad_id, batch_size=batch_size, rank=rank, world=world,
                            autocast=autocast, device=device)
    bad = [k for k, d in anchors.items() if not torch.isfinite(d).all()]
    if bad:
        raise ValueError(f"anchors: the original model's routing is NaN/Inf on the anchor side of samples "
                         f"{bad[:5]} (the model or its dtype, not the cache)")
    if rank == 0:
        from checkpoint import atomic_torch_save
        try:
            atomic_torch_save(dict(fingerprint=fingerprint, anchors=anchors), path)
        except OSError as err:  # (disk full: atomic_torch_save leaves no partial file)
            raise ValueError(f"{path}: writing the anchors cache failed ({err}); free disk space and rerun "
                             "(they will be rebuilt)") from None
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    return anchors


def lookup_anchors(anchors, examples, like):
    """(B, L, E) anchor distributions for a micro-batch, on like's device (NaN rows where a sample
    has none), and the (B,) bool mask of the samples that have one. like: a (B, L, E) tensor."""
    rows, has = [], []
    for e in examples:
        a = anchors.get(e["id"]) if e["has_anchor"] else None
        rows.append(a if a is not None else torch.full(like.shape[1:], math.nan))
        has.append(a is not None)
    return torch.stack(rows).to(like.device), torch.tensor(has, device=like.device)
