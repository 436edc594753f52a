"""
The Hugging Face side of a checkpoint, as data: config.json <-> MoEConfig, and the on-disk tensor
names <-> our parameters, for every family in families/ (Qwen3-MoE `qwen3_moe`, Phi-3.5-MoE and
the SlimMoE Phis `phimoe`, OLMoE `olmoe`). This file holds what the families share; each family's
own keys, defaults, names and checks are in its families/<model_type>.py. No disk I/O here
(checkpoint.py reads and writes); no transformers import.

    config_from_hf(config.json dict) -> MoEConfig;   config_to_hf(MoEConfig) -> config.json dict
    hf_tensor_map(model, model_type) -> {on-disk name: the tensor (or slice) it fills}

On-disk names (docs/architectures.md) vs ours, layer i, expert e (I = moe_intermediate_size;
MOE, GATE, UP, DOWN = the family's EXPERT_NAMES, e.g. mlp/gate_proj/up_proj/down_proj for Qwen3,
block_sparse_moe/w1/w3/w2 for Phi-3.5):
    model.layers.i.MOE.gate.weight                   layers.i.mlp.router.gate.weight
    model.layers.i.MOE.experts.e.GATE.weight         layers.i.mlp.gate_up_proj[e, :I]
    model.layers.i.MOE.experts.e.UP.weight           layers.i.mlp.gate_up_proj[e, I:]
    model.layers.i.MOE.experts.e.DOWN.weight         layers.i.mlp.down_proj[e]
    lm_head.*                                        lm_head.*
    model.<anything else>                            <anything else>

config.json is written in the transformers 4.x spelling (rope_theta, rope_scaling, num_experts), the
spelling of the released checkpoints: transformers 5.x reads it too, so older pins of transformers /
vLLM / lm-eval load what we save. Both spellings are read. A value of the wrong type, a head count
that does not divide, and a switch we do not implement (a sliding window for a family that does not
carry one, dropout, quantization, another activation or RoPE type) are errors naming the file and the key.
"""
import families
from model import MoEConfig


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as is (the message names what is wrong)."""


# -----------------------------------------------------------------------------
# config.json

_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_LONGROPE_KEYS = ("short_factor", "long_factor", "short_mscale", "long_mscale")
# keys every family has, by the type they must have (a family adds its own: INT_KEYS, ...)
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "num_experts_per_tok", "max_position_embeddings")
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
_NONNEGATIVE_NUMBERS = ("initializer_range", "router_aux_loss_coef")
_BOOLS = ("tie_word_embeddings", "attention_bias")
_DROPOUTS = ("attention_dropout", "hidden_dropout")  # not implemented: only 0 is accepted


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _type_problems(c, family):
    """Values of the wrong type or range, and head counts that do not fit together."""
    problems = []
    ints = _POSITIVE_INTS + family.INT_KEYS + (("head_dim",) if c.get("head_dim") is not None else ())
    problems += [f"{k}={c[k]!r} (expected a positive integer)" for k in ints if not (_is_int(c[k]) and c[k] > 0)]
    problems += [f"{k}={c[k]!r} (expected a positive number)" for k in _POSITIVE_NUMBERS
                 if not (_is_number(c[k]) and c[k] > 0)]
    problems += [f"{k}={c[k]!r} (expected a number >= 0)" for k in _NONNEGATIVE_NUMBERS + family.NONNEGATIVE_KEYS
                 if not (_is_number(c[k]) and c[k] >= 0)]
    problems += [f"{k}={c[k]!r} (expected true or false)" for k in _BOOLS + family.BOOL_KEYS
                 if not isinstance(c[k], bool)]
    if problems:  # the checks below need the numbers
        return problems
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    if heads % kv:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if c.get("head_dim") is None and c["hidden_size"] % heads:
        problems.append(f"hidden_size={c['hidden_size']} is not a multiple of num_attention_heads={heads} "
                        "(and no head_dim is given)")
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    if head_dim % 2:
        problems.append(f"head dimension {head_dim} is odd (RoPE rotates pairs)")
    n_experts = family.n_experts(c)
    if not (_is_int(n_experts) and n_experts > 0):
        problems.append(f"number of experts {n_experts!r} (expected a positive integer)")
    elif c["num_experts_per_tok"] > n_experts:
        problems.append(f"num_experts_per_tok={c['num_experts_per_tok']} exceeds the {n_experts} experts")
    return problems


def _switch_problems(c, hf, family):
    """Switches the config sets that this code does not implement."""
    problems = []
    if c["hidden_act"] != "silu":
        problems.append(f"unsupported hidden_act={c['hidden_act']!r} (only 'silu')")
    quant = c.get("quantization_config")
    # a family may dequantize its released format on load (gpt_oss: mxfp4)
    if "quantization_config" in c and not (isinstance(quant, dict) and
                                           quant.get("quant_method") in getattr(family, "QUANT_METHODS", ())):
        problems.append("unsupported quantization_config (quantized checkpoints are not supported"
                        + (f" except {list(family.QUANT_METHODS)}" if getattr(family, "QUANT_METHODS", ()) else "") + ")")
    window = family.sliding_window(c)
    if window is not None and not (_is_int(window) and window > 0):
        problems.append(f"sliding_window={window!r} (expected a positive integer or null)")
    # a family that does not carry the window (families.SWITCHES) does not map it into MoEConfig: a
    # window that would cut attention short is then a switch we do not implement for it
    elif (window is not None and window < c["max_position_embeddings"]
          and not families.carries(family, "sliding_window")):
        problems.append(f"unsupported sliding_window={window!r} (sliding-window attention is not implemented "
                        f"for {family.MODEL_TYPE})")
    problems += [f"unsupported {k}={c[k]!r} (dropout is not implemented; only 0)" for k in _DROPOUTS
                 if c.get(k, 0) != 0]
    return problems + family.problems(c, hf)


def config_from_hf(hf, source="config.json"):
    """A transformers config.json dict (4.x or 5.x spelling) -> MoEConfig. source: the file, for messages."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got a {type(hf).__name__}")
    try:
        family = families.get(hf.get("model_type"))
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None
    architectures = hf.get("architectures") or []
    for name in architectures if isinstance(architectures, list) else [architectures]:
        try:
            other = families.by_architecture(name)
        except ValueError as err:
            raise CheckpointError(f"{source}: {err}") from None
        if other is not family:
            raise CheckpointError(f"{source}: architectures names {name!r} ({other.MODEL_TYPE}) but model_type is "
                                  f"{family.MODEL_TYPE!r}: which one is it?")
    # a key set to null means "the default", as in transformers
    c = {**family.HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    problems = _type_problems(c, family)
    if not problems:
        problems = _switch_problems(c, hf, family)
    if not problems:
        rope_theta, rope_scaling = _rope_from_hf(c, family, problems)
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    heads = c["num_attention_heads"]
    return MoEConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], n_layers=c["num_hidden_layers"],
                     n_heads=heads, n_kv_heads=c["num_key_value_heads"],
                     head_dim=c.get("head_dim") or c["hidden_size"] // heads, n_experts=family.n_experts(c),
                     top_k=c["num_experts_per_tok"], attention_bias=c["attention_bias"],
                     norm_eps=c["rms_norm_eps"], rope_theta=rope_theta, rope_scaling=rope_scaling,
                     max_position_embeddings=c["max_position_embeddings"],
                     router_aux_loss_coef=c["router_aux_loss_coef"], tie_word_embeddings=c["tie_word_embeddings"],
                     init_std=c["initializer_range"],
                     special_token_ids={k: hf[k] for k in _TOKEN_KEYS if hf.get(k) is not None} or None,
                     **family.from_hf(c))


def _rope_from_hf(c, family, problems):
    # 5.x: rope_parameters {rope_type, rope_theta, ...}; 4.x: rope_theta + rope_scaling {type, ...}
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(params, dict):
        problems.append(f"rope_scaling / rope_parameters={params!r} (expected an object)")
        return None, None
    theta = params.get("rope_theta", c["rope_theta"])
    if not (_is_number(theta) and theta > 0):
        problems.append(f"rope_parameters.rope_theta={theta!r} (expected a positive number)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("unsupported partial_rotary_factor != 1")
    if rope_type not in family.ROPE_TYPES:
        problems.append(f"unsupported RoPE type {rope_type!r} for {family.MODEL_TYPE} "
                        f"(supported: {', '.join(map(repr, family.ROPE_TYPES))})")
        return theta, None
    if rope_type == "default":
        return theta, None
    if rope_type == "yarn":  # (gpt_oss)
        if "original_max_position_embeddings" not in params:
            problems.append("yarn rope_scaling without original_max_position_embeddings")
        return theta, family.rope_scaling_from_hf(params)
    missing = [k for k in ("short_factor", "long_factor") if k not in params]  # longrope
    if missing:
        problems.append(f"longrope without {missing}")
        return theta, None
    # as transformers does: a top-level original_max_position_embeddings (Phi-3.5 writes it) wins
    original_max = c.get("original_max_position_embeddings",
                         params.get("original_max_position_embeddings", c["max_position_embeddings"]))
    scaling = {"type": "longrope", "original_max_position_embeddings": original_max}
    scaling.update({k: params[k] for k in _LONGROPE_KEYS if params.get(k) is not None})
    return theta, scaling


def family_of(cfg):
    """The family module a MoEConfig is (families.of_config), or a CheckpointError saying why none."""
    try:
        return families.of_config(cfg)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def config_to_hf(cfg, dtype=None):
    """MoEConfig -> config.json dict in the transformers 4.x spelling (which 5.x reads too)."""
    family = family_of(cfg)
    hf = dict(architectures=[family.ARCHITECTURE], model_type=family.MODEL_TYPE, vocab_size=cfg.vocab_size,
              hidden_size=cfg.hidden_size, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.n_kv_heads, num_experts_per_tok=cfg.top_k, hidden_act="silu",
              attention_bias=cfg.attention_bias, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
              max_position_embeddings=cfg.max_position_embeddings, router_aux_loss_coef=cfg.router_aux_loss_coef,
              tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.init_std, rope_scaling=None,
              use_cache=True, **(cfg.special_token_ids or {}))
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf.update(family.to_hf(cfg))
    return hf


# -----------------------------------------------------------------------------
# parameter names

def hf_tensor_map(model, model_type):
    """{on-disk name: the (detached) tensor it fills}. Expert tensors map to slices (views) of the
    stacked weights; the tensors partition the model's parameters (tied ones counted once)."""
    try:
        family = families.get(model_type)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    moe, gate, up, down = family.EXPERT_NAMES
    # a family whose MoE tensors are laid out otherwise on disk names them itself (gpt_oss: stacked)
    layer_tensors = getattr(family, "layer_tensors", lambda prefix, rest, p: None)
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
            own = layer_tensors(prefix, rest, p)
            if own is not None:
                out.update(own)
            elif rest == "mlp.router.gate.weight":
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
