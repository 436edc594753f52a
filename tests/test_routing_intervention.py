"""router.RoutingIntervention on model.MoE: no intervention = the layer as it was, bit for bit; each kind of
intervention against an independent computation (a float64 hand-written MoE, a zeroed weight, the router's own
formula on biased logits)."""
import numpy as np
import pytest
import torch

from experts import experts_loop
from model import MoE, MoEConfig, MoETransformer
from router import RoutingIntervention, intervene

SMALL = dict(vocab_size=61, hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=48,
             n_experts=6, top_k=2, moe_intermediate_size=16, expert_impl="loop")


def make(router="topk", seed=0, **kw):
    torch.manual_seed(seed)
    extra = dict(router="sparsemixer", norm="layernorm") if router == "sparsemixer" else {}
    return MoETransformer(MoEConfig(**{**SMALL, **extra, **kw})).eval()


def ids_mask(B=3, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL["vocab_size"], (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -3:] = 0  # right padding in one row
    return ids, mask


def reference_forward(self, x):
    """model.MoE.forward as it was before the hook existed (loop dispatch)."""
    B, T, H = x.shape
    weights, expert_ids, logits = self.router(x)
    y = experts_loop(x.reshape(B * T, H), expert_ids, weights, self.gate_up_proj, self.down_proj)
    return y.view(B, T, H), logits


def run(model, ids, mask, edits=None):
    with intervene(model, edits or {}):
        return model(ids, attention_mask=mask)


@pytest.mark.parametrize("router", ["topk", "sparsemixer"])
def test_no_intervention_is_bit_identical_to_the_layer_without_the_hook(router, monkeypatch):
    ids, mask = ids_mask()
    labels = ids.masked_fill(mask == 0, -100)
    model = make(router)
    model.train(router == "topk")  # training mode too (sparsemixer samples in training: eval there)
    torch.manual_seed(5)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # an intervention that changes nothing takes the hook's path and must also change nothing
    torch.manual_seed(5)
    empty = run(model, ids, mask, {i: RoutingIntervention() for i in range(3)})
    monkeypatch.setattr(MoE, "forward", reference_forward)
    torch.manual_seed(5)
    ref = model(ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    assert all(torch.equal(a, b) for a, b in zip(out.router_logits, ref.router_logits))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(empty.logits, ref.logits)


def test_imposing_a_sequences_own_routing_changes_nothing():
    model = make()
    ids, mask = ids_mask()
    rec = {i: RoutingIntervention(record=True) for i in range(3)}
    own = run(model, ids, mask, rec)
    impose = {i: RoutingIntervention(expert_ids=r.recorded[0], weights=r.recorded[1]) for i, r in rec.items()}
    again = run(model, ids, mask, impose)
    assert torch.equal(own.logits, again.logits)
    assert all(torch.equal(a, b) for a, b in zip(own.router_logits, again.router_logits))
    assert all(m.mlp.intervention is None for m in model.layers)  # intervene put everything back


def hand_moe(moe, x_NH, ids_NK, w_NK):
    """sum_k w_k * down_e(silu(gate_e x) * up_e x) in float64, one token and one expert at a time."""
    gu, dn = moe.gate_up_proj.detach().double().numpy(), moe.down_proj.detach().double().numpy()
    I = dn.shape[-1]
    x = x_NH.double().numpy()
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for e, w in zip(ids_NK[n].tolist(), w_NK[n].double().tolist()):
            h = gu[e] @ x[n]
            g, u = h[:I], h[I:]
            out[n] += w * (dn[e] @ (g / (1 + np.exp(-g)) * u))
    return out


def test_imposing_other_experts_equals_a_hand_built_moe():
    model = make()
    moe = model.layers[1].mlp
    B, T, K, E = 2, 5, 2, 6
    x = torch.randn(B, T, SMALL["hidden_size"], generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    w = torch.rand(B, T, K, generator=g)
    moe.intervention = RoutingIntervention(expert_ids=ids, weights=w)
    with torch.no_grad():
        y, logits = moe(x)
    np.testing.assert_allclose(y.reshape(B * T, -1).double().numpy(),
                               hand_moe(moe, x.reshape(B * T, -1), ids.reshape(-1, K), w.reshape(-1, K)),
                               rtol=1e-5, atol=1e-6)
    moe.intervention = None
    assert torch.equal(logits, moe.router(x)[2])  # the router's own logits are still returned
    # `where`: only the chosen positions take the imposed routing, the rest keep their own
    where = torch.zeros(B, T, dtype=torch.bool)
    where[0, 2] = where[1, 4] = True
    moe.intervention = RoutingIntervention(expert_ids=ids, weights=w, where=where, record=True)
    with torch.no_grad():
        y2, _ = moe(x)
    rec_ids, rec_w = moe.intervention.recorded
    own_w, own_ids, _ = moe.router(x)
    own_ids, own_w = own_ids.view(B, T, K), own_w.view(B, T, K)
    assert torch.equal(rec_ids[where], ids[where]) and torch.equal(rec_ids[~where], own_ids[~where])
    assert torch.equal(rec_w[where], w[where]) and torch.equal(rec_w[~where], own_w[~where])
    np.testing.assert_allclose(y2.reshape(B * T, -1).double().numpy(),
                               hand_moe(moe, x.reshape(B * T, -1), rec_ids.reshape(-1, K), rec_w.reshape(-1, K)),
                               rtol=1e-5, atol=1e-6)


def test_remove_output_equals_zero_expert_weights():
    model = make()
    ids, mask = ids_mask()
    removed = run(model, ids, mask, {1: RoutingIntervention(remove_output=True)})
    with torch.no_grad():
        model.layers[1].mlp.down_proj.zero_()  # an independent way to make the layer add nothing
    zeroed = model(ids, attention_mask=mask)
    torch.testing.assert_close(removed.logits, zeroed.logits, rtol=0, atol=1e-6)
    assert not torch.equal(run(make(), ids, mask).logits, removed.logits)


def test_randomise_draws_k_distinct_experts_reproducibly_and_keeps_the_weights():
    moe = make().layers[0].mlp
    x = torch.randn(4, 50, SMALL["hidden_size"], generator=torch.Generator().manual_seed(0))
    recs = []
    for _ in range(2):
        moe.intervention = RoutingIntervention(randomise=torch.Generator().manual_seed(9), record=True)
        with torch.no_grad():
            moe(x)
        recs.append(moe.intervention.recorded)
    ids, w = recs[0]
    assert torch.equal(ids, recs[1][0])  # same generator seed, same draw
    assert (ids[..., 0] != ids[..., 1]).all() and ids.min() >= 0 and ids.max() < 6
    own_w, own_ids, _ = moe.router(x)
    assert torch.equal(w.reshape(-1, 2), own_w)
    assert (ids.reshape(-1, 2) != own_ids).any(-1).float().mean() > 0.5
    counts = torch.bincount(ids.reshape(-1), minlength=6).float()  # 400 draws, 66.7 expected per expert
    assert (counts - 400 / 6).abs().max() < 30


def test_logit_bias_is_a_prior_the_router_chooses_with():
    """A per-sequence (B, 1, E) prior: the routing equals softmax -> top-k of (logits + prior) in float64,
    and the layer returns the biased logits."""
    moe = make().layers[0].mlp
    B, T, E = 3, 7, 6
    x = torch.randn(B, T, SMALL["hidden_size"], generator=torch.Generator().manual_seed(2))
    prior = torch.zeros(B, 1, E)
    prior[0, 0, :2], prior[1, 0, 4:], prior[2, 0, 3] = 2.0, 2.0, -5.0
    moe.intervention = RoutingIntervention(logit_bias=prior, record=True)
    with torch.no_grad():
        _, logits = moe(x)
    ids, w = moe.intervention.recorded
    z = (x.double() @ moe.router.gate.weight.detach().double().T + prior.double()).numpy()
    np.testing.assert_allclose(logits.double().numpy(), z, rtol=1e-5, atol=1e-6)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1)[..., :2]
    assert (ids.numpy() == top).all()
    want_w = np.take_along_axis(p, top, -1)
    np.testing.assert_allclose(w.numpy(), want_w / want_w.sum(-1, keepdims=True), rtol=1e-5)
    assert (ids[2] != 3).all()


def test_logit_fn_carries_steering_rules():
    """Two published steering rules as logit_fn: z + lam * s * |z| (per-expert shares s), and 'promote expert 5
    above the token's maximum' (it is then chosen for every token)."""
    moe = make().layers[0].mlp
    x = torch.randn(2, 10, SMALL["hidden_size"], generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.0, 0.1, 0.0, 0.5, 0.2, 0.0])
    moe.intervention = RoutingIntervention(logit_fn=lambda z: z + 0.5 * s * z.abs())
    with torch.no_grad():
        _, z_steer = moe(x)
    z = x @ moe.router.gate.weight.T
    torch.testing.assert_close(z_steer, z + 0.5 * s * z.abs())

    def promote(z):
        return z.scatter(-1, torch.full(z.shape[:-1] + (1,), 5), z.max(-1, keepdim=True).values + 0.01)
    moe.intervention = RoutingIntervention(logit_fn=promote, record=True)
    with torch.no_grad():
        moe(x)
    assert (moe.intervention.recorded[0] == 5).any(-1).all()


def test_gradient_flows_through_a_logit_bias():
    """d(layer output)/d(prior) by autograd = finite differences (float64; the routing does not flip here)."""
    moe = make().double().layers[0].mlp
    x = torch.randn(2, 3, SMALL["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(2, 1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()

    def f(b):
        moe.intervention = RoutingIntervention(logit_bias=b)
        return moe(x)[0]
    assert torch.autograd.gradcheck(f, (bias,))


def test_bad_interventions_are_named_errors():
    model = make(mlp_only_layers=(2,))
    ids, mask = ids_mask()
    with pytest.raises(ValueError, match="layer 2 is not an MoE layer"):
        with intervene(model, {2: RoutingIntervention()}):
            pass
    with pytest.raises(ValueError, match="layer 7 is not an MoE layer"):
        with intervene(model, {7: RoutingIntervention()}):
            pass
    with pytest.raises(ValueError, match="together"):
        RoutingIntervention(expert_ids=torch.zeros(1, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        RoutingIntervention(expert_ids=torch.zeros(1, 1, 2, dtype=torch.long), weights=torch.ones(1, 1, 2),
                            randomise=torch.Generator())
    bad = [RoutingIntervention(expert_ids=torch.zeros(3, 8, 2, dtype=torch.long), weights=torch.ones(3, 8, 2)),
           RoutingIntervention(expert_ids=torch.full((3, 9, 2), 6), weights=torch.ones(3, 9, 2)),
           RoutingIntervention(logit_bias=torch.zeros(2, 1, 6)),
           RoutingIntervention(randomise=torch.Generator(), where=torch.ones(3, 8, dtype=torch.bool))]
    for edit, what in zip(bad, ["expert_ids has shape", r"integer ids in \[0, 6\)", "logit_bias has shape",
                                "where has shape"]):
        with pytest.raises(ValueError, match=what):
            run(model, ids, mask, {0: edit})
        assert model.layers[0].mlp.intervention is None  # restored after the error too
