"""
The SARA comparison in the gated world (experiments/gated_world.py): NOT RUN YET. Its fine-tuning step,
`train_steps` below, is a placeholder until the product's training loop (train.py, being restructured) can be
called from here; everything around it -- base models, anchors, identical batches, measurement -- is written and
tested (tests/test_gated_world.py runs it with a stand-in train_steps).

Declared before any run (experiments/results/gated_world/report.md): from one base model per seed, in the world
of beta = COMPARE["beta"], on identical batches of the bridge entities' target-language Q/A:
    (a) plain   CE + lambda_LB * LB                       (lambda_JS = 0)
    (b) band    (a) + lambda_JS * L_JS on the middle band (SARA, eq. 9; anchors = the base model's pooled routing of
                each row's English version under the English prior)
PRIMARY endpoint: target accuracy on test-entity facts, (b) - (a), one difference per seed, paired t interval over
the seeds (stats.t_interval). Manipulation check: band JS(target || English) on the test questions, (b) < (a).
"""
import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gated_world as G  # noqa: E402  (puts the repository root on sys.path)
import stats  # noqa: E402
from model import MoEConfig, MoETransformer  # noqa: E402
from router import intervene  # noqa: E402
from sara_loss import pool_routing  # noqa: E402

COMPARE = dict(beta=2.0, seeds=[0, 1, 2, 3, 4], finetune_epochs=10, finetune_batch=32, finetune_lr=3e-3,
               lambda_js=1.5)
CONDITIONS = ("plain", "band")


def train_steps(model, batches, anchors, *, lambda_js, band, prior, settings):
    """THE ONE PLACEHOLDER: fine-tune `model` in place, one optimizer step per batch. batches: lists of
    gated_world.finetuning_rows (ids, labels, anchor_ids); anchors: list per batch of (B, L, E) pooled anchor
    routing; loss CE + lambda_LB * LB + lambda_JS * L_JS over `band` (sara_loss.sara_loss), every forward under
    gated_world.language_prior([row langs], prior, cfg). To be replaced by a call into the product's training
    step once train.py's loop is restructured."""
    raise NotImplementedError("gated_sara.train_steps is a placeholder: the SARA comparison waits for the "
                              "product's training loop (see experiments/gated_sara.py)")


def finetune_order(n_rows, compare, seed):
    """Row indices of each fine-tuning step: the same for every condition of a seed."""
    rng = np.random.default_rng(3000 + seed)
    B, steps = compare["finetune_batch"], []
    for _ in range(compare["finetune_epochs"]):
        perm = rng.permutation(n_rows)
        steps += [perm[i:i + B] for i in range(0, n_rows - B + 1, B)]
    return steps


@torch.no_grad()
def anchor_routing(model, rows, prior):
    """(N, L, E) pooled routing (eq. 1-2) of each row's English version, under the English prior."""
    ids, mask = G.collate([r["anchor_ids"] for r in rows])
    with intervene(model, G.language_prior(["en"] * len(rows), prior, model.config)):
        return pool_routing(model(ids, attention_mask=mask).router_logits, mask)


def compare_seed(settings, compare, seed, train=None):
    """One seed: base model in the world of compare["beta"], then each condition from it on identical batches.
    train: the training function (default train_steps). -> dict(seed, per condition: measure(...) record)."""
    train = train or train_steps
    vocab = G.make_vocab(settings)
    world = G.build_world(settings, seed, vocab)
    s = world["split"]
    en, tgt = G.pretraining_rows(world, vocab)
    ft = G.finetuning_rows(world, vocab, s["bridge"])
    G.check_splits(world, vocab, en, tgt, ft)
    torch.manual_seed(seed)
    model = MoETransformer(MoEConfig(vocab_size=len(vocab.itos), **settings["model"]))
    prior = G.world_prior(settings, compare["beta"], model.config)
    G.pretrain(model, en, tgt, settings, seed, prior)
    items = sum((G.eval_items(world, vocab, s[k], k) for k in ("test", "shared", "control")), [])
    anchors = anchor_routing(model, ft, prior)  # the ORIGINAL model's, once
    band = [l for l in model.config.moe_layers if 0 < l < model.config.n_layers - 1]
    order = finetune_order(len(ft), compare, seed)
    base = copy.deepcopy(model.state_dict())
    out = dict(seed=seed, band_layers=band, base=G.measure(model, items, prior, seed))
    for cond in CONDITIONS:
        model.load_state_dict(base)
        batches = [[ft[j] for j in idx] for idx in order]
        train(model, batches, [anchors[torch.as_tensor(idx)] for idx in order],
              lambda_js=compare["lambda_js"] if cond == "band" else 0.0, band=band, prior=prior, settings=settings)
        model.eval()
        out[cond] = G.measure(model, items, prior, seed)
    return out


def primary(records):
    """records: compare_seed results -> the declared primary contrast (b) - (a) of target accuracy over seeds."""
    d = np.array([r["band"]["tgt"] - r["plain"]["tgt"] for r in records])
    return dict(per_seed=d.tolist(), **stats.t_interval(d))
