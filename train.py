"""
SARA fine-tuning (Dong et al., Findings of ACL 2026), from a CPU toy run to torchrun on many GPUs.

    python train.py                                   # the toy experiment, CPU, a few minutes
    python train.py configs/toy.py --lambda_js=0.0    # the same run without the SARA term
    torchrun --nproc_per_node 8 train.py configs/phi35.py --init_from=DIR --data_path=FILE

The paper's three stages (docs/method.md):
  1. data: parallel samples, target language + its anchor (English) -- data/parallel.py
  2. anchors: one offline pass of the ORIGINAL model, eval mode, no grad, over the anchor
     samples -> pooled routing distribution per sample per MoE layer, cached -- anchors.py
  3. fine-tune: L = L_CE + lambda_LB * L_LB + lambda_JS * L_JS (JS over the layer band)
A toy run that starts from scratch has no "original model": stage 0 first pretrains one briefly
on all languages (LM loss only), and that model plays the released checkpoint.

Settings are the globals below; config files and --key=value overrides replace them
(configurator.py), and every value is checked before any data or model is loaded. lambda_js=0 is
exactly plain fine-tuning: same data order, same everything, only the loss term differs.
A run is identified by a fingerprint of everything that decides its trajectory (data digest,
tokenizer, model, settings); a checkpoint of another run is never resumed (checkpoint.py).
"""
import glob
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

from anchors import anchor_fingerprint, forward_and_pool, build_anchors, load_or_build_anchors, lookup_anchors
from checkpoint import (_read_json, all_finite, check_fingerprint, CheckpointError, file_digest, load_base,
                        load_model, load_training_state, read_checkpoint_meta, recover_checkpoint, save_base,
                        save_hf_state, save_training_state)
from configurator import ConfigError, at_least, configure, in_range, one_of, validate
from hf_config import config_from_hf
from data.parallel import collate, load_parallel_jsonl, split_train_val, step_batches, tokenize_samples, with_anchor_lang
from model import MoEConfig, MoETransformer
from optim import lr_at, make_optimizer
from sara_loss import layer_band, layer_divergence, moe_positions, pool_routing, sara_loss
from tokenizer import load_tokenizer, save_hf_tokenizer

# -----------------------------------------------------------------------------
# settings: the toy experiment (configs/toy.py restates the ones that matter)
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
train_langs = ["sw", "hi", "bn", "te", "ne"]  # target languages to fine-tune on (codes as in the data)
anchor_lang = "en"
val_fraction = 0.15
max_len = 256
system_prompt = ""
# SARA
lambda_js = 1.0  # lambda_JS; the paper uses 1.5 for both models; 0 = plain fine-tuning
lambda_lb = -1.0  # lambda_LB; -1 = the model's own router_aux_loss_coef
sara_band = (1, 2)  # inclusive, 0-based (start, end) band of decoder layers to align
sara_layer_list = []  # if given: exactly these decoder layers instead (e.g. a random set, an ablation)
anchor_mode = "offline"  # "offline" (frozen original model, cached) or "online" (current model, ablation)
min_anchor_fraction = 0.25  # SARA needs anchors: fewer training samples with one is an error
router_clean_logits = False  # sparsemixer with input jitter (Phi-3.5): pool softmax(h W_g) of the un-jittered input
# optimisation
epochs = 8  # 0: stop after stage 0 (toy) and stage 2
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
# config: files and --key=value overrides, then every value checked (nothing is loaded yet)
_defaults = {k: v for k, v in globals().items() if not k.startswith("_")
             and isinstance(v, (int, float, bool, str, list, tuple, dict))}
_run_start = time.time()
settings, sources = configure(sys.argv[1:], _defaults, renamed=dict(
    sara_layers="use sara_band=(start, end), an inclusive pair, or sara_layer_list=[...] for exact layers"))
globals().update(settings)
_positive = in_range(0, math.inf, lo_open=True)
_str_list = lambda v: None if v and all(isinstance(x, str) and x for x in v) else "must be a non-empty list of strings"
validate(settings, sources, dict(
    init_from=lambda v: None if v else "is empty: a checkpoint directory, or 'scratch'",
    data_path=lambda v: None if v else "is empty: a JSONL file of parallel samples",
    pretrain_iters=at_least(0), pretrain_lr=_positive, pretrain_target_fraction=in_range(0, 1, lo_open=True),
    train_langs=_str_list, anchor_lang=lambda v: None if v else "is empty",
    val_fraction=in_range(0, 1, hi_open=True), max_len=at_least(2),
    lambda_js=in_range(0, math.inf), lambda_lb=lambda v: None if v >= 0 or v == -1 else "must be >= 0, or -1 (the model's own)",
    sara_band=lambda v: None if len(v) == 2 and all(type(x) is int for x in v) and 0 <= v[0] <= v[1]
    else "must be an inclusive pair (start, end) of layer indices with 0 <= start <= end",
    sara_layer_list=lambda v: None if all(type(x) is int and x >= 0 for x in v) and len(set(v)) == len(v)
    else "must be distinct layer indices >= 0",
    anchor_mode=one_of("offline", "online"), min_anchor_fraction=in_range(0, 1),
    epochs=at_least(0), global_batch=at_least(1), micro_batch=at_least(1), lr=_positive,
    warmup_frac=in_range(0, 1), min_lr_frac=in_range(0, 1), weight_decay=at_least(0),
    beta1=in_range(0, 1, hi_open=True), beta2=in_range(0, 1, hi_open=True), grad_clip=_positive,
    optimizer_states=one_of("fp32", "bf16_sr"), device=one_of("auto", "cpu", "cuda"),
    dtype=one_of("float32", "bfloat16"), parallel=one_of("ddp", "fsdp"), loss_chunk_size=at_least(0),
    peak_tflops=_positive, log_interval=at_least(1), eval_interval=at_least(1), ckpt_interval=at_least(1)))
# the model's shape is known before any weight is read: check the band and max_len against it
try:
    if init_from == "scratch":
        model_cfg = MoEConfig(**{**model_config, "router_clean_logits": router_clean_logits})
    else:
        model_cfg = config_from_hf(_read_json(os.path.join(init_from, "config.json")))  # names the file if not JSON
        model_cfg.router_clean_logits = router_clean_logits
except (OSError, ValueError, TypeError) as err:  # (CheckpointError and JSON errors are ValueErrors)
    _key = "model_config" if init_from == "scratch" else "init_from"
    raise ConfigError(f"{_key} ({sources[_key]}): {err}") from None
try:
    band_layers = list(sara_layer_list) or list(layer_band(*sara_band))
    band = moe_positions(model_cfg.moe_layers, band_layers)  # positions in out.router_logits
except ValueError as err:
    _key = "sara_layer_list" if sara_layer_list else "sara_band"
    raise ConfigError(f"{_key}={settings[_key]!r} ({sources[_key]}): {err}") from None
if max_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"max_len={max_len} ({sources['max_len']}) exceeds the model's context "
                      f"max_position_embeddings={model_cfg.max_position_embeddings}")

# -----------------------------------------------------------------------------
# distributed setup
ddp = int(os.environ.get("RANK", -1)) != -1
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
elif device == "cuda" and not torch.cuda.is_available():
    raise ConfigError(f"device='cuda' ({sources['device']}): no CUDA device is available here (use 'cpu' or 'auto')")
if ddp:
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
else:
    rank, world = 0, 1
master = rank == 0
sharded = ddp and parallel == "fsdp"
if global_batch % (micro_batch * world):
    raise ConfigError(f"global_batch={global_batch} ({sources['global_batch']}) must be a multiple of "
                      f"micro_batch * world = {micro_batch} * {world}")
accum = global_batch // (micro_batch * world)
torch.manual_seed(seed + rank)
device_type = "cuda" if "cuda" in device else "cpu"
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" and optimizer_states == "fp32" else nullcontext()
param_dtype = torch.bfloat16 if optimizer_states == "bf16_sr" else torch.float32
metrics_path = os.path.join(out_dir, "metrics.jsonl")
if master:
    os.makedirs(out_dir, exist_ok=True)
    for ckpt in ("ckpt_pretrain", "ckpt"):  # finish or undo a commit a crash interrupted
        for note in recover_checkpoint(os.path.join(out_dir, ckpt)):
            tqdm.write(f"checkpoint recovery: {note}")
if ddp:
    dist.barrier()  # nobody reads a checkpoint before rank 0 has repaired it


def log(msg):
    if master:
        tqdm.write(msg)


# -----------------------------------------------------------------------------
# data (stage 1 happens upstream: the JSONL holds the translated, filtered samples)
try:
    tok = load_tokenizer(tokenizer_path or init_from)
except (OSError, ValueError) as err:
    _key = "tokenizer_path" if tokenizer_path else "init_from"
    raise ConfigError(f"{_key} ({sources[_key]}): {err}") from None
try:
    samples = load_parallel_jsonl(data_path)
except (OSError, ValueError) as err:
    raise SystemExit(f"data_path: {err}") from None
present = sorted({s["lang"] for s in samples})
absent = [l for l in train_langs if l not in present]
_case = [p for p in present if p not in train_langs and p.lower() in {l.lower() for l in train_langs}]
if absent or _case:  # codes are matched exactly: "SW" is not "sw", and rows spelled so are never dropped silently
    raise ConfigError(f"train_langs ({sources['train_langs']}): " + (f"{absent} not in {data_path}; " if absent else "")
                      + f"its languages are {present}" + (f" (codes are case-sensitive: the data spells {_case})" if _case else ""))
_case = {s["id"]: s["anchor_lang"] for s in samples if s["anchor_lang"] != anchor_lang
         and s["anchor_lang"].lower() == anchor_lang.lower()}
if _case:  # "EN" for "en" would drop those rows' anchors (and re-anchor every row) without a word
    raise ConfigError(f"anchor_lang={anchor_lang!r} ({sources['anchor_lang']}): {len(_case)} rows of {data_path} spell "
                      f"it {sorted(set(_case.values()))} (e.g. id {next(iter(_case))!r}); codes are case-sensitive")
if any(s["anchor_lang"] != anchor_lang for s in samples):  # e.g. the paper's zh-anchor track
    # items with no row in that language: no anchor; rows already anchored in it keep their anchor
    samples = [s if s["anchor_lang"] == anchor_lang else r for s, r in zip(samples, with_anchor_lang(samples, anchor_lang))]
train_samples, val_samples = split_train_val(samples, val_fraction, seed=0)
targets = [s for s in train_samples if s["lang"] in train_langs]
train_set, train_stats = tokenize_samples(tok, targets, max_len, system_prompt or None)
val_set, _ = tokenize_samples(tok, [s for s in val_samples if s["lang"] in train_langs], max_len, system_prompt or None)
_empty = [l for l in train_langs if not any(e["lang"] == l for e in train_set)]
if _empty:  # a requested language is never dropped silently: all its items in val, or every prompt too long
    raise ConfigError(f"train_langs ({sources['train_langs']}): no training sample of {_empty} is left (max_len={max_len} "
                      f"({sources['max_len']}): every prompt fills it, or val_fraction={val_fraction} took every item)")
log(f"data: {len(train_set)} train / {len(val_set)} val samples in {train_langs}; {train_stats}")
if global_batch > len(train_set):
    log(f"warning: global_batch={global_batch} is more than the {len(train_set)} training samples: every step "
        f"repeats samples (wrap-around); lower global_batch for one pass per step")
if train_stats["truncated"]:
    log(f"warning: {train_stats['truncated']} of {len(train_set)} training responses are cut at max_len={max_len} "
        "(the end of the response, e.g. a final \\boxed{} answer, is not trained on); raise max_len if that matters")
n_anchored = sum(e["has_anchor"] for e in train_set)
if lambda_js > 0 and n_anchored < max(1, min_anchor_fraction * len(train_set)):
    by_lang = {l: (sum(e["has_anchor"] for e in train_set if e["lang"] == l), sum(e["lang"] == l for e in train_set))
               for l in train_langs}
    raise ConfigError(f"SARA needs anchors: {n_anchored} of {len(train_set)} training samples have an anchor in "
                      f"anchor_lang={anchor_lang!r} (per language, with/total: {by_lang}; min_anchor_fraction="
                      f"{min_anchor_fraction}). Check anchor_lang against the data, or set lambda_js=0 for plain fine-tuning.")
data_digest, tok_digest = file_digest([data_path]), tok.fingerprint()
# the settings that decide a phase's trajectory (the others, e.g. micro_batch or log_interval, may change)
_shared_keys = ["train_langs", "val_fraction", "max_len", "system_prompt", "global_batch", "warmup_frac",
                "min_lr_frac", "weight_decay", "beta1", "beta2", "grad_clip", "optimizer_states", "dtype", "seed"]


def fingerprint(keys, **extra):
    """What decides a phase's trajectory: the data, the tokenizer, the given settings (as JSON)."""
    return json.loads(json.dumps(dict(data=data_digest, tokenizer=tok_digest, **extra, **{k: settings[k] for k in keys})))


# -----------------------------------------------------------------------------
# model
def build_model():
    """-> (model, full_weights). Under FSDP a 30-42B model must not be materialised once per
    GPU: the model is built on the meta device, rank 0 alone reads the checkpoint into host
    memory (full_weights), and wrap() shards it and broadcasts the weights into the shards."""
    if init_from == "scratch":
        torch.manual_seed(seed)  # identical initial weights on every rank
        return MoETransformer(model_cfg), None
    if sharded:
        with torch.device("meta"):
            meta_model = MoETransformer(model_cfg)
        full = load_model(init_from, dtype=param_dtype).state_dict() if master else {}
        return meta_model.to(dtype=param_dtype), full
    return load_model(init_from, dtype=param_dtype, device="cpu" if cpu_offload else device,
                      router_clean_logits=router_clean_logits).train(), None


def wrap(net, weights_on_rank0=None):
    """DDP, or FSDP2 with one shard group per block; returns the module to call."""
    net.config.gradient_checkpointing = gradient_checkpointing
    net.config.loss_chunk_size = loss_chunk_size
    if tok.vocab_size > net.config.vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {net.config.vocab_size}")
    if weights_on_rank0 is None:  # (a meta model is materialised after sharding, below)
        net = net.to(device=device if not cpu_offload else "cpu", dtype=param_dtype)
    if not ddp:
        return net
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, StateDictOptions
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None, reduce_dtype=torch.float32)
        kw = dict(mp_policy=mp, **(dict(offload_policy=CPUOffloadPolicy()) if cpu_offload else {}))
        for block in net.layers:
            fully_shard(block, **kw)
        fully_shard(net, **kw)
        if weights_on_rank0 is not None:  # meta model: allocate the shards, fill them from rank 0
            net.to_empty(device="cpu" if cpu_offload else device)
            set_model_state_dict(net, weights_on_rank0, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(net, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)


def full_state_dict(net):
    """Unsharded weights on CPU (rank 0 gets them under FSDP; a collective: call on all ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@torch.no_grad()
def evaluate(net, examples, anchor_table, phase, step):
    """Held-out CE (mean over micro-batches of their token-mean CE, weighted by size), and JS
    between anchor and target routing (band mean, and per MoE layer) over samples with an anchor;
    logged and written to metrics.jsonl (step -1: before fine-tuning)."""
    out = forward_and_pool(net, [e["input_ids"] for e in examples], labels=[e["labels"] for e in examples],
                           pad_id=tok.pad_id, batch_size=micro_batch, autocast=autocast, device=device)
    ce = sum(out.nll[i:i + micro_batch].sum().item() / out.n_targets[i:i + micro_batch].sum().item()
             * len(examples[i:i + micro_batch]) for i in range(0, len(examples), micro_batch))
    res = dict(val_ce=ce / max(len(examples), 1))
    if anchor_table == "online":  # ablation: the current model's own routing on the anchors
        anchor_table = build_anchors(net, examples, pad_id=tok.pad_id, batch_size=micro_batch, autocast=autocast, device=device)
    anchor_dist, has = lookup_anchors(anchor_table, examples, out.routing)
    if has.any():  # the means are over samples that have an anchor
        res["val_js"] = sara_loss(out.routing[has], anchor_dist[has], band, check=False).item()
        res["val_js_per_layer"] = [round(x, 5) for x in layer_divergence(anchor_dist[has], out.routing[has]).tolist()]
    log(f"{phase} {'before fine-tuning' if step < 0 else f'step {step}'}: val CE {res['val_ce']:.4f}  val JS(band) "
        f"{res.get('val_js', math.nan):.4f}  JS per MoE layer {res.get('val_js_per_layer')}")
    write_metrics(dict(phase=phase, step=step, **res))


def check_finite_weights(net, path):
    """A NaN/Inf weight read from a file is an error naming the file and tensors (unchecked, an unused
    embedding row trains on silently into the export; a used one stops the run blaming lr)."""
    bad = [n for n, p in net.named_parameters() if not all_finite(p.to_local() if hasattr(p, "to_local") else p)]
    n_bad = torch.tensor(float(len(bad)), device=device)
    if ddp:  # (FSDP: each rank sees its shard) every rank stops together
        dist.all_reduce(n_bad)
    if n_bad.item():
        raise SystemExit(f"{path}: non-finite (NaN/Inf) weights in {bad[:5] or 'another rank'}; "
                         "the file is damaged: delete it (or restore it) to retrain")


def write_metrics(record):
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# the training loop, shared by stage 0 (LM pretraining, toy) and stage 3 (SARA)
def train_phase(phase, net, examples, total_steps, peak_lr, js_weight, anchor_table, ckpt_dir, phase_id):
    """Train `net` for total_steps optimizer steps on examples; js_weight: lambda_JS (0: the
    JS term is logged, never differentiated); anchor_table: {id: (L, E)}, "online" or None (no JS)."""
    core = net.module if hasattr(net, "module") else net
    optimizer = make_optimizer(net, optimizer_states, peak_lr, (beta1, beta2), weight_decay, fused=device_type == "cuda")
    start = 0
    if os.path.exists(ckpt_dir):
        try:
            saved_id = read_checkpoint_meta(ckpt_dir)["fingerprint"]
        except (CheckpointError, KeyError) as err:
            raise SystemExit(f"{ckpt_dir}: no run fingerprint ({err}); written by an older train.py? Use a new out_dir.")
        check_fingerprint(ckpt_dir, saved_id, phase_id)
        start = load_training_state(ckpt_dir, net, optimizer, rank=rank, sharded=sharded, device=device)
        check_finite_weights(net, ckpt_dir)
        log(f"{phase}: resumed from {ckpt_dir} at step {start}")
    if master and os.path.exists(metrics_path):  # steps after the checkpoint (all, if none) are redone: log them once
        rows = [json.loads(l) for l in open(metrics_path)]
        keep = [r for r in rows if r.get("phase") != phase or (start > 0 and r["step"] < start)]
        if len(keep) < len(rows):
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(metrics_path + ".tmp", metrics_path)
    lb_weight = lambda_lb if lambda_lb >= 0 else core.config.router_aux_loss_coef
    z_weight = core.config.router_z_loss_coef
    if start == 0 and anchor_table is not None and val_set:  # the "before" point of the JS curves
        evaluate(net, val_set, anchor_table, phase, -1)
    bar = tqdm(total=total_steps, initial=start, desc=phase, disable=not master, dynamic_ncols=True)
    t0, tokens_since_log, flops_since_log = time.time(), 0, 0
    for step, step_indices in step_batches(len(examples), total_steps, start, global_batch, micro_batch, seed):
        lr_now = lr_at(step, total_steps, peak_lr, warmup_frac, min_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        micro_batches = [[examples[i] for i in m] for m in step_indices]
        # L_JS over the whole step: the mean over ALL anchored samples of all micro-batches and
        # ranks, so a micro-batch without anchors does not dilute lambda_JS
        n_js = sum(e["has_anchor"] and (anchor_table == "online" or e["id"] in anchor_table)
                   for m in micro_batches for e in m) if anchor_table is not None else 0
        stats, seen = {}, hashlib.sha256()
        mine = micro_batches[rank::world]  # micro-batch j goes to rank j % world
        for j, micro in enumerate(mine):
            last = j == len(mine) - 1
            if ddp and parallel == "ddp":
                net.require_backward_grad_sync = last  # sync grads on the last micro-step only
            # FSDP2 reduce-scatters after EVERY micro-batch: skipping it keeps each rank's unsharded
            # fp32 gradient of the whole model until the last one (+N x 4 B per GPU: Qwen3 fp32 would
            # peak at 165 GiB instead of 66, memory.py), for 32 reduce-scatters a step instead of 1
            batch = {k: v.to(device, non_blocking=True) for k, v in collate(micro, tok.pad_id).items()}
            mask = batch["attention_mask"] if len(micro) > 1 else None  # one sequence: no padding, fused kernel
            with autocast:
                out = net(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
            # eq. 12: L = L_CE + lambda_LB * L_LB (+ router z-loss, ST-MoE) + lambda_JS * L_JS
            losses = dict(ce=out.loss, lb=out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device))
            total = losses["ce"] + lb_weight * losses["lb"] + (z_weight * out.z_loss if out.z_loss is not None else 0.0)
            if anchor_table is not None:
                target_dist = pool_routing(out.router_logits, mask, check=False)  # (B, L, E)
                table = anchor_table if anchor_table != "online" else build_anchors(
                    net, micro, pad_id=tok.pad_id, batch_size=len(micro), autocast=autocast, device=device)
                anchor_dist, has = lookup_anchors(table, micro, target_dist)
                with torch.set_grad_enabled(js_weight > 0):
                    js_sum = sara_loss(target_dist, anchor_dist, band, anchor_mask=has, check=False, reduction="sum")
                    # DDP/FSDP average gradients over ranks: scale by world so that the result is
                    # the sum over every rank's anchored samples divided by their number
                    losses["js"] = js_sum / (max(n_js, 1) / world)
                total = total + js_weight * losses["js"] * len(mine) if js_weight > 0 else total
            if step == inject_nan_at_iter:
                total = total * math.nan
            (total / len(mine)).backward()
            for k, v in losses.items():  # js is already the step's mean: summed, not averaged
                stats[k] = stats.get(k, 0.0) + v.detach() * (len(mine) if k == "js" else 1) / len(mine)
            stats["loss"] = stats.get("loss", 0.0) + total.detach() / len(mine)
            tokens_since_log += sum(len(e["input_ids"]) for e in micro) * world  # (rank 0's count times world)
            flops_since_log += sum(len(e["input_ids"]) * core.flops_per_token(len(e["input_ids"])) for e in micro) * world
            seen.update(" ".join(e["id"] for e in micro).encode())
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, already the global norm
            grad_norm = grad_norm.full_tensor()
        values = torch.stack([stats[k] for k in sorted(stats)] + [grad_norm.float().to(stats["loss"].device)])
        if ddp:
            dist.all_reduce(values)
            values /= world
        logged = dict(zip(sorted(stats) + ["grad_norm"], values.tolist()))  # one host sync per step
        if not (math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])):
            bar.close()  # stop BEFORE the optimizer step: the weights and checkpoints are untouched
            what = f"loss is {logged['loss']}" if not math.isfinite(logged["loss"]) else f"grad norm is {logged['grad_norm']}"
            raise SystemExit(f"{phase} step {step}: {what} -- stopping before the optimizer step; nothing was "
                             f"written, the last checkpoint ({ckpt_dir}) is the last good one. Lower lr or check the data.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{logged['loss']:.4f}", **({"js": f"{logged['js']:.4f}"} if "js" in logged else {}))
        if step % log_interval == 0 or step == total_steps - 1:
            dt = max(time.time() - t0, 1e-9)
            record = dict(phase=phase, step=step, lr=lr_now, **logged, tokens_per_s=tokens_since_log / dt,
                          batch=seen.hexdigest()[:12])  # which samples rank 0 saw, to compare runs
            if device_type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                record["mfu"] = flops_since_log / dt / (peak_tflops * 1e12)
            write_metrics(record)
            t0, tokens_since_log, flops_since_log = time.time(), 0, 0
        if (step + 1) % eval_interval == 0 or step == total_steps - 1:
            if anchor_table is not None and val_set:
                evaluate(net, val_set, anchor_table, phase, step)
        if (step + 1) % ckpt_interval == 0 or step == total_steps - 1:
            save_training_state(ckpt_dir, net, optimizer, step + 1, dict(fingerprint=phase_id, phase=phase),
                                rank=rank, world=world, sharded=sharded)
    bar.close()


# -----------------------------------------------------------------------------
# stage 0 (toy only): a brief LM pretraining on every language stands in for the released model
raw_model, full_weights = build_model()
log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(active=True) / 1e6:.2f}M active), "
    f"MoE layers {model_cfg.moe_layers}, device {device}, world {world}, grad accum {accum}")
if init_from == "scratch":
    base_path = os.path.join(out_dir, "base.pt")
    base_id = fingerprint(_shared_keys + ["model_config", "pretrain_iters", "pretrain_lr", "pretrain_target_fraction"])
    if not os.path.exists(base_path):
        # scarce targets: keep a fixed fraction of each target language's items (by group hash)
        keep = lambda s: s["lang"] not in train_langs or int(hashlib.sha256(
            f"{seed}:{s['id']}".encode()).hexdigest()[:8], 16) < pretrain_target_fraction * 16 ** 8
        pretrain_set, _ = tokenize_samples(tok, [s for s in train_samples if keep(s)], max_len, system_prompt or None)
        model = wrap(raw_model)
        train_phase("pretrain", model, pretrain_set, pretrain_iters, pretrain_lr, 0.0, None,
                    os.path.join(out_dir, "ckpt_pretrain"), base_id)
        weights = full_state_dict(model)  # collective under FSDP
        if master:
            save_base(base_path, weights, raw_model.config, fingerprint=base_id)
        if ddp:
            dist.barrier()
        del model
    try:
        raw_model, base_meta = load_base(base_path, router_clean_logits=router_clean_logits)
    except CheckpointError as err:
        raise SystemExit(str(err)) from None
    check_fingerprint(base_path, base_meta.get("fingerprint", {}), base_id)
    check_finite_weights(raw_model, base_path)
    raw_model.train()
    model_digest = file_digest([base_path])
else:
    model_digest = file_digest(glob.glob(os.path.join(init_from, "*.safetensors")) + [os.path.join(init_from, "config.json")])
model = wrap(raw_model, full_weights)
del full_weights

# -----------------------------------------------------------------------------
# stage 2: anchors from the ORIGINAL model (not yet fine-tuned), eval mode, no grad
anchors = None
if anchor_mode == "offline":
    t0 = time.time()
    try:
        anchors = load_or_build_anchors(
            os.path.join(out_dir, "anchors.pt"), model, train_set + val_set, pad_id=tok.pad_id, batch_size=micro_batch,
            fingerprint=anchor_fingerprint(model_digest, tok_digest, train_set + val_set), rank=rank, world=world,
            autocast=autocast, device=device, log=log)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    missing = sum(not e["has_anchor"] for e in train_set + val_set)
    log(f"anchors: {len(anchors)} ready in {time.time() - t0:.1f}s ({missing} samples have no anchor "
        f"and are left out of the JS term)")
elif anchor_mode == "online":
    anchors = "online"
if compile:
    model = torch.compile(model)

# -----------------------------------------------------------------------------
# stage 3: fine-tune
steps_per_epoch = max(1, len(train_set) // global_batch)
n_steps = epochs * steps_per_epoch
log(f"stage 3: {n_steps} steps ({epochs} epochs x {steps_per_epoch}), lambda_js={lambda_js}, "
    f"aligned decoder layers {band_layers}")
run_id = fingerprint(_shared_keys + ["anchor_lang", "lambda_js", "lambda_lb", "anchor_mode", "epochs", "lr", "router_clean_logits"],
                     model=model_digest, band=band_layers)
train_phase("sara" if lambda_js > 0 else "finetune", model, train_set, n_steps, lr, lambda_js, anchors,
            os.path.join(out_dir, "ckpt"), run_id)

if export_hf:
    full = full_state_dict(model)  # a collective under FSDP
    if master:
        hf_dir = os.path.join(out_dir, "hf")
        try:  # the tokenizer travels with the weights: sample.py, eval.py, transformers need only the directory
            save_hf_state(full, raw_model.config, hf_dir, copy_from=None if init_from == "scratch" else init_from)
            save_hf_tokenizer(tok, hf_dir, model_max_length=raw_model.config.max_position_embeddings)
            log(f"exported the fine-tuned model to {hf_dir} (Hugging Face layout)")
        except (ImportError, ValueError) as err:
            log(f"HF export incomplete: {err}")
log(f"done in {time.time() - _run_start:.0f} s wall ({world} process(es), {torch.get_num_threads()} threads each)")
if ddp:
    dist.destroy_process_group()
