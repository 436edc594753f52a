"""
Times one training step (forward + backward with labels) of our MoE transformer and, when
transformers is importable, of transformers' own Qwen3-MoE / Phi-3.5-MoE with the same weights.

    python bench.py                      # GPU: real dims, truncated (see SHAPES), bf16, 4 x 2048
    python bench.py --device=cpu         # CPU: toy dims, fp32, + MoE-vs-dense block ratio
    python bench.py --shapes=phi --compile=False --hf_eager=False --parity=False

Per shape it prints ms/step (median of `steps` after `warmup`), tokens/s, MFU and peak memory for:
  ours          grouped-GEMM experts, causal flash SDPA, chunked lm_head + cross-entropy
  ours+compile  the same with every decoder block torch.compile'd
  SARA          the last of the two with lambda_JS > 0 (anchors given, every layer in the
                band) against the same step with lambda_JS = 0: 2 x steps interleaved pairs,
                ratio of the medians
  hf grouped_mm / hf eager   transformers' experts implementations, sdpa attention
MFU = FLOPs / step time / measured bf16 matmul ceiling (an 8192^3 matmul in this run), with
  FLOPs = 6 N_active B T + 6 L T^2 n_heads head_dim B
N_active = parameters one token uses (K of E experts, router, attention, norms, lm_head), without
the embedding; the attention term counts the causal half of QK^T and PV, forward + backward.
Before compiling, a parity check in the same dtype (eval mode, 2 x 512 tokens): ours vs
transformers with eager experts + eager attention (expected: bit-identical), our fast path vs
transformers' fast path, each against an fp32 reference (transformers eager in fp32), the
chunked loss against the plain one; after compiling, the compiled model against the same fp32
reference. The first MoE layer's router logits come before any routing decision; later layers
amplify ulps wherever routing is near a tie (Phi's sparsemixer threshold most).
Weights are random (std 0.02), so routing is near-balanced; real checkpoints route less evenly.
"""
import gc
import json
import os
import statistics
import sys
import time
import traceback
from ast import literal_eval

import torch
import torch.nn.functional as F

from model import MoE, MoETransformer, SwiGLU, phi35_moe_config, qwen3_30b_a3b_config
from sara_loss import pool_routing, sara_loss

# -----------------------------------------------------------------------------
# settings: --key=value overrides (type-checked, unknown keys rejected)
device = "cuda" if torch.cuda.is_available() else "cpu"
shapes = "qwen,phi"
batch_size = 0  # 0: 4 on GPU, 2 on CPU
seq_len = 0  # 0: 2048 on GPU, 256 on CPU
steps = 10
warmup = 3
compile = True  # also time ours with torch.compile'd blocks (GPU only)
hf = True  # compare with transformers if it is importable
hf_eager = True  # include transformers' loop ("eager") experts, ~1 s/step on GPU
parity = True
lambda_js = 1.5
loss_chunk_size = 4096  # tokens per lm_head + cross-entropy chunk (0: plain, full logits)
cpu_ratio = True  # CPU: one MoE block vs a dense SwiGLU of the same active FLOPs
profile = False  # GPU: print the top kernels of one of our steps
out_json = ""  # write all numbers here too
for arg in sys.argv[1:]:
    key, _, val = arg.lstrip("-").partition("=")
    if key not in globals() or key.startswith("_"):
        raise SystemExit(f"bench.py: unknown option {key!r}")
    try:
        val = literal_eval(val)
    except (ValueError, SyntaxError):
        pass  # a plain string
    if type(val) is not type(globals()[key]):
        raise SystemExit(f"bench.py: --{key} wants a {type(globals()[key]).__name__}, got {val!r}")
    globals()[key] = val

on_gpu = device.startswith("cuda")
dtype = torch.bfloat16 if on_gpu else torch.float32
B = batch_size or (4 if on_gpu else 2)
T = seq_len or (2048 if on_gpu else 256)
if on_gpu:  # the real dimensions, fewer layers
    SHAPES = {"qwen": qwen3_30b_a3b_config(n_layers=4), "phi": phi35_moe_config(n_layers=2)}
else:  # toy: the same structure, small
    toy = dict(vocab_size=4096, hidden_size=256, n_layers=2, n_heads=4, head_dim=64,
               intermediate_size=512, max_position_embeddings=4096)
    SHAPES = {"qwen": qwen3_30b_a3b_config(**toy, n_kv_heads=2, n_experts=16, top_k=4, moe_intermediate_size=128),
              "phi": phi35_moe_config(**toy, n_kv_heads=2, n_experts=8, moe_intermediate_size=512)}
results = {"device": device, "dtype": str(dtype), "batch": [B, T], "torch": torch.__version__, "rows": []}
try:
    import transformers
    results["transformers"] = transformers.__version__
except ImportError:
    transformers = None
    hf = False


def sync():
    if on_gpu:
        torch.cuda.synchronize()


def timed(fn, n, warm):
    """Median seconds of fn() over n calls after warm calls; on a GPU timed with events."""
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(n):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free():
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")


def matmul_ceiling():
    """Measured dense matmul rate (FLOP/s) in the bench dtype: 8192^3 on GPU, 2048^3 on CPU."""
    n = 8192 if on_gpu else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 10 if on_gpu else 3, 3)


def step_flops(model):
    cfg = model.config
    n_active = model.num_params(active=True) - model.embed_tokens.weight.numel()
    attn = 6 * cfg.n_layers * T * T * cfg.n_heads * cfg.head_dim * B
    return 6 * n_active * B * T + attn


# -----------------------------------------------------------------------------
# models: ours, and transformers' with the same weights

def build_ours(cfg):
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the bench dtype, on the device: no fp32 copy
    try:
        with torch.device(device):
            model = MoETransformer(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(device)  # (moves RoPE's fp32 frequencies, which are not buffers)


def hf_config(cfg, experts_impl, attn_impl):
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  num_experts_per_tok=cfg.top_k, rms_norm_eps=cfg.norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  router_aux_loss_coef=cfg.router_aux_loss_coef, use_cache=False,
                  attn_implementation=attn_impl, experts_implementation=experts_impl)
    if cfg.router == "sparsemixer":
        c = transformers.PhimoeConfig(**common, intermediate_size=cfg.moe_intermediate_size,
                                      num_local_experts=cfg.n_experts, attention_bias=cfg.attention_bias,
                                      lm_head_bias=cfg.lm_head_bias, router_jitter_noise=cfg.router_jitter_eps,
                                      input_jitter_noise=cfg.input_jitter)
    else:
        c = transformers.Qwen3MoeConfig(**common, head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                                        num_experts=cfg.n_experts, moe_intermediate_size=cfg.moe_intermediate_size,
                                        norm_topk_prob=cfg.norm_topk_prob, mlp_only_layers=list(cfg.mlp_only_layers),
                                        decoder_sparse_step=cfg.decoder_sparse_step)
    return c


def build_hf(ours, experts_impl, attn_impl, hf_dtype=None):
    """transformers' model of ours' architecture, holding a copy of ours' weights."""
    cfg = ours.config
    cls = transformers.PhimoeForCausalLM if cfg.router == "sparsemixer" else transformers.Qwen3MoeForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(hf_dtype or dtype)
    try:
        with torch.device(device):
            model = cls(hf_config(cfg, experts_impl, attn_impl))
    finally:
        torch.set_default_dtype(default)
    theirs = model.state_dict()
    mapped = {}
    for name, t in ours.state_dict().items():
        candidates = [name] if name.startswith("lm_head.") else ["model." + name]
        if name.endswith(".mlp.router.gate.weight"):
            stem = "model." + name[:-len(".mlp.router.gate.weight")]
            candidates = [stem + s for s in (".mlp.gate.weight", ".mlp.router.weight",
                                             ".block_sparse_moe.gate.weight", ".block_sparse_moe.router.weight")]
        elif name.endswith((".mlp.gate_up_proj", ".mlp.down_proj")):
            stem, _, leaf = name.rpartition(".mlp.")
            candidates = ["model." + stem + s + leaf for s in (".mlp.experts.", ".block_sparse_moe.experts.")]
        hit = [c for c in candidates if c in theirs]
        if not hit:
            raise KeyError(f"no transformers parameter for {name} (tried {candidates})")
        mapped[hit[0]] = t
    model.load_state_dict(mapped, strict=True)
    return model


# -----------------------------------------------------------------------------
# the steps

def ours_step(model, ids, sara=None):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    loss = out.loss + model.config.router_aux_loss_coef * out.aux_loss
    if sara is not None:  # lambda_JS * L_JS (eq. 9) over all MoE layers, anchors precomputed
        anchors, band = sara
        target = pool_routing(out.router_logits, None, check=False)  # (B, L, E)
        loss = loss + lambda_js * sara_loss(target, anchors, band, check=False)
    loss.backward()


def hf_step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def row(shape, impl, sec, flops, ceiling, peak, note=""):
    r = dict(shape=shape, impl=impl, ms=sec * 1e3, tok_s=B * T / sec, mfu=flops / sec / ceiling,
             peak_gib=peak, note=note)
    results["rows"].append(r)
    print(f"  {impl:<22} {r['ms']:8.1f} ms  {r['tok_s'] / 1e3:7.1f}k tok/s  MFU {r['mfu']:.3f}  "
          f"peak {peak:6.1f} GiB  {note}", flush=True)
    return r


def bench_shape(name, cfg, ceiling):
    print(f"\n== {name}: {cfg.n_layers} layers, H={cfg.hidden_size}, E={cfg.n_experts}, K={cfg.top_k}, "
          f"I={cfg.moe_intermediate_size}, V={cfg.vocab_size}, batch {B} x {T}", flush=True)
    free()
    cfg.loss_chunk_size = loss_chunk_size
    model = build_ours(cfg).train()
    flops = step_flops(model)
    results[name] = dict(n_active=model.num_params(active=True) - model.embed_tokens.weight.numel(),
                         tflop_per_step=flops / 1e12)
    print(f"  N_active (no embedding) {results[name]['n_active'] / 1e6:.0f}M, {flops / 1e12:.2f} TFLOP/step")
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    variants = [("ours", False)] + ([("ours+compile", True)] if compile and on_gpu else [])
    last = "ours"
    for label, use_compile in variants:
        try:
            if use_compile:
                t0 = time.perf_counter()
                for block in model.layers:
                    block.compile()
                ours_step(model, ids)
                sync()
                note = f"compile+first step {time.perf_counter() - t0:.0f} s"
            else:
                note = f"loss_chunk_size={loss_chunk_size}"
            free()
            sec = timed(lambda: ours_step(model, ids), steps, warmup)
            row(name, label, sec, flops, ceiling, peak_gib(), note)
            last = label  # the model's state from here on
            if parity and hf:  # the reference paths must run uncompiled: check before compiling
                parity_checks(name, model, compiled=use_compile)
        except Exception as e:  # report and go on: the other rows still count
            print(f"  {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            traceback.print_exc(limit=3)
    if profile and on_gpu:
        profile_step(model, ids)
    # SARA: lambda_JS > 0 vs lambda_JS = 0 on the same model, steps interleaved
    try:
        L, E = len(cfg.moe_layers), cfg.n_experts
        anchors = torch.softmax(torch.randn(B, L, E, device=device), -1)
        sara = (anchors, list(range(L)))
        plain_t, sara_t = [], []
        for i in range(warmup + 2 * steps):
            a = timed(lambda: ours_step(model, ids), 1, 0)
            b = timed(lambda: ours_step(model, ids, sara), 1, 0)
            if i >= warmup:
                plain_t.append(a)
                sara_t.append(b)
        # ratio of the medians; the median of the per-pair ratios is printed too (noisier)
        ratio = statistics.median(sara_t) / statistics.median(plain_t)
        pair_ratio = statistics.median(s / p for s, p in zip(sara_t, plain_t))
        free()
        ours_step(model, ids, sara)
        sync()
        row(name, f"SARA ({last})", statistics.median(sara_t), flops, ceiling, peak_gib(),
            f"x{ratio:.3f} of lambda_JS=0 ({statistics.median(plain_t) * 1e3:.1f} ms; "
            f"median of pair ratios x{pair_ratio:.3f}, {len(plain_t)} pairs)")
        results[name]["sara_ratio"] = ratio
        results[name]["sara_pair_ratio"] = pair_ratio
    except Exception as e:
        print(f"  SARA: FAILED {type(e).__name__}: {e}")
        traceback.print_exc(limit=3)
    # transformers
    for impl in (["grouped_mm"] + (["eager"] if hf_eager else [])) if hf else []:
        try:
            free()
            theirs = build_hf(model, impl, "sdpa").train()
            free()
            n = steps if impl != "eager" or not on_gpu else 2
            sec = timed(lambda: hf_step(theirs, ids), n, warmup if impl != "eager" else 1)
            row(name, f"hf {impl}", sec, flops, ceiling, peak_gib(), f"transformers {transformers.__version__}")
        except Exception as e:
            print(f"  hf {impl}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            traceback.print_exc(limit=3)
        theirs = None
    del model
    free()


def profile_step(model, ids):
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ours_step(model, ids)
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    print(events.table(sort_by=key, row_limit=22, max_name_column_width=60))


# -----------------------------------------------------------------------------
# parity with transformers, in the bench dtype

def parity_checks(name, model, compiled):
    try:
        if not compiled:
            check_parity(name, model)
        elif name in REF32:  # the compiled blocks against the same fp32 reference
            ids, ref_logits = REF32.pop(name)
            with torch.no_grad():
                logits = model.eval()(ids).logits
            model.train()
            results[name]["parity"]["ours_compiled_logits_rel_err_vs_fp32"] = rel(logits, ref_logits)
            print(f"    ours_compiled_logits_rel_err_vs_fp32   {rel(logits, ref_logits):.3g}")
    except Exception as e:
        print(f"  parity: FAILED {type(e).__name__}: {e}")
        traceback.print_exc(limit=4)


REF32 = {}  # shape -> (ids, fp32 reference logits) for the check of the compiled model


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def next_token_ce(logits, ids):  # the same loss for both sides (transformers' adds its aux loss)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


@torch.no_grad()
def check_parity(name, model):
    cfg = model.config
    saved = (cfg.expert_impl, cfg.attn_impl, cfg.loss_chunk_size)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 512), device=device)
    p = {}
    try:
        # 1. the reference paths: loop experts + eager attention vs transformers' eager/eager.
        # The first MoE layer's router logits come before any routing decision: with random
        # weights, routing near-ties make later layers (Phi's sparsemixer most) amplify ulps.
        cfg.expert_impl, cfg.attn_impl, cfg.loss_chunk_size = "loop", "eager", 0
        ours_ref = model(ids)
        free()
        theirs = build_hf(model, "eager", "eager").eval()
        hf_ref = theirs(input_ids=ids, output_router_logits=True)
        del theirs
        E = cfg.n_experts
        p["ref_router0_identical"] = torch.equal(ours_ref.router_logits[0].reshape(-1, E), hf_ref.router_logits[0])
        p["ref_logits_identical_fraction"] = (ours_ref.logits == hf_ref.logits).float().mean().item()
        p["ref_logits_rel_err"] = rel(ours_ref.logits, hf_ref.logits)
        p["ref_loss_diff"] = abs(next_token_ce(ours_ref.logits, ids) - next_token_ce(hf_ref.logits, ids))
        # 2. the fast paths: grouped experts + sdpa vs transformers' grouped_mm + sdpa
        cfg.expert_impl, cfg.attn_impl = "auto", "sdpa"
        ours_fast = model(ids)
        free()
        theirs = build_hf(model, "grouped_mm", "sdpa").eval()
        hf_fast = theirs(input_ids=ids, output_router_logits=True)
        del theirs
        p["fast_router0_rel_err_vs_hf_fast"] = rel(ours_fast.router_logits[0].reshape(-1, E), hf_fast.router_logits[0])
        p["fast_logits_rel_err_vs_hf_fast"] = rel(ours_fast.logits, hf_fast.logits)
        p["fast_loss_diff_vs_hf_fast"] = abs(next_token_ce(ours_fast.logits, ids) - next_token_ce(hf_fast.logits, ids))
        # 3. all against an fp32 reference (transformers eager in fp32)
        if dtype != torch.float32:
            free()
            theirs = build_hf(model, "eager", "eager", hf_dtype=torch.float32).eval()
            ref32 = theirs(input_ids=ids, output_router_logits=True)
            del theirs
            REF32[name] = (ids, ref32.logits)
            for label, out in (("ours_fast", ours_fast), ("hf_fast", hf_fast), ("ours_ref", ours_ref)):
                router0 = getattr(out, "router_logits")[0].reshape(-1, E)
                p[f"{label}_router0_rel_err_vs_fp32"] = rel(router0, ref32.router_logits[0])
                p[f"{label}_logits_rel_err_vs_fp32"] = rel(out.logits, ref32.logits)
                p[f"{label}_loss_minus_fp32_loss"] = next_token_ce(out.logits, ids) - next_token_ce(ref32.logits, ids)
        # 4. chunked loss vs plain loss, and their gradients
        cfg.loss_chunk_size = 0
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
    results[name]["parity"] = p
    print("  parity (eval, 2 x 512 tokens, " + str(dtype).replace("torch.", "") + "):")
    for k, v in p.items():
        print(f"    {k:<38} {v if isinstance(v, bool) else f'{v:.3g}'}")


# -----------------------------------------------------------------------------
# CPU: one MoE block vs a dense SwiGLU block with the same active FLOPs

def cpu_moe_vs_dense(d=512, n_experts=8, k=2, n_tokens=4096, pairs=9, threads=0):
    """Forward + backward, fp32, MoE (router + experts, I = d, loop dispatch) vs dense SwiGLU
    of width k * d, alternating A B A B; returns the median of the per-pair ratios.
    NOTE: on a machine busier than its cores (load average > cores), every small parallel op
    stalls at OpenMP barriers; the MoE block has ~150 of them and the dense block ~15, so the
    ratio is measured at the default thread count and at one thread."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    torch.manual_seed(0)
    cfg = qwen3_30b_a3b_config(hidden_size=d, n_experts=n_experts, top_k=k, moe_intermediate_size=d,
                               expert_impl="loop")
    moe, dense = MoE(cfg), SwiGLU(d, k * d)
    torch.nn.init.normal_(moe.gate_up_proj, std=0.02)
    torch.nn.init.normal_(moe.down_proj, std=0.02)
    x = torch.randn(1, n_tokens, d, requires_grad=True)
    run_moe = lambda: moe(x)[0].sum().backward()  # noqa: E731
    run_dense = lambda: dense(x).sum().backward()  # noqa: E731
    run_moe(), run_dense()
    pairs_t = [(timed(run_moe, 1, 0), timed(run_dense, 1, 0)) for _ in range(pairs)]
    ratio = statistics.median(a / b for a, b in pairs_t)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n== CPU MoE block vs dense SwiGLU (d={d}, E={n_experts}, top-{k}, I={d} vs dense {k * d}, "
          f"{n_tokens} tokens, fp32, fwd+bwd, {torch.get_num_threads()} threads): "
          f"MoE {statistics.median(a for a, _ in pairs_t) * 1e3:.0f} ms, "
          f"dense {statistics.median(b for _, b in pairs_t) * 1e3:.0f} ms, ratio {ratio:.2f} (target <= 1.5; "
          f"load average {load:.1f} on {os.cpu_count()} cores)")
    results[f"cpu_moe_vs_dense_ratio_{torch.get_num_threads()}_threads"] = ratio
    torch.set_num_threads(default_threads)


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    dev_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"device {dev_name}, torch {torch.__version__}, transformers {results.get('transformers')}, "
          f"{str(dtype).replace('torch.', '')}, batch {B} x {T}")
    ceiling = matmul_ceiling()
    results["ceiling_tflops"] = ceiling / 1e12
    print(f"matmul ceiling {ceiling / 1e12:.3g} TFLOP/s ({'8192' if on_gpu else '2048'}^3)")
    for name in shapes.split(","):
        bench_shape(name, SHAPES[name], ceiling)
    if not on_gpu and cpu_ratio:
        cpu_moe_vs_dense()
        if torch.get_num_threads() > 1:
            cpu_moe_vs_dense(threads=1)
    print("\n| shape | implementation | ms/step | tokens/s | MFU | peak GiB |\n|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['shape']} | {r['impl']} | {r['ms']:.1f} | {r['tok_s'] / 1e3:.1f}k | {r['mfu']:.3f} | "
              f"{r['peak_gib']:.1f} |")
    for name in shapes.split(","):
        rows = {r["impl"]: r for r in results["rows"] if r["shape"] == name}
        ours_best = min((r for k, r in rows.items() if k.startswith("ours")), key=lambda r: r["ms"], default=None)
        if ours_best and "hf grouped_mm" in rows:
            print(f"{name}: {ours_best['impl']} is {rows['hf grouped_mm']['ms'] / ours_best['ms']:.2f}x "
                  f"transformers grouped_mm tokens/s")
    if out_json:
        os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)
