"""dirlock: one process per output directory, a refusal names the holder, a killed holder never blocks."""
import os
import signal
import subprocess
import sys
import time

import pytest

import dirlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = "import dirlock, sys, time; dirlock.acquire(sys.argv[1], 'test'); print('held', flush=True); time.sleep(600)"


def hold(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    proc = hold(tmp_path)
    try:
        assert dirlock.holder(tmp_path).startswith(f"pid {proc.pid} on ")
        with pytest.raises(SystemExit, match=rf"{tmp_path}: another train.py run is using this directory "
                                             rf"\(pid {proc.pid} on .*\); wait for it"):
            dirlock.acquire(tmp_path, "train.py run")
        assert (tmp_path / ".lock").read_text().startswith(f"pid {proc.pid} ")  # the refusal kept the note
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert dirlock.holder(tmp_path) is None  # the kernel dropped it with the process
    said = []
    lock = dirlock.acquire(tmp_path, "train.py run", log=said.append)
    assert len(said) == 1 and f"taking over the lock of pid {proc.pid} on " in said[0]
    assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"
    dirlock.release(lock)
    assert (tmp_path / ".lock").read_text() == ""
    said.clear()
    with dirlock.locked(tmp_path, "x", log=said.append):  # released cleanly: nothing to say
        assert dirlock.holder(tmp_path) is not None
    assert said == [] and dirlock.holder(tmp_path) is None


def test_release_leaves_a_reused_descriptor_alone(tmp_path):
    lock = dirlock.acquire(tmp_path, "x")
    os.close(lock.fd)
    other = tmp_path / "other"
    other.write_text("keep me")
    fd = os.open(other, os.O_RDWR)  # (likely the same number)
    try:
        dirlock.release(lock)
        assert other.read_text() == "keep me"
    finally:
        os.close(fd)
