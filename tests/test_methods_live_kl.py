"""Tests for methods/live_kl.py: float64 numpy/scipy references, torch's own kl_div as the authors
call it, gradcheck through both sides, and the three freezing modes on a tiny MoETransformer."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import rel_entr, softmax as np_softmax

from methods.live_kl import (ALPHA, KL_MULTIPLIER, live_kl, live_kl_loss, router_parameter_names,
                             trainable_parameter_names)
from model import MoEConfig, MoETransformer

F64 = torch.float64


def reference_live_kl(tgt_logits, tgt_mask, en_logits, en_mask, layers):
    """numpy float64, written from the equations: pooled softmax, renormalised, rel_entr."""
    per_layer = []
    for l in layers:
        def pooled(logits, mask):
            p = np_softmax(np.asarray(logits[l], np.float64), axis=-1)  # (B, T, E)
            m = np.asarray(mask, np.float64)[:, :, None]
            q = (p * m).sum(1) / m.sum(1)
            return q / (q.sum(-1, keepdims=True) + 1e-9)
        q_t, q_s = pooled(tgt_logits, tgt_mask), pooled(en_logits, en_mask)
        per_layer.append(rel_entr(q_s, q_t + 1e-9).sum() / q_s.shape[0])
    return float(np.mean(per_layer))


def make_pair(seed, B=3, Tt=5, Te=7, L=4, E=6, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    tgt = [torch.randn(B, Tt, E, generator=g, dtype=F64) * scale for _ in range(L)]
    en = [torch.randn(B, Te, E, generator=g, dtype=F64) * scale for _ in range(L)]
    tgt_mask = torch.ones(B, Tt, dtype=torch.long)
    tgt_mask[0, Tt - 2:] = 0  # right padding
    tgt_mask[1, :2] = 0  # left padding
    en_mask = torch.ones(B, Te, dtype=torch.long)
    en_mask[B - 1, Te - 2:] = 0
    return tgt, tgt_mask, en, en_mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_live_kl_matches_float64_reference(seed):
    tgt, tm, en, em = make_pair(seed)
    layers = [1, 2]
    got = live_kl(tgt, tm, en, em, layers)
    assert got.dtype == F64
    assert got.item() == pytest.approx(reference_live_kl(tgt, tm, en, em, layers), rel=1e-12, abs=1e-15)


def test_live_kl_equals_the_authors_kl_div_call():
    # their line: F.kl_div(torch.log(agg_tgt + 1e-9), agg_src, reduction='batchmean'), mean over layers
    tgt, tm, en, em = make_pair(3)
    def pooled(logits, mask):
        m = mask[:, :, None].to(F64)
        q = (torch.softmax(logits, -1) * m).sum(1) / m.sum(1).clamp(min=1)
        return q / (q.sum(-1, keepdim=True) + 1e-9)
    theirs = torch.stack([F.kl_div(torch.log(pooled(tgt[l], tm) + 1e-9), pooled(en[l], em), reduction="batchmean")
                          for l in (0, 1, 2, 3)]).mean()
    assert live_kl(tgt, tm, en, em, range(4)).item() == pytest.approx(theirs.item(), rel=1e-12)


def test_identical_sides_give_about_zero_and_divergent_sides_more():
    tgt, tm, _, _ = make_pair(4)
    same = live_kl(tgt, tm, [x.clone() for x in tgt], tm.clone(), [0, 3]).item()
    assert abs(same) < 1e-8  # only the 1e-9 inside the log separates it from 0
    sharp = [torch.zeros_like(x) for x in tgt]
    for x in sharp:
        x[..., 0] = 30.0  # every token routes to expert 0
    assert live_kl(tgt, tm, sharp, tm, [0]).item() > 0.5


def test_gradient_flows_into_both_sides_and_passes_gradcheck():
    tgt, tm, en, em = make_pair(5, B=2, Tt=3, Te=4, L=2, E=4)
    for x in tgt + en:
        x.requires_grad_(True)
    live_kl(tgt, tm, en, em, [0, 1]).backward()
    assert all(x.grad.abs().sum() > 0 for x in tgt + en)  # no detached side
    assert all(x.grad[0, 1:].abs().sum() == 0 for x in tgt)  # padding (Tt = 3) gets no gradient
    ins = [x.detach().clone().requires_grad_(True) for x in (tgt[1], en[1])]
    assert torch.autograd.gradcheck(lambda a, b: live_kl([a], tm, [b], em, [0], check=False), ins)


def test_loss_composition_uses_200_alpha():
    assert KL_MULTIPLIER == 200.0 and ALPHA == 0.1
    assert live_kl_loss(torch.tensor(1.0), torch.tensor(0.5)).item() == pytest.approx(1.0 + 200 * 0.1 * 0.5)
    assert live_kl_loss(torch.tensor(1.0), torch.tensor(0.5), alpha=0.2).item() == pytest.approx(21.0)


def test_bad_inputs_name_the_problem():
    tgt, tm, en, em = make_pair(6)
    with pytest.raises(ValueError, match="english_logits has 2"):
        live_kl(tgt, tm, en[:2], em, [0])
    with pytest.raises(ValueError, match="out of range"):
        live_kl(tgt, tm, en, em, [4])
    with pytest.raises(ValueError, match="differ"):
        live_kl(tgt, tm, [x[:2] for x in en], em[:2], [0])


# -----------------------------------------------------------------------------
# freezing modes

def tiny_model():
    # 4 decoder layers; layer 1 is dense (mlp_only), the others MoE
    return MoETransformer(MoEConfig(vocab_size=32, hidden_size=16, n_layers=4, n_heads=2, n_kv_heads=1,
                                    n_experts=4, top_k=2, moe_intermediate_size=8, intermediate_size=16,
                                    mlp_only_layers=(1,)))


ATTN = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"]


def layer_names(i, moe):
    mlp = (["mlp.gate_up_proj", "mlp.down_proj", "mlp.router.gate.weight"] if moe
           else ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"])
    return {f"layers.{i}.{n}" for n in ["input_layernorm.weight", *ATTN, "post_attention_layernorm.weight", *mlp]}


def test_router_names_are_the_gate_weights_of_moe_layers():
    model = tiny_model()
    assert router_parameter_names(model) == ["layers.0.mlp.router.gate.weight", "layers.2.mlp.router.gate.weight",
                                             "layers.3.mlp.router.gate.weight"]
    assert router_parameter_names(model, up_to_layer=2) == ["layers.0.mlp.router.gate.weight",
                                                            "layers.2.mlp.router.gate.weight"]


def test_freezing_modes_match_the_authors_rules():
    model = tiny_model()
    everything = [n for n, _ in model.named_parameters()]
    assert trainable_parameter_names(model, "none") == everything
    # routers: the MoE gates of layers 0..band_end only
    assert set(trainable_parameter_names(model, "routers", band_end=2)) == {
        "layers.0.mlp.router.gate.weight", "layers.2.mlp.router.gate.weight"}
    # early layers, band ending at layer 1: layers 0-1 whole; of layer 2 the attention, the
    # post-attention norm (its name contains "att") and the router; no embeddings, norm, lm_head
    expected = layer_names(0, True) | layer_names(1, False) | {
        f"layers.2.{n}" for n in [*ATTN, "post_attention_layernorm.weight", "mlp.router.gate.weight"]}
    got = trainable_parameter_names(model, "early_layers", band_end=1)
    assert set(got) == expected and len(got) == len(expected)
    # band ending at the last layer: every decoder layer, still no embeddings / final norm / lm_head
    assert set(trainable_parameter_names(model, band_end=3)) == set().union(
        *(layer_names(i, i != 1) for i in range(4)))


def test_freezing_mode_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="not one of"):
        trainable_parameter_names(model, "router_only", band_end=1)
    with pytest.raises(ValueError, match="band_end"):
        trainable_parameter_names(model, "routers")
    with pytest.raises(ValueError, match="0..3"):
        trainable_parameter_names(model, "early_layers", band_end=4)


def test_freezing_modes_see_through_a_wrapper():
    wrapped = torch.nn.ModuleDict({"module": tiny_model()})  # names "module.layers.i..." as under DDP
    assert trainable_parameter_names(wrapped, "routers", band_end=3) == [
        "module.layers.0.mlp.router.gate.weight", "module.layers.2.mlp.router.gate.weight",
        "module.layers.3.mlp.router.gate.weight"]
