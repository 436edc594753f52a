"""
Evaluation for SARA (Dong et al., Findings of ACL 2026): the paper's benchmarks, the routing-divergence
analysis of its Figure 5, and the statistics its reviewers asked for.

    python eval.py bench   --checkpoint DIR --benchmark global_mmlu --data DIR_OR_FILE --langs sw,hi,bn,te,ne
                           [--protocol generative|loglik] [--runs 3] [--out results/NAME]
    python eval.py table   results/fft results/sara              # Table-1 style rows from bench outputs
    python eval.py routing --checkpoint DIR [--compare DIR2] --data data/udhr/parallel.jsonl --anchor en
                           [--out results/routing] [--width K]
    python eval.py band    --routing-csv results/routing/routing.csv --width K
    python eval.py compare --a results/fft --b results/sara [--routing-csv CSV --band S,E]

Benchmarks are read from local files in their public row formats (no hub access), one language at a time:
  global_mmlu  question, option_a..option_d, answer (letter A-D) [, sample_id, subject]
  belebele     flores_passage, question, mc_answer1..mc_answer4, correct_answer_num (1-4), dialect
  mgsm         question, answer_number   (the public mgsm_<lang>.tsv has no header: question<TAB>number)
Files: .jsonl/.json, .csv, .tsv (read with QUOTE_NONE, as the public MGSM files are written), .parquet (only
if pyarrow is importable). --data is a file, a directory searched for one file per language (the path must
contain the language code or its FLORES-200 code as a separate part: sw/test.parquet, mgsm_sw.tsv,
swh_Latn.jsonl; a name with "test" wins over others), or a pattern with {lang}. A file holding several
languages is filtered on its `dialect` / `lang` / `language` column.

Protocols:
- generative (the paper's): zero-shot, chat template, the model reasons and writes its answer in \\boxed{};
  the LAST complete \\boxed{...} of the output is the prediction. Temperature 0.1, top-p 1, n runs (seed + run),
  accuracy as mean ± std over runs (std = sample std, ddof 1; 0 for one run). Batched generation with left
  padding and the KV cache (model.generate).
- loglik (fast, multiple choice only): the same question, the assistant's answer scored as the letter:
  the prediction is argmax over A-D of log p(letter tokens | prompt) (end-of-turn excluded). Deterministic: 1 run.
Prompt templates: built-in English instructions (TEMPLATES); a JSON file (--templates) may replace them per
benchmark and language: {"mgsm": {"default": "...", "sw": "..."}, "global_mmlu/loglik": {...}} (or, for the
one benchmark being run, {"sw": "...", "default": "..."}). Placeholders: {question} {passage} {A} {B} {C} {D};
every other brace is literal, so "\\boxed{}" (and "\\boxed{A}" as an example) is written as is.
Answer normalisation: a letter A-D, optionally as (B), B., B), \\text{B}, "B. <option text>"; a number compared
numerically (42 == 42.0 == 42.00), thousands separators "1,234" removed, \\frac{a}{b} and a/b accepted.
Accuracy is in percent; a language's score is the mean over its items, the average is the unweighted mean over
languages (as in the paper's tables).

Routing analysis (the paper's Figure 5), on parallel text in the data/parallel.py format: each sequence is the
chat-formatted prompt + response (as SARA's anchors), the model runs in eval mode, and its dense router softmax is
averaged over the real tokens (sara_loss.pool_routing, eq. 1-2, 6-7: the same pooling as the loss). Only groups
present in both the language and the anchor language are used (paired). Per MoE layer and language:
  js        JS(mean over the language's sequences ‖ mean over the same items' anchor sequences)
            (sara_loss.pooled_layer_divergence: the language-level comparison of Figure 5)
  js_paired mean over items of JS(item ‖ its anchor) (sara_loss.layer_divergence: what L_JS measures per layer)
  *_norm    the same divided by ln 2 (sara_loss's normalized=True): JS in bits, in [0, 1], where 1 = disjoint
            routing. The paper calls its curves "entropy-normalized" without a definition; ln 2 = H(fair coin)
            is the bound on JS itself and does not depend on the number of experts.
Each model is compared with its OWN anchor-language routing (before vs after = two models, two anchors).
Natural log throughout. Band choice: the contiguous window of K MoE layers with the lowest mean (over
languages) normalised divergence, i.e. the bottom of the U; reported in decoder-layer indices for train.py.

Statistics (beyond the paper), in `compare`:
- paired bootstrap: items are matched on (benchmark, language, id); an item's score is its accuracy averaged
  over runs. Per language, 10,000 resamples (seed 0) of the items with replacement, the SAME resample for both
  runs; 95% percentile interval of Δ = acc_b - acc_a, and p = 2·min(P*(Δ* ≤ 0), P*(Δ* ≥ 0)) (capped at 1).
  Overall = unweighted mean over languages of the per-language Δ, resampled within each language (stratified).
- correlation across languages of Δ(mean band divergence, b - a) and Δ(accuracy): Pearson, and Spearman as
  Pearson of average ranks (ties share their mean rank); two-sided permutation p-values (exact for n ≤ 8
  languages, else 10,000 random permutations with seed 0). SARA's hypothesis predicts a negative correlation.

Figures need matplotlib (optional): without it every number is still written and one line says figures were
skipped. Core functions take (model, tokenizer) objects; only the CLI layer reads checkpoints from disk.
Notation: N items/sequences, L MoE layers, E experts.
"""
import argparse
import contextlib
import csv
import glob
import itertools
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from data.parallel import collate, group_key, load_parallel_jsonl
from sara_loss import layer_divergence, pool_routing, pooled_layer_divergence

LETTERS = "ABCD"
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
        text = path.read_text(encoding="utf-8")
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
        with open(path, encoding="utf-8", newline="") as f:
            if ext == ".tsv":  # the public MGSM files are unquoted: a '"' is an ordinary character
                raw = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            else:
                raw = list(csv.reader(f))
        raw = [r for r in raw if any(cell.strip() for cell in r)]
        if not raw:
            return []
        header = [h.strip() for h in raw[0]]
        if headerless and headerless[0] not in header and len(raw[0]) == len(headerless):
            header, body = list(headerless), raw
        else:
            body = raw[1:]
        return [dict(zip(header, r)) for r in body]
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
                    choices=[str(row[f"option_{c}"]) for c in "abcd"], answer=_gold_letter(row["answer"], where))
    if benchmark == "belebele":
        num = str(row["correct_answer_num"]).strip()
        if num not in ("1", "2", "3", "4"):
            raise ValueError(f"{where}: correct_answer_num {row['correct_answer_num']!r} is not 1-4")
        rid = f"{row['link']}#{row['question_number']}" if row.get("link") and row.get("question_number") else index
        return dict(id=str(rid), lang=lang, question=row["question"], passage=row["flores_passage"],
                    choices=[str(row[f"mc_answer{i}"]) for i in range(1, 5)], answer=LETTERS[int(num) - 1])
    gold = parse_number(str(row["answer_number"]))
    if gold is None:
        raise ValueError(f"{where}: answer_number {row['answer_number']!r} is not a number")
    return dict(id=str(index), lang=lang, question=row["question"], passage=None, choices=None,
                answer=str(row["answer_number"]).strip())


REQUIRED = {
    "global_mmlu": ("question", "option_a", "option_b", "option_c", "option_d", "answer"),
    "belebele": ("flores_passage", "question", "mc_answer1", "mc_answer2", "mc_answer3", "mc_answer4",
                 "correct_answer_num"),
    "mgsm": ("question", "answer_number"),
}


def load_benchmark(benchmark, data, lang, limit=None):
    """-> (items, path) for one language. A file with a language column keeps only `lang`'s rows."""
    if benchmark not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    path = find_lang_file(data, lang)
    rows = read_rows(path, headerless=REQUIRED["mgsm"] if benchmark == "mgsm" else None)
    col = next((c for c in ("dialect", "lang", "language") if rows and c in rows[0]), None)
    if col is not None:
        rows = [r for r in rows if r[col] in lang_aliases(lang)]
    if not rows:
        raise SystemExit(f"{path}: no {benchmark} rows for language {lang}")
    rows = rows[:limit] if limit else rows
    items = [_row_to_item(benchmark, r, i, lang, f"{path} row {i + 1}") for i, r in enumerate(rows)]
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate item ids (paired comparisons need unique ids)")
    return items, path


# -----------------------------------------------------------------------------
# prompts and answer extraction

def load_templates(path, benchmark):
    """A --templates JSON file -> {key: {lang | "default": template}} (see the module docstring)."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
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


def extract_boxed(text):
    """Content of the LAST complete \\boxed{...} in text (braces balanced, so \\boxed{\\frac{1}{2}} gives
    \\frac{1}{2}), or None. "Last" = starting last, so the result never contains another box; an unclosed
    box (e.g. a truncated generation) is not a match."""
    found = None
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end():i - 1]
    return found


_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|bf)\s*\{([^{}]*)\}")


def _unwrap(s):
    prev = None
    while prev != s:
        prev, s = s, _WRAPPER.sub(r"\1", s)
    return s.replace("$", "").replace("**", "").strip()


def normalize_choice(s):
    """Boxed content -> "A".."D" or None. Accepts B, b, (B), B., (B)., \\text{B}, and "B. text",
    "B) text", "(B) text"; not a bare "B text" (an article in English) nor option text alone."""
    if s is None:
        return None
    s = _unwrap(s)
    m = re.fullmatch(r"\(?([A-Da-d])\)?[.:]?", s) or re.match(r"(?:\(([A-D])\)|([A-D])[.:)])(?:\s|$)", s)
    if not m:
        return None
    return next(g for g in m.groups() if g).upper()


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"


def parse_number(s):
    """Boxed content -> float or None: "42", "42.0", "1,234", "-3", "$18", "18\\%", "\\frac{1}{2}", "3/4";
    inside text (e.g. "18 dollars", "x = 18"): the number after the last "=", or the only number.
    Commas between digit groups of three are thousands separators; a decimal comma is not read."""
    if s is None:
        return None
    s = _unwrap(s).replace("\u2212", "-").replace("\\!", "").replace("\\,", "").replace("\\%", "%")
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"\1/\2", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s).strip().rstrip(".%").strip()
    if "=" in s:
        s = s.rsplit("=", 1)[1].strip()
    m = re.fullmatch(rf"({_NUMBER})\s*/\s*({_NUMBER})", s)
    if m:
        den = float(m.group(2))
        return float(m.group(1)) / den if den else None
    if re.fullmatch(_NUMBER, s):
        return float(s)
    nums = re.findall(_NUMBER, s)
    return float(nums[0]) if len(nums) == 1 else None


def score_output(item, output, protocol):
    """-> (prediction, correct). output: generated text (generative) or 4 log-likelihoods (loglik)."""
    if protocol == "loglik":
        pred = LETTERS[int(np.argmax(output))]  # ties: the first letter
        return pred, pred == item["answer"]
    boxed = extract_boxed(output)
    if item["choices"] is not None:
        pred = normalize_choice(boxed)
        return pred, pred == item["answer"]
    pred, gold = parse_number(boxed), parse_number(item["answer"])
    correct = pred is not None and abs(pred - gold) <= 1e-6 * max(1.0, abs(gold))
    return (None if pred is None else _fmt_number(pred)), correct


def _fmt_number(x):
    return str(int(x)) if float(x).is_integer() else repr(x)


# -----------------------------------------------------------------------------
# the model's side: batched generation and letter log-likelihoods

class _NormedHidden(torch.nn.Module):
    """Stands in for lm_head so that forward returns the final normed hidden states (B, T, H) as `logits`.
    NOTE: the full (B, T, V) logits of a 151k vocabulary are 10 GB for 16 x 2048 tokens in bf16; routing
    needs none of them, and letter scoring needs the last few positions only."""

    def forward(self, x):
        return x


@contextlib.contextmanager
def hidden_states_only(model):
    lm_head = model.lm_head
    model.lm_head = _NormedHidden()
    try:
        yield lm_head
    finally:
        model.lm_head = lm_head


def generate_batch(model, prompt_ids, max_new_tokens, temperature, top_p, stop_ids, generator=None):
    """A list of prompt id lists -> a list of new-token id lists (stop id removed), one model.generate
    call with left padding (the prompts keep their own positions: position ids come from the mask)."""
    device = next(model.parameters()).device
    batch = collate([dict(input_ids=p) for p in prompt_ids], pad_id=0, padding_side="left")
    out = model.generate(batch["input_ids"].to(device), max_new_tokens,
                         attention_mask=batch["attention_mask"].to(device), temperature=temperature,
                         top_p=top_p, stop_ids=stop_ids, generator=generator)
    return [row[:-1] if row and row[-1] in stop_ids else row for row in out]


def make_generative_responder(model, tok, *, max_new_tokens=1024, temperature=0.1, top_p=1.0,
                              batch_size=16, seed=0, system=None):
    """-> respond(prompts, run) -> list of generated texts. Prompts are run longest first in batches of
    batch_size; run r samples with torch.Generator seeded seed + r (temperature 0 = greedy)."""
    model.eval()
    device = next(model.parameters()).device

    def respond(prompts, run):
        ids = [tok.encode_chat(p, None, system=system)[0] for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        generator = torch.Generator(device).manual_seed(seed + run)
        texts = [None] * len(ids)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            new = generate_batch(model, [ids[i] for i in chunk], max_new_tokens, temperature, top_p,
                                 tok.stop_ids, generator)
            for i, row in zip(chunk, new):
                texts[i] = tok.decode(row)
        return texts
    return respond


@torch.no_grad()
def letter_logliks(model, tok, prompts, *, batch_size=16, system=None, options=LETTERS):
    """-> (N, len(options)) log p(option | prompt), default options A-D: the assistant's reply is the option
    (its tokens in the chat format, end-of-turn excluded), summed over its tokens. Inputs are prompt +
    reply[:-1], so with one-token letters (the usual case) the options share one forward of the prompt."""
    model.eval()
    device = next(model.parameters()).device
    inputs, users = {}, []  # unique input ids -> index; users[index] = [(slot n*C + c, reply ids)]
    for n, p in enumerate(prompts):
        for c, option in enumerate(options):
            prompt_ids, reply = tok.encode_chat(p, option, system=system)
            reply = reply[:-1] if reply and reply[-1] == tok.eos_id else reply
            idx = inputs.setdefault(tuple(prompt_ids + reply[:-1]), len(inputs))
            users += [[]] * (idx + 1 - len(users))
            users[idx].append((n * len(options) + c, reply))
    inputs = list(inputs)
    need = max(len(r) for u in users for _, r in u)  # the reply of an input fills its last len(reply) positions
    out = torch.zeros(len(prompts) * len(options), dtype=torch.float64)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        batch = collate([dict(input_ids=list(s)) for s in chunk], pad_id=0, padding_side="left")
        with hidden_states_only(model) as lm_head:
            h = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        tail = torch.log_softmax(lm_head(h[:, -need:]).float(), dim=-1)  # (b, need, V), left padded
        row, pos, token, slot = [], [], [], []
        for j in range(len(chunk)):
            for s, reply in users[start + j]:
                row += [j] * len(reply)
                pos += range(need - len(reply), need)
                token += reply
                slot += [s] * len(reply)
        vals = tail[torch.tensor(row), torch.tensor(pos), torch.tensor(token, device=device)]  # one gather
        out.index_add_(0, torch.tensor(slot), vals.double().cpu())
    return out.view(len(prompts), len(options))


def make_loglik_responder(model, tok, *, batch_size=16, system=None):
    """-> respond(prompts, run) -> list of 4 log-likelihoods per prompt (the same for every run)."""
    return lambda prompts, run: letter_logliks(model, tok, prompts, batch_size=batch_size, system=system).tolist()


# -----------------------------------------------------------------------------
# accuracy

def run_benchmark(items_by_lang, respond, *, benchmark, protocol, runs=1, templates=None, progress=None):
    """items_by_lang: {lang: items}; respond(prompts, run) -> outputs (texts, or 4 log-likelihoods each).
    -> per-item records {benchmark, protocol, lang, id, run, gold, pred, correct, output | scores}."""
    records = []
    for lang, items in items_by_lang.items():
        template = get_template(templates or {}, benchmark, protocol, lang)
        prompts = [build_prompt(it, template) for it in items]
        for run in range(runs):
            outputs = respond(prompts, run)
            if len(outputs) != len(items):
                raise RuntimeError(f"respond returned {len(outputs)} outputs for {len(items)} prompts")
            for it, out in zip(items, outputs):
                pred, correct = score_output(it, out, protocol)
                rec = dict(benchmark=benchmark, protocol=protocol, lang=lang, id=it["id"], run=run,
                           gold=it["answer"], pred=pred, correct=bool(correct))
                rec["scores" if protocol == "loglik" else "output"] = out
                records.append(rec)
            if progress:
                acc = 100 * np.mean([r["correct"] for r in records if r["lang"] == lang and r["run"] == run])
                progress(f"{benchmark} {lang} run {run}: {acc:.2f}% of {len(items)}")
    return records


def _mean_std(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(records):
    """records -> {"langs": {lang: {n, runs: [acc % per run], mean, std, no_answer %}},
    "average": {runs, mean, std}}: the average is the unweighted mean over languages, per run."""
    langs = {}
    for lang in dict.fromkeys(r["lang"] for r in records):
        mine = [r for r in records if r["lang"] == lang]
        runs = sorted({r["run"] for r in mine})
        accs = [100 * float(np.mean([r["correct"] for r in mine if r["run"] == k])) for k in runs]
        mean, std = _mean_std(accs)
        langs[lang] = dict(n=sum(r["run"] == runs[0] for r in mine), runs=accs, mean=mean, std=std,
                           no_answer=100 * float(np.mean([r["pred"] is None for r in mine])))
    n_runs = {len(v["runs"]) for v in langs.values()}
    if len(n_runs) != 1:
        raise ValueError(f"languages have different numbers of runs: {n_runs}")
    avg_runs = [float(np.mean([v["runs"][k] for v in langs.values()])) for k in range(n_runs.pop())]
    mean, std = _mean_std(avg_runs)
    return dict(langs=langs, average=dict(runs=avg_runs, mean=mean, std=std))


def format_table(rows, langs, title=""):
    """rows: [(label, summary)] -> the paper's Table 1 layout: one row per model, one column per language
    plus Avg, cells "mean±std" in percent."""
    cell = lambda d: f"{d['mean']:.2f}±{d['std']:.2f}" if d else "-"
    width = max([len("model")] + [len(label) for label, _ in rows])
    lines = [title] if title else []
    lines.append(f"{'model':<{width}}  " + "  ".join(f"{l:>12}" for l in langs + ["Avg"]))
    for label, s in rows:
        cells = [cell(s["langs"].get(l)) for l in langs] + [cell(s["average"])]
        lines.append(f"{label:<{width}}  " + "  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def write_bench_outputs(out_dir, records, summary, meta):
    """predictions.jsonl (one row per item and run), results.json, table.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump({**meta, **summary}, f, indent=1, ensure_ascii=False)
    n_runs = len(summary["average"]["runs"])
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["lang", "n", "mean", "std"] + [f"run_{k}" for k in range(n_runs)] + ["no_answer"])
        for lang, d in summary["langs"].items():
            w.writerow([lang, d["n"], f"{d['mean']:.4f}", f"{d['std']:.4f}"] + [f"{a:.4f}" for a in d["runs"]]
                       + [f"{d['no_answer']:.4f}"])
        a = summary["average"]
        w.writerow(["avg", sum(d["n"] for d in summary["langs"].values()), f"{a['mean']:.4f}", f"{a['std']:.4f}"]
                   + [f"{x:.4f}" for x in a["runs"]] + [""])


# -----------------------------------------------------------------------------
# routing analysis (paper Figure 5)

@torch.no_grad()
def routing_distributions(model, tok, samples, *, batch_size=16, max_len=512, system=None):
    """Pooled dense routing of every sample's chat-formatted prompt + response (eval mode, no grad).
    -> {lang: (groups, (N, L, E) fp32 tensor on the CPU)}."""
    model.eval()
    device = next(model.parameters()).device
    seqs = []
    for s in samples:
        p, r = tok.encode_chat(s["prompt"], s["response"], system=system)
        seqs.append((p + r)[:max_len])
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    dists = [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([dict(input_ids=seqs[i]) for i in chunk], pad_id=tok.pad_id)
        mask = batch["attention_mask"].to(device)
        with hidden_states_only(model):
            out = model(batch["input_ids"].to(device), attention_mask=mask)
        pooled = pool_routing(out.router_logits, mask).float().cpu()  # (b, L, E), eq. 1-2, 6-7
        for i, d in zip(chunk, pooled):
            dists[i] = d
    by_lang = {}
    for s, d in zip(samples, dists):
        groups, rows = by_lang.setdefault(s["lang"], ([], []))
        groups.append(group_key(s))
        rows.append(d)
    return {lang: (g, torch.stack(rows)) for lang, (g, rows) in by_lang.items()}


def routing_divergence(dists, anchor, langs=None, layers=None):
    """dists from routing_distributions -> rows {lang, anchor, layer, moe_index, n_items, js, js_norm,
    js_paired, js_paired_norm}, one per (language, MoE layer), on the items present in both languages.
    layers: decoder-layer index of each MoE layer (default 0..L-1)."""
    if anchor not in dists:
        raise SystemExit(f"anchor language {anchor!r} is not in the data (languages: {sorted(dists)})")
    a_groups, a_dist = dists[anchor]
    a_index = {g: i for i, g in enumerate(a_groups)}
    rows = []
    for lang in langs or [l for l in dists if l != anchor]:
        if lang not in dists:
            raise SystemExit(f"language {lang!r} is not in the data (languages: {sorted(dists)})")
        groups, dist = dists[lang]
        pairs = [(i, a_index[g]) for i, g in enumerate(groups) if g in a_index]
        if not pairs:
            raise SystemExit(f"language {lang!r} shares no item (group) with the anchor {anchor!r}")
        mine, theirs = dist[[i for i, _ in pairs]], a_dist[[j for _, j in pairs]]  # (N, L, E) each
        js = pooled_layer_divergence(mine, theirs)
        js_paired = layer_divergence(theirs, mine)
        for l in range(dist.shape[1]):
            rows.append(dict(lang=lang, anchor=anchor, layer=layers[l] if layers else l, moe_index=l,
                             n_items=len(pairs), js=js[l].item(), js_norm=js[l].item() / math.log(2),
                             js_paired=js_paired[l].item(), js_paired_norm=js_paired[l].item() / math.log(2)))
    return rows


ROUTING_COLUMNS = ["model", "lang", "anchor", "layer", "moe_index", "n_items", "js", "js_norm", "js_paired",
                   "js_paired_norm"]
METRICS = ("js", "js_norm", "js_paired", "js_paired_norm")


def write_routing_csv(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=ROUTING_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{r[k]:.8g}" if isinstance(r[k], float) else r[k] for k in ROUTING_COLUMNS})


def read_routing_csv(path):
    rows = read_rows(path)
    for r in rows:
        for k in ("layer", "moe_index", "n_items"):
            r[k] = int(r[k])
        for k in METRICS:
            r[k] = float(r[k])
    return rows


def curves(rows, model, metric="js_norm"):
    """-> (layers, {lang: [value per layer]}) for one model of a routing table."""
    mine = [r for r in rows if r["model"] == model]
    if not mine:
        raise SystemExit(f"model {model!r} is not in the routing table (models: {models_in(rows)})")
    layers = sorted({r["layer"] for r in mine})
    by_lang = {}
    for r in sorted(mine, key=lambda r: r["layer"]):
        by_lang.setdefault(r["lang"], []).append(r[metric])
    return layers, by_lang


def models_in(rows):
    return list(dict.fromkeys(r["model"] for r in rows))


def choose_band(curve, width):
    """-> (start, end) positions, inclusive: the contiguous window of `width` layers with the lowest mean
    of `curve` (the bottom of the U); the earliest on ties."""
    curve = np.asarray(curve, dtype=np.float64)
    if not 1 <= width <= len(curve):
        raise SystemExit(f"band width {width} must be between 1 and the number of MoE layers ({len(curve)})")
    means = np.convolve(curve, np.ones(width) / width, mode="valid")  # means[s] = mean(curve[s:s+width])
    start = int(np.argmin(means))
    return start, start + width - 1


def band_from_rows(rows, width, model=None, metric="js_norm"):
    """-> dict(model, layers (decoder indices, inclusive start/end), mean, curve) from a routing table;
    the curve is the mean over languages per layer. model: default the first in the table (the original)."""
    model = model or models_in(rows)[0]
    layers, by_lang = curves(rows, model, metric)
    curve = np.mean(np.array(list(by_lang.values())), axis=0)
    s, e = choose_band(curve, width)
    return dict(model=model, start=layers[s], end=layers[e], mean=float(curve[s:e + 1].mean()),
                curve=curve.tolist(), layers=layers, metric=metric)


def format_routing(rows, metric="js_norm"):
    lines = []
    for model in models_in(rows):
        layers, by_lang = curves(rows, model, metric)
        lines.append(f"[{model}] {metric} per MoE layer (decoder index)")
        lines.append(f"{'lang':<6}" + "".join(f"{'L' + str(l):>8}" for l in layers) + f"{'mean':>8}")
        for lang, vals in list(by_lang.items()) + [("mean", np.mean(list(by_lang.values()), axis=0).tolist())]:
            lines.append(f"{lang:<6}" + "".join(f"{v:8.4f}" for v in vals) + f"{np.mean(vals):8.4f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# figures (matplotlib is optional)

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_routing(rows, out_dir, metric="js_norm", band=None):
    """routing_layers.png (per-layer curves per language, one panel per model, like the paper's Figure 5)
    and routing_heatmap.png (layer x language; with two models also b - a). -> list of paths, or None
    without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    models = models_in(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = {"js": "JS (nats)", "js_norm": "JS / ln 2", "js_paired": "paired JS (nats)",
             "js_paired_norm": "paired JS / ln 2"}[metric]
    anchor = rows[0]["anchor"]
    # per-layer curves
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 1.3, 3.4), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        layers, by_lang = curves(rows, model, metric)
        cmap = plt.get_cmap("tab10" if len(by_lang) <= 10 else "tab20")
        for k, (lang, vals) in enumerate(by_lang.items()):
            ax.plot(layers, vals, marker="o", ms=3, lw=1.2, color=cmap(k), label=lang)
        ax.plot(layers, np.mean(list(by_lang.values()), axis=0), color="black", lw=2.2, label="mean")
        if band:
            ax.axvspan(band[0] - 0.5, band[1] + 0.5, color="grey", alpha=0.15, lw=0, label=f"band {band[0]}-{band[1]}")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(layers if len(layers) <= 16 else layers[::max(1, len(layers) // 12)])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{label} to {anchor}")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    paths = [out_dir / "routing_layers.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    # heatmaps
    panels = [(m, np.array(list(curves(rows, m, metric)[1].values()))) for m in models]
    if len(models) == 2:
        panels.append((f"{models[1]} - {models[0]}", panels[1][1] - panels[0][1]))
    layers, by_lang = curves(rows, models[0], metric)
    langs = list(by_lang)
    fig, axes = plt.subplots(1, len(panels), figsize=(0.45 * len(layers) * len(panels) + 1.6 * len(panels) + 0.6,
                                                      0.32 * len(langs) + 1.4), squeeze=False)
    vmax = max(float(p.max()) for _, p in panels[:len(models)])
    for k, (ax, (title, grid)) in enumerate(zip(axes[0], panels)):
        diff = k == len(models)
        lim = float(np.abs(grid).max()) or 1.0
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r" if diff else "viridis",
                       vmin=-lim if diff else 0.0, vmax=lim if diff else vmax)
        ax.set_xticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
        ax.set_yticks(range(len(langs)), langs, fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
        if grid.size <= 200:
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if not diff and v < 0.6 * vmax else "black")
    fig.suptitle(f"{label} to {anchor}", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "routing_heatmap.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


FIGURES_SKIPPED = "figures skipped: matplotlib is not installed (pip install matplotlib); the numbers are in {}"


# -----------------------------------------------------------------------------
# statistics: paired bootstrap and correlation

def load_predictions(path):
    """predictions.jsonl (or a bench output dir) -> {(benchmark, lang): {id: (gold, score)}}, score = the
    item's accuracy averaged over runs."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.jsonl"
    acc = {}
    for r in read_rows(path):
        key = (r["benchmark"], r["lang"])
        gold, hits = acc.setdefault(key, {}).get(r["id"], (r["gold"], []))
        hits.append(float(r["correct"]))
        acc[key][r["id"]] = (gold, hits)
    return {k: {i: (g, float(np.mean(h))) for i, (g, h) in v.items()} for k, v in acc.items()}


def paired_bootstrap(a, b, *, resamples=10000, seed=0, ci=0.95):
    """a, b: {unit (e.g. language): [per-item score]}, items paired by position. -> {unit: stats} and
    "overall" (unweighted mean over units, resampled within each unit). Stats in percentage points:
    n, acc_a, acc_b, delta, lo, hi (ci percentile interval of delta), p (two-sided bootstrap p)."""
    rng = np.random.default_rng(seed)
    out, boots = {}, []
    for unit in a:
        x, y = np.asarray(a[unit], np.float64), np.asarray(b[unit], np.float64)
        if x.shape != y.shape or x.size == 0:
            raise ValueError(f"{unit}: paired scores need the same non-zero length; got {x.size} and {y.size}")
        d = 100 * (y - x)
        boot = np.empty(resamples)
        step = max(1, 2_000_000 // d.size)  # bound memory: resamples x n indices per block
        for s in range(0, resamples, step):
            k = min(step, resamples - s)
            boot[s:s + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(1)
        boots.append(boot)
        out[unit] = _boot_stats(boot, d.mean(), 100 * x.mean(), 100 * y.mean(), x.size, ci)
    overall = np.mean(boots, axis=0)
    out["overall"] = _boot_stats(overall, np.mean([v["delta"] for v in out.values()]),
                                 np.mean([v["acc_a"] for v in out.values()]),
                                 np.mean([v["acc_b"] for v in out.values()]), sum(len(v) for v in a.values()), ci)
    return out


def _boot_stats(boot, delta, acc_a, acc_b, n, ci):
    lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    p = min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0)))
    return dict(n=int(n), acc_a=float(acc_a), acc_b=float(acc_b), delta=float(delta), lo=float(lo), hi=float(hi),
                p=float(p))


def rankdata(x):
    """Ranks 1..n, ties get the mean of the ranks they span (as scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))


def permutation_p(x, y, stat, *, resamples=10000, seed=0):
    """Two-sided p of stat(x, y) under random pairing: exact over all n! orders for n <= 8."""
    obs = abs(stat(x, y))
    y = np.asarray(y, np.float64)
    if len(y) <= 8:
        perms = (np.array(p) for p in itertools.permutations(range(len(y))))
    else:
        rng = np.random.default_rng(seed)
        perms = (rng.permutation(len(y)) for _ in range(resamples))
    hits = [abs(stat(x, y[p])) >= obs - 1e-12 for p in perms]
    return float(np.mean(hits))


def correlate(delta_div, delta_acc):
    """{lang: Δ divergence}, {lang: Δ accuracy} -> Pearson / Spearman over the common languages."""
    langs = [l for l in delta_div if l in delta_acc]
    res = dict(langs=langs, n=len(langs), delta_div=[delta_div[l] for l in langs],
               delta_acc=[delta_acc[l] for l in langs])
    if len(langs) < 3:
        return {**res, "note": "correlation needs at least 3 languages"}
    x, y = res["delta_div"], res["delta_acc"]
    return {**res, "pearson": pearson(x, y), "pearson_p": permutation_p(x, y, pearson),
            "spearman": spearman(x, y), "spearman_p": permutation_p(x, y, spearman)}


def band_divergence_change(rows, band, model_a, model_b, metric="js_norm"):
    """{lang: mean over the band's layers of metric(b) - metric(a)} from routing tables."""
    out = {}
    for model, sign in ((model_a, -1), (model_b, 1)):
        layers, by_lang = curves(rows, model, metric)
        keep = [k for k, l in enumerate(layers) if band[0] <= l <= band[1]]
        if not keep:
            raise SystemExit(f"band {band} holds none of the layers {layers}")
        for lang, vals in by_lang.items():
            out.setdefault(lang, []).append(sign * float(np.mean([vals[k] for k in keep])))
    return {l: sum(v) for l, v in out.items() if len(v) == 2}


# -----------------------------------------------------------------------------
# command line: the only part that reads checkpoints from disk

def load_model(path, dtype=None, device="cpu"):
    """A Hugging Face checkpoint dir (MoETransformer.from_pretrained), or train.py's base.pt
    ({'model': state_dict, 'config': dict}: the toy run's original model)."""
    from model import MoEConfig, MoETransformer
    dtype = getattr(torch, dtype) if dtype else None
    if str(path).endswith(".pt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = MoETransformer(MoEConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        return model.to(device=device, dtype=dtype or torch.float32).eval()
    return MoETransformer.from_pretrained(path, dtype=dtype, device=device).eval()


def load_tok(checkpoint, tokenizer):
    from tokenizer import load_tokenizer
    if tokenizer is None and str(checkpoint).endswith(".pt"):
        raise SystemExit(f"{checkpoint} is a .pt file: pass --tokenizer (e.g. data/udhr/bpe.tiktoken)")
    return load_tokenizer(tokenizer or checkpoint)


def _label(path):
    p = Path(path)
    return p.parent.name + "/" + p.name if p.name in ("hf", "base.pt") else p.name


def _say(msg):
    print(msg, file=sys.stderr, flush=True)


def cmd_bench(args):
    langs = args.langs.split(",")
    items = {}
    for lang in langs:
        items[lang], path = load_benchmark(args.benchmark, args.data, lang, args.limit)
        _say(f"{lang}: {len(items[lang])} items from {path}")
    if args.protocol == "loglik" and args.benchmark == "mgsm":
        raise SystemExit("the loglik protocol is for multiple choice (global_mmlu, belebele); use generative for mgsm")
    runs = 1 if args.protocol == "loglik" else args.runs
    model = load_model(args.checkpoint, args.dtype, args.device)
    tok = load_tok(args.checkpoint, args.tokenizer)
    if args.protocol == "loglik":
        respond = make_loglik_responder(model, tok, batch_size=args.batch_size, system=args.system)
    else:
        respond = make_generative_responder(model, tok, max_new_tokens=args.max_new_tokens,
                                            temperature=args.temperature, top_p=args.top_p,
                                            batch_size=args.batch_size, seed=args.seed, system=args.system)
    templates = load_templates(args.templates, args.benchmark)
    records = run_benchmark(items, respond, benchmark=args.benchmark, protocol=args.protocol, runs=runs,
                            templates=templates, progress=_say)
    summary = summarize(records)
    label = args.label or _label(args.checkpoint)
    meta = dict(benchmark=args.benchmark, protocol=args.protocol, checkpoint=str(args.checkpoint), label=label,
                runs=runs, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                seed=args.seed, templates=args.templates, system=args.system)
    out = args.out or f"results/{args.benchmark}-{args.protocol}-{label.replace('/', '-')}"
    write_bench_outputs(out, records, summary, meta)
    proto = (f"generative, {runs} run(s), T={args.temperature}, top-p {args.top_p}" if args.protocol == "generative"
             else "log-likelihood of the letter")
    print(format_table([(label, summary)], langs, f"{BENCH_TITLES[args.benchmark]} accuracy (%), {proto}"))
    print(f"wrote {out}/predictions.jsonl, results.json, table.csv")
    return summary


def cmd_table(args):
    rows, langs, titles = [], [], set()
    for p in args.results:
        p = Path(p) / "results.json" if Path(p).is_dir() else Path(p)
        res = json.loads(p.read_text(encoding="utf-8"))
        rows.append((res.get("label") or p.parent.name, res))
        langs += [l for l in res["langs"] if l not in langs]
        titles.add(f"{BENCH_TITLES.get(res['benchmark'], res['benchmark'])} ({res['protocol']})")
    print(format_table(rows, langs, "accuracy (%): " + ", ".join(sorted(titles))))


def cmd_routing(args):
    samples = load_parallel_jsonl(args.data)
    langs = args.langs.split(",") if args.langs else None
    keep = set(langs + [args.anchor]) if langs else None
    samples = [s for s in samples if keep is None or s["lang"] in keep]
    checkpoints = [(args.checkpoint, args.tokenizer)] + (
        [(args.compare, args.compare_tokenizer or args.tokenizer)] if args.compare else [])
    labels = args.labels.split(",") if args.labels else [_label(c) for c, _ in checkpoints]
    if len(labels) != len(checkpoints) or len(set(labels)) != len(labels):
        raise SystemExit(f"--labels needs {len(checkpoints)} distinct names; got {labels}")
    rows = []
    for (ckpt, tok_path), label in zip(checkpoints, labels):
        model = load_model(ckpt, args.dtype, args.device)
        tok = load_tok(ckpt, tok_path)
        max_len = min(args.max_len, model.config.max_position_embeddings)
        dists = routing_distributions(model, tok, samples, batch_size=args.batch_size, max_len=max_len,
                                      system=args.system)
        rows += [dict(model=label, **r) for r in routing_divergence(dists, args.anchor, langs, model.config.moe_layers)]
        _say(f"{label}: routing of {len(samples)} sequences, {len(model.config.moe_layers)} MoE layers")
        del model
    out = Path(args.out)
    write_routing_csv(out / "routing.csv", rows)
    print(format_routing(rows, args.metric))
    band = None
    if args.width:
        b = band_from_rows(rows, args.width, metric=args.metric)
        band = (b["start"], b["end"])
        print(_band_line(b, args.width))
    paths = plot_routing(rows, out, args.metric, band)
    print(f"wrote {out / 'routing.csv'}" + (", " + ", ".join(map(str, paths)) if paths else ""))
    if paths is None:
        print(FIGURES_SKIPPED.format(out / "routing.csv"))
    return rows


def _band_line(b, width):
    return (f"band of {width} layers with the lowest mean {b['metric']} ({b['model']}): layers {b['start']}..{b['end']} "
            f"(inclusive), mean {b['mean']:.4f}  ->  python train.py --sara_layers=[{b['start']},{b['end']}]")


def cmd_band(args):
    b = band_from_rows(read_routing_csv(args.routing_csv), args.width, args.model, args.metric)
    print("per-layer mean over languages: " + ", ".join(f"L{l} {v:.4f}" for l, v in zip(b["layers"], b["curve"])))
    print(_band_line(b, args.width))
    return b


def cmd_compare(args):
    a, b = load_predictions(args.a), load_predictions(args.b)
    units_a, units_b, warn = {}, {}, []
    for key in a:
        if key not in b:
            warn.append(f"{key}: only in --a")
            continue
        ids = [i for i in a[key] if i in b[key]]
        if len(ids) < max(len(a[key]), len(b[key])):
            warn.append(f"{key}: {len(ids)} common items ({len(a[key])} in --a, {len(b[key])} in --b)")
        bad = [i for i in ids if a[key][i][0] != b[key][i][0]]
        if bad:
            raise SystemExit(f"{key}: gold answers differ for {len(bad)} items (e.g. {bad[0]}): different data?")
        if ids:
            unit = key[1] if len({k[0] for k in a}) == 1 else f"{key[0]}:{key[1]}"
            units_a[unit], units_b[unit] = [a[key][i][1] for i in ids], [b[key][i][1] for i in ids]
    for w in warn:
        _say("warning: " + w)
    if not units_a:
        raise SystemExit("no common items between --a and --b")
    stats = paired_bootstrap(units_a, units_b, resamples=args.resamples, seed=args.seed)
    print(f"paired bootstrap ({args.resamples} resamples, seed {args.seed}): Δ = b - a, percentage points, 95% CI")
    print(f"{'lang':<14}{'n':>7}{'acc a':>9}{'acc b':>9}{'Δ':>8}   {'95% CI':<18}{'p':>7}")
    for unit, s in stats.items():
        print(f"{unit:<14}{s['n']:>7}{s['acc_a']:9.2f}{s['acc_b']:9.2f}{s['delta']:+8.2f}   "
              f"[{s['lo']:+6.2f}, {s['hi']:+6.2f}]  {s['p']:7.4f}")
    result = dict(a=str(args.a), b=str(args.b), resamples=args.resamples, seed=args.seed, bootstrap=stats)
    if args.routing_csv:
        if not args.band:
            raise SystemExit("--routing-csv needs --band START,END (decoder layers, inclusive; see `eval.py band`)")
        band = tuple(int(x) for x in args.band.split(","))
        rows = [r for p in args.routing_csv for r in read_routing_csv(p)]
        models = models_in(rows)
        if len(models) != 2:
            raise SystemExit(f"the routing table(s) must hold exactly two models (a, b); found {models}")
        ddiv = band_divergence_change(rows, band, models[0], models[1], args.metric)
        dacc = {u: s["delta"] for u, s in stats.items() if u != "overall"}
        corr = correlate(ddiv, dacc)
        result["correlation"] = dict(band=band, metric=args.metric, models=models, **corr)
        print(f"\nΔ{args.metric} over layers {band[0]}..{band[1]} ({models[1]} - {models[0]}) vs Δaccuracy, "
              f"across {corr['n']} languages: " + ", ".join(f"{l} ({x:+.4f}, {y:+.2f})" for l, x, y in
                                                             zip(corr["langs"], corr["delta_div"], corr["delta_acc"])))
        if "note" in corr:
            print(corr["note"])
        else:
            print(f"Pearson r = {corr['pearson']:+.3f} (permutation p = {corr['pearson_p']:.3f}), "
                  f"Spearman rho = {corr['spearman']:+.3f} (p = {corr['spearman_p']:.3f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"wrote {args.out}")
    return result


def build_parser():
    p = argparse.ArgumentParser(description="SARA evaluation: benchmarks, routing analysis, statistics",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(q):
        q.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint dir, or train.py's base.pt")
        q.add_argument("--tokenizer", default=None, help="tokenizer path (default: the checkpoint dir)")
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: the checkpoint's own")
        q.add_argument("--batch-size", type=int, default=16)
        q.add_argument("--system", default=None, help="optional system message")

    q = sub.add_parser("bench", help="Global-MMLU / BELEBELE / MGSM accuracy per language")
    model_args(q)
    q.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    q.add_argument("--data", required=True, help="file, directory, or pattern with {lang}")
    q.add_argument("--langs", required=True, help="comma-separated, e.g. sw,hi,bn,te,ne")
    q.add_argument("--protocol", default="generative", choices=["generative", "loglik"])
    q.add_argument("--runs", type=int, default=3)
    q.add_argument("--temperature", type=float, default=0.1)
    q.add_argument("--top-p", type=float, default=1.0)
    q.add_argument("--max-new-tokens", type=int, default=1024)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--templates", default=None, help="JSON file of prompt templates per benchmark/language")
    q.add_argument("--limit", type=int, default=None, help="first N items per language")
    q.add_argument("--label", default=None, help="row name in the table (default: from the checkpoint path)")
    q.add_argument("--out", default=None, help="output dir (default results/<benchmark>-<protocol>-<label>)")
    q.set_defaults(fn=cmd_bench)

    q = sub.add_parser("table", help="paper-style table from several bench outputs")
    q.add_argument("results", nargs="+", help="bench output dirs or their results.json")
    q.set_defaults(fn=cmd_table)

    q = sub.add_parser("routing", help="per-layer JS divergence of each language's routing to the anchor's")
    model_args(q)
    q.add_argument("--compare", default=None, help="a second checkpoint (e.g. after SARA), side by side")
    q.add_argument("--compare-tokenizer", default=None, help="default: --tokenizer, else the --compare dir")
    q.add_argument("--labels", default=None, help="names of the two models, e.g. before,after")
    q.add_argument("--data", default="data/udhr/parallel.jsonl", help="parallel JSONL (data/parallel.py format)")
    q.add_argument("--anchor", default="en")
    q.add_argument("--langs", default=None, help="default: every language in the data but the anchor")
    q.add_argument("--max-len", type=int, default=512)
    q.add_argument("--metric", default="js_norm", choices=METRICS, help="for the printout, figures and band")
    q.add_argument("--width", type=int, default=0, help="also choose a band of this many layers")
    q.add_argument("--out", default="results/routing")
    q.set_defaults(fn=cmd_routing)

    q = sub.add_parser("band", help="the contiguous K-layer band with the lowest divergence (bottom of the U)")
    q.add_argument("--routing-csv", required=True)
    q.add_argument("--width", type=int, required=True)
    q.add_argument("--model", default=None, help="which model of the table (default: the first)")
    q.add_argument("--metric", default="js_norm", choices=METRICS)
    q.set_defaults(fn=cmd_band)

    q = sub.add_parser("compare", help="paired bootstrap of two bench runs; Δdivergence vs Δaccuracy")
    q.add_argument("--a", required=True, help="bench output dir or predictions.jsonl (e.g. FFT)")
    q.add_argument("--b", required=True, help="the same for the other run (e.g. SARA)")
    q.add_argument("--resamples", type=int, default=10000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--routing-csv", nargs="+", default=None,
                   help="routing table(s) holding the two models, a first (eval.py routing --compare)")
    q.add_argument("--band", default=None, help="START,END decoder layers, inclusive")
    q.add_argument("--metric", default="js_norm", choices=METRICS)
    q.add_argument("--out", default=None, help="write the numbers as JSON here")
    q.set_defaults(fn=cmd_compare)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
