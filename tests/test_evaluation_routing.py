"""evaluation/routing.py without a model: the band rule (one rule; the edge windows only on request)."""
import numpy as np
import pytest

import evaluation.routing as R


def test_choose_band_is_the_bottom_of_the_u():
    u = [0.5, 0.2, 0.1, 0.15, 0.4, 0.6]
    assert R.choose_band(u, 1) == (2, 2) and R.choose_band(u, 2) == (2, 3) and R.choose_band(u, 3) == (1, 3)
    assert R.choose_band([1, 1, 1], 2, edges=True) == (0, 1)  # ties: the earliest
    assert R.choose_band(u, 6, edges=True) == (0, 5)
    with pytest.raises(SystemExit):
        R.choose_band(u, 7, edges=True)
    rows = [dict(model="m", lang=l, layer=k + 10, js_norm=v + d) for l, d in (("sw", 0), ("hi", 0.1))
            for k, v in enumerate(u)]
    b = R.band_from_rows(rows, 2)
    assert (b["start"], b["end"]) == (12, 13) and b["mean"] == pytest.approx(0.175)  # decoder indices


def test_band_leaves_out_the_edges_unless_asked():
    """A curve whose lowest window touches the first layer: all windows (width 2) have means 0.175 (layers
    0-1), 0.25, 0.225, 0.325, 0.25; the middle ones (starts 1..3) 0.25, 0.225, 0.325 -> layers 2-3."""
    curve = [0.05, 0.3, 0.2, 0.25, 0.4, 0.1]
    assert R.choose_band(curve, 2) == (2, 3)
    assert R.choose_band(curve, 2, edges=True) == (0, 1)
    assert R.choose_band(curve[::-1], 2, edges=True) == (4, 5) and R.choose_band(curve[::-1], 2) == (2, 3)
    with pytest.raises(SystemExit, match="no middle window"):
        R.choose_band([1, 1, 1], 2)
    rows = [dict(model="m", lang="sw", layer=k, js_norm=v) for k, v in enumerate(curve)]
    assert (R.band_from_rows(rows, 2)["start"], R.band_from_rows(rows, 2, edges=True)["start"]) == (2, 0)


def test_band_rule_against_a_loop():
    """The rule written out: every window of `width` layers without layer 0 and layer L-1, lowest mean,
    earliest on ties."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        L, width = int(rng.integers(3, 12)), int(rng.integers(1, 4))
        curve = rng.integers(0, 5, size=L) / 4  # coarse values: many ties
        windows = [(float(np.mean(curve[s:s + width])), s) for s in range(1, L - width)]
        if not windows:
            continue
        best = min(windows)[1]  # (mean, start): the earliest among equal means
        assert R.choose_band(curve, width) == (best, best + width - 1)


# -----------------------------------------------------------------------------
# the routing oracle, on tiny models
import torch  # noqa: E402

from model import MoEConfig, MoETransformer  # noqa: E402
from router import RoutingIntervention  # noqa: E402

TINY = dict(vocab_size=41, hidden_size=24, n_heads=4, n_kv_heads=2, intermediate_size=32, n_experts=5, top_k=2,
            moe_intermediate_size=12, expert_impl="loop")


def tiny(n_layers=3, seed=0):
    torch.manual_seed(seed)
    return MoETransformer(MoEConfig(n_layers=n_layers, **TINY)).eval()


def seqs(B, T, seed):
    return torch.randint(1, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def test_oracle_with_a_sequence_s_own_routing_changes_nothing():
    model = tiny()
    ids = seqs(3, 8, 0)
    mask = torch.ones_like(ids)
    align = torch.arange(8).expand(3, 8)
    res = R.routing_oracle_loss(model, ids, mask, ids, ids, mask, align, layers=[0, 1, 2])
    assert res["delta"] == 0.0 and res["own"] == res["imposed"]
    # with a prior that every forward runs with (a per-sequence router bias), on both sides: still nothing
    prior = {l: RoutingIntervention(logit_bias=torch.randn(3, 1, 5, generator=torch.Generator().manual_seed(l)))
             for l in range(3)}
    res = R.routing_oracle_loss(model, ids, mask, ids, ids, mask, align, [1], anchor_edits=prior, target_edits=prior)
    assert res["delta"] == 0.0
    with R.intervene(model, prior):
        assert model(ids, attention_mask=mask, labels=ids).loss.item() == res["own"]  # the prior was applied


def test_oracle_equals_a_hand_built_forward_with_the_anchor_experts():
    """One layer: target token t takes the experts and weights of anchor token align[t]. Reference: the anchor's
    routing computed by hand (float64 softmax -> top-2 -> renormalise of its router logits), the MoE as a float64
    sum over the chosen experts, the model's own embedding/attention/norms around it."""
    model = tiny(n_layers=1, seed=3)
    block = model.layers[0]
    tgt, anc = seqs(2, 6, 1), seqs(2, 7, 2)
    align = torch.tensor([[-1, 0, 2, 4, 6, 1], [3, 3, -1, 5, 0, 2]])
    with R.intervene(model, R.oracle_interventions(model, anc, torch.ones_like(anc), align, [0])):
        got = model(tgt).logits.double()

    def pre_moe(ids):  # residual stream and MoE input of the one block, float64
        x = model.embed_tokens(ids)
        cos, sin = model.rotary(torch.arange(ids.shape[1]).expand(ids.shape), x.dtype)
        x = x + block.self_attn(block.input_layernorm(x), cos, sin, None)
        return x.double(), block.post_attention_layernorm(x).double()

    moe = block.mlp
    gu, dn = moe.gate_up_proj.detach().double(), moe.down_proj.detach().double()
    with torch.no_grad():
        _, h_anc = pre_moe(anc)
        z = h_anc @ moe.router.gate.weight.double().T  # (B, Ta, E)
        p = torch.softmax(z, -1)
        w_anc, e_anc = p.topk(2, -1)
        w_anc = w_anc / w_anc.sum(-1, keepdim=True)
        x, h = pre_moe(tgt)
        own_w, own_e = torch.softmax(h @ moe.router.gate.weight.double().T, -1).topk(2, -1)
        own_w = own_w / own_w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for b in range(2):
            for t in range(6):
                a = align[b, t].item()
                es, ws = (own_e[b, t], own_w[b, t]) if a < 0 else (e_anc[b, a], w_anc[b, a])
                for e, w in zip(es.tolist(), ws.tolist()):
                    g, u = (gu[e] @ h[b, t]).chunk(2)
                    y[b, t] += w * (dn[e] @ (torch.nn.functional.silu(g) * u))
        want = model.lm_head.weight.double() @ model.norm(x + y).transpose(1, 2)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, model(tgt).logits.double(), atol=1e-4)  # the imposition did change something


def test_oracle_rejects_bad_alignments():
    model = tiny()
    anc = seqs(2, 5, 0)
    mask = torch.ones_like(anc)
    mask[1, 4] = 0
    with pytest.raises(ValueError, match="past the anchor"):
        R.oracle_interventions(model, anc, mask, torch.tensor([[0, 5], [0, 1]]), [0])
    with pytest.raises(ValueError, match="anchor padding"):
        R.oracle_interventions(model, anc, mask, torch.tensor([[0, 4], [0, 4]]), [0])
    with pytest.raises(ValueError, match=r"expected \(B, T\)"):
        R.oracle_interventions(model, anc, mask, torch.tensor([[0, 1]]), [0])


def test_the_docs_oracle_example_runs():
    """The Python example of docs/experiments.md, section 3, executed as written."""
    import os
    import re
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "experiments.md"),
                encoding="utf-8").read()
    section = text[text.index("## 3. The routing oracle"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "docs/experiments.md (section 3)", "exec"), scope)
    res = scope["res"]
    assert set(res) == {"own", "imposed", "delta", "layers"} and res["layers"] == [1, 2]
    assert res["delta"] == pytest.approx(res["imposed"] - res["own"]) and res["delta"] != 0
    assert all(b.mlp.intervention is None for b in scope["model"].layers)
