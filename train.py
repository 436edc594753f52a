"""
SARA fine-tuning (Dong et al., Findings of ACL 2026), from a CPU toy run to torchrun on many GPUs.

    python train.py                                   # the toy experiment, CPU, a few minutes
    python train.py configs/toy.py --lambda_js=0.0    # the same run without the SARA term
    torchrun --nproc_per_node 8 train.py configs/phi35.py --init_from=DIR --data_path=FILE
    python train.py --help                            # every setting, its default and what it means

The paper's three stages (docs/method.md):
  1. data: parallel samples, target language + its anchor (English) -- data/parallel.py
  2. anchors: one offline pass of the ORIGINAL model, eval mode, no grad, over the anchor
     samples -> pooled routing distribution per sample per MoE layer, cached -- methods/sara.py
  3. fine-tune: L = L_CE + lambda_LB * L_LB + lambda_JS * L_JS (JS over the layer band) -- loop.py
A toy run that starts from scratch has no "original model": stage 0 first pretrains one briefly
on all languages (LM loss only), and that model plays the released checkpoint.

Settings are settings.TrainSettings; config files and --key=value overrides replace them
(configurator.py), and every value is checked before any data or model is loaded. lambda_js=0 is
exactly plain fine-tuning: same data order, same everything, only the loss term differs.
A run is identified by a fingerprint of everything that decides its trajectory (data digest,
tokenizer, model, settings); a checkpoint of another run is never resumed (checkpoint.py).
init_from: "scratch", a Hugging Face checkpoint directory or a toy base.pt; a checkpoint is fine-tuned
with its own tokenizer (a base.pt: the one whose fingerprint it recorded), and a tokenizer_path that
is not that one is an error. One run per out_dir at a time (dirlock.py; a killed run's lock is taken
over). Ctrl-C, SIGTERM, a damaged file or a full disk end the run with one line naming what is kept.
"""
import atexit
import glob
import hashlib
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import dirlock
from checkpoint import _read_json, CheckpointError, file_digest, load_base, load_model, save_base, save_hf_state
from configurator import ConfigError
from data.parallel import load_parallel_jsonl, split_train_val, tokenize_samples, with_anchor_lang
from hf_config import config_from_hf
from loop import Dist, Run, check_finite_weights, full_state_dict, param_dtype, train_phase, wrap
from methods import controls, live_kl, sara, shifcon
from model import MoEConfig, MoETransformer
from provenance import platform_info
from settings import TOY_TOKENIZER, TrainSettings
from tokenizer import load_tokenizer, save_hf_tokenizer, toy_chat_format
from training_state import check_fingerprint, recover_checkpoint

# -----------------------------------------------------------------------------
# settings: the toy experiment's defaults (settings.py), config files, --key=value; all checked
_run_start = time.time()
s, sources = TrainSettings.from_argv(sys.argv[1:], doc=__doc__)
# the model's shape is known before any weight is read: check the band and max_len against it
from_base_pt = s.init_from != "scratch" and s.init_from.endswith(".pt")  # a toy base.pt (issue 21)
try:
    if s.init_from == "scratch":
        model_cfg = MoEConfig(**{**s.model_config, "router_clean_logits": s.router_clean_logits})
    elif from_base_pt:  # (a toy-sized file: reading it whole to learn its config costs nothing)
        _base_model, base_pt_meta = load_base(s.init_from)
        model_cfg = _base_model.config
        del _base_model
        model_cfg.router_clean_logits = s.router_clean_logits
    elif os.path.isfile(s.init_from):  # (a missing one is named by its config.json below)
        raise ValueError(f"{s.init_from} is a file: expected a checkpoint directory (config.json, *.safetensors) "
                         "or a base.pt")
    else:
        model_cfg = config_from_hf(_read_json(os.path.join(s.init_from, "config.json")))  # names the file if not JSON
        model_cfg.router_clean_logits = s.router_clean_logits
except (OSError, ValueError, TypeError) as err:  # (CheckpointError and JSON errors are ValueErrors)
    _key = "model_config" if s.init_from == "scratch" else "init_from"
    raise ConfigError(f"{_key} ({sources[_key]}): {err}") from None
band_layers, band = sara.band_positions(s, sources, model_cfg.moe_layers)  # band: positions in out.router_logits
shifcon_positions = None
if s.method == "shifcon":  # the shift's residual positions must exist in this model (l_b - 1 is a decoder layer)
    if not s.shifcon_positions and sorted(band_layers) != list(range(min(band_layers), max(band_layers) + 1)):
        raise ConfigError(f"sara_layer_list={s.sara_layer_list!r} ({sources['sara_layer_list']}): ShifCon shifts a contiguous "
                          "run of layers; its default positions come from a contiguous band: set shifcon_positions=(l_f, l_b)")
    shifcon_positions = tuple(s.shifcon_positions) or shifcon.default_positions(band_layers)
    if shifcon_positions[1] > model_cfg.n_layers:
        _key = "shifcon_positions" if s.shifcon_positions else ("sara_layer_list" if s.sara_layer_list else "sara_band")
        raise ConfigError(f"{_key}={getattr(s, _key)!r} ({sources[_key]}): ShifCon's positions (l_f, l_b) = {shifcon_positions} "
                          f"need l_b <= n_layers = {model_cfg.n_layers} (the shift back happens before layer l_b - 1); "
                          "set shifcon_positions=(l_f, l_b) or a band that ends before the last layer")
if s.init_from != "scratch" and shifcon.find_vectors(s.init_from):  # its layers expect the shift: never silently dropped
    raise ConfigError(f"init_from={s.init_from!r} ({sources['init_from']}) holds ShifCon language vectors ({shifcon.VECTORS_FILE}): "
                      "a ShifCon model runs with its shift, and fine-tuning it further is not supported; start from its original model")
if s.anchor_shuffle and (s.method != "sara" or s.anchor_mode != "offline"):
    raise ConfigError(f"anchor_shuffle=True ({sources['anchor_shuffle']}) is a control of SARA's stored anchors: it needs "
                      f"method='sara' and anchor_mode='offline' (got {s.method!r}, {s.anchor_mode!r})")
if s.max_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"max_len={s.max_len} ({sources['max_len']}) exceeds the model's context "
                      f"max_position_embeddings={model_cfg.max_position_embeddings}")

# -----------------------------------------------------------------------------
# distributed setup
ddp = int(os.environ.get("RANK", -1)) != -1
device = s.device
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
elif device == "cuda" and not torch.cuda.is_available():
    raise ConfigError(f"device='cuda' ({sources['device']}): no CUDA device is available here (use 'cpu' or 'auto')")
rank, world = 0, 1
if ddp:
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
if s.global_batch % (s.micro_batch * world):
    raise ConfigError(f"global_batch={s.global_batch} ({sources['global_batch']}) must be a multiple of "
                      f"micro_batch * world = {s.micro_batch} * {world}")
accum = s.global_batch // (s.micro_batch * world)
torch.manual_seed(s.seed + rank)
layout = Dist(ddp=ddp, rank=rank, world=world, device=device, parallel=s.parallel)
if layout.master:
    try:
        os.makedirs(s.out_dir, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out_dir={s.out_dir!r} ({sources['out_dir']}): cannot be created ({err.strerror})") from None
    # one run per out_dir (two would interleave metrics and delete each other's checkpoint files); held until exit
    _out_dir_lock = dirlock.acquire(s.out_dir, "train.py run", log=tqdm.write)
    atexit.register(dirlock.release, _out_dir_lock)  # (an exit of any kind but a kill; the kernel drops it then)
    for ckpt in ("ckpt_pretrain", "ckpt"):  # finish or undo a commit a crash interrupted
        try:
            for note in recover_checkpoint(os.path.join(s.out_dir, ckpt)):
                tqdm.write(f"checkpoint recovery: {note}")
        except CheckpointError as err:  # a damaged or missing COMPLETE marker: names the file and the fix
            raise SystemExit(str(err)) from None
if ddp:
    dist.barrier()  # nobody reads a checkpoint before rank 0 has repaired it


def _interrupted(signum, frame):  # Ctrl-C or a scheduler's SIGTERM: one line, the lock released, nothing half-committed
    raise SystemExit(f"interrupted ({signal.Signals(signum).name}): the last complete checkpoint in {s.out_dir} is kept; "
                     "rerun the same command to resume from it")


if not ddp:  # (under torchrun the agent tears the ranks down with SIGTERM, then SIGKILL: a rank blocked in a
    # collective would not run a Python handler, and the teardown would wait for the agent's timeout)
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)

# -----------------------------------------------------------------------------
# data (stage 1 happens upstream: the JSONL holds the translated, filtered samples)
# the tokenizer: a checkpoint's own unless another is named, and a named one must be the one it was trained with
_key = "tokenizer_path" if s.tokenizer_path else "init_from"
own_tok = None  # (the checkpoint's own tokenizer in words, its fingerprint, what to do) where it is known
try:
    if s.init_from == "scratch" or from_base_pt:  # a base.pt carries no tokenizer, only its fingerprint
        tok_path = s.tokenizer_path or TOY_TOKENIZER
        _fp = base_pt_meta.get("fingerprint", {}).get("tokenizer") if from_base_pt else None
        own_tok = (f"the tokenizer {s.init_from} was trained with", _fp, "pass that one") if _fp else None
    else:
        tok_path = s.tokenizer_path or s.init_from
        if glob.glob(os.path.join(s.init_from, "tokenizer.json")) or glob.glob(os.path.join(s.init_from, "*.tiktoken")):
            own_tok = (f"{s.init_from}'s own", load_tokenizer(s.init_from).fingerprint(),
                       "leave tokenizer_path empty to use it")
        elif not s.tokenizer_path:
            raise ValueError(f"{s.init_from} has no tokenizer (tokenizer.json): pass tokenizer_path= the one it was "
                             "trained with")
    # the toy BPE chats in the format of the family its model is (its export must carry that family's format)
    tok = load_tokenizer(tok_path, chat_format=toy_chat_format(model_cfg) if str(tok_path).endswith(".tiktoken") else None)
except (OSError, ValueError) as err:
    raise ConfigError(f"{_key} ({sources[_key]}): {err}") from None
if own_tok and tok.fingerprint() != own_tok[1]:  # another vocabulary or chat format: the model would read noise
    raise ConfigError(f"tokenizer_path={s.tokenizer_path or TOY_TOKENIZER!r} ({sources['tokenizer_path']}): tokenizer "
                      f"{tok.fingerprint()} is not {own_tok[0]} ({own_tok[1]}): {own_tok[2]}")
if tok.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"tokenizer_path={tok_path!r} ({sources['tokenizer_path']}): its {tok.vocab_size} tokens do not "
                      f"fit the model ({s.init_from if s.init_from != 'scratch' else 'model_config'}: vocab_size "
                      f"{model_cfg.vocab_size})")
run = Run(s, layout, tok.pad_id, os.path.join(s.out_dir, "metrics.jsonl"))
log = run.log
try:
    samples = load_parallel_jsonl(s.data_path)
except (OSError, ValueError) as err:
    raise SystemExit(f"data_path: {err}") from None
present = sorted({x["lang"] for x in samples})
absent = [l for l in s.train_langs if l not in present]
_case = [p for p in present if p not in s.train_langs and p.lower() in {l.lower() for l in s.train_langs}]
if absent or _case:  # codes are matched exactly: "SW" is not "sw", and rows spelled so are never dropped silently
    raise ConfigError(f"train_langs ({sources['train_langs']}): " + (f"{absent} not in {s.data_path}; " if absent else "")
                      + f"its languages are {present}" + (f" (codes are case-sensitive: the data spells {_case})" if _case else ""))
_case = {x["id"]: x["anchor_lang"] for x in samples if x["anchor_lang"] != s.anchor_lang
         and x["anchor_lang"].lower() == s.anchor_lang.lower()}
if _case:  # "EN" for "en" would drop those rows' anchors (and re-anchor every row) without a word
    raise ConfigError(f"anchor_lang={s.anchor_lang!r} ({sources['anchor_lang']}): {len(_case)} rows of {s.data_path} spell "
                      f"it {sorted(set(_case.values()))} (e.g. id {next(iter(_case))!r}); codes are case-sensitive")
if any(x["anchor_lang"] != s.anchor_lang for x in samples):  # e.g. the paper's zh-anchor track
    # items with no row in that language: no anchor; rows already anchored in it keep their anchor
    samples = [x if x["anchor_lang"] == s.anchor_lang else r for x, r in zip(samples, with_anchor_lang(samples, s.anchor_lang))]
train_samples, val_samples = split_train_val(samples, s.val_fraction, seed=0)
targets = [x for x in train_samples if x["lang"] in s.train_langs]
train_set, train_stats = tokenize_samples(tok, targets, s.max_len, s.system_prompt or None)
val_set, _ = tokenize_samples(tok, [x for x in val_samples if x["lang"] in s.train_langs], s.max_len, s.system_prompt or None)
_empty = [l for l in s.train_langs if not any(e["lang"] == l for e in train_set)]
if _empty:  # a requested language is never dropped silently: all its items in val, or every prompt too long
    raise ConfigError(f"train_langs ({sources['train_langs']}): no training sample of {_empty} is left (max_len={s.max_len} "
                      f"({sources['max_len']}): every prompt fills it, or val_fraction={s.val_fraction} took every item)")
log(f"data: {len(train_set)} train / {len(val_set)} val samples in {s.train_langs}; {train_stats}")
if s.global_batch > len(train_set):
    log(f"warning: global_batch={s.global_batch} is more than the {len(train_set)} training samples: every step "
        f"repeats samples (wrap-around); lower global_batch for one pass per step")
if train_stats["truncated"]:
    log(f"warning: {train_stats['truncated']} of {len(train_set)} training responses are cut at max_len={s.max_len} "
        "(the end of the response, e.g. a final \\boxed{} answer, is not trained on); raise max_len if that matters")
sara.check_anchors(s, train_set)
data_digest, tok_digest = file_digest([s.data_path]), tok.fingerprint()
# the settings that decide a phase's trajectory (the others, e.g. micro_batch or log_interval, may change)
_shared_keys = ["train_langs", "val_fraction", "max_len", "system_prompt", "global_batch", "warmup_frac",
                "min_lr_frac", "weight_decay", "beta1", "beta2", "grad_clip", "optimizer_states", "dtype", "seed"]


def fingerprint(keys, **extra):
    """What decides a phase's trajectory: the data, the tokenizer, the given settings (as JSON)."""
    values = s.to_dict()
    return json.loads(json.dumps(dict(data=data_digest, tokenizer=tok_digest, **extra, **{k: values[k] for k in keys})))


# -----------------------------------------------------------------------------
# model
def build_model():
    """-> (model, full_weights). Under FSDP a 30-42B model must not be materialised once per
    GPU: the model is built on the meta device, rank 0 alone reads the checkpoint into host
    memory (full_weights), and wrap() shards it and broadcasts the weights into the shards."""
    if s.init_from == "scratch":
        torch.manual_seed(s.seed)  # identical initial weights on every rank
        return MoETransformer(model_cfg), None
    if layout.sharded:
        with torch.device("meta"):
            meta_model = MoETransformer(model_cfg)
        full = load_model(s.init_from, dtype=param_dtype(s)).state_dict() if layout.master else {}
        return meta_model.to(dtype=param_dtype(s)), full
    return load_model(s.init_from, dtype=param_dtype(s), device="cpu" if s.cpu_offload else device,
                      router_clean_logits=s.router_clean_logits).train(), None


# one header row per invocation: where the numbers below it were made
run.write_metrics(dict(header=True, platform=platform_info(device), argv=sys.argv[1:], settings=s.to_dict()))
try:
    raw_model, full_weights = build_model()
except CheckpointError as err:  # a damaged shard or NaN weights in init_from: named, with the fix
    raise SystemExit(str(err)) from None
log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(active=True) / 1e6:.2f}M active), "
    f"MoE layers {model_cfg.moe_layers}, device {device}, world {world}, grad accum {accum}")

# -----------------------------------------------------------------------------
# stage 0 (toy only): a brief LM pretraining on every language stands in for the released model
if s.init_from == "scratch":
    base_path = os.path.join(s.out_dir, "base.pt")
    base_id = fingerprint(_shared_keys + ["model_config", "pretrain_iters", "pretrain_lr", "pretrain_target_fraction"])
    if not os.path.exists(base_path):
        # scarce targets: keep a fixed fraction of each target language's items (by group hash)
        keep = lambda x: x["lang"] not in s.train_langs or int(hashlib.sha256(
            f"{s.seed}:{x['id']}".encode()).hexdigest()[:8], 16) < s.pretrain_target_fraction * 16 ** 8
        pretrain_set, _ = tokenize_samples(tok, [x for x in train_samples if keep(x)], s.max_len, s.system_prompt or None)
        model = wrap(raw_model, run, tok.vocab_size)
        train_phase(run, "pretrain", model, pretrain_set, s.pretrain_iters, s.pretrain_lr, None,
                    os.path.join(s.out_dir, "ckpt_pretrain"), base_id)
        weights = full_state_dict(model)  # collective under FSDP
        if layout.master:
            save_base(base_path, weights, raw_model.config, fingerprint=base_id)
        if ddp:
            dist.barrier()
        del model
    try:
        raw_model, base_meta = load_base(base_path, router_clean_logits=s.router_clean_logits)
    except CheckpointError as err:
        raise SystemExit(str(err)) from None
    check_fingerprint(base_path, base_meta.get("fingerprint", {}), base_id)
    check_finite_weights(raw_model, base_path, run)
    raw_model.train()
    model_digest = file_digest([base_path])
elif from_base_pt:
    model_digest = file_digest([s.init_from])
else:
    model_digest = file_digest(glob.glob(os.path.join(s.init_from, "*.safetensors")) + [os.path.join(s.init_from, "config.json")])
# what the method and the controls leave untrained, frozen BEFORE wrapping (DDP registers the trainable parameters)
_frozen = controls.frozen_router_names(raw_model) if s.freeze_routers else []
if s.method == "live_kl":
    _trainable = set(live_kl.trainable_parameter_names(raw_model, s.live_kl_freeze, max(band_layers)))
    _frozen += [n for n, _ in raw_model.named_parameters() if n not in _trainable]
if _frozen:
    log(f"frozen: {controls.freeze(raw_model, _frozen)} parameter tensors (freeze_routers={s.freeze_routers}"
        + (f", live_kl_freeze={s.live_kl_freeze!r}" if s.method == "live_kl" else "") + ")")
model = wrap(raw_model, run, tok.vocab_size, full_weights)
del full_weights

# -----------------------------------------------------------------------------
# stage 2: what the method precomputes from the ORIGINAL model (SARA: the anchors), before fine-tuning
t0 = time.time()
if s.method == "sara":  # (settings.METHODS: one branch per method of methods/)
    method = sara.Sara.prepare(run, model, train_set + val_set, band, os.path.join(s.out_dir, "anchors.pt"),
                               model_digest, tok_digest)
    if s.anchor_shuffle:  # control (b): every training row anchored on another item's anchor
        method.anchors = controls.shuffled_anchors(method.anchors, train_set, s.seed)
elif s.method == "live_kl":
    method = live_kl.LiveKL.prepare(run, band)
elif s.method == "shifcon":  # the language vectors' start: the original model over the training pairs
    method = shifcon.ShifCon.prepare(run, model, train_set, band, shifcon_positions)
    log(f"shifcon: shift at residual positions {shifcon_positions} (layers {shifcon_positions[0] - 1}.."
        f"{shifcon_positions[1] - 2} run shifted), vectors of {method.hook.vectors.languages()} in {time.time() - t0:.1f}s")
if s.method == "sara" and s.anchor_mode == "offline":
    missing = sum(not e["has_anchor"] for e in train_set + val_set)
    log(f"anchors: {len(method.anchors)} ready in {time.time() - t0:.1f}s ({missing} samples have no anchor "
        f"and are left out of the JS term)")
if s.compile:
    model = torch.compile(model)

# -----------------------------------------------------------------------------
# stage 3: fine-tune
steps_per_epoch = max(1, len(train_set) // s.global_batch)
n_steps = s.epochs * steps_per_epoch
log(f"stage 3: {n_steps} steps ({s.epochs} epochs x {steps_per_epoch}), method={s.method!r}" + (f", lambda_js={s.lambda_js}" if s.method == "sara" else "") + ", "
    f"aligned decoder layers {band_layers}")
# (method "sara" is left out of the fingerprint: checkpoints written before the setting existed still resume)
# (settings added later enter only when set, so that older checkpoints still resume)
_later = dict(method="sara", live_kl_alpha=0.1, live_kl_freeze="early_layers", freeze_routers=False, anchor_shuffle=False,
              shifcon_positions=(), shifcon_ce_weight=0.5, shifcon_contrastive_weight=2.0, shifcon_scale=1.0,
              shifcon_contrastive_batch=12, shifcon_contrastive_max_len=128)
run_id = fingerprint(_shared_keys + ["anchor_lang", "lambda_js", "lambda_lb", "anchor_mode", "epochs", "lr", "router_clean_logits"]
                     + [k for k, v in _later.items() if getattr(s, k) != v], model=model_digest, band=band_layers)
_phase = dict(sara="sara" if s.lambda_js > 0 else "finetune", live_kl="live_kl" if s.live_kl_alpha > 0 else "finetune",
              shifcon="shifcon")
train_phase(run, _phase[s.method], model, train_set, n_steps, s.lr, method, os.path.join(s.out_dir, "ckpt"), run_id, val_set)

if s.export_hf:
    full = full_state_dict(model)  # a collective under FSDP
    if layout.master:
        hf_dir = os.path.join(s.out_dir, "hf")
        try:  # the tokenizer travels with the weights: sample.py, eval.py, transformers need only the directory
            save_hf_state(full, raw_model.config, hf_dir, copy_from=None if s.init_from == "scratch" or from_base_pt else s.init_from,
                          extra_files=method.export_files(s.out_dir))  # (ShifCon: its language vectors)
            save_hf_tokenizer(tok, hf_dir, model_max_length=raw_model.config.max_position_embeddings)
            log(f"exported the fine-tuned model to {hf_dir} (Hugging Face layout)")
        except (ImportError, ValueError, OSError) as err:  # (a full disk): the run did not deliver what it should
            raise SystemExit(f"exporting to {hf_dir} failed ({err}); the fine-tuned weights are in "
                             f"{os.path.join(s.out_dir, 'ckpt')}: fix the cause and rerun the same command (it resumes "
                             "at the end and exports)") from None
log(f"done in {time.time() - _run_start:.0f} s wall ({world} process(es), {torch.get_num_threads()} threads each)")
if ddp:
    dist.barrier()  # every rank leaves together: a rank tearing gloo down while rank 0 still exports aborted once in CI
    dist.destroy_process_group()
