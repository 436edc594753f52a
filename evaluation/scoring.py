"""
From a model's output to a prediction and a score: the last \\boxed{} of a generation, a multiple-choice
letter, a number; and the log-likelihood protocol's argmax.

Letters: A-D, optionally as (B), B., B), \\text{B}, "B. <option text>"; not a bare "B text" (an article in
English) nor the option text alone.

Numbers (MGSM): compared numerically (42 == 42.0 == 42.00) with relative tolerance 1e-6. Read:
  - LaTeX: \\frac{a}{b} and a/b; \\text{...}, \\textbf{...}, \\mathrm{...} unwrapped; \\$ and $; \\% and %;
    the thousands separator {,} (\\boxed{1{,}234}); the spaces \\, \\! \\; \\: between digits removed.
  - digit grouping, decided per number token:
      1,234  1,234,567  1,234.5      comma groups of three: thousands (every language)
      1,23,456                       Indian grouping (lakh): thousands
      1 234  1 234 567               a space, no-break space (U+00A0), thin space (U+2009) or narrow
                                     no-break space (U+202F) between groups of three: thousands
      1.234.567  1.234,5             two or more dot groups, or dot groups and then a decimal comma:
                                     thousands dots (unambiguous)
      1.234                          ambiguous: a decimal (1.234) by default; thousands (1234) only for a
                                     language that writes the dot as its thousands separator (DOT_THOUSANDS:
                                     de, es, id, pt, it, ...). The item's language decides, never the gold.
      3,5                            a lone decimal comma is not read (no answer), as before
  - inside text ("18 dollars", "x = 18", "5 m^2"): the number after the last "=", else the only number;
    unit exponents (m^2, cm^{3}) are dropped first. Two numbers and no "=" is no answer.

The harness protocol (scores comparable with lm-evaluation-harness): multiple choice as loglik (argmax);
MGSM by flexible_number, the harness's "flexible-extract" rule: the LAST match of
(-?[$0-9.,]{2,})|(-?[0-9]+) anywhere in the reply. The harness then compares strings with punctuation
removed (so "-5" matches "5" and "2.0" does not match "2"); we compare the number, "$" and thousands
commas removed, with the same 1e-6 tolerance as above.
"""
import re

import numpy as np

LETTERS = "ABCD"
# languages whose usual thousands separator is the dot (1.234 = one thousand two hundred thirty-four)
DOT_THOUSANDS = {"de", "es", "id", "pt", "it", "tr", "vi", "nl", "da", "el", "ro", "sl", "hr", "sr", "ms",
                 "deu_Latn", "spa_Latn", "ind_Latn", "por_Latn", "ita_Latn", "tur_Latn", "vie_Latn"}


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


_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|bf)\s*\{([^{}]*)\}")


def _unwrap(s):
    prev = None
    while prev != s:
        prev, s = s, _WRAPPER.sub(r"\1", s)
    return s.replace("$", "").replace("**", "").strip()


def normalize_choice(s, n_options=4):
    """Boxed content -> one of the first n_options letters of A..J, or None. Accepts B, b, (B), B.,
    (B)., \\text{B}, and "B. text", "B) text", "(B) text"; not a bare "B text" (an article in
    English) nor option text alone. n_options: 4 for Global-MMLU / BELEBELE, up to 10 for MMLU-Pro."""
    if s is None:
        return None
    last = "ABCDEFGHIJ"[n_options - 1]
    s = _unwrap(s)
    m = (re.fullmatch(rf"\(?([A-{last}a-{last.lower()}])\)?[.:]?", s)
         or re.match(rf"(?:\(([A-{last}])\)|([A-{last}])[.:)])(?:\s|$)", s))
    if not m:
        return None
    return next(g for g in m.groups() if g).upper()


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_SPACES = "[ \u00a0\u2009\u202f]"


def _ungroup(tok, lang):
    """One digit token (digits with . and , inside) -> the same number with the grouping removed."""
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", tok) or re.fullmatch(r"\d{1,2}(?:,\d{2})+,\d{3}(?:\.\d+)?", tok):
        return tok.replace(",", "")  # 1,234 / 1,234.5 / Indian 1,23,456
    if re.fullmatch(r"\d{1,3}(?:\.\d{3})+(?:,\d+)?", tok) and (tok.count(".") > 1 or "," in tok
                                                               or lang in DOT_THOUSANDS):
        return tok.replace(".", "").replace(",", ".")  # 1.234.567 / 1.234,5 / 1.234 in a dot-thousands language
    return tok


def parse_number(s, lang=None):
    """Boxed content -> float or None (see the module docstring for what is read). lang: the item's
    language, which decides whether a lone "1.234" is a decimal or a thousands-grouped integer."""
    if s is None:
        return None
    s = s.replace("{,}", ",").replace("\\$", "").replace("\\%", "%")
    s = _unwrap(s).replace("\u2212", "-")
    s = re.sub(r"\\[,!;:]", "", s).replace("\\ ", " ").replace("~", " ")
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"\1/\2", s)
    s = re.sub(r"(?<=[A-Za-z])\^\{?\d+\}?", "", s)  # unit exponents: m^2, cm^{3}
    s = re.sub(rf"(?<![\d.,])\d{{1,3}}(?:{_SPACES}\d{{3}})+(?![\d.,]?\d)",
               lambda m: re.sub(_SPACES, "", m.group(0)), s)  # 1 234 567
    s = re.sub(r"\d[\d.,]*\d", lambda m: _ungroup(m.group(0), lang), s)
    s = s.strip().rstrip(".%").strip()
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


_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def flexible_number(text):
    """The last number-like run of a reply, as the harness's flexible-extract finds it -> float or None
    ("$1,234." -> 1234.0; "..." -> None)."""
    found = _FLEXIBLE.findall(text or "")
    if not found:
        return None
    s = "".join(found[-1]).replace("$", "").replace(",", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def _same_number(pred, gold):
    return pred is not None and abs(pred - gold) <= 1e-6 * max(1.0, abs(gold))


def score_output(item, output, protocol):
    """-> (prediction, correct). output: generated text (generative; harness MGSM) or 4 log-likelihoods
    (loglik; harness multiple choice)."""
    if protocol == "loglik" or (protocol == "harness" and item["choices"] is not None):
        pred = LETTERS[int(np.argmax(output))]  # ties: the first letter
        return pred, pred == item["answer"]
    if protocol == "harness":
        pred = flexible_number(output)
        return (None if pred is None else _fmt_number(pred)), _same_number(pred, parse_number(item["answer"]))
    boxed = extract_boxed(output)
    if item["choices"] is not None:
        pred = normalize_choice(boxed, len(item["choices"]))
        return pred, pred == item["answer"]
    pred, gold = parse_number(boxed, item.get("lang")), parse_number(item["answer"])
    return (None if pred is None else _fmt_number(pred)), _same_number(pred, gold)


def _fmt_number(x):
    return str(int(x)) if float(x).is_integer() else repr(x)
