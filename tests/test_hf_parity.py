"""
Parity with transformers' Qwen3-MoE and Phi-3.5-MoE (transformers is a test oracle only, never
imported by the product).

Tiny random checkpoints are built and written by transformers itself, so they have the real file
layout, and loaded by both sides. Checked: logits, per-layer router logits, loss with labels and the
aux loss, in fp32 (max |ours - theirs| <= 1e-5 max |theirs|) and bf16 on CPU (bit for bit); greedy
generation; ours -> save_hf -> transformers; config.json in the 4.x spelling.
Oracles run attn_implementation="eager" and experts_implementation="eager": transformers' default
sdpa / grouped_mm paths differ from eager by ~4e-3 in bf16. initializer_range 0.2 keeps routing
away from near-ties that would flip a top-k between two correct implementations.
"""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModelForCausalLM, PhimoeConfig, PhimoeForCausalLM,  # noqa: E402
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

from checkpoint import config_from_hf, load_model, save_hf  # noqa: E402
from model import MoEConfig, MoETransformer, phi35_moe_config  # noqa: E402

V = 128
TINY = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            initializer_range=0.2)
QWEN = {  # head_dim 24 != hidden / heads = 16 in all three
    "qwen_norm_topk": dict(norm_topk_prob=True, mlp_only_layers=[1]),  # layer 1 dense
    "qwen_plain_topk": dict(norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen_sparse_step": dict(norm_topk_prob=True, decoder_sparse_step=2),  # only layer 1 is MoE
}
ORIG = 32  # Phi's original_max_position_embeddings: small, so both LongRoPE branches are cheap
PHI_ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": ORIG,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)],
            "short_mscale": 1.2, "long_mscale": 1.35}


def hf_config(name):
    if name == "phi":  # Phi-3.5's real config has attention_bias / lm_head_bias true (class default: false)
        return PhimoeConfig(**TINY, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                            attention_bias=True, lm_head_bias=True, max_position_embeddings=128,
                            original_max_position_embeddings=ORIG, rope_parameters=dict(PHI_ROPE),
                            router_aux_loss_coef=0.01, bos_token_id=1, eos_token_id=2)
    return Qwen3MoeConfig(**TINY, head_dim=24, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                          num_experts_per_tok=2, router_aux_loss_coef=0.01, **QWEN[name])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """name -> directory of a tiny random checkpoint written by transformers' save_pretrained."""
    made = {}

    def get(name):
        if name not in made:
            torch.manual_seed(0)
            cls = PhimoeForCausalLM if name == "phi" else Qwen3MoeForCausalLM
            model = cls(hf_config(name))
            with torch.no_grad():  # transformers initialises biases to 0 and norms to 1: make them count
                for n, p in model.named_parameters():
                    if n.endswith("bias") or "norm" in n:
                        p.add_(torch.randn_like(p) * 0.1)
            made[name] = tmp_path_factory.mktemp(name)
            model.save_pretrained(made[name])
        return made[name]
    return get


def oracle(path, dtype, long_rope=False):
    kwargs = {}
    if long_rope:
        # transformers 5.x computes LongRoPE frequencies with short_factor at every length; the
        # released Phi-3.5 code (and 4.x) switches to long_factor past original_max. Oracle for
        # the long side: a transformers model whose short factor and mscale ARE the long ones.
        cfg = AutoConfig.from_pretrained(path)
        cfg.rope_parameters["short_factor"] = cfg.rope_parameters["long_factor"]
        cfg.rope_parameters["short_mscale"] = cfg.rope_parameters["long_mscale"]
        kwargs["config"] = cfg
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                                 experts_implementation="eager", **kwargs)
    return model.eval()


def ours(path, dtype):
    return load_model(path, dtype=dtype, attn_impl="eager")


def run_both(theirs, mine, ids, mask=None):
    # transformers' plain forward numbers positions 0..T-1 even under padding; ours counts real
    # tokens only: give transformers our positions
    pos, labels = None, ids
    if mask is not None:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # logits at padding differ (ours let a padding query see itself): no label is predicted there
        predicted_from_real = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
        labels = ids.masked_fill(predicted_from_real == 0, -100)
    with torch.no_grad():
        a = theirs(ids, attention_mask=mask, position_ids=pos, labels=labels, output_router_logits=True)
        b = mine(ids, attention_mask=mask, labels=labels)
    b.labels = labels
    return a, b


def check_parity(a, b, coef, exact, real=None):
    """a: transformers' output, b: ours. real: (B, T) bool of positions to compare (None: all).
    Returns the max relative logit error."""
    real = torch.ones(a.logits.shape[:2], dtype=torch.bool) if real is None else real.bool()
    la, lb = a.logits[real].float(), b.logits[real].float()
    ra = [r.view(*real.shape, -1)[real] for r in a.router_logits]  # transformers: (B*T, E) per layer
    rb = [r[real] for r in b.router_logits]
    assert len(ra) == len(rb) > 0
    ours_loss = b.loss + coef * b.aux_loss  # transformers adds the weighted aux loss to the loss
    if exact:
        assert torch.equal(la, lb), (la - lb).abs().max()
        assert all(torch.equal(x, y) for x, y in zip(ra, rb))
        assert torch.equal(a.aux_loss, b.aux_loss)
        # The loss may differ in the last fp32 bit: transformers pads the shifted labels to T and
        # averages over B*T entries (-100 ignored), we average over B*(T-1): another reduction
        # order. transformers' own loss function on OUR logits gives its loss exactly.
        assert abs(a.loss - ours_loss) <= 2 * torch.finfo(torch.float32).eps * a.loss
        theirs_on_ours = ForCausalLMLoss(b.logits, b.labels, b.logits.shape[-1]) + coef * b.aux_loss
        assert torch.equal(a.loss, theirs_on_ours)
        return 0.0
    err = ((la - lb).abs().max() / la.abs().max()).item()
    assert err <= 1e-5, err
    for x, y in zip(ra, rb):
        assert (x - y).abs().max() <= 1e-5 * x.abs().max()
    assert abs(a.aux_loss - b.aux_loss) <= 1e-5 * a.aux_loss
    assert abs(a.loss - ours_loss) <= 1e-5 * a.loss
    return err


def random_ids(*shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# forward parity

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", [*QWEN, "phi"])
def test_forward_parity(hf_dir, name, dtype):
    path = hf_dir(name)
    theirs, mine = oracle(path, dtype), ours(path, dtype)
    ids = random_ids(2, 20)  # Phi: 20 <= ORIG, the short-factor side
    a, b = run_both(theirs, mine, ids)
    err = check_parity(a, b, mine.config.router_aux_loss_coef, exact=dtype == torch.bfloat16)
    print(f"{name} {dtype}: max rel logit error {err:.2e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [ORIG, ORIG + 1, 48])
def test_phi_longrope_both_sides_of_original_max(hf_dir, T, dtype):
    path = hf_dir("phi")
    long = T > ORIG
    mine = ours(path, dtype)
    a, b = run_both(oracle(path, dtype, long_rope=long), mine, random_ids(2, T))
    check_parity(a, b, mine.config.router_aux_loss_coef, exact=dtype == torch.bfloat16)
    if long:  # and transformers 5.x as shipped (no switch) is a different function past ORIG
        plain, _ = run_both(oracle(path, dtype), mine, random_ids(2, T))
        assert (plain.logits.float() - b.logits.float()).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["qwen_norm_topk", "phi"])
def test_left_padded_batch_parity(hf_dir, name):
    # padding is excluded from the aux loss on both sides; real positions agree
    path = hf_dir(name)
    mine = ours(path, torch.float32)
    ids = random_ids(3, 16)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    a, b = run_both(oracle(path, torch.float32), mine, ids, mask)
    check_parity(a, b, mine.config.router_aux_loss_coef, exact=False, real=mask)


# -----------------------------------------------------------------------------
# generation

def hf_generate(theirs, ids, mask, n, stop_ids):
    theirs.generation_config.bos_token_id = None
    theirs.generation_config.eos_token_id = None
    out = theirs.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          eos_token_id=sorted(stop_ids) or None, pad_token_id=0)
    rows = out[:, ids.shape[1]:].tolist()
    for row in rows:  # cut after the first stop id, as ours does (transformers pads after it)
        hit = next((i for i, t in enumerate(row) if t in stop_ids), None)
        if hit is not None:
            del row[hit + 1:]
    return rows


@pytest.mark.parametrize("name,prompt_len", [("qwen_norm_topk", 7), ("qwen_plain_topk", 7),
                                             ("phi", 6), ("phi_long", ORIG + 4)])
def test_greedy_generation_matches_transformers(hf_dir, name, prompt_len):
    path = hf_dir(name.removesuffix("_long"))
    theirs = oracle(path, torch.float32, long_rope=name == "phi_long")
    mine = ours(path, torch.float32)
    n = 24  # Phi short side: 6 + 24 = 30 <= ORIG stays short; long side starts past ORIG
    # one prompt, no stop tokens: all 24 tokens
    ids = random_ids(1, prompt_len, seed=1)
    expected = hf_generate(theirs, ids, None, n, set())
    assert mine.generate(ids, n) == expected and len(expected[0]) == n
    # a left-padded batch, and a stop token that ends one row early
    ids = random_ids(2, prompt_len, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    free = mine.generate(ids, n, attention_mask=mask)
    stop = {free[1][10]}
    expected = hf_generate(theirs, ids, mask, n, stop)
    got = mine.generate(ids, n, attention_mask=mask, stop_ids=stop)
    assert got == expected
    assert len(got[1]) <= 11 and got[1][-1] in stop


# -----------------------------------------------------------------------------
# our save_hf -> transformers

def native_config(name):
    """Configs built with OUR field names (the after-training path: no config.json involved)."""
    shrink = dict(vocab_size=V, hidden_size=64, n_layers=3, n_heads=4, n_kv_heads=2, init_std=0.2)
    if name == "phi":
        rs = {"type": "longrope", "original_max_position_embeddings": ORIG,
              **{k: PHI_ROPE[k] for k in ("short_factor", "long_factor", "short_mscale", "long_mscale")}}
        return phi35_moe_config(**shrink, head_dim=16, intermediate_size=32, moe_intermediate_size=32,
                                n_experts=4, rope_scaling=rs, max_position_embeddings=128, attn_impl="eager")
    return MoEConfig(**shrink, head_dim=24, intermediate_size=96, n_experts=8, top_k=2, moe_intermediate_size=32,
                     qk_norm=True, mlp_only_layers=(1,), norm_topk_prob=True, attn_impl="eager")


@pytest.mark.parametrize("name", ["qwen", "phi"])
def test_ours_save_hf_loads_in_transformers(tmp_path, name):
    torch.manual_seed(0)
    mine = MoETransformer(native_config(name)).eval()
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ids = random_ids(2, 20)
    for dtype in (torch.float32, torch.bfloat16):
        mine = mine.to(dtype)
        path = tmp_path / str(dtype)
        save_hf(mine, path, max_shard_size="40KB")  # sharded
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
        # the architecture name of the released checkpoints (vLLM's registry keys on it; transformers
        # picks its class from model_type, as oracle() below shows by loading it)
        written = json.loads((path / "config.json").read_text())["architectures"]
        assert written == [config_4x(name)["architectures"][0]] == [
            {"phi": "PhiMoEForCausalLM", "qwen": "Qwen3MoeForCausalLM"}[name]]
        a, b = run_both(oracle(path, dtype), mine, ids)
        check_parity(a, b, mine.config.router_aux_loss_coef, exact=dtype == torch.bfloat16)
        # and back: transformers' own (sharded) save of it loads in ours to the same model, bit for bit
        oracle(path, dtype).save_pretrained(tmp_path / f"{dtype}-hf", max_shard_size="40KB")
        assert (tmp_path / f"{dtype}-hf" / "model.safetensors.index.json").exists()
        again = load_model(tmp_path / f"{dtype}-hf", attn_impl="eager")
        with torch.no_grad():
            assert torch.equal(again(ids).logits, mine(ids).logits)


# -----------------------------------------------------------------------------
# config.json in the transformers 4.x spelling

def config_4x(name):
    """The tiny checkpoints' config.json as transformers 4.x writes it. transformers 4.x is not
    installed (the pin is 5.x), so this is written by hand, on the pattern of the released
    Qwen3-30B-A3B and Phi-3.5-MoE-instruct config.json files: rope_theta + rope_scaling
    ("type" key) instead of rope_parameters, num_experts (Qwen3) instead of num_local_experts,
    torch_dtype instead of dtype, Phi's top-level original_max_position_embeddings and its
    sliding_window equal to max_position_embeddings."""
    if name == "phi":
        return {
            "architectures": ["PhiMoEForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_dropout": 0.0,
            "hidden_size": 64, "initializer_range": 0.2, "input_jitter_noise": 0.0, "intermediate_size": 32,
            "lm_head_bias": True, "max_position_embeddings": 128, "model_type": "phimoe",
            "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 3,
            "num_key_value_heads": 2, "num_local_experts": 4, "original_max_position_embeddings": ORIG,
            "output_router_logits": False, "rms_norm_eps": 1e-05,
            "rope_scaling": {"long_factor": PHI_ROPE["long_factor"], "long_mscale": 1.35,
                             "original_max_position_embeddings": ORIG,
                             "short_factor": PHI_ROPE["short_factor"], "short_mscale": 1.2, "type": "longrope"},
            "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "router_jitter_noise": 0.01,
            "sliding_window": 128, "tie_word_embeddings": False, "torch_dtype": "float32",
            "transformers_version": "4.43.3", "use_cache": True, "vocab_size": V}
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": None, "decoder_sparse_step": 1, "eos_token_id": None, "head_dim": 24,
        "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.2, "intermediate_size": 96,
        "max_position_embeddings": 32768, "max_window_layers": 3, "mlp_only_layers": [1],
        "model_type": "qwen3_moe", "moe_intermediate_size": 32, "norm_topk_prob": True,
        "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 3,
        "num_key_value_heads": 2, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.51.0",
        "use_cache": True, "use_sliding_window": False, "vocab_size": V}


@pytest.mark.parametrize("name", ["qwen_norm_topk", "phi"])
def test_transformers_4x_config_spelling(hf_dir, tmp_path, name):
    path5 = hf_dir(name)
    cfg5 = json.loads((path5 / "config.json").read_text())
    assert "rope_parameters" in cfg5 and "num_local_experts" in cfg5  # what 5.x writes
    old = config_4x(name.split("_")[0])
    assert config_from_hf(old) == config_from_hf(cfg5)
    path4 = tmp_path / "v4"
    path4.mkdir()
    shutil.copy(path5 / "model.safetensors", path4)
    (path4 / "config.json").write_text(json.dumps(old, indent=2))
    ids = random_ids(2, 40)  # Phi: past ORIG
    with torch.no_grad():
        assert torch.equal(ours(path4, torch.float32)(ids).logits, ours(path5, torch.float32)(ids).logits)
        # transformers 5.x reads the hand-written 4.x file as the same model (so it is faithful)
        assert torch.equal(oracle(path4, torch.float32)(ids).logits, oracle(path5, torch.float32)(ids).logits)


# -----------------------------------------------------------------------------
# GPU (run with -m gpu on a CUDA machine)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["qwen_norm_topk", "phi"])
def test_bf16_parity_cuda(hf_dir, name):
    # Seen on an H100 (torch 2.11, transformers 5.17): expert_impl="loop" bit-exact with the eager
    # oracle; "grouped" (grouped_mm, fp32 combine) max |diff| 7e-2 on logits of max ~6.5.
    path = hf_dir(name)
    theirs = oracle(path, torch.bfloat16).cuda()
    ids = random_ids(4, 24).cuda()  # Phi: 24 <= ORIG
    with torch.no_grad():
        ref = theirs(ids, labels=ids, output_router_logits=True)
        scale = ref.logits.float().abs().max().item()
        for impl in ("loop", "grouped"):
            mine = load_model(path, dtype=torch.bfloat16, device="cuda",
                                                  attn_impl="eager", expert_impl=impl)
            out = mine(ids, labels=ids)
            diff = (out.logits.float() - ref.logits.float()).abs().max().item()
            rdiff = max((r.float() - o.reshape(r.shape).float()).abs().max().item()
                        for r, o in zip(ref.router_logits, out.router_logits))
            print(f"\n{name} cuda bf16 expert_impl={impl}: max |logits diff| {diff:.3e} "
                  f"(max |logit| {scale:.2f}), router logits {rdiff:.3e}, "
                  f"bit-exact {torch.equal(out.logits, ref.logits)}")
            assert diff <= 3e-2 * scale
