"""Tests for sara_loss.py: float64 oracles (scipy, explicit loops) and hypothesis properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax as np_softmax

from sara_loss import (LN2, js_divergence, layer_band, layer_divergence, pool_routing,
                       pooled_layer_divergence, sara_loss)

FAST = settings(max_examples=40, deadline=None)
F64 = torch.float64


def scipy_js(p, q):
    # scipy returns the JS *distance* sqrt(JS), natural log when base is None
    return jensenshannon(np.asarray(p, np.float64), np.asarray(q, np.float64)) ** 2


def rand_dist(rng, *shape, zeros=0.0):
    """Random distributions over the last dim; a fraction `zeros` of entries exactly 0."""
    w = rng.gamma(0.5, size=shape)
    w[rng.random(shape) < zeros] = 0.0
    w[..., 0] += (w.sum(-1) == 0)  # no all-zero rows
    return torch.tensor(w / w.sum(-1, keepdims=True), dtype=F64)


@st.composite
def dist_pair(draw, max_e=12):
    """Two float64 distributions over E experts, with exact zeros drawn often."""
    E = draw(st.integers(1, max_e))
    entry = st.one_of(st.just(0.0), st.floats(1e-9, 1.0), st.floats(0.5, 1.0))

    def one():
        w = np.array(draw(st.lists(entry, min_size=E, max_size=E)))
        if w.sum() == 0:
            w[draw(st.integers(0, E - 1))] = 1.0
        return torch.tensor(w / w.sum(), dtype=F64)
    return one(), one()


# -----------------------------------------------------------------------------
# js_divergence against scipy

def test_js_matches_scipy_random_and_with_zeros():
    rng = np.random.default_rng(0)
    for zeros in (0.0, 0.3, 0.8):
        p, q = rand_dist(rng, 50, 17, zeros=zeros), rand_dist(rng, 50, 17, zeros=zeros)
        got = js_divergence(p, q)
        assert got.shape == (50,) and got.dtype == F64
        want = [scipy_js(a, b) for a, b in zip(p.numpy(), q.numpy())]
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_js_one_hot_and_disjoint_supports():
    eye = torch.eye(5, dtype=F64)
    assert js_divergence(eye[1], eye[1]).item() == 0.0
    assert js_divergence(eye[1], eye[3]).item() == pytest.approx(LN2, abs=1e-15)
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64)
    q = torch.tensor([0.0, 0.0, 0.25, 0.75], dtype=F64)
    assert js_divergence(p, q).item() == pytest.approx(math.log(2), abs=1e-15)
    assert scipy_js(p, q) == pytest.approx(LN2, abs=1e-12)  # scipy uses the natural log too
    half = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64)
    assert js_divergence(eye[0, :4], half).item() == pytest.approx(scipy_js(eye[0, :4], half), abs=1e-14)


@FAST
@given(dist_pair())
def test_js_matches_scipy_property(pq):
    p, q = pq
    assert js_divergence(p, q).item() == pytest.approx(scipy_js(p, q), abs=1e-10)


def test_js_leading_shape_and_dtypes():
    rng = np.random.default_rng(1)
    p, q = rand_dist(rng, 2, 3, 4, 8), rand_dist(rng, 2, 3, 4, 8)
    assert js_divergence(p, q).shape == (2, 3, 4)
    want = js_divergence(p.float(), q.float())
    for dt in (torch.bfloat16, torch.float16):
        got = js_divergence(p.to(dt), q.to(dt))
        assert got.dtype == torch.float32  # upcast, never computed in 16 bits
        # (the 16-bit sums are off by ~2e-3, beyond the fp32 tolerance: skip the check for the oracle)
        want16 = js_divergence(p.to(dt).float(), q.to(dt).float(), check=False)
        np.testing.assert_allclose(got, want16, rtol=0, atol=0)
    assert want.dtype == torch.float32
    assert js_divergence(p.float(), q).dtype == F64


# -----------------------------------------------------------------------------
# js_divergence properties

@FAST
@given(dist_pair())
def test_js_symmetric_bounded_zero_on_diagonal(pq):
    p, q = pq
    js = js_divergence(p, q).item()
    assert js == pytest.approx(js_divergence(q, p).item(), abs=1e-15)
    assert -1e-15 <= js <= LN2 + 1e-15
    assert js_divergence(p, p).item() == 0.0
    if (p - q).abs().max() > 1e-4:
        assert js > 0


@FAST
@given(dist_pair(), st.randoms(use_true_random=False))
def test_js_invariant_to_expert_permutation(pq, rnd):
    p, q = pq
    perm = list(range(p.numel()))
    rnd.shuffle(perm)
    assert js_divergence(p[perm], q[perm]).item() == pytest.approx(js_divergence(p, q).item(), abs=1e-14)


# -----------------------------------------------------------------------------
# js_divergence gradients

def test_js_gradients_finite_at_one_hot_and_zeros():
    p = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64, requires_grad=True)
    q = torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=F64, requires_grad=True)
    js = js_divergence(p, q)
    gp, gq = torch.autograd.grad(js, (p, q))
    assert torch.isfinite(gp).all() and torch.isfinite(gq).all()
    (gg,) = torch.autograd.grad(js_divergence(p, p), p)  # one-hot against itself
    assert torch.isfinite(gg).all()


def test_js_gradient_zero_at_p_equals_q():
    rng = np.random.default_rng(2)
    p = rand_dist(rng, 6, 9, zeros=0.3).requires_grad_(True)
    q = p.detach().clone().requires_grad_(True)
    gp, gq = torch.autograd.grad(js_divergence(p, q).sum(), (p, q))
    assert gp.abs().max() < 1e-14 and gq.abs().max() < 1e-14


def test_gradient_through_underflowed_softmax_is_the_float64_limit():
    # fp32 softmax underflows to exactly 0 for a logit gap of 200; float64 does not (e^-200 ≈ 1e-87).
    # The fp32 gradient must be finite and equal the float64 one.
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, dtype=F64)
    logits[:, :, 0] += 200.0
    anchor = rand_dist(np.random.default_rng(3), 2, 1, 6)
    grads = []
    for dt in (torch.float32, F64):
        x = logits.to(dt).requires_grad_(True)
        assert dt == F64 or (torch.softmax(x, -1) == 0).any()
        loss = sara_loss(pool_routing([x]), anchor.to(dt), [0])
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(g).all()
        grads.append(g.double())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


# -----------------------------------------------------------------------------
# pool_routing

def np_pool(logits_LBTE, mask_BT):
    """float64 oracle: masked mean over tokens of the dense softmax, (B, L, E)."""
    probs = np_softmax(np.asarray(logits_LBTE, np.float64), axis=-1)
    m = np.asarray(mask_BT, np.float64)[None, :, :, None]
    return ((probs * m).sum(2) / m.sum(2)).transpose(1, 0, 2)


def test_pool_matches_numpy_oracle_and_accepts_stacked():
    torch.manual_seed(1)
    logits = [torch.randn(3, 7, 5, dtype=F64) * 3 for _ in range(4)]
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 6 + [1]])
    got = pool_routing(logits, mask)
    assert got.shape == (3, 4, 5) and got.dtype == F64
    want = np_pool(torch.stack(logits).numpy(), mask.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-14)
    torch.testing.assert_close(pool_routing(tuple(logits), mask.bool()), got, rtol=0, atol=0)
    torch.testing.assert_close(pool_routing(torch.stack(logits, 1), mask), got, rtol=0, atol=0)
    torch.testing.assert_close(pool_routing(logits), torch.tensor(np_pool(torch.stack(logits).numpy(), np.ones((3, 7)))))


@FAST
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31), st.booleans())
def test_pool_invariant_to_padding_side_garbage_and_token_order(B, L, E, seed, left):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (B,), generator=g).tolist()
    T = max(lengths) + int(torch.randint(0, 3, (), generator=g))
    real = [[torch.randn(n, E, generator=g, dtype=F64) for n in lengths] for _ in range(L)]
    logits = torch.randn(L, B, T, E, generator=g, dtype=F64) * 50  # garbage in the padding
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        sl = slice(T - n, T) if left else slice(0, n)
        mask[b, sl] = 1
        for l in range(L):
            logits[l, b, sl] = real[l][b]
    got = pool_routing(list(logits), mask)
    for b, n in enumerate(lengths):  # each sequence alone, unpadded
        alone = pool_routing([real[l][b][None] for l in range(L)])
        torch.testing.assert_close(got[b], alone[0], rtol=0, atol=1e-14)
    perm = torch.randperm(T, generator=g)  # token order is irrelevant
    torch.testing.assert_close(pool_routing(list(logits[:, :, perm]), mask[:, perm]), got, rtol=0, atol=1e-14)


def test_pool_bf16_logits_give_fp32_result():
    torch.manual_seed(2)
    logits = [(torch.randn(2, 9, 16) * 4).bfloat16() for _ in range(3)]
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    got = pool_routing(logits, mask)
    assert got.dtype == torch.float32
    want = np_pool(torch.stack(logits).double().numpy(), mask.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)  # a bf16 softmax is off by ~1e-3


def test_pool_and_loss_in_fp32_under_bf16_autocast():
    torch.manual_seed(3)
    router = torch.nn.Linear(8, 16, bias=False)
    h = torch.randn(2, 9, 8) * 3
    mask = torch.tensor([[1] * 9, [0] * 3 + [1] * 6])
    anchor = rand_dist(np.random.default_rng(4), 2, 2, 16).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = [router(h), router(2 * h)]
        assert logits[0].dtype == torch.bfloat16
        pooled = pool_routing(logits, mask)
        loss = sara_loss(pooled, anchor, [0, 1])
    assert pooled.dtype == torch.float32 and loss.dtype == torch.float32
    want = np_pool(torch.stack(logits).double().detach().numpy(), mask.numpy())
    np.testing.assert_allclose(pooled.detach().numpy(), want, rtol=0, atol=1e-6)
    want_loss = np.mean([[scipy_js(anchor[b, l], want[b, l]) for l in range(2)] for b in range(2)])
    assert loss.item() == pytest.approx(want_loss, abs=1e-6)


# -----------------------------------------------------------------------------
# sara_loss

def loop_oracle(target, anchor, layers, anchor_mask=None):
    """eq. 9 as an explicit Python loop with scipy's JS."""
    rows = [b for b in range(target.shape[0]) if anchor_mask is None or anchor_mask[b]]
    terms = [scipy_js(anchor[b, l].detach(), target[b, l].detach()) for b in rows for l in layers]
    return float(np.mean(terms)) if terms else 0.0


@FAST
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31), st.data())
def test_sara_loss_equals_loop_and_subset(B, L, E, seed, data):
    rng = np.random.default_rng(seed)
    target, anchor = rand_dist(rng, B, L, E, zeros=0.2), rand_dist(rng, B, L, E, zeros=0.2)
    layers = data.draw(st.lists(st.integers(0, L - 1), min_size=1, max_size=L, unique=True))
    has = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    assert sara_loss(target, anchor, layers).item() == pytest.approx(loop_oracle(target, anchor, layers), abs=1e-12)
    got = sara_loss(target, anchor, layers, has)
    assert got.item() == pytest.approx(loop_oracle(target, anchor, layers, has), abs=1e-12)
    if has.any():  # exclusion == computing on the subset, even if missing rows hold garbage
        anchor_garbage = anchor.clone()
        anchor_garbage[~has] = float("nan")
        torch.testing.assert_close(sara_loss(target, anchor_garbage, layers, has),
                                   sara_loss(target[has], anchor[has], layers), rtol=0, atol=1e-15)


def test_layer_band_is_inclusive():
    assert list(layer_band(7, 34)) == list(range(7, 35)) and len(layer_band(7, 34)) == 28
    assert list(layer_band(3, 3)) == [3]
    rng = np.random.default_rng(5)
    target, anchor = rand_dist(rng, 3, 48, 8), rand_dist(rng, 3, 48, 8)
    assert sara_loss(target, anchor, layer_band(7, 34)).item() == pytest.approx(
        loop_oracle(target, anchor, range(7, 35)), abs=1e-12)


def test_gradcheck_through_pool_and_loss():
    torch.manual_seed(4)
    B, T, E, L = 2, 3, 4, 3
    logits = torch.randn(L, B, T, E, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    anchor = rand_dist(np.random.default_rng(6), B, L, E)
    has = torch.tensor([True, False])

    def f(x):
        return sara_loss(pool_routing(list(x), mask), anchor, [1, 2], has)
    assert torch.autograd.gradcheck(f, (logits,))
    assert torch.autograd.gradgradcheck(f, (logits,))
    assert torch.autograd.gradcheck(lambda x: sara_loss(pool_routing(list(x)), anchor, [0, 2]), (logits,))


def test_no_gradient_into_anchor():
    rng = np.random.default_rng(7)
    target = rand_dist(rng, 3, 4, 5).requires_grad_(True)
    anchor = rand_dist(rng, 3, 4, 5).requires_grad_(True)
    loss = sara_loss(target, anchor, [1, 2])
    assert loss.requires_grad
    loss.backward()
    assert anchor.grad is None
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_no_anchor_in_batch_gives_exact_zero_and_zero_grad():
    torch.manual_seed(5)
    logits = torch.randn(3, 2, 6, 5, requires_grad=True)
    anchor = torch.full((2, 3, 5), float("nan"))  # missing anchors may hold anything
    loss = sara_loss(pool_routing(list(logits)), anchor, [0, 2], torch.tensor([False, False]))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_missing_anchor_gets_no_gradient():
    rng = np.random.default_rng(8)
    target = rand_dist(rng, 3, 2, 4).requires_grad_(True)
    anchor = rand_dist(rng, 3, 2, 4)
    anchor[1] = 0.0  # what the released code fed in for a missing anchor
    sara_loss(target, anchor, [0, 1], torch.tensor([True, False, True])).backward()
    assert torch.equal(target.grad[1], torch.zeros(2, 4, dtype=F64))
    assert target.grad[0].abs().sum() > 0


def test_check_false_needs_no_host_sync():
    # .item()/.tolist() are impossible on the meta device: with check=False nothing may read data back
    logits = [torch.randn(2, 5, 4, device="meta") for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.long, device="meta")
    anchor = torch.rand(2, 3, 4, device="meta")
    has = torch.ones(2, dtype=torch.bool, device="meta")
    loss = sara_loss(pool_routing(logits, mask, check=False), anchor, [1, 2], has, check=False)
    assert loss.shape == () and loss.device.type == "meta"
    with pytest.raises(RuntimeError):
        pool_routing(logits, mask)  # check=True does sync


# -----------------------------------------------------------------------------
# analysis statistics

def test_layer_divergence_and_normalized_and_pooled():
    rng = np.random.default_rng(9)
    a, b = rand_dist(rng, 6, 4, 5, zeros=0.2), rand_dist(rng, 6, 4, 5, zeros=0.2)
    want = [np.mean([scipy_js(a[n, l], b[n, l]) for n in range(6)]) for l in range(4)]
    got = layer_divergence(a, b)
    assert got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    norm = layer_divergence(a, b, normalized=True)
    np.testing.assert_allclose(norm.numpy(), np.array(want) / np.log(2), rtol=0, atol=1e-12)
    assert (norm >= 0).all() and (norm <= 1).all()
    eye = torch.eye(4, dtype=F64)[None].repeat(2, 1, 1)  # disjoint supports: normalised JS = 1
    np.testing.assert_allclose(layer_divergence(eye, eye.roll(1, -1), normalized=True).numpy(), 1.0, atol=1e-15)
    keep = torch.tensor([True, False, True, True, False, False])
    torch.testing.assert_close(layer_divergence(a, b, keep), layer_divergence(a[keep], b[keep]))
    pooled = pooled_layer_divergence(a, b[:4])  # sets need not be paired
    want = [scipy_js(a[:, l].mean(0), b[:4, l].mean(0)) for l in range(4)]
    np.testing.assert_allclose(pooled.numpy(), want, rtol=0, atol=1e-12)
    assert (pooled_layer_divergence(a, b) <= layer_divergence(a, b) + 1e-15).all()  # joint convexity
    torch.testing.assert_close(pooled_layer_divergence(a, b, normalized=True), pooled_layer_divergence(a, b) / LN2)


# -----------------------------------------------------------------------------
# errors

def test_errors():
    rng = np.random.default_rng(10)
    d = rand_dist(rng, 2, 4, 5)
    with pytest.raises(ValueError, match=r"p \(3,\) and q \(4,\) must have the same shape"):
        js_divergence(torch.ones(3) / 3, torch.ones(4) / 4)
    with pytest.raises(ValueError, match=r"target_dist \(2, 4, 5\) and anchor_dist \(2, 4, 6\)"):
        sara_loss(d, rand_dist(rng, 2, 4, 6), [0])
    with pytest.raises(ValueError, match=r"layers \[4\] out of range.*L = 4"):
        sara_loss(d, d, [3, 4])
    with pytest.raises(ValueError, match=r"layers \[-1\] out of range"):
        sara_loss(d, d, [-1])
    with pytest.raises(ValueError, match="duplicates"):
        sara_loss(d, d, [1, 1])
    with pytest.raises(ValueError, match="layers is empty"):
        sara_loss(d, d, [])
    with pytest.raises(ValueError, match="iterable of layer indices"):
        sara_loss(d, d, 2)
    with pytest.raises(ValueError, match="start <= end"):
        layer_band(34, 7)
    bad = d.clone()
    bad[0, 0, 0] += 0.01
    with pytest.raises(ValueError, match=r"anchor_dist\[:, layers\] \(anchored rows\) \(2, 1, 5\) must hold probability.*sum - 1"):
        sara_loss(d, bad, [0], check=True)
    neg = torch.tensor([1.2, -0.2], dtype=F64)
    with pytest.raises(ValueError, match=r"q \(2,\) must hold probability.*min entry -0.2"):
        js_divergence(torch.tensor([0.5, 0.5]), neg)
    with pytest.raises(ValueError, match=r"target_dist\[:, layers\] \(2, 2, 5\) must hold probability"):
        sara_loss(bad, d, [2, 0])
    sara_loss(d, bad, [0], check=False)  # value checks skipped on request
    with pytest.raises(ValueError, match="must be a float tensor"):
        sara_loss(d, d.long(), [0])
    with pytest.raises(ValueError, match=r"anchor_mask must be a \(2,\) tensor"):
        sara_loss(d, d, [0], torch.tensor([True, False, True]))
    logits = [torch.randn(2, 3, 5) for _ in range(2)]
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] have no real tokens"):
        pool_routing(logits, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"attention_mask must be a \(2, 3\) tensor"):
        pool_routing(logits, torch.ones(2, 4))
    with pytest.raises(ValueError, match="only 0/1"):
        pool_routing(logits, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match=r"router_logits\[1\] \(2, 3, 6\).*differs"):
        pool_routing([logits[0], torch.randn(2, 3, 6)])
    with pytest.raises(ValueError, match=r"router_logits\[0\] must be a \(B, T, E\).*\(B\*T, E\)"):
        pool_routing([torch.randn(6, 5)])
    with pytest.raises(ValueError, match=r"stacked \(B, L, T, E\)"):
        pool_routing(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="no rows"):
        layer_divergence(d, d, torch.zeros(2, dtype=torch.bool))
