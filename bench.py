"""
Times one training step (forward + backward with labels, router aux loss included on both sides)
of our MoE transformer against transformers' model of the same family (families/: Qwen3-MoE,
Phi-3.5-MoE) holding the same weights.

    python bench.py                      # GPU: real dims, truncated (L and 2L layers), bf16, 4 x 2048
    python bench.py --device=cpu         # CPU: toy dims, fp32, 2 x 256, 1 thread, process clock
    python bench.py --device=cpu --quick # the quick mode (CI): tiny dims, 1 x 64, 3 pairs; every path once
    python bench.py --shapes=phimoe --routing=balanced --depths=1 --parity=False

--shapes are families (families.FAMILIES keys); each family's bench dimensions and base depth are in
its module (BENCH, PRESET). A config of no known family is refused (bench_hf.hf_family), never
timed against another family's transformers model. The JSON (--out_json) carries
provenance.platform_info().

How it measures (what a performance engineer checks):
- Every comparison is a pair run in ONE process, interleaved A B A B after the same warm-up, and
  reported as the median of the per-pair ratios with their min-max spread: machine load hits
  both sides alike. ratio = transformers' time / ours = ours' tokens/s over theirs.
- Modes: "eager" = both uncompiled, our cross-entropy kernel uncompiled too; "compiled" = each
  decoder layer torch.compile'd on both sides (ours also compiles its loss kernel, as it does on
  a GPU); "strongest" = ours in its faster mode against EVERY stock option of the installed
  transformers that runs here (experts_implementation grouped_mm / batched_mm / eager / sonicmoe /
  deepgemm, per-layer compile, Liger kernels when installed); the fastest of them is the headline.
- Both sides compute the router load-balancing loss (transformers: output_router_logits=True).
- FLOPs per step = MoETransformer.flops_per_token(T) * B * T (6 N_active + attention's causal half
  of QK^T and PV, forward + backward; N_active: K of E experts, no embedding lookup).
  MFU = FLOPs / time / SPEC peak of the detected accelerator (dense bf16 tensor-core peak, table
  SPEC_PEAK_TFLOPS), the measured 8192^3 matmul rate printed beside it.
  On a CPU there is no spec peak: the fraction of the measured matmul rate is printed instead.
- Truncated models flatter whole-step MFU (Qwen3's lm_head is 58% of the FLOPs at 4 layers, 10%
  at 48): each shape runs at L and 2L layers, and per layer = (t(2L) - t(L), F(2L) - F(L)).
- Random weights route near-evenly; real checkpoints do not. "skewed" biases every router so the
  expert loads follow a Zipf law (load of the r-th expert ~ 1/r^zipf_s, capped at 1/K since a
  token takes K distinct experts): a shared vector is added to every embedding row, and each
  router's rows get offsets along its mean input, calibrated until the realised load (top-k of
  the router logits, printed) matches. Both models get the same weights.
Before timing, a parity check (bench_hf.check_parity) in the bench dtype.

Measured (2-core shared VM, load average 6-12, --device=cpu --threads=1 --clock=process, torch
2.13, transformers 5.23, 20 pairs): ours 1.00-1.02x transformers' fastest stock option (grouped_mm)
in all 8 cases (2 shapes x 2 depths x balanced/skewed), per-pair spread about +-6%; 1.17-1.25x
its eager experts; batched_mm 30-50x slower at these shapes. On a shared machine, wall-clock
pairs at 2 threads spread by +-50% (x1.37 [0.20-15.71] seen): so on a CPU the default is one thread
and the process clock.
"""
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

import chunked_ce
from configurator import at_least, configure, one_of, validate
import families
from model import MoE, MoEConfig, MoETransformer, SwiGLU
from provenance import platform_info
from sara_loss import pool_routing, sara_loss

# -----------------------------------------------------------------------------
# settings: nanoGPT-style globals, overridden by --key=value (configurator.py)
device = "cuda" if torch.cuda.is_available() else "cpu"
shapes = ",".join(families.FAMILIES)  # model families (families/: qwen3_moe, phimoe)
batch_size = 0  # 0: 4 on GPU, 2 on CPU
seq_len = 0  # 0: 2048 on GPU, 256 on CPU
depths = "1,2"  # multiples of each family's base depth (families/*.py BENCH: GPU Qwen3 4, Phi 2; CPU 2)
routing = "balanced,skewed"
zipf_s = 1.0  # skewed routing: load of the r-th most loaded expert ~ 1/r^zipf_s
modes = ""  # "": eager,compiled on GPU, eager on CPU (inductor on 2 cores takes minutes)
steps = 0  # timed pairs per comparison (0: 10 on GPU and CPU)
warmup = 3
clock = ""  # "process" (CPU time of this process, 1 thread: robust on a shared machine) or "wall";
# "": process on a CPU (with threads=1), wall on a GPU (CUDA events)
hf = True  # compare with transformers (needs it importable)
hf_eager = False  # also time transformers' "eager" experts loop on a GPU (~1 s/step; always on CPU)
parity = True
lambda_js = 1.5  # the SARA overhead row: lambda_JS > 0 against lambda_JS = 0
loss_chunk_size = -1  # lm_head + CE chunk (0: plain); -1: 4096 on GPU (8-GPU configs), 0 on CPU (toy)
expert_impl = ""  # ours' dispatch: "" = the model's default ("auto"), or loop / grouped
peak_tflops = 0.0  # override the spec peak (dense bf16 TFLOP/s) of an accelerator not in the table
cpu_ratio = True  # CPU: one MoE block vs a dense SwiGLU of the same active FLOPs
threads = 0  # CPU threads (0: 1 with the process clock, else torch's default)
quick = False  # the quick mode (CI): tiny dims, 1 x 64 tokens, 3 pairs; settings given explicitly still win
out_json = ""  # write all numbers here too
# a bare --quick is --quick=True (configurator.py takes --key=value)
_argv = ["--quick=True" if a == "--quick" else a for a in sys.argv[1:]]
_settings, _sources = configure(_argv, {k: v for k, v in globals().items() if not k.startswith("_") and
                                        isinstance(v, (int, float, bool, str))})
if _settings["quick"]:  # defaults of the quick mode, where the command line did not set them
    for _key, _val in dict(batch_size=1, seq_len=64, steps=3, warmup=1, cpu_ratio=False).items():
        if _sources[_key] == "default":
            _settings[_key] = _val
globals().update(_settings)
validate(_settings, _sources, {"clock": one_of("", "wall", "process"), "expert_impl": one_of("", "loop", "grouped"),
                               "steps": at_least(0), "warmup": at_least(0), "threads": at_least(0)})

on_gpu = device.startswith("cuda")
if on_gpu and not torch.cuda.is_available():
    raise SystemExit(f"bench.py: --device={device} but torch.cuda.is_available() is False "
                     f"(torch {torch.__version__}); run with --device=cpu")
if not clock:  # the docstring's advice: on a shared CPU, wall-clock pairs spread by +-50%
    clock = "process" if not on_gpu and threads in (0, 1) else "wall"
if clock == "process" and not threads:
    threads = 1
if threads:
    torch.set_num_threads(threads)
if clock == "process" and (on_gpu or torch.get_num_threads() != 1):
    raise SystemExit("bench.py: --clock=process measures one CPU thread: use it with --device=cpu --threads=1")
dtype = torch.bfloat16 if on_gpu else torch.float32
B = batch_size or (4 if on_gpu else 2)
steps = steps or 10
T = seq_len or (2048 if on_gpu else 256)
if loss_chunk_size < 0:
    loss_chunk_size = 4096 if on_gpu else 0
MODES = (modes or ("eager,compiled" if on_gpu else "eager")).split(",")
for _key, _val, _allowed in (("modes", MODES, ("eager", "compiled")), ("shapes", shapes.split(","), tuple(families.FAMILIES)),
                              ("routing", routing.split(","), ("balanced", "skewed"))):
    if set(_val) - set(_allowed):  # before any model is built
        raise SystemExit(f"bench.py: --{_key}: {sorted(set(_val) - set(_allowed))} not in {list(_allowed)}")
if not all(d.isdigit() and int(d) > 0 for d in depths.split(",")):
    raise SystemExit(f"bench.py: --depths={depths!r}: comma-separated positive integers, e.g. 1,2")
if "compiled" in MODES:  # ours + transformers, two shapes, two depths: more graphs than the default 8;
    # and hitting the limit must fail, not silently run eager
    for _key, _val in (("recompile_limit", 64), ("fail_on_recompile_limit_hit", True)):
        if hasattr(torch._dynamo.config, _key):
            setattr(torch._dynamo.config, _key, _val)
# per family: (MoEConfig keywords, base depth). GPU: the real dimensions, fewer layers; CPU: toy
# dimensions, the same structure; quick: tiny (a smoke test of every path, not a measurement)
TOY = dict(vocab_size=4096, hidden_size=256, n_heads=4, head_dim=64, n_kv_heads=2, intermediate_size=512,
           max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=64, n_heads=4, head_dim=16, n_kv_heads=2, intermediate_size=64,
            moe_intermediate_size=64, n_experts=4, top_k=2, max_position_embeddings=1024)
BASE = {name: ({**f.PRESET, **f.BENCH["cpu"], **TOY} if not on_gpu and not quick else
               {**f.PRESET, **TINY} if quick else dict(f.PRESET),
               f.BENCH["layers_gpu"] if on_gpu and not quick else f.BENCH["layers_cpu"] // (2 if quick else 1))
        for name, f in families.FAMILIES.items()}
# dense bf16 tensor-core peaks (TFLOP/s, without 2:4 sparsity) from NVIDIA's datasheets; the
# first name contained in torch.cuda.get_device_name() wins
SPEC_PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835), ("GH200", 989), ("H100", 989),
                    ("H200", 989), ("A100", 312), ("GB200", 2500), ("B200", 2250)]
results = {"device": device, "dtype": str(dtype), "batch": [B, T], "torch": torch.__version__, "clock": clock,
           "quick": quick, "provenance": platform_info(device), "rows": []}
try:
    import transformers
    import bench_hf
    results["transformers"] = transformers.__version__
except ImportError as e:
    print(f"transformers not importable ({e}): timing ours only")
    hf = False


def timed_once(fn):
    """(seconds, peak GiB allocated during the call above what was allocated before it, i.e.
    activations, gradients and temporaries; nan on CPU) of one fn() call."""
    if not on_gpu:
        now = time.process_time if clock == "process" else time.perf_counter
        t0 = now()
        fn()
        return now() - t0, float("nan")
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, (torch.cuda.max_memory_allocated() - before) / 2**30


def interleaved(fa, fb, n=None, warm=None):
    """A B A B: returns (times of a, times of b, peak GiB of a, of b)."""
    n, warm = n or steps, warmup if warm is None else warm
    for _ in range(warm):
        fa(), fb()
    ta, tb, pa, pb = [], [], [], []
    for _ in range(n):
        t, p = timed_once(fa)
        ta.append(t), pa.append(p)
        t, p = timed_once(fb)
        tb.append(t), pb.append(p)
    return ta, tb, max(pa), max(pb)


def free():
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()


def spec_peak():
    """(FLOP/s, label) of the accelerator's dense bf16 spec peak, or (None, reason)."""
    if peak_tflops:
        return peak_tflops * 1e12, f"{peak_tflops:g} TFLOP/s (--peak_tflops)"
    if not on_gpu:
        return None, "CPU: no spec peak; MFU is the fraction of the measured matmul rate"
    name = torch.cuda.get_device_name()
    for key, tflops in SPEC_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{tflops} TFLOP/s ({key} dense bf16 spec)"
    return None, f"no spec peak known for {name!r}: pass --peak_tflops=..."


def matmul_ceiling():
    """Measured dense matmul rate (FLOP/s) in the bench dtype: 8192^3 on GPU, 2048^3 on CPU."""
    n = 8192 if on_gpu else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / statistics.median(timed_once(lambda: a @ b)[0] for _ in range(10 if on_gpu else 3))


def step_flops(model):
    return model.flops_per_token(T) * B * T


# -----------------------------------------------------------------------------
# models and their switches

def build_ours(name, depth):
    keys, base = BASE[name]
    layer_types = keys.get("layer_types") and tuple(keys["layer_types"])[:base * depth]  # (GPT-OSS: per layer)
    cfg = MoEConfig(**{**keys, "n_layers": base * depth, "loss_chunk_size": loss_chunk_size, "layer_types": layer_types,
                       **({"expert_impl": expert_impl} if expert_impl else {})})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the bench dtype, on the device: no fp32 copy
    try:
        with torch.device(device):
            model = MoETransformer(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(device).train()  # (moves RoPE's fp32 frequencies, which are not buffers)


class LayerCompile:
    """torch.compile of each decoder layer, switchable off and on (the compiled code is kept)."""

    def __init__(self, layers):
        self.layers, self.impls = list(layers), None
        if not hasattr(self.layers[0], "_compiled_call_impl"):
            raise RuntimeError("nn.Module has no _compiled_call_impl in this torch: cannot switch compile")

    def set(self, on):
        if on and self.impls is None:
            for layer in self.layers:
                layer.compile()
            self.impls = [layer._compiled_call_impl for layer in self.layers]
        for layer, impl in zip(self.layers, self.impls or [None] * len(self.layers)):
            layer._compiled_call_impl = impl if on else None


_COMPILED_CE = chunked_ce._compiled_ce_chunk


def set_loss_kernel_compiled(on):
    # chunked_ce.py compiles its cross-entropy chunk kernel on CUDA; the eager mode must not hide it
    chunked_ce._compiled_ce_chunk = _COMPILED_CE if on else (lambda: chunked_ce._ce_chunk)


def ours_step(model, ids, sara=None):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    loss = out.loss + model.config.router_aux_loss_coef * out.aux_loss
    if sara is not None:  # lambda_JS * L_JS (eq. 9) over all MoE layers, anchors precomputed
        anchors, band = sara
        target = pool_routing(out.router_logits, None, check=False)  # (B, L, E)
        loss = loss + lambda_js * sara_loss(target, anchors, band, check=False)
    loss.backward()
    model.zero_grad(set_to_none=True)  # as hf_step: the other side's step never holds these


# -----------------------------------------------------------------------------
# skewed routing

def zipf_load(E, K, s):
    """Target fraction of the N*K token slots per expert, ~ 1/r^s, none above 1/K. (E,) float64."""
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    p /= p.sum()
    capped = torch.zeros(E, dtype=torch.bool)
    while (p > 1.0 / K + 1e-12).any():  # water-filling: cap, renormalise the rest
        capped |= p > 1.0 / K
        p[capped] = 1.0 / K
        p[~capped] *= (1 - capped.sum() / K) / p[~capped].sum()
    return p


def expert_load(router_logits, K):
    """(L, E) fraction of token slots per expert: the top-k of each layer's router logits."""
    rows = []
    for lg in router_logits:
        lg = lg.reshape(-1, lg.shape[-1])
        rows.append(torch.bincount(lg.topk(K, dim=-1).indices.reshape(-1), minlength=lg.shape[-1]).double()
                    / (lg.shape[0] * K))
    return torch.stack(rows).cpu()


@torch.no_grad()
def skew_routing(model, ids, iters=12, damping=0.7, logit_std=2.0):
    """Bias every router so that expert e takes the e-th largest Zipf share of the token slots.
    Returns the target load (E,)."""
    cfg = model.config
    target = zipf_load(cfg.n_experts, cfg.top_k, zipf_s)
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(cfg.hidden_size, generator=g) * cfg.init_std  # as large as one embedding row
    model.embed_tokens.weight += shared.to(model.embed_tokens.weight)
    routers = [block.mlp.router for block in model.layers if block.is_moe]
    mean_in = [None] * len(routers)
    def keep_mean(i):  # forward hook: the mean router input (H,) of router i
        return lambda mod, inp, out: mean_in.__setitem__(i, inp[0].float().flatten(0, -2).mean(0))
    hooks = [r.register_forward_hook(keep_mean(i)) for i, r in enumerate(routers)]
    model.eval()  # deterministic routing (sparsemixer samples in training)
    try:
        # token-to-token spread of the router logits: std 0.02 weights give ~0.3-0.9, too little
        # for tokens to differ once the offsets below are several units apart; trained routers
        # spread by a few units
        for router, lg in zip(routers, model(ids, labels=ids).router_logits):
            lg = lg.float().flatten(0, -2)
            router.gate.weight *= logit_std / (lg - lg.mean(0)).std()
        for _ in range(iters):
            load = expert_load(model(ids, labels=ids).router_logits, cfg.top_k)  # (L, E)
            for router, mu, lo in zip(routers, mean_in, load):
                delta = damping * (target.log() - (lo + 0.1 / cfg.n_experts).log()).float().to(mu.device)
                w = router.gate.weight
                w += (delta[:, None] * (mu / mu.dot(mu))[None, :]).to(w.dtype)  # logit_e += delta_e at the mean input
    finally:
        for h in hooks:
            h.remove()
        model.train()
    return target


def load_summary(load, target=None):
    """One line: the realised load (L, E) as max/mean and the largest fractions (layer mean)."""
    mean_layer = load.mean(0).sort(descending=True).values
    s = (f"max/mean load {float((load.max(1).values * load.shape[1]).mean()):.2f} (layer mean), "
         f"top-3 experts {', '.join(f'{v:.3f}' for v in mean_layer[:3])}, "
         f"least {float(mean_layer[-1]):.4f} of the slots")
    if target is not None:
        s += f"; target max/mean {float(target.max() * len(target)):.2f}, top-3 " + \
             ", ".join(f"{v:.3f}" for v in target[:3])
    return s


# -----------------------------------------------------------------------------
# one shape at one depth: all comparisons

def record(shape, depth, rt, mode, hf_cfg, ta, tb, pa, pb, flops, peak, ceiling):
    ratios = [b / a for a, b in zip(ta, tb)]
    r = dict(shape=shape, layers=depth, routing=rt, mode=mode, hf=hf_cfg, flops=flops,
             ours_ms=statistics.median(ta) * 1e3, hf_ms=statistics.median(tb) * 1e3 if tb else None,
             ratio=statistics.median(ratios) if ratios else None,
             ratio_lo=min(ratios, default=None), ratio_hi=max(ratios, default=None), ours_gib=pa, hf_gib=pb)
    basis = peak or ceiling
    r["ours_mfu"] = flops / (r["ours_ms"] / 1e3) / basis
    r["hf_mfu"] = flops / (r["hf_ms"] / 1e3) / basis if tb else None
    results["rows"].append(r)
    hf_part = (f"| {hf_cfg:<28} {r['hf_ms']:8.1f} ms MFU {r['hf_mfu']:.3f} | ours/hf x{r['ratio']:.3f} "
               f"[{r['ratio_lo']:.3f}-{r['ratio_hi']:.3f}]") if tb else ""
    print(f"  {mode:<9} ours {r['ours_ms']:8.1f} ms MFU {r['ours_mfu']:.3f} {hf_part}  "
          f"step GiB {pa:.1f}/{pb:.1f}", flush=True)
    return r


def bench_case(name, depth, peak, ceiling):
    free()
    model = build_ours(name, depth)
    cfg = model.config
    flops = step_flops(model)
    print(f"\n== {name}: {cfg.n_layers} layers, H={cfg.hidden_size}, E={cfg.n_experts}, K={cfg.top_k}, "
          f"I={cfg.moe_intermediate_size}, V={cfg.vocab_size}, batch {B} x {T}, {flops / 1e12:.3g} TFLOP/step, "
          f"ours expert_impl={cfg.expert_impl}", flush=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    if parity and hf and depth == int(depths.split(",")[0]):
        try:  # the reference paths run uncompiled: check before compiling
            p, _ = bench_hf.check_parity(model, dtype, device, free)
            results.setdefault("parity", {})[name] = p
            print("  parity (eval, 2 x 512 tokens): " + ", ".join(
                f"{k} {v if isinstance(v, bool) else f'{v:.3g}'}" for k, v in p.items()))
        except Exception as e:
            print(f"  parity: FAILED {type(e).__name__}: {e}")
            traceback.print_exc(limit=4)
    ours_c = LayerCompile(model.layers)
    theirs = theirs_c = None
    if hf:
        theirs = bench_hf.build_hf(model, "grouped_mm", bench_hf.attn_impl(model.config), dtype, device).train()
        theirs_c = LayerCompile(theirs.model.layers)
    run_ours = lambda: ours_step(model, ids)  # noqa: E731
    run_hf = lambda: bench_hf.hf_step(theirs, ids)  # noqa: E731
    for rt in routing.split(","):
        target = None
        ours_c.set(False)  # calibration and load counting run eager: no compile for eval/no_grad
        set_loss_kernel_compiled(False)
        if rt == "skewed":
            target = skew_routing(model, ids)
            if hf:
                bench_hf.copy_weights(model, theirs)
        with torch.no_grad():
            load = expert_load(model(ids, labels=ids).router_logits, cfg.top_k)
        print(f" routing {rt}: {load_summary(load, target)}", flush=True)
        results.setdefault("load", {})[f"{name}/{cfg.n_layers}/{rt}"] = load.mean(0).tolist()
        best = {}  # mode -> ours' median seconds
        for mode in MODES:
            try:
                compiled = mode == "compiled"
                set_loss_kernel_compiled(compiled and on_gpu)
                ours_c.set(compiled)
                if hf:
                    theirs.set_experts_implementation("grouped_mm")
                    theirs_c.set(compiled)
                ta, tb, pa, pb = interleaved(run_ours, run_hf if hf else (lambda: None))
                tb = tb if hf else []
                r = record(name, cfg.n_layers, rt, mode, f"grouped_mm{'+compile' if compiled else ''}" if hf else "-",
                           ta, tb, pa, pb, flops, peak, ceiling)
                best[mode] = r["ours_ms"]
            except Exception as e:
                print(f"  {mode}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                traceback.print_exc(limit=3)
        if not best:
            continue
        # ours in its faster mode against every other stock option of transformers
        mode = min(best, key=best.get)
        set_loss_kernel_compiled(mode == "compiled" and on_gpu)
        ours_c.set(mode == "compiled")
        if hf:
            theirs_c.set(False)
            for impl in bench_hf.STOCK_EXPERTS[1:]:
                why = bench_hf.unavailable(impl, on_gpu)
                if impl == "eager" and on_gpu and not hf_eager:
                    why = "not run on a GPU (~1 s/step; --hf_eager=True to run it)"
                if impl == "batched_mm":
                    need = 3 * B * T * cfg.top_k * 3 * cfg.hidden_size * cfg.moe_intermediate_size * dtype.itemsize
                    have = (torch.cuda.mem_get_info()[0] if on_gpu
                            else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
                    why = f"needs ~{need / 2**30:.0f} GiB (a weight copy per token slot), {have / 2**30:.0f} free" \
                        if need > 0.5 * have else None
                    if not why and not on_gpu and need > 2**30:  # its probe alone took 7 GiB RSS and 2 min
                        why = (f"needs ~{need / 2**30:.1f} GiB (a weight copy per token slot); on this CPU's toy "
                               "shapes one step took 45-52x a grouped_mm step (2026-12-03)")
                if why:
                    print(f"  hf {impl}: skipped, {why}")
                    continue
                try:
                    theirs.set_experts_implementation(impl)
                    free()
                    run_hf()  # a probe first: an option far slower than the fastest so far gets no pair
                    probe = timed_once(run_hf)[0] * 1e3
                    fastest = min((r["hf_ms"] for r in results["rows"] if r["hf_ms"] and r["shape"] == name
                                   and r["layers"] == cfg.n_layers and r["routing"] == rt), default=float("inf"))
                    if probe > 2 * fastest:
                        print(f"  hf {impl}: one step {probe:.0f} ms, {probe / fastest:.1f}x the fastest "
                              f"transformers option here ({fastest:.0f} ms): no pair")
                        continue
                    record(name, cfg.n_layers, rt, f"vs {mode}", impl, *interleaved(run_ours, run_hf),
                           flops, peak, ceiling)
                except Exception as e:
                    print(f"  hf {impl}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    free()
            theirs.set_experts_implementation("grouped_mm")
            if on_gpu:
                liger_case(name, model, theirs, cfg, rt, mode, run_ours, ids, flops, peak, ceiling)
        if rt == "balanced" and lambda_js > 0:
            sara_case(model, ids, cfg)
    theirs = None
    set_loss_kernel_compiled(True)
    model = None
    free()


def liger_case(name, model, theirs, cfg, rt, mode, run_ours, ids, flops, peak, ceiling):
    """transformers + Liger kernels (fused linear cross-entropy, ...), per-layer compiled, on a
    fresh copy (Liger patches the instance)."""
    why = bench_hf.liger_unavailable()
    if why:
        print(f"  hf grouped_mm+compile+liger: skipped, {why}")
        return
    model.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)  # room for a third model
    free()
    try:
        liger = bench_hf.build_hf(model, "grouped_mm", bench_hf.attn_impl(model.config), dtype, device).train()
        bench_hf.apply_liger(liger)
        LayerCompile(liger.model.layers).set(True)
        record(name, cfg.n_layers, rt, f"vs {mode}", "grouped_mm+compile+liger",
               *interleaved(run_ours, lambda: bench_hf.hf_step(liger, ids)), flops, peak, ceiling)
    except Exception as e:
        print(f"  hf grouped_mm+compile+liger: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    liger = None
    free()


def sara_case(model, ids, cfg):
    """The SARA loss's cost: lambda_JS > 0 (anchors given, every MoE layer in the band) against
    the same step with lambda_JS = 0, interleaved."""
    L, E = len(cfg.moe_layers), cfg.n_experts
    sara = (torch.softmax(torch.randn(B, L, E, device=device), -1), list(range(L)))
    ta, tb, _, _ = interleaved(lambda: ours_step(model, ids), lambda: ours_step(model, ids, sara))
    ratios = [b / a for a, b in zip(ta, tb)]
    results.setdefault("sara", {})[f"{cfg.n_layers}"] = statistics.median(ratios)
    print(f"  SARA step (lambda_JS={lambda_js}) x{statistics.median(ratios):.3f} [{min(ratios):.3f}-"
          f"{max(ratios):.3f}] of the plain step ({statistics.median(ta) * 1e3:.1f} ms)")


# -----------------------------------------------------------------------------
# CPU: one MoE block vs a dense SwiGLU block with the same active FLOPs

def cpu_moe_vs_dense(d=512, n_experts=8, k=2, n_tokens=4096, pairs=9):
    """Forward + backward, fp32, MoE (router + experts, I = d) vs dense SwiGLU of width k * d,
    interleaved; median of the per-pair ratios."""
    torch.manual_seed(0)
    cfg = MoEConfig(**{**families.get("qwen3_moe").PRESET, "hidden_size": d, "n_experts": n_experts, "top_k": k,
                       "moe_intermediate_size": d}, **({"expert_impl": expert_impl} if expert_impl else {}))
    moe, dense = MoE(cfg), SwiGLU(d, k * d)
    torch.nn.init.normal_(moe.gate_up_proj, std=0.02)
    torch.nn.init.normal_(moe.down_proj, std=0.02)
    x = torch.randn(1, n_tokens, d, requires_grad=True)
    ta, tb, _, _ = interleaved(lambda: moe(x)[0].sum().backward(), lambda: dense(x).sum().backward(), pairs, 1)
    ratio = statistics.median(a / b for a, b in zip(ta, tb))
    print(f"\n== CPU MoE block vs dense SwiGLU (d={d}, E={n_experts}, top-{k}, {n_tokens} tokens, fwd+bwd, "
          f"{torch.get_num_threads()} threads, expert_impl={cfg.expert_impl}): "
          f"MoE {statistics.median(ta) * 1e3:.0f} ms, "
          f"dense {statistics.median(tb) * 1e3:.0f} ms, ratio {ratio:.2f} (same active FLOPs)")
    results["cpu_moe_vs_dense_ratio"] = ratio


# -----------------------------------------------------------------------------
def report(peak, peak_label):
    basis = "MFU (spec)" if peak else "MFU (of matmul rate)"
    print(f"\n{basis}: {peak_label}; measured matmul rate {results['ceiling_tflops']:.3g} TFLOP/s")
    print(f"\n| shape | layers | routing | ours | transformers | ours ms | theirs ms | ours/theirs tok/s "
          f"[min-max] | ours {basis} | theirs {basis} | step GiB ours/theirs |\n" + "|---" * 11 + "|")
    for r in results["rows"]:
        ours_mode = r["mode"].replace("vs ", "")
        if r["hf_ms"] is None:  # transformers not importable
            print(f"| {r['shape']} | {r['layers']} | {r['routing']} | {ours_mode} | - | {r['ours_ms']:.1f} | - | - | "
                  f"{r['ours_mfu']:.3f} | - | - |")
            continue
        print(f"| {r['shape']} | {r['layers']} | {r['routing']} | {ours_mode} | {r['hf']} | {r['ours_ms']:.1f} | "
              f"{r['hf_ms']:.1f} | {r['ratio']:.2f}x [{r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}] | "
              f"{r['ours_mfu']:.3f} | {r['hf_mfu']:.3f} | "
              + ("-" if r["ours_gib"] != r["ours_gib"] else f"{r['ours_gib']:.1f}/{r['hf_gib']:.1f}") + " |")
    # per layer from two depths; same shape, routing, ours mode and transformers option
    print(f"\nper layer = (t(2L) - t(L), F(2L) - F(L)); TFLOP/s and {basis}\n"
          f"| shape | routing | ours | transformers | ours ms/layer | TFLOP/s | {basis} | theirs ms/layer | "
          f"TFLOP/s | {basis} |\n|---|---|---|---|---|---|---|---|---|---|")
    basis_flops = peak or results["ceiling_tflops"] * 1e12
    for r2 in results["rows"]:
        r1 = [r for r in results["rows"] if r["layers"] < r2["layers"] and
              all(r[k] == r2[k] for k in ("shape", "routing", "mode", "hf"))]
        if not r1:
            continue
        r1 = r1[0]
        n = r2["layers"] - r1["layers"]
        df = (r2["flops"] - r1["flops"]) / n
        cells = []
        for side in ("ours", "hf"):
            if r2[f"{side}_ms"] is None:
                cells += ["-"] * 3
                continue
            dt = (r2[f"{side}_ms"] - r1[f"{side}_ms"]) / n / 1e3
            cells += [f"{dt * 1e3:.2f}", f"{df / dt / 1e12:.3g}" if dt > 0 else "n/a",
                      f"{df / dt / basis_flops:.3f}" if dt > 0 else "n/a"]
        print(f"| {r2['shape']} | {r2['routing']} | {r2['mode'].replace('vs ', '')} | {r2['hf']} | "
              + " | ".join(cells) + " |")
    for name in shapes.split(","):  # the headline: ours against the fastest stock transformers
        for rt in routing.split(","):
            rows = [r for r in results["rows"] if r["shape"] == name and r["routing"] == rt and r["hf_ms"]]
            for layers in sorted({r["layers"] for r in rows}):
                at = [r for r in rows if r["layers"] == layers]
                s = min(at, key=lambda r: r["hf_ms"])  # transformers' fastest option (median ms)
                print(f"{name} {layers} layers {rt}: ours ({s['mode'].replace('vs ', '')}) {s['ours_ms']:.1f} ms vs "
                      f"transformers' strongest ({s['hf']}) {s['hf_ms']:.1f} ms in the same interleaved run: "
                      f"ours/theirs tok/s x{s['ratio']:.2f} [{s['ratio_lo']:.2f}-{s['ratio_hi']:.2f}]")


if __name__ == "__main__":
    dev_name = torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)"
    print(f"device {dev_name}, torch {torch.__version__}, transformers {results.get('transformers')}, "
          f"{str(dtype).replace('torch.', '')}, batch {B} x {T}, {torch.get_num_threads()} threads, modes {MODES}, "
          f"{steps} interleaved pairs after {warmup} warm-up")
    peak, peak_label = spec_peak()
    results["spec_peak_tflops"] = peak / 1e12 if peak else None
    ceiling = matmul_ceiling()
    results["ceiling_tflops"] = ceiling / 1e12
    for name in shapes.split(","):
        for depth in (int(d) for d in depths.split(",")):
            try:
                bench_case(name, depth, peak, ceiling)
            except torch.OutOfMemoryError as e:  # report and go on: the other cases still count
                print(f"  {name} x{depth}: OUT OF MEMORY {str(e).splitlines()[0][:200]}")
                free()
    if not on_gpu and cpu_ratio:
        cpu_moe_vs_dense()
    report(peak, peak_label)
    if out_json:
        os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)
