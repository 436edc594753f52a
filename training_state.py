"""
Training state on disk: save, crash-safe commit, recovery after a crash, resume (weights on disk
are checkpoint.py's). loop.py calls it; train.py calls recover_checkpoint at start-up.

    save_training_state(path, model, optimizer, step, meta, *, rank, world, sharded)   a collective
    recover_checkpoint(path) -> [what was repaired]          finish or undo a commit a crash interrupted
    read_checkpoint_meta(path) -> meta.json                   the run fingerprint and step
    load_training_state(path, model, optimizer, *, rank, sharded, device) -> step
    check_fingerprint(what, saved, now)                       a checkpoint of another run is never resumed

Decisions and why:
- Nothing but tensors and plain data is unpickled: state.pt and rng_rank*.pt are read with
  weights_only; a sharded (FSDP) checkpoint's .metadata, which torch's DCP reader would pickle.load
  (running whatever a crafted file asks for), is read by an unpickler that allows only the DCP
  metadata classes, and DCP's non-tensor entries (which torch's planner torch.loads with
  weights_only=False) with weights_only.
- Every file of a training checkpoint carries the checkpoint's meta (run fingerprint, step, and a
  method's state such as ShifCon's language vectors), so a file of another run or step is an error,
  not a silent mix; every damaged, missing or foreign file is a CheckpointError naming it and the fix
  (tests/test_damaged_checkpoints.py runs the cases: each file truncated, zeroed, deleted, swapped, foreign).
"""
import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from checkpoint import CheckpointError, _cause, _first_line, _fsync_dir, _listing, _read_json, _write_json, atomic_torch_save


# -----------------------------------------------------------------------------
# training state: save, crash-safe commit, recovery, resume
#
# A training checkpoint is a directory `path` holding the model and optimizer state (state.pt,
# or a torch.distributed.checkpoint (DCP) directory layout when sharded), rng_rank{r}.pt per rank,
# meta.json (plain data: the step and the run's fingerprint) and COMPLETE (the step, written last).
# Commit: write everything to path.tmp; COMPLETE; rename path -> path.old; rename path.tmp -> path;
# delete path.old. A crash at any point leaves either path complete, or path.tmp complete (and
# newer), or path.old complete; recover_checkpoint() at start-up finishes or undoes the commit.

def checkpoint_step(path):
    """The step of a complete checkpoint directory, or None (absent, or no COMPLETE marker)."""
    try:
        return int(Path(path, "COMPLETE").read_text())
    except (OSError, ValueError):
        return None


def _crash_point(name, step):
    """Tests only: SARA_TEST_CRASH_AT=<name>@<step> exits the process here, as a kill would."""
    if os.environ.get("SARA_TEST_CRASH_AT") == f"{name}@{step}":
        os._exit(137)


def recover_checkpoint(path):
    """Repair what a crash during a commit left behind (call on one process before any reads).
    -> a list of sentences saying what was done (empty if nothing was to do)."""
    path = str(path)
    tmp, old = path + ".tmp", path + ".old"
    cur, new, prev = checkpoint_step(path), checkpoint_step(tmp), checkpoint_step(old)
    done = []
    if os.path.exists(path) and cur is None:
        _step_of(path)  # a damaged marker is named as such
        raise CheckpointError(f"{path}: a checkpoint directory without a COMPLETE marker; it was not written "
                              "by this code's commit, or the marker was deleted. Move it away (or restore it from "
                              "a backup) to continue.")
    if new is not None and (cur is None or new > cur):  # the commit got past COMPLETE: finish it
        if cur is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        done.append(f"finished an interrupted commit: {path} is now step {new} (was {cur})")
        cur = new
    elif os.path.exists(tmp):
        shutil.rmtree(tmp)
        done.append(f"removed an incomplete {tmp}")
    if os.path.exists(old):
        if cur is None and prev is not None:  # (cannot happen with the commit order above; be safe)
            os.replace(old, path)
            done.append(f"restored {path} (step {prev}) from {old}")
        else:
            shutil.rmtree(old)
            done.append(f"removed the previous checkpoint {old} left by an interrupted commit")
    return done


def _rng_state(meta):
    """This rank's RNG states; meta (meta.json's content) ties the file to its checkpoint."""
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, meta=meta)


def save_training_state(path, model, optimizer, step, meta, *, rank=0, world=1, sharded=False):
    """Write the training state of `model` (plain, DDP or FSDP2) and `optimizer` at `step` and
    commit it crash-safely (see above). A collective: every rank calls it. sharded: FSDP2, each
    rank writes its shards (DCP); else rank 0 writes one state.pt. meta: plain data (JSON).
    Every file carries meta (with the step), so a file of another run or step is recognised on load.
    A failed write (disk full) leaves the previous checkpoint as it was, and is a CheckpointError."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict
    barrier = dist.barrier if world > 1 else (lambda: None)
    path = str(path)
    tmp, old = path + ".tmp", path + ".old"
    meta = dict(meta, step=step)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    try:
        if sharded:
            import torch.distributed.checkpoint as dcp
            dcp.save(dict(model=model_sd, optimizer=optim_sd, meta=json.dumps(meta, sort_keys=True)),
                     checkpoint_id=tmp)
            torch.save(_rng_state(meta), os.path.join(tmp, f"rng_rank{rank}.pt"))
        else:
            rngs = [None] * world
            if world > 1:
                dist.all_gather_object(rngs, _rng_state(meta))
            else:
                rngs = [_rng_state(meta)]
            if rank == 0:
                atomic_torch_save(dict(model=model_sd, optimizer=optim_sd, step=step, meta=meta),
                                  os.path.join(tmp, "state.pt"))
                for r, s in enumerate(rngs):
                    torch.save(s, os.path.join(tmp, f"rng_rank{r}.pt"))
        barrier()
        if rank == 0:
            _write_json(Path(tmp, "meta.json"), meta)
    except (Exception, _dcp_error()) as err:  # e.g. the disk is full: the committed checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(_cause(err), Exception):  # Ctrl-C inside dcp.save: an interrupt, not a failed write
            raise _cause(err) from None
        previous = checkpoint_step(path)
        raise CheckpointError(f"{tmp}: writing the step-{step} checkpoint failed ({_first_line(err)}); "
                              + (f"{path} still holds step {previous}. " if previous is not None else "")
                              + "Free disk space and resume.") from err
    if rank == 0:
        _crash_point("before_complete", step)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _crash_point("written", step)
        shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier crash
        if os.path.exists(path):
            os.replace(path, old)
        _crash_point("old_renamed", step)
        os.replace(tmp, path)  # the commit point
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
        _crash_point("committed", step)
        if os.path.exists(old):
            os.remove(os.path.join(old, "COMPLETE"))  # first: a half-deleted .old never looks complete
            _crash_point("deleting_old", step)
            shutil.rmtree(old)
    barrier()


def check_fingerprint(what, saved, now):
    """A run's fingerprint ({key: value}) saved with its checkpoint against the current one: any
    difference is a SystemExit naming every changed key, saved and current value."""
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    if changed:
        raise SystemExit(f"{what} belongs to another run; changed (saved -> now): "
                         + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                         + ". Use a new out_dir, or restore those settings.")


def _meta_difference(saved, meta):
    """"{key: value, ...}, but meta.json says {key: value, ...}" over the keys that differ, each value cut to 60
    characters (a meta may hold a method's state, e.g. ShifCon's vectors: thousands of numbers)."""
    if not (isinstance(saved, dict) and isinstance(meta, dict)):
        return f"{saved!r:.200}, but meta.json says {meta!r:.200}"
    keys = sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))
    show = lambda d: "{" + ", ".join(f"{k!r}: {d[k]!r:.60}" if k in d else f"{k!r}: (absent)" for k in keys) + "}"
    return f"{show(saved)}, but meta.json says {show(meta)}"


def _damaged(path, file, problem):
    """The one error of a training checkpoint that cannot be resumed: the file, what is wrong, what to do."""
    return CheckpointError(f"{file}: {problem}. The checkpoint {path} cannot be resumed: restore it from a "
                           f"backup, or delete {path} to restart this phase from step 0.")


def _dcp_error():
    from torch.distributed.checkpoint.api import CheckpointException
    return CheckpointException


def _load_plain(path, file, **kw):
    """torch.load(file, weights_only=True), a failure being _damaged naming the file."""
    with open(file, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise _damaged(path, file, f"not a torch file (starts with {head!r}, not a zip header; "
                                   f"{os.path.getsize(file)} bytes)")
    try:
        return torch.load(file, weights_only=True, **kw)
    except Exception as err:  # truncated, damaged, or not plain tensors + data
        raise _damaged(path, file, f"truncated or damaged ({_first_line(err)})") from None


def _step_of(path):
    """checkpoint_step, with a damaged COMPLETE marker (present, but not a step) named."""
    step = checkpoint_step(path)
    marker = Path(path, "COMPLETE")
    if step is None and marker.is_file():
        raise _damaged(path, marker, f"damaged (holds {marker.read_bytes()[:40]!r}, expected the step number)")
    return step


def read_checkpoint_meta(path):
    """meta.json of a complete checkpoint (plain data; no unpickling)."""
    file = Path(path, "meta.json")
    try:
        meta = _read_json(file)
    except CheckpointError as err:
        raise _damaged(path, file, str(err).removeprefix(f"{file}: ")) from None
    if not isinstance(meta, dict):
        raise _damaged(path, file, f"expected a JSON object, got {type(meta).__name__}")
    return meta


# DCP (torch.distributed.checkpoint) pickles its .metadata file; torch's FileSystemReader unpickles it
# with pickle.load, which runs whatever a crafted file asks for. Ours allows exactly the classes DCP
# writes there (found by disassembling the .metadata of a save, torch 2.13) and nothing else.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a class of DCP metadata (refused: unpickling "
                                     "it could run code)")


def _read_dcp_metadata(path):
    """The DCP Metadata of a sharded checkpoint, read with _MetadataUnpickler and checked against
    the shard files it points to (present, long enough), before any tensor is read."""
    from torch.distributed.checkpoint.metadata import Metadata
    file = Path(path, ".metadata")
    if not file.is_file():
        found = "state.pt" if Path(path, "state.pt").is_file() else "neither .metadata nor state.pt"
        raise _damaged(path, file, f"missing (a sharded checkpoint's index; found {found})")
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except Exception as err:  # truncated, zeros, foreign, or a class outside the allow-list
        raise _damaged(path, file, f"not readable as DCP metadata ({_first_line(err)})") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise _damaged(path, file, f"not DCP metadata (holds a {type(md).__name__})")
    ends = {}
    for info in md.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = Path(path, name)
        if not shard.is_file():
            raise _damaged(path, shard, "missing (listed in .metadata)")
        if shard.stat().st_size < end:
            raise _damaged(path, shard, f"truncated: {shard.stat().st_size} bytes, .metadata needs {end}")
    return md


def _dcp_load(path, state, md):
    """dcp.load(state) with md (already read safely) and plain data read with weights_only: torch's
    DefaultLoadPlanner torch.loads the non-tensor entries (optimizer hyperparameters) with
    weights_only=False."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(dcp.FileSystemReader):
        def read_metadata(self):
            if md.storage_meta is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            plain = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], plain)
            else:
                self.state_dict[read_item.dest_index.fqn] = plain

    dcp.load(state, storage_reader=Reader(path), planner=Planner())


def _saved_ranks(path):
    return sum(1 for p in Path(path).glob("rng_rank*.pt"))


def load_training_state(path, model, optimizer, *, rank=0, sharded=False, device="cpu"):
    """Load a checkpoint written by save_training_state into model and optimizer (and this rank's
    RNG state). -> the step to continue from. Nothing but tensors and plain data is unpickled (DCP's
    .metadata included, see _MetadataUnpickler). A damaged, foreign or mismatched file is a
    CheckpointError naming it, what is wrong and what to do."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = str(path)
    step = _step_of(path)
    if step is None:
        raise CheckpointError(f"{path}: incomplete checkpoint (no COMPLETE marker): restore it from a backup, "
                              f"or delete {path} to restart this phase from step 0")
    meta = read_checkpoint_meta(path)
    is_dcp = Path(path, ".metadata").is_file() or any(Path(path).glob("*.distcp"))
    n_ranks = _saved_ranks(path)
    if is_dcp and not sharded and not Path(path, "state.pt").is_file():
        raise CheckpointError(f"{path} is a sharded (FSDP) checkpoint" + (f" written by {n_ranks} ranks" if n_ranks else "")
                              + ": resume it under torchrun --nproc_per_node " + (str(n_ranks) if n_ranks else "N")
                              + " with parallel=fsdp, as it was written")
    if sharded and not is_dcp and Path(path, "state.pt").is_file():
        raise CheckpointError(f"{path} holds an unsharded state.pt (written without FSDP): resume it with the "
                              "parallel setting it was written with (ddp, or a single process)")
    if sharded:
        md = _read_dcp_metadata(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = dict(model=model_sd, optimizer=optim_sd)
        if "meta" in md.state_dict_metadata:  # (checkpoints before meta was saved with the shards lack it)
            state["meta"] = ""
        shards = sorted({info.relative_path for info in md.storage_data.values()})
        state_file = Path(path, shards[0]) if len(shards) == 1 else f"{path}/{{{_listing(shards)}}}"
        try:
            _dcp_load(path, state, md)
        except (Exception, _dcp_error()) as err:
            raise _damaged(path, state_file, f"not readable ({_first_line(err)})") from None
        try:
            saved_meta = json.loads(state["meta"]) if "meta" in state else None
        except (TypeError, json.JSONDecodeError):
            raise _damaged(path, state_file, f"its saved meta {state['meta']!r:.80} is not JSON") from None
    else:
        state_file = Path(path, "state.pt")
        if not state_file.is_file():
            raise _damaged(path, state_file, "missing")
        state = _load_plain(path, state_file, map_location=device)
        if not (isinstance(state, dict) and isinstance(state.get("model"), dict)
                and isinstance(state.get("optimizer"), dict)):
            raise _damaged(path, state_file, "not a training state (expected a dict with 'model' and 'optimizer')")
        saved_meta = state.get("meta", {**meta, "step": state.get("step")})
    if saved_meta is not None and saved_meta != meta:
        raise _damaged(path, state_file, f"saved with {_meta_difference(saved_meta, meta)}: the files of "
                                         "two checkpoints are mixed")
    if meta.get("step", step) != step:
        raise _damaged(path, Path(path, "COMPLETE"), f"says step {step}, meta.json step {meta.get('step')}")
    rng_file = Path(path, f"rng_rank{rank}.pt")
    if not rng_file.is_file():
        if 0 < n_ranks <= rank:
            raise CheckpointError(f"{rng_file}: missing: {path} was written by {n_ranks} processes (rng_rank0.pt .. "
                                  f"rng_rank{n_ranks - 1}.pt) and this is rank {rank}: resume under torchrun "
                                  f"--nproc_per_node {n_ranks}")
        raise _damaged(path, rng_file, "missing")
    rng = _load_plain(path, rng_file)
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
            and rng["torch"].dtype == torch.uint8 and rng["torch"].shape == torch.get_rng_state().shape):
        raise _damaged(path, rng_file, "not an RNG state file (expected {'torch': uint8 tensor, 'cuda': ...})")
    if rng.get("meta", meta) != meta:
        raise _damaged(path, rng_file, f"saved with {_meta_difference(rng['meta'], meta)}: the files of two "
                                       "checkpoints are mixed")
    try:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except Exception as err:  # another model's or optimizer's state
        raise _damaged(path, state_file, f"does not fit this model and optimizer ({_first_line(err)})") from None
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return step
