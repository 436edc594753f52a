"""
The one reader of tabular input files (benchmarks, stage-1 question and translation files, bench outputs):
.jsonl/.json, .csv, .tsv, .parquet -> rows as dicts, each with the place it came from ("path:line", or
"path row i" where a file has no lines: Parquet, a JSON array), so every error about a row can name it.

- JSONL through jsonl.read_jsonl: records split on "\\n" only. str.splitlines() would also split at
  U+2028, U+2029 and U+0085, which are legal raw inside a JSON string, and reject a valid file.
- Text files must be UTF-8 (a byte-order mark is dropped): anything else is an error naming the line.
- CSV/TSV: a row with more or fewer fields than the header (an unquoted comma, a tab inside a question) is
  an error naming the file and line: it would shift the options and the gold answer. TSV is read with
  QUOTE_NONE, as the public MGSM files are written (a '"' is an ordinary character there).
"""
import csv
import io
import json
from pathlib import Path

from jsonl import read_jsonl

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def check_utf8(path, data=None):
    """A text file that is not UTF-8 -> ValueError naming the line. -> the decoded text."""
    data = Path(path).read_bytes() if data is None else data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{data[start]:02x} at offset {start}); "
                         "save the file as UTF-8") from None


def read_table(path, headerless=None):
    """-> [(where, row dict)] of a .jsonl/.json/.csv/.tsv/.parquet file. headerless: column names to use
    when a CSV/TSV's first row is data rather than a header (detected: it lacks the first of these names)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), "
                             "or convert the file to .jsonl / .csv") from None
        return [(f"{path} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    if ext not in EXTENSIONS:
        raise ValueError(f"{path}: unsupported file type {ext!r} (expected {', '.join(EXTENSIONS)})")
    data = path.read_bytes()
    text = check_utf8(path, data)
    if ext == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
        return [(f"{path} row {i}", r) for i, r in enumerate(rows, 1)]
    if ext in (".jsonl", ".json"):
        return [(f"{path}:{lineno}", r) for lineno, r in read_jsonl(path)]
    if ext == ".tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    raw = [(reader.line_num, r) for r in reader if any(cell.strip() for cell in r)]  # (last line, row)
    if not raw:
        return []
    header = [h.strip() for h in raw[0][1]]
    if headerless and headerless[0] not in header and len(raw[0][1]) == len(headerless):
        header, body = list(headerless), raw
    else:
        body = raw[1:]
    sep = "tab" if ext == ".tsv" else "comma"
    for line, r in body:
        if len(r) != len(header):
            raise ValueError(f"{path}:{line}: {len(r)} fields where the header has {len(header)} "
                             f"({', '.join(header)}): an unquoted {sep} inside a field? Quote the field")
    return [(f"{path}:{line}", dict(zip(header, r))) for line, r in body]


def read_rows(path, headerless=None):
    """Rows of a file as dicts (read_table without the places)."""
    return [row for _, row in read_table(path, headerless)]
