"""
Input files of stage 1 (stage1.py). Question files: MMLU-Pro / MMLU-ProX multiple choice and GSM8K math rows,
read with the one reader of input files (data/rows.py) and turned into items
{"group", "source", "question", "choices" (list) or None, "answer", "prompt"}. A bad row is a
ValueError naming the file and line (row for Parquet). Prompts and gold answer formats are the
evaluation's (data/prompts.py), so stage 1 trains on the prompts the model is evaluated with.
Translation files (--translator file): rows id, lang, prompt, response. The accepted formats are listed
in stage1.py's docstring.
"""
import ast
import json
import re
from pathlib import Path

from data.prompts import LETTERS, TEMPLATES, build_prompt, gold_letter, gold_number
from data.rows import read_table

def _text(value, what, where):
    """A cell that must be text: a number is written out (a numeric option), anything else is an error,
    never str(None) or a list's repr in a prompt."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = "None" if value is None else type(value).__name__
    raise ValueError(f"{where}: {what} is {kind}; options must be text")


def _options(row, where):
    """The row's options as strings, padding not yet removed (the gold decides how much may go)."""
    if "options" not in row and "option_0" not in row:  # a file's kind comes from its first row
        raise ValueError(f"{where}: no 'options' (nor option_0..option_9); the file's first row is multiple "
                         "choice, so every row must be (one kind per file)")
    if "options" in row:
        opts = row["options"]
        if isinstance(opts, str):  # a CSV cell: a JSON list, or a Python list literal
            try:
                opts = json.loads(opts)
            except json.JSONDecodeError:
                try:
                    opts = ast.literal_eval(opts)
                except (ValueError, SyntaxError):
                    raise ValueError(f"{where}: 'options' is not a list: {opts[:80]!r}") from None
        if not isinstance(opts, (list, tuple)):
            raise ValueError(f"{where}: 'options' must be a list of strings, got {type(opts).__name__}")
        return [_text(o, f"option {i}", where) for i, o in enumerate(opts, 1)]
    cells = [row.get(f"option_{i}") for i in range(len(LETTERS))]
    while cells and cells[-1] in (None, ""):
        cells.pop()
    gaps = [f"option_{i}" for i, c in enumerate(cells) if c in (None, "")]
    if gaps:  # skipping it would shift every later letter
        raise ValueError(f"{where}: {gaps[0]} is empty but later options are not")
    return [_text(c, f"option_{i}", where) for i, c in enumerate(cells)]


def _trim_padding(opts, gold, where):
    """MMLU-Pro v1.1 pads to 10 options with "N/A": drop trailing ones, never the gold."""
    opts = list(opts)
    while len(opts) > LETTERS.index(gold) + 1 and opts[-1].strip() == "N/A":
        opts.pop()
    if not 2 <= len(opts) <= len(LETTERS):
        raise ValueError(f"{where}: {len(opts)} options; expected 2 to {len(LETTERS)}")
    return opts


def _mc_gold(row, n, where):
    letter = index = None
    if row.get("answer") not in (None, ""):
        letter = gold_letter(row["answer"], n, where)
    if row.get("answer_index") not in (None, ""):
        value = row["answer_index"]  # an int, or its digits (CSV); never 1.5 rounded down, nor True as 1
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        index = int(value) if is_int or (isinstance(value, str) and value.strip().isdigit()) else -1
        if not 0 <= index < n:
            raise ValueError(f"{where}: answer_index {row['answer_index']!r} is not in 0-{n - 1}")
    if letter is None and index is None:
        raise ValueError(f"{where}: no gold answer (answer or answer_index)")
    if letter is not None and index is not None and LETTERS[index] != letter:
        raise ValueError(f"{where}: answer {letter!r} and answer_index {index} disagree")
    return letter or LETTERS[index]


def _math_gold(row, where):
    text = str(row["answer"])
    if "####" not in text:
        raise ValueError(f"{where}: answer has no '#### <number>' (GSM8K format)")
    gold = text.rsplit("####", 1)[1].strip()
    try:
        gold_number(gold, where)
    except ValueError:
        raise ValueError(f"{where}: the answer after '####' is not a number: {gold!r}") from None
    return gold


def mc_prompt(question, choices):
    """The Global-MMLU instruction with this item's letters; for 4 options exactly the evaluation's."""
    letters = LETTERS[:len(choices)]
    listing = ", ".join(letters[:-1]) + " or " + letters[-1]
    head = TEMPLATES["global_mmlu"].split("\n\n")[0]
    if "(A, B, C or D)" not in head:
        raise RuntimeError("evaluation's global_mmlu template changed: update stage1.mc_prompt")
    head = head.replace("(A, B, C or D)", f"({listing})")
    return head + "\n\n" + question + "\n\n" + "\n".join(f"{l}. {c}" for l, c in zip(letters, choices))


def row_to_item(row, kind, source, index, where):
    if not isinstance(row, dict) or row.get("question") in (None, ""):
        raise ValueError(f"{where}: no 'question'")
    if not isinstance(row["question"], str):
        raise ValueError(f"{where}: 'question' must be text, got {type(row['question']).__name__}")
    if not row["question"].strip():
        raise ValueError(f"{where}: no 'question'")
    if kind == "mc":
        opts = _options(row, where)
        if len(opts) < 2:
            raise ValueError(f"{where}: {len(opts)} options; expected 2 to {len(LETTERS)}")
        answer = _mc_gold(row, min(len(opts), len(LETTERS)), where)
        choices = _trim_padding(opts, answer, where)
        item_id = str(row.get("question_id") if row.get("question_id") not in (None, "") else index)
        prompt = mc_prompt(row["question"], choices)
    else:
        choices, answer, item_id = None, _math_gold(row, where), str(index)
        prompt = build_prompt(dict(question=row["question"], passage=None, choices=None), TEMPLATES["mgsm"])
    return dict(group=f"{source}-{item_id}", source=source, question=row["question"], choices=choices,
                answer=answer, prompt=prompt)


def load_questions(spec):
    """--questions "name=path,path2" -> items of every file, in file order. Raises ValueError naming
    the file and line of the first bad row, or the columns found when a file's kind is unknown."""
    items, seen = [], {}
    for part in [p for p in spec.split(",") if p.strip()]:
        named = re.fullmatch(r"\s*([\w.-]+)=(.+)", part)  # "name=path"; a path may hold "=" itself
        name, path = named.groups() if named else (Path(part.strip()).stem, part)
        path, name = Path(path.strip()), re.sub(r"[^\w.]+", "_", name.strip())
        if not path.is_file():
            raise ValueError(f"--questions: {path}: no such file")
        table = read_table(path)
        rows = [row for _, row in table]
        if not rows:
            raise ValueError(f"{path}: no rows")
        cols = set(rows[0]) if isinstance(rows[0], dict) else set()
        if "options" in cols or "option_0" in cols:
            kind = "mc"
        elif {"question", "answer"} <= cols:
            kind = "math"
        else:
            raise ValueError(f"{path}: unknown question format, columns {sorted(cols)}; expected MMLU-Pro "
                             "(question, options or option_0..9, answer/answer_index) or GSM8K (question, answer)")
        places = [where for where, _ in table]
        for i, row in enumerate(rows):
            it = row_to_item(row, kind, name, i + 1, places[i])
            if it["group"] in seen:
                other = not seen[it["group"]].startswith(f"{path}:") and not seen[it["group"]].startswith(f"{path} ")
                hint = "; two files share a name: give the files names (--questions a=PATH,b=PATH)" if other else ""
                raise ValueError(f"{places[i]}: duplicate id {it['group']!r} (first at {seen[it['group']]}){hint}")
            seen[it["group"]] = places[i]
            items.append(it)
    return items


def load_translation_file(path):
    """A JSONL/CSV/Parquet file with id ("<group>-<lang>"), lang, prompt, response -> {(group, lang): (p, r)}."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--translations {path}: no such file")
    table = {}
    for where, row in read_table(path):
        missing = [k for k in ("id", "lang", "prompt", "response") if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{where}: missing {missing}; a translation row needs id, lang, prompt, response")
        wrong = [k for k in ("id", "lang", "prompt", "response")
                 if not isinstance(row[k], str) and not (k in ("prompt", "response") and row[k] is None)]
        if wrong:  # str() would put "['...']" or "None" into the training data
            raise ValueError(f"{where}: {wrong[0]!r} is {type(row[wrong[0]]).__name__}, not text")
        rid, lang = row["id"], row["lang"]
        if not rid.endswith("-" + lang) or rid == "-" + lang:
            raise ValueError(f"{where}: id {rid!r} does not end with '-{lang}' (ids are '<group>-<lang>')")
        key = (rid[:-len(lang) - 1], lang)
        if key in table:
            raise ValueError(f"{where}: duplicate translation {rid!r}")
        table[key] = (row["prompt"] or "", row["response"] or "")
    return table


def translation_notes(table, items, langs, path):
    """What in a translation file matches nothing (each such item would be no_translation): said up front."""
    groups, notes = {it["group"] for it in items}, []
    stray = sorted({lang for _, lang in table if lang not in langs})
    unmatched = sum(g not in groups for g, lang in table if lang in langs)
    if stray:
        notes.append(f"{path} has rows in languages not in --langs: {','.join(stray)}")
    if unmatched:
        notes.append(f"{unmatched} rows of {path} match no item of --questions (ids are "
                     f"'<name>-<item id>-<lang>', e.g. '{items[0]['group']}-{next(iter(langs))}')")
    return notes
