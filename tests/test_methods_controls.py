"""Tests for methods/controls.py: the frozen-router names and the mismatched-anchor derangement."""

import pytest
from hypothesis import given, settings, strategies as st

from methods.controls import frozen_router_names, mismatched_anchor_ids, mismatched_rows
from model import MoEConfig, MoETransformer

SMALL = dict(vocab_size=32, hidden_size=16, n_layers=3, n_heads=2, n_kv_heads=1, moe_intermediate_size=8,
             intermediate_size=16)


def test_frozen_router_names_are_every_moe_gate():
    model = MoETransformer(MoEConfig(**SMALL, n_experts=4, top_k=2, mlp_only_layers=(1,)))
    assert frozen_router_names(model) == ["layers.0.mlp.router.gate.weight", "layers.2.mlp.router.gate.weight"]
    dense = MoETransformer(MoEConfig(**SMALL, n_experts=4, top_k=2, mlp_only_layers=(0, 1, 2)))
    with pytest.raises(ValueError, match="no MoE layer"):
        frozen_router_names(dense)


@st.composite
def group_lists(draw):
    """Group keys where no group has more than half of the rows."""
    sizes = draw(st.lists(st.integers(1, 5), min_size=2, max_size=8))
    while 2 * max(sizes) > sum(sizes):
        sizes.append(max(sizes))  # add groups until the largest is at most half
    keys = [f"g{g}" for g, size in enumerate(sizes) for _ in range(size)]
    return draw(st.permutations(keys))


@settings(max_examples=80, deadline=None)
@given(group_lists(), st.integers(0, 10_000))
def test_mismatched_rows_is_a_permutation_that_never_keeps_the_item(keys, seed):
    perm = mismatched_rows(keys, seed)
    assert sorted(perm) == list(range(len(keys)))
    assert all(keys[perm[i]] != keys[i] for i in range(len(keys)))
    assert mismatched_rows(keys, seed) == perm  # deterministic


def test_mismatched_rows_depends_on_the_seed_and_handles_edges():
    keys = [f"item{i // 3}" for i in range(30)]  # 10 items x 3 languages
    assert mismatched_rows(keys, 0) != mismatched_rows(keys, 1)
    assert mismatched_rows([], 0) == []
    assert mismatched_rows(["a", "b"], 0) == [1, 0]
    with pytest.raises(ValueError, match="item 'a' has 3 of the 5 rows"):
        mismatched_rows(["a", "b", "a", "c", "a"], 0)


def row(group, lang, anchored=True):
    return {"id": f"{group}-{lang}", "lang": lang, "prompt": "", "response": "x", "anchor_lang": "en",
            "anchor_prompt": "" if anchored else None, "anchor_response": "y" if anchored else None}


def test_mismatched_anchor_ids_on_parallel_rows():
    rows = [row(f"udhr-a{a}-p1", lang) for a in range(4) for lang in ("sw", "hi")]
    rows.append(row("udhr-a9-p1", "te", anchored=False))
    mapping = mismatched_anchor_ids(rows, seed=1337)
    assert set(mapping) == {r["id"] for r in rows[:-1]}  # the row without an anchor gets none
    assert sorted(mapping.values()) == sorted(mapping)  # a permutation of the anchored rows
    for sid, src in mapping.items():
        assert sid.rsplit("-", 1)[0] != src.rsplit("-", 1)[0]  # never the same item (group)
    examples = [{"id": r["id"], "lang": r["lang"], "has_anchor": r["anchor_response"] is not None} for r in rows]
    assert mismatched_anchor_ids(examples, seed=1337) == mapping  # tokenized examples give the same map
