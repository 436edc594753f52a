"""
Stage 1 of SARA (Dong et al., Findings of ACL 2026): build the parallel training data. The ORIGINAL model
answers high-resource questions itself (chat template, reasoning, final answer in \\boxed{}); only answers
whose last \\boxed{} matches the gold answer are kept; prompt + reasoning + answer are translated into each
target language; every translation is checked. The output is the JSONL train.py reads (data/parallel.py).

    python stage1.py build --questions mmlu=raw/mmlu_prox_en.parquet,gsm8k=raw/gsm8k_train.jsonl \\
        --checkpoint Qwen3-30B-A3B --langs sw,hi,bn,te,ne --out data/stage1        # built-in generator
    python stage1.py build ... --engine-url http://localhost:8000/v1 --engine-model sara   # serving engine
        [--translator model|engine|file] [--translate-url URL --translate-model NAME] [--translations FILE]

Question files (.jsonl/.json, .csv/.tsv, .parquet; read by data/questions.py); the kind is told by the columns:
  multiple choice  MMLU-Pro / MMLU-ProX rows: question, options (a list of up to 10 strings, or a JSON list
                   in a CSV cell; trailing "N/A" padding is dropped) or option_0..option_9, and the gold as
                   answer (a letter A-J) and/or answer_index (0-9; both must agree); id from question_id.
  math             GSM8K rows: question, answer (reasoning, then "#### <number>", thousands separators
                   allowed); id = the row number.
--questions is a comma list of files, each optionally named (name=path); the name (default: the file stem)
prefixes the ids. A bad row stops the run before any model is loaded, naming the file and line (row for
CSV/Parquet). All validation (files, languages, flags, translation file, servers, output directory; with
--checkpoint the model, its tokenizer and the context: prompt + new tokens must fit) comes first, before
anything is written.

Prompts: math uses the evaluation's MGSM template; multiple choice the Global-MMLU wording with the item's
letter list (for four options the very prompt the evaluation sends: training and evaluation ask alike).
Filter: evaluation/scoring.py's score_output (the last complete \\boxed{}; normalize_choice / parse_number),
the SAME normalisation as the evaluation. Reasons: wrong_answer, no_boxed_answer (no box, or unreadable),
gold_unreadable (a gold letter the evaluation's normaliser cannot read, e.g. E-J while it reads A-D).
No kept answer at all is an error (NothingKept) naming the reasons: there is nothing to translate or train on.

Translators (--translator): "model" = the answering model (built-in or --engine-url) prompted with
TRANSLATE_PROMPT; "engine" = any OpenAI-compatible server (--translate-url/--translate-model, e.g. a
stronger model under vLLM); "file" = an existing translation file (--translations, JSONL/CSV/Parquet with
id, lang, prompt, response; id = "<group>-<lang>" as in the output; a parallel JSONL works as is).
Checks, in order, each a rejection reason: no_translation (file has none), empty, untranslated (a text
returned unchanged, or inside a reply), length_ratio (len(out)+32 outside [min_ratio, max_ratio] x (len(src)+32), in
characters: runaway repetition or a dropped half; the +32 keeps short strings from tripping it),
options_lost (the lines of a multiple-choice prompt starting with a label "A." / "A)" / "(A)", A-J, are not
the source prompt's, in order; a question's own "I." line counts too),
boxed_answer_missing / boxed_answer_changed (scored against the gold with the evaluation's scoring), wrong_script
(for languages in SCRIPTS: in the prompt or in the response, under --min-script-fraction of the letters
outside \\boxed{} and LaTeX commands are in the language's Unicode blocks).

Output in --out: answers.jsonl and translations.jsonl are append-only journals (one record per item / item x
language, fsync'd after every batch; read split on "\\n" only, see jsonl.py); a rerun skips what they hold,
cuts a torn last line left by a crash, and ignores duplicates, so nothing is done or written twice.
parallel.jsonl is rebuilt from them at the end (atomically): per kept item, the source-language row (its own
anchor) and one row per accepted translation, id "<name>-<item id>-<lang>", anchored on the source row.
summary.json has kept / rejected per reason, per source and per language; run.json pins the settings, and a
rerun with other settings stops.
NOTE: a resumed run samples its remaining batches afresh (seed per batch), so with temperature > 0 its kept
set can differ slightly from an uninterrupted run's; every kept row is still verified.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import unicodedata
from pathlib import Path

from tqdm import tqdm

from evaluation.benchmarks import TEMPLATES
from evaluation.scoring import extract_boxed, score_output
from data.questions import load_questions, load_translation_file, mc_prompt, translation_notes  # noqa: F401
import dirlock
from engine import DEFAULT_RETRIES, DEFAULT_TIMEOUT
from jsonl import JsonlError, cut_torn_tail, split_records

LANG_NAMES = {"en": "English", "zh": "Chinese", "sw": "Swahili", "hi": "Hindi", "bn": "Bengali", "te": "Telugu",
              "ne": "Nepali", "am": "Amharic", "yo": "Yoruba", "ha": "Hausa", "zu": "Zulu", "xh": "Xhosa",
              "ig": "Igbo", "so": "Somali", "ny": "Chichewa", "fr": "French", "es": "Spanish", "de": "German",
              "ja": "Japanese", "ru": "Russian", "th": "Thai", "ar": "Arabic", "ko": "Korean", "pt": "Portuguese",
              "id": "Indonesian", "vi": "Vietnamese", "mr": "Marathi", "ta": "Tamil"}
# Unicode blocks of languages whose script tells them apart from English cheaply
SCRIPTS = {"hi": [(0x0900, 0x097F)], "ne": [(0x0900, 0x097F)], "mr": [(0x0900, 0x097F)],
           "bn": [(0x0980, 0x09FF)], "te": [(0x0C00, 0x0C7F)], "ta": [(0x0B80, 0x0BFF)],
           "am": [(0x1200, 0x139F), (0x2D80, 0x2DDF)], "zh": [(0x3400, 0x4DBF), (0x4E00, 0x9FFF)],
           "ja": [(0x3040, 0x30FF), (0x4E00, 0x9FFF)], "ko": [(0xAC00, 0xD7AF), (0x1100, 0x11FF)],
           "ru": [(0x0400, 0x04FF)], "ar": [(0x0600, 0x06FF)], "th": [(0x0E00, 0x0E7F)]}
TRANSLATE_PROMPT = ("Translate the following text from {source} into {target}. Keep every number, formula, "
                    "LaTeX command and \\boxed{{...}} exactly as it is, keep option letters and line breaks, and "
                    "reply with the translation only.\n\n{text}")


# -----------------------------------------------------------------------------
# the filter and the translation checks

def _eval_item(item, lang):
    """The fields the evaluation's score_output reads (lang: how a number's digit grouping is read)."""
    return dict(choices=item["choices"], answer=item["answer"], lang=lang)


# Whether the evaluation's normaliser reads letters past D (probed, not assumed: it is the evaluation's call)
_PROBE = dict(choices=list("0123456789"), answer="J")
EVAL_READS_ALL_LETTERS = score_output(_PROBE, "\\boxed{J}", "generative")[1]


def judge_answer(item, text, lang="en"):
    """-> (pred, reason): reason None = keep; else wrong_answer / no_boxed_answer / gold_unreadable."""
    if item["choices"] is not None and item["answer"] not in "ABCD" and not EVAL_READS_ALL_LETTERS:
        return None, "gold_unreadable"
    pred, correct = score_output(_eval_item(item, lang), text, "generative")
    if correct:
        return pred, None
    return pred, "wrong_answer" if pred is not None else "no_boxed_answer"


def _strip_markup(text):
    """Text without \\boxed{...} contents and LaTeX commands: what the script check counts."""
    text = re.sub(r"\\boxed\s*\{[^{}]*\}", " ", text)
    return re.sub(r"\\[A-Za-z]+", " ", text)


def script_fraction(text, lang):
    """Fraction of the letters of text (outside \\boxed{} and LaTeX commands) in lang's SCRIPTS blocks."""
    letters = [c for c in _strip_markup(text) if unicodedata.category(c).startswith("L")]
    if not letters:
        return 1.0
    inside = sum(any(lo <= ord(c) <= hi for lo, hi in SCRIPTS[lang]) for c in letters)
    return inside / len(letters)


def _option_letters(prompt):
    """The option labels of a multiple-choice prompt, in order: lines starting "A." / "A)" / "(A)"."""
    return re.findall(r"^\s*\(?([A-J])[.)]", prompt, flags=re.M)


def check_translation(item, src, out, lang, *, min_ratio=0.15, max_ratio=3.0, min_script=0.5):
    """src, out: (prompt, response) in the source and the target language. -> None if the translation is
    accepted, else the reason (see the module docstring)."""
    if out is None:
        return "no_translation"
    if not out[1].strip() or (src[0].strip() and not out[0].strip()):
        return "empty"
    for s, t in zip(src, out):
        if sum(c.isalpha() for c in s) >= 20 and s.strip() in t:  # also "Here is the translation:\n<source>"
            return "untranslated"
    for s, t in zip(src, out):
        if not min_ratio * (len(s) + 32) <= len(t) + 32 <= max_ratio * (len(s) + 32):
            return "length_ratio"
    # the labelled lines of the source (its options, and any "I." / "A." lines of the question itself) in order
    if item["choices"] is not None and _option_letters(out[0]) != _option_letters(src[0]):
        return "options_lost"
    if extract_boxed(out[1]) is None:
        return "boxed_answer_missing"
    if not score_output(_eval_item(item, lang), out[1], "generative")[1]:
        return "boxed_answer_changed"
    if lang in SCRIPTS and any(script_fraction(t, lang) < min_script for t in out):
        return "wrong_script"
    return None


# -----------------------------------------------------------------------------
# translators: jobs [(item, (prompt, response), lang)] -> [(prompt, response) or None]

def responder_translator(respond, source_lang, lang_names, run=0):
    """The text of each job, translated by a chat model (respond(prompts, run) -> texts)."""
    def fill(text, lang):
        return TRANSLATE_PROMPT.format(source=lang_names[source_lang], target=lang_names[lang], text=text)

    def translate(jobs):
        prompts = [fill(t, lang) for _, src, lang in jobs for t in src]
        texts = _same_length(respond(prompts, run), prompts, "respond (translating)")
        return [(texts[2 * j].strip(), texts[2 * j + 1].strip()) for j in range(len(jobs))]
    return translate


def file_translator(table):
    return lambda jobs: [table.get((item["group"], lang)) for item, _, lang in jobs]


# -----------------------------------------------------------------------------
# append-only journals

class InputError(ValueError):
    """An output directory whose contents do not fit this run (damaged journal, changed questions)."""


class NothingKept(RuntimeError):
    """The model kept no answer: there is nothing to translate or train on."""


def write_atomic(path, text):
    """Write a whole file or nothing (a crash leaves the old one): a temporary file, fsync, rename."""
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. a full disk: the old file stays, the half-written temporary goes
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"{path}: could not write ({e.strerror})") from e


class Journal:
    """A JSONL file of records, one per key, appended and fsync'd batch by batch. Opening it cuts a torn
    last line (a crash mid-write) and keeps the first record of a key (nothing counts twice). A batch is
    appended whole or not at all: a failed write (a full disk) is cut back before the error goes up."""

    def __init__(self, path, key):
        self.path, self.key, self.records = Path(path), key, {}
        if self.path.exists():
            cut_torn_tail(self.path)  # an unfinished line: the batch it belonged to is redone
            # records split on "\n" only: a reply holding U+2028 or U+0085 is one record (see jsonl.py)
            try:
                lines = split_records(self.path.read_bytes(), self.path)
            except JsonlError as e:
                raise InputError(f"{e}; the journal is damaged (not by a crash, which only tears the last line)") \
                    from None
            for lineno, line in lines:
                try:
                    rec = json.loads(line)
                    k = key(rec)
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(f"{self.path}:{lineno}: not a journal record; the journal is damaged "
                                     "(not by a crash, which only tears the last line)") from None
                self.records.setdefault(k, rec)

    def __contains__(self, k):
        return k in self.records

    def append(self, records):
        new = [r for r in records if self.key(r) not in self.records]
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:  # os.write may write part of it
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as e:  # e.g. a full disk: leave no half batch behind
                os.ftruncate(fd, start)
                raise OSError(e.errno, f"{self.path}: could not append {len(new)} records ({e.strerror}); "
                                       "they are not kept: fix the cause and rerun to resume") from e
        finally:
            os.close(fd)
        for r in new:
            self.records[self.key(r)] = r


def busy(out):
    """Whether another stage1 process holds out's lock now (checked before a model is loaded; the lock
    itself is taken later, when the directory is written)."""
    return dirlock.holder(out) is not None


def locked(out):
    """One stage1 process per output directory (two would interleave their journals): dirlock.py."""
    return dirlock.locked(out, "stage1 run")


def pin_settings(out, settings):
    """run.json holds the settings that decide what the journals mean; a resume must match them. Before
    any record is journaled it is rewritten (a run that failed at the start, e.g. on a wrong checkpoint
    path, must not lock its --out to that path)."""
    path = out / "run.json"
    journaled = any(b"\n" in p.read_bytes() for p in (out / "answers.jsonl", out / "translations.jsonl")
                    if p.exists())
    if path.exists() and journaled:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SystemExit(f"{path}: damaged (not JSON); it pins the settings of the journals in {out}: "
                             "restore it, or use another --out") from None
        diff = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k)]
        if diff:
            raise SystemExit(f"{out} was made with other settings ({'; '.join(diff)}); "
                             "use another --out, or the same settings")
    else:
        write_atomic(path, json.dumps(settings, indent=1, ensure_ascii=False))


# -----------------------------------------------------------------------------
# the pipeline

def _batches(seq, n):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _same_length(outs, ins, what):
    if len(outs) != len(ins):  # zip would silently pair answers with the wrong questions
        raise RuntimeError(f"{what} returned {len(outs)} outputs for {len(ins)} inputs")
    return outs


def run_stage1(items, respond, translate, out, *, langs, source_lang="en", batch_size=16,
               checks=None, progress=True, redo_translations=False):
    """items from load_questions; respond(prompts, run) -> answers (built-in or engine responder), called
    lazily (None is fine when the journal already holds every answer); translate(jobs) -> translations.
    redo_translations: translate everything afresh instead of resuming (a translation file: a lookup,
    and rows added to the file since the last run must count). Writes the journals, parallel.jsonl and
    summary.json in out; -> the summary dict. InputError if the journal answered other questions."""
    out = Path(out)
    answers = Journal(out / "answers.jsonl", key=lambda r: r["group"])
    for it in items:  # an edited question file must not keep answers (and verdicts) to the old question
        a = answers.records.get(it["group"])
        if a is not None and (a["prompt"], a["gold"]) != (it["prompt"], it["answer"]):
            what = "gold answer" if a["prompt"] == it["prompt"] else "question or options"
            raise InputError(f"{out / 'answers.jsonl'}: item {it['group']} was answered with another {what} "
                             "than the question files now give; use another --out (or restore the file)")
    todo = [it for it in items if it["group"] not in answers]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="answer", unit="item", disable=not progress)
    for chunk in _batches(todo, batch_size):
        texts = _same_length(respond([it["prompt"] for it in chunk], 0), chunk, "respond")
        recs = []
        for it, text in zip(chunk, texts):
            pred, reason = judge_answer(it, text, source_lang)
            recs.append(dict(group=it["group"], source=it["source"], prompt=it["prompt"], response=text,
                             gold=it["answer"], pred=pred, status=reason or "kept"))
        answers.append(recs)
        bar.update(len(chunk))
    bar.close()

    kept = [it for it in items if answers.records[it["group"]]["status"] == "kept"]
    if not kept:  # a 0-row parallel.jsonl and exit 0 would look like a finished run
        summary = summarize(items, answers.records, {}, langs)
        write_atomic(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
        reasons = _count_reasons(answers.records[it["group"]] for it in items)
        why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        raise NothingKept(f"{out}: no answer was kept ({len(items)} items; {why}), so there is no parallel data "
                          f"and no parallel.jsonl. A kept answer ends in \\boxed{{<the gold answer>}}: see what the "
                          f"model wrote in {out / 'answers.jsonl'}. A model that cannot answer the questions (such "
                          "as the toy base.pt) cannot make stage-1 data; docs/stage1.md has an offline demo route")
    if redo_translations:
        (out / "translations.jsonl").unlink(missing_ok=True)
    trans = Journal(out / "translations.jsonl", key=lambda r: (r["group"], r["lang"]))
    jobs = [(it, (it["prompt"], answers.records[it["group"]]["response"]), lang)
            for it in kept for lang in langs if (it["group"], lang) not in trans]
    bar = tqdm(total=len(kept) * len(langs), initial=len(kept) * len(langs) - len(jobs), desc="translate",
               unit="translation", disable=not progress)
    for chunk in _batches(jobs, batch_size):
        outs = _same_length(translate(chunk), chunk, "translate")
        recs = []
        for (it, src, lang), o in zip(chunk, outs):
            reason = check_translation(it, src, o, lang, **(checks or {}))
            recs.append(dict(group=it["group"], lang=lang, prompt=o[0] if o else None,
                             response=o[1] if o else None, status=reason or "kept"))
        trans.append(recs)
        bar.update(len(chunk))
    bar.close()

    rows = []
    for it in kept:
        a = answers.records[it["group"]]
        anchor = dict(anchor_lang=source_lang, anchor_prompt=a["prompt"], anchor_response=a["response"])
        rows.append(dict(id=f"{it['group']}-{source_lang}", lang=source_lang, prompt=a["prompt"],
                         response=a["response"], **anchor))
        for lang in langs:
            t = trans.records[(it["group"], lang)]
            if t["status"] == "kept":
                rows.append(dict(id=f"{it['group']}-{lang}", lang=lang, prompt=t["prompt"], response=t["response"],
                                 **anchor))
    write_atomic(out / "parallel.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = summarize(items, answers.records, trans.records, langs)
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def _count_reasons(records):
    rejected = {}
    for r in records:
        if r["status"] != "kept":
            rejected[r["status"]] = rejected.get(r["status"], 0) + 1
    return rejected


def summarize(items, answers, trans, langs):
    """-> {"answer": {source: {"items", "kept", "rejected": {reason: n}}}, "translate": {lang: {...}}}."""
    def count(recs):
        recs = list(recs)
        return dict(items=len(recs), kept=sum(r["status"] == "kept" for r in recs), rejected=_count_reasons(recs))
    by_source = {}
    for it in items:
        by_source.setdefault(it["source"], []).append(answers[it["group"]])
    groups = {it["group"] for it in items}
    return dict(answer={s: count(r) for s, r in by_source.items()},
                translate={l: count(r for (g, lang), r in trans.items() if lang == l and g in groups) for l in langs})


def format_summary(summary):
    lines = ["stage             items   kept  rejected (reason: n)"]
    for title, part in (("answer", summary["answer"]), ("translate", summary["translate"])):
        for name, d in part.items():
            why = ", ".join(f"{k}: {v}" for k, v in sorted(d["rejected"].items())) or "-"
            lines.append(f"{title + ' ' + name:<16} {d['items']:>6} {d['kept']:>6}  {why}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command line

def parse_lang(part, flag):
    """"sw" or "kin=Kinyarwanda" -> (code, name); a code outside LANG_NAMES needs its name (the translation
    prompt names the languages)."""
    code, _, name = (x.strip() for x in part.partition("="))
    if not code or not re.fullmatch(r"[\w-]+", code):
        raise SystemExit(f"{flag}: {part!r} is not a language code (e.g. sw, or kin=Kinyarwanda)")
    if not name and code not in LANG_NAMES:
        raise SystemExit(f"{flag}: unknown language {code!r}; give its name as {code}=Name "
                         f"(known: {','.join(LANG_NAMES)})")
    return code, name or LANG_NAMES[code]


def parse_langs(spec, source_lang):
    """"sw,hi,kin=Kinyarwanda" -> {code: name}."""
    names = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        code, name = parse_lang(part, "--langs")
        if code == source_lang:
            raise SystemExit(f"--langs: {code} is the source language (--source-lang)")
        names[code] = name
    if not names:
        raise SystemExit("--langs: no target language")
    return names


def _responders(args, loaded):
    """-> make(max_new_tokens, url=None, name=None): a responder, an engine's if url is given, else the
    built-in generator's on `loaded` (model, tokenizer), loaded once by cmd_build after the checks."""
    def make(max_new_tokens, url=None, name=None):
        if url:
            from engine import make_engine_responder
            return make_engine_responder(url, name, max_new_tokens=max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, seed=args.seed, concurrency=args.concurrency,
                                         timeout=args.timeout, retries=args.retries, system=args.system)
        from evaluation.generate import make_generative_responder
        return make_generative_responder(*loaded, max_new_tokens=max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
                                         system=args.system)
    return make


def check_flags(args):
    """Numbers and paths that would fail late (after the model is loaded) or silently change the run."""
    from engine import EngineError, check_url, settings_problems
    from model import sampling_problems
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--translate-max-new-tokens", args.translate_max_new_tokens, 1),
                             ("--limit", 1 if args.limit is None else args.limit, 1)):
        if value < low:
            raise SystemExit(f"{flag} must be >= {low}, got {value}")
    problems = (sampling_problems(args.temperature, args.top_p, args.max_new_tokens,
                                  names=("--temperature", "--top-p", "--max-new-tokens"))
                + settings_problems(args.timeout, args.retries, args.concurrency,
                                    names=("--timeout", "--retries", "--concurrency")))
    if problems:
        raise SystemExit("; ".join(problems))
    for flag, url in (("--engine-url", args.engine_url), ("--translate-url", args.translate_url)):
        try:
            if url is not None:
                check_url(url, flag)
        except EngineError as e:
            raise SystemExit(str(e)) from None
    if not 0 <= args.min_ratio < args.max_ratio:
        raise SystemExit(f"--min-ratio {args.min_ratio} / --max-ratio {args.max_ratio}: need 0 <= min < max")
    if not 0 <= args.min_script_fraction <= 1:
        raise SystemExit(f"--min-script-fraction must be in [0, 1], got {args.min_script_fraction}")
    if args.dtype:
        import torch
        if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
            raise SystemExit(f"--dtype {args.dtype}: not a torch dtype (e.g. bfloat16, float16, float32)")
    if args.tokenizer and not Path(args.tokenizer).exists():
        raise SystemExit(f"--tokenizer {args.tokenizer}: no such file or directory")
    if args.checkpoint and Path(args.checkpoint).suffix == ".pt" and not args.tokenizer:
        raise SystemExit(f"--checkpoint {args.checkpoint} is a .pt file, which carries no tokenizer: pass "
                         "--tokenizer (the one it was trained with, e.g. data/udhr/bpe.tiktoken)")
    out = Path(args.out)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise SystemExit(f"--out {out}: {p} is a file, not a directory")
            break


def context_problems(items, tok, context, args):
    """The built-in generator cannot write past the model's context (model.context_problem): the longest
    answer prompt + --max-new-tokens, and for --translator model the longest translation request (a
    question, or an answer of up to --max-new-tokens tokens, in TRANSLATE_PROMPT) + --translate-max-new-tokens."""
    from model import context_problem
    chat = lambda text: len(tok.encode_chat(text, None, system=args.system)[0])
    fill = lambda text: TRANSLATE_PROMPT.format(source=LANG_NAMES["en"], target=LANG_NAMES["en"], text=text)
    longest = max(chat(it["prompt"]) for it in items)
    problems = [context_problem(longest, args.max_new_tokens, context, what="the longest answer prompt")]
    if args.translator == "model":
        request = max(max(chat(fill(it["prompt"])) for it in items), chat(fill("")) + args.max_new_tokens)
        problems.append(context_problem(request, args.translate_max_new_tokens, context,
                                        what="the longest translation request (an answer of --max-new-tokens)"))
    flags = ("--max-new-tokens=", "--translate-max-new-tokens=")
    return [p.replace("max_new_tokens=", flag) for p, flag in zip(problems, flags) if p]


def _work(args, items, table, loaded, out, source_lang, source_name, langs, checks):
    """The responders and translator, then run_stage1 -> the summary."""
    make = _responders(args, loaded)
    respond = make(args.max_new_tokens, args.engine_url, args.engine_model)
    names = {source_lang: source_name, **langs}
    if args.translator == "file":
        translate = file_translator(table)
    else:  # a second model's server, or the answering model itself, with the translation output budget
        url, name = ((args.translate_url, args.translate_model) if args.translator == "engine"
                     else (args.engine_url, args.engine_model))
        translate = responder_translator(make(args.translate_max_new_tokens, url, name), source_lang, names)
    if not EVAL_READS_ALL_LETTERS and any(it["choices"] and it["answer"] not in "ABCD" for it in items):
        print("note: the evaluation's normalize_choice reads A-D only; items whose gold is E-J are rejected "
              "as gold_unreadable", file=sys.stderr)
    return run_stage1(items, respond, translate, out, langs=list(langs), source_lang=source_lang,
                      batch_size=args.batch_size, checks=checks, progress=not args.quiet,
                      redo_translations=args.translator == "file")


def cmd_build(args):
    # --- every check first: nothing is written before the inputs are known to be good
    source_lang, source_name = parse_lang(args.source_lang, "--source-lang")
    langs = parse_langs(args.langs, source_lang)
    check_flags(args)
    if (args.checkpoint is None) == (args.engine_url is None):
        raise SystemExit("pass exactly one of --checkpoint (built-in generator) or --engine-url (serving engine)")
    if args.engine_url and not args.engine_model:
        raise SystemExit("--engine-url needs --engine-model (the name the server serves)")
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file or directory")
    if args.translator == "engine" and not (args.translate_url and args.translate_model):
        raise SystemExit("--translator engine needs --translate-url and --translate-model")
    if args.translator == "file" and not args.translations:
        raise SystemExit("--translator file needs --translations FILE")
    if args.translations and args.translator != "file":
        raise SystemExit("--translations is read by --translator file only")
    try:
        items = load_questions(args.questions)
        table = load_translation_file(args.translations) if args.translator == "file" else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    items = items[:args.limit] if args.limit else items
    for note in translation_notes(table or {}, items, langs, args.translations):
        print("note:", note, file=sys.stderr)
    from engine import EngineError, check_engine
    try:
        if args.engine_url:
            check_engine(args.engine_url, args.engine_model)
        if args.translator == "engine":
            check_engine(args.translate_url, args.translate_model)
    except EngineError as e:
        raise SystemExit(str(e)) from None
    out = Path(args.out)
    if busy(out):  # before minutes of model loading
        raise SystemExit(f"{out}: another stage1 run is using this directory ({dirlock.holder(out)})")
    loaded = None
    if args.checkpoint:  # loaded before run.json is written: a checkpoint that cannot work writes nothing
        import torch
        from checkpoint import CheckpointError, load_model_and_tokenizer
        try:
            loaded = load_model_and_tokenizer(args.checkpoint, args.tokenizer or "",
                                              getattr(torch, args.dtype) if args.dtype else None, args.device)
        except CheckpointError as e:
            raise SystemExit(f"--checkpoint: {e}") from None
        problems = context_problems(items, loaded[1], loaded[0].config.max_position_embeddings, args)
        if problems:
            raise SystemExit("; ".join(problems))
    checks = dict(min_ratio=args.min_ratio, max_ratio=args.max_ratio, min_script=args.min_script_fraction)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot create the directory ({e.strerror})") from None
    url = lambda u: u and u.rstrip("/")  # .../v1/ and .../v1 are one server: not "other settings" on a rerun
    answer_model = args.checkpoint or f"{url(args.engine_url)} {args.engine_model}"
    translate_by = dict(model=answer_model, engine=f"{url(args.translate_url)} {args.translate_model}",
                        file="file")[args.translator]  # a file is re-read by every run: not pinned
    settings = dict(source_lang=source_lang, answer_model=answer_model, dtype=args.dtype, tokenizer=args.tokenizer,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, system=args.system,
                    max_new_tokens=args.max_new_tokens, translator=args.translator, translate_by=translate_by,
                    translate_max_new_tokens=args.translate_max_new_tokens, **checks,
                    prompts=hashlib.sha256((TEMPLATES["global_mmlu"] + TEMPLATES["mgsm"] + TRANSLATE_PROMPT)
                                           .encode()).hexdigest()[:16],
                    eval_reads_all_letters=EVAL_READS_ALL_LETTERS)
    # --- the work
    try:
        with locked(out):
            pin_settings(out, settings)
            summary = _work(args, items, table, loaded, out, source_lang, source_name, langs, checks)
    except (InputError, NothingKept) as e:
        raise SystemExit(str(e)) from None
    except (EngineError, OSError) as e:  # a server gone away, a full disk: nothing finished is lost
        raise SystemExit(f"{e}\nThe finished batches are kept in {out}; rerun the same command to resume.") from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished batches are kept in {out}; rerun the same command to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    print(format_summary(summary))
    for lang in langs:
        if summary["translate"][lang]["kept"] == 0:
            print(f"note: no translation into {lang} was kept (see {out / 'summary.json'}); parallel.jsonl has "
                  f"no {lang} rows", file=sys.stderr)
    n = (out / "parallel.jsonl").read_bytes().count(b"\n")
    print(f"wrote {out / 'parallel.jsonl'} ({n} rows); summary in {out / 'summary.json'}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("build", help="answer, filter, translate, check -> parallel.jsonl", allow_abbrev=False)
    q.add_argument("--questions", required=True, help="comma list of question files, each optionally name=path")
    q.add_argument("--langs", required=True, help="target languages, e.g. sw,hi,bn,te,ne (code=Name for others)")
    q.add_argument("--out", required=True, help="output directory (journals, parallel.jsonl, summary.json)")
    q.add_argument("--source-lang", default="en", help="language of the question files (the anchor)")
    q.add_argument("--checkpoint", default=None, help="Hugging Face checkpoint dir, or train.py's base.pt")
    q.add_argument("--tokenizer", default=None, help="tokenizer path (default: the checkpoint dir)")
    q.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's own)")
    q.add_argument("--device", default="cuda" if _cuda() else "cpu")
    q.add_argument("--engine-url", default=None, help="OpenAI-compatible server instead of the built-in generator")
    q.add_argument("--engine-model", default=None, help="the model name the server serves")
    q.add_argument("--translator", choices=("model", "engine", "file"), default="model")
    q.add_argument("--translate-url", default=None)
    q.add_argument("--translate-model", default=None)
    q.add_argument("--translations", default=None, help="translation file for --translator file")
    q.add_argument("--batch-size", type=int, default=16, help="items per generation call and journal write")
    q.add_argument("--concurrency", "--engine-concurrency", type=int, default=16, help="requests in flight (engine)")
    q.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per request attempt (engine)")
    q.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="retries per request (engine)")
    q.add_argument("--max-new-tokens", type=int, default=1024)
    q.add_argument("--translate-max-new-tokens", type=int, default=2048)
    q.add_argument("--temperature", type=float, default=0.1)
    q.add_argument("--top-p", type=float, default=1.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--system", default=None, help="system prompt (default: none)")
    q.add_argument("--limit", type=int, default=None, help="only the first N items (a trial run)")
    q.add_argument("--min-ratio", type=float, default=0.15)
    q.add_argument("--max-ratio", type=float, default=3.0)
    q.add_argument("--min-script-fraction", type=float, default=0.5)
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _cuda():
    import torch
    return torch.cuda.is_available()


def main(argv=None):
    args = build_parser().parse_args(argv)
    cmd_build(args)


if __name__ == "__main__":
    main()
