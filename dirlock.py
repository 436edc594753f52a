"""
One process per output directory (train.py's out_dir, stage1.py's --out): two writers in one directory
interleave their journals and metrics and delete each other's temporary files.

    lock = acquire(directory, "train.py run") # SystemExit naming the holder if another process has it
    ...                                        # the lock lives as long as lock.fd is open (or the process)
    release(lock)
    with locked(directory, "stage1 run"): ...  # the same, as a context manager
    holder(directory)                          # -> the holder's note, or None when nobody holds it

An flock(2) on directory/.lock: the kernel drops it when its holder exits in any way (kill -9 too), so a
dead holder never blocks a rerun. The file holds the holder's "pid N on HOST" while it is held (emptied
on release), so a refusal names the holder, and a note left by a holder that died without releasing is
reported when the next process takes the lock over. (flock on NFS: Linux maps it to POSIX locks.)
"""
import contextlib
import dataclasses
import fcntl
import os
import socket

LOCK_NAME = ".lock"


def _note(fd):
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()


def holder(directory):
    """The note of the process holding directory's lock now, or None if nobody holds it."""
    try:
        fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDONLY)
    except OSError:  # no lock file (or none readable): nobody holds it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _note(fd) or "a process"
    finally:
        os.close(fd)  # (closing drops the lock if we took it)


@dataclasses.dataclass
class Lock:
    fd: int
    inode: int  # (release checks it: an fd closed by someone else and reused is left alone)


def acquire(directory, what, log=print):
    """Take directory's lock for this process -> a Lock (its fd must stay open). what: who is refused, e.g. "train.py run".
    Another holder: SystemExit naming it. A note of a holder that died without releasing: taken over, with a message."""
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: a refused process must not erase the note
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        note = _note(fd)
        os.close(fd)
        raise SystemExit(f"{directory}: another {what} is using this directory ({note or 'holder unknown'}); "
                         "wait for it to finish, or use another directory") from None
    stale = _note(fd)
    if stale:
        log(f"{path}: taking over the lock of {stale}, which ended without releasing it (killed?)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return Lock(fd, os.fstat(fd).st_ino)


def release(lock):
    try:
        if os.fstat(lock.fd).st_ino != lock.inode:
            return
    except OSError:  # closed already
        return
    os.ftruncate(lock.fd, 0)  # an empty note: released cleanly
    os.close(lock.fd)


@contextlib.contextmanager
def locked(directory, what, log=print):
    lock = acquire(directory, what, log)
    try:
        yield
    finally:
        release(lock)
