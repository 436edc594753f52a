"""The MoE transformer: masking, padding, dispatch paths, gradients, caching, configs."""
import pytest
import torch

from experts import experts_grouped, experts_loop
from model import (MoEConfig, MoETransformer, KVCache,
                   qwen3_30b_a3b_config, phi35_moe_config)

SMALL = dict(vocab_size=97, hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2,
             intermediate_size=48, n_experts=6, top_k=2, moe_intermediate_size=16)


def small_qwen(**kw):
    return MoEConfig(**{**SMALL, "head_dim": 12, "qk_norm": True, "mlp_only_layers": (1,), **kw})


def small_phi(**kw):
    rs = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(4)],
          "long_factor": [3.0 + 0.5 * i for i in range(4)], "original_max_position_embeddings": 8}
    return MoEConfig(**{**SMALL, "router": "sparsemixer", "norm": "layernorm", "norm_eps": 1e-5,
                        "attention_bias": True, "lm_head_bias": True, "rope_scaling": rs,
                        "max_position_embeddings": 32, **kw})


CONFIGS = {"qwen": small_qwen, "phi": small_phi, "toy": lambda **kw: MoEConfig(**{**SMALL, **kw})}


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    model = MoETransformer(CONFIGS[name](**kw))
    with torch.no_grad():  # non-zero biases, so that tests exercise them
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_causal(name, attn_impl):
    model = make(name, attn_impl=attn_impl)
    ids = torch.randint(0, 97, (2, 7))
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 97
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_padding_left_and_right_match_unpadded(name, attn_impl):
    model = make(name, attn_impl=attn_impl)
    ids = torch.randint(0, 97, (1, 6))
    alone = model(ids).logits[0]
    pad = torch.full((1, 3), 5)
    right = model(torch.cat([ids, pad], 1), attention_mask=torch.tensor([[1] * 6 + [0] * 3])).logits[0, :6]
    left = model(torch.cat([pad, ids], 1), attention_mask=torch.tensor([[0] * 3 + [1] * 6])).logits[0, 3:]
    assert torch.allclose(alone, right, atol=1e-5)
    assert torch.allclose(alone, left, atol=1e-5)
    # and in a batch with another, longer row
    other = torch.randint(0, 97, (1, 9))
    batch = torch.cat([torch.cat([pad, ids], 1), other])
    mask = torch.tensor([[0] * 3 + [1] * 6, [1] * 9])
    out = model(batch, attention_mask=mask).logits
    assert torch.allclose(out[0, 3:], alone, atol=1e-5)
    assert torch.allclose(out[1], model(other).logits[0], atol=1e-5)


def _dispatch_inputs(dtype, n=50, e=5, k=2, h=16, i=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    ids[:, 0] = torch.where(ids[:, 0] == e - 1, 0, ids[:, 0])  # make expert e-1 rare ...
    ids[:, 1] = torch.where(ids[:, 1] == e - 1, ids[:, 0] + 1, ids[:, 1]) % (e - 1)  # ... unused
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % (e - 1), ids[:, 1])
    w = torch.rand(n, k, generator=g).to(dtype).requires_grad_()
    gate_up = (torch.randn(e, 2 * i, h, generator=g) * 0.3).to(dtype).requires_grad_()
    down = (torch.randn(e, h, i, generator=g) * 0.3).to(dtype).requires_grad_()
    return x, ids, w, gate_up, down


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_dispatch_paths_agree_forward_and_backward(dtype, tol):
    inputs = _dispatch_inputs(dtype)
    assert not (inputs[1] == 4).any()  # expert 4 chosen by no token
    results = []
    for fn in (experts_loop, experts_grouped):
        for t in inputs:
            if t.requires_grad:
                t.grad = None
        out = fn(*inputs)
        out.sum().backward()  # a broadcast (stride-0) gradient: grouped_mm must cope
        grads = [t.grad.clone() for t in inputs if t.requires_grad]
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    scale = out_a.abs().max()
    assert (out_a - out_b).abs().max() <= tol * scale
    for ga, gb in zip(grads_a, grads_b):
        assert (ga.float() - gb.float()).abs().max() <= tol * ga.float().abs().max()
    # unused expert: zero (not missing) gradient in both paths
    for _, grads in results:
        assert torch.all(grads[2][4] == 0) and torch.all(grads[3][4] == 0)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_parameter_gets_a_gradient(name, impl):
    # top-1 of 6 experts over 3 tokens: most experts are chosen by no token in a step
    model = make(name, expert_impl=impl, top_k=1 if name != "phi" else 2).train()
    ids = torch.randint(0, 97, (1, 3))
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_decoding_matches_full_forward(name):
    model = make(name, max_position_embeddings=64)
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # row 1 left-padded
    full = model(ids, attention_mask=mask).logits
    cache = KVCache(model.config, 2, 12, torch.device("cpu"), torch.float32)
    step_logits = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits]
    for t in range(5, 12):
        step_logits.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits)
    steps = torch.cat(step_logits, 1)
    if name == "phi":
        # LongRoPE switches past 8 positions, and a cache keeps the short-factor keys of the
        # prefix: steps before the switch equal a full forward over those 8 positions
        prefix = model(ids[:, :8], attention_mask=mask[:, :8]).logits
        assert torch.allclose(prefix[0], steps[0, :8], atol=1e-5)
        assert torch.allclose(prefix[1, 3:], steps[1, 3:8], atol=1e-5)
    else:
        assert torch.allclose(full[0], steps[0], atol=1e-5)
        assert torch.allclose(full[1, 3:], steps[1, 3:], atol=1e-5)


def test_longrope_switches_past_original_max():
    model = make("phi")
    ids = torch.randint(0, 97, (1, 12))
    short = model(ids[:, :8]).logits  # 8 <= original_max: short factors
    long = model(ids).logits[:, :8]  # 12 > 8: every position uses the long factors
    assert (short - long).abs().max() > 1e-4  # (the model is small: logits are ~0.1)
    # with long_factor == short_factor and equal mscales the branch makes no difference
    cfg = small_phi()
    cfg.rope_scaling = {**cfg.rope_scaling, "long_factor": cfg.rope_scaling["short_factor"],
                        "short_mscale": 1.1, "long_mscale": 1.1}
    torch.manual_seed(0)
    same = MoETransformer(cfg).eval()
    assert torch.allclose(same(ids[:, :8]).logits, same(ids).logits[:, :8], atol=1e-5)


def test_gradient_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = make("qwen", gradient_checkpointing=ckpt).train()
        ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_loss_convention_and_aux_outputs():
    model = make("qwen")
    ids = torch.randint(0, 97, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, 2:5].reshape(-1, 97), ids[:, 3:6].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)
    assert len(out.router_logits) == 2  # layers 0 and 2; layer 1 is dense (mlp_only_layers)
    assert out.router_logits[0].shape == (2, 6, 6)
    assert model(ids).loss is None


def test_toy_model_overfits_a_small_batch():
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(**SMALL)).train()
    ids = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(ids, labels=ids)
        opt.zero_grad()
        (out.loss + 0.01 * out.aux_loss).backward()
        opt.step()
    assert out.loss.item() < 0.1, out.loss.item()


def test_real_architectures_instantiate_small():
    # the real configs with every dimension shrunk; structure (norms, biases, router, qk-norm) kept
    shrink = dict(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, head_dim=16,
                  intermediate_size=40, moe_intermediate_size=8, n_experts=4)
    for cfg in (qwen3_30b_a3b_config(**shrink, n_kv_heads=2, top_k=2),
                phi35_moe_config(**shrink, n_kv_heads=2)):
        model = MoETransformer(cfg)
        ids = torch.randint(0, 64, (2, 5))
        out = model(ids, labels=ids)
        assert out.logits.shape == (2, 5, 64) and torch.isfinite(out.loss)
        assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2, 5, 4)
    big = qwen3_30b_a3b_config()
    assert big.head_dim == 128 and big.qk_norm and big.moe_layers == list(range(48))


def test_param_counts_of_real_configs():
    # total / active parameters of the released models (30.5B / 3.3B and 41.9B / 6.6B), counted
    # on the meta device so nothing is allocated
    for make_cfg, total, active in ((qwen3_30b_a3b_config, 30.5, 3.3), (phi35_moe_config, 41.9, 6.6)):
        with torch.device("meta"):
            model = MoETransformer(make_cfg())
        assert abs(model.num_params() / 1e9 - total) < 0.1
        assert abs(model.num_params(active=True) / 1e9 - active) < 0.1


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="n_kv_heads"):
        MoEConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="router"):
        MoEConfig(router="hash")
    with pytest.raises(ValueError, match="unknown keys.*bogus"):
        MoEConfig.from_dict({"bogus": 1})
    model = make("toy")
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
