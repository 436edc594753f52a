"""Two controls for the claim that SARA helps BECAUSE it aligns routing.

(a) Routers frozen: fine-tune with the router weight W_g of every MoE layer fixed. If scores rise as
    much as with SARA, routing alignment is not what helps. NOTE: freezing W_g does not freeze the
    routing: the router's input h_t still changes with the layers below, and SARA's JS gradient still
    reaches it through them. The control removes the direct path only.
(b) Mismatched anchors: SARA with each target row's anchor replaced by the anchor of a row of ANOTHER
    item (never a parallel one). Same loss, same amount of routing pressure, wrong semantics: if it
    helps as much, the gain is not from matching parallel meaning.

The derangement (mismatched_rows): rows are grouped by item (data.parallel.group_key: the id without
its "-<lang>" suffix); groups are put in a seeded random order and each group's rows in a seeded
random order, giving one sequence of n rows in which every group is a contiguous block; row i of the
sequence takes the anchor of row (i + m) mod n, m = the largest group's size. A cyclic shift is a
permutation, and a shift by m >= any block's length lands outside the block as long as m <= n - m,
i.e. no item has more than half of the rows (otherwise no such permutation exists: an error).
"""

import random

from data.parallel import group_key as default_group_key
from methods.live_kl import router_parameter_names


def frozen_router_names(model):
    """The parameters the routers-frozen control freezes: every MoE layer's gate weight."""
    names = router_parameter_names(model)
    if not names:
        raise ValueError("the model has no MoE layer: there is no router to freeze")
    return names


def mismatched_rows(group_keys, seed):
    """perm: row i takes the anchor of row perm[i]; a permutation with group_keys[perm[i]] != group_keys[i]."""
    n = len(group_keys)
    blocks = {}
    for i, g in enumerate(group_keys):
        blocks.setdefault(g, []).append(i)
    if n == 0:
        return []
    largest = max(blocks, key=lambda g: len(blocks[g]))
    m = len(blocks[largest])
    if 2 * m > n:
        raise ValueError(f"item {largest!r} has {m} of the {n} rows (more than half): no row order can give "
                         "every row an anchor from another item")
    rng = random.Random(seed)
    groups = sorted(blocks)  # a fixed order before shuffling: the result depends on seed and data only
    rng.shuffle(groups)
    order = []
    for g in groups:
        rows = blocks[g][:]
        rng.shuffle(rows)
        order += rows
    perm = [0] * n
    for pos, row in enumerate(order):
        perm[row] = order[(pos + m) % n]
    return perm


def mismatched_anchor_ids(samples, seed, group_key=default_group_key):
    """{id: id of the row whose anchor it takes}, over the samples that have an anchor.

    samples: data/parallel.py rows (an anchor when anchor_response is not null) or tokenized
    examples (has_anchor). Rows without an anchor keep none. Remap stage 2's anchors with
    {i: anchors[j] for i, j in mismatched_anchor_ids(...).items()}.
    """
    anchored = [s for s in samples if (s["has_anchor"] if "has_anchor" in s else s.get("anchor_response") is not None)]
    perm = mismatched_rows([group_key(s) for s in anchored], seed)
    return {s["id"]: anchored[j]["id"] for s, j in zip(anchored, perm)}


def freeze(model, names):
    """requires_grad_(False) on the named parameters of model, BEFORE the loop builds its optimizer and
    before DDP/FSDP wrap the model (DDP registers the trainable parameters when it is built): a frozen
    parameter gets no gradient, AdamW skips it (weight decay included) and it stays bit-identical.
    An unknown name is an error. -> the number of parameters (tensors) frozen."""
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"freeze: no parameter named {unknown[:3]} in the model")
    for n in names:
        params[n].requires_grad_(False)
    return len(set(names))


def shuffled_anchors(anchors, examples, seed):
    """Control (b): stage 2's anchors {id: (L, E)} with each of `examples`' anchored rows given the anchor
    of a row of ANOTHER item (mismatched_anchor_ids, a derangement over items); rows not in `examples`
    (e.g. the held-out set, whose val_js then still measures the true pairs) keep their own."""
    mapping = mismatched_anchor_ids([e for e in examples if e["id"] in anchors], seed)
    return {**anchors, **{i: anchors[j] for i, j in mapping.items()}}
