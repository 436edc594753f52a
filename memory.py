"""
Per-GPU memory of full fine-tuning on 8 GPUs (FSDP2), measured on a CPU, for Qwen3-30B-A3B and
Phi-3.5-MoE at full size. It prints numbers; it is not a test.

    python memory.py                       # both models, 8 ranks, 2048 tokens (about 5-8 min)
    python memory.py --models qwen3 --real none --sim_layers ""   # fast: no CPU compute, no sim

What is measured, and how (the formula is printed next to the measurement as a check):
1. Sharded states. The full model is built on the meta device and sharded as train.py does
   (fully_shard per block, then the root; bf16 compute, fp32 gradient reduction) over a fake
   process group (world 8, this process is rank 0; collectives do nothing). The shards are then
   allocated as fake tensors (shapes and dtypes, no memory), one forward + backward of 16 tokens
   and one optimizer step create the gradients and the optimizer states, and we sum the storage
   bytes of every parameter's local shard, gradient shard and optimizer state. FSDP2 pads dim 0
   to a multiple of the world size, so every rank allocates rank 0's (largest) shard.
2. Activations of one decoder block at real dimensions, T tokens, batch 1, bf16, grouped experts
   (the GPU path): a dispatch mode counts the bytes of every tensor storage an op creates and
   subtracts them when the storage is freed -- torch.cuda.memory_allocated, for any device.
   "resident" = bytes the forward leaves alive (what autograd saved + the block's outputs);
   "bwd extra" = the backward's peak above that (with checkpointing, the recomputed forward
   included; the block's unsharded bf16 parameter gradients included). The block runs for real
   on the CPU (--real) and also on fake tensors; both give the same bytes, which is what allows
   the final norm + chunked loss to be measured on fake tensors only (a real 152k-vocabulary
   loss at 2048 tokens is minutes of CPU time).
3. Sum of parts, per rank, in the steady state of a step (gradient shards present, a reduce-scatter
   after every micro-batch), the measured pieces above placed on FSDP2's schedule (the gathered
   blocks and the reduce-scatter buffer are counted from the parameter count at 2 and 4 bytes):
     states + root params gathered in bf16 (embedding, final norm, lm_head: FSDP2 keeps the root's
     parameters unsharded from forward to backward) + L x block resident + the larger of
       loss phase:  the chunked loss's forward peak,
       block phase: lm_head's unsharded bf16 gradient (held until the root's reduce-scatter) +
                    2 x one block's bf16 params (current + prefetched) + bwd extra + the
                    reduce-scatter input (one block's params in fp32, reduce_dtype).
4. Whole step, simulated: torch's FSDPMemTracker follows every tensor (and FSDP2's storage
   resizes) through two steps of two micro-batches on fake tensors. 48 layers take minutes, so it
   runs the model with 4 and 6 layers and extrapolates linearly in the layer count. Measured: from
   4 layers on, each extra layer adds exactly the same bytes (4 -> 6 -> 8 layers: +3.66, +3.66 GiB
   for Phi-3.5, +1.76, +1.76 for Qwen3, bf16_sr with checkpointing); with 2 layers the peak
   misses the prefetched next block, so 2 layers must not be used.
Limits: the loss is measured on the eager CPU path; on CUDA train.py compiles the per-chunk
cross-entropy, which keeps fewer fp32 (chunk, V) temporaries, so the loss phase here is an upper
bound. CUDA context, NCCL buffers and allocator fragmentation are not seen: the verdict keeps 15%.

Measured (`python memory.py`, torch 2.13 CPU, 2 shared cores, 4.6-7.3 min, 6 GB RAM), peak per GPU, rank 0
of 8, 2048 tokens per micro-batch, sum of parts / simulated step, GiB:
  Qwen3-30B-A3B  fp32    ckpt 65.1 / 65.7 (fits)   no ckpt 82.5 / 83.2 (no)
                 bf16_sr ckpt 50.9 / 51.5 (fits)   no ckpt 68.3 / 68.9 (fits)
  Phi-3.5-MoE    fp32    ckpt 91.5 / 91.5 (no)     no ckpt 102.7 / 102.3 (no)
                 bf16_sr ckpt 72.0 / 72.0 (tight)  no ckpt 83.2 / 82.8 (no)
Sharded states equal N x bytes / 8 exactly (every dim 0 divides by 8). The real CPU block and the
fake-tensor block give identical bytes. With set_requires_gradient_sync(False) between
micro-batches FSDP2 keeps every parameter's unsharded gradient in fp32 (reduce_dtype) until the
last micro-batch: +N x 4 B per GPU (Qwen3 165.2 GiB, Phi-3.5 214.0 GiB simulated): with
gradient accumulation under FSDP, reduce-scatter after every micro-batch.
"""
import argparse
import time
import warnings
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from families import olmoe, phimoe
from model import (Block, MoEConfig, MoETransformer, RotaryEmbedding, chunked_cross_entropy, gpt_oss_20b_config,
                   make_norm, phi35_moe_config, qwen3_30b_a3b_config)
import optim
from loop import fsdp_shard

GiB = 2 ** 30
GPU_GIB = 79.6  # an "80 GB" H100 reports 81,559 MiB
HEADROOM = 1.15  # fits if peak * 1.15 <= 79.6 GiB: CUDA context, NCCL buffers, fragmentation
# model -> (architecture, the optimizer_states its config in configs/ uses)
MODELS = {"qwen3": (qwen3_30b_a3b_config, "fp32"), "phi35": (phi35_moe_config, "bf16_sr"),
          "olmoe": (lambda **o: MoEConfig(**{**olmoe.PRESET, **o}), "fp32"),
          "phi_mini": (lambda **o: MoEConfig(**{**phimoe.SLIM_PRESETS["phi_mini_moe"], **o}), "fp32"),
          "gpt_oss_20b": (gpt_oss_20b_config, "fp32")}
OPTIMIZER_STATES = ("fp32", "bf16_sr")  # train.py's optimizer_states options


def fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)  # meta shards -> fake CPU tensors


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage created by ops inside the mode that are still alive
    (live) and the maximum (peak). Views and in-place results share an input's storage and are
    not counted; storages that existed before the mode (parameters, inputs) are not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out


def storage_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shard)."""
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def fake_world(world):
    """A fake process group (this process = rank 0 of `world`) and its 1-D device mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if not dist.is_initialized():
        dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    if dist.get_world_size() != world:
        raise RuntimeError(f"a process group of size {dist.get_world_size()} exists; need {world}")
    return init_device_mesh("cpu", (world,))


def sharded_model(cfg, optimizer_states, mesh):
    """Meta model -> FSDP2 shards made by train.py's own function (loop.fsdp_shard; param dtype from
    optimizer_states, bf16 compute as on a GPU run with dtype="bfloat16", fp32 reduction), still on
    meta: call model.to_empty(device="cpu") inside fake_tensor_mode() to give the shards (fake) storage."""
    with torch.device("meta"):
        model = MoETransformer(cfg).to(torch.bfloat16 if optimizer_states == "bf16_sr" else torch.float32)
    return fsdp_shard(model, torch.bfloat16, mesh=mesh)


def sharded_state_bytes(cfg, optimizer_states, world=8):
    """-> dict(params, grads, optim, n_params, formula_*) bytes on rank 0 of `world`: measured
    from the shards' storages after one forward + backward + optimizer step on fake tensors."""
    mesh = fake_world(world)
    model = sharded_model(cfg, optimizer_states, mesh)
    with warnings.catch_warnings(), fake_tensor_mode():
        warnings.simplefilter("ignore")  # FSDP2's view-output warning (train.py's concern)
        model.to_empty(device="cpu")
        opt = optim.make_optimizer(model, optimizer_states, 1e-5, (0.9, 0.95), 0.01)  # train.py's (lr, decay: same states)
        ids = torch.zeros(1, 16, dtype=torch.long)
        model(ids, labels=ids).loss.backward()
        opt.step()
        params = list(model.parameters())
        out = dict(params=storage_bytes(params), grads=storage_bytes(p.grad for p in params),
                   optim=storage_bytes(v for s in opt.state.values() for v in s.values()
                                       if isinstance(v, torch.Tensor)))
    n = sum(p.numel() for p in params)  # a DTensor's numel is the full parameter's
    p_bytes = 2 if optimizer_states == "bf16_sr" else 4
    # formula: N * bytes / world (exact when every dim 0 divides by world; FSDP2 pads otherwise)
    out.update(n_params=n, formula_params=n * p_bytes / world, formula_grads=n * p_bytes / world,
               formula_optim=n * 8 / world)
    return out


def _bf16(fn):
    """Build modules with bf16 parameters (fake tensors cannot be cast by .to() in place)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return fn()
    finally:
        torch.set_default_dtype(old)


def block_activation_bytes(cfg, tokens, ckpt, real):
    """One MoE decoder block, bf16, batch 1: -> dict(resident, bwd_extra, peak, param_grads,
    params) bytes. real=False runs on fake tensors (same bytes, no compute)."""
    cfg = type(cfg)(**{**cfg.to_dict(), "expert_impl": "grouped"})
    with (torch.device("cpu") if real else fake_tensor_mode()):
        block = _bf16(lambda: Block(cfg, cfg.moe_layers[0])).train()
        if real:
            torch.manual_seed(0)
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        cos, sin = RotaryEmbedding(cfg)(torch.arange(tokens)[None], torch.bfloat16)  # (1, T, hd)
        x = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        grad_y = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16)
        with LiveBytes() as mem:
            if ckpt:  # as MoETransformer.forward does
                y, logits = checkpoint(block, x, cos, sin, None, None, use_reentrant=False)
            else:
                y, logits = block(x, cos, sin, None)
            resident = mem.live
            y.backward(grad_y)
            del y, logits
        return dict(resident=resident, bwd_extra=mem.peak - resident, peak=mem.peak,
                    param_grads=storage_bytes(p.grad for p in block.parameters()),
                    params=sum(p.numel() for p in block.parameters()))


def loss_bytes(cfg, tokens, chunk):
    """Final norm + chunked lm_head cross-entropy on fake tensors, bf16: -> dict(resident,
    fwd_peak, lm_head_grad) bytes. resident holds the gradients the chunked loss computes in its
    forward (grad_h, grad_W, grad_b)."""
    with fake_tensor_mode():
        norm = _bf16(lambda: make_norm(cfg, cfg.hidden_size))
        head = _bf16(lambda: torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias))
        h = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.zeros(tokens, dtype=torch.long)
        with LiveBytes() as mem:
            loss = chunked_cross_entropy(norm(h).reshape(tokens, -1), head.weight, head.bias, targets, chunk)
            resident, fwd_peak = mem.live, mem.peak
            loss.backward()
        return dict(resident=resident, fwd_peak=fwd_peak, lm_head_grad=storage_bytes([head.weight.grad]))


def simulated_peak(cfg, optimizer_states, tokens, ckpt, world=8, sync_every_micro=True):
    """Peak bytes on rank 0 over 2 steps x 2 micro-batches, every tensor followed by torch's
    FSDPMemTracker on fake tensors. sync_every_micro=False: train.py's accumulation
    (set_requires_gradient_sync(False) before the last micro-batch)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    mesh = fake_world(world)
    model = sharded_model(cfg, optimizer_states, mesh)
    with warnings.catch_warnings(), fake_tensor_mode():
        warnings.simplefilter("ignore")
        model.to_empty(device="cpu")
        opt = optim.make_optimizer(model, optimizer_states, 1e-5, (0.9, 0.95), 0.01)  # train.py's (lr, decay: same states)
        ids = torch.zeros(1, tokens, dtype=torch.long)
        tracker = FSDPMemTracker(model, opt)
        with tracker:
            for _ in range(2):
                for micro in range(2):
                    model.set_requires_gradient_sync(sync_every_micro or micro == 1)
                    tracker.reset_mod_stats()  # module stats only; the global peak is kept
                    model(ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def extrapolated_peak(cfg, optimizer_states, tokens, ckpt, layers=(4, 6), **kw):
    """simulated_peak at two depths, extended linearly to cfg.n_layers."""
    # a per-layer pattern (gpt_oss: sliding / full attention alternating) keeps its first n entries
    a, b = (simulated_peak(type(cfg)(**{**cfg.to_dict(), "n_layers": n,
                                        "layer_types": cfg.layer_types and cfg.layer_types[:n]}), optimizer_states, tokens,
                           ckpt, **kw) for n in layers)
    return a + (b - a) / (layers[1] - layers[0]) * (cfg.n_layers - layers[0])


def verdict(peak):
    if peak * HEADROOM <= GPU_GIB * GiB:
        return "fits"
    return "tight" if peak <= GPU_GIB * GiB else "NO"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen3,phi35")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (batch 1)")
    ap.add_argument("--loss_chunk", type=int, default=4096, help="the configs' loss_chunk_size")
    ap.add_argument("--real", choices=("none", "nockpt", "all"), default="nockpt",
                    help="which block measurements also run for real on the CPU (slow: ~1 min each)")
    ap.add_argument("--sim_layers", default="4,6", help="simulate the whole step at these two depths "
                    "and extrapolate linearly ('': skip)")
    args = ap.parse_args()
    sim_layers = tuple(int(n) for n in args.sim_layers.split(",")) if args.sim_layers else None
    torch.set_num_threads(1)
    rows, t_start = [], time.time()
    for name in args.models.split(","):
        make_cfg, _ = MODELS[name]
        cfg = make_cfg(expert_impl="grouped", loss_chunk_size=args.loss_chunk)
        L = cfg.n_layers
        print(f"\n== {name}: {L} layers, hidden {cfg.hidden_size}, {cfg.n_experts} experts top-{cfg.top_k}, "
              f"vocab {cfg.vocab_size}; rank 0 of {args.world}, {args.tokens} tokens per micro-batch")
        states = {}
        for opt_states in OPTIMIZER_STATES:
            t0 = time.time()
            s = states[opt_states] = sharded_state_bytes(cfg, opt_states, args.world)
            print(f"states {opt_states:7s} N={s['n_params'] / 1e9:.3f}B  measured/formula GiB: "
                  f"params {s['params'] / GiB:.2f}/{s['formula_params'] / GiB:.2f}  "
                  f"grads {s['grads'] / GiB:.2f}/{s['formula_grads'] / GiB:.2f}  "
                  f"optim {s['optim'] / GiB:.2f}/{s['formula_optim'] / GiB:.2f}  ({time.time() - t0:.0f} s)")
        blocks = {}
        for ckpt in (False, True):
            t0 = time.time()
            b = blocks[ckpt] = block_activation_bytes(cfg, args.tokens, ckpt, real=False)
            real = ""
            if args.real == "all" or (args.real == "nockpt" and not ckpt):
                r = block_activation_bytes(cfg, args.tokens, ckpt, real=True)
                same = all(r[k] == b[k] for k in ("resident", "peak", "param_grads"))
                real = f"  real CPU run: {'same bytes' if same else 'DIFFERENT: ' + str(r)}"
            print(f"block ckpt={'on ' if ckpt else 'off'} resident {b['resident'] / 2 ** 20:7.1f} MiB  "
                  f"bwd extra {b['bwd_extra'] / 2 ** 20:7.1f} MiB (param grads {b['param_grads'] / 2 ** 20:.1f})"
                  f"{real}  ({time.time() - t0:.0f} s)")
        loss = loss_bytes(cfg, args.tokens, args.loss_chunk)
        print(f"loss (chunk {args.loss_chunk}): forward peak {loss['fwd_peak'] / GiB:.2f} GiB, resident "
              f"{loss['resident'] / GiB:.2f} GiB (lm_head grad {loss['lm_head_grad'] / GiB:.2f})")
        block_params = blocks[False]["params"]
        root_params = states["fp32"]["n_params"] - L * block_params  # embed, final norm, lm_head
        gather = 2 * root_params
        print(f"root params gathered (bf16) {gather / GiB:.2f} GiB; block phase: lm_head grad "
              f"{loss['lm_head_grad'] / GiB:.2f} + 2 gathered blocks {4 * block_params / GiB:.2f} + bwd extra "
              f"{blocks[False]['bwd_extra'] / GiB:.2f} (ckpt {blocks[True]['bwd_extra'] / GiB:.2f}) + fp32 "
              f"reduce-scatter input {4 * block_params / GiB:.2f} GiB")
        for opt_states in OPTIMIZER_STATES:
            s = states[opt_states]
            for ckpt in (False, True):
                b = blocks[ckpt]
                base = s["params"] + s["grads"] + s["optim"] + gather + L * b["resident"]
                loss_phase = loss["fwd_peak"]
                block_phase = loss["lm_head_grad"] + 2 * 2 * block_params + b["bwd_extra"] + 4 * block_params
                peak = base + max(loss_phase, block_phase)
                sim = None
                if sim_layers:
                    t0 = time.time()
                    sim_cfg = type(cfg)(**{**cfg.to_dict(), "gradient_checkpointing": ckpt})
                    sim = extrapolated_peak(sim_cfg, opt_states, args.tokens, ckpt, layers=sim_layers)
                    print(f"simulated {name} {opt_states} ckpt={ckpt}: {sim / GiB:.1f} GiB ({time.time() - t0:.0f} s)")
                rows.append((name, opt_states, ckpt, s, L * b["resident"], gather,
                             max(loss_phase, block_phase), peak, sim))
        if sim_layers:  # train.py's gradient accumulation without a reduce-scatter per micro-batch
            sim_cfg = type(cfg)(**{**cfg.to_dict(), "gradient_checkpointing": True})
            nosync = extrapolated_peak(sim_cfg, MODELS[name][1], args.tokens, True,
                                       layers=sim_layers, sync_every_micro=False)
            print(f"simulated {name} {MODELS[name][1]} ckpt=on, set_requires_gradient_sync(False) between "
                  f"micro-batches: {nosync / GiB:.1f} GiB (unsharded fp32 gradients of all "
                  f"{states['fp32']['n_params'] / 1e9:.1f}B params: {4 * states['fp32']['n_params'] / GiB:.1f} GiB)")
    print(f"\nPer GPU (rank 0 of {args.world}), GiB; {args.tokens} tokens per micro-batch, reduce-scatter every "
          f"micro-batch; verdict: fits if peak x {HEADROOM} <= {GPU_GIB} GiB, tight if peak <= {GPU_GIB}")
    print("| model | optimizer_states | ckpt | params | grads | optim | root bf16 | activations | transient "
          "| peak (sum) | peak (simulated) | 8 x 80 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, opt_states, ckpt, s, act, gather, transient, peak, sim in rows:
        worst = max(peak, sim or 0)
        print(f"| {name} | {opt_states} | {'on' if ckpt else 'off'} | {s['params'] / GiB:.1f} | {s['grads'] / GiB:.1f} "
              f"| {s['optim'] / GiB:.1f} | {gather / GiB:.1f} | {act / GiB:.1f} | {transient / GiB:.1f} "
              f"| {peak / GiB:.1f} | {'-' if sim is None else f'{sim / GiB:.1f}'} | {verdict(worst)} |")
    print(f"({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
