"""
The training loop of train.py, importable (nothing runs on import): train.py's stage 0 (LM
pretraining, toy) and stage 3 (fine-tuning with an alignment method) and the experiments call
train_phase, which assembles each step's loss with step_loss.step_loss (eq. 12).

    run = Run(s, dist, pad_id, metrics_path)              # what every phase of a run shares
    net = wrap(model, run, vocab_size)                     # DDP, or FSDP2 with one shard group per block
    records = train_phase(run, "sara", net, train_set, n_steps, s.lr, method, ckpt_dir, run_id, val_set)

Everything a phase needs comes in as an argument: the settings object (settings.TrainSettings), the
process layout (Dist), the data, the method component (methods/, or None: plain LM loss, no evaluation)
and the paths. metrics.jsonl starts with a header row (platform_info) per invocation; read_metrics skips it.
"""
import hashlib
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from anchors import forward_and_pool
from checkpoint import CheckpointError, all_finite
from data.parallel import collate, step_batches
from jsonl import JsonlError, append_jsonl, read_jsonl
from optim import lr_at, make_optimizer
from step_loss import step_loss
from training_state import check_fingerprint, load_training_state, read_checkpoint_meta, save_training_state


@dataclass
class Dist:
    """The process layout: ddp (under torchrun), this process's rank, the world size, its device."""
    ddp: bool = False
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    parallel: str = "ddp"  # "ddp" or "fsdp"

    @property
    def master(self):
        return self.rank == 0

    @property
    def sharded(self):
        return self.ddp and self.parallel == "fsdp"

    @property
    def device_type(self):
        return "cuda" if "cuda" in self.device else "cpu"


@dataclass
class Run:
    """What every phase of one run shares. metrics_path None: no metrics file (the records are
    returned by train_phase all the same). quiet: no progress bar, no log lines."""
    s: object  # settings.TrainSettings (or any object with its attributes)
    dist: Dist
    pad_id: int
    metrics_path: str = None
    quiet: bool = False
    autocast: object = field(default=None)

    def __post_init__(self):
        if self.autocast is None:  # bf16 autocast over fp32 parameters; bf16_sr parameters are bf16 already
            bf16 = self.s.dtype == "bfloat16" and self.s.optimizer_states == "fp32"
            self.autocast = torch.autocast(self.dist.device_type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def log(self, msg):
        if self.dist.master and not self.quiet:
            tqdm.write(msg)

    def write_metrics(self, record):
        if self.dist.master and self.metrics_path:
            try:  # a failed append (a full disk) is cut back: the file still ends on a whole record
                append_jsonl(self.metrics_path, [record])
            except OSError as err:
                raise SystemExit(f"{self.metrics_path}: could not append a metrics row ({err.strerror}); the "
                                 "file is intact and the last checkpoint is kept: free disk space and rerun to resume") from None


def param_dtype(s):
    return torch.bfloat16 if s.optimizer_states == "bf16_sr" else torch.float32


def read_metrics(path):
    """The records of a metrics.jsonl, header rows left out (a torn last line, from a crash, too)."""
    return [r for _, r in read_jsonl(path, torn_tail_ok=True) if "header" not in r]


# -----------------------------------------------------------------------------
# the model: wrapping for DDP / FSDP2, full weights, the finite-weights guard

def fsdp_shard(net, compute_dtype=None, cpu_offload=False, mesh=None):
    """FSDP2 as train.py runs it: fully_shard per decoder block, then the root; compute in
    compute_dtype (None: the parameters' own), gradients reduced in fp32. memory.py measures this."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    kw = dict(mp_policy=mp, **(dict(offload_policy=CPUOffloadPolicy()) if cpu_offload else {}),
              **(dict(mesh=mesh) if mesh is not None else {}))
    for block in net.layers:
        fully_shard(block, **kw)
    fully_shard(net, **kw)
    return net


def wrap(net, run, vocab_size, weights_on_rank0=None):
    """DDP, or FSDP2 with one shard group per block; returns the module to call. weights_on_rank0:
    the full weights of a model built on the meta device (FSDP), broadcast into the shards."""
    s, d = run.s, run.dist
    net.config.gradient_checkpointing = s.gradient_checkpointing
    net.config.loss_chunk_size = s.loss_chunk_size
    if vocab_size > net.config.vocab_size:
        raise SystemExit(f"tokenizer has {vocab_size} tokens but the model's vocab_size is {net.config.vocab_size}")
    if weights_on_rank0 is None:  # (a meta model is materialised after sharding, below)
        net = net.to(device=d.device if not s.cpu_offload else "cpu", dtype=param_dtype(s))
    if not d.ddp:
        return net
    if s.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        fsdp_shard(net, torch.bfloat16 if s.dtype == "bfloat16" else None, s.cpu_offload)
        if weights_on_rank0 is not None:  # meta model: allocate the shards, fill them from rank 0
            net.to_empty(device="cpu" if s.cpu_offload else d.device)
            set_model_state_dict(net, weights_on_rank0, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(net, device_ids=[int(d.device.split(":")[1])] if d.device_type == "cuda" else None)


def full_state_dict(net):
    """Unsharded weights on CPU (rank 0 gets them under FSDP; a collective: call on all ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_finite_weights(net, path, run):
    """A NaN/Inf weight read from a file is an error naming the file and tensors (unchecked, an unused
    embedding row trains on silently into the export; a used one stops the run blaming lr)."""
    bad = [n for n, p in net.named_parameters() if not all_finite(p.to_local() if hasattr(p, "to_local") else p)]
    n_bad = torch.tensor(float(len(bad)), device=run.dist.device)
    if run.dist.ddp:  # (FSDP: each rank sees its shard) every rank stops together
        dist.all_reduce(n_bad)
    if n_bad.item():
        raise SystemExit(f"{path}: non-finite (NaN/Inf) weights in {bad[:5] or 'another rank'}; "
                         "the file is damaged: delete it (or restore it) to retrain")


# -----------------------------------------------------------------------------
# evaluation and the loop

def held_out_ce(pooled, batch_size):
    """The held-out CE of forward_and_pool's output (nll, n_targets per sequence): the mean over micro-batches
    of batch_size sequences of their token-mean CE, weighted by the micro-batch's size. compare.py reports
    the same number for every row, and checks it against this loop's."""
    n = len(pooled.nll)
    ce = sum(pooled.nll[i:i + batch_size].sum().item() / pooled.n_targets[i:i + batch_size].sum().item()
             * len(pooled.nll[i:i + batch_size]) for i in range(0, n, batch_size))
    return ce / max(n, 1)


@torch.no_grad()
def evaluate(run, net, examples, method, phase, step):
    """Held-out CE (mean over micro-batches of their token-mean CE, weighted by size) and the method's
    own measures (SARA: JS between anchor and target routing); logged and written to metrics.jsonl
    (step -1: before fine-tuning). -> the record."""
    mb = run.s.micro_batch
    out = forward_and_pool(net, [e["input_ids"] for e in examples], labels=[e["labels"] for e in examples],
                           pad_id=run.pad_id, batch_size=mb, autocast=run.autocast, device=run.dist.device,
                           before_batch=lambda rows: method.set_rows([e.get("lang") for e in examples[rows]]))
    res = dict(val_ce=held_out_ce(out, mb))
    res.update(method.evaluate(net, examples, out, run))
    run.log(f"{phase} {'before fine-tuning' if step < 0 else f'step {step}'}: val CE {res['val_ce']:.4f}"
            + method.describe(res))
    record = dict(phase=phase, step=step, **res)
    run.write_metrics(record)
    return record


def resume(run, phase, net, optimizer, ckpt_dir, phase_id, method=None):
    """-> the step to start from: 0, or that of ckpt_dir (checked to belong to this run; the method's
    state, e.g. ShifCon's language vectors, restored from it). metrics.jsonl keeps this phase's rows
    before that step only: the steps after it are redone and logged again."""
    start = 0
    if ckpt_dir and os.path.exists(ckpt_dir):
        try:  # (a CheckpointError names the damaged file and the fix: no traceback, no second guess)
            saved_meta = read_checkpoint_meta(ckpt_dir)
            saved_id = saved_meta["fingerprint"]
        except CheckpointError as err:
            raise SystemExit(str(err)) from None
        except KeyError as err:
            raise SystemExit(f"{ckpt_dir}: no run fingerprint ({err}); written by an older train.py? Use a new out_dir.")
        check_fingerprint(ckpt_dir, saved_id, phase_id)
        try:
            start = load_training_state(ckpt_dir, net, optimizer, rank=run.dist.rank, sharded=run.dist.sharded,
                                        device=run.dist.device)
        except CheckpointError as err:
            raise SystemExit(str(err)) from None
        check_finite_weights(net, ckpt_dir, run)
        if method is not None:
            try:
                method.load_state_dict(saved_meta.get("method_state"))
            except (KeyError, ValueError, TypeError) as err:
                raise SystemExit(f"{ckpt_dir}: the method's saved state does not load ({err}); use a new out_dir") from None
        run.log(f"{phase}: resumed from {ckpt_dir} at step {start}")
    path = run.metrics_path
    if run.dist.master and path and os.path.exists(path):
        try:  # (a torn last line, from a crash or a full disk mid-append, is dropped: it was never whole)
            rows = [r for _, r in read_jsonl(path, torn_tail_ok=True)]
        except JsonlError as err:  # damaged inside: not ours to repair silently
            raise SystemExit(f"{err}; metrics.jsonl is damaged: repair or delete that line (or move the file "
                             "away) and rerun") from None
        keep = [r for r in rows if r.get("phase") != phase or (start > 0 and r["step"] < start)]
        if len(keep) < len(rows):
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            try:
                append_jsonl(path + ".tmp", keep)
            except OSError as err:  # (a full disk) metrics.jsonl itself is untouched
                if os.path.exists(path + ".tmp"):
                    os.remove(path + ".tmp")
                raise SystemExit(f"{path}: could not rewrite it without the steps to redo ({err.strerror}); "
                                 "it is unchanged: free disk space and rerun") from None
            os.replace(path + ".tmp", path)
    return start


def micro_steps(run, net, micro_batches, method, weights, poison):
    """Forward and backward of this rank's share of one step's micro-batches (micro-batch j goes to rank
    j % world). -> (stats {name: 0-dim tensor, summed over the micro-batches}, tokens, flops, digest)."""
    d, core = run.dist, net.module if hasattr(net, "module") else net
    if method is not None:
        method.begin_step(micro_batches, run)
    stats, seen, tokens, flops = {}, hashlib.sha256(), 0, 0
    mine = micro_batches[d.rank::d.world]
    for j, micro in enumerate(mine):
        if d.ddp and run.s.parallel == "ddp":
            net.require_backward_grad_sync = j == len(mine) - 1  # sync grads on the last micro-step only
        # FSDP2 reduce-scatters after EVERY micro-batch: skipping it keeps each rank's unsharded
        # fp32 gradient of the whole model until the last one (+N x 4 B per GPU: Qwen3 fp32 would
        # peak at 165 GiB instead of 66, memory.py), for 32 reduce-scatters a step instead of 1
        # a method may append rows to the micro-batch (live_kl: the English sources, in the SAME forward:
        # two forwards of a DDP module before one backward break DDP's reducer); appended rows carry
        # labels -100, so L_CE is over the micro-batch's own rows only; out.* rows [len(micro):] are theirs
        extra = method.extend_batch(micro) if method is not None else []
        if method is not None:  # (ShifCon shifts each row by its language; an appended row is never shifted)
            method.set_rows([e.get("lang") for e in micro] + [None] * len(extra))
        batch = {k: v.to(d.device, non_blocking=True) for k, v in collate(micro + extra, run.pad_id).items()}
        batch["examples"] = micro
        batch["mask"] = batch["attention_mask"] if len(micro) + len(extra) > 1 else None  # one sequence: no padding, fused kernel
        with run.autocast:
            out = net(batch["input_ids"], attention_mask=batch["mask"], labels=batch["labels"])
        terms = method.loss(out, batch, net, run) if method is not None else {}
        loss, logged = step_loss(out, terms, n_micro=len(mine), poison=poison, **weights)
        loss.backward()
        for k, v in logged.items():
            stats[k] = stats.get(k, 0.0) + v
        tokens += sum(len(e["input_ids"]) for e in micro) * d.world  # (rank 0's count times world)
        flops += sum(len(e["input_ids"]) * core.flops_per_token(len(e["input_ids"])) for e in micro + extra) * d.world
        seen.update(" ".join(e["id"] for e in micro).encode())
    return stats, tokens, flops, seen


def train_phase(run, phase, net, examples, total_steps, peak_lr, method, ckpt_dir, phase_id, val_set=(),
                schedule=None):
    """Train `net` for total_steps optimizer steps on examples (dicts with input_ids, labels, id) with
    the eq. 12 loss; method: a component of methods/ (its terms join the loss; with weight 0 they are
    logged, never differentiated) or None. ckpt_dir None: no checkpoints, no resume. schedule: an
    iterator of (step, [micro-batch index lists]) instead of data.parallel.step_batches (experiments
    that fix their own batches). -> the step records written to metrics.jsonl."""
    s, d = run.s, run.dist
    core = net.module if hasattr(net, "module") else net
    optimizer = make_optimizer(net, s.optimizer_states, peak_lr, (s.beta1, s.beta2), s.weight_decay,
                               fused=d.device_type == "cuda")
    start = resume(run, phase, net, optimizer, ckpt_dir, phase_id, method)
    weights = dict(lb_weight=s.lambda_lb if s.lambda_lb >= 0 else core.config.router_aux_loss_coef,
                   z_weight=core.config.router_z_loss_coef, ce_weight=method.ce_weight if method is not None else 1.0)
    if start == 0 and method is not None and val_set:  # the "before" point of the method's curves
        evaluate(run, net, val_set, method, phase, -1)
    bar = tqdm(total=total_steps, initial=start, desc=phase, disable=not d.master or run.quiet, dynamic_ncols=True)
    t0, tokens, flops, records = time.time(), 0, 0, []
    schedule = schedule or step_batches(len(examples), total_steps, start, s.global_batch, s.micro_batch, s.seed)
    for step, step_indices in schedule:
        lr_now = lr_at(step, total_steps, peak_lr, s.warmup_frac, s.min_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        micro_batches = [[examples[i] for i in m] for m in step_indices]
        stats, n_tok, n_flops, seen = micro_steps(run, net, micro_batches, method, weights, step == s.inject_nan_at_iter)
        if method is not None:  # after the step's last backward (ShifCon: the language vectors take the step's means)
            method.end_step(run)
        tokens, flops = tokens + n_tok, flops + n_flops
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), s.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, already the global norm
            grad_norm = grad_norm.full_tensor()
        values = torch.stack([stats[k] for k in sorted(stats)] + [grad_norm.float().to(stats["loss"].device)])
        if d.ddp:
            dist.all_reduce(values)
            values /= d.world
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
        if step % s.log_interval == 0 or step == total_steps - 1:
            dt = max(time.time() - t0, 1e-9)
            record = dict(phase=phase, step=step, lr=lr_now, **logged, tokens_per_s=tokens / dt,
                          batch=seen.hexdigest()[:12])  # which samples rank 0 saw, to compare runs
            if d.device_type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(d.device) / 2 ** 30
                record["mfu"] = flops / dt / (s.peak_tflops * 1e12)
            run.write_metrics(record)
            records.append(record)
            t0, tokens, flops = time.time(), 0, 0
        if ((step + 1) % s.eval_interval == 0 or step == total_steps - 1) and method is not None and val_set:
            evaluate(run, net, val_set, method, phase, step)
        if ckpt_dir and ((step + 1) % s.ckpt_interval == 0 or step == total_steps - 1):
            try:  # (a full disk: the message names the step and the checkpoint still kept)
                meta = dict(fingerprint=phase_id, phase=phase)
                if method is not None and method.state_dict() is not None:
                    meta["method_state"] = method.state_dict()  # (JSON: ShifCon's language vectors)
                save_training_state(ckpt_dir, net, optimizer, step + 1, meta, rank=d.rank, world=d.world, sharded=d.sharded)
            except CheckpointError as err:
                bar.close()
                raise SystemExit(str(err)) from None
    bar.close()
    return records
