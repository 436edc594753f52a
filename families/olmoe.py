"""
OLMoE (`model_type: olmoe`; allenai/OLMoE-1B-7B-0924 and its -Instruct): everything that differs
from the other families, in one place (docs/architectures.md, "Model families"). Plain data and
small functions; no imports of model.py.

Architecture (transformers' models/olmoe/modeling_olmoe.py): RMSNorm (eps = rms_norm_eps, fp32 then
cast back before the weight, as Qwen3), no biases by default, head_dim = hidden / heads. q and k
get an RMSNorm over the WHOLE projection (q_norm over nh*hd = hidden channels, k_norm over nkv*hd),
not per head, before the heads are split and before RoPE; then, if `clip_qkv` is set, q, k and v
are clamped to [-clip_qkv, clip_qkv] (norm first, clamp second). Router: softmax over all experts in
fp32, top-k, NOT renormalised (norm_topk_prob false; the class default, and the released config),
cast back to the model dtype: router.TopKRouter with norm_topk_prob=False. Every layer is MoE with
experts intermediate_size wide; no shared expert, no dense layers. Aux loss: the Switch/GShard
E * sum_e f_e P_e over all layers (router.load_balancing_loss), router_aux_loss_coef 0.01.
"""

MODEL_TYPE = "olmoe"
ARCHITECTURE = "OlmoeForCausalLM"  # config.json's and vLLM's name (transformers' class too)
HF_CONFIG_CLASS, HF_MODEL_CLASS = "OlmoeConfig", "OlmoeForCausalLM"

EXPERT_NAMES = ("mlp", "gate_proj", "up_proj", "down_proj")  # MOE, GATE, UP, DOWN, as Qwen3

# transformers' OlmoeConfig class defaults (tests/test_families.py compares them)
HF_DEFAULTS = dict(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16, hidden_act="silu",
                   max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False, clip_qkv=None,
                   num_experts_per_tok=8, num_experts=64, router_aux_loss_coef=0.01, norm_topk_prob=False)
ROPE_TYPES = ("default",)
INT_KEYS = ()
BOOL_KEYS = ("norm_topk_prob",)
NONNEGATIVE_KEYS = ()
CARRIES = ("qk_norm_scope", "clip_qkv")  # MoEConfig switches its config.json carries (families/__init__.py)

# OLMoE-1B-7B-0924-Instruct's template (Tulu's): `{{ bos_token }}` then, per message,
# '<|user|>\n' + content + '\n' (the '\n' is the template's own line break, kept by
# apply_chat_template's trim_blocks), an assistant turn '<|assistant|>\n' + content + eos_token +
# '\n', and the generation prompt '<|assistant|>\n'. bos_token = eos_token = <|endoftext|> (id 50279).
# <|user|>, <|assistant|>, <|system|> are NOT special tokens of the OLMoE tokenizer: they are
# ordinary text, so the only specials are <|endoftext|> and <|padding|> (id 1, the pad token).
CHAT_FORMAT_NAME = "tulu"
CHAT_FORMAT = dict(
    system="<|system|>\n{system}\n",
    prompt="<|user|>\n{prompt}\n<|assistant|>\n",
    response="{response}<|endoftext|>",
    specials=("<|endoftext|>", "<|padding|>"),
    eos="<|endoftext|>", stop=("<|endoftext|>",), pad="<|padding|>",
)

# allenai/OLMoE-1B-7B-0924 (6.9B total / 1.3B active; 6.92B / 1.28B here): OlmoeConfig's defaults except the
# expert width, 1024 (the class default 2048 would make 13.3B); configs/olmoe.py says more
PRESET_NAME = "olmoe_1b_7b"
PRESET = dict(vocab_size=50304, hidden_size=2048, n_layers=16, n_heads=16, n_kv_heads=16, head_dim=128,
              intermediate_size=1024, n_experts=64, top_k=8, moe_intermediate_size=1024, router="topk",
              norm_topk_prob=False, norm="rmsnorm", norm_eps=1e-5, qk_norm=True, qk_norm_scope="whole",
              clip_qkv=None, attention_bias=False, rope_theta=10000.0, max_position_embeddings=4096,
              router_aux_loss_coef=0.01)

BENCH = dict(layers_gpu=4, layers_cpu=2, cpu=dict(n_experts=16, top_k=4, moe_intermediate_size=128))


def sliding_window(c):
    """OLMoE has no sliding window (OlmoeConfig has no such key): one in a config.json is refused
    (hf_config.py), never ignored."""
    return c.get("sliding_window")


def problems(c, hf):
    out = []
    if c.get("head_dim") is not None and c["head_dim"] != c["hidden_size"] // c["num_attention_heads"]:
        # transformers sizes q_norm by hidden_size and k_norm by (hidden / heads) * kv heads
        out.append(f"head_dim={c['head_dim']} != hidden_size / num_attention_heads (OLMoE's whole-projection "
                   "qk-norm is sized by hidden_size)")
    if c["clip_qkv"] is not None and not (isinstance(c["clip_qkv"], (int, float)) and not isinstance(c["clip_qkv"], bool)
                                          and c["clip_qkv"] > 0):
        out.append(f"clip_qkv={c['clip_qkv']!r} (expected a positive number or null)")
    return out


def n_experts(c):
    return c.get("num_local_experts", c["num_experts"])


def from_hf(c):
    # every layer MoE, experts intermediate_size wide, qk-norm over the whole projection
    return dict(intermediate_size=c["intermediate_size"], moe_intermediate_size=c["intermediate_size"],
                router="topk", norm_topk_prob=c["norm_topk_prob"], norm="rmsnorm", qk_norm=True,
                qk_norm_scope="whole", clip_qkv=c["clip_qkv"])


def needs(cfg):
    return {"router == 'topk'": cfg.router == "topk", "norm == 'rmsnorm'": cfg.norm == "rmsnorm",
            "qk_norm": cfg.qk_norm, "qk_norm_scope == 'whole'": cfg.qk_norm_scope == "whole",
            "not lm_head_bias": not cfg.lm_head_bias, "every layer MoE": cfg.moe_layers == list(range(cfg.n_layers)),
            "head_dim == hidden_size // n_heads": cfg.head_dim == cfg.hidden_size // cfg.n_heads}


def to_hf(cfg):
    return dict(intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.n_experts,
                norm_topk_prob=cfg.norm_topk_prob, clip_qkv=cfg.clip_qkv)
