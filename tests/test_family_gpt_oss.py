"""
GPT-OSS (families/gpt_oss.py) against transformers' own GptOssForCausalLM (a test oracle only).

Tiny random checkpoints are written by transformers' save_pretrained (the real file layout) and loaded
by both sides; configs exercise every switch: router bias + top-k-then-softmax, expert biases + the
clamped interleaved SwiGLU (a limit small enough that the clamps bite), attention biases and sinks,
YaRN and plain RoPE. Checked in fp32 (max |ours - theirs| <= 1e-5 max |theirs|): logits, per-layer
router logits (raw, bias included), aux loss, loss. MXFP4: our dequantization equals transformers'
on blocks and scales quantized here from random weights by the test's own quantizer, written to a
checkpoint that load_hf then reads; save_hf -> transformers loads -> same logits; one SARA step.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

from checkpoint import config_from_hf, load_model, save_hf, write_safetensors  # noqa: E402
from families import gpt_oss  # noqa: E402
from model import MoEConfig, MoETransformer, gpt_oss_20b_config  # noqa: E402
from sara_loss import pool_routing, sara_loss  # noqa: E402

V = 128
TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            initializer_range=0.2, router_aux_loss_coef=0.01, max_position_embeddings=128,
            sliding_window=6)  # test sequences are 16-24 tokens: the window bites
YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 16, "truncate": False}
CONFIGS = {
    "yarn": dict(rope_parameters=dict(YARN)),
    "yarn_truncated_clamped": dict(rope_parameters={**YARN, "truncate": True, "factor": 4.0,
                                                    "original_max_position_embeddings": 32},
                                   swiglu_limit=0.3, swiglu_alpha=1.3),
    "plain_rope_own_layer_types": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                       layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
}


def hf_config(name):
    return GptOssConfig(**TINY, **CONFIGS[name])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            torch.manual_seed(0)
            model = GptOssForCausalLM(hf_config(name))
            with torch.no_grad():  # biases init to 0 and norms to 1: make them count
                for n, p in model.named_parameters():
                    if n.endswith("bias") or "norm" in n:
                        p.add_(torch.randn_like(p) * 0.1)
            made[name] = tmp_path_factory.mktemp(name)
            model.save_pretrained(made[name])
        return made[name]
    return get


def oracle(path, dtype=torch.float32):
    return GptOssForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                             experts_implementation="eager").eval()


def random_ids(*shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def run_both(theirs, mine, ids, mask=None):
    pos, labels = None, ids
    if mask is not None:  # our positions count real tokens only: give transformers the same
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        predicted_from_real = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
        labels = ids.masked_fill(predicted_from_real == 0, -100)
    with torch.no_grad():
        a = theirs(ids, attention_mask=mask, position_ids=pos, labels=labels, output_router_logits=True)
        b = mine(ids, attention_mask=mask, labels=labels)
    return a, b


def check_parity(a, b, coef, real=None):
    real = torch.ones(a.logits.shape[:2], dtype=torch.bool) if real is None else real.bool()
    la, lb = a.logits[real].float(), b.logits[real].float()
    err = ((la - lb).abs().max() / la.abs().max()).item()
    assert err <= 1e-5, err
    ra = [r.view(*real.shape, -1)[real] for r in a.router_logits]  # transformers: (B*T, E) per layer
    rb = [r[real] for r in b.router_logits]
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        assert (x - y).abs().max() <= 1e-5 * x.abs().max()
    assert abs(a.aux_loss - b.aux_loss) <= 1e-5 * a.aux_loss
    assert abs(a.loss - (b.loss + coef * b.aux_loss)) <= 1e-5 * a.loss  # transformers adds coef * aux
    return err


# -----------------------------------------------------------------------------
# forward parity

@pytest.mark.parametrize("name", CONFIGS)
def test_forward_parity_fp32(hf_dir, name):
    path = hf_dir(name)
    mine = load_model(path, dtype=torch.float32)
    assert mine.config.attn_impl == "eager" and mine.config.attention_sinks  # the family's own settings
    a, b = run_both(oracle(path), mine, random_ids(2, 24))  # 24 > original_max 16: YaRN's long side
    err = check_parity(a, b, mine.config.router_aux_loss_coef)
    print(f"{name}: max rel logit error {err:.2e}")


@pytest.mark.parametrize("name", ["yarn", "plain_rope_own_layer_types"])
def test_greedy_generation_with_the_cache_matches_transformers(hf_dir, name):
    """KV-cache decoding past the window (prompt 10, window 6, 12 new tokens): sinks, the window and
    YaRN on the cached path give transformers' tokens."""
    path = hf_dir(name)
    theirs, mine = oracle(path), load_model(path, dtype=torch.float32)
    ids = random_ids(2, 10, seed=5)
    theirs.generation_config.bos_token_id = theirs.generation_config.eos_token_id = None
    out = theirs.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert mine.generate(ids, max_new_tokens=12) == out[:, 10:].tolist()


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_parity_bf16_bit_for_bit(hf_dir, name):
    """bf16 on CPU with the reference paths (eager attention, per-expert loop): the same bits,
    logits, router logits and aux loss (RMSNorm's weight multiply before the cast back matters:
    rmsnorm_weight_fp32)."""
    path = hf_dir(name)
    mine = load_model(path, dtype=torch.bfloat16, expert_impl="loop")
    a, b = run_both(oracle(path, torch.bfloat16), mine, random_ids(2, 24))
    assert torch.equal(a.logits, b.logits), (a.logits.float() - b.logits.float()).abs().max()
    assert all(torch.equal(x.view_as(y), y) for x, y in zip(a.router_logits, b.router_logits))
    assert torch.equal(a.aux_loss, b.aux_loss)
    ours_loss = b.loss + mine.config.router_aux_loss_coef * b.aux_loss
    assert abs(a.loss - ours_loss) <= 2 * torch.finfo(torch.float32).eps * a.loss


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_both_expert_paths_match_transformers(hf_dir, impl):
    from experts import GROUPED_MM
    if impl == "grouped" and GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    path = hf_dir("yarn_truncated_clamped")
    mine = load_model(path, dtype=torch.float32, expert_impl=impl)
    check_parity(*run_both(oracle(path), mine, random_ids(2, 24, seed=1)), mine.config.router_aux_loss_coef)


@pytest.mark.parametrize("name", ["yarn", "plain_rope_own_layer_types"])
def test_left_padded_batch_parity(hf_dir, name):
    path = hf_dir(name)
    mine = load_model(path, dtype=torch.float32)
    ids = random_ids(3, 16)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    check_parity(*run_both(oracle(path), mine, ids, mask), mine.config.router_aux_loss_coef, real=mask)


def test_every_switch_changes_the_function(hf_dir):
    """Each GPT-OSS switch, turned off in our model alone, moves the logits well past the parity
    tolerance: the parity above is evidence for each of them."""
    path = hf_dir("yarn_truncated_clamped")
    base = load_model(path, dtype=torch.float32)
    ids = random_ids(2, 24)
    with torch.no_grad():
        ref = base(ids).logits
    changes = {"router_softmax_after_topk": False, "swiglu_limit": 100.0, "rope_scaling": None,
               "layer_types": ("full_attention",) * 3}
    for key, value in changes.items():
        other = MoETransformer(MoEConfig.from_dict({**base.config.to_dict(), key: value}))
        other.load_state_dict(base.state_dict())
        with torch.no_grad():
            diff = (other(ids).logits - ref).abs().max() / ref.abs().max()
        # router_softmax_after_topk=False with norm_topk_prob is the same function up to rounding
        assert (diff < 1e-5) if key == "router_softmax_after_topk" else (diff > 1e-3), (key, diff)
    with torch.no_grad():
        for name, p in base.named_parameters():  # sinks, router bias, expert biases each matter
            if name.endswith(("sinks", "router.gate.bias", "gate_up_proj_bias", "down_proj_bias")):
                saved = p.clone()
                p.zero_()
                assert (base(ids).logits - ref).abs().max() > 1e-3 * ref.abs().max(), name
                p.copy_(saved)


def test_router_logits_are_the_raw_biased_logits(hf_dir):
    """out.router_logits = h W_g^T + b, what SARA pools (its full softmax over all E experts)."""
    mine = load_model(hf_dir("yarn"), dtype=torch.float32)
    captured = []
    router = mine.layers[0].mlp.router
    handle = router.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        out = mine(random_ids(1, 8))
    handle.remove()
    expected = captured[0] @ router.gate.weight.T + router.gate.bias
    torch.testing.assert_close(out.router_logits[0], expected, rtol=1e-6, atol=1e-6)


def test_sinks_are_refused_by_a_kernel_that_cannot_take_them():
    with pytest.raises(ValueError, match="attention_sinks=True.*attn_impl='sdpa'.*use attn_impl='eager'"):
        MoEConfig(attention_sinks=True, attn_impl="sdpa")
    with pytest.raises(Exception, match="attn_impl='sdpa'"):
        gpt_oss_20b_config(attn_impl="sdpa")  # (a config only: nothing is built)
    cfg = MoEConfig(n_layers=1, attention_sinks=True, attn_impl="eager")
    model = MoETransformer(cfg)
    cfg.attn_impl = "sdpa"  # edited after the check (as a benchmark switching paths might)
    with pytest.raises(ValueError, match="attention_sinks=True cannot run with attn_impl='sdpa'"):
        model(torch.zeros(1, 4, dtype=torch.long))


# -----------------------------------------------------------------------------
# MXFP4

def quantize_mxfp4(w):
    """The test's own MXFP4 quantizer (OCP MX spec): w (..., n*32) -> blocks (..., n, 16) uint8, scales
    (..., n) uint8. Per block of 32: scale 2^(floor(log2 max|w|) - 2) (FP4's largest exponent is 2),
    each element the nearest FP4 E2M1 value (codes 0-7 positive, 8-15 negative), element 2j in the low
    nibble of byte j."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    w = w.reshape(*w.shape[:-1], -1, 32).float()
    amax = w.abs().amax(-1).clamp(min=2.0 ** -100)
    exp = torch.floor(torch.log2(amax)) - 2
    scaled = (w / torch.exp2(exp)[..., None]).clamp(-6, 6)
    code = (scaled.abs()[..., None] - grid).abs().argmin(-1) + 8 * (scaled < 0)
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_dequantization_equals_transformers(dtype):
    torch.manual_seed(0)
    w = torch.randn(3, 40, 64) * torch.logspace(-3, 2, 40)[None, :, None]  # blocks of very different scales
    blocks, scales = quantize_mxfp4(w)  # (3, 40, 2, 16), (3, 40, 2)
    mine = gpt_oss.dequantize_mxfp4(blocks, scales, dtype)  # (3, 40, 64): our (E, out, in) layout
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (3, 64, 40): their (E, in, out)
    assert mine.dtype == dtype and torch.equal(mine, theirs.transpose(1, 2))
    # and both are the weights back, to FP4's resolution (the test's quantizer is an independent check
    # of nibble order and scale bias): |error| <= half a grid step, <= 1/6 of the block's max (scaled: 1 of 6)
    err = (mine.float() - w).abs().reshape(3, 40, 2, 32).amax(-1)
    assert (err <= w.abs().reshape(3, 40, 2, 32).amax(-1) / 4 + 1e-30).all()
    # random bytes (any nibble, scales across the whole exponent range but overflow)
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 8, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 250, (2, 8, 4), generator=g, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert torch.equal(gpt_oss.dequantize_mxfp4(blocks, scales, dtype), theirs.transpose(1, 2))


def mxfp4_checkpoint(src, dst):
    """A copy of transformers' checkpoint `src` with the expert weights stored as the released
    checkpoints store them: MXFP4 blocks + scales (quantized here), quantization_config mxfp4.
    Returns the dequantized expert weights transformers computes from them, {name: (E, in, out)}."""
    from safetensors.torch import load_file
    tensors = load_file(src / "model.safetensors")
    dequantized = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(tensors.pop(name).transpose(1, 2))  # (E, out, in) rows
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        dequantized[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    dst.mkdir()
    write_safetensors(dst / "model.safetensors", sorted(tensors.items()), metadata={"format": "pt"})
    hf = json.loads((src / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(hf))
    return dequantized


def test_mxfp4_checkpoint_loads_dequantized(hf_dir, tmp_path):
    path = hf_dir("yarn")
    dequantized = mxfp4_checkpoint(path, tmp_path / "mxfp4")
    mine = load_model(tmp_path / "mxfp4", dtype=torch.float32)
    assert torch.equal(mine.layers[1].mlp.gate_up_proj,
                       dequantized["model.layers.1.mlp.experts.gate_up_proj"].transpose(1, 2))
    assert torch.equal(mine.layers[2].mlp.down_proj, dequantized["model.layers.2.mlp.experts.down_proj"].transpose(1, 2))
    # the oracle: transformers' model with its own dequantized weights in place
    theirs = oracle(path)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name in dequantized:
                p.copy_(dequantized[name])
    check_parity(*run_both(theirs, mine, random_ids(2, 24)), mine.config.router_aux_loss_coef)


def test_mxfp4_checkpoint_loads_in_bf16_and_saves_plain_bf16_that_transformers_loads(hf_dir, tmp_path):
    """The released path: MXFP4 experts -> bf16 model -> save_hf writes plain bf16 (no
    quantization_config) -> transformers' model from it gives our logits bit for bit."""
    mxfp4_checkpoint(hf_dir("yarn"), tmp_path / "mxfp4")
    mine = load_model(tmp_path / "mxfp4", dtype=torch.bfloat16, expert_impl="loop")
    assert mine.layers[0].mlp.gate_up_proj.dtype == torch.bfloat16
    save_hf(mine, tmp_path / "plain")
    hf = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in hf and hf["torch_dtype"] == "bfloat16"
    theirs = oracle(tmp_path / "plain", torch.bfloat16)
    a, b = run_both(theirs, mine, random_ids(2, 24))
    assert torch.equal(a.logits, b.logits)


def test_mxfp4_blocks_of_the_wrong_shape_are_named_before_reading(hf_dir, tmp_path):
    from checkpoint import CheckpointError
    from safetensors.torch import load_file
    mxfp4_checkpoint(hf_dir("yarn"), tmp_path / "ok")
    tensors = load_file(tmp_path / "ok" / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name][:, :, :1].contiguous()
    (tmp_path / "bad").mkdir()
    write_safetensors(tmp_path / "bad" / "model.safetensors", sorted(tensors.items()))
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=f"{name}.*expected uint8"):
        load_model(tmp_path / "bad")


def test_other_quantization_methods_are_refused():
    from checkpoint import CheckpointError
    hf = hf_config("yarn").to_dict()
    hf["quantization_config"] = {"quant_method": "fp8"}
    with pytest.raises(CheckpointError, match="quantization_config.*except \\['mxfp4'\\]"):
        config_from_hf(hf)


@pytest.mark.parametrize("change,pattern", [
    ({"layer_types": ["sliding_attention"]}, "layer_types=.*expected num_hidden_layers=3"),
    ({"layer_types": ["sliding_attention", "full_attention", "local"]}, "layer_types="),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "yarn rope_scaling without original_max_position_embeddings"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "RoPE type 'longrope' for gpt_oss"),
])
def test_bad_gpt_oss_configs_are_named(change, pattern):
    from checkpoint import CheckpointError
    hf = {**hf_config("yarn").to_dict(), **change}
    with pytest.raises(CheckpointError, match=pattern):
        config_from_hf(hf)


# -----------------------------------------------------------------------------
# save -> transformers

def test_save_then_transformers_loads_the_same_model(tmp_path):
    cfg = MoEConfig(**{**gpt_oss.PRESET, "vocab_size": V, "hidden_size": 64, "n_layers": 2, "n_heads": 4,
                       "n_kv_heads": 2, "head_dim": 16, "n_experts": 4, "top_k": 2, "moe_intermediate_size": 32,
                       "intermediate_size": 32, "swiglu_limit": 0.5, "max_position_embeddings": 128,
                       "init_std": 0.2, "sliding_window": 6, "layer_types": ("sliding_attention", "full_attention"),
                       "rope_scaling": {**gpt_oss.PRESET["rope_scaling"], "factor": 8.0,
                                                         "original_max_position_embeddings": 16}})
    torch.manual_seed(0)
    mine = MoETransformer(cfg).eval()
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    save_hf(mine, tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["architectures"] == ["GptOssForCausalLM"] and "quantization_config" not in hf
    assert config_from_hf(hf) == cfg
    theirs = oracle(tmp_path / "out")
    check_parity(*run_both(theirs, mine, random_ids(2, 24)), cfg.router_aux_loss_coef)
    # and back: transformers' own save loads as the same model
    theirs.save_pretrained(tmp_path / "again")
    again = load_model(tmp_path / "again", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), mine.state_dict().values()))


# -----------------------------------------------------------------------------
# SARA on GPT-OSS

def test_one_sara_training_step(hf_dir):
    """The SARA term on GPT-OSS pools the full softmax over all E experts of the raw (biased) router
    logits; its gradient reaches the router (bias included), and one AdamW step on
    CE + lambda_LB aux + JS lowers that objective."""
    model = load_model(hf_dir("yarn"), dtype=torch.float32).train()
    anchor_ids, target_ids = random_ids(2, 12, seed=3), random_ids(2, 12, seed=4)
    with torch.no_grad():
        anchor = pool_routing(model(anchor_ids).router_logits)  # (B, L, E), the original model's
    layers = [0, 1, 2]
    coef = model.config.router_aux_loss_coef

    def objective():
        out = model(target_ids, labels=target_ids)
        js = sara_loss(pool_routing(out.router_logits), anchor, layers)
        return out.loss + coef * out.aux_loss + js, js

    loss, js = objective()
    assert js > 0
    bias = model.layers[1].mlp.router.gate.bias
    (js_grad_bias,) = torch.autograd.grad(js, bias, retain_graph=True)
    assert js_grad_bias.abs().sum() > 0  # the JS term moves the router bias
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.layers[0].self_attn.sinks.grad.abs().sum() > 0
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    with torch.no_grad():
        after, _ = objective()
    assert after < loss.detach()
