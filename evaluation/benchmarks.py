"""
The paper's benchmarks (Global-MMLU, BELEBELE, MGSM) read from local files in their public row formats (no
hub access), one language at a time, and the prompts built from them. Each benchmark is ONE record
(Benchmark, in the plain dict BENCHMARKS): its columns, how a row becomes an item, what its gold answer
looks like, which protocols apply, the template placeholders it needs, its harness prompt, and an example
row (docs/evaluation.md shows the same rows; a test loads them). An unknown name is an error listing them.

  global_mmlu  question, option_a..option_d, answer (one letter A-D) [, sample_id, subject]
  belebele     flores_passage, question, mc_answer1..mc_answer4, correct_answer_num (1-4), dialect
               [, link, question_number]
  mgsm         question, answer_number   (the public mgsm_<lang>.tsv has no header: question<TAB>number)

Files (read by data/rows.py): .jsonl/.json, .csv, .tsv, .parquet. --data is a file, a directory searched
for one file per language (the path must contain the language code or its FLORES-200 code as a separate
part: sw/test.parquet, mgsm_sw.tsv, swh_Latn.jsonl; a name with "test" wins over others), or a pattern with
{lang}. A file holding several languages is filtered on its `dialect` / `lang` / `language` column; one
file WITHOUT such a column given for several languages is an error (it would be scored as each of them).

Items: {id, lang, question, passage, choices (4 str) or None, answer, parallel}. `parallel` is True when the
id names the same (translated) item in every language, which the joint bootstrap of stats.py needs:
Global-MMLU `sample_id`, BELEBELE `link` + `question_number`, MGSM the row index (the public MGSM files
are parallel by row). A Global-MMLU or BELEBELE file without those columns gets the row index as id and
parallel=False. A gold answer that is not of the benchmark's format (e.g. "BC" for Global-MMLU) is an
error naming the file, line and id: such an item could never be scored correct.

Prompt templates (protocols generative and loglik): built-in English instructions (data/prompts.py); a JSON
file (--templates) may replace them per benchmark and language: {"mgsm": {"default": "...", "sw": "..."},
"global_mmlu/loglik": {...}} (or, for the one benchmark being run, {"sw": "...", "default": "..."}). A key
that is neither a benchmark key nor "default" nor a language code is an error listing the valid ones (a
misspelt key would otherwise fall back to the default template without a word). Placeholders: {question}
{passage} {A} {B} {C} {D}; every other brace is literal, so "\\boxed{}" is written as is.

The harness protocol (harness_prompt) asks as lm-evaluation-harness 0.4.13's task files do: no chat
template; Global-MMLU "<question>\\nA. <a>\\n...D. <d>\\nAnswer:", BELEBELE
"P: <passage>\\nQ: <question>\\nA: <a>\\n...D: <d>\\nAnswer:", MGSM "<prefix><question>\\n<cue>" in the
language's words (mgsm_direct, e.g. "Swali: <question>\\nAnswer:").
"""
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data.prompts import LETTERS, SLOT, TEMPLATES, build_prompt, gold_letter, gold_number  # noqa: F401 (re-exported)
from data.rows import EXTENSIONS, read_rows, read_table  # noqa: F401 (read_rows re-exported)

PROTOCOLS = ("generative", "loglik", "harness")
# ISO 639-1 -> FLORES-200 (BELEBELE's `dialect` and file names); a FLORES code may also be given directly
FLORES = {"en": "eng_Latn", "zh": "zho_Hans", "sw": "swh_Latn", "hi": "hin_Deva", "bn": "ben_Beng",
          "te": "tel_Telu", "ne": "npi_Deva", "yo": "yor_Latn", "ha": "hau_Latn", "am": "amh_Ethi",
          "zu": "zul_Latn", "xh": "xho_Latn", "ig": "ibo_Latn", "so": "som_Latn", "fr": "fra_Latn",
          "es": "spa_Latn", "de": "deu_Latn", "ja": "jpn_Jpan", "ru": "rus_Cyrl", "th": "tha_Thai",
          "ar": "arb_Arab", "ko": "kor_Hang", "pt": "por_Latn", "id": "ind_Latn", "vi": "vie_Latn"}
# -----------------------------------------------------------------------------
# benchmark files -> items {"id", "lang", "question", "passage", "choices" (4 str) or None, "answer"}

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
    files = [p for p in sorted(data.rglob("*")) if p.is_file() and p.suffix.lower() in EXTENSIONS]
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


def _mmlu_item(row, index, lang, where):
    rid = str(row.get("sample_id") or index)
    return dict(id=rid, lang=lang, question=row["question"], passage=None,
                choices=[str(row[f"option_{c}"]) for c in "abcd"],
                answer=gold_letter(row["answer"], 4, f"{where} (id {rid})"), parallel=bool(row.get("sample_id")))


def _belebele_item(row, index, lang, where):
    parallel = bool(row.get("link") and row.get("question_number"))
    rid = str(f"{row['link']}#{row['question_number']}" if parallel else index)
    num = str(row["correct_answer_num"]).strip()
    if num not in ("1", "2", "3", "4"):
        raise ValueError(f"{where} (id {rid}): correct_answer_num {row['correct_answer_num']!r} is not 1-4")
    return dict(id=rid, lang=lang, question=row["question"], passage=row["flores_passage"],
                choices=[str(row[f"mc_answer{i}"]) for i in range(1, 5)], answer=LETTERS[int(num) - 1],
                parallel=parallel)


def _mgsm_item(row, index, lang, where):
    rid = str(index)  # MGSM: parallel by row
    answer = gold_number(row["answer_number"], f"{where} (id {rid})", "answer_number")
    return dict(id=rid, lang=lang, question=row["question"], passage=None, choices=None, answer=answer,
                parallel=True)


def _harness_mc(item):
    return (item["question"].strip() + "\n"
            + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", item["choices"])) + "Answer:")


def _harness_belebele(item):
    return (f"P: {item['passage']}\nQ: {item['question'].strip()}\n"
            + "".join(f"{l}: {c}\n" for l, c in zip("ABCD", item["choices"])) + "Answer:")


# mgsm_direct per language: (the question's prefix, the answer cue); the reply is cut where it starts a new
# question (the task's stop sequence: the prefix without its trailing space)
MGSM_HARNESS_WORDS = {"en": ("Question: ", "Answer:"), "sw": ("Swali: ", "Answer:"), "bn": ("প্রশ্ন: ", "Answer:"),
                      "te": ("ప్రశ్న: ", "Answer:"), "de": ("Frage: ", "Antwort:"), "es": ("Pregunta: ", "Respuesta:"),
                      "fr": ("Question : ", "Réponse :"), "ja": ("問題： ", "Answer:"), "ru": ("Задача: ", "Answer:"),
                      "th": ("โจทย์: ", "Answer:"), "zh": ("问题： ", "Answer:")}


def _harness_mgsm(item):
    words = MGSM_HARNESS_WORDS.get(item["lang"])
    if words is None:
        raise SystemExit(f"the harness protocol has MGSM prompts for {', '.join(MGSM_HARNESS_WORDS)} only "
                         f"(lm-evaluation-harness's mgsm_direct languages), not {item['lang']!r}")
    return f"{words[0]}{item['question']}\n{words[1]}"


def _harness_mgsm_cut(item, reply):
    return reply.split(MGSM_HARNESS_WORDS[item["lang"]][0].rstrip(), 1)[0]


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    columns: tuple  # required columns
    headerless: bool  # a CSV/TSV may come without a header row (the public MGSM TSVs): columns, in order
    answer: str  # what a gold answer looks like: "letter" (A-D) or "number" (data/prompts.py)
    protocols: tuple  # of PROTOCOLS
    slots: tuple  # placeholders a template must hold
    to_item: Callable  # (row, index, lang, where) -> item; a bad gold is a ValueError naming where and id
    harness_prompt: Callable  # item -> the lm-evaluation-harness prompt (no chat template)
    example: dict  # one row of the public format (docs/evaluation.md; tests load it)
    harness_cut: Callable = lambda item, reply: reply  # the harness's stop sequence, applied to a reply


BENCHMARKS = {b.name: b for b in (
    Benchmark("global_mmlu", "Global-MMLU",
              ("question", "option_a", "option_b", "option_c", "option_d", "answer"), False, "letter",
              PROTOCOLS, ("question", "A", "B", "C", "D"), _mmlu_item, _harness_mc,
              dict(sample_id="astronomy/test/0", subject="astronomy",
                   question="Ni sayari ipi iliyo karibu zaidi na Jua?", option_a="Zebaki", option_b="Zuhura",
                   option_c="Dunia", option_d="Mirihi", answer="A")),
    Benchmark("belebele", "BELEBELE",
              ("flores_passage", "question", "mc_answer1", "mc_answer2", "mc_answer3", "mc_answer4",
               "correct_answer_num"), False, "letter",
              PROTOCOLS, ("question", "passage", "A", "B", "C", "D"), _belebele_item, _harness_belebele,
              dict(link="https://en.wikibooks.org/wiki/Nile", question_number=1,
                   flores_passage="Mto Nile ni mto mrefu zaidi barani Afrika.", question="Mto Nile unaishia wapi?",
                   mc_answer1="Bahari ya Hindi", mc_answer2="Bahari ya Mediterania", mc_answer3="Ziwa Viktoria",
                   mc_answer4="Bahari ya Shamu", correct_answer_num="2", dialect="swh_Latn")),
    Benchmark("mgsm", "MGSM", ("question", "answer_number"), True, "number",
              ("generative", "harness"), ("question",), _mgsm_item, _harness_mgsm,
              dict(question="Mama alinunua mayai 12 na akatumia 4. Yamebaki mayai mangapi?", answer_number=8),
              _harness_mgsm_cut),
)}
BENCH_TITLES = {name: b.title for name, b in BENCHMARKS.items()}  # (kept for callers of the old name)


def get_benchmark(name):
    """name -> its Benchmark record; an unknown name is an error listing the known ones."""
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def check_protocol(benchmark, protocol):
    """An error naming the protocols that apply, if `protocol` does not apply to `benchmark`."""
    b = get_benchmark(benchmark)
    if protocol not in b.protocols:
        raise SystemExit(f"the {protocol} protocol does not apply to {benchmark} (its protocols: "
                         f"{', '.join(b.protocols)}); the loglik protocol is for multiple choice")


LANG_COLUMNS = ("dialect", "lang", "language")


def load_benchmark(benchmark, data, lang, limit=None):
    """-> (items, path) for one language. A file with a language column keeps only `lang`'s rows."""
    items, path, _ = _load(benchmark, data, lang, limit)
    return items, path


def _load(benchmark, data, lang, limit):
    b = get_benchmark(benchmark)
    path = find_lang_file(data, lang)
    table = read_table(path, headerless=b.columns if b.headerless else None)
    col = next((c for c in LANG_COLUMNS if table and c in table[0][1]), None)
    if col is not None:
        table = [(w, r) for w, r in table if r[col] in lang_aliases(lang)]
    if not table:
        raise SystemExit(f"{path}: no {benchmark} rows for language {lang}")
    table = table[:limit] if limit else table
    items = []
    for i, (where, row) in enumerate(table):
        missing = [k for k in b.columns if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{where}: missing column(s) {missing}; {benchmark} rows need {list(b.columns)}")
        items.append(b.to_item(row, i, lang, where))
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: duplicate item id {dup!r} (paired comparisons need unique ids)")
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

TEMPLATE_KEYS = tuple(k for name, b in BENCHMARKS.items() for k, p in ((name, "generative"),
                      (name + "/loglik", "loglik")) if p in b.protocols)


def template_key(benchmark, protocol):
    return benchmark + ("/loglik" if protocol == "loglik" else "")


def load_templates(path, benchmark, langs=()):
    """A --templates JSON file -> {key: {lang | "default": template}} (see the module docstring). Every key
    is checked: a benchmark key, and under it "default" or a language code (FLORES table, --langs)."""
    if not path:
        return {}
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"--templates {path}: not a readable JSON file ({e})") from None
    if not isinstance(spec, dict):
        raise SystemExit(f"--templates {path}: expected a JSON object {{key: template}}")
    if not any(k in TEMPLATE_KEYS for k in spec):  # {"sw": "...", "default": "..."} for the benchmark being run
        spec = {template_key(benchmark, "generative"): spec}
    codes = {"default"} | set(FLORES) | set(FLORES.values()) | {a for l in langs for a in lang_aliases(l)}
    for key, per_lang in spec.items():
        if key not in TEMPLATE_KEYS:
            raise SystemExit(f"--templates {path}: unknown key {key!r}; expected benchmark keys "
                             f"({', '.join(TEMPLATE_KEYS)}) or, for {benchmark} alone, 'default' and language codes")
        if isinstance(per_lang, str):
            continue
        if not isinstance(per_lang, dict) or not all(isinstance(v, str) for v in per_lang.values()):
            raise SystemExit(f"--templates {path}: {key}: expected a template, or {{language: template}}")
        bad = sorted(set(per_lang) - codes)
        if bad:
            raise SystemExit(f"--templates {path}: {key}: unknown language key(s) {bad}; expected 'default' or "
                             f"one of {', '.join(sorted(codes - {'default'}))}")
    return spec


def get_template(templates, benchmark, protocol, lang):
    b = get_benchmark(benchmark)
    check_protocol(benchmark, protocol)
    if protocol == "harness":
        raise SystemExit("the harness protocol uses lm-evaluation-harness's prompts (harness_prompt), not templates")
    key = template_key(benchmark, protocol)
    user = templates.get(key, {})
    user = {"default": user} if isinstance(user, str) else user  # one template for every language
    template = next((user[a] for a in lang_aliases(lang) if a in user), None) or user.get("default") or TEMPLATES[key]
    missing = set(b.slots) - set(SLOT.findall(template))
    if missing:
        raise SystemExit(f"template for {key} ({lang}) lacks placeholder(s) {sorted(missing)}: {template!r}")
    return template


def item_prompt(item, benchmark, protocol, templates=None):
    """The text the model is asked for one item under a protocol (templates: load_templates output)."""
    if protocol == "harness":
        return get_benchmark(benchmark).harness_prompt(item)
    return build_prompt(item, get_template(templates or {}, benchmark, protocol, item["lang"]))
