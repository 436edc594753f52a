"""
The small Phi MoE models (Phi-mini-MoE / Phi-tiny-MoE, SlimMoE cuts of Phi-3.5-MoE; `model_type:
phimoe`) against transformers' own PhimoeForCausalLM: what they add to Phi-3.5-MoE is an explicit
head_dim that is not hidden / heads and a sliding window on every layer (config.json's
sliding_window; transformers' PhimoeConfig has no layer_types). The window is shorter than the test
sequences, so it cuts attention in every check. Same checks and tolerances as tests/test_hf_parity.py:
fp32 within 1e-5 relative, bf16 on CPU bit for bit (eager attention, per-expert loop), greedy
generation with the KV cache, left padding, sharded load and save both ways, a short SARA run.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import PhimoeConfig, PhimoeForCausalLM  # noqa: E402

from checkpoint import config_from_hf, load_model, save_hf  # noqa: E402
from model import MoEConfig, MoETransformer  # noqa: E402
from test_hf_parity import check_parity, hf_generate, oracle, ours, random_ids, run_both  # noqa: E402

V = 128
WINDOW = 6
# head_dim 24 != hidden / heads = 16, as Phi-tiny-MoE has 128 != 4096 / 16 (families/phimoe.py SLIM_PRESETS)
SMALL = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=24, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
             attention_bias=True, lm_head_bias=True, max_position_embeddings=64, sliding_window=WINDOW,
             router_aux_loss_coef=0.01, initializer_range=0.2, bos_token_id=1, eos_token_id=2)


def make_dir(path, **change):
    torch.manual_seed(0)
    model = PhimoeForCausalLM(PhimoeConfig(**{**SMALL, **change}))
    with torch.no_grad():  # transformers initialises biases to 0 and norms to 1: make them count
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size="40KB")  # sharded, as the real checkpoints are
    return path


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return make_dir(tmp_path_factory.mktemp("phi_small"))


def test_config_reads_head_dim_and_window(small_dir):
    cfg = config_from_hf(json.loads((small_dir / "config.json").read_text()))
    assert (cfg.head_dim, cfg.sliding_window, cfg.layer_types) == (24, WINDOW, None)
    assert [cfg.attention_window(i) for i in range(3)] == [WINDOW] * 3
    assert (small_dir / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_parity_past_the_window(small_dir, dtype):
    theirs, mine = oracle(small_dir, dtype), ours(small_dir, dtype)
    a, b = run_both(theirs, mine, random_ids(2, 20))  # 20 > WINDOW
    err = check_parity(a, b, mine.config.router_aux_loss_coef, exact=dtype == torch.bfloat16)
    print(f"phi small {dtype}: max rel logit error {err:.2e}")


def test_sdpa_path_applies_the_window(small_dir):
    # our default attention (SDPA with the window mask) against transformers' eager: fp32 tolerance
    mine = load_model(small_dir, dtype=torch.float32, attn_impl="sdpa", expert_impl="loop")
    a, b = run_both(oracle(small_dir, torch.float32), mine, random_ids(2, 20))
    check_parity(a, b, mine.config.router_aux_loss_coef, exact=False)


def test_the_window_changes_exactly_the_positions_past_it(small_dir):
    windowed = ours(small_dir, torch.float32)
    full = ours(small_dir, torch.float32)
    full.config.sliding_window = None  # the same weights with full causal attention
    ids = random_ids(2, 20)
    with torch.no_grad():
        a, b = windowed(ids).logits, full(ids).logits
    # positions < WINDOW see all their keys either way; every later one loses some
    assert torch.equal(a[:, :WINDOW], b[:, :WINDOW])
    assert all((a[:, t] - b[:, t]).abs().max() > 1e-3 for t in range(WINDOW, 20))


def test_left_padded_batch_parity(small_dir):
    mine = ours(small_dir, torch.float32)
    ids = random_ids(3, 16)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    a, b = run_both(oracle(small_dir, torch.float32), mine, ids, mask)
    check_parity(a, b, mine.config.router_aux_loss_coef, exact=False, real=mask)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_greedy_generation_with_kv_cache_past_the_window(small_dir, attn_impl):
    theirs = oracle(small_dir, torch.float32)
    mine = load_model(small_dir, dtype=torch.float32, attn_impl=attn_impl, expert_impl="loop")
    n = 20  # prompt 4 + 20 new tokens: decoding runs far past the window
    ids = random_ids(1, 4, seed=1)
    expected = hf_generate(theirs, ids, None, n, set())
    assert mine.generate(ids, n) == expected and len(expected[0]) == n
    ids = random_ids(2, 7, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert mine.generate(ids, n, attention_mask=mask) == hf_generate(theirs, ids, mask, n, set())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_hf_loads_in_transformers_and_back(small_dir, tmp_path, dtype):
    mine = ours(small_dir, dtype)
    save_hf(mine, tmp_path / "ours", max_shard_size="40KB")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == ["PhiMoEForCausalLM"]  # vLLM's registry name
    assert (written["head_dim"], written["sliding_window"]) == (24, WINDOW)
    assert len(set(json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())["weight_map"]
                   .values())) > 2
    a, b = run_both(oracle(tmp_path / "ours", dtype), mine, random_ids(2, 20))
    check_parity(a, b, mine.config.router_aux_loss_coef, exact=dtype == torch.bfloat16)
    assert config_from_hf(written) == mine.config.__class__(**{**mine.config.to_dict(), "attn_impl": "sdpa",
                                                               "expert_impl": "auto"})


@pytest.mark.parametrize("change,pattern", [
    (dict(sliding_window=0), r"sliding_window=0 \(expected a positive integer or null\)"),
    (dict(sliding_window="6"), r"sliding_window='6' \(expected a positive integer or null\)"),
])
def test_bad_window_in_config_json_is_named(change, pattern):
    hf = PhimoeConfig(**SMALL).to_dict()
    hf.update(change)
    with pytest.raises(ValueError, match=pattern):
        config_from_hf(hf)


@pytest.mark.parametrize("change,pattern", [
    (dict(sliding_window=0), r"sliding_window=0 must be a positive integer"),
    (dict(layer_types=["full_attention"]), r"layer_types has 1 entries, expected n_layers=2"),
    (dict(layer_types=["full_attention", "local"], sliding_window=4), r"layer_types \['local'\] are not among"),
    (dict(layer_types=["full_attention", "sliding_attention"]), r"'sliding_attention' layers but sliding_window"),
])
def test_bad_window_in_moe_config_is_named(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(n_layers=2, **change)


def test_layer_types_pick_the_windowed_layers():
    cfg = MoEConfig(n_layers=3, sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                                "sliding_attention"])
    assert [cfg.attention_window(i) for i in range(3)] == [4, None, 4]
    assert [MoEConfig(n_layers=2, sliding_window=4).attention_window(i) for i in range(2)] == [4, 4]
    assert MoEConfig(n_layers=2).attention_window(1) is None
    # phimoe cannot express per-layer types: such a model is not saved as phimoe
    from hf_config import CheckpointError, family_of
    from model import phi35_moe_config
    with pytest.raises(CheckpointError, match="layer_types == None"):
        family_of(phi35_moe_config(n_layers=2, sliding_window=4, layer_types=["full_attention"] * 2))
