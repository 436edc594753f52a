"""
Phi-3.5-MoE (`model_type: phimoe`; Phi-3.5-MoE-instruct): everything that differs from the other
families, in one place (docs/architectures.md, "Model families"). Plain data and small functions;
no imports of model.py.

Architecture: LayerNorm with bias (eps = rms_norm_eps), biased q/k/v/o and lm_head, no qk-norm,
head_dim = hidden / heads unless config.json gives `head_dim` (the SlimMoE models Phi-mini-MoE /
Phi-tiny-MoE do), LongRoPE, the top-2 "sparsemixer" router (router.py), every layer MoE with
experts intermediate_size wide, and `sliding_window` on every layer (transformers' PhimoeConfig has
no layer_types: a window set applies to all layers, through create_sliding_window_causal_mask).
"""
import math

MODEL_TYPE = "phimoe"
# the name the released checkpoint writes and vLLM's registry keys on; transformers picks its class
# (PhimoeForCausalLM) from model_type, so it loads either spelling
ARCHITECTURE = "PhiMoEForCausalLM"
HF_CONFIG_CLASS, HF_MODEL_CLASS = "PhimoeConfig", "PhimoeForCausalLM"  # transformers (oracle, bench)

EXPERT_NAMES = ("block_sparse_moe", "w1", "w3", "w2")  # MOE, GATE, UP, DOWN (see qwen3_moe.py)

HF_DEFAULTS = dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                   max_position_embeddings=131072, initializer_range=0.02, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, rope_theta=1e6, num_experts_per_tok=2,
                   num_local_experts=16, router_aux_loss_coef=0.001, router_jitter_noise=0.01,
                   input_jitter_noise=0.0, attention_bias=False, lm_head_bias=False)
ROPE_TYPES = ("default", "longrope")
INT_KEYS = ("num_local_experts",)
BOOL_KEYS = ("lm_head_bias",)
CARRIES = ("sliding_window",)  # MoEConfig switches its config.json carries (families/__init__.py SWITCHES)
NONNEGATIVE_KEYS = ("router_jitter_noise", "input_jitter_noise")

CHAT_FORMAT_NAME = "phi35"
CHAT_FORMAT = dict(
    system="<|system|>\n{system}<|end|>\n",
    prompt="<|user|>\n{prompt}<|end|>\n<|assistant|>\n",
    response="{response}<|end|>",
    specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
    eos="<|end|>", stop=("<|end|>", "<|endoftext|>"), pad="<|endoftext|>",
)

# Phi-3.5-MoE-instruct (41.9B total / 6.6B active), without the LongRoPE factors (those come with
# the checkpoint's config.json)
PRESET_NAME = "phi35_moe"
PRESET = dict(vocab_size=32064, hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=8,
              head_dim=128, intermediate_size=6400, n_experts=16, top_k=2,
              moe_intermediate_size=6400, router="sparsemixer", router_jitter_eps=0.01,
              input_jitter=0.01, norm="layernorm", norm_eps=1e-5, qk_norm=False,
              attention_bias=True, lm_head_bias=True, rope_theta=1e4,
              max_position_embeddings=131072, router_aux_loss_coef=0.0)

# The SlimMoE models (arXiv 2506.18349), cut from Phi-3.5-MoE: same layout, narrower experts, fewer
# heads, 4k context, no LongRoPE. Phi-tiny-MoE-instruct has head_dim 128 != hidden / heads = 256.
# Sources: Phi-mini-MoE-instruct's config.json values as copied in casys-kaist/LLMServingSim
# (model_config/microsoft/Phi-mini-MoE-instruct.json: hidden 4096, intermediate 960, 32 heads, 8 kv,
# 32 layers, 16 experts top-2, vocab 32064, max_position 4096); Phi-tiny-MoE-instruct: hidden 4096,
# 16 heads, 4 kv, head_dim 128, intermediate 448, which gives exactly the 3,755,220,288 parameters
# listed for it (and Phi-mini 7.65B total / 2.36B active, its model card's 7.6B / 2.4B). sliding_window
# 2047 is what yujiepan/phi-moe-tiny-random (built from Phi-tiny-MoE-instruct's code and config)
# writes; the original config.json was not reachable offline: a loaded checkpoint's own value wins.
SLIM_PRESETS = {
    "phi_mini_moe": {**PRESET, "n_heads": 32, "n_kv_heads": 8, "head_dim": 128, "intermediate_size": 960,
                     "moe_intermediate_size": 960, "max_position_embeddings": 4096, "sliding_window": 2047},
    "phi_tiny_moe": {**PRESET, "n_heads": 16, "n_kv_heads": 4, "head_dim": 128, "intermediate_size": 448,
                     "moe_intermediate_size": 448, "max_position_embeddings": 4096, "sliding_window": 2047},
}

BENCH = dict(layers_gpu=2, layers_cpu=2, cpu=dict(n_experts=8, moe_intermediate_size=512))


def sliding_window(c):
    """config.json's window (every layer). Phi-3.5-MoE sets it to its maximum length (no window in
    effect); the SlimMoE models set a real one."""
    return c.get("sliding_window")


def _window(c):
    # a window as long as the context cuts nothing the model accepts: MoEConfig gets None (so the
    # configs of transformers 4.x, which write 131072, and 5.x, which write null, are one model)
    window = c.get("sliding_window")
    return window if window is not None and window < c["max_position_embeddings"] else None


def problems(c, hf):
    if c["num_experts_per_tok"] != 2:
        return [f"num_experts_per_tok={c['num_experts_per_tok']} (phimoe's sparsemixer is top-2 only)"]
    return []


def n_experts(c):
    return c["num_local_experts"]


def from_hf(c):
    # every layer is MoE, experts are intermediate_size wide; LayerNorm's eps is rms_norm_eps
    return dict(intermediate_size=c["intermediate_size"], moe_intermediate_size=c["intermediate_size"],
                router="sparsemixer", router_jitter_eps=c["router_jitter_noise"], input_jitter=c["input_jitter_noise"],
                norm="layernorm", qk_norm=False, lm_head_bias=c["lm_head_bias"], sliding_window=_window(c))


def needs(cfg):
    return {"router == 'sparsemixer'": cfg.router == "sparsemixer", "norm == 'layernorm'": cfg.norm == "layernorm",
            "not qk_norm": not cfg.qk_norm, "every layer MoE": cfg.moe_layers == list(range(cfg.n_layers))}


def to_hf(cfg):
    hf = dict(intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.n_experts,
              router_jitter_noise=cfg.router_jitter_eps, input_jitter_noise=cfg.input_jitter,
              lm_head_bias=cfg.lm_head_bias, sliding_window=cfg.sliding_window)
    if cfg.head_dim != cfg.hidden_size // cfg.n_heads:  # transformers' Phimoe reads it when present
        hf["head_dim"] = cfg.head_dim
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        original_max = rs["original_max_position_embeddings"]
        # transformers 5.x requires both mscales; write the LongRoPE default our model would use
        scale = cfg.max_position_embeddings / original_max
        default = math.sqrt(1 + math.log(scale) / math.log(original_max)) if scale > 1 else 1.0
        hf["rope_scaling"] = {"type": "longrope", "rope_type": "longrope",
                              "short_factor": list(rs["short_factor"]), "long_factor": list(rs["long_factor"]),
                              "short_mscale": rs.get("short_mscale") or default,
                              "long_mscale": rs.get("long_mscale") or default,
                              "original_max_position_embeddings": original_max}
        hf["original_max_position_embeddings"] = original_max
    return hf
