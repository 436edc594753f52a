"""
OLMoE (`model_type: olmoe`) against transformers' own OlmoeForCausalLM, on tiny random checkpoints
written (sharded) by transformers itself, one per switch: the release's settings (softmax top-k
without renormalisation, no clip), clip_qkv set low enough to clamp most of q / k / v, and
norm_topk_prob with attention biases. Checked as tests/test_hf_parity.py does: logits, router logits,
aux loss and loss in fp32 (within 1e-5 relative) and bf16 on CPU (bit for bit; eager attention,
per-expert loop), left padding, greedy generation with the KV cache, our save -> transformers (with
vLLM's architecture name) -> ours, a short SARA run, and the switches we do not implement.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import OlmoeConfig, OlmoeForCausalLM  # noqa: E402

import families  # noqa: E402
from checkpoint import load_model, save_hf  # noqa: E402
from hf_config import CheckpointError, config_from_hf, config_to_hf  # noqa: E402
from model import MoEConfig, MoETransformer  # noqa: E402
from test_hf_parity import check_parity, hf_generate, oracle, ours, random_ids, run_both  # noqa: E402

V = 128
BASE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=32, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01,
            initializer_range=0.2, max_position_embeddings=128)
VARIANTS = {
    "olmoe": dict(),  # as released: norm_topk_prob false, clip_qkv null, no biases
    "olmoe_clip": dict(clip_qkv=0.3),
    "olmoe_norm_topk_bias": dict(norm_topk_prob=True, attention_bias=True),
}


def make_dir(path, vocab_size=V, **change):
    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig(**{**BASE, "vocab_size": vocab_size, **change}))
    with torch.no_grad():  # transformers initialises biases to 0 and norms to 1: make them count
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size="40KB")  # sharded, as the real checkpoint is
    return path


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = make_dir(tmp_path_factory.mktemp(name), **VARIANTS[name])
        return made[name]
    return get


def test_config_maps_the_switches(olmoe_dir):
    path = olmoe_dir("olmoe_clip")
    assert (path / "model.safetensors.index.json").exists()
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    assert (cfg.router, cfg.norm_topk_prob, cfg.qk_norm, cfg.qk_norm_scope, cfg.clip_qkv) == (
        "topk", False, True, "whole", 0.3)
    assert cfg.moe_layers == [0, 1, 2] and cfg.head_dim == 16 and cfg.moe_intermediate_size == 32
    model = MoETransformer(cfg)
    # the whole-projection norms: one weight per channel of q (nh*hd) and of k (nkv*hd)
    assert model.layers[0].self_attn.q_norm.weight.shape == (64,)
    assert model.layers[0].self_attn.k_norm.weight.shape == (32,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_parity(olmoe_dir, name, dtype):
    path = olmoe_dir(name)
    mine = ours(path, dtype)
    a, b = run_both(oracle(path, dtype), mine, random_ids(2, 20))
    err = check_parity(a, b, mine.config.router_aux_loss_coef, exact=dtype == torch.bfloat16)
    print(f"{name} {dtype}: max rel logit error {err:.2e}")


def test_clip_and_whole_norm_each_matter(olmoe_dir):
    """The switches are live in the tiny model: without the clamp, or with a per-head norm in place
    of the whole-projection one, the logits move far past the parity tolerance."""
    path = olmoe_dir("olmoe_clip")
    mine = ours(path, torch.float32)
    ids = random_ids(2, 20)
    with torch.no_grad():
        ref = mine(ids).logits
        mine.config.clip_qkv = None
        unclipped = mine(ids).logits
    assert (ref - unclipped).abs().max() > 1e-2 * ref.abs().max()
    mine.config.clip_qkv = 0.3
    # the per-head norm over the same activations (weights folded as 1): a different function
    q = torch.randn(2, 5, 4 * 16)
    whole = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-5)
    per_head = q.view(2, 5, 4, 16)
    per_head = (per_head * torch.rsqrt(per_head.pow(2).mean(-1, keepdim=True) + 1e-5)).view(2, 5, 64)
    assert (whole - per_head).abs().max() > 1e-2
    # and the router does not renormalise: the top-2 weights of a token sum to less than 1
    router = mine.layers[0].mlp.router
    weights, _, _ = router(torch.randn(7, 64))
    assert (weights.sum(-1) < 1 - 1e-3).all()


def test_left_padded_batch_parity(olmoe_dir):
    path = olmoe_dir("olmoe_clip")
    mine = ours(path, torch.float32)
    ids = random_ids(3, 16)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    a, b = run_both(oracle(path, torch.float32), mine, ids, mask)
    check_parity(a, b, mine.config.router_aux_loss_coef, exact=False, real=mask)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_greedy_generation_matches_transformers(olmoe_dir, attn_impl):
    path = olmoe_dir("olmoe_clip")
    theirs = oracle(path, torch.float32)
    mine = load_model(path, dtype=torch.float32, attn_impl=attn_impl, expert_impl="loop")
    ids = random_ids(1, 7, seed=1)
    expected = hf_generate(theirs, ids, None, 16, set())
    assert mine.generate(ids, 16) == expected and len(expected[0]) == 16
    ids = random_ids(2, 7, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert mine.generate(ids, 16, attention_mask=mask) == hf_generate(theirs, ids, mask, 16, set())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_hf_loads_in_transformers_and_back(olmoe_dir, tmp_path, dtype):
    mine = ours(olmoe_dir("olmoe_clip"), dtype)
    save_hf(mine, tmp_path / "ours", max_shard_size="40KB")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == ["OlmoeForCausalLM"]  # vLLM's registry name
    assert (written["model_type"], written["clip_qkv"], written["norm_topk_prob"]) == ("olmoe", 0.3, False)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert "model.layers.2.self_attn.q_norm.weight" in index["weight_map"]
    theirs = oracle(tmp_path / "ours", dtype)
    a, b = run_both(theirs, mine, random_ids(2, 20))
    check_parity(a, b, mine.config.router_aux_loss_coef, exact=dtype == torch.bfloat16)
    theirs.save_pretrained(tmp_path / "again", max_shard_size="40KB")
    again = load_model(tmp_path / "again", dtype=dtype, attn_impl="eager", expert_impl="loop")
    ids = random_ids(2, 20)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, mine(ids).logits)


def test_config_of_each_family_is_saved_as_that_family():
    tiny = dict(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=16,
                n_experts=4, top_k=2, moe_intermediate_size=16, norm_topk_prob=False)
    assert config_to_hf(MoEConfig(**tiny, qk_norm=True, qk_norm_scope="whole"))["model_type"] == "olmoe"
    assert config_to_hf(MoEConfig(**tiny, qk_norm=True))["model_type"] == "qwen3_moe"
    # a whole-projection norm with a head_dim OLMoE cannot express is no family: never saved as Qwen3
    with pytest.raises(CheckpointError, match=r"unmet: qwen3_moe \[\"qk_norm_scope == 'head'\"\]"):
        config_to_hf(MoEConfig(**tiny, head_dim=16, qk_norm=True, qk_norm_scope="whole"))
    # a sliding window on a Qwen3 / OLMoE-shaped config: no family carries it, so no silent drop
    with pytest.raises(CheckpointError, match=r"sliding_window == None"):
        config_to_hf(MoEConfig(**tiny, qk_norm=True, sliding_window=8))


@pytest.mark.parametrize("change,switch", [
    ({"head_dim": 16}, "head_dim=16 != hidden_size / num_attention_heads"),
    ({"clip_qkv": -1.0}, "clip_qkv=-1.0 (expected a positive number or null)"),
    ({"clip_qkv": "8"}, "clip_qkv='8'"),
    ({"sliding_window": 16}, "sliding_window=16 (sliding-window attention is not implemented for olmoe)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "RoPE type 'yarn' for olmoe"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"norm_topk_prob": "no"}, "norm_topk_prob='no' (expected true or false)"),
])
def test_unimplemented_or_invalid_switches_are_named(change, switch):
    hf = {**config_to_hf(MoEConfig(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4,
                                   top_k=2, moe_intermediate_size=16, norm_topk_prob=False, qk_norm=True,
                                   qk_norm_scope="whole")), **change}
    with pytest.raises(CheckpointError) as err:
        config_from_hf(hf, source="/o/config.json")
    assert switch in str(err.value) and str(err.value).startswith("/o/config.json: ")


def test_moe_config_checks_the_new_switches():
    with pytest.raises(ValueError, match=r"qk_norm_scope='layer' is not one of"):
        MoEConfig(qk_norm=True, qk_norm_scope="layer")
    with pytest.raises(ValueError, match=r"clip_qkv=0 must be a positive number"):
        MoEConfig(clip_qkv=0)


def test_short_sara_run(tmp_path, tok):
    """Three SARA steps (methods/sara.py through loop.train_phase) on a tiny OLMoE loaded from a
    transformers directory with the toy vocabulary: the JS term is logged and positive, the loss
    finite, the weights move, and the result saves as an OLMoE directory transformers loads."""
    from anchors import build_anchors
    from data.parallel import load_parallel_jsonl, tokenize_samples
    from loop import Dist, Run, train_phase
    from methods.sara import Sara
    from settings import TrainSettings
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = [r for r in load_parallel_jsonl(os.path.join(root, "data/udhr/parallel.jsonl")) if r["lang"] == "sw"][:4]
    examples = tokenize_samples(tok, rows, 48)[0]
    path = make_dir(tmp_path / "hf", vocab_size=tok.vocab_size, clip_qkv=0.3)
    model = load_model(path, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anchors = build_anchors(model, examples, pad_id=tok.pad_id, batch_size=4)
    s = TrainSettings(global_batch=4, micro_batch=2, log_interval=1, eval_interval=1000, ckpt_interval=1000, lr=3e-3)
    run = Run(s, Dist(), pad_id=tok.pad_id, metrics_path=str(tmp_path / "metrics.jsonl"), quiet=True)
    records = train_phase(run, "sara", model.train(), examples, 3, 3e-3, Sara(anchors, [1, 2], 1.0), None, None)
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(r["js"] >= 0 for r in records) and records[-1]["js"] > 0
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    save_hf(model.eval(), tmp_path / "out")
    theirs = oracle(tmp_path / "out", torch.float32)
    ids = torch.tensor([examples[0]["input_ids"][:20]])
    a, b = run_both(theirs, model, ids)
    check_parity(a, b, model.config.router_aux_loss_coef, exact=False)


def test_family_is_registered():
    assert families.get("olmoe") is families.olmoe and families.by_architecture("OlmoeForCausalLM") is families.olmoe


@pytest.mark.parametrize("path,band", [("configs/olmoe.py", (2, 11)), ("configs/phi_mini_moe.py", (13, 26))])
def test_config_files_are_valid_train_settings(path, band):
    from settings import TrainSettings
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the files leave the checkpoint and data paths to the command line, as configs/phi35.py does
    s, sources = TrainSettings.from_argv([os.path.join(root, path), "--init_from=/ckpt", "--data_path=/d.jsonl"])
    assert tuple(s.sara_band) == band and sources["sara_band"].startswith(os.path.join(root, path))


@pytest.mark.parametrize("name,total,active", [("olmoe", 6.919e9, 1.282e9), ("phi_mini", 7.648e9, 2.363e9)])
def test_memory_models_are_the_real_sizes(name, total, active):
    """memory.py's presets: OLMoE-1B-7B's 6.9B / 1.3B and Phi-mini-MoE's 7.6B / 2.4B (model cards)."""
    import memory
    with torch.device("meta"):
        model = MoETransformer(memory.MODELS[name][0]())
    assert model.num_params() == pytest.approx(total, rel=1e-3)
    assert model.num_params(active=True) == pytest.approx(active, rel=1e-3)


def test_tulu_chat_layout_with_the_toy_tokenizer():
    """OLMoE's chat markers are text, not special tokens: in the toy tokenizer too (2 specials, so a
    4,093-token vocabulary); a chat is the template's text encoded as such, the response ends with
    <|endoftext|>. (The toy cannot be exported in this layout: docs/architectures.md, "OLMoE".)"""
    from conftest import TOY_TOKENIZER
    from tokenizer import load_tokenizer
    tok = load_tokenizer(TOY_TOKENIZER, chat_format="tulu")
    assert tok.vocab_size == 4093 and set(tok.special_ids) == {"<|endoftext|>", "<|padding|>"}
    prompt, response = tok.encode_chat("Hi", "Yo")
    assert prompt == tok.encode("<|user|>\nHi\n<|assistant|>\n")
    assert response == tok.encode("Yo") + [tok.special_ids["<|endoftext|>"]] and tok.eos_id == response[-1]
    assert tok.pad_id == tok.special_ids["<|padding|>"] and tok.stop_ids == {tok.eos_id}
