"""The speed paths compute the same function as the plain ones: chunked lm_head + cross-entropy,
flash-style causal SDPA with native GQA, and the grouped expert dispatch inside a whole model."""
import pytest
import torch
import torch.nn.functional as F

from model import MoEConfig, MoETransformer, chunked_cross_entropy

SMALL = dict(vocab_size=97, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
             intermediate_size=48, n_experts=6, top_k=2, moe_intermediate_size=16)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_matches_plain(chunk, with_bias):
    g = torch.Generator().manual_seed(chunk)
    N, H, V = 64, 16, 50
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100
    params = [t for t in (h, w, b) if t is not None]
    results = []
    for fn in (lambda: F.cross_entropy(F.linear(h, w, b), targets, ignore_index=-100),
               lambda: chunked_cross_entropy(h, w, b, targets, chunk)):
        loss = fn()
        grads = torch.autograd.grad(3.0 * loss, params)  # a non-unit incoming gradient
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) <= 1e-6 * loss_a
    for ga, gb in zip(grads_a, grads_b):
        assert (ga - gb).abs().max() <= 1e-6 * ga.abs().max()


def test_chunked_cross_entropy_without_grad():
    h, w = torch.randn(10, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (10,))
    with torch.no_grad():
        loss = chunked_cross_entropy(h, w, None, targets, 3)
    assert torch.allclose(loss, F.cross_entropy(h @ w.T, targets), atol=1e-6)


@pytest.mark.parametrize("router", ["topk", "sparsemixer"])
def test_model_chunked_loss_same_loss_and_gradients(router):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    results = []
    for chunk in (0, 5):
        torch.manual_seed(0)
        model = MoETransformer(MoEConfig(**SMALL, router=router, lm_head_bias=True,
                                         loss_chunk_size=chunk)).eval()  # eval: no router noise
        out = model(ids, labels=labels)
        assert (out.logits is None) == (chunk > 0)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) <= 1e-6 * loss_a
    for n, ga in grads_a.items():
        assert (ga - grads_b[n]).abs().max() <= 1e-5 * ga.abs().max() + 1e-12, n


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_sdpa_causal_gqa_matches_eager(impl):
    # no mask and no cache: SDPA runs is_causal with enable_gqa; eager builds the mask itself
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = []
    for attn_impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = MoETransformer(MoEConfig(**SMALL, attn_impl=attn_impl, expert_impl=impl)).eval()
        logits.append(model(ids).logits)
    assert (logits[0] - logits[1]).abs().max() <= 1e-5 * logits[0].abs().max()
    # and the same as an explicit all-ones attention mask (the masked SDPA path)
    masked = model(ids, attention_mask=torch.ones_like(ids)).logits
    assert (masked - logits[1]).abs().max() <= 1e-5 * logits[0].abs().max()
