"""jsonl.py: records split on "\\n" only (U+2028 & co. stay inside strings), torn tails, whole-line appends."""
import json

import pytest

from jsonl import JsonlError, append_jsonl, cut_torn_tail, read_jsonl

SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\r", "\x0b", "\x0c"]


@pytest.mark.parametrize("sep", SEPARATORS)
def test_line_separators_inside_strings_stay_in_one_record(tmp_path, sep):
    path = tmp_path / "a.jsonl"
    rows = [{"text": f"one{sep}two"}, {"text": "three"}]
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    assert [r for _, r in read_jsonl(path)] == rows
    assert [n for n, _ in read_jsonl(path)] == [1, 2]


def test_append_roundtrip_with_separator(tmp_path):
    path = tmp_path / "j.jsonl"
    append_jsonl(path, [{"a": "x\u2028y"}])
    append_jsonl(path, [{"a": 2}, {"a": 3}])
    assert [r for _, r in read_jsonl(path)] == [{"a": "x\u2028y"}, {"a": 2}, {"a": 3}]


def test_torn_tail_is_cut_before_append_and_skipped_when_allowed(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 0}\n{"step": 1, "lo')
    assert [r for _, r in read_jsonl(path, torn_tail_ok=True)] == [{"step": 0}]
    with pytest.raises(JsonlError, match=r"m.jsonl:2: invalid JSON"):
        read_jsonl(path)
    append_jsonl(path, [{"step": 1}])
    assert path.read_bytes() == b'{"step": 0}\n{"step": 1}\n'
    assert cut_torn_tail(path) == 0


def test_damage_inside_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(JsonlError, match=r"d.jsonl:2: invalid JSON"):
        read_jsonl(path, torn_tail_ok=True)  # a complete bad line is damage, not a torn tail


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(JsonlError, match=r"u.jsonl:2: not UTF-8"):
        read_jsonl(path)


def test_failed_append_leaves_whole_records(tmp_path, monkeypatch):
    import os
    path = tmp_path / "f.jsonl"
    append_jsonl(path, [{"a": 1}])
    real_write = os.write

    def short_then_fail(fd, data):  # a full disk: part of the batch lands, then ENOSPC
        if len(data) > 4:
            real_write(fd, bytes(data[:4]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", short_then_fail)
    with pytest.raises(OSError):
        append_jsonl(path, [{"a": 2}, {"a": 3}])
    monkeypatch.undo()
    assert path.read_bytes() == b'{"a": 1}\n'
