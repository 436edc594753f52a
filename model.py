"""
A top-k Mixture-of-Experts decoder-only transformer, in plain PyTorch.

One MoEConfig describes a toy model for a laptop and, exactly, the two architectures SARA is
applied to: Qwen3-MoE (Qwen3-30B-A3B) and Phi-3.5-MoE-instruct, and also the SlimMoE Phi models
(Phi-mini/tiny-MoE: explicit head_dim, sliding window) and OLMoE (whole-projection qk-norm,
clip_qkv). The numerics (the dtype of each step, the order of the expert sum) follow the
checkpoints' reference code, so that this file and transformers' eager implementation agree to
~1e-7 in fp32 and bit for bit in bf16 on CPU (docs/architectures.md).

Notation in shape comments: B batch, T time (query length), S key length (past + T), H hidden,
nh query heads, nkv key/value heads, hd head dim, V vocab, E experts, K experts per token,
I expert (intermediate) width, N = B*T tokens.

    x = embed[ids]                                      (B, T, H)
    for each block:  x = x + attn(norm1(x));  x = x + ffn(norm2(x))   ffn = MoE or dense SwiGLU
    logits = lm_head(norm(x))                           (B, T, V)

Decisions and why:
- Experts are stacked 3-D weights (gate_up (E, 2I, H), down (E, H, I)), the in-memory layout of
  transformers 5.x: one parameter per kind, every expert always gets a (possibly zero) gradient,
  so DDP needs no find_unused_parameters, and grouped GEMM reads the weights as they are.
- Two dispatch paths compute the same function (experts.py): "loop" (the reference) and "grouped"
  (grouped_mm, no host sync); expert_impl="auto" takes grouped wherever torch has the kernel.
- Speed (bench.py, one H100, 4 x 2048 tokens, 4-layer Qwen3-30B-A3B dims): loss_chunk_size > 0
  runs lm_head + cross-entropy in chunks with the gradient computed in the forward (the fp32
  (B, T, V) logits, 5 GB, never exist); plain causal attention passes no mask, so SDPA takes a
  flash kernel with native GQA; the grouped path gathers in both directions (no atomics);
  torch.compile of each Block fuses norms, RoPE, SwiGLU and the combine (88 -> 64 ms/step).
- Position ids come from the attention mask (cumsum - 1), so a left-padded sequence gives the
  same logits as the unpadded one (transformers' plain forward uses arange and does not).
- Sliding-window attention is a mask, built per layer in Attention from the key count (so the
  layer loop and the KV cache are unchanged, and the cache keeps every key: the mask hides the old
  ones). A window covering all keys is not applied, keeping SDPA's mask-free causal kernel.
"""
import math
from dataclasses import dataclass, fields, asdict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chunked_ce import chunked_cross_entropy
from experts import GROUPED_MM, GROUPED_ON_CPU, clamped_swiglu, experts_grouped, experts_loop
from families import gpt_oss, phimoe, qwen3_moe
from router import TopKRouter, SparseMixerRouter, load_balancing_loss, router_z_loss


LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class MoEConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0 -> hidden_size // n_heads
    intermediate_size: int = 512  # width of dense (non-MoE) SwiGLU layers
    # --- mixture of experts
    n_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 256
    router: str = "topk"  # "topk" (softmax -> top-k) or "sparsemixer" (Phi-3.5-MoE)
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1 (topk router)
    router_jitter_eps: float = 0.01  # sparsemixer's relative masking threshold
    input_jitter: float = 0.0  # sparsemixer's multiplicative router-input noise in training
    # sparsemixer with input_jitter, in training: return the logits of the un-jittered input (what
    # the SARA term pools: softmax(h W_g) exactly), while routing still uses the jittered ones
    router_clean_logits: bool = False
    router_bias: bool = False  # the gate has a bias (GPT-OSS); out.router_logits include it
    # topk router: top-k of the logits, then softmax over the k chosen (GPT-OSS), instead of
    # softmax over all E -> top-k (-> renormalise)
    router_softmax_after_topk: bool = False
    expert_bias: bool = False  # per-expert biases of both projections (GPT-OSS)
    # "swiglu": silu(gate) * up, gate_up rows [gate; up]; "clamped_swiglu": GPT-OSS's
    # (up + 1) * gate * sigmoid(alpha * gate) after clamping to swiglu_limit, rows interleaved (experts.py)
    expert_act: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    mlp_only_layers: tuple = ()  # these layers get a dense SwiGLU instead of experts
    decoder_sparse_step: int = 1  # layer i is MoE iff (i + 1) % step == 0 (and not mlp-only)
    router_aux_loss_coef: float = 0.001  # lambda_LB; used by train.py, reported by the model
    router_z_loss_coef: float = 0.0
    expert_impl: str = "auto"  # "loop", "grouped", or "auto" (grouped where torch has the kernel)
    # --- attention and normalisation
    norm: str = "rmsnorm"  # "rmsnorm" (Qwen3) or "layernorm" (Phi-3.5, with bias)
    norm_eps: float = 1e-6
    rmsnorm_weight_fp32: bool = False  # RMSNorm multiplies its weight before the cast back (GPT-OSS)
    qk_norm: bool = False  # RMSNorm of q and k before RoPE (Qwen3, OLMoE)
    # "head": over each head's head_dim, one weight of hd shared by the heads (Qwen3); "whole": over
    # the whole q (nh*hd) and k (nkv*hd) projection, one weight entry per channel (OLMoE)
    qk_norm_scope: str = "head"
    # clamp q, k, v to [-clip_qkv, clip_qkv] after the projection and after a "whole" qk-norm (in
    # that order, as OLMoE does; a per-head norm comes after the clamp: no family has both); None: off
    clip_qkv: float = None
    attention_bias: bool = False
    attn_impl: str = "sdpa"  # "sdpa" or "eager" (the checkpoints' reference numerics)
    # a learned per-head logit in every softmax's denominator (GPT-OSS): eager attention only
    attention_sinks: bool = False
    # sliding-window attention: a query at index i sees keys at indices i - sliding_window < j <= i
    # (the window counts the query itself; transformers' sliding_window_overlay). layer_types names
    # each layer "sliding_attention" or "full_attention" (transformers' spelling); None means every
    # layer is sliding when sliding_window is set (Phi-3.5 / Phi-mini-MoE), else every layer full.
    sliding_window: int = None
    layer_types: tuple = None
    # --- positions
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rope_scaling: dict = None  # None, {"type": "longrope", "short_factor": [...], ...} or {"type": "yarn", "factor": ..., ...}
    # --- output
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    # --- training
    init_std: float = 0.02
    gradient_checkpointing: bool = False
    # --- checkpoint metadata
    special_token_ids: dict = None  # bos/eos/pad_token_id of a loaded config.json, written back on save
    # --- speed
    # >0: with labels, lm_head + cross-entropy run this many tokens at a time and the (B, T, V)
    # logits are never materialised (out.logits is then None); same loss and gradients.
    loss_chunk_size: int = 0

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.n_heads
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
        problems = []
        if self.sliding_window is not None and not (
                isinstance(self.sliding_window, int) and not isinstance(self.sliding_window, bool)
                and self.sliding_window > 0):
            problems.append(f"sliding_window={self.sliding_window!r} must be a positive integer or None")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                problems.append(f"layer_types has {len(self.layer_types)} entries, expected n_layers={self.n_layers}")
            bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES}, key=str)
            if bad:
                problems.append(f"layer_types {bad} are not among {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                problems.append("layer_types has 'sliding_attention' layers but sliding_window is None")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_experts and not 0 < self.top_k <= self.n_experts:
            problems.append(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        for key, allowed in [("router", ("topk", "sparsemixer")), ("norm", ("rmsnorm", "layernorm")),
                             ("expert_impl", ("auto", "loop", "grouped")), ("attn_impl", ("sdpa", "eager")),
                             ("expert_act", ("swiglu", "clamped_swiglu")), ("qk_norm_scope", ("head", "whole"))]:
            if getattr(self, key) not in allowed:
                problems.append(f"{key}={getattr(self, key)!r} is not one of {allowed}")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ("longrope", "yarn"):
            problems.append(f"rope_scaling type {self.rope_scaling.get('type')!r} unsupported (only 'longrope', 'yarn')")
        if self.router_softmax_after_topk and self.router != "topk":
            problems.append(f"router_softmax_after_topk=True needs router='topk', not {self.router!r}")
        if self.router_bias and self.router != "topk":
            problems.append(f"router_bias=True needs router='topk', not {self.router!r}")
        if self.attention_sinks and self.attn_impl != "eager":
            # never silently dropped: torch's SDPA kernels have no sink term in their softmax
            problems.append(f"attention_sinks=True (GPT-OSS) cannot run with attn_impl={self.attn_impl!r}: "
                            "scaled_dot_product_attention has no attention-sink term; use attn_impl='eager'")
        if self.clip_qkv is not None and not (isinstance(self.clip_qkv, (int, float)) and not isinstance(
                self.clip_qkv, bool) and 0 < self.clip_qkv < math.inf):
            problems.append(f"clip_qkv={self.clip_qkv!r} must be a positive number or None")
        if problems:
            raise ValueError("MoEConfig: " + "; ".join(problems))

    def attention_window(self, i):
        """The sliding window of layer i's attention, or None (full causal attention)."""
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    def is_moe_layer(self, i):
        return (self.n_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self):
        """Indices of the MoE blocks; out.router_logits[j] belongs to block moe_layers[j]."""
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MoEConfig: unknown keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


def qwen3_30b_a3b_config(**overrides):
    """Qwen3-30B-A3B's architecture (30.5B total / 3.3B active parameters): families/qwen3_moe.py PRESET."""
    return MoEConfig(**{**qwen3_moe.PRESET, **overrides})


def gpt_oss_20b_config(**overrides):
    """gpt-oss-20b's architecture (20.9B total / 3.6B active): families/gpt_oss.py PRESET."""
    return MoEConfig(**{**gpt_oss.PRESET, **overrides})


def phi35_moe_config(**overrides):
    """Phi-3.5-MoE-instruct's architecture (41.9B total / 6.6B active), without LongRoPE factors
    (those come with the checkpoint's config.json): families/phimoe.py PRESET."""
    return MoEConfig(**{**phimoe.PRESET, **overrides})


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps, weight_fp32=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.weight_fp32 = weight_fp32

    def forward(self, x):
        # normalise in fp32, cast back BEFORE the weight multiply (Qwen3's numerics), or AFTER it
        # (weight_fp32: GPT-OSS's; one rounding instead of two, which bf16 parity needs)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_fp32:
            return (self.weight * x32).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg, dim):
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, weight_fp32=cfg.rmsnorm_weight_fp32)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)  # with weight and bias


class RotaryEmbedding(nn.Module):
    """
    NeoX-style RoPE. With rope_scaling type "longrope" (Phi-3.5): per-frequency divisors
    short_factor or long_factor, switching when a sequence is longer than
    original_max_position_embeddings, as the released Phi-3.5 code and transformers 4.x do
    (transformers 5.x always takes the short factors), and cos/sin scaled by an mscale.
    When decoding with a cache, keys cached before the switch keep their short-factor
    rotation, exactly as in the released code.
    With rope_scaling type "yarn" (GPT-OSS; arXiv 2309.00071): one set of frequencies at every
    length, blended per frequency between theta^(-2i/hd) and that divided by `factor`, and cos/sin
    scaled by the attention factor, as transformers' _compute_yarn_parameters computes them.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        rs = cfg.rope_scaling
        self.original_max = None
        self.mscale_short = self.mscale_long = 1.0
        if rs is not None and rs["type"] == "yarn":
            self.mscale_short = yarn_attention_factor(rs, cfg.max_position_embeddings)
        elif rs is not None:
            for key in ("short_factor", "long_factor"):
                if len(rs[key]) != cfg.head_dim // 2:
                    raise ValueError(f"rope_scaling.{key} has {len(rs[key])} entries, "
                                     f"expected head_dim/2 = {cfg.head_dim // 2}")
            self.original_max = rs["original_max_position_embeddings"]
            scale = cfg.max_position_embeddings / self.original_max
            default = math.sqrt(1 + math.log(scale) / math.log(self.original_max)) if scale > 1 else 1.0
            self.mscale_short = rs.get("short_mscale") or default
            self.mscale_long = rs.get("long_mscale") or default
        self._make_inv_freq(torch.device("cpu"))

    def _make_inv_freq(self, device):
        # inv_freq = 1 / (factor * theta^(2i/hd)), in fp32 (factor = 1 without LongRoPE).
        # Computed on the CPU, then moved, as the checkpoints' code does: a GPU pow can differ
        # from the CPU's by an ulp, which is enough to break bf16 bit-exactness.
        hd, rs = self.cfg.head_dim, self.cfg.rope_scaling
        cpu = torch.device("cpu")  # explicit: also under a `with torch.device("meta")` block
        base = self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=cpu).float() / hd)
        if rs is not None and rs["type"] == "yarn":
            self.inv_freq_short = yarn_inv_freq(base, rs, self.cfg.rope_theta, hd,
                                                self.cfg.max_position_embeddings).to(device)
            self.inv_freq_long = None
            return
        short = torch.tensor(rs["short_factor"], device=cpu) if rs else 1.0
        self.inv_freq_short = (1.0 / (short * base)).to(device)  # (hd/2,)
        self.inv_freq_long = (1.0 / (torch.tensor(rs["long_factor"], device=cpu) * base)).to(device) if rs else None

    def _apply(self, fn, recurse=True):
        # Not buffers on purpose: model.to(bfloat16) must not round the frequencies (the
        # checkpoints compute them in fp32). Follow device moves only.
        super()._apply(fn, recurse)
        self._make_inv_freq(fn(torch.empty(0)).device)
        return self

    def forward(self, position_ids, dtype):
        # position_ids: (B, T) -> cos, sin: (B, T, hd) in `dtype`
        inv_freq = self.inv_freq_short[None, :]  # (1, hd/2)
        mscale = torch.full_like(position_ids[:, :1], 1, dtype=torch.float32) * self.mscale_short
        if self.original_max is not None:
            # LongRoPE picks its branch per sequence from that sequence's length (its last
            # position + 1), so padding never changes the result; on device, no host sync
            is_long = (position_ids.max(dim=-1, keepdim=True).values + 1) > self.original_max  # (B, 1)
            inv_freq = torch.where(is_long, self.inv_freq_long, self.inv_freq_short)  # (B, hd/2)
            mscale = torch.where(is_long, self.mscale_long, self.mscale_short).float()  # (B, 1)
        freqs = position_ids[..., None].float() * inv_freq[:, None, :]  # (B, T, hd/2), fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        mscale = mscale[:, :, None]  # (B, 1, 1)
        return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)


def yarn_attention_factor(rs, max_position_embeddings):
    """YaRN's cos/sin scale: rs["attention_factor"] if given, else 0.1 ln(s) + 1 (s = factor), or
    DeepSeek's ratio with mscale / mscale_all_dim."""
    if rs.get("attention_factor") is not None:
        return rs["attention_factor"]
    factor = rs.get("factor") or max_position_embeddings / rs["original_max_position_embeddings"]
    get = lambda scale, m=1: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return float(get(factor, rs["mscale"]) / get(factor, rs["mscale_all_dim"]))
    return get(factor)


def yarn_inv_freq(base, rs, theta, hd, max_position_embeddings):
    """YaRN frequencies (hd/2,), fp32. base = theta^(2i/hd) (hd/2,). Frequencies that turn more than
    beta_fast times over the original context keep theta^(-2i/hd), those that turn fewer than beta_slow
    times are divided by `factor`, with a linear ramp between (truncate: the ramp's ends rounded out)."""
    factor = rs.get("factor") or max_position_embeddings / rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    original = rs["original_max_position_embeddings"]
    # the dimension index at which a frequency turns `rotations` times over the original context
    dim_of = lambda rotations: hd * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(hd // 2, dtype=torch.float32, device=base.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # the weight of the unscaled frequency
    return (1.0 / (factor * base)) * (1 - keep) + (1.0 / base) * keep


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Per-layer key/value buffers for generation. k, v: (B, nkv, S_max, hd); `length` filled."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer, k, v):  # k, v: (B, nkv, T, hd) -> all keys/values so far
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions exceed max_len={self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        nh, nkv, hd, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(H, nh * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, nkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hd, H, bias=cfg.attention_bias)
        if cfg.qk_norm:
            whole = cfg.qk_norm_scope == "whole"
            self.q_norm = RMSNorm(nh * hd if whole else hd, cfg.norm_eps)
            self.k_norm = RMSNorm(nkv * hd if whole else hd, cfg.norm_eps)
        if cfg.attention_sinks:  # one learned logit per query head (GPT-OSS)
            self.sinks = nn.Parameter(torch.empty(nh))

    def forward(self, x, cos, sin, mask, cache=None):
        # x: (B, T, H); cos, sin: (B, T, hd); mask: (B, 1, T, S) bool, True = may attend,
        # or None for plain causal attention (no padding, no cache)
        B, T, _ = x.shape
        nh, nkv, hd = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, nh*hd), (B, T, nkv*hd) x2
        if self.cfg.qk_norm and self.cfg.qk_norm_scope == "whole":  # OLMoE: over all channels
            q, k = self.q_norm(q), self.k_norm(k)
        clip = self.cfg.clip_qkv
        if clip is not None:  # after the whole-projection norm (OLMoE's order)
            q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
        q, k = q.view(B, T, nh, hd), k.view(B, T, nkv, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.cfg.qk_norm and self.cfg.qk_norm_scope == "head":  # Qwen3: per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hd), (B, nkv, T, hd)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        mask = self.window_mask(mask, T, k.shape[2], x.device)
        if self.cfg.attn_impl == "eager":
            # GQA: query head h uses kv head h // (nh/nkv)
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
            if mask is None:  # plain causal, T == S
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = torch.matmul(q, k.transpose(2, 3)) * hd ** -0.5  # (B, nh, T, S)
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            if self.cfg.attention_sinks:
                # the sink is one more "key" per head with logit sinks[h] and no value: it takes
                # its share of the softmax and is dropped. Max-subtracted, in the model dtype, as
                # transformers' GPT-OSS eager attention does. scores (B, nh, T, S) -> (B, nh, T, S+1)
                sink = self.sinks.to(scores.dtype).view(1, nh, 1, 1).expand(B, nh, T, 1)
                scores = torch.cat([scores, sink], dim=-1)
                scores = scores - scores.max(dim=-1, keepdim=True).values
                probs = torch.softmax(scores, dim=-1, dtype=scores.dtype)[..., :-1].to(q.dtype)
            else:
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            y = torch.matmul(probs, v)
        else:
            if self.cfg.attention_sinks:  # (MoEConfig refuses it; this catches a config edited after)
                raise ValueError("attention_sinks=True cannot run with attn_impl='sdpa': scaled_dot_product_attention "
                                 "has no attention-sink term; use attn_impl='eager'")
            # mask None (plain causal) lets SDPA take its flash kernel; enable_gqa maps query head
            # h to kv head h // (nh/nkv) without copying k and v (a 4-8x larger tensor)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=nh != nkv)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.o_proj(y)

    def window_mask(self, mask, T, S, device):
        """mask (B, 1, T, S) bool or None (plain causal) -> the same with this layer's sliding window
        applied: query i (absolute index S - T + i, the cache index, as transformers counts it) sees
        keys j > i - window. A window that covers all S keys changes nothing and is not applied,
        so short sequences keep SDPA's mask-free causal kernel."""
        window = self.cfg.attention_window(self.layer_idx)
        if window is None or window >= S:
            return mask
        q_index = torch.arange(S - T, S, device=device)[:, None]
        k_index = torch.arange(S, device=device)[None, :]
        in_window = (k_index > q_index - window)[None, None]  # (1, 1, T, S)
        if mask is None:  # plain causal, T == S
            return (k_index <= q_index)[None, None] & in_window
        return mask & in_window


class SwiGLU(nn.Module):
    """Dense feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -----------------------------------------------------------------------------
# the mixture of experts (dispatch paths: experts.py)

class MoE(nn.Module):
    """Router + E SwiGLU experts stored as stacked weights."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        E, H, I = cfg.n_experts, cfg.hidden_size, cfg.moe_intermediate_size
        if cfg.router == "sparsemixer":
            self.router = SparseMixerRouter(H, E, cfg.top_k, cfg.router_jitter_eps, cfg.input_jitter,
                                            clean_logits=cfg.router_clean_logits)
        else:
            self.router = TopKRouter(H, E, cfg.top_k, cfg.norm_topk_prob, bias=cfg.router_bias,
                                     softmax_after_topk=cfg.router_softmax_after_topk)
        # [gate; up] rows per expert (expert_act "clamped_swiglu": gate and up rows interleaved)
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        if cfg.expert_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I))
            self.down_proj_bias = nn.Parameter(torch.empty(E, H))
        self.expert_options = {}  # experts.py's optional arguments: none for Qwen3 / Phi-3.5
        if cfg.expert_act == "clamped_swiglu":
            self.expert_options["act"] = partial(clamped_swiglu, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
        # router.RoutingIntervention or None (untouched, bit for bit); set it with router.intervene
        self.intervention = None

    def forward(self, x):  # x: (B, T, H) -> (B, T, H), router logits (B, T, E)
        B, T, H = x.shape
        hook = self.intervention
        if hook is None:
            weights, expert_ids, logits = self.router(x)  # (N, K), (N, K), (B, T, E) (not a view)
        else:
            weights, expert_ids, logits = self.router(x, edit_logits=hook.edit_logits)
            weights, expert_ids = hook.route(weights, expert_ids, B, T, self.cfg.n_experts)
            if hook.remove_output:
                return torch.zeros_like(x), logits
        x = x.reshape(B * T, H)
        impl = self.cfg.expert_impl
        if impl == "auto":
            grouped = x.is_cuda or (x.device.type == "cpu" and GROUPED_ON_CPU)
            # under torch.compile, grouped_mm takes bf16 only (torch 2.13): other dtypes loop
            grouped = grouped and not (torch.compiler.is_compiling() and x.dtype != torch.bfloat16)
            impl = "grouped" if grouped and GROUPED_MM is not None else "loop"
        dispatch = experts_grouped if impl == "grouped" else experts_loop
        if self.cfg.expert_bias:
            y = dispatch(x, expert_ids, weights, self.gate_up_proj, self.down_proj, gate_up_bias=self.gate_up_proj_bias,
                         down_bias=self.down_proj_bias, **self.expert_options)
        else:
            y = dispatch(x, expert_ids, weights, self.gate_up_proj, self.down_proj, **self.expert_options)
        return y.view(B, T, H), logits


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.is_moe:
            y, router_logits = self.mlp(self.post_attention_layernorm(x))
            return x + y, router_logits
        return x + self.mlp(self.post_attention_layernorm(x)), None


@dataclass
class ModelOutput:
    logits: torch.Tensor = None  # (B, T, V)
    loss: torch.Tensor = None  # mean cross-entropy over labels != -100, or None
    router_logits: tuple = ()  # one (B, T, E) tensor of raw gate logits per MoE layer
    aux_loss: torch.Tensor = None  # load-balancing loss (padding excluded), or None if no MoE
    z_loss: torch.Tensor = None  # router z-loss (padding excluded), or None if no MoE
    hidden: torch.Tensor = None  # (B, T, H) final normed hidden states, with return_hidden=True


class MoETransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg)
        self.residual_hook = None  # hook(p, x_BTH) -> x_BTH on the residual stream (forward); ShifCon's shift
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MoE):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
            nn.init.normal_(module.down_proj, mean=0.0, std=std)
            if module.cfg.expert_bias:
                nn.init.zeros_(module.gate_up_proj_bias)
                nn.init.zeros_(module.down_proj_bias)
        elif isinstance(module, Attention) and module.cfg.attention_sinks:
            nn.init.normal_(module.sinks, mean=0.0, std=std)  # as transformers' GPT-OSS does
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self, active=False):
        """Total parameters, or those one token uses (K of E experts per MoE layer)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            cfg = self.config
            per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
            if cfg.expert_bias:
                per_expert += 2 * cfg.moe_intermediate_size + cfg.hidden_size
            total -= len(cfg.moe_layers) * (cfg.n_experts - cfg.top_k) * per_expert
        return total

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward) of a sequence of seq_len tokens:
            6 * N + 6 * n_layers * seq_len * n_heads * head_dim
        N = active parameters (K of E experts per MoE layer; router, attention, norms, lm_head)
        without the embedding lookup (a gather, not a matmul; a tied lm_head is counted). The
        second term is attention's QK^T and PV (2 matmuls x 2 FLOPs x n_heads*head_dim per key),
        over the causal half of the keys (seq_len / 2 on average), times 3 for forward + backward.
        Used by train.py's and bench.py's MFU."""
        cfg = self.config
        n = self.num_params(active=True)
        if not cfg.tie_word_embeddings:
            n -= self.embed_tokens.weight.numel()
        return 6 * n + 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, cache=None,
                return_hidden=False):
        """
        input_ids: (B, T) long. attention_mask: (B, S) with 1 for real tokens, 0 for padding,
        S = T, or past + T when decoding with a KVCache. labels: (B, T), -100 = ignored; logits
        at t predict labels at t + 1 (the HF convention). return_hidden: out.hidden = the final
        normed hidden states (B, T, H), and no logits or loss are computed (callers that need
        only some positions' logits apply self.lm_head themselves). Returns a ModelOutput.
        """
        cfg = self.config
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, S, device=input_ids.device).expand(B, T)
            else:  # count only real tokens, so left padding does not shift positions
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        # (B, 1, T, S) boolean: causal (query at absolute index past+i sees keys <= past+i)
        # and, if given, no padded keys
        q_index = torch.arange(past, S, device=input_ids.device)[:, None]
        k_index = torch.arange(S, device=input_ids.device)[None, :]
        mask = (k_index <= q_index)[None, None].expand(B, 1, T, S)
        if attention_mask is None and cache is None:
            mask = None  # plain causal: attention may use a kernel that masks by itself
        elif attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
            # a padding query (e.g. left padding) would see no key at all, and its NaN output
            # would leak through 0 * NaN into the real tokens' attention: let it see itself
            mask = mask | (k_index == q_index)[None, None]
        x = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary(position_ids, x.dtype)
        router_logits = []
        # residual_hook (an attribute, None = untouched, bit for bit): hook(p, x_BTH) -> x_BTH on the residual
        # stream entering decoder layer p (p = 0: the embeddings, Hugging Face's hidden_states[p]; p = n_layers:
        # the last layer's output BEFORE the final norm, where HF's last entry is after it). It may return x
        # changed (ShifCon's shift into and out of English's subspace, methods/shifcon.py) or record it.
        hook = self.residual_hook
        for p, block in enumerate(self.layers):
            if hook is not None:
                x = hook(p, x)
            if cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, logits = checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x, logits = block(x, cos, sin, mask, cache)
            if logits is not None:
                router_logits.append(logits)
        if hook is not None:
            x = hook(len(self.layers), x)
        if cache is not None:
            cache.length = S
        out = ModelOutput(router_logits=tuple(router_logits))
        if labels is not None:
            # position t predicts label t + 1; the last position predicts nothing. Shifting the
            # labels, not the logits, keeps the logits a view: no copy of (B, T, V) and no
            # zero-filled gradient for the dropped position (~8% of a toy CPU step).
            targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # (B*T,)
        if return_hidden:
            out.hidden = self.norm(x)  # (B, T, H)
        elif labels is not None and cfg.loss_chunk_size > 0:
            out.loss = chunked_cross_entropy(self.norm(x).reshape(B * T, -1), self.lm_head.weight,
                                             self.lm_head.bias, targets, cfg.loss_chunk_size)
        else:
            logits = self.lm_head(self.norm(x))  # (B, T, V)
            out.logits = logits
            if labels is not None:  # eq. 10: L_CE
                out.loss = F.cross_entropy(logits.float().reshape(B * T, -1), targets, ignore_index=-100)
        if router_logits:
            token_mask = attention_mask[:, past:] if attention_mask is not None else None
            out.aux_loss = load_balancing_loss(router_logits, cfg.top_k, token_mask)
            if cfg.router_z_loss_coef > 0:
                out.z_loss = router_z_loss(router_logits, token_mask)
        return out

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, attention_mask=None, temperature=0.0, top_p=1.0,
                 stop_ids=(), generator=None):
        """
        Decode with a KVCache. input_ids: (B, T); rows of different lengths are LEFT-padded, with
        attention_mask (B, T) 1 = real, 0 = padding. temperature 0 is greedy; otherwise sample from
        softmax(logits / temperature) cut to the top-p nucleus (torch.Generator `generator` for
        reproducibility). A row ends after any of stop_ids (the stop id IS included in its output)
        or after max_new_tokens. Returns a list of B lists of new token ids. Runs the model in its
        current mode: call .eval() first (Phi-3.5's router samples in training mode).
        NOTE: the prompt is prefilled in one forward (LongRoPE picks its branch from the whole
        prompt, as the released code does), which materialises (B, T, V) logits.
        """
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not attention_mask[:, -1].all():
            raise ValueError("generate: the last prompt position is padding in some row; pad on the left")
        cache = KVCache(self.config, B, T + max_new_tokens, device, self.embed_tokens.weight.dtype)
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        ids, mask, new = input_ids, attention_mask, []
        for _ in range(max_new_tokens):
            logits = self(ids, attention_mask=mask, cache=cache).logits[:, -1].float()  # (B, V)
            next_id = sample_next_token(logits, temperature, top_p, generator)  # (B,)
            new.append(next_id)
            done = done | torch.isin(next_id, stop)
            if done.all():  # host sync, once per token
                break
            ids = next_id[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(B)]
        stop_set = set(stop.tolist())
        for row in rows:  # cut each row after its first stop id
            hit = next((i for i, t in enumerate(row) if t in stop_set), None)
            if hit is not None:
                del row[hit + 1:]
        return rows


def sample_next_token(logits, temperature=0.0, top_p=1.0, generator=None):
    """logits (B, V) fp32 -> (B,) ids: argmax if temperature == 0, else a sample from the smallest
    set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before it already >= top_p
        outside[:, 0] = False  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_problems(temperature, top_p, max_new_tokens=None, names=("temperature", "top_p", "max_new_tokens")):
    """The one check of the sampling settings every entry point takes (sample.py, eval.py, stage1.py, the
    engine client): -> a list of "flag=value: what it must be" (empty: valid). `names` are the entry point's
    own spellings of the three flags, so the message names what the user typed. NaN and inf fail every
    range test (a NaN temperature would sample softmax(NaN) = NaN; -1 would invert the distribution)."""
    problems = []
    ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not (ok(temperature) and temperature >= 0):
        problems.append(f"{names[0]}={temperature!r}: must be a finite number >= 0 (0: greedy)")
    if not (ok(top_p) and 0 < top_p <= 1):
        problems.append(f"{names[1]}={top_p!r}: must be in (0, 1] (1: no nucleus cut)")
    if max_new_tokens is not None and not (isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool)
                                           and max_new_tokens >= 1):
        problems.append(f"{names[2]}={max_new_tokens!r}: must be an integer >= 1")
    return problems


def context_problem(prompt_tokens, max_new_tokens, context, what="the prompt"):
    """The one context check of every generation path: None if prompt + max_new_tokens fits the model's
    context (max_position_embeddings), else a message saying by how much it does not. Generating past the
    context runs RoPE on positions the model never saw and scores text it should not have written."""
    if prompt_tokens + max_new_tokens <= context:
        return None
    if prompt_tokens >= context:
        return (f"{what} is {prompt_tokens} tokens, the model's context is {context}: nothing can be generated "
                "(shorten it)")
    return (f"{what} ({prompt_tokens} tokens) + max_new_tokens={max_new_tokens} = {prompt_tokens + max_new_tokens} "
            f"exceeds the model's context of {context} tokens (at most {context - prompt_tokens} new tokens fit)")
