"""Tests for methods/steering.py: hand-computed examples, an explicit-loop reference for the statistics,
and hypothesis properties of the two logit rules."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from methods.steering import (chen_steer_logits, expert_counts, expert_frequencies, shared_expert_strengths,
                              steermoe_expert_signs, steermoe_steer_logits)

FAST = settings(max_examples=60, deadline=None)
F64 = torch.float64


# -----------------------------------------------------------------------------
# statistics

def test_expert_frequencies_hand_example():
    # one layer, E = 4, top-2; token 3 is padding and must not count
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0],     # -> experts 0, 1
                            [0.0, 5.0, 4.0, 1.0],     # -> experts 1, 2
                            [9.0, 0.0, 0.0, 8.0]]])   # padding
    mask = torch.tensor([[1, 1, 0]])
    counts, n = expert_counts([logits], mask, top_k=2)
    assert counts.tolist() == [[1, 2, 1, 0]] and n == 2
    assert expert_frequencies([logits], mask, 2).tolist() == [[0.5, 1.0, 0.5, 0.0]]
    assert expert_frequencies([logits], None, 2).tolist() == [[2 / 3, 2 / 3, 1 / 3, 1 / 3]]


def test_expert_frequencies_match_a_loop_over_tokens():
    g = torch.Generator().manual_seed(0)
    L, B, T, E, K = 3, 4, 6, 8, 3
    logits = [torch.randn(B, T, E, generator=g) for _ in range(L)]
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[:, 0] = 1
    ref = np.zeros((L, E))
    for l in range(L):
        for b in range(B):
            for t in range(T):
                if mask[b, t]:
                    for e in np.argsort(-logits[l][b, t].numpy())[:K]:
                        ref[l, e] += 1
    ref /= int(mask.sum())
    freq = expert_frequencies(logits, mask, K)
    np.testing.assert_allclose(freq.numpy(), ref, rtol=0, atol=1e-15)
    np.testing.assert_allclose(freq.sum(1).numpy(), K, rtol=1e-12)  # each token picks K experts


def test_expert_frequencies_errors():
    logits = [torch.zeros(1, 2, 4)]
    with pytest.raises(ValueError, match="top_k"):
        expert_counts(logits, None, 5)
    with pytest.raises(ValueError, match="attention_mask"):
        expert_counts(logits, torch.ones(1, 3), 2)
    with pytest.raises(ValueError, match="no real token"):
        expert_frequencies(logits, torch.zeros(1, 2), 2)


# -----------------------------------------------------------------------------
# (a) Chen et al.

def test_shared_expert_strengths_hand_example():
    # guides en, zh; one layer, E = 4, keep the top 2 per language
    freq = torch.tensor([[[0.5, 0.3, 0.2, 0.0]],    # en: keeps experts 0, 1
                         [[0.1, 0.3, 0.4, 0.2]]],   # zh: keeps experts 2, 1
                        dtype=F64)
    s = shared_expert_strengths(freq, top_n=2, threshold=0.7)
    # shares: en [1, .5, 0, 0], zh [0, .5, 1, 0] -> only expert 1 is shared (both below 0.7),
    # expert 3 is used by nobody after the top-2 cut; the strength is English's share
    assert s[0, 1].item() == pytest.approx(0.3 / (0.6 + 1e-10), rel=1e-15)
    assert s[0, [0, 2, 3]].tolist() == [0.0, 0.0, 0.0]
    # the 1e-10 in the denominator puts the 0.5 share just below 0.5: a threshold of 0.5 still counts it
    assert shared_expert_strengths(freq, top_n=2, threshold=0.5)[0, 1] > 0.49
    assert shared_expert_strengths(freq, top_n=2, threshold=0.45)[0].tolist() == [0.0] * 4


def test_shared_expert_strengths_only_on_steered_layers():
    freq = torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],
                         [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]], dtype=F64)
    s = shared_expert_strengths(freq, layers=[1], top_n=2)
    assert s[1].tolist() == pytest.approx([0.5, 0.5]) and s[[0, 2]].abs().sum() == 0


def test_chen_rule_hand_example():
    z = torch.tensor([[1.0, -2.0, 3.0, -4.0]], dtype=F64)
    s = torch.tensor([0.0, 0.5, 0.25, 0.0], dtype=F64)
    out = chen_steer_logits(z, s, lam=0.1)
    assert out[0].tolist() == pytest.approx([1.0, -2.0 + 0.1 * 0.5 * 2.0, 3.0 + 0.1 * 0.25 * 3.0, -4.0], rel=1e-15)


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=True)


@FAST
@given(st.integers(1, 4), st.integers(1, 8), st.data())
def test_chen_rule_with_zero_lambda_or_strength_is_the_identity_bit_for_bit(T, E, data):
    z = torch.tensor(data.draw(st.lists(st.lists(finite, min_size=E, max_size=E), min_size=T, max_size=T)))
    s = torch.tensor(data.draw(st.lists(st.floats(0, 1), min_size=E, max_size=E)))
    for out in (chen_steer_logits(z, s, lam=0.0), chen_steer_logits(z, torch.zeros(E), lam=0.3)):
        assert torch.equal(out.view(torch.int32), z.view(torch.int32))  # -0.0 stays -0.0
    steered = chen_steer_logits(z, s, lam=0.05)
    assert (steered >= z).all()  # λ, s >= 0 only ever raises a logit
    assert torch.equal(steered[:, s == 0].view(torch.int32), z[:, s == 0].view(torch.int32))


# -----------------------------------------------------------------------------
# (b) SteerMoE

def test_steermoe_signs_hand_example():
    a = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]], dtype=F64)
    b = torch.tensor([[0.1, 0.2, 0.5], [0.6, 0.1, 0.3]], dtype=F64)
    # differences [[.8, -.1, 0], [-.4, .7, 0]]: ranked (0,0) .8, (1,1) .7, (1,0) -.4, (0,1) -.1
    assert steermoe_expert_signs(a, b, 2, 1, top_k=1).tolist() == [[1, 0, 0], [-1, 1, 0]]
    assert steermoe_expert_signs(a, b, 1, 2, top_k=1).tolist() == [[1, -1, 0], [-1, 0, 0]]
    with pytest.raises(ValueError, match="only 2 have a positive"):
        steermoe_expert_signs(a, b, 3, 1, top_k=2)


def test_steermoe_caps_boosted_experts_at_top_k_per_layer():
    a = torch.tensor([[0.9, 0.8, 0.7, 0.0], [0.0, 0.0, 0.6, 0.0]], dtype=F64)
    b = torch.zeros(2, 4, dtype=F64)
    # the 3rd-ranked (0, 2) is skipped (layer 0 is full at K = 2); it does not pass its slot on
    assert steermoe_expert_signs(a, b, 4, 0, top_k=2).tolist() == [[1, 1, 0, 0], [0, 0, 1, 0]]


def test_steermoe_logits_hand_example():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=F64)
    signs = torch.tensor([0, 0, 1, -1], dtype=torch.int8)
    lse = math.log(math.exp(2) + math.exp(1) + 1 + math.exp(-1))
    lp = [2 - lse, 1 - lse, 0 - lse, -1 - lse]
    assert steermoe_steer_logits(z, signs)[0].tolist() == pytest.approx([lp[0], lp[1], lp[0] + 0.01, lp[3] - 0.01],
                                                                     rel=1e-14)
    bf16 = steermoe_steer_logits(z.to(torch.bfloat16), signs)
    assert bf16.dtype == torch.float32  # computed and returned in fp32, not bf16


@FAST
@given(st.integers(1, 5), st.integers(2, 12), st.data())
def test_steermoe_boosted_always_in_top_k_and_suppressed_never(T, E, data):
    K = data.draw(st.integers(1, E - 1))
    z = torch.tensor(data.draw(st.lists(st.lists(st.floats(-60, 60), min_size=E, max_size=E), min_size=T, max_size=T)))
    signs = torch.tensor(data.draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=E, max_size=E)), dtype=torch.int8)
    boosted = (signs > 0).nonzero().flatten().tolist()[:K]  # at most K boosted, as the signs function ensures
    signs[signs > 0] = 0
    signs[boosted] = 1
    chosen = steermoe_steer_logits(z, signs).topk(K, dim=-1).indices.tolist()
    suppressed = set((signs < 0).nonzero().flatten().tolist())
    for row in chosen:
        assert set(boosted) <= set(row)
        if E - len(suppressed) >= K:
            assert not suppressed & set(row)
