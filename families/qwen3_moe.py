"""
Qwen3-MoE (`model_type: qwen3_moe`; Qwen3-30B-A3B): everything that differs from the other families,
in one place (docs/architectures.md, "Model families"). Plain data and small functions; no imports
of model.py, so model.py and hf_config.py can both read it.

Architecture: RMSNorm (fp32, cast back before the weight), per-head q/k RMSNorm, no biases,
head_dim read from the config, softmax -> top-k router (renormalised iff norm_topk_prob), dense
SwiGLU layers where mlp_only_layers / decoder_sparse_step say so.
"""
MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"  # config.json `architectures`, the name vLLM's registry keys on
HF_CONFIG_CLASS, HF_MODEL_CLASS = "Qwen3MoeConfig", "Qwen3MoeForCausalLM"  # transformers (oracle, bench)

# on disk, layer i expert e: model.layers.i.{MOE}.gate.weight (router), .{MOE}.experts.e.{GATE,UP,DOWN}.weight
EXPERT_NAMES = ("mlp", "gate_proj", "up_proj", "down_proj")  # MOE, GATE, UP, DOWN

# transformers' class defaults (5.23; the same in 4.5x) for keys a config.json may leave out
HF_DEFAULTS = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                   num_attention_heads=32, num_key_value_heads=4, hidden_act="silu",
                   max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
                   tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
                   use_sliding_window=False, decoder_sparse_step=1, moe_intermediate_size=768,
                   num_experts_per_tok=8, num_experts=128, norm_topk_prob=False,
                   router_aux_loss_coef=0.001, mlp_only_layers=[])
ROPE_TYPES = ("default",)
# this family's config.json keys beyond the shared ones, by the type they must have
INT_KEYS = ("moe_intermediate_size", "decoder_sparse_step", "num_experts")
BOOL_KEYS = ("norm_topk_prob", "use_sliding_window")
NONNEGATIVE_KEYS = ()

# the chat format (tokenizer.py): thinking disabled, as Qwen3's template renders enable_thinking=False
CHAT_FORMAT_NAME = "qwen3"
CHAT_FORMAT = dict(
    system="<|im_start|>system\n{system}<|im_end|>\n",
    prompt="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    response="{response}<|im_end|>",
    specials=("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"),
    eos="<|im_end|>", stop=("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
    # the end of `prompt` that Qwen3's template writes only with enable_thinking=False (its switch)
    thinking_off="<think>\n\n</think>\n\n",
)

# Qwen3-30B-A3B (30.5B total / 3.3B active parameters): MoEConfig keywords
PRESET_NAME = "qwen3_30b_a3b"
PRESET = dict(vocab_size=151936, hidden_size=2048, n_layers=48, n_heads=32, n_kv_heads=4,
              head_dim=128, intermediate_size=6144, n_experts=128, top_k=8,
              moe_intermediate_size=768, router="topk", norm_topk_prob=True, norm="rmsnorm",
              norm_eps=1e-6, qk_norm=True, attention_bias=False, rope_theta=1e6,
              max_position_embeddings=40960, router_aux_loss_coef=0.001)

# bench.py: GPU = PRESET with `layers_gpu` layers; CPU = toy dims (bench.py) with these overrides
BENCH = dict(layers_gpu=4, layers_cpu=2, cpu=dict(n_experts=16, top_k=4, moe_intermediate_size=128))


def sliding_window(c):
    """The window config.json asks for (None: none). Qwen3 uses it only with use_sliding_window."""
    return c.get("sliding_window") if c.get("use_sliding_window") else None


def problems(c, hf):
    """What this family's keys ask for that is invalid or not implemented (c: config.json over
    HF_DEFAULTS, types already checked; hf: config.json as written)."""
    problems = []
    if "num_local_experts" in hf and "num_experts" in hf and hf["num_experts"] != hf["num_local_experts"]:
        problems.append(f"num_experts={hf['num_experts']} != num_local_experts={hf['num_local_experts']}")
    layers = c["mlp_only_layers"]
    if not (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                             and i >= 0 for i in layers)):
        problems.append(f"mlp_only_layers={layers!r} (expected a list of layer indices, integers >= 0)")
    return problems


def n_experts(c):
    return c.get("num_local_experts", c["num_experts"])  # 5.x spelling, else 4.x


def from_hf(c):
    """This family's MoEConfig keywords from a checked config.json (c: over HF_DEFAULTS)."""
    return dict(intermediate_size=c["intermediate_size"], moe_intermediate_size=c["moe_intermediate_size"],
                router="topk", norm_topk_prob=c["norm_topk_prob"], mlp_only_layers=tuple(c["mlp_only_layers"]),
                decoder_sparse_step=c["decoder_sparse_step"], norm="rmsnorm", qk_norm=True)


def needs(cfg):
    """What a MoEConfig must be to be written as this family: {condition: met}."""
    return {"router == 'topk'": cfg.router == "topk", "norm == 'rmsnorm'": cfg.norm == "rmsnorm",
            "qk_norm": cfg.qk_norm, "not lm_head_bias": not cfg.lm_head_bias,
            "rope_scaling is None": cfg.rope_scaling is None, "not rmsnorm_weight_fp32": not cfg.rmsnorm_weight_fp32}


def to_hf(cfg):
    """This family's config.json keys (4.x spelling) for a MoEConfig that meets needs()."""
    return dict(head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                moe_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.n_experts,
                norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                mlp_only_layers=list(cfg.mlp_only_layers), use_sliding_window=False, sliding_window=None)
