"""
The transformers side of bench.py: transformers' model of our config's family (families/: its
config.json mapping and class names; a config of no known family is refused) holding a copy of our
weights, the stock speed options of the installed transformers, and a parity check in the bench
dtype. transformers is a test/benchmark oracle only: the product never imports this file.

Stock options read from transformers 5.23 (integrations/moe.py, modeling_utils.py):
  experts_implementation  "eager" (one matmul per hit expert, host syncs), "grouped_mm" (sort +
                          torch grouped_mm; the default), "batched_mm" (a weight copy per token
                          slot: memory N*K*3*H*I), "sonicmoe" and "deepgemm" (kernels fetched from
                          the Hub by the `kernels` package; CUDA, Hopper or newer)
  attn_implementation     "sdpa" (flash kernel when no mask), "eager"; flash_attention_2/3 need
                          extra packages
  torch.compile           transformers' decoder layers compile (grouped_mm in bf16 stays a
                          grouped GEMM under inductor; in fp32 it falls back to a per-expert loop)
  Liger kernels           fused linear cross-entropy etc., when `liger-kernel` is installed
"""
import re

import torch
import torch.nn.functional as F

import transformers

from hf_config import config_to_hf, family_of

STOCK_EXPERTS = ("grouped_mm", "batched_mm", "eager", "sonicmoe", "deepgemm")


def hf_family(cfg):
    """The family module of our config (families/), with its transformers classes: an error naming
    the config's unmet needs for every family we know, or the class this transformers lacks. Never a
    fallback to another family: a Mixtral-like config is refused, not timed as Qwen3-MoE."""
    family = family_of(cfg)
    missing = [n for n in (family.HF_CONFIG_CLASS, family.HF_MODEL_CLASS) if not hasattr(transformers, n)]
    if missing:
        raise RuntimeError(f"transformers {transformers.__version__} has no {missing} for {family.MODEL_TYPE}")
    return family


def hf_config(cfg, experts_impl, attn_impl):
    """transformers' config of our config: the family's own config.json mapping (hf_config.config_to_hf)."""
    family = hf_family(cfg)
    keys = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    keys.update(use_cache=False, attn_implementation=attn_impl, experts_implementation=experts_impl)
    return getattr(transformers, family.HF_CONFIG_CLASS)(**keys)


def attn_impl(cfg):
    """transformers' attention for this config: GPT-OSS's attention sinks exist on the eager path only (ours
    refuses sinks on SDPA, and transformers' GptOss has no SDPA path); sdpa otherwise."""
    return "eager" if cfg.attention_sinks else "sdpa"


def hf_state_dict(ours, theirs_keys):
    """ours.state_dict() renamed to transformers' in-memory parameter names (stacked experts, as
    ours). transformers 5.x calls every family's MoE block `mlp` in memory (Phi-3.5's router `router`),
    older versions use the family's on-disk name (EXPERT_NAMES[0]); KeyError naming the tensor."""
    prefixes = dict.fromkeys(("mlp", hf_family(ours.config).EXPERT_NAMES[0]))  # "mlp" / "block_sparse_moe"
    mapped = {}
    family = hf_family(ours.config)
    for name, t in ours.state_dict().items():
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        own = m and getattr(family, "layer_tensors", lambda *a: None)(f"model.layers.{m[1]}.", m[2], t)
        if own:  # the family names (and lays out) this tensor itself (GPT-OSS's experts: transposed views)
            mapped.update({k: v for k, v in own.items() if k in theirs_keys})
            continue
        candidates = [name] if name.startswith("lm_head.") else ["model." + name]
        if name.endswith(".mlp.router.gate.weight"):
            stem = "model." + name[:-len(".mlp.router.gate.weight")]
            candidates = [f"{stem}.{moe}.{router}.weight" for moe in prefixes for router in ("gate", "router")]
        elif name.endswith((".mlp.gate_up_proj", ".mlp.down_proj")):
            stem, _, leaf = name.rpartition(".mlp.")
            candidates = [f"model.{stem}.{moe}.experts.{leaf}" for moe in prefixes]
        hit = [c for c in candidates if c in theirs_keys]
        if not hit:
            raise KeyError(f"no transformers parameter for {name} (tried {candidates})")
        mapped[hit[0]] = t
    return mapped


def build_hf(ours, experts_impl, attn_impl, dtype, device):
    """transformers' model of ours' family, holding a copy of ours' weights."""
    cls = getattr(transformers, hf_family(ours.config).HF_MODEL_CLASS)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the bench dtype, on the device: no fp32 copy
    try:
        with torch.device(device):
            model = cls(hf_config(ours.config, experts_impl, attn_impl))
    finally:
        torch.set_default_dtype(default)
    model.load_state_dict(hf_state_dict(ours, set(model.state_dict())), strict=True)
    return model


def copy_weights(ours, theirs):
    """After ours' weights changed in place (the skewed-routing case): the same values in theirs."""
    with torch.no_grad():
        params = theirs.state_dict()
        for k, v in hf_state_dict(ours, set(params)).items():
            params[k].copy_(v)


def hf_step(model, ids, aux=True):
    """One training step. aux: output_router_logits=True, so transformers computes its router
    load-balancing loss and adds router_aux_loss_coef times it to the loss, as ours always does."""
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, output_router_logits=aux).loss.backward()
    model.zero_grad(set_to_none=True)  # the other side's step never holds these gradients


def unavailable(impl, on_gpu):
    """None if the experts implementation can run here, else the reason it cannot."""
    if impl in ("grouped_mm", "batched_mm", "eager"):
        return None
    if not on_gpu:
        return "CUDA only"
    try:
        if impl == "sonicmoe":
            from transformers.integrations.sonicmoe import is_sonicmoe_loadable
            is_sonicmoe_loadable(raise_error=True)
        else:
            from transformers.integrations.deepgemm import is_deepgemm_loadable
            is_deepgemm_loadable(raise_error=True)
    except Exception as e:  # ImportError with transformers' own reason
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def liger_unavailable():
    """None if Liger's kernels can be applied here, else why not."""
    if not torch.cuda.is_available():
        return "CUDA only (Triton kernels)"
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance  # noqa: F401
    except ImportError as e:
        return f"liger-kernel not installed ({e})"
    return None


def apply_liger(model):
    """Liger's kernels (fused linear cross-entropy, RMSNorm, SwiGLU) on this instance. Mutates the
    model: apply to a model used for nothing else."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    _apply_liger_kernel_to_instance(model=model)


# -----------------------------------------------------------------------------
# parity with transformers, in the bench dtype

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def next_token_ce(logits, ids):  # the same loss for both sides (transformers' adds its aux loss)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


@torch.no_grad()
def check_parity(model, dtype, device, free):
    """
    Eval mode, 2 x 512 tokens: ours' reference paths (loop experts, eager attention) vs
    transformers' eager/eager (expected: bit-identical in bf16); our fast path vs transformers'
    grouped_mm + sdpa; both against transformers eager in fp32 (when the bench dtype is not fp32);
    the chunked loss and its gradients against the plain loss. The first MoE layer's router logits
    come before any routing decision; later layers amplify ulps wherever routing is near a tie
    (Phi's sparsemixer threshold most). Returns (dict of numbers, the fp32 reference or None).
    """
    cfg = model.config
    saved = (cfg.expert_impl, cfg.attn_impl, cfg.loss_chunk_size)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 512), device=device)
    E, p, ref32 = cfg.n_experts, {}, None
    try:
        cfg.expert_impl, cfg.attn_impl, cfg.loss_chunk_size = "loop", "eager", 0
        ours_ref = model(ids)
        free()
        theirs = build_hf(model, "eager", "eager", dtype, device).eval()
        hf_ref = theirs(input_ids=ids, output_router_logits=True)
        del theirs
        p["ref_router0_identical"] = torch.equal(ours_ref.router_logits[0].reshape(-1, E), hf_ref.router_logits[0])
        p["ref_logits_identical_fraction"] = (ours_ref.logits == hf_ref.logits).float().mean().item()
        p["ref_logits_rel_err"] = rel(ours_ref.logits, hf_ref.logits)
        p["ref_loss_diff"] = abs(next_token_ce(ours_ref.logits, ids) - next_token_ce(hf_ref.logits, ids))
        cfg.expert_impl, cfg.attn_impl = saved[0], attn_impl(cfg)
        ours_fast = model(ids)
        free()
        theirs = build_hf(model, "grouped_mm", attn_impl(cfg), dtype, device).eval()
        hf_fast = theirs(input_ids=ids, output_router_logits=True)
        del theirs
        p["fast_router0_rel_err_vs_hf_fast"] = rel(ours_fast.router_logits[0].reshape(-1, E), hf_fast.router_logits[0])
        p["fast_logits_rel_err_vs_hf_fast"] = rel(ours_fast.logits, hf_fast.logits)
        p["fast_loss_diff_vs_hf_fast"] = abs(next_token_ce(ours_fast.logits, ids) - next_token_ce(hf_fast.logits, ids))
        if dtype != torch.float32:
            free()
            theirs = build_hf(model, "eager", "eager", torch.float32, device).eval()
            out32 = theirs(input_ids=ids, output_router_logits=True)
            del theirs
            ref32 = (ids, out32.logits)
            for label, out in (("ours_fast", ours_fast), ("hf_fast", hf_fast), ("ours_ref", ours_ref)):
                p[f"{label}_router0_rel_err_vs_fp32"] = rel(out.router_logits[0].reshape(-1, E), out32.router_logits[0])
                p[f"{label}_logits_rel_err_vs_fp32"] = rel(out.logits, out32.logits)
                p[f"{label}_loss_minus_fp32_loss"] = next_token_ce(out.logits, ids) - next_token_ce(out32.logits, ids)
        with torch.enable_grad():
            grads = []
            for chunk in (0, 256):
                cfg.loss_chunk_size = chunk
                model.zero_grad(set_to_none=True)
                out = model(ids, labels=ids)
                out.loss.backward()
                grads.append((out.loss.item(), [q.grad.clone() for q in model.parameters()]))
            model.zero_grad(set_to_none=True)
        p["chunked_loss_diff"] = abs(grads[0][0] - grads[1][0])
        p["chunked_grad_max_rel_err"] = max(rel(b, a) for a, b in zip(grads[0][1], grads[1][1]) if a.norm() > 0)
    finally:
        cfg.expert_impl, cfg.attn_impl, cfg.loss_chunk_size = saved
        model.train()
    return p, ref32
