"""
The Hugging Face side of a checkpoint, as data: config.json <-> MoEConfig for Qwen3-MoE (`qwen3_moe`)
and Phi-3.5-MoE (`phimoe`), and the on-disk tensor names <-> our parameters. No disk I/O here
(checkpoint.py reads and writes); no transformers import.

    config_from_hf(config.json dict) -> MoEConfig;   config_to_hf(MoEConfig) -> config.json dict
    hf_tensor_map(model, model_type) -> {on-disk name: the tensor (or slice) it fills}

On-disk names (docs/architectures.md) vs ours, layer i, expert e (I = moe_intermediate_size):
    model.layers.i.{mlp|block_sparse_moe}.gate.weight           layers.i.mlp.router.gate.weight
    model.layers.i.mlp.experts.e.gate_proj.weight  (phi: w1)    layers.i.mlp.gate_up_proj[e, :I]
    model.layers.i.mlp.experts.e.up_proj.weight    (phi: w3)    layers.i.mlp.gate_up_proj[e, I:]
    model.layers.i.mlp.experts.e.down_proj.weight  (phi: w2)    layers.i.mlp.down_proj[e]
    lm_head.*                                                   lm_head.*
    model.<anything else>                                       <anything else>

config.json is written in the transformers 4.x spelling (rope_theta, rope_scaling, num_experts), the
spelling of the released checkpoints: transformers 5.x reads it too, so older pins of transformers /
vLLM / lm-eval load what we save. Both spellings are read.
"""
import math

from model import MoEConfig


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as is (the message names what is wrong)."""


# -----------------------------------------------------------------------------
# config.json

# transformers' class defaults (5.23; the same in 4.5x) for keys a config.json may leave out
_HF_DEFAULTS = {
    "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, hidden_act="silu",
                      max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
                      use_sliding_window=False, decoder_sparse_step=1, moe_intermediate_size=768,
                      num_experts_per_tok=8, num_experts=128, norm_topk_prob=False,
                      router_aux_loss_coef=0.001, mlp_only_layers=[]),
    "phimoe": dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                   max_position_embeddings=131072, initializer_range=0.02, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, rope_theta=1e6, num_experts_per_tok=2,
                   num_local_experts=16, router_aux_loss_coef=0.001, router_jitter_noise=0.01,
                   input_jitter_noise=0.0, attention_bias=False, lm_head_bias=False),
}
# the names the released checkpoints write (and vLLM's model registry keys on); transformers itself
# picks the class from model_type, so its own spelling (PhimoeForCausalLM) is not needed here
_ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "phimoe": "PhiMoEForCausalLM"}
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_LONGROPE_KEYS = ("short_factor", "long_factor", "short_mscale", "long_mscale")


def config_from_hf(hf):
    """A transformers config.json dict (4.x or 5.x spelling) -> MoEConfig."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"config.json: expected a JSON object, got a {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in _HF_DEFAULTS:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not supported "
                              f"(supported: {sorted(_HF_DEFAULTS)})")
    # a key set to null means "the default", as in transformers
    c = {**_HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    problems = []
    if c["hidden_act"] != "silu":
        problems.append(f"hidden_act={c['hidden_act']!r} (only 'silu')")
    if "quantization_config" in c:
        problems.append("quantization_config (quantized checkpoints are not supported)")
    # sliding window: Qwen3 uses it only with use_sliding_window; Phi-3.5 sets it to the max length
    window = c.get("sliding_window") if model_type == "phimoe" or c.get("use_sliding_window") else None
    if window is not None and window < c["max_position_embeddings"]:
        problems.append(f"sliding_window={window} (sliding-window attention is not implemented)")
    if model_type == "qwen3_moe":
        n_experts = c.get("num_local_experts", c["num_experts"])  # 5.x spelling, else 4.x
        if "num_local_experts" in hf and "num_experts" in hf and hf["num_experts"] != hf["num_local_experts"]:
            problems.append(f"num_experts={hf['num_experts']} != num_local_experts={hf['num_local_experts']}")
    else:
        n_experts = c["num_local_experts"]
        if c["num_experts_per_tok"] != 2:
            problems.append(f"num_experts_per_tok={c['num_experts_per_tok']} (phimoe's sparsemixer is top-2 only)")
    ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_experts_per_tok") + (("moe_intermediate_size",) if model_type == "qwen3_moe" else ())
    problems += [f"{k}={c[k]!r} (expected a positive integer)" for k in ints
                 if not (isinstance(c[k], int) and not isinstance(c[k], bool) and c[k] > 0)]
    if not (isinstance(n_experts, int) and n_experts > 0):
        problems.append(f"number of experts {n_experts!r} (expected a positive integer)")
    if problems:
        raise CheckpointError("config.json: unsupported " + "; ".join(problems))
    rope_theta, rope_scaling = _rope_from_hf(c, model_type, problems)
    if problems:
        raise CheckpointError("config.json: unsupported " + "; ".join(problems))
    heads = c["num_attention_heads"]
    common = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], n_layers=c["num_hidden_layers"],
                  n_heads=heads, n_kv_heads=c["num_key_value_heads"] or heads,
                  head_dim=c.get("head_dim") or c["hidden_size"] // heads, n_experts=n_experts,
                  top_k=c["num_experts_per_tok"], attention_bias=c["attention_bias"],
                  norm_eps=c["rms_norm_eps"], rope_theta=rope_theta, rope_scaling=rope_scaling,
                  max_position_embeddings=c["max_position_embeddings"],
                  router_aux_loss_coef=c["router_aux_loss_coef"], tie_word_embeddings=c["tie_word_embeddings"],
                  init_std=c["initializer_range"],
                  special_token_ids={k: hf[k] for k in _TOKEN_KEYS if hf.get(k) is not None} or None)
    if model_type == "qwen3_moe":
        return MoEConfig(**common, intermediate_size=c["intermediate_size"],
                         moe_intermediate_size=c["moe_intermediate_size"], router="topk",
                         norm_topk_prob=c["norm_topk_prob"], mlp_only_layers=tuple(c["mlp_only_layers"]),
                         decoder_sparse_step=c["decoder_sparse_step"], norm="rmsnorm", qk_norm=True)
    # Phi-3.5: every layer is MoE, experts are intermediate_size wide; LayerNorm's eps is rms_norm_eps
    return MoEConfig(**common, intermediate_size=c["intermediate_size"],
                     moe_intermediate_size=c["intermediate_size"], router="sparsemixer",
                     router_jitter_eps=c["router_jitter_noise"], input_jitter=c["input_jitter_noise"],
                     norm="layernorm", qk_norm=False, lm_head_bias=c["lm_head_bias"])


def _rope_from_hf(c, model_type, problems):
    # 5.x: rope_parameters {rope_type, rope_theta, ...}; 4.x: rope_theta + rope_scaling {type, ...}
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = params.get("rope_theta", c["rope_theta"])
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1")
    if rope_type == "default":
        return theta, None
    if rope_type != "longrope" or model_type != "phimoe":
        problems.append(f"RoPE type {rope_type!r} for {model_type} (supported: 'default', and 'longrope' for phimoe)")
        return theta, None
    missing = [k for k in ("short_factor", "long_factor") if k not in params]
    if missing:
        problems.append(f"longrope without {missing}")
        return theta, None
    # as transformers does: a top-level original_max_position_embeddings (Phi-3.5 writes it) wins
    original_max = c.get("original_max_position_embeddings",
                         params.get("original_max_position_embeddings", c["max_position_embeddings"]))
    scaling = {"type": "longrope", "original_max_position_embeddings": original_max}
    scaling.update({k: params[k] for k in _LONGROPE_KEYS if params.get(k) is not None})
    return theta, scaling


def _model_type(cfg):
    """Which transformers architecture a MoEConfig is, or a CheckpointError saying why neither."""
    qwen = {"router == 'topk'": cfg.router == "topk", "norm == 'rmsnorm'": cfg.norm == "rmsnorm",
            "qk_norm": cfg.qk_norm, "not lm_head_bias": not cfg.lm_head_bias,
            "rope_scaling is None": cfg.rope_scaling is None}
    phi = {"router == 'sparsemixer'": cfg.router == "sparsemixer", "norm == 'layernorm'": cfg.norm == "layernorm",
           "not qk_norm": not cfg.qk_norm, "every layer MoE": cfg.moe_layers == list(range(cfg.n_layers)),
           "head_dim == hidden_size // n_heads": cfg.head_dim == cfg.hidden_size // cfg.n_heads}
    for model_type, needs in (("qwen3_moe", qwen), ("phimoe", phi)):
        if all(needs.values()):
            return model_type
    raise CheckpointError("MoEConfig is neither qwen3_moe (needs " + ", ".join(qwen) + ") nor phimoe (needs "
                          + ", ".join(phi) + "); unmet: qwen3_moe " + str([k for k, v in qwen.items() if not v])
                          + ", phimoe " + str([k for k, v in phi.items() if not v]))


def config_to_hf(cfg, dtype=None):
    """MoEConfig -> config.json dict in the transformers 4.x spelling (which 5.x reads too)."""
    model_type = _model_type(cfg)
    hf = dict(architectures=[_ARCHITECTURES[model_type]], model_type=model_type, vocab_size=cfg.vocab_size,
              hidden_size=cfg.hidden_size, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.n_kv_heads, num_experts_per_tok=cfg.top_k, hidden_act="silu",
              attention_bias=cfg.attention_bias, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
              max_position_embeddings=cfg.max_position_embeddings, router_aux_loss_coef=cfg.router_aux_loss_coef,
              tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.init_std, rope_scaling=None,
              use_cache=True, **(cfg.special_token_ids or {}))
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    if model_type == "qwen3_moe":
        hf.update(head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                  moe_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.n_experts,
                  norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                  mlp_only_layers=list(cfg.mlp_only_layers), use_sliding_window=False, sliding_window=None)
        return hf
    hf.update(intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.n_experts,
              router_jitter_noise=cfg.router_jitter_eps, input_jitter_noise=cfg.input_jitter,
              lm_head_bias=cfg.lm_head_bias, sliding_window=None)
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


# -----------------------------------------------------------------------------
# parameter names

_EXPERT_NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
                 "phimoe": ("block_sparse_moe", "w1", "w3", "w2")}


def hf_tensor_map(model, model_type):
    """{on-disk name: the (detached) tensor it fills}. Expert tensors map to slices (views) of the
    stacked weights; the tensors partition the model's parameters (tied ones counted once)."""
    moe, gate, up, down = _EXPERT_NAMES[model_type]
    I = model.config.moe_intermediate_size
    out = {}
    for name, p in model.named_parameters():  # tied lm_head.weight is not listed: embed only
        p = p.detach()
        if name.startswith("lm_head."):
            out[name] = p
        elif not name.startswith("layers."):
            out["model." + name] = p
        else:
            _, i, rest = name.split(".", 2)
            prefix = f"model.layers.{i}."
            if rest == "mlp.router.gate.weight":
                out[f"{prefix}{moe}.gate.weight"] = p
            elif rest == "mlp.gate_up_proj":  # (E, 2I, H): rows [gate; up]
                for e in range(p.shape[0]):
                    out[f"{prefix}{moe}.experts.{e}.{gate}.weight"] = p[e, :I]
                    out[f"{prefix}{moe}.experts.{e}.{up}.weight"] = p[e, I:]
            elif rest == "mlp.down_proj":  # (E, H, I)
                for e in range(p.shape[0]):
                    out[f"{prefix}{moe}.experts.{e}.{down}.weight"] = p[e]
            else:
                out[prefix + rest] = p
    return out
