"""
Hostile inputs to checkpoint.py's training state: crafted pickles never run, and every damaged,
deleted, swapped, zeroed or foreign file of a checkpoint directory (state.pt or the sharded DCP
layout) is either a CheckpointError naming the file and what to do, or resumes exactly the saved
state. The case table is printed by `PYTHONPATH=. python tests/test_damaged_checkpoints.py`.
"""
import errno
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import training_state
from checkpoint import CheckpointError

# DCP without a process group (one process) warns that it assumes so
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FIXES = ("restore it from a backup", "delete", "torchrun", "Move it away", "Free disk space")


def _tiny_training(seed):
    from model import MoEConfig, MoETransformer
    from optim import make_optimizer
    torch.manual_seed(seed)
    model = MoETransformer(MoEConfig(vocab_size=50, hidden_size=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                     n_experts=2, top_k=1, moe_intermediate_size=8))
    opt = make_optimizer(model, "fp32", 1e-2, (0.9, 0.95), 0.0)
    return model, opt


def _train_and_save(path, seed, steps, sharded):
    """A run of `steps` optimizer steps saved at the end -> (model, optimizer, rng state) as saved."""
    model, opt = _tiny_training(seed)
    for _ in range(steps):
        model(torch.randint(0, 50, (2, 5)), labels=torch.randint(0, 50, (2, 5))).loss.backward()
        opt.step()
        opt.zero_grad()
    training_state.save_training_state(path, model, opt, steps, dict(fingerprint={"run": seed}), sharded=sharded)
    return model.state_dict(), opt.state_dict(), torch.get_rng_state()


def _resume(path, sharded):
    """What train.py does at start-up: repair, read meta.json, load -> (step, model, optimizer)."""
    training_state.recover_checkpoint(path)
    training_state.read_checkpoint_meta(path)
    model, opt = _tiny_training(99)
    step = training_state.load_training_state(path, model, opt, sharded=sharded)
    return step, model, opt


def _same_state(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same_state, a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs per layout: A (the one damaged, step 2) and B (another run, step 3)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for sharded in (False, True):
        for name, seed, steps in (("A", 1, 2), ("B", 2, 3)):
            path = root / f"{name}{'_dcp' if sharded else ''}"
            out[name, sharded] = (path, _train_and_save(path, seed, steps, sharded))
    return out


def _damage(kind, file, other_file, rng):
    size = file.stat().st_size
    if kind == "delete":
        file.unlink()
    elif kind == "zeros":
        file.write_bytes(bytes(size))
    elif kind == "swap":
        shutil.copy(other_file, file)
    elif kind == "foreign":
        with open(file, "wb") as f:  # (torch.save(obj, name) refuses a name like ".metadata")
            torch.save({"weights": torch.ones(3)}, f)
    elif kind.startswith("truncate"):
        offset = {"truncate0": 0, "truncate-1": size - 1}.get(kind, rng.randrange(size))  # always shorter
        with open(file, "r+b") as f:
            f.truncate(offset)
    return size


KINDS = ["delete", "zeros", "swap", "foreign", "truncate0", "truncate-1", "truncate_r1", "truncate_r2", "truncate_r3"]
FILES = {False: ["COMPLETE", "meta.json", "state.pt", "rng_rank0.pt"],
         True: ["COMPLETE", "meta.json", ".metadata", "__0_0.distcp", "rng_rank0.pt"]}
CASES = [(sharded, f, kind) for sharded in (False, True) for f in FILES[sharded] for kind in KINDS]


def outcome(runs, tmp_path, sharded, fname, kind):
    """Damage one file of a copy of run A -> "error: <message>" or "resumed intact"; raises
    AssertionError when the result is neither a named error nor exactly the saved state."""
    src, (model_sd, opt_sd, rng_state) = runs["A", sharded]
    other, _ = runs["B", sharded]
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    _damage(kind, path / fname, other / fname, random.Random(f"{fname}{kind}"))
    try:
        step, model, opt = _resume(path, sharded)
    except CheckpointError as err:
        msg = str(err)
        assert fname in msg or (fname == "COMPLETE" and "COMPLETE marker" in msg), msg
        assert any(fix in msg for fix in FIXES), msg
        assert "Traceback" not in msg and len(msg) < 1200, msg
        return f"error: {msg}"
    assert step == 2 and _same_state(model.state_dict(), model_sd) and _same_state(opt.state_dict(), opt_sd)
    assert torch.equal(torch.get_rng_state(), rng_state)
    return "resumed intact"


@pytest.mark.parametrize("sharded, fname, kind", CASES,
                         ids=[f"{'dcp' if s else 'pt'}-{f}-{k}" for s, f, k in CASES])
def test_damaged_file_is_named_or_resumes_exactly(runs, tmp_path, sharded, fname, kind):
    outcome(runs, tmp_path, sharded, fname, kind)


def test_intact_checkpoints_resume_exactly(runs, tmp_path):
    """(The oracle of the table: an undamaged copy resumes the saved state bit for bit.)"""
    for sharded in (False, True):
        src, (model_sd, opt_sd, rng_state) = runs["A", sharded]
        shutil.copytree(src, tmp_path / str(sharded))
        step, model, opt = _resume(tmp_path / str(sharded), sharded)
        assert step == 2 and _same_state(model.state_dict(), model_sd) and _same_state(opt.state_dict(), opt_sd)
        assert torch.equal(torch.get_rng_state(), rng_state)


def test_damage_that_must_be_an_error_is_one(runs, tmp_path):
    """Cases where resuming would silently change the run: each must be a named error."""
    for sharded, fname, kind in [(False, "state.pt", "swap"), (False, "rng_rank0.pt", "swap"),
                                 (True, "__0_0.distcp", "swap"), (True, "rng_rank0.pt", "swap"),
                                 (False, "meta.json", "swap"), (True, "COMPLETE", "swap"),
                                 (False, "state.pt", "foreign"), (True, "__0_0.distcp", "zeros")]:
        shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)
        assert outcome(runs, tmp_path, sharded, fname, kind).startswith("error"), (sharded, fname, kind)


@pytest.mark.parametrize("sharded", [False, True], ids=["pt", "dcp"])
def test_checkpoints_of_the_previous_format_still_resume(runs, tmp_path, sharded):
    """Checkpoints written before the files carried meta (no 'meta' in state.pt, the rng files or
    the DCP shards) resume as before."""
    import torch.distributed.checkpoint as dcp
    src, (model_sd, opt_sd, rng_state) = runs["A", sharded]
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    for f in ["rng_rank0.pt"] + ([] if sharded else ["state.pt"]):
        old = torch.load(path / f, weights_only=True)
        del old["meta"]
        torch.save(old, path / f)
    if sharded:  # rewrite the shards without the meta entry
        model, opt = _tiny_training(0)
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optim_state = get_state_dict(model, opt)
        for f in path.glob("*.distcp"):
            f.unlink()
        dcp.save(dict(model=model_state, optimizer=optim_state), checkpoint_id=path)
    step, model, opt = _resume(path, sharded)
    assert step == 2 and _same_state(model.state_dict(), model_sd) and _same_state(opt.state_dict(), opt_sd)
    assert torch.equal(torch.get_rng_state(), rng_state)


class _CreatesAFile:
    """A pickle whose loading creates `marker` (any code could run in its place)."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_dcp_metadata_runs_no_code(runs, tmp_path):
    src, _ = runs["A", True]
    shutil.copytree(src, tmp_path / "ckpt")
    payload = pickle.dumps(_CreatesAFile(tmp_path / "control"))
    pickle.loads(payload)  # the payload works: torch's own reader (pickle.load) would run it
    assert (tmp_path / "control").exists()
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_CreatesAFile(tmp_path / "pwned")))
    model, opt = _tiny_training(0)
    with pytest.raises(CheckpointError, match=r"ckpt/\.metadata: not readable as DCP metadata .*io\.open "
                                              r"is not a class of DCP metadata"):
        training_state.load_training_state(tmp_path / "ckpt", model, opt, sharded=True)
    assert not (tmp_path / "pwned").exists()


def test_crafted_plain_data_in_a_shard_runs_no_code(tmp_path):
    """DCP stores non-tensor entries as torch.save blobs, and torch's planner loads them with
    weights_only=False; ours does not."""
    import torch.distributed.checkpoint as dcp
    model, opt = _tiny_training(0)
    training_state.save_training_state(tmp_path / "ckpt", model, opt, 1, dict(fingerprint={}), sharded=True)
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    evil = tmp_path / "evil"
    dcp.save(dict(model=model_sd, optimizer=optim_sd, meta=_CreatesAFile(tmp_path / "pwned")), checkpoint_id=evil)
    for f in ("COMPLETE", "meta.json", "rng_rank0.pt"):
        shutil.copy(tmp_path / "ckpt" / f, evil / f)
    with pytest.raises(CheckpointError, match=r"evil/__0_0.distcp: not readable .*restore it from a backup"):
        training_state.load_training_state(evil, model, opt, sharded=True)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("sharded", [False, True], ids=["pt", "dcp"])
def test_wrong_layout_names_the_launch(runs, tmp_path, sharded):
    """A sharded checkpoint resumed without torchrun (and the reverse) says how to resume it."""
    src, _ = runs["A", sharded]
    model, opt = _tiny_training(0)
    if sharded:
        with pytest.raises(CheckpointError, match=r"sharded \(FSDP\) checkpoint written by 1 ranks: resume it "
                                                  r"under torchrun --nproc_per_node 1 with parallel=fsdp"):
            training_state.load_training_state(src, model, opt, sharded=False)
    else:
        with pytest.raises(CheckpointError, match=r"unsharded state.pt .*resume it with the parallel setting"):
            training_state.load_training_state(src, model, opt, sharded=True)
    with pytest.raises(CheckpointError, match=r"rng_rank3.pt: missing: .* written by 1 processes .* this is rank 3: "
                                              r"resume under torchrun --nproc_per_node 1"):
        training_state.load_training_state(src, model, opt, sharded=sharded, rank=3)


@pytest.mark.parametrize("sharded", [False, True], ids=["pt", "dcp"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, sharded):
    path = tmp_path / "ckpt"
    saved = _train_and_save(path, 1, 2, sharded)
    model, opt = _tiny_training(5)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if hasattr(f, "write"):
            f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"ckpt.tmp: writing the step-3 checkpoint failed .*No space left "
                                              rf".*{path} still holds step 2. Free disk space"):
        training_state.save_training_state(path, model, opt, 3, dict(fingerprint={"run": 1}), sharded=sharded)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .tmp, no .part left
    step, model, opt = _resume(path, sharded)
    assert step == 2 and _same_state(model.state_dict(), saved[0]) and _same_state(opt.state_dict(), saved[1])


def test_atomic_torch_save_leaves_no_part_file(tmp_path, monkeypatch):
    (tmp_path / "x.pt").write_bytes(b"old")
    monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"partial"), (_ for _ in ()).throw(OSError(28, "full"))))
    with pytest.raises(OSError):
        checkpoint.atomic_torch_save({"a": 1}, tmp_path / "x.pt")
    assert sorted(os.listdir(tmp_path)) == ["x.pt"] and (tmp_path / "x.pt").read_bytes() == b"old"


_SAVE_FOREVER = """
import signal, sys, warnings
signal.signal(signal.SIGINT, signal.default_int_handler)  # a suite started in the background inherits SIGINT ignored
warnings.filterwarnings("ignore")
import torch, training_state
from tests.test_damaged_checkpoints import _tiny_training, _weights_of_step
model, opt = _tiny_training(0)
for step in range(1, 10**6):
    _weights_of_step(model, step)
    training_state.save_training_state(sys.argv[1], model, opt, step, dict(fingerprint={}), sharded=sys.argv[2] == "1")
    print(step, flush=True)
"""


def _weights_of_step(model, step):
    """Weights that identify the step they were saved at (what a resume must give back, bit for bit)."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("sharded", [False, True], ids=["pt", "dcp"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_during_saves_resumes_a_complete_checkpoint_exactly(tmp_path, sig, sharded):
    """A process saving checkpoints back to back gets SIGINT (KeyboardInterrupt, which DCP wraps) or
    SIGTERM at a random moment; the next start repairs the directory and resumes a complete step,
    bit for bit, and saves again."""
    import signal
    import subprocess
    import time
    path = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(path), str(int(sharded))], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=Path(__file__).parent.parent, text=True)
    for _ in range(2):  # two checkpoints exist: the kill lands during a save over a complete one
        assert proc.stdout.readline(), "the saving process died before its second save"
    time.sleep(random.Random(f"{sig}{sharded}").uniform(0, 0.05))
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=60)
    training_state.recover_checkpoint(path)
    model, opt = _tiny_training(0)
    step = training_state.load_training_state(path, model, opt, sharded=sharded)
    expected, _ = _tiny_training(0)
    _weights_of_step(expected, step)
    assert step >= 2 and _same_state(model.state_dict(), expected.state_dict())
    training_state.save_training_state(path, model, opt, step + 1, dict(fingerprint={}), sharded=sharded)
    assert training_state.checkpoint_step(path) == step + 1 and sorted(os.listdir(tmp_path)) == ["ckpt"]


if __name__ == "__main__":  # the table of cases -> outcomes: PYTHONPATH=. python tests/test_damaged_checkpoints.py
    import warnings
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        runs_ = {}
        for sharded in (False, True):
            for name, seed, steps in (("A", 1, 2), ("B", 2, 3)):
                p = d / f"{name}{'_dcp' if sharded else ''}"
                runs_[name, sharded] = (p, _train_and_save(p, seed, steps, sharded))
        for i, (sharded, fname, kind) in enumerate(CASES):
            try:
                result = outcome(runs_, Path(tempfile.mkdtemp(dir=d)), sharded, fname, kind)
            except AssertionError as err:
                result = f"FAIL {err}"
            print(f"| {'dcp' if sharded else 'pt'} | {fname} | {kind} | {result.replace(str(d), '')[:220]} |")
    sys.exit(0)
