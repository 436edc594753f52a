"""
The one settings parser of the scripts (train.py, sample.py): nanoGPT style. A script's settings
are plain module globals with defaults; the command line lists config files (python, exec'd) and
--key=value overrides, applied in order:

    python train.py configs/phi35.py --init_from=/ckpt/Phi-3.5-MoE-instruct --lr=1e-5

    settings, sources = configure(argv, defaults)       # defaults: {key: default value}
    validate(settings, sources, rules)                  # rules: {key: check(value) -> problem or None}

- A key that is not a setting, or a value of another type than the default, is an error naming the
  key and where it came from (file:line, or "command line"). "--key value" works too. An int is accepted for a float; a list
  for a tuple. For a str setting the command-line text is taken as is (--prompt=42 is the string "42").
- A config file's syntax error (or any exception while running it) names the file and line.
- sources[key] says where each value came from ("default", "configs/x.py:12", "command line"), so
  that later checks (validate, or a script's own) can name it too.
- --help (or -h) prints the script's docstring and every setting with its default (and the comment
  written next to it in the script) and exits 0.
"""
import ast
import io
import re
import sys
import tokenize
import traceback

__all__ = ["ConfigError", "configure", "validate", "one_of", "at_least", "in_range", "inline_comments"]


class ConfigError(SystemExit):
    """A bad setting: the message names the key and where it came from. A SystemExit, so a
    script exits with the message and no traceback."""


def _type_name(x):
    return type(x).__name__


def _coerce(key, value, default, where):
    """value, converted where harmless (int -> float, list -> tuple), or a ConfigError."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if type(value) is not type(default):
        raise ConfigError(f"{where}: {key}={value!r} is a {_type_name(value)}, expected {_type_name(default)} "
                          f"(default {default!r})")
    return value


def _run_config_file(path):
    """{name: (value, line)} of the top-level settings a config file assigns."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not UTF-8 text ({err})") from None
    try:
        code = compile(source, path, "exec")
        tree = ast.parse(source, path)
    except SyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: syntax error in config file: {err.msg}") from None
    lines = {}
    for node in tree.body:  # the line of each top-level assignment (the last one wins)
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for name in ast.walk(t):
                if isinstance(name, ast.Name):
                    lines[name.id] = node.lineno
    scope = {}
    try:
        exec(code, scope)
    except Exception as err:  # name the config file's line, not this module's
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == path]
        line = frames[-1].lineno if frames else "?"
        raise ConfigError(f"{path}:{line}: {type(err).__name__} while running config file: {err}") from None
    return {k: (v, lines.get(k, "?")) for k, v in scope.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def inline_comments(path):
    """{name: comment} for each top-level `name = value  # comment` (or `name: type = value  # comment`)
    of a Python file: the settings' documentation, printed by --help."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments = {}
    lines = source.splitlines()
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type == tokenize.COMMENT:
            m = re.match(r"\s*(\w+)\s*(:[^=]*)?=", lines[t.start[0] - 1])
            if m and m.group(1) not in comments:
                comments[m.group(1)] = t.string.lstrip("#").strip()
    return comments


def help_text(defaults, doc=None, comments=None):
    """The script's docstring, then each setting as --key=default  # comment."""
    if comments is None:
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        comments = inline_comments(main_file) if main_file and main_file.endswith(".py") else {}
    lines = [(doc or "").strip(), "", "settings (defaults; change them with config files or --key=value):"]
    for key, value in defaults.items():
        lines.append(f"  --{key}={value!r}" + (f"  # {comments[key]}" if key in comments else ""))
    return "\n".join(lines).strip() + "\n"


def configure(argv, defaults, renamed=None, doc=None, comments=None):
    """Apply config files and --key=value overrides from argv (in order) to a copy of defaults.
    renamed: {old key: what to say instead} for settings that were renamed.
    doc, comments: what --help prints (default: the docstring and inline comments of the script run).
    -> (settings dict, sources dict {key: "default" | "file:line" | "command line"})."""
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(defaults, doc if doc is not None else getattr(sys.modules.get("__main__"), "__doc__", None),
                        comments), end="")
        raise SystemExit(0)
    settings, sources = dict(defaults), {k: "default" for k in defaults}
    while argv:
        arg = argv.pop(0)
        if arg.startswith("--"):
            if "=" in arg:
                key, text = arg[2:].split("=", 1)
            elif argv and not argv[0].startswith("--"):  # "--key value" (argparse style)
                key, text = arg[2:], argv.pop(0)
            else:
                raise ConfigError(f"command line: {arg!r}: expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = text  # a bare string
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                value = text  # str settings take the text as written
            updates = {key: (value, None)}
            origin = "command line"
        elif arg.endswith(".py"):
            updates, origin = _run_config_file(arg), arg
        else:
            raise ConfigError(f"command line: {arg!r} is neither a config file (*.py) nor --key=value")
        for key, (value, line) in updates.items():
            where = origin if line is None else f"{origin}:{line}"
            if key in (renamed or {}):
                raise ConfigError(f"{where}: {key!r} was renamed: {renamed[key]}")
            if key not in defaults:
                raise ConfigError(f"{where}: unknown config key {key!r}; valid keys: {', '.join(sorted(defaults))}")
            settings[key] = _coerce(key, value, defaults[key], where)
            sources[key] = where
    return settings, sources


def validate(settings, sources, rules):
    """rules: {key: check}, check(value) -> None if fine, else a phrase saying what is wrong. Every
    problem is reported at once, each naming key, value and source."""
    problems = []
    for key, check in rules.items():
        problem = check(settings[key])
        if problem:
            problems.append(f"{key}={settings[key]!r} ({sources.get(key, 'default')}): {problem}")
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


# -----------------------------------------------------------------------------
# common checks for validate()

def one_of(*allowed):
    return lambda v: None if v in allowed else f"must be one of {list(allowed)}"


def at_least(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}"


def in_range(lo, hi, lo_open=False, hi_open=False):
    def check(v):
        ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return check
