"""
JSON Lines, read and appended the one way every file of the project is: records separated by "\n" only.

Why not str.splitlines(): it also splits at U+2028, U+2029, U+0085, \\x1c-\\x1e, \\r and \\v, which
json.dumps(..., ensure_ascii=False) writes raw inside strings. A model reply holding U+2028 is one valid
record on disk, and splitlines() would cut it in two. Splitting on b"\\n" is exact: JSON escapes a newline
inside a string, so a raw "\\n" byte only ever ends a record.

    for lineno, record in read_jsonl(path): ...        # errors name path:line
    append_jsonl(path, [record, ...])                   # whole lines or nothing; a torn tail is cut first
"""
import json
import os
from pathlib import Path


class JsonlError(ValueError):
    """A JSONL file that cannot be read: the message names the file and line."""


def split_records(data, path="<data>"):
    """bytes -> [(line number, decoded line)] for the non-blank lines, split on b"\\n" only."""
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise JsonlError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                             "save the file as UTF-8") from None
        if line.strip():
            out.append((lineno, line))
    return out


def read_jsonl(path, *, torn_tail_ok=False):
    """-> [(line number, record)] of a JSONL file. torn_tail_ok: a last line without its "\\n" that is not
    valid JSON (a crash or a full disk mid-append) is skipped instead of an error."""
    path = Path(path)
    data = path.read_bytes()
    rows = split_records(data, path)
    complete = data.endswith(b"\n")
    records = []
    for i, (lineno, line) in enumerate(rows):
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            if torn_tail_ok and i == len(rows) - 1 and not complete:
                break
            raise JsonlError(f"{path}:{lineno}: invalid JSON: {e}") from None
    return records


def cut_torn_tail(path):
    """Truncate an unfinished last line (no "\\n": a crash or a full disk mid-append). -> bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)
            os.fsync(f.fileno())
    return len(data) - cut


def append_jsonl(path, records):
    """Append records as whole lines, fsync'd. A torn tail is cut first; a failed write (a full disk) is
    cut back to where it started before the error goes up, so the file always ends on a whole record."""
    path = Path(path)
    cut_torn_tail(path)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        os.ftruncate(fd, start)
        raise
    finally:
        os.close(fd)
