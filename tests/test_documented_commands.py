"""
Every command that README.md, docs/*.md and the entry points' docstrings show is run by the suite.

How: each documented command, exactly as written (whitespace normalised, a trailing "# comment" and
"\\" line continuations folded), is listed in COVERAGE with the test that runs it, scaled down only where
the doc gives a quick mode or a flag only changes sizes or paths (a real checkpoint replaced by a tiny one).
The checks:
- a documented command that COVERAGE lacks fails (add its test, then its row), and a row whose command
  is no longer documented fails (the table cannot rot);
- the covering test exists, and every flag and setting the documented command passes appears in the
  source of that test's module: a flag added to a doc but never exercised fails;
- commands of other projects (vLLM, SGLang: the servers a user starts) are listed as EXTERNAL; they are
  not ours to run, and the client side of them is run against `transformers serve` (test_real_server).
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = "external"


def doc_sources():
    """-> [(path, text)] of every place that shows commands: README, docs/*.md, entry-point docstrings."""
    out = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    out += sorted(ROOT.glob("*.py")) + sorted((ROOT / "experiments").glob("*.py"))
    return out


def _blocks(path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        return [m.group(1) for m in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S)]
    return [ast.get_docstring(ast.parse(text)) or ""]


def documented_commands():
    """-> {command: [where it is shown]} for every line of a code block (or docstring) that runs python,
    torchrun or one of the servers."""
    found = {}
    for path in doc_sources():
        for block in _blocks(path):
            lines, i = block.split("\n"), 0
            while i < len(lines):
                line = lines[i].strip()
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1].rstrip() + " " + lines[i].strip()
                i += 1
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if re.match(r"^(python3?|torchrun|vllm|transformers serve)\b", line) or "&& python" in line:
                    found.setdefault(re.sub(r"\s+", " ", line), []).append(str(path.relative_to(ROOT)))
    return found


def flags(command):
    """The flags and settings a command passes: --name, --name=value, name=value after the script."""
    names = set(re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", command))
    return {n for n in names if n not in ("nproc_per_node",)}


# command (as documented) -> ("tests/test_x.py", "test_name") that runs it, or EXTERNAL
COVERAGE = {}


def test_every_documented_command_has_a_test_and_every_row_a_command():
    documented = documented_commands()
    missing = {c: w for c, w in documented.items() if c not in COVERAGE}
    stale = [c for c in COVERAGE if c not in documented]
    assert not missing, "documented commands that no test runs (add a test, then a COVERAGE row):\n" + "\n".join(
        f"  {c!r}  ({', '.join(sorted(set(w)))})" for c, w in missing.items())
    assert not stale, f"COVERAGE rows whose command is documented nowhere: {stale}"


@pytest.mark.parametrize("command", sorted(COVERAGE))
def test_the_covering_test_exists_and_passes_the_documented_flags(command):
    where = COVERAGE[command]
    if where == EXTERNAL:
        assert re.match(r"^(vllm|python -m sglang|transformers serve)", command), f"{command!r} is ours, not external"
        return
    file, name = where
    source = (ROOT / file).read_text(encoding="utf-8")
    assert re.search(rf"^def {name}\(", source, re.M), f"{file} has no test {name} (for {command!r})"
    unexercised = [f for f in flags(command) if f not in source and f.replace("-", "_") not in source]
    assert not unexercised, f"{file} never passes {unexercised} of the documented {command!r}"
