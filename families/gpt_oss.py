"""
GPT-OSS (`model_type: gpt_oss`; openai/gpt-oss-20b, gpt-oss-120b): everything that differs from the
other families, in one place (docs/architectures.md, "Model families"). Plain data and small
functions; no imports of model.py.

Architecture: RMSNorm, biased q/k/v/o, one learned attention sink per head (eager attention only),
alternating sliding-window / full attention layers, YaRN RoPE; every layer MoE with a biased router
that takes the top-k LOGITS and softmaxes over those k, experts with biases and a clamped SwiGLU
whose gate and up rows are interleaved. The released checkpoints store the expert weights in MXFP4
(dequantize_mxfp4, used by checkpoint.load_hf through packed_tensors); we save plain bf16 / fp32.

On-disk names (transformers 5.x GptOssForCausalLM), layer i, vs ours:
    model.layers.i.mlp.router.weight / .bias            layers.i.mlp.router.gate.weight / .bias
    model.layers.i.mlp.experts.gate_up_proj   (E, H, 2I) layers.i.mlp.gate_up_proj (E, 2I, H), transposed
    model.layers.i.mlp.experts.gate_up_proj_bias (E, 2I) layers.i.mlp.gate_up_proj_bias
    model.layers.i.mlp.experts.down_proj      (E, I, H)  layers.i.mlp.down_proj (E, H, I), transposed
    model.layers.i.mlp.experts.down_proj_bias  (E, H)    layers.i.mlp.down_proj_bias
    model.layers.i.self_attn.sinks              (nh,)    layers.i.self_attn.sinks
The 2I axis keeps the checkpoint's interleaving (gate_j = 2j, up_j = 2j + 1) in our layout too, so
every tensor above is a view of ours (no copy on load or save). MXFP4 instead: ..._blocks
(E, rows, cols/32, 16) uint8 and ..._scales (E, rows, cols/32) uint8, rows x cols = our (E, 2I, H)
and (E, H, I) layouts exactly.
"""
import torch

MODEL_TYPE = "gpt_oss"
ARCHITECTURE = "GptOssForCausalLM"  # config.json `architectures`; vLLM's registry uses the same name
HF_CONFIG_CLASS, HF_MODEL_CLASS = "GptOssConfig", "GptOssForCausalLM"  # transformers (oracle, bench)

# MOE prefix (bench_hf.py reads [0]); the experts are stacked on disk, named by layer_tensors below
EXPERT_NAMES = ("mlp", "gate_up_proj", "gate_up_proj", "down_proj")

# transformers' GptOssConfig defaults (5.23) for the keys a config.json may leave out
HF_DEFAULTS = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                   num_attention_heads=64, num_key_value_heads=8, head_dim=64, hidden_act="silu",
                   max_position_embeddings=131072, initializer_range=0.02, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, rope_theta=150000.0, num_experts_per_tok=4,
                   num_local_experts=128, router_aux_loss_coef=0.001, swiglu_alpha=1.702, swiglu_limit=7.0,
                   sliding_window=128, attention_bias=True, attention_dropout=0.0)
ROPE_TYPES = ("default", "yarn")
INT_KEYS = ("num_local_experts",)
BOOL_KEYS = ()
CARRIES = ("sliding_window", "layer_types")  # MoEConfig switches its config.json carries (families/__init__.py SWITCHES)
NONNEGATIVE_KEYS = ("swiglu_alpha", "swiglu_limit")
QUANT_METHODS = ("mxfp4",)  # quantization_config.quant_method values load_hf dequantizes

# The Harmony format's final channel, without the default system preamble that the released chat
# template writes (model identity, knowledge cutoff, date, reasoning effort): encode_chat's ids are
# NOT the template's ids for gpt-oss (docs/architectures.md). Six specials, so a toy tokenizer in
# this format has 4097 ids (the other formats have five).
CHAT_FORMAT_NAME = "harmony"
CHAT_FORMAT = dict(
    system="<|start|>system<|message|>{system}<|end|>",
    prompt="<|start|>user<|message|>{prompt}<|end|><|start|>assistant<|channel|>final<|message|>",
    response="{response}<|return|>",
    specials=("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|endoftext|>"),
    eos="<|return|>", stop=("<|return|>", "<|endoftext|>"), pad="<|endoftext|>",
)

# gpt-oss-20b (20.9B total / 3.6B active), from openai/gpt-oss-20b's config.json (configs/gpt_oss_20b.py)
PRESET_NAME = "gpt_oss_20b"
PRESET = dict(vocab_size=201088, hidden_size=2880, n_layers=24, n_heads=64, n_kv_heads=8, head_dim=64,
              intermediate_size=2880, n_experts=32, top_k=4, moe_intermediate_size=2880, router="topk",
              router_bias=True, router_softmax_after_topk=True, expert_bias=True, expert_act="clamped_swiglu",
              swiglu_alpha=1.702, swiglu_limit=7.0, norm="rmsnorm", rmsnorm_weight_fp32=True, norm_eps=1e-5,
              qk_norm=False, attention_bias=True, attention_sinks=True, attn_impl="eager", rope_theta=150000.0,
              max_position_embeddings=131072,
              rope_scaling={"type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                            "truncate": False, "original_max_position_embeddings": 4096},
              router_aux_loss_coef=0.9, sliding_window=128,
              layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)))

BENCH = dict(layers_gpu=2, layers_cpu=2, cpu=dict(n_experts=8, top_k=4, moe_intermediate_size=128))

_YARN_KEYS = ("factor", "beta_fast", "beta_slow", "truncate", "original_max_position_embeddings",
              "attention_factor", "mscale", "mscale_all_dim")


def sliding_window(c):
    """The window config.json asks for, None if no layer is a sliding one."""
    layer_types = _layer_types(c)  # (problems() names a malformed one)
    return c.get("sliding_window") if isinstance(layer_types, list) and "sliding_attention" in layer_types else None


def problems(c, hf):
    problems = []
    layer_types = c.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != c["num_hidden_layers"]
                                    or any(t not in ("sliding_attention", "full_attention") for t in layer_types)):
        problems.append(f"layer_types={layer_types!r} (expected num_hidden_layers={c['num_hidden_layers']} "
                        "entries, each 'sliding_attention' or 'full_attention')")
    return problems


def n_experts(c):
    return c["num_local_experts"]


def from_hf(c):
    # every layer is MoE, experts intermediate_size wide; sinks need eager attention (model.py)
    return dict(intermediate_size=c["intermediate_size"], moe_intermediate_size=c["intermediate_size"],
                router="topk", router_bias=True, router_softmax_after_topk=True, expert_bias=True,
                expert_act="clamped_swiglu", swiglu_alpha=c["swiglu_alpha"], swiglu_limit=c["swiglu_limit"],
                norm="rmsnorm", rmsnorm_weight_fp32=True, qk_norm=False, attention_sinks=True, attn_impl="eager",
                lm_head_bias=False, **_window_from_hf(c))


def _layer_types(c):
    # transformers' default: layer i slides iff i is even
    return c.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                    for i in range(c["num_hidden_layers"])]


def _window_from_hf(c):
    """sliding_window / layer_types of MoEConfig; both None when no layer slides (so that a config
    with every layer full is one MoEConfig whatever window it names)."""
    layer_types = _layer_types(c)
    if "sliding_attention" not in layer_types:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=c["sliding_window"], layer_types=tuple(layer_types))


def rope_scaling_from_hf(params):
    """Our rope_scaling from config.json's yarn rope_scaling / rope_parameters (None if not yarn)."""
    if params.get("rope_type", params.get("type")) != "yarn":
        return None
    return {"type": "yarn", **{k: params[k] for k in _YARN_KEYS if params.get(k) is not None}}


def needs(cfg):
    rs = cfg.rope_scaling
    return {"router == 'topk'": cfg.router == "topk", "router_bias": cfg.router_bias,
            "router_softmax_after_topk": cfg.router_softmax_after_topk, "expert_bias": cfg.expert_bias,
            "expert_act == 'clamped_swiglu'": cfg.expert_act == "clamped_swiglu",
            "attention_sinks": cfg.attention_sinks, "norm == 'rmsnorm'": cfg.norm == "rmsnorm",
            "rmsnorm_weight_fp32": cfg.rmsnorm_weight_fp32,
            "not qk_norm": not cfg.qk_norm, "not lm_head_bias": not cfg.lm_head_bias,
            "every layer MoE": cfg.moe_layers == list(range(cfg.n_layers)),
            "rope_scaling None or yarn": rs is None or rs.get("type") == "yarn"}


def to_hf(cfg):
    rs = cfg.rope_scaling
    # no rope_scaling means plain RoPE: say so, since GptOssConfig's default is YaRN
    rope = ({"rope_type": "yarn", **{k: v for k, v in rs.items() if k != "type"}} if rs is not None
            else {"rope_type": "default"})
    hf = dict(head_dim=cfg.head_dim, intermediate_size=cfg.moe_intermediate_size, num_local_experts=cfg.n_experts,
              swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit, rope_scaling=rope,
              attention_dropout=0.0, output_router_logits=False)
    # MoEConfig's layer_types None: every layer slides if there is a window, else none does
    layer_types = cfg.layer_types or ["sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.n_layers
    hf.update(sliding_window=cfg.sliding_window, layer_types=list(layer_types))
    return hf


# -----------------------------------------------------------------------------
# tensors on disk

def layer_tensors(prefix, rest, p):
    """hf_config.hf_tensor_map's hook: {on-disk name: view of p} for our layer parameter `rest`
    (e.g. "mlp.gate_up_proj") of layer `prefix` ("model.layers.i."); None: the shared rule."""
    names = {"mlp.router.gate.weight": "mlp.router.weight", "mlp.router.gate.bias": "mlp.router.bias",
             "mlp.gate_up_proj": "mlp.experts.gate_up_proj", "mlp.gate_up_proj_bias": "mlp.experts.gate_up_proj_bias",
             "mlp.down_proj": "mlp.experts.down_proj", "mlp.down_proj_bias": "mlp.experts.down_proj_bias"}
    if rest not in names:
        return None
    # transformers keeps the experts (E, in, out): ours (E, out, in) transposed, a view
    return {prefix + names[rest]: p.transpose(1, 2) if rest in ("mlp.gate_up_proj", "mlp.down_proj") else p}


# MXFP4 (OCP microscaling, FP4 E2M1 elements): byte b holds element 2j in its low nibble, 2j + 1 in
# its high one; a block of 32 elements shares one E8M0 scale byte s, i.e. 2^(s - 127)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks, scales, dtype=torch.bfloat16):
    """
    blocks (..., G, 16) uint8, scales (..., G) uint8 -> (..., G * 32) in `dtype`: element 2j of a block
    is FP4_VALUES[byte_j & 15] * 2^(scale - 127), element 2j + 1 FP4_VALUES[byte_j >> 4] * 2^(scale - 127).
    (transformers' convert_moe_packed_tensors computes the same, then transposes the last two axes for
    its (E, in, out) layout; ours is (E, out, in): no transpose.) One leading index at a time, so the
    int64 nibble indices never exist for a whole layer (gpt-oss-120b: 128 experts x 5760 x 2880).
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)}: expected "
                         "blocks (..., G, 16) and scales (..., G)")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(*blocks.shape[:-1], 32, dtype=dtype, device=blocks.device)
    flat_blocks, flat_scales, flat_out = blocks.reshape(-1, *blocks.shape[-2:]), scales.reshape(-1, scales.shape[-1]), \
        out.view(-1, *out.shape[-2:])
    for b, s, o in zip(flat_blocks, flat_scales, flat_out):  # (G, 16), (G,), (G, 32)
        o[:, 0::2] = lut[(b & 0x0F).long()]
        o[:, 1::2] = lut[(b >> 4).long()]
        torch.ldexp(o, s.to(torch.int32)[:, None] - 127, out=o)
    return out.reshape(*blocks.shape[:-2], -1)


def packed_tensors(targets, shapes, dtypes):
    """
    checkpoint.load_hf's hook for tensors stored packed: {target name: (source names, unpack)} for each
    target absent from disk whose MXFP4 pair (name_blocks, name_scales) is there, and a list of problems
    (wrong shapes or dtypes, named), found before anything is read. targets: {on-disk name: tensor it
    fills}; shapes / dtypes: {on-disk name: shape list / torch dtype}. unpack(blocks, scales) -> a tensor
    shaped like the target.
    """
    packed, problems = {}, []
    for name, target in targets.items():
        blocks, scales = name + "_blocks", name + "_scales"
        if name in shapes or blocks not in shapes or scales not in shapes:
            continue
        E, cols, rows = target.shape  # target: the transposed view (E, cols, rows) of our (E, rows, cols)
        want = ([E, rows, cols // 32, 16], [E, rows, cols // 32])
        if cols % 32 or [shapes[blocks], shapes[scales]] != list(want) or {dtypes[blocks], dtypes[scales]} != {torch.uint8}:
            problems.append(f"{blocks} {shapes[blocks]} {dtypes[blocks]} / {scales} {shapes[scales]} {dtypes[scales]}: "
                            f"expected uint8 {want[0]} / {want[1]} (MXFP4 of {name} {list(target.shape)})")
            continue
        packed[name] = ((blocks, scales), lambda b, s, dtype=target.dtype: dequantize_mxfp4(b, s, dtype).transpose(1, 2))
    return packed, problems
