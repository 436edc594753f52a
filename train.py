"""
SARA fine-tuning (Dong et al., Findings of ACL 2026), from a CPU toy run to torchrun on many GPUs.

    python train.py                                   # the toy experiment, CPU, a few minutes
    python train.py configs/toy.py --lambda_js=0.0    # the same run without the SARA term
    torchrun --nproc_per_node 8 train.py configs/phi35.py

The paper's three stages (design/METHOD.md):
  1. data: parallel samples, target language + its anchor (English) -- data/parallel.py
  2. anchors: one offline pass of the ORIGINAL model, eval mode, no grad, over the anchor
     samples -> pooled routing distribution per sample per MoE layer, cached on disk
  3. fine-tune: L = L_CE(response) + lambda_lb * L_LB + lambda_js * L_JS(layer band)
A toy run that starts from scratch has no "original model": stage 0 first pretrains one briefly
on all languages (LM loss only), and that model plays the released checkpoint.

Defaults below are plain globals; a config file (python) is exec'd over them, then --key=value
overrides (types checked, unknown keys rejected). lambda_js=0 is exactly plain fine-tuning: same
data order, same everything, only the loss term differs (the ablation reviewers asked for).
"""
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from ast import literal_eval
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.parallel import load_parallel_jsonl, split_train_val, tokenize_samples, collate, with_anchor_lang
from checkpoint import load_model, save_hf
from model import MoEConfig, MoETransformer
from optim import AdamWBF16
from sara_loss import pool_routing, sara_loss, layer_divergence
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# defaults: the toy experiment (configs/toy.py restates the ones that matter)
out_dir = "out/toy"
init_from = "scratch"  # "scratch" (toy: stage 0 pretraining) or a Hugging Face checkpoint dir
model_config = dict(vocab_size=4096, hidden_size=128, n_layers=4, n_heads=4, n_kv_heads=2,
                    intermediate_size=256, n_experts=8, top_k=2, moe_intermediate_size=128,
                    qk_norm=True, norm_topk_prob=True, max_position_embeddings=512,
                    router_aux_loss_coef=0.01)  # used only when init_from == "scratch"
pretrain_iters = 150  # stage 0, scratch only: LM steps on all languages before SARA
pretrain_lr = 3e-3
pretrain_target_fraction = 1.0  # stage 0 keeps this fraction of each target language's items (scarce)
# data
data_path = "data/udhr/parallel.jsonl"
tokenizer_path = "data/udhr/bpe.tiktoken"  # "" = the checkpoint's tokenizer.json
train_langs = ["sw", "hi", "bn", "te", "ne"]  # target languages to fine-tune on
anchor_lang = "en"
val_fraction = 0.15
max_len = 256
system_prompt = ""
# SARA
lambda_js = 1.0  # lambda_JS; the paper uses 1.5 for both models; 0 = plain fine-tuning
lambda_lb = -1.0  # lambda_LB; < 0 = the model's own router_aux_loss_coef
sara_layers = [1, 2]  # inclusive (start, end) band of decoder layers to align
sara_layer_list = []  # if given: exactly these decoder layers instead (e.g. a random set, an ablation)
anchor_mode = "offline"  # "offline" (frozen original model, cached) or "online" (current model)
# optimisation
epochs = 8
global_batch = 16  # sequences per optimizer step, over all ranks and micro-steps
micro_batch = 16  # sequences per forward on one rank
lr = 1e-3
warmup_frac = 0.1
min_lr_frac = 0.0  # cosine decays to min_lr_frac * lr
weight_decay = 0.01
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
optimizer_states = "fp32"  # "fp32" (fp32 params), or "bf16_sr": bf16 params, fp32 Adam states, stochastic rounding
seed = 1337
# system
device = "auto"  # "auto", "cpu", "cuda"
dtype = "float32"  # "float32" or "bfloat16" (bf16 autocast with fp32 params unless optimizer_states="bf16_sr")
parallel = "ddp"  # "ddp" or "fsdp" (FSDP2 fully_shard per block) under torchrun
cpu_offload = False  # FSDP2: keep parameters and optimizer states in host memory
gradient_checkpointing = False
loss_chunk_size = 0  # > 0: lm_head + CE in chunks of this many tokens, no (T, V) fp32 logits
compile = False
peak_tflops = 989.0  # the accelerator's dense bf16 peak, for MFU (H100 SXM: 989)
# bookkeeping
log_interval = 5
eval_interval = 50
ckpt_interval = 50
export_hf = True  # write out_dir/hf (Hugging Face layout) at the end
inject_nan_at_iter = -1  # testing only: poison the loss at this iteration to exercise the guard
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list, dict))]


def apply_overrides(argv, namespace, keys):
    """configs/X.py files (exec'd) and --key=value pairs, in order. Unknown keys and wrong types
    are errors that list what is valid."""
    for arg in argv:
        if not arg.startswith("--"):
            scope = {}
            exec(open(arg).read(), scope)
            updates = {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
                       and type(v).__name__ != "module"}
            where = arg
        else:
            if "=" not in arg:
                raise SystemExit(f"override {arg!r}: expected --key=value")
            key, value = arg[2:].split("=", 1)
            try:
                value = literal_eval(value)
            except (ValueError, SyntaxError):
                pass  # a bare string
            updates, where = {key: value}, "command line"
        for key, value in updates.items():
            if key not in keys:
                raise SystemExit(f"{where}: unknown config key {key!r}; valid keys: {', '.join(sorted(keys))}")
            default = namespace[key]
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not type(default):
                raise SystemExit(f"{where}: {key}={value!r} is a {type(value).__name__}, expected {type(default).__name__}")
            namespace[key] = value


apply_overrides(sys.argv[1:], globals(), config_keys)
config = {k: globals()[k] for k in config_keys}
for _key in ("init_from", "data_path"):
    if not globals()[_key]:
        raise SystemExit(f"{_key} is empty: set --{_key}=... (a checkpoint directory or 'scratch'; a JSONL file)")

# -----------------------------------------------------------------------------
# distributed setup
ddp = int(os.environ.get("RANK", -1)) != -1
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if ddp:
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
else:
    rank, world = 0, 1
master = rank == 0
if global_batch % (micro_batch * world):
    raise SystemExit(f"global_batch={global_batch} must be a multiple of micro_batch*world = {micro_batch * world}")
accum = global_batch // (micro_batch * world)
torch.manual_seed(seed + rank)
device_type = "cuda" if "cuda" in device else "cpu"
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" and optimizer_states == "fp32" else nullcontext()
param_dtype = torch.bfloat16 if optimizer_states == "bf16_sr" else torch.float32
if master:
    os.makedirs(out_dir, exist_ok=True)


def log(msg):
    if master:
        tqdm.write(msg)


def barrier():
    if ddp:
        dist.barrier()


def file_digest(paths):
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# data (stage 1 happens upstream: the JSONL holds the translated, filtered samples)
tok = load_tokenizer(tokenizer_path or init_from)
samples = load_parallel_jsonl(data_path)
if any(s["anchor_lang"] != anchor_lang for s in samples):  # e.g. the paper's zh-anchor track
    samples = with_anchor_lang(samples, anchor_lang)  # items with no row in that language: no anchor
train_samples, val_samples = split_train_val(samples, val_fraction, seed=0)
targets = lambda rows: [s for s in rows if s["lang"] in train_langs]
train_set, train_stats = tokenize_samples(tok, targets(train_samples), max_len, system_prompt or None)
val_set, _ = tokenize_samples(tok, targets(val_samples), max_len, system_prompt or None)
if not train_set:
    raise SystemExit(f"{data_path}: no training samples in languages {train_langs}")
log(f"data: {len(train_set)} train / {len(val_set)} val samples in {train_langs}; {train_stats}")


def batches(examples, n_steps, start_step, per_step, shuffle_seed):
    """The micro-batches of optimizer steps start_step.. for this rank. The order is a function
    of (seed, epoch) only, so a resumed run and a run with another lambda_js see the same data.
    Each step takes per_step examples, split into accum micro-batches per rank."""
    n = len(examples)
    steps_per_epoch = max(1, n // per_step)
    for step in range(start_step, n_steps):
        epoch, pos = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed + epoch)).tolist()
        chunk = [examples[i] for i in perm[pos * per_step:(pos + 1) * per_step]]
        chunk += [examples[i] for i in perm[:per_step - len(chunk)]]  # n < per_step: wrap around
        micro = [chunk[j * micro_batch:(j + 1) * micro_batch] for j in range(accum * world)]
        yield step, micro[rank::world]  # micro-batch j goes to rank j % world


# -----------------------------------------------------------------------------
# model
def build_model():
    """-> (model, full_weights). Under FSDP a 30-42B model must not be materialised once per
    GPU: the model is built on the meta device, rank 0 alone reads the checkpoint into host
    memory (full_weights), and wrap() shards it and broadcasts the weights into the shards."""
    if not init_from:
        raise SystemExit("init_from is empty: set it to a checkpoint directory, or 'scratch'")
    if init_from == "scratch":
        torch.manual_seed(seed)  # identical initial weights on every rank
        return MoETransformer(MoEConfig(**model_config)), None
    if ddp and parallel == "fsdp":
        from checkpoint import config_from_hf
        with open(os.path.join(init_from, "config.json")) as f:
            cfg = config_from_hf(json.load(f))
        with torch.device("meta"):
            model = MoETransformer(cfg)
        full = load_model(init_from, dtype=param_dtype).state_dict() if master else {}
        return model.to(dtype=param_dtype), full
    model = load_model(init_from, dtype=param_dtype, device="cpu" if cpu_offload else device)
    return model, None


def wrap(model, full_weights=None):
    """DDP, or FSDP2 with one shard group per block; returns the module to call."""
    model.config.gradient_checkpointing = gradient_checkpointing
    model.config.loss_chunk_size = loss_chunk_size
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {model.config.vocab_size}")
    if full_weights is None:  # (a meta model is materialised after sharding, below)
        model = model.to(device=device if not cpu_offload else "cpu", dtype=param_dtype)
    if not ddp:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, StateDictOptions
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                                  reduce_dtype=torch.float32)
        kw = dict(mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else None)
        kw = {k: v for k, v in kw.items() if v is not None}
        for block in model.layers:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        if full_weights is not None:  # meta model: allocate the shards, fill them from rank 0
            model.to_empty(device="cpu" if cpu_offload else device)
            set_model_state_dict(model, full_weights, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)


def moe_positions(cfg, layers):
    """Decoder-layer indices -> positions in out.router_logits (which lists MoE layers only)."""
    moe = cfg.moe_layers
    bad = [l for l in layers if l not in moe]
    if bad:
        raise SystemExit(f"sara_layers: layers {bad} are not MoE layers (MoE layers: {moe})")
    return [moe.index(l) for l in layers]


# -----------------------------------------------------------------------------
# optimizer: AdamW, or AdamW on bf16 parameters with fp32 states and stochastic rounding (optim.py)
def make_optimizer(model, lr_value):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms and biases
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if optimizer_states == "bf16_sr":
        return AdamWBF16(groups, lr=lr_value, betas=(beta1, beta2), weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr_value, betas=(beta1, beta2), fused=device_type == "cuda")


def lr_at(step, total, peak):
    """Linear warmup over warmup_frac of the steps, then cosine to min_lr_frac * peak."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# checkpoints: atomic (write to a temp name, fsync, rename); resume restores everything
def save_checkpoint(model, optimizer, step, path):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = dict(model=model_sd, optimizer=optim_sd, step=step, config=config)
    tmp = path + ".tmp"
    if parallel == "fsdp" and ddp:
        import torch.distributed.checkpoint as dcp
        if master and os.path.exists(tmp):
            shutil.rmtree(tmp)
        barrier()
        dcp.save(state, checkpoint_id=tmp)
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    elif master:
        os.makedirs(tmp, exist_ok=True)
        _atomic_torch_save(state, os.path.join(tmp, "state.pt"))
    if not (parallel == "fsdp" and ddp):
        rngs = [None] * world
        if ddp:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if master:
            for r, s in enumerate(rngs):
                torch.save(s, os.path.join(tmp, f"rng_rank{r}.pt"))
    barrier()
    if master:  # the rename is the commit point: a crash before it leaves the old checkpoint
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
        old = path + ".old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        if os.path.exists(old):
            shutil.rmtree(old)
    barrier()


def full_state_dict(model):
    """Unsharded weights on CPU (rank 0 gets them under FSDP; a collective: call on all ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _atomic_torch_save(obj, path):
    with open(path + ".part", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)


# what must be the same to resume a run (the rest, e.g. log_interval, may change)
RUN_KEYS = ["init_from", "model_config", "pretrain_iters", "pretrain_target_fraction", "data_path",
            "train_langs", "anchor_lang", "lambda_js", "lambda_lb", "sara_layers", "sara_layer_list",
            "anchor_mode", "epochs", "global_batch", "lr", "seed"]


def rng_state():
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def load_checkpoint(model, optimizer, path):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not os.path.exists(os.path.join(path, "COMPLETE")):
        raise SystemExit(f"{path}: incomplete checkpoint (no COMPLETE marker)")
    if parallel == "fsdp" and ddp:
        import torch.distributed.checkpoint as dcp
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = dict(model=model_sd, optimizer=optim_sd, step=0, config=config)
        dcp.load(state, checkpoint_id=path)
    else:
        state = torch.load(os.path.join(path, "state.pt"), map_location=device, weights_only=False)
    changed = {k: (state["config"].get(k), config[k]) for k in RUN_KEYS if state["config"].get(k) != config[k]}
    if changed:
        raise SystemExit(f"{path} belongs to another run: {changed} (saved, now). Use a new out_dir.")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rng = torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]


# -----------------------------------------------------------------------------
# one training phase: the loop shared by stage 0 (LM pretraining, toy) and stage 3 (SARA)
def reshard(model):
    """FSDP2 keeps the root's parameters gathered after a forward that no backward follows
    (eval, anchors): free them again, and let model.parameters() be the shards once more."""
    if hasattr(model, "reshard"):
        model.reshard()


def to_device(batch):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_losses(model, examples, band, js_weight, anchors):
    """CE, LB and JS of one micro-batch. anchors: {id: (L, E)}, "online", or None (no JS term)."""
    batch = to_device(collate(examples, tok.pad_id))
    # a single sequence has no padding: no mask lets attention use its fused causal kernel
    mask = batch["attention_mask"] if len(examples) > 1 else None
    with autocast:
        out = model(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
    losses = dict(ce=out.loss, lb=out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device))
    if out.z_loss is not None:
        losses["z"] = out.z_loss
    if anchors is not None:
        target_dist = pool_routing(out.router_logits, mask, check=False)  # (B, L, E)
        if anchors == "online":  # ablation: anchors from the CURRENT model, no grad, eval mode
            anchors = compute_anchors(model, examples)
        anchor_dist, has_anchor = lookup_anchors(anchors, examples, target_dist)
        with torch.set_grad_enabled(torch.is_grad_enabled() and js_weight > 0):
            # eq. 9 over the band; with lambda_js = 0 it is logged, never differentiated
            losses["js"] = sara_loss(target_dist, anchor_dist, band, anchor_mask=has_anchor, check=False)
        losses["_per_layer"] = (target_dist.detach(), anchor_dist, has_anchor)
    return losses


def lookup_anchors(anchors, examples, like):
    """(B, L, E) anchor distributions for a micro-batch and the (B,) mask of who has one."""
    rows, has = [], []
    for e in examples:
        a = anchors.get(e["id"]) if e["has_anchor"] else None
        rows.append(a if a is not None else torch.full(like.shape[1:], float("nan")))
        has.append(a is not None)
    return torch.stack(rows).to(like.device), torch.tensor(has, device=like.device)


@torch.no_grad()
def evaluate(model, examples, band, anchors):
    """Mean CE, JS over the band, and per-layer JS (target vs anchor) on held-out samples."""
    model.eval()
    ce, js, per_layer, n, n_js = 0.0, 0.0, None, 0, 0
    for i in range(0, len(examples), micro_batch):
        chunk = examples[i:i + micro_batch]
        losses = forward_losses(model, chunk, band, 0.0, anchors)
        ce += losses["ce"].item() * len(chunk)
        n += len(chunk)
        if "js" in losses:
            target, anchor, has = losses["_per_layer"]
            n_has = int(has.sum())
            if n_has:  # the JS means are over samples that have an anchor
                js += losses["js"].item() * n_has
                layer_js = layer_divergence(anchor[has], target[has]) * n_has  # (L,)
                per_layer = layer_js if per_layer is None else per_layer + layer_js
                n_js += n_has
    model.train()
    reshard(model)
    res = dict(val_ce=ce / max(n, 1))
    if per_layer is not None:
        res["val_js"] = js / n_js
        res["val_js_per_layer"] = [round(x, 5) for x in (per_layer / n_js).tolist()]
    return res


def train_phase(model, raw_model, examples, n_steps, peak_lr, js_weight, band, anchors,
                ckpt_path, metrics_path, phase):
    optimizer = make_optimizer(model, peak_lr)
    start = 0
    if ckpt_path and os.path.exists(os.path.join(ckpt_path, "COMPLETE")):
        start = load_checkpoint(model, optimizer, ckpt_path)
        log(f"{phase}: resumed from {ckpt_path} at step {start}")
    lb_weight = lambda_lb if lambda_lb >= 0 else raw_model.config.router_aux_loss_coef
    z_weight = raw_model.config.router_z_loss_coef
    # 6 N per token (forward 2N + backward 4N), N = active parameters without the embedding
    # lookup (not a matmul); attention's T^2 term is left out: small at these lengths
    flops_per_token = 6 * (raw_model.num_params(active=True) - raw_model.embed_tokens.weight.numel())
    if start == 0 and anchors is not None and val_set:  # the "before" point of the JS curves
        res = evaluate(model, val_set, band, anchors)
        log(f"{phase} before fine-tuning: val CE {res['val_ce']:.4f}  val JS(band) {res.get('val_js', float('nan')):.4f}  "
            f"JS per MoE layer {res.get('val_js_per_layer')}")
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(dict(phase=phase, step=-1, **res)) + "\n")
    bar = tqdm(total=n_steps, initial=start, desc=phase, disable=not master, dynamic_ncols=True)
    t0, tokens_since_log = time.time(), 0
    for step, micro_batches in batches(examples, n_steps, start, global_batch, seed):
        lr_now = lr_at(step, n_steps, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        stats, n_tokens, seen = {}, 0, hashlib.sha256()
        for j, micro in enumerate(micro_batches):
            last = j == len(micro_batches) - 1
            if ddp and parallel == "ddp":
                model.require_backward_grad_sync = last  # sync grads on the last micro-step only
            elif ddp:
                model.set_requires_gradient_sync(last)
            losses = forward_losses(model, micro, band, js_weight, anchors)
            total = losses["ce"] + lb_weight * losses["lb"] + z_weight * losses.get("z", 0.0)
            if js_weight > 0 and "js" in losses:
                total = total + js_weight * losses["js"]
            if step == inject_nan_at_iter:
                total = total * float("nan")
            (total / len(micro_batches)).backward()
            for k in ("ce", "lb", "js"):
                if k in losses:
                    stats[k] = stats.get(k, 0.0) + losses[k].detach() / len(micro_batches)
            stats["loss"] = stats.get("loss", 0.0) + total.detach() / len(micro_batches)
            n_tokens += sum(len(e["input_ids"]) for e in micro)
            seen.update(" ".join(e["id"] for e in micro).encode())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, already the global norm
            grad_norm = grad_norm.full_tensor()
        values = torch.stack([stats[k] for k in sorted(stats)] + [grad_norm.float().to(stats["loss"].device)])
        if ddp:
            dist.all_reduce(values)
            values /= world
        values = values.tolist()  # one host sync per step
        logged = dict(zip(sorted(stats) + ["grad_norm"], values))
        if not math.isfinite(logged["loss"]):
            bar.close()
            raise SystemExit(f"{phase} step {step}: loss is {logged['loss']} -- stopping. The last good "
                             f"checkpoint ({ckpt_path}) is untouched; lower lr or check the data.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{logged['loss']:.4f}", js=f"{logged.get('js', 0):.4f}")
        tokens_since_log += n_tokens * world  # (rank 0's count times world: an estimate)
        if step % log_interval == 0 or step == n_steps - 1:
            dt = time.time() - t0
            t0, tokens, tokens_since_log = time.time(), tokens_since_log, 0
            record = dict(phase=phase, step=step, lr=lr_now, **logged, tokens_per_s=tokens / max(dt, 1e-9),
                          batch=seen.hexdigest()[:12])  # which samples rank 0 saw, to compare runs
            if device_type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                record["mfu"] = flops_per_token * tokens / max(dt, 1e-9) / (peak_tflops * 1e12)
            if master:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if (step + 1) % eval_interval == 0 or step == n_steps - 1:
            if anchors is not None and val_set:
                res = evaluate(model, val_set, band, anchors)
                if master:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(dict(phase=phase, step=step, **res)) + "\n")
                log(f"{phase} step {step}: val CE {res['val_ce']:.4f}  val JS(band) {res.get('val_js', float('nan')):.4f}  "
                    f"JS per MoE layer {res.get('val_js_per_layer')}")
        if ckpt_path and ((step + 1) % ckpt_interval == 0 or step == n_steps - 1):
            save_checkpoint(model, optimizer, step + 1, ckpt_path)
    bar.close()


# -----------------------------------------------------------------------------
# stage 2: anchors
@torch.no_grad()
def compute_anchors(model, examples):
    """{sample id: (L, E) fp32}: pooled routing of `model` (eval mode, no grad) on the ANCHOR
    side of each example that has one; the others get no entry, never a made-up one."""
    with_anchor = [e for e in examples if e["has_anchor"]]
    if not with_anchor:
        return {}
    was_training = model.training
    model.eval()
    batch = to_device(collate([dict(input_ids=e["anchor_input_ids"]) for e in with_anchor], tok.pad_id))
    with autocast:
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train(was_training)
    reshard(model)
    dists = pool_routing(out.router_logits, batch["attention_mask"], check=False).float()  # (b, L, E)
    return {e["id"]: d for e, d in zip(with_anchor, dists)}


def build_anchors(model, examples):
    """Stage 2 over a whole set; each rank does a share, the results are gathered."""
    mine = [e for e in examples if e["has_anchor"]][rank::world]
    n_rounds = -(-sum(e["has_anchor"] for e in examples) // (micro_batch * world))
    result = {}
    for i in range(n_rounds):  # the same number of forwards on every rank (FSDP needs it)
        chunk = mine[i * micro_batch:(i + 1) * micro_batch]
        dists = compute_anchors(model, chunk or mine[:1] or [e for e in examples if e["has_anchor"]][:1])
        result.update({e["id"]: dists[e["id"]].cpu() for e in chunk})
    if ddp:
        parts = [None] * world
        dist.all_gather_object(parts, result)
        result = {k: v for p in parts for k, v in p.items()}
    return result


def anchors_fingerprint(model_digest, examples):
    h = hashlib.sha256()
    h.update(model_digest.encode())
    h.update(tok.fingerprint().encode())
    for e in examples:
        if e["has_anchor"]:
            h.update(e["id"].encode())
            h.update(json.dumps(e["anchor_input_ids"]).encode())
    return h.hexdigest()[:16]


def get_anchors(model, examples, model_digest):
    """Load the anchor cache if its fingerprint matches (model, data, chat format), else rebuild."""
    path = os.path.join(out_dir, "anchors.pt")
    want = anchors_fingerprint(model_digest, examples)
    if os.path.exists(path):
        cached = torch.load(path, weights_only=False)
        if cached["fingerprint"] == want:
            log(f"anchors: {len(cached['anchors'])} loaded from {path}")
            return cached["anchors"]
        log(f"anchors: {path} is stale (fingerprint {cached['fingerprint']} != {want}); rebuilding")
    t0 = time.time()
    anchors = build_anchors(model, examples)
    if master:
        _atomic_torch_save(dict(fingerprint=want, anchors=anchors), path)
    barrier()
    missing = sum(not e["has_anchor"] for e in examples)
    log(f"anchors: {len(anchors)} computed in {time.time() - t0:.1f}s ({missing} samples have no anchor "
        f"and are left out of the JS term)")
    return anchors


# -----------------------------------------------------------------------------
# main
metrics_path = os.path.join(out_dir, "metrics.jsonl")
raw_model, full_weights = build_model()
log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(active=True) / 1e6:.2f}M active), "
    f"MoE layers {raw_model.config.moe_layers}, device {device}, world {world}, grad accum {accum}")

if init_from == "scratch":
    # stage 0 (toy only): a brief LM pretraining on every language stands in for the released model
    base_path = os.path.join(out_dir, "base.pt")
    if not os.path.exists(base_path):
        # scarce targets: keep a fixed fraction of each target language's items (by group hash)
        keep = lambda s: s["lang"] not in train_langs or int(hashlib.sha256(
            f"{seed}:{s['id']}".encode()).hexdigest()[:8], 16) < pretrain_target_fraction * 16 ** 8
        pretrain_set, _ = tokenize_samples(tok, [s for s in train_samples if keep(s)], max_len, system_prompt or None)
        model = wrap(raw_model)
        train_phase(model, raw_model, pretrain_set, pretrain_iters, pretrain_lr, 0.0, [], None,
                    os.path.join(out_dir, "ckpt_pretrain"), metrics_path, "pretrain")
        weights = full_state_dict(model)  # collective under FSDP
        if master:
            _atomic_torch_save(dict(model=weights, config=raw_model.config.to_dict()), base_path)
        barrier()
        del model
    base = torch.load(base_path, map_location="cpu", weights_only=False)
    raw_model = MoETransformer(MoEConfig.from_dict(base["config"]))
    raw_model.load_state_dict(base["model"])
    model_digest = file_digest([base_path])
else:
    model_digest = file_digest(glob.glob(os.path.join(init_from, "*.safetensors")) + [os.path.join(init_from, "config.json")])

model = wrap(raw_model, full_weights)
del full_weights
band_layers = sara_layer_list or list(range(sara_layers[0], sara_layers[1] + 1))
band = moe_positions(raw_model.config, band_layers)
if anchor_mode not in ("offline", "online"):
    raise SystemExit(f"anchor_mode={anchor_mode!r}: expected 'offline' or 'online'")
anchors = None
if anchor_mode == "offline":
    # stage 2: the ORIGINAL model (not yet fine-tuned), eval mode, no grad
    anchors = get_anchors(model, train_set + val_set, model_digest)
if compile:
    model = torch.compile(model)

if anchor_mode == "online":
    anchors = "online"

steps_per_epoch = max(1, len(train_set) // global_batch)
n_steps = epochs * steps_per_epoch
log(f"stage 3: {n_steps} steps ({epochs} epochs x {steps_per_epoch}), lambda_js={lambda_js}, "
    f"aligned decoder layers {band_layers}")
train_phase(model, raw_model, train_set, n_steps, lr, lambda_js, band, anchors,
            os.path.join(out_dir, "ckpt"), metrics_path, "sara" if lambda_js > 0 else "finetune")

if export_hf:
    full = full_state_dict(model)
    if master:
        with torch.device("meta"):
            export = MoETransformer(raw_model.config)
        export.load_state_dict(full, assign=True)
        if export.config.tie_word_embeddings:  # assign=True replaced the shared Parameter
            export.lm_head.weight = export.embed_tokens.weight
        try:
            # the tokenizer travels with the weights, so that sample.py / eval.py need only the dir
            hf_dir = os.path.join(out_dir, "hf")
            save_hf(export, hf_dir, copy_from=None if init_from == "scratch" else init_from)
            if tokenizer_path:
                shutil.copy(tokenizer_path, hf_dir)
            log(f"exported the fine-tuned model to {hf_dir} (Hugging Face layout)")
        except (ImportError, ValueError) as err:
            log(f"HF export skipped: {err}")
if ddp:
    dist.destroy_process_group()
