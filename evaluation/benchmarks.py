"""
The paper's benchmarks (Global-MMLU, BELEBELE, MGSM) read from local files in their public row formats (no
hub access), one language at a time, and the prompts built from them.

  global_mmlu  question, option_a..option_d, answer (letter A-D) [, sample_id, subject]
  belebele     flores_passage, question, mc_answer1..mc_answer4, correct_answer_num (1-4), dialect
               [, link, question_number]
  mgsm         question, answer_number   (the public mgsm_<lang>.tsv has no header: question<TAB>number)

Files: .jsonl/.json, .csv, .tsv (read with QUOTE_NONE, as the public MGSM files are written), .parquet (only
if pyarrow is importable). A CSV/TSV row with more or fewer fields than the header (an unquoted comma, a tab
inside a question) is an error naming the file and line: it would shift the options and the gold answer.
--data is a file, a directory searched for one file per language (the path must contain the language code
or its FLORES-200 code as a separate part: sw/test.parquet, mgsm_sw.tsv, swh_Latn.jsonl; a name with
"test" wins over others), or a pattern with {lang}. A file holding several languages is filtered on its
`dialect` / `lang` / `language` column; one file WITHOUT such a column given for several languages is an
error (it would be scored as each of them).

Items: {id, lang, question, passage, choices (4 str) or None, answer, parallel}. `parallel` is True when the
id names the same (translated) item in every language, which the joint bootstrap of stats.py needs:
Global-MMLU `sample_id`, BELEBELE `link` + `question_number`, MGSM the row index (the public MGSM files
are parallel by row). A Global-MMLU or BELEBELE file without those columns gets the row index as id and
parallel=False.

Prompt templates: built-in English instructions (TEMPLATES); a JSON file (--templates) may replace them per
benchmark and language: {"mgsm": {"default": "...", "sw": "..."}, "global_mmlu/loglik": {...}} (or, for the
one benchmark being run, {"sw": "...", "default": "..."}). Placeholders: {question} {passage} {A} {B} {C} {D};
every other brace is literal, so "\\boxed{}" (and "\\boxed{A}" as an example) is written as is.
"""
import csv
import glob
import json
import re
from pathlib import Path

from evaluation.scoring import LETTERS, parse_number

BENCHMARKS = ("global_mmlu", "belebele", "mgsm")
BENCH_TITLES = {"global_mmlu": "Global-MMLU", "belebele": "BELEBELE", "mgsm": "MGSM"}
# ISO 639-1 -> FLORES-200 (BELEBELE's `dialect` and file names); a FLORES code may also be given directly
FLORES = {"en": "eng_Latn", "zh": "zho_Hans", "sw": "swh_Latn", "hi": "hin_Deva", "bn": "ben_Beng",
          "te": "tel_Telu", "ne": "npi_Deva", "yo": "yor_Latn", "ha": "hau_Latn", "am": "amh_Ethi",
          "zu": "zul_Latn", "xh": "xho_Latn", "ig": "ibo_Latn", "so": "som_Latn", "fr": "fra_Latn",
          "es": "spa_Latn", "de": "deu_Latn", "ja": "jpn_Jpan", "ru": "rus_Cyrl", "th": "tha_Thai",
          "ar": "arb_Arab", "ko": "kor_Hang", "pt": "por_Latn", "id": "ind_Latn", "vi": "vie_Latn"}
_MC_BODY = "{question}\n\nA. {A}\nB. {B}\nC. {C}\nD. {D}"
_PASSAGE_BODY = "Passage: {passage}\n\nQuestion: {question}\n\nA. {A}\nB. {B}\nC. {C}\nD. {D}"
_THINK_MC = ("Think step by step, then write the letter of the correct option (A, B, C or D) "
             "in \\boxed{}, for example \\boxed{A}.")
_LETTER_MC = "Answer with the letter of the correct option (A, B, C or D) only."
TEMPLATES = {
    "global_mmlu": "Answer the following multiple choice question. " + _THINK_MC + "\n\n" + _MC_BODY,
    "belebele": "Read the passage and answer the multiple choice question about it. " + _THINK_MC
                + "\n\n" + _PASSAGE_BODY,
    "mgsm": "Solve the following math problem step by step. Write the final answer as a number in "
            "\\boxed{}, for example \\boxed{42}.\n\n{question}",
    "global_mmlu/loglik": "Answer the following multiple choice question. " + _LETTER_MC + "\n\n" + _MC_BODY,
    "belebele/loglik": "Read the passage and answer the multiple choice question about it. " + _LETTER_MC
                       + "\n\n" + _PASSAGE_BODY,
}
_SLOT = re.compile(r"(?<!\\boxed)\{(question|passage|A|B|C|D)\}")  # "\boxed{A}" stays literal


# -----------------------------------------------------------------------------
# benchmark files -> items {"id", "lang", "question", "passage", "choices" (4 str) or None, "answer"}

def read_rows(path, headerless=None):
    """Rows of a .jsonl/.json/.csv/.tsv/.parquet file as dicts. headerless: column names to use when a
    CSV/TSV's first row is data rather than a header (detected: it lacks the first of these names)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8-sig")
        if ext == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None
        return rows
    if ext in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            if ext == ".tsv":  # the public MGSM files are unquoted: a '"' is an ordinary character
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(f)
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
        return [dict(zip(header, r)) for _, r in body]
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), "
                             "or convert the file to .jsonl / .csv") from None
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported file type {ext!r} (expected .jsonl, .json, .csv, .tsv or .parquet)")


def lang_aliases(lang):
    """The codes a file name or a language column may use for `lang` (ISO 639-1 and FLORES-200)."""
    out = [lang, FLORES.get(lang)] + [k for k, v in FLORES.items() if v == lang]
    return [a for a in dict.fromkeys(out) if a]


def find_lang_file(data, lang):
    """--data (file, directory or pattern with {lang}) -> the file holding `lang`'s rows."""
    if "{lang}" in str(data):
        for alias in lang_aliases(lang):
            hits = sorted(glob.glob(str(data).replace("{lang}", alias)))
            if hits:
                return Path(hits[0])
        raise SystemExit(f"no file matches {data} for language {lang} (tried {lang_aliases(lang)})")
    data = Path(data)
    if data.is_file():
        return data
    if not data.is_dir():
        raise SystemExit(f"--data {data}: no such file or directory")
    exts = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
    files = [p for p in sorted(data.rglob("*")) if p.is_file() and p.suffix.lower() in exts]
    names = "|".join(re.escape(a) for a in lang_aliases(lang))
    pattern = re.compile(rf"(^|[/_.\-])({names})([/_.\-]|$)")
    hits = [p for p in files if pattern.search(p.relative_to(data).as_posix())]
    if len(hits) > 1:
        hits = [p for p in hits if "test" in p.relative_to(data).as_posix()] or hits
    if len(hits) != 1:
        found = ", ".join(str(p.relative_to(data)) for p in hits) or "none"
        raise SystemExit(f"{data}: expected one file for language {lang} ({'/'.join(lang_aliases(lang))} as a "
                         f"path part); found {found}. Pass a file, or a pattern with {{lang}}")
    return hits[0]


def _gold_letter(value, where):
    s = str(value).strip().strip("()").rstrip(".").upper()
    if s not in LETTERS or not s:
        raise ValueError(f"{where}: answer {value!r} is not one of A, B, C, D")
    return s


def _row_to_item(benchmark, row, index, lang, where):
    missing = [k for k in REQUIRED[benchmark] if k not in row]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; {benchmark} rows need {list(REQUIRED[benchmark])}")
    if benchmark == "global_mmlu":
        return dict(id=str(row.get("sample_id") or index), lang=lang, question=row["question"], passage=None,
                    choices=[str(row[f"option_{c}"]) for c in "abcd"], answer=_gold_letter(row["answer"], where),
                    parallel=bool(row.get("sample_id")))
    if benchmark == "belebele":
        num = str(row["correct_answer_num"]).strip()
        if num not in ("1", "2", "3", "4"):
            raise ValueError(f"{where}: correct_answer_num {row['correct_answer_num']!r} is not 1-4")
        parallel = bool(row.get("link") and row.get("question_number"))
        rid = f"{row['link']}#{row['question_number']}" if parallel else index
        return dict(id=str(rid), lang=lang, question=row["question"], passage=row["flores_passage"],
                    choices=[str(row[f"mc_answer{i}"]) for i in range(1, 5)], answer=LETTERS[int(num) - 1],
                    parallel=parallel)
    gold = parse_number(str(row["answer_number"]))
    if gold is None:
        raise ValueError(f"{where}: answer_number {row['answer_number']!r} is not a number")
    return dict(id=str(index), lang=lang, question=row["question"], passage=None, choices=None,
                answer=str(row["answer_number"]).strip(), parallel=True)  # MGSM: parallel by row


LANG_COLUMNS = ("dialect", "lang", "language")
REQUIRED = {
    "global_mmlu": ("question", "option_a", "option_b", "option_c", "option_d", "answer"),
    "belebele": ("flores_passage", "question", "mc_answer1", "mc_answer2", "mc_answer3", "mc_answer4",
                 "correct_answer_num"),
    "mgsm": ("question", "answer_number"),
}


def load_benchmark(benchmark, data, lang, limit=None):
    """-> (items, path) for one language. A file with a language column keeps only `lang`'s rows."""
    items, path, _ = _load(benchmark, data, lang, limit)
    return items, path


def _load(benchmark, data, lang, limit):
    if benchmark not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    path = find_lang_file(data, lang)
    rows = read_rows(path, headerless=REQUIRED["mgsm"] if benchmark == "mgsm" else None)
    col = next((c for c in LANG_COLUMNS if rows and c in rows[0]), None)
    if col is not None:
        rows = [r for r in rows if r[col] in lang_aliases(lang)]
    if not rows:
        raise SystemExit(f"{path}: no {benchmark} rows for language {lang}")
    rows = rows[:limit] if limit else rows
    items = [_row_to_item(benchmark, r, i, lang, f"{path} row {i + 1}") for i, r in enumerate(rows)]
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate item ids (paired comparisons need unique ids)")
    return items, path, col


def load_benchmarks(benchmark, data, langs, limit=None, progress=None):
    """-> {lang: items} for several languages. One file without a language column serving two languages
    is an error: its rows would be scored as each of them."""
    out, seen = {}, {}
    for lang in langs:
        out[lang], path, col = _load(benchmark, data, lang, limit)
        if col is None:
            if path in seen:
                raise SystemExit(f"{path}: one file for languages {seen[path]} and {lang}, and it has no language "
                                 f"column ({'/'.join(LANG_COLUMNS)}): give one file per language (a directory or a "
                                 "pattern with {lang})")
            seen[path] = lang
        if progress:
            progress(f"{lang}: {len(out[lang])} items from {path}")
    return out


# -----------------------------------------------------------------------------
# prompts

def load_templates(path, benchmark):
    """A --templates JSON file -> {key: {lang | "default": template}} (see the module docstring)."""
    if not path:
        return {}
    with open(path, encoding="utf-8-sig") as f:
        spec = json.load(f)
    keys = set(BENCHMARKS) | {f"{b}/loglik" for b in BENCHMARKS}
    if not any(k in keys for k in spec):  # {"sw": "...", "default": "..."} for the benchmark being run
        spec = {benchmark: spec}
    return spec


def get_template(templates, benchmark, protocol, lang):
    key = benchmark + ("/loglik" if protocol == "loglik" else "")
    user = templates.get(key, {})
    user = {"default": user} if isinstance(user, str) else user  # one template for every language
    template = user.get(lang) or user.get("default") or TEMPLATES.get(key)
    if template is None:
        raise SystemExit(f"no template for {key}: the {protocol} protocol does not apply to {benchmark}")
    need = {"question"} | ({"A", "B", "C", "D"} if benchmark != "mgsm" else set()) | (
        {"passage"} if benchmark == "belebele" else set())
    missing = need - set(_SLOT.findall(template))
    if missing:
        raise SystemExit(f"template for {key} ({lang}) lacks placeholder(s) {sorted(missing)}: {template!r}")
    return template


def build_prompt(item, template):
    """Fill {question} {passage} {A}..{D}; any other brace (e.g. \\boxed{}) stays literal."""
    values = dict(question=item["question"], passage=item["passage"] or "")
    values.update(zip(LETTERS, item["choices"] or [""] * 4))
    return _SLOT.sub(lambda m: str(values[m.group(1)]), template)

