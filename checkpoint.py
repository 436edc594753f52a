"""
Weights on disk, in one place: Hugging Face checkpoint directories of Qwen3-MoE (`qwen3_moe`) and
Phi-3.5-MoE (`phimoe`) and the further families, and the toy base model train.py writes (base.pt). No
transformers import: config.json and safetensors are read and written here. model.py does no disk
I/O; this file imports it, never the other way round.

    load_model(path, dtype=None, device="cpu", **overrides) -> MoETransformer   (eval mode)
        path: an HF directory, or a .pt file {"model": state_dict, "config": MoEConfig dict}
    save_hf(model, path, max_shard_size="5GB", copy_from=None)
    save_base(path, state_dict, config, **meta) / load_base(path) -> (model, meta)   the toy base.pt
(training state, the loop's checkpoints: training_state.py)
(config.json and tensor names: hf_config.py.)

Decisions and why:
- Loading allocates every parameter once: the model is built on the meta device, cast, then
  materialised uninitialised with to_empty(device), and each on-disk tensor is read with a plain
  file read straight into its destination (for an expert, its slice of the stacked weight; when
  dtype and device match, no intermediate buffer at all). Not safetensors' safe_open: it memory-maps
  the file, and every page it touches counts as resident until the file is closed, so a 400 MB
  single-file checkpoint peaked at model + file = 2x (measured). Measured with plain reads: peak RSS
  growth 1.00x the checkpoint size, plus ~80 MB once per process for torch's meta-device machinery
  (tests/test_checkpoint.py::test_peak_memory_of_loading).
- Every header is validated before any data is read (JSON, dtypes, offsets within the file), so a
  truncated or corrupted shard, a missing / unexpected / wrongly shaped tensor fails with one
  CheckpointError naming them, before any time is spent reading. (safetensors has no checksum: flipped
  bits inside the data cannot be detected.)
- save_hf writes the whole directory next to its destination and renames it into place, so
  a reader sees the old directory or the new one, never a half-written one; files of an existing
  directory other than weights and config.json (tokenizer, training state) are carried over (hard links).
"""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch

import families
from hf_config import CheckpointError, config_from_hf, config_to_hf, hf_tensor_map  # noqa: F401 (re-exported)
from model import MoEConfig, MoETransformer


# -----------------------------------------------------------------------------
# safetensors, read and written with plain file I/O (see the module docstring for why)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "U8": torch.uint8}  # U8: packed (MXFP4) weights, unpacked by the family (load_hf)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def read_safetensors_header(file):
    """{name: (dtype, shape, absolute byte offset, nbytes)} of a .safetensors file, validated
    against the file's size; CheckpointError naming the file if it is truncated or corrupted."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{file}: not a safetensors file, or truncated (header size {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{file}: corrupted safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupted safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    tensors, problems = {}, []
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: unsupported dtype or malformed entry {info!r}")
            continue
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            problems.append(f"{name}: data_offsets {[begin, end]} do not hold shape {shape} {info['dtype']}")
        elif 8 + n + end > size:
            problems.append(f"{name}: data ends at byte {8 + n + end} but the file has {size} bytes (truncated)")
        tensors[name] = (dtype, shape, 8 + n + begin, nbytes)
    if problems:
        raise CheckpointError(f"{file}: " + _listing(problems))
    return tensors


def _read_into(f, offset, nbytes, dtype, target):
    """Read one tensor's bytes into `target` (any device/dtype; directly when CPU, same dtype, contiguous)."""
    direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
    buf = target if direct else torch.empty(target.shape, dtype=dtype)
    view = memoryview(buf.view(torch.uint8).reshape(-1).numpy()) if nbytes else memoryview(b"")
    f.seek(offset)
    done = 0
    while done < nbytes:  # a single read() returns at most ~2 GB
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{f.name}: truncated while reading")
        done += got
    if not direct:
        target.copy_(buf)


def write_safetensors(file, tensors, metadata=None):
    """Write [(name, tensor)] as one .safetensors file, tensor by tensor (no copy of CPU tensors)."""
    header, offset = {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes, so data is aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in tensors:
            t = t.detach().cpu().contiguous()  # .cpu(): one tensor at a time off the GPU
            if t.numel():
                f.write(t.view(torch.uint8).reshape(-1).numpy())
        f.flush()
        os.fsync(f.fileno())


def _listing(items, limit=20):
    items = list(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _weight_files(path):
    """{on-disk tensor name: (file, dtype, shape, offset, nbytes)} over all shards, validated."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.exists():
        index_json = _read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' object {{tensor name: shard file}}")
        files = sorted({path / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index}: shard files missing: {absent}")
    elif single.exists():
        weight_map, files = None, [single]
    else:
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "not a directory"
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              f"(only safetensors checkpoints are supported); found {found}")
    tensors, problems = {}, []
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in tensors:
                problems.append(f"{name} is in both {tensors[name][0].name} and {file.name}")
            tensors[name] = (file, *info)
    if weight_map is not None:
        problems += [f"{name}: the index puts it in {f}, which does not contain it"
                     for name, f in weight_map.items() if name not in tensors or tensors[name][0].name != f]
    if problems:
        raise CheckpointError(f"{path}: inconsistent shards: " + _listing(problems))
    return tensors


def _read_json(file):
    try:
        return json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None


# -----------------------------------------------------------------------------
# load

def load_model(path, dtype=None, device="cpu", check_finite=True, **overrides):
    """
    The one loader of every script: an HF checkpoint directory (load_hf), or a .pt file written by
    save_base ({"model": state_dict, "config": MoEConfig dict}; train.py's base.pt). dtype: None =
    as stored. overrides: MoEConfig fields that leave the weights alone (attn_impl, ...).
    check_finite: a NaN/Inf weight is an error naming the tensor (one pass over the weights).
    Returns the model in eval mode.
    """
    path = Path(path)
    if path.is_dir():
        model = load_hf(path, dtype=dtype, device=device, **overrides)
    elif path.suffix == ".pt" and path.is_file():
        model, _ = load_base(path, **overrides)
        model = model.to(device=device or "cpu", dtype=dtype).eval()
    else:
        raise CheckpointError(f"{path}: neither a checkpoint directory nor a .pt file" +
                              ("" if path.exists() else " (it does not exist)"))
    if check_finite:
        bad = [n for n, p in model.named_parameters() if not all_finite(p)]
        if bad:
            raise CheckpointError(f"{path}: non-finite (NaN/Inf) weights in {_listing(bad)}")
    return model


def checkpoint_tokenizer(checkpoint, tokenizer=""):
    """The tokenizer that goes with a checkpoint, read without its weights: a directory's own unless
    `tokenizer` names another; a .pt file (the toy base.pt) has none of its own and needs `tokenizer`.
    Raises CheckpointError naming the file and what to pass."""
    from tokenizer import load_tokenizer  # (kept local: tokenizer.py is not needed to read weights)
    path = Path(checkpoint)
    if path.suffix == ".pt" and not tokenizer:
        raise CheckpointError(f"{path} is a .pt file, which carries no tokenizer: pass the tokenizer it was "
                              "trained with (e.g. data/udhr/bpe.tiktoken)")
    try:
        return load_tokenizer(tokenizer or path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"tokenizer {tokenizer or path}: {err}") from None


def load_model_and_tokenizer(checkpoint, tokenizer="", dtype=None, device="cpu", **overrides):
    """The model and the tokenizer that goes with it, for every script that runs a checkpoint (sample.py,
    eval.py, stage1.py): a directory's own tokenizer unless `tokenizer` names another; a .pt file (the toy
    base.pt) has none of its own and needs `tokenizer`. The tokenizer is read first (cheap) and checked
    against the model's vocabulary before the weights are, so a mismatch costs no load.
    Raises CheckpointError naming the file and what to pass."""
    path = Path(checkpoint)
    tok = checkpoint_tokenizer(path, tokenizer)
    model = load_model(path, dtype=dtype, device=device, **overrides)
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer or path} has {tok.vocab_size} tokens but the model {path} "
                              f"only {model.config.vocab_size} embeddings: they do not belong together")
    return model, tok


@torch.no_grad()
def all_finite(t):
    """A sum propagates NaN/Inf in one pass with no full-size temporary; torch.isfinite(t).all()
    allocates several (measured: +27% peak RSS loading a 248 MB fp32 checkpoint, 0.98x -> 1.25x).
    A sum that overflows although every value is finite is re-checked exactly."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def save_base(path, state_dict, config, **meta):
    """Write the toy base model as {"model": state_dict, "config": config.to_dict(), **meta} (atomic
    rename); meta: plain data (str, numbers, lists, dicts), e.g. train.py's run fingerprint."""
    atomic_torch_save(dict(model=state_dict, config=config.to_dict(), **meta), path)


def load_base(path, **overrides):
    """-> (MoETransformer in eval mode, meta dict) from a save_base file. weights_only: a crafted
    file cannot run code. A damaged or foreign file is a CheckpointError naming it and the fix."""
    fix = (f"; delete {path} to rebuild it (train.py pretrains it again when it is missing), or restore it "
           "from a backup")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or not plain tensors + data
        raise CheckpointError(f"{path}: not a readable base model file ({_first_line(err)})" + fix) from None
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict) and isinstance(state.get("config"), dict)):
        raise CheckpointError(f"{path}: not a base model file (expected a dict with 'model' and 'config')" + fix)
    try:
        cfg = MoEConfig.from_dict({**state["config"], **overrides})
        if _wrongly_typed(cfg):
            raise TypeError(f"fields of the wrong type: {_listing(_wrongly_typed(cfg))}")
        model = MoETransformer(cfg)
    except Exception as err:  # a config of wrong keys, types or values
        raise CheckpointError(f"{path}: its config is not a valid MoEConfig ({_first_line(err)})" + fix) from None
    try:
        model.load_state_dict(state["model"])
    except Exception as err:
        raise CheckpointError(f"{path}: weights do not fit its config: {_first_line(err)}" + fix) from None
    return model.eval(), {k: v for k, v in state.items() if k not in ("model", "config")}


def atomic_torch_save(obj, path):
    """torch.save to path + ".part", fsync, rename: a reader sees the old file or the new one."""
    path = str(path)
    try:
        with open(path + ".part", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # (disk full, interrupted): no half-written .part left behind
        if os.path.exists(path + ".part"):
            os.remove(path + ".part")
        raise
    os.replace(path + ".part", path)


def _wrongly_typed(cfg):
    """["field=value (expected type)"] of a MoEConfig whose values do not have their declared types
    (None allowed where it is the default; an int is a float; a bool is not an int)."""
    kinds = {"int": int, "float": (int, float), "bool": bool, "str": str, "tuple": (tuple, list), "dict": dict}
    wrong = []
    for f in dataclasses.fields(cfg):
        kind = kinds.get(getattr(f.type, "__name__", f.type))
        value = getattr(cfg, f.name)
        if kind is None or (value is None and f.default is None):
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            wrong.append(f"{f.name}={value!r} (expected {getattr(f.type, '__name__', f.type)})")
    return wrong


def load_hf(path, dtype=None, device=None, **overrides):
    """
    Load a transformers Qwen3-MoE / Phi-3.5-MoE checkpoint directory (config.json + model.safetensors,
    or shards + model.safetensors.index.json). dtype: None = the checkpoint's own dtype. device:
    None = cpu. overrides: MoEConfig fields that do not change the weights (attn_impl, expert_impl,
    gradient_checkpointing, ...). Returns the model in eval mode, as transformers does.
    """
    path = Path(path)
    hf = _read_json(path / "config.json")
    try:  # config.json's values are mapped (and mostly checked) by hf_config.py; a wrong type can get past
        cfg = config_from_hf(hf, source=str(path / "config.json"))
        cfg = MoEConfig.from_dict({**cfg.to_dict(), **overrides})
        wrong = _wrongly_typed(cfg)
        if wrong:
            raise TypeError(f"MoEConfig fields of the wrong type: {_listing(wrong)}")
        with torch.device("meta"):
            model = MoETransformer(cfg)
        hf_tensor_map(model, hf["model_type"])
    except CheckpointError as err:  # the family's own checks (families/), naming the key: add the fix
        raise CheckpointError(f"{err}; restore config.json from the original checkpoint") from None
    except Exception as err:
        raise CheckpointError(f"{path / 'config.json'}: a value of the wrong type or out of range "
                              f"({_first_line(err)}); restore config.json from the original checkpoint") from None
    on_disk = _weight_files(path)
    if dtype is None:  # the dtype the vendor shipped (that of the embedding)
        dtype = on_disk.get("model.embed_tokens.weight", (None, torch.float32))[1]
    # parameters are allocated here, once, uninitialised, in the target dtype; RotaryEmbedding's
    # fp32 frequencies are recomputed on the device by its _apply
    model.to(dtype=dtype).to_empty(device=device or "cpu")
    if cfg.tie_word_embeddings:  # to_empty makes new Parameters, which unties them
        model.lm_head.weight = model.embed_tokens.weight
    targets = hf_tensor_map(model, hf["model_type"])
    assert sum(t.numel() for t in targets.values()) == sum(p.numel() for p in model.parameters())
    # old checkpoints may carry RoPE buffers, and a tied lm_head may be stored anyway: both unused
    ignored = {n for n in on_disk if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        ignored.add("lm_head.weight")
    # the one family hook: tensors stored packed (gpt_oss: MXFP4 experts), {target: (sources, unpack)}
    packed, wrong = getattr(families.get(hf["model_type"]), "packed_tensors", lambda *a: ({}, []))(
        targets, {n: v[2] for n, v in on_disk.items()}, {n: v[1] for n, v in on_disk.items()})
    missing = sorted(set(targets) - set(on_disk) - set(packed))
    unexpected = sorted(set(on_disk) - set(targets) - ignored - {s for sources, _ in packed.values() for s in sources})
    wrong += [f"{n}: {on_disk[n][2]} on disk, expected {list(targets[n].shape)}"
              for n in sorted(set(targets) & set(on_disk)) if on_disk[n][2] != list(targets[n].shape)]
    wrong += [f"{n}: {on_disk[n][1]} on disk, expected a floating-point dtype" for n in sorted(set(targets) & set(on_disk))
              if not on_disk[n][1].is_floating_point]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {_listing(items)}" for label, items in
                 (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)) if items]
        raise CheckpointError(f"{path} does not fit its config.json ({hf['model_type']}): " + " | ".join(parts))
    by_file = {}
    for name, target in targets.items():
        if name not in packed:
            by_file.setdefault(on_disk[name][0], []).append((on_disk[name][3], name, target))
    with torch.no_grad():
        for file, jobs in sorted(by_file.items()):
            with open(file, "rb", buffering=0) as f:
                for offset, name, target in sorted(jobs, key=lambda job: job[0]):  # sequential reads
                    _, disk_dtype, _, _, nbytes = on_disk[name]
                    _read_into(f, offset, nbytes, disk_dtype, target)
        for name, (sources, unpack) in packed.items():  # one target at a time: its sources, then unpacked
            parts = []
            for source in sources:
                file, disk_dtype, shape, offset, nbytes = on_disk[source]
                parts.append(torch.empty(shape, dtype=disk_dtype))
                with open(file, "rb", buffering=0) as f:
                    _read_into(f, offset, nbytes, disk_dtype, parts[-1])
            targets[name].copy_(unpack(*parts))
    return model.eval()


# -----------------------------------------------------------------------------
# save

def _parse_size(size):
    """5_000_000_000, "5GB" (10^9) or "5GiB" (2^30) -> bytes."""
    if isinstance(size, int):
        return size
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    s = size.strip().upper()
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    raise ValueError(f"max_shard_size={size!r}: expected bytes or a string like '5GB' / '500MiB'")


def _is_ours(name):
    """Files a save writes or makes stale: weights, their index, config.json, and a method's inference file
    (ShifCon's shifcon.json: a run that writes none must not inherit the vectors of another model)."""
    return name in ("config.json", "model.safetensors.index.json", "shifcon.json") or (
        name.startswith(("model", "pytorch_model")) and name.endswith((".safetensors", ".bin")))


def save_hf(model, path, max_shard_size="5GB", copy_from=None, extra_files=()):
    """
    Write `path` as a transformers checkpoint directory: config.json, and model.safetensors or,
    above max_shard_size, model-0000i-of-0000n.safetensors + model.safetensors.index.json (a tensor
    larger than max_shard_size gets a shard of its own). Tensors keep the model's dtype.
    copy_from: a checkpoint directory whose other files (tokenizer, generation_config.json, ...) are
    copied alongside. extra_files: files written with the weights (ShifCon's shifcon.json), in the same
    atomic step. The directory is replaced atomically (see the module docstring): a new directory
    takes its name, so a process whose working directory it was keeps the old one.
    """
    path = Path(os.path.abspath(path))  # (normalised: "." has no name to put a sibling next to)
    hf = config_to_hf(model.config, dtype=model.embed_tokens.weight.dtype)
    tensors = list(hf_tensor_map(model, hf["model_type"]).items())
    limit, shards = _parse_size(max_shard_size), [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for fname, shard in zip(names, shards):
            write_safetensors(tmp / fname, shard, metadata={"format": "pt"})
        if len(shards) > 1:
            weight_map = {n: fname for fname, shard in zip(names, shards) for n, _ in shard}
            total = sum(t.numel() * t.element_size() for _, t in tensors)
            _write_json(tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        _write_json(tmp / "config.json", hf)
        if copy_from is not None:
            for src in Path(copy_from).iterdir():
                if src.is_file() and not _is_ours(src.name):
                    shutil.copy2(src, tmp / src.name)
        for f in extra_files:  # (a crash never leaves the weights without them)
            shutil.copy2(f, tmp / Path(f).name)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_hf_state(state_dict, config, path, copy_from=None, extra_files=()):
    """save_hf of a full state dict (e.g. gathered from FSDP shards) without a second copy of the
    weights: the model is built on the meta device and takes the tensors as they are. extra_files
    are written with the weights (save_hf)."""
    with torch.device("meta"):
        model = MoETransformer(config)
    model.load_state_dict(state_dict, assign=True)
    if config.tie_word_embeddings:  # assign=True replaced the shared Parameter
        model.lm_head.weight = model.embed_tokens.weight
    save_hf(model, path, copy_from=copy_from, extra_files=extra_files)


def file_digest(paths):
    """sha256 (16 hex digits) of the files' names and contents, in sorted order: what identifies a
    data file or a checkpoint's weights in a run's fingerprint."""
    h = hashlib.sha256()
    for p in sorted(map(str, paths)):
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _write_json(file, obj):
    with open(file, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp, path):
    """Rename the finished `tmp` to `path`, keeping the non-weight files of an existing `path`."""
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} exists and is not a directory")
        for old in path.iterdir():  # hard links: no data copied, the old directory stays intact
            if not _is_ours(old.name) and not (tmp / old.name).exists():
                if old.is_dir():
                    shutil.copytree(old, tmp / old.name, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(old, tmp / old.name)
        _fsync_dir(tmp)
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, trash)
        os.rename(tmp, path)
        shutil.rmtree(trash)
    else:
        _fsync_dir(tmp)
        os.rename(tmp, path)
    _fsync_dir(path.parent)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _cause(err):
    """The error itself, or of DCP's CheckpointException (a BaseException wrapping every rank's
    errors, interrupts included) its first rank's."""
    return next(iter(err.failures.values()))[0] if getattr(err, "failures", None) else err


def _first_line(err):
    """The informative line of an error (of a CheckpointException, its cause's); of torch.load
    (weights_only=True), what the unpickler refused."""
    err = _cause(err)
    lines = [line for line in str(err).splitlines() if line.strip()] or [""]
    refused = [i for i, line in enumerate(lines) if "WeightsUnpickler error" in line]
    line = lines[refused[0] + 1] if refused and refused[0] + 1 < len(lines) else lines[0]
    return f"{type(err).__name__}: {line.strip()[:300]}"
