"""
What the model is asked and what a gold answer looks like: the built-in prompt templates and the gold
answer formats, shared by the evaluation (evaluation/benchmarks.py) and stage 1's question files
(data/questions.py), so a model is trained on the prompts it is evaluated with.

Templates: placeholders {question} {passage} {A} {B} {C} {D}; every other brace is literal, so "\\boxed{}"
(and "\\boxed{A}" as an example) is written as is.

Gold answers (checked when a file is read; a bad one is an error naming the row):
  letter  one letter of the item's options, optionally as "(B)", "B." or lower case; never "BC"
  number  an integer or decimal, optionally signed, optionally with comma thousands groups: 18, -3, 2.5,
          1,234, 1,234.5. Every such string is read by evaluation.scoring.parse_number (tested).
"""
import re

LETTERS = "ABCDEFGHIJ"  # up to 10 options (MMLU-Pro); the paper's benchmarks use A-D

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
SLOT = re.compile(r"(?<!\\boxed)\{(question|passage|A|B|C|D)\}")  # "\boxed{A}" stays literal


def build_prompt(item, template):
    """Fill {question} {passage} {A}..{D} from an item; any other brace (e.g. \\boxed{}) stays literal."""
    values = dict(question=item["question"], passage=item.get("passage") or "")
    values.update(zip("ABCD", item.get("choices") or [""] * 4))
    return SLOT.sub(lambda m: str(values[m.group(1)]), template)


def gold_letter(value, n_options, where):
    """A gold letter cell -> "A".."J" (one of the first n_options), else ValueError naming `where`."""
    s = str(value).strip().strip("()").rstrip(".").strip().upper()
    if len(s) != 1 or s not in LETTERS[:n_options]:
        allowed = ", ".join(LETTERS[:n_options]) if n_options == 4 else f"{LETTERS[0]}-{LETTERS[n_options - 1]}"
        raise ValueError(f"{where}: answer {value!r} is not one of {allowed}")
    return s


GOLD_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def gold_number(value, where, what="answer"):
    """A gold number cell (str, int or float) -> its text, stripped, else ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: {what} {value!r} is not a number")
    s = str(value).strip()
    if not GOLD_NUMBER.fullmatch(s):
        raise ValueError(f"{where}: {what} {value!r} is not a number (expected e.g. 18, -3, 2.5 or 1,234)")
    return s
