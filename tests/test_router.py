"""Routers and router losses against direct float64 computations of their formulas."""
import math

import numpy as np
import pytest
import torch

from router import (TopKRouter, SparseMixerRouter, sparsemixer, load_balancing_loss,
                    router_z_loss)


def _logits(n, e, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, e, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_router_matches_float64(norm_topk_prob, k):
    torch.manual_seed(0)
    router = TopKRouter(16, 6, k, norm_topk_prob).double()
    x = torch.randn(40, 16, dtype=torch.float64)
    weights, ids, logits = router(x)
    W = router.gate.weight.detach().numpy()
    want_logits = x.numpy() @ W.T
    np.testing.assert_allclose(logits.detach().numpy(), want_logits, rtol=1e-12, atol=1e-12)
    for row in range(40):
        p = np.exp(want_logits[row] - want_logits[row].max())
        p /= p.sum()
        top = np.argsort(-p)[:k]
        w = p[top] / (p[top].sum() if norm_topk_prob else 1.0)
        assert ids[row].tolist() == top.tolist()
        np.testing.assert_allclose(weights[row].detach().numpy(), w, rtol=1e-12)


def test_topk_router_gradcheck():
    torch.manual_seed(1)
    router = TopKRouter(8, 5, 2, True).double()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: router(x)[0], (x,))
    w = router.gate.weight.detach().clone().requires_grad_()
    call = lambda w: torch.func.functional_call(router, {"gate.weight": w}, (x.detach(),))[0]
    assert torch.autograd.gradcheck(call, (w,))


def _sparsemixer_reference(scores, eps):
    """The inference formulas of docs/architectures.md, row by row, float64 numpy."""
    weights, ids = [], []
    for s in scores:
        m1, i1 = s.max(), int(s.argmax())
        mask1 = (m1 - s) / np.maximum(np.abs(s), m1) > 2 * eps
        g = np.where(mask1, -np.inf, s)
        g1 = np.exp(g[i1] - g.max()) / np.exp(g - g.max()).sum()
        s2 = s.copy()
        s2[i1] = -np.inf
        m2, i2 = s2.max(), int(s2.argmax())
        mask2 = (m2 - s) / np.maximum(np.abs(s), m2) > 2 * eps
        g = np.where(mask2, -np.inf, s2)
        g2 = np.exp(g[i2] - g.max()) / np.exp(g - g.max()).sum()
        weights.append([g1, g2])
        ids.append([i1, i2])
    return np.array(weights), np.array(ids)


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_sparsemixer_inference_matches_formula(eps):
    # small spread so that the relative mask keeps several experts sometimes, and not others
    scores = _logits(200, 16, seed=2, scale=0.5) + 1.0
    weights, ids = sparsemixer(scores, eps, training=False)
    want_w, want_ids = _sparsemixer_reference(scores.numpy(), eps)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(weights.numpy(), want_w, rtol=1e-12)
    if eps == 0.01:  # both regimes covered: runner-up masked (weight 1) or not
        assert (weights[:, 0] > 0.99).any() and (weights[:, 0] < 0.9).any()


def test_sparsemixer_inference_gradcheck():
    scores = (_logits(10, 6, seed=3, scale=0.2) + 1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: sparsemixer(s, 0.3, training=False)[0], (scores,))


def test_sparsemixer_training_samples_masked_softmax():
    # one row, eps large enough that several experts stay unmasked: the first pick is a Gumbel
    # sample from softmax(masked scores)
    torch.manual_seed(0)
    s = torch.tensor([[1.0, 0.9, 0.8, -3.0]])
    eps = 0.2  # masks expert j iff (1 - s_j) / max(|s_j|, 1) > 0.4: only the last one
    n = 20000
    _, ids = sparsemixer(s.expand(n, 4), eps, training=True)
    freq = torch.bincount(ids[:, 0], minlength=4).double() / n
    want = torch.softmax(torch.tensor([1.0, 0.9, 0.8, -math.inf], dtype=torch.float64), 0)
    assert torch.allclose(freq, want, atol=0.015), (freq, want)
    assert (ids[:, 0] != ids[:, 1]).all()


def test_sparsemixer_training_straight_through_gradient():
    """Backward = g * (onehot(chosen) - masked_probs) * grad_out per round: the midpoint factor
    scales the forward value only (the estimator Phi-3.5-MoE was trained with)."""
    torch.manual_seed(5)
    scores = (_logits(64, 8, seed=4, scale=0.3) + 1.0).requires_grad_()
    eps = 0.3
    state = torch.get_rng_state()
    weights, ids = sparsemixer(scores, eps, training=True)
    upstream = torch.randn_like(weights)
    (weights * upstream).sum().backward()
    # recompute the expected gradient from the formula with the same choices
    s = scores.detach()
    want = torch.zeros_like(s)
    taken = torch.zeros_like(s, dtype=torch.bool)
    for r in range(2):
        base = s.masked_fill(taken, -math.inf)
        top = base.max(-1, keepdim=True)[0]
        far = (top - s) / s.abs().clamp(min=top) > 2 * eps
        probs = torch.softmax(base.masked_fill(far, -math.inf), -1)
        chosen = ids[:, r:r + 1]
        g = probs.gather(-1, chosen)
        midpoint = weights[:, r:r + 1].detach() / g  # 1 or 1/3 (x 0.9999) as drawn
        assert torch.all(((midpoint - 1).abs() < 1e-3) | ((midpoint - 0.3333).abs() < 1e-3))
        grad_out = upstream[:, r:r + 1] * g
        onehot = torch.zeros_like(s).scatter(-1, chosen, 1.0)
        want += grad_out * (onehot - probs)
        taken |= onehot.bool()
    torch.set_rng_state(state)
    assert torch.allclose(scores.grad, want, atol=1e-12)


def test_sparsemixer_router_rejects_k_not_2():
    with pytest.raises(ValueError, match="top_k=2"):
        SparseMixerRouter(8, 4, top_k=3)


def _lb_reference(layers, k, mask):
    """E * sum_e f_e P_e in float64, f and P over all layers' real tokens."""
    e = layers[0].shape[-1]
    f = np.zeros(e)
    p = np.zeros(e)
    rows = 0
    for lg in layers:
        lg = lg.reshape(-1, e).numpy()
        probs = np.exp(lg - lg.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for n in range(lg.shape[0]):
            if mask[n]:
                for j in np.argsort(-probs[n])[:k]:
                    f[j] += 1
                p += probs[n]
                rows += 1
    return e * np.sum((f / rows) * (p / rows))


@pytest.mark.parametrize("with_mask", [False, True])
def test_load_balancing_loss_matches_float64(with_mask):
    layers = [_logits(3 * 7, 6, seed=s).reshape(3, 7, 6) for s in range(3)]
    mask = torch.ones(3, 7, dtype=torch.long)
    if with_mask:
        mask[0, :3] = 0
        mask[2, 5:] = 0
    got = load_balancing_loss(layers, 2, mask if with_mask else None)
    want = _lb_reference(layers, 2, mask.reshape(-1).numpy())
    assert abs(got.item() - want) < 1e-6


def test_load_balancing_loss_ignores_padding_content():
    layers = [_logits(2 * 5, 4, seed=s).reshape(2, 5, 4).float() for s in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = [lg.clone() for lg in layers]
    for lg in changed:
        lg[0, 3:] = torch.randn(2, 4) * 10
    assert torch.equal(load_balancing_loss(layers, 2, mask), load_balancing_loss(changed, 2, mask))
    assert not torch.equal(load_balancing_loss(layers, 2), load_balancing_loss(changed, 2))


def test_load_balancing_uniform_routing_is_k():
    # perfectly uniform probabilities and balanced assignments: E * sum_e (K/E)(1/E) = K
    logits = torch.zeros(1, 4, 4)
    logits += torch.eye(4)[None] * 1e-6  # break ties so each token picks a different top-1
    assert abs(load_balancing_loss([logits], 1).item() - 1.0) < 1e-4


def test_router_z_loss_matches_float64():
    layers = [_logits(12, 5, seed=s).reshape(3, 4, 5) for s in range(2)]
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1]])
    z = [np.log(np.exp(lg.reshape(-1, 5).numpy()).sum(-1)) ** 2 for lg in layers]
    m = mask.reshape(-1).numpy().astype(bool)
    want = np.mean([zz[m].mean() for zz in z])
    assert abs(router_z_loss(layers, mask).item() - want) < 1e-6
    assert abs(router_z_loss(layers).item() - np.mean([zz.mean() for zz in z])) < 1e-6


def test_sparsemixer_clean_logits_are_the_unjittered_gate():
    """SARA's eq. 1-2 is softmax(h W_g): with clean_logits the returned logits are exactly the gate
    of the un-jittered input, while the routing (same RNG draw) is the jittered one; without it, the
    logits carry the jitter."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    plain = SparseMixerRouter(16, 4, input_jitter=0.01).train()
    clean = SparseMixerRouter(16, 4, input_jitter=0.01, clean_logits=True).train()
    clean.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    w_p, ids_p, logits_p = plain(x)
    torch.manual_seed(1)
    w_c, ids_c, logits_c = clean(x)
    want = x @ plain.gate.weight.T
    assert logits_c.shape == (3, 5, 4) and logits_c._base is None
    torch.testing.assert_close(logits_c, want, rtol=0, atol=1e-6)
    assert not torch.allclose(logits_p, want, rtol=0, atol=1e-6)  # the jitter moved them
    assert torch.equal(ids_p, ids_c) and torch.equal(w_p, w_c)  # routing unchanged
    clean.eval()
    assert torch.equal(clean(x)[2], plain.eval()(x)[2])  # eval: no jitter, identical
