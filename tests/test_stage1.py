"""Tests for stage1.py: question files in both formats and their errors, the answer filter and the
translation checks on hand-made cases, a tiny model answering local items end to end into a JSONL that
data/parallel.py and train.py's tokenize path accept, the engine path, crash (exception and kill -9) and
resume without duplicates, and validation before any model is loaded."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation.benchmarks import TEMPLATES, build_prompt
import stage1 as S
from data.parallel import load_parallel_jsonl, split_train_val, tokenize_samples
from fake_engine import FakeEngine
from checkpoint import save_hf
from model import MoEConfig, MoETransformer

ROOT = Path(__file__).resolve().parent.parent
TOK_PATH = ROOT / "data" / "udhr" / "bpe.tiktoken"
ANSWER = "The answer is \\boxed{B}."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def questions(tmp_path):
    """Two MMLU-Pro rows (gold B, C), one with v1.1 "N/A" padding, and two GSM8K rows."""
    mc = write_jsonl(tmp_path / "mmlu.jsonl", [
        dict(question_id=70, question="Which gas do plants take in?", answer="B", answer_index=1,
             options=["Oxygen", "Carbon dioxide", "Helium", "Neon", "N/A", "N/A"], category="biology"),
        dict(question_id=71, question="What is 2 + 3?", answer="C", options=["4", "6", "5", "7", "8"]),
    ])
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [
        dict(question="Tom has 3 apples and buys 4 more. How many apples?", answer="3 + 4 = 7\n#### 7"),
        dict(question="A car costs 1,200 dollars; two cars?", answer="2 * 1200 = 2400\n#### 2,400"),
    ])
    return f"mmlu={mc},{gsm}"


# -----------------------------------------------------------------------------
# question files

def test_question_formats(tmp_path, questions):
    items = S.load_questions(questions)
    assert [it["group"] for it in items] == ["mmlu-70", "mmlu-71", "gsm8k-1", "gsm8k-2"]
    assert items[0]["choices"] == ["Oxygen", "Carbon dioxide", "Helium", "Neon"]  # N/A padding dropped
    assert [it["answer"] for it in items] == ["B", "C", "7", "2,400"]
    assert "(A, B, C, D or E)" in items[1]["prompt"] and "\nE. 8" in items[1]["prompt"]
    # four options: exactly the prompt the evaluation sends for Global-MMLU; math: eval's MGSM prompt
    ev = dict(question=items[0]["question"], passage=None, choices=items[0]["choices"])
    assert items[0]["prompt"] == build_prompt(ev, TEMPLATES["global_mmlu"])
    assert items[2]["prompt"] == TEMPLATES["mgsm"].replace("{question}", items[2]["question"])
    # CSV with option_0..option_9 and answer_index only; a JSON list in an `options` cell
    (tmp_path / "prox.csv").write_text(
        "question_id,question,option_0,option_1,option_2,answer_index\n9,Pick one,x,y,z,2\n", encoding="utf-8")
    (tmp_path / "pro.csv").write_text('question,options,answer\nQ,"[""a"", ""b""]",B\n', encoding="utf-8")
    a, b = S.load_questions(f"{tmp_path / 'prox.csv'},{tmp_path / 'pro.csv'}")
    assert (a["group"], a["choices"], a["answer"]) == ("prox-9", ["x", "y", "z"], "C")
    assert (b["group"], b["choices"], b["answer"]) == ("pro-1", ["a", "b"], "B")
    # "N/A" padding goes, but never the gold option itself
    na = write_jsonl(tmp_path / "na.jsonl", [dict(question="Which is not a number?", answer="C",
                                                  options=["1", "2", "N/A", "N/A"])])
    assert S.load_questions(str(na))[0]["choices"] == ["1", "2", "N/A"]


@pytest.mark.parametrize("row, message", [
    (dict(question="q", options=["a", "b"], answer="C"), "answer 'C' is not one of A-B"),
    (dict(question="q", options=["a", "b", "c"], answer="A", answer_index=2), "answer 'A' and answer_index 2 disagree"),
    (dict(question="q", options=["a"], answer="A"), "1 options; expected 2 to 10"),
    (dict(question="q", options=["a", "b"]), "no gold answer"),
    (dict(question="", options=["a", "b"], answer="A"), "no 'question'"),
    (dict(question="q", option_0="a", option_1="", option_2="c", answer="A"), "option_1 is empty but later options are not"),
    (dict(question="q", options="a, b", answer="A"), "'options' is not a list"),
    # wrong types are errors, not text such as "None" or "['q']" in a prompt, nor an index rounded down
    (dict(question=["q"], options=["a", "b"], answer="A"), "'question' must be text, got list"),
    (dict(question="q", options=["a", None, "c"], answer="A"), r"option 2 is None; options must be text"),
    (dict(question="q", options=["a", ["b"]], answer="A"), r"option 2 is list; options must be text"),
    (dict(question="q", options=["a", "b", "c"], answer_index=1.5), "answer_index 1.5 is not in 0-2"),
    (dict(question="q", options=["a", "b", "c"], answer_index=True), "answer_index True is not in 0-2"),
    (dict(question="q", answer="#### 5"), r"no 'options' \(nor option_0\.\.option_9\); the file's first row"),
])
def test_bad_mc_rows_are_named(tmp_path, row, message):
    good = dict(question="ok", options=["a", "b"], answer="A")
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n", encoding="utf-8")  # blank line 2
    with pytest.raises(ValueError, match=rf"mc.jsonl:3: .*{message}"):
        S.load_questions(str(path))


def test_bad_files_are_named(tmp_path):
    gsm = write_jsonl(tmp_path / "g.jsonl", [dict(question="q", answer="7")])
    with pytest.raises(ValueError, match=r"g.jsonl:1: answer has no '#### <number>'"):
        S.load_questions(str(gsm))
    write_jsonl(gsm, [dict(question="q", answer="#### seven")])
    with pytest.raises(ValueError, match=r"g.jsonl:1: the answer after '####' is not a number"):
        S.load_questions(str(gsm))
    other = write_jsonl(tmp_path / "o.jsonl", [dict(prompt="p", completion="c")])
    with pytest.raises(ValueError, match=r"o.jsonl: unknown question format, columns \['completion', 'prompt'\]"):
        S.load_questions(str(other))
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("question,answer\nq,#### 5\ncaf\u00e9 au lait,#### 6\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv:3: not UTF-8 \(byte 0xe9 at offset 28\)"):
        S.load_questions(str(bad))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    one = [dict(question="q", answer="#### 5")]
    two = f"{write_jsonl(tmp_path / 'a' / 'train.jsonl', one)},{write_jsonl(tmp_path / 'b' / 'train.jsonl', one)}"
    with pytest.raises(ValueError, match=r"b/train.jsonl:1: duplicate id 'train-1' .*give the files names"):
        S.load_questions(two)
    assert [it["group"] for it in S.load_questions(f"a={tmp_path / 'a' / 'train.jsonl'},b={tmp_path / 'b' / 'train.jsonl'}")] == ["a-1", "b-1"]
    (tmp_path / "run=3").mkdir()  # an "=" in a directory name is part of the path, not a name=path
    eq = write_jsonl(tmp_path / "run=3" / "gsm.jsonl", one)
    assert [it["group"] for it in S.load_questions(f"{eq},x={eq}")] == ["gsm-1", "x-1"]
    dup = write_jsonl(tmp_path / "d.jsonl", [dict(question_id=1, question="q", options=["a", "b"], answer="A")] * 2)
    with pytest.raises(ValueError, match=r"d.jsonl:2: duplicate id 'd-1' \(first at .*d.jsonl:1\)"):
        S.load_questions(str(dup))


# -----------------------------------------------------------------------------
# the filter and the translation checks

MC = dict(choices=["a", "b", "c", "d"], answer="B")
MATH = dict(choices=None, answer="2,400")


@pytest.mark.parametrize("item, text, want", [
    (MC, "so \\boxed{B}", ("B", None)),
    (MC, "first \\boxed{A}, no wait: \\boxed{(B)}", ("B", None)),  # the last box counts
    (MC, "\\boxed{\\text{B. b}}", ("B", None)),
    (MC, "\\boxed{C}", ("C", "wrong_answer")),
    (MC, "the answer is B", (None, "no_boxed_answer")),
    (MC, "\\boxed{B", (None, "no_boxed_answer")),  # unclosed: a truncated output
    (MATH, "2 * 1200 = \\boxed{2400}", ("2400", None)),
    (MATH, "\\boxed{2,400.0}", ("2400", None)),
    (MATH, "\\boxed{240}", ("240", "wrong_answer")),
])
def test_filter(item, text, want):
    assert S.judge_answer(item, text) == want


def test_gold_letters_past_d_follow_the_evaluation():
    item = dict(choices=list("abcdefghij"), answer="J")
    if S.EVAL_READS_ALL_LETTERS:
        assert S.judge_answer(item, "\\boxed{J}") == ("J", None)
    else:  # the evaluation reads A-D only: such an item is unscorable, never kept by a guess
        assert S.judge_answer(item, "\\boxed{J}") == (None, "gold_unreadable")
    assert S.judge_answer(dict(item, answer="B"), "\\boxed{B}") == ("B", None)


SRC = ("Tom has 3 apples and buys 4 more. How many apples does he have now?",
       "He has 3 + 4 = 7 apples. The answer is \\boxed{7}.")
SW = ("Tom ana tufaha 3 na ananunua 4 zaidi. Ana tufaha ngapi sasa?",
      "Ana tufaha 3 + 4 = 7. Jibu ni \\boxed{7}.")
HI = ("टॉम के पास 3 सेब हैं और वह 4 और खरीदता है। अब उसके पास कितने सेब हैं?",
      "उसके पास 3 + 4 = 7 सेब हैं। उत्तर \\boxed{7} है।")
ITEM = dict(choices=None, answer="7")


@pytest.mark.parametrize("out, lang, want", [
    (SW, "sw", None),
    (HI, "hi", None),
    (HI, "ne", None),  # Devanagari serves both
    (None, "sw", "no_translation"),
    (("", SW[1]), "sw", "empty"),
    ((SW[0], "  "), "sw", "empty"),
    ((SRC[0], SW[1]), "sw", "untranslated"),
    (("Here is the translation:\n\n" + SRC[0], SW[1]), "sw", "untranslated"),  # the source, wrapped
    ((SW[0], SW[1] + " Jibu ni 7." * 40), "sw", "length_ratio"),  # runaway repetition
    ((SW[0], "Ana tufaha 3 + 4 = 7. Jibu ni saba, tufaha saba kwa jumla."), "sw", "boxed_answer_missing"),
    ((SW[0], "Ana tufaha 3 + 4 = 7. Jibu ni \\boxed{8}."), "sw", "boxed_answer_changed"),
    (SW, "hi", "wrong_script"),
    ((HI[0], "He has 3 + 4 = 7 apples, so the answer is \\boxed{7}, सेब।"), "hi", "wrong_script"),
])
def test_translation_checks(out, lang, want):
    assert S.check_translation(ITEM, SRC, out, lang) == want


def test_options_must_survive_translation():
    item = dict(choices=["Oxygen", "Carbon dioxide", "Helium", "Neon"], answer="B")
    src = (S.mc_prompt("Which gas do plants take in?", item["choices"]), "Plants take in CO2: \\boxed{B}.")
    ok = "Mimea huchukua gesi gani?\n\nA. Oksijeni\nB. Kaboni dioksidi\nC. Heliamu\nD. Neon"
    resp = "Mimea huchukua CO2: \\boxed{B}."
    assert S.check_translation(item, src, (ok, resp), "sw") is None
    assert S.check_translation(item, src, (ok.replace("B. ", "(B) ").replace("C. ", "C) "), resp), "sw") is None
    assert S.check_translation(item, src, (ok.replace("\nC. ", " C. "), resp), "sw") == "options_lost"
    assert S.check_translation(item, src, (ok.replace("B. ", "Б. "), resp), "sw") == "options_lost"
    # a question with its own "I." / "II." statement lines (common in MMLU-Pro) keeps them: not options_lost
    q = "Which statements are true?\nI. The sky is blue.\nII. Grass is green."
    item = dict(choices=["I only", "II only", "I and II", "neither"], answer="C")
    src = (S.mc_prompt(q, item["choices"]), "Both hold: \\boxed{C}.")
    sw = src[0].replace("Which statements are true?", "Taarifa zipi ni za kweli?").replace("The sky", "Anga")
    assert S.check_translation(item, src, (sw, "Zote mbili ni kweli: \\boxed{C}."), "sw") is None
    assert S.check_translation(item, src, (sw.replace("\nI. ", " I. "), "Zote ni kweli: \\boxed{C}."), "sw") \
        == "options_lost"  # the statement line merged away: the structure changed


def test_length_ratio_catches_a_dropped_half():
    long_src = (SRC[0], "Step. " * 80 + "The answer is \\boxed{7}.")
    assert S.check_translation(ITEM, long_src, (SW[0], "Jibu ni \\boxed{7}."), "sw") == "length_ratio"
    assert S.check_translation(ITEM, long_src, (SW[0], "Hatua. " * 80 + "Jibu ni \\boxed{7}."), "sw") is None


def test_script_fraction_ignores_boxes_and_latex():
    assert S.script_fraction("उत्तर \\boxed{B} \\frac{1}{2} है", "hi") == 1.0
    assert S.script_fraction("答案是 \\boxed{B}", "zh") == 1.0
    assert S.script_fraction("abc दो", "hi") == 0.25  # letters a, b, c, द; ो is a mark (Mc)


# -----------------------------------------------------------------------------
# end to end with a tiny model

def chain_model(tok, text=ANSWER):
    """A tiny MoETransformer that answers every prompt with `text`: every block's output projections are
    zero, so the last hidden state is the current token's embedding, and lm_head maps each token of the
    chain "\\n" -> text -> end-of-turn to the next one (greedy decoding follows the chain)."""
    chain = [tok.encode("\n")[0]] + tok.encode(text) + [tok.eos_id]
    assert len(set(chain)) == len(chain), "the chain needs distinct tokens"
    cfg = MoEConfig(vocab_size=tok.vocab_size, hidden_size=32, n_layers=2, n_heads=2, n_kv_heads=1,
                    intermediate_size=64, n_experts=4, top_k=2, moe_intermediate_size=32,
                    max_position_embeddings=512, qk_norm=True, tie_word_embeddings=False)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj")):
                p.zero_()
        model.embed_tokens.weight.normal_(0, 0.02)
        model.lm_head.weight.zero_()
        for i, (t, nxt) in enumerate(zip(chain, chain[1:])):
            model.embed_tokens.weight[t] = 0
            model.embed_tokens.weight[t, i] = 1.0
            model.lm_head.weight[nxt, i] = 10.0
    return model


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    save_hf(chain_model(tok), path)
    shutil.copy(TOK_PATH, path)
    return path


def test_end_to_end_builtin_generator(tmp_path, questions, checkpoint, tok, capsys):
    """The tiny model answers "\\boxed{B}" to everything: the MMLU item with gold B is kept, the others are
    rejected for the right reasons. Translations come from a file (one good, one that lost its box); the
    JSONL loads and tokenizes as train.py does. Then the model itself as translator: what it returns is no
    translation of a multiple-choice prompt, and the checks say so."""
    out = tmp_path / "out"
    trans = write_jsonl(tmp_path / "t.jsonl", [
        dict(id="mmlu-70-sw", lang="sw", prompt="Mimea huchukua gesi gani?\n\nA. Oksijeni\nB. Kaboni dioksidi\n"
             "C. Heliamu\nD. Neon", response="Jibu ni \\boxed{B}."),
        dict(id="mmlu-70-hi", lang="hi", prompt="पौधे कौन सी गैस लेते हैं?\n\nA. ऑक्सीजन\nB. कार्बन डाइऑक्साइड\n"
             "C. हीलियम\nD. नियॉन", response="उत्तर है।"),
    ])
    common = ["--questions", questions, "--checkpoint", str(checkpoint), "--langs", "sw,hi", "--max-new-tokens", "24",
              "--translate-max-new-tokens", "24", "--temperature", "0", "--batch-size", "3"]
    S.main(["build", *common, "--out", str(out), "--translator", "file", "--translations", str(trans)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answer"]["mmlu"] == dict(items=2, kept=1, rejected={"wrong_answer": 1})
    assert summary["answer"]["gsm8k"] == dict(items=2, kept=0, rejected={"no_boxed_answer": 2})
    assert summary["translate"] == {"sw": dict(items=1, kept=1, rejected={}),
                                    "hi": dict(items=1, kept=0, rejected={"boxed_answer_missing": 1})}
    assert "translate hi" in capsys.readouterr().out
    rows = load_parallel_jsonl(out / "parallel.jsonl")
    assert [(r["id"], r["lang"]) for r in rows] == [("mmlu-70-en", "en"), ("mmlu-70-sw", "sw")]
    en, sw = rows
    assert en["response"] == ANSWER and en["prompt"].startswith("Answer the following multiple choice question.")
    assert sw["anchor_prompt"] == en["prompt"] and sw["anchor_response"] == en["response"]
    assert sw["anchor_lang"] == "en" and sw["response"] == "Jibu ni \\boxed{B}."
    examples, stats = tokenize_samples(tok, rows, max_len=256)
    assert stats["kept"] == 2 and all(e["has_anchor"] for e in examples)
    train, val = split_train_val(rows, 0.5)
    assert len(train) + len(val) == 2 and len(val) in (0, 2)  # one group: both languages on one side

    S.main(["build", *common, "--out", str(tmp_path / "self"), "--limit", "1"])
    summary = json.loads((tmp_path / "self" / "summary.json").read_text())
    assert summary["translate"] == {"sw": dict(items=1, kept=0, rejected={"options_lost": 1}),
                                    "hi": dict(items=1, kept=0, rejected={"options_lost": 1})}
    got = [json.loads(l) for l in (tmp_path / "self" / "translations.jsonl").read_text().splitlines()]
    assert [(t["prompt"], t["response"]) for t in got] == [(ANSWER, ANSWER)] * 2  # what the model "translated" to


def fake_answers(prompts, run):
    """A responder that answers each prompt right (the gold is in the prompt's own text) or translates."""
    outs = []
    for p in prompts:
        if p.startswith("Translate"):
            text = p.split("\n\n", 1)[1]
            outs.append("[sw] " + text.replace("a", "á"))  # changed, with boxes and option labels kept
        elif "Carbon dioxide" in p:
            outs.append("Plants take in CO2. \\boxed{B}")
        elif "2 + 3" in p:
            outs.append("2 + 3 = 5. \\boxed{C}")
        elif "apples" in p:
            outs.append("3 + 4 = 7. \\boxed{7}")
        else:
            outs.append("2 * 1200 = \\boxed{2400}")
    return outs


def test_engine_path(tmp_path, questions):
    """The same build through an OpenAI-compatible server (answering and translating) via the CLI."""
    with FakeEngine(lambda payload: fake_answers([payload["messages"][-1]["content"]], 0)[0], models=["orig"]) as fake:
        S.main(["build", "--questions", questions, "--engine-url", fake.url, "--engine-model", "orig",
                "--langs", "sw", "--out", str(tmp_path / "out")])
        assert {r["temperature"] for r in fake.requests} == {0.1} and {r["seed"] for r in fake.requests} == {0}
        assert {r["max_tokens"] for r in fake.requests} == {1024, 2048}  # answers, translations
    rows = load_parallel_jsonl(tmp_path / "out" / "parallel.jsonl")
    assert len(rows) == 8 and sorted({r["lang"] for r in rows}) == ["en", "sw"]
    assert rows[1]["response"] == "[sw] Plánts táke in CO2. \\boxed{B}"


# -----------------------------------------------------------------------------
# crash and resume

def run(out, questions, respond=fake_answers, langs=("sw", "zu")):
    items = S.load_questions(questions)
    translate = S.responder_translator(respond, "en", S.LANG_NAMES)
    return S.run_stage1(items, respond, translate, out, langs=list(langs), batch_size=1, progress=False)


def lines(path):
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]


def test_crash_and_resume_without_duplicates(tmp_path, questions):
    ref = tmp_path / "ref"
    ref.mkdir()
    want = run(ref, questions)
    calls = []

    def flaky(prompts, r):
        calls.append(prompts)
        if len(calls) in (3, 7):  # once while answering, once while translating
            raise RuntimeError("GPU fell over")
        return fake_answers(prompts, r)
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="GPU fell over"):
            run(out, questions, flaky)
    assert run(out, questions, flaky) == want
    assert len(calls) == 4 + 4 * 2 + 2  # one call per answer and per (item, language), + the 2 failed ones
    for name in ("answers.jsonl", "translations.jsonl", "parallel.jsonl"):
        assert (out / name).read_text() == (ref / name).read_text()
    # a resume with everything done asks for nothing
    assert run(out, questions, respond=None) == want
    # a responder that loses an output is an error, not a silent shift of answers against questions
    (tmp_path / "short").mkdir()
    with pytest.raises(RuntimeError, match="respond returned 0 outputs for 1 inputs"):
        run(tmp_path / "short", questions, lambda p, r: [])
    with pytest.raises(RuntimeError, match=r"respond \(translating\) returned 1 outputs for 2 inputs"):
        run(tmp_path / "short", questions, lambda p, r: fake_answers(p, r)[:1])


KILLER = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_stage1 as T
n, translating = [], []
real_fsync = os.fsync
def fsync(fd):  # phase "fsync": killed after the journal write, before its fsync
    if {phase!r} == "fsync" and len(translating) >= 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync
def dying(prompts, r):
    n.append(1)
    translating.extend(p for p in prompts[:1] if p.startswith("Translate"))
    if {phase!r} == "answer" and len(n) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return T.fake_answers(prompts, r)
T.run({out!r}, {questions!r}, dying)
"""


def test_kill_and_torn_line(tmp_path, questions):
    """kill -9 in the middle of the answers, then a torn last line, then kill -9 while translating, between a
    journal write and its fsync: each rerun redoes exactly what is missing, nothing twice."""
    out = tmp_path / "out"
    out.mkdir()

    def killed(phase):
        script = KILLER.format(root=str(ROOT), tests=str(ROOT / "tests"), phase=phase, out=str(out),
                               questions=questions)
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == -9, proc.stderr
    killed("answer")
    assert len(lines(out / "answers.jsonl")) == 2
    with open(out / "answers.jsonl", "a", encoding="utf-8") as f:
        f.write('{"group": "gsm8k-1", "source": "gsm8k", "prompt": "Tom h')  # a write cut short
    killed("fsync")  # answers the 2 missing items, then dies in the 3rd translation's fsync
    answers = lines(out / "answers.jsonl")
    assert [a["group"] for a in answers] == ["mmlu-70", "mmlu-71", "gsm8k-1", "gsm8k-2"]
    assert len(lines(out / "translations.jsonl")) == 3  # written, not fsync'd: a killed process loses nothing
    calls = []
    run(out, questions, lambda p, r: calls.append(p) or fake_answers(p, r))
    assert len(calls) == 4 * 2 - 3 and all(p[0].startswith("Translate") for p in calls)
    assert len(lines(out / "answers.jsonl")) == 4 and len(lines(out / "translations.jsonl")) == 8
    rows = load_parallel_jsonl(out / "parallel.jsonl")  # raises on a duplicate id
    assert len(rows) == 4 * 3


def test_full_disk_leaves_no_half_batch(tmp_path, questions, monkeypatch):
    """A write that fails half way (ENOSPC) is cut back, named, and the rerun finishes as if nothing happened."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    ref.mkdir(), out.mkdir()
    run(ref, questions)
    real_write, n = os.write, []

    def full(fd, data):
        n.append(1)
        if len(n) == 2:  # the second batch: half of it reaches the disk, then the disk is full
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match=r"answers.jsonl: could not append 1 records \(No space left on device\)"):
        run(out, questions)
    monkeypatch.setattr(os, "write", real_write)
    assert [a["group"] for a in lines(out / "answers.jsonl")] == ["mmlu-70"]  # no torn second record
    run(out, questions)
    for name in ("answers.jsonl", "translations.jsonl", "parallel.jsonl", "summary.json"):
        assert (out / name).read_text() == (ref / name).read_text()


def test_edited_question_file_is_refused(tmp_path, questions):
    """Answers (and their verdicts) belong to the question they answered: a changed gold or question in the
    file is an error on resume, not a silently stale row."""
    run(tmp_path, questions)
    mc = tmp_path / "mmlu.jsonl"
    rows = lines(mc)
    write_jsonl(mc, [dict(rows[0], answer="A", answer_index=0), rows[1]])
    with pytest.raises(S.InputError, match=r"answers.jsonl: item mmlu-70 was answered with another gold answer"):
        run(tmp_path, questions)
    write_jsonl(mc, [dict(rows[0], question="Which gas do plants give off?"), rows[1]])
    with pytest.raises(S.InputError, match=r"item mmlu-70 was answered with another question or options"):
        run(tmp_path, questions)


def test_resume_refuses_other_settings_and_a_second_process(tmp_path):
    S.pin_settings(tmp_path, dict(temperature=0.1, answer_model="typo"))
    (tmp_path / "answers.jsonl").write_text('{"group": "a", "prom')  # a torn line only: nothing journaled
    S.pin_settings(tmp_path, dict(temperature=0.1, answer_model="a"))  # nothing done yet: a fix is fine
    assert json.loads((tmp_path / "run.json").read_text())["answer_model"] == "a"
    (tmp_path / "answers.jsonl").write_text('{"group": "a"}\n')
    S.pin_settings(tmp_path, dict(temperature=0.1, answer_model="a"))
    with pytest.raises(SystemExit, match=r"other settings \(temperature: 0.1 -> 0.7\)"):
        S.pin_settings(tmp_path, dict(temperature=0.7, answer_model="a"))
    with S.locked(tmp_path):
        with pytest.raises(SystemExit, match="another stage1 run is using this directory"):
            with S.locked(tmp_path):
                pass
    (tmp_path / "answers.jsonl").write_text('{"group": "a"}\nnot json\n{"group": "b"}\n')
    with pytest.raises(ValueError, match=r"answers.jsonl:2: not a journal record; the journal is damaged"):
        S.Journal(tmp_path / "answers.jsonl", key=lambda r: r["group"])
    (tmp_path / "answers.jsonl").write_text('{"group": "a"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"answers.jsonl:2: not a journal record"):
        S.Journal(tmp_path / "answers.jsonl", key=lambda r: r["group"])
    (tmp_path / "run.json").write_text('{"temperature": 0.')  # e.g. edited by hand
    with pytest.raises(SystemExit, match=r"run.json: damaged \(not JSON\)"):
        S.pin_settings(tmp_path, dict(temperature=0.1, answer_model="a"))


# -----------------------------------------------------------------------------
# validation comes first

def test_validation_before_model_loading(tmp_path, questions):
    not_a_checkpoint = tmp_path / "empty_dir"  # loading it would fail: the input errors must come first
    not_a_checkpoint.mkdir()
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(question="q", options=["a", "b"], answer="Z")])
    base = ["build", "--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: answer 'Z'"):
        S.main(base + ["--questions", str(bad), "--langs", "sw"])
    with pytest.raises(SystemExit, match=r"unknown language 'xx'; give its name as xx=Name"):
        S.main(base + ["--questions", questions, "--langs", "sw,xx"])
    trans = write_jsonl(tmp_path / "t.jsonl", [dict(id="mmlu-70-sw", lang="hi", prompt="p", response="r")])
    with pytest.raises(SystemExit, match=r"t.jsonl:1: id 'mmlu-70-sw' does not end with '-hi'"):
        S.main(base + ["--questions", questions, "--langs", "sw", "--translator", "file", "--translations", str(trans)])
    with pytest.raises(SystemExit, match="exactly one of --checkpoint"):
        S.main(["build", "--questions", questions, "--langs", "sw", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing written before the checks pass


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--limit", "0"], "--limit must be >= 1, got 0"),  # 0 used to mean "no limit"
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--retries", "-1"], "--retries must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--min-ratio", "3", "--max-ratio", "1"], "need 0 <= min < max"),
    (["--min-script-fraction", "1.5"], r"--min-script-fraction must be in \[0, 1\]"),
    (["--dtype", "bf16"], "--dtype bf16: not a torch dtype"),
    (["--tokenizer", "/nonexistent/tok"], "--tokenizer /nonexistent/tok: no such file"),
    (["--langs", "sw,=Foo"], "--langs: '=Foo' is not a language code"),
    (["--source-lang", "xx"], "--source-lang: unknown language 'xx'; give its name as xx=Name"),
    (["--langs", "sw,en"], "--langs: en is the source language"),
    (["--translations", "t.jsonl"], "--translations is read by --translator file only"),
    # sampling: -1 would sample softmax(logits / -1); NaN would be pinned in run.json and block every rerun
    (["--temperature", "-1"], r"--temperature=-1.0: must be a finite number >= 0"),
    (["--temperature", "nan"], r"--temperature=nan: must be a finite number >= 0"),
    (["--top-p", "0"], r"--top-p=0.0: must be in \(0, 1\]"),
    (["--top-p", "2"], r"--top-p=2.0: must be in \(0, 1\]"),
    (["--timeout", "inf"], r"--timeout must be > 0 seconds \(a finite number\), got inf"),
    (["--timeout", "-3"], "--timeout must be > 0 seconds"),
    (["--engine-url", "http://127.0.0.1:1/v1?key=x"], "--engine-url: a base URL has no"),
    (["--translate-url", "localhost:8001"], "--translate-url: expected http://host:port/v1"),
])
def test_bad_flags_stop_before_any_work(tmp_path, questions, flags, message):
    ckpt = tmp_path / "empty_dir"  # loading it would fail: the flag errors must come first
    ckpt.mkdir()
    argv = ["build", "--questions", questions, "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
            "--langs", "sw"]
    with pytest.raises(SystemExit, match=message):
        S.main(argv + flags)
    assert not (tmp_path / "o").exists()


def test_out_is_a_file(tmp_path, questions):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(SystemExit, match=rf"--out {out}: {tmp_path / 'f'} is a file, not a directory"):
            S.main(["build", "--questions", questions, "--checkpoint", str(tmp_path), "--out", str(out),
                    "--langs", "sw"])


def test_server_failing_mid_run(tmp_path, questions):
    """The server answers two items, then errors: a clear stop that says the work is kept; the rerun resumes."""
    with FakeEngine(lambda payload: fake_answers([payload["messages"][-1]["content"]], 0)[0]) as fake:
        argv = ["build", "--questions", questions, "--engine-url", fake.url, "--engine-model", "m", "--langs", "sw",
                "--out", str(tmp_path / "o"), "--batch-size", "1", "--concurrency", "1", "--retries", "0", "--quiet"]
        fake.script = [("sleep", 0), ("sleep", 0), (500, {"error": "GPU lost"})]  # 2 answers, then an error
        with pytest.raises(SystemExit, match=r"HTTP 500.*GPU lost.*\nThe finished batches are kept in .*; rerun the"):
            S.main(argv)
        assert len(lines(tmp_path / "o" / "answers.jsonl")) == 2
        S.main(argv)
    assert len(lines(tmp_path / "o" / "answers.jsonl")) == 4


def test_translation_file_completed_later(tmp_path, questions):
    """--translator file re-reads the file on every run: rows added after a first run (no_translation then)
    count on the rerun, which asks the model nothing new."""
    trans = tmp_path / "t.jsonl"
    sw = dict(id="gsm8k-1-sw", lang="sw", prompt="Tom ana tufaha 3 na ananunua 4 zaidi. Ana tufaha ngapi?",
              response="3 + 4 = 7. \\boxed{7}")
    write_jsonl(trans, [sw])
    with FakeEngine(lambda payload: fake_answers([payload["messages"][-1]["content"]], 0)[0]) as fake:
        argv = ["build", "--questions", questions, "--engine-url", fake.url, "--engine-model", "m", "--langs", "sw",
                "--out", str(tmp_path / "out"), "--translator", "file", "--translations", str(trans), "--quiet"]
        S.main(argv)
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["translate"]["sw"] == dict(items=4, kept=1, rejected={"no_translation": 3})
        write_jsonl(trans, [sw, dict(sw, id="gsm8k-2-sw", prompt="Gari linagharimu dola 1,200; magari mawili?",
                                     response="2 * 1200 = \\boxed{2400}")])
        n = len(fake.requests)
        S.main(argv)
        assert len(fake.requests) == n  # the answers came from the journal
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["translate"]["sw"] == dict(items=4, kept=2, rejected={"no_translation": 2})
    assert [r["id"] for r in load_parallel_jsonl(tmp_path / "out" / "parallel.jsonl") if r["lang"] == "sw"] == \
        ["gsm8k-1-sw", "gsm8k-2-sw"]


def test_bad_translation_files(tmp_path, questions, capsys):
    t = tmp_path / "t.jsonl"
    write_jsonl(t, [dict(id="mmlu-70-sw", lang="sw", prompt=["Mimea?"], response="\\boxed{B}")])
    with pytest.raises(ValueError, match=r"t.jsonl:1: 'prompt' is list, not text"):
        S.load_translation_file(t)
    write_jsonl(t, [dict(id=70, lang="sw", prompt="p", response="r")])
    with pytest.raises(ValueError, match=r"t.jsonl:1: 'id' is int, not text"):
        S.load_translation_file(t)
    t.write_bytes(b'{"id": "mmlu-70-sw", "lang": "sw", "prompt": "Mimea", "response": "Jibu \xe9"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: not UTF-8"):
        S.load_translation_file(t)
    # rows that match nothing are announced before the run (every item would be no_translation)
    write_jsonl(t, [dict(id="prox-70-sw", lang="sw", prompt="p", response="r"),
                    dict(id="mmlu-70-swa", lang="swa", prompt="p", response="r")])
    with pytest.raises(SystemExit, match="unreachable"):  # no server: stops right after the notes
        S.main(["build", "--questions", questions, "--langs", "sw", "--out", str(tmp_path / "o"), "--translator",
                "file", "--translations", str(t), "--engine-url", "http://127.0.0.1:1/v1", "--engine-model", "m"])
    err = capsys.readouterr().err
    assert "has rows in languages not in --langs: swa" in err
    assert "1 rows of" in err and "match no item of --questions" in err and "e.g. 'mmlu-70-sw'" in err


def test_translation_file(tmp_path, questions):
    """--translator file: rows joined by id; a missing one is rejected as no_translation."""
    items = S.load_questions(questions)
    trans = write_jsonl(tmp_path / "t.jsonl", [
        dict(id="mmlu-70-sw", lang="sw", prompt="Mimea huchukua gesi gani?\nA. O2\nB. CO2\nC. He\nD. Ne",
             response="Mimea huchukua CO2. \\boxed{B}"),
        dict(id="gsm8k-1-sw", lang="sw", prompt="Tom ana tufaha 3.", response="Jibu ni \\boxed{8}."),
    ])
    summary = S.run_stage1(items, fake_answers, S.file_translator(S.load_translation_file(trans)), tmp_path,
                           langs=["sw"], progress=False)
    assert summary["translate"]["sw"] == dict(items=4, kept=1, rejected={"boxed_answer_changed": 1, "no_translation": 2})
    ids = [r["id"] for r in load_parallel_jsonl(tmp_path / "parallel.jsonl")]
    assert ids == ["mmlu-70-en", "mmlu-70-sw", "mmlu-71-en", "gsm8k-1-en", "gsm8k-2-en"]



def test_credentials_in_a_url_are_refused_unechoed(tmp_path, questions, capsys):
    for flags in (["--engine-url", "http://me:hunter2@127.0.0.1:1/v1", "--engine-model", "m"],
                  ["--checkpoint", str(tmp_path), "--translator", "engine", "--translate-model", "t",
                   "--translate-url", "https://me:hunter2@example.org/v1"]):
        with pytest.raises(SystemExit, match=r"-url: a URL with credentials .* OPENAI_API_KEY") as e:
            S.main(["build", "--questions", questions, "--langs", "sw", "--out", str(tmp_path / "o"), *flags])
        assert "hunter2" not in str(e.value) and "hunter2" not in "".join(capsys.readouterr())
    assert not (tmp_path / "o").exists()


def test_mistyped_flag_is_not_taken_for_another(tmp_path, questions):
    """argparse would read --temp as --temperature and --max-new as --max-new-tokens: a typo that later
    matches a new flag would silently change the run."""
    with pytest.raises(SystemExit) as e:
        S.main(["build", "--questions", questions, "--langs", "sw", "--out", str(tmp_path / "o"),
                "--checkpoint", str(tmp_path), "--temp", "0.5"])
    assert e.value.code == 2 and not (tmp_path / "o").exists()


def test_reply_with_unicode_line_separators_resumes(tmp_path, questions):
    """A reply holding U+2028, U+2029 or U+0085 is one journal record (json.dumps writes them raw); the
    journal used to be read with str.splitlines(), which split inside it: every rerun then stopped with
    "answers.jsonl:1: not a journal record"."""
    def odd(prompts, r):
        return [t.replace(". ", ".\u2028 ", 1).replace("=", "=\u2029", 1) + "\u0085" for t in fake_answers(prompts, r)]
    want = run(tmp_path, questions, odd)
    assert want["answer"]["mmlu"]["kept"] == 2
    assert "\u2028" in (tmp_path / "answers.jsonl").read_text(encoding="utf-8")
    assert run(tmp_path, questions, respond=None) == want  # the rerun reads every record back, asks nothing
    rows = load_parallel_jsonl(tmp_path / "parallel.jsonl")
    assert len(rows) == 4 * 3 and rows[0]["response"].startswith("Plants take in CO2.\u2028 ")


def test_pt_without_tokenizer_writes_nothing(tmp_path, questions):
    (tmp_path / "base.pt").write_bytes(b"not loaded")
    with pytest.raises(SystemExit, match=r"base.pt is a .pt file, which carries no tokenizer: pass --tokenizer"):
        S.main(["build", "--questions", questions, "--langs", "sw", "--out", str(tmp_path / "o"),
                "--checkpoint", str(tmp_path / "base.pt")])
    assert not (tmp_path / "o").exists()  # no run.json, no lock: the fixed command runs in the same --out


def test_generation_past_the_context_is_refused_up_front(tmp_path, questions, checkpoint, tok):
    """The default 1024 new tokens on a 512-token model: refused before anything is written, saying what fits
    (prompt tokens counted with the checkpoint's own chat format)."""
    argv = ["build", "--questions", questions, "--langs", "sw", "--checkpoint", str(checkpoint),
            "--out", str(tmp_path / "o")]
    items = S.load_questions(questions)
    longest = max(len(tok.encode_chat(it["prompt"])[0]) for it in items)
    with pytest.raises(SystemExit, match=rf"the longest answer prompt \({longest} tokens\) \+ --max-new-tokens=1024 "
                                         rf"= {longest + 1024} exceeds the model's context of 512 tokens \(at most "
                                         rf"{512 - longest} new tokens fit\)"):
        S.main(argv)
    fill = lambda text: len(tok.encode_chat(S.TRANSLATE_PROMPT.format(source="English", target="English",
                                                                        text=text))[0])
    request = max(max(fill(it["prompt"]) for it in items), fill("") + 64)  # a question, or a 64-token answer
    with pytest.raises(SystemExit, match=rf"the longest translation request .* \({request} tokens\) \+ "
                                         rf"--translate-max-new-tokens=2048 .* \(at most {512 - request} new"):
        S.main(argv + ["--max-new-tokens", "64"])
    assert not (tmp_path / "o").exists()


def test_nothing_kept_is_an_error(tmp_path, questions):
    """A model that never writes a \\boxed{} answer (the toy original model): no 0-row parallel.jsonl and
    exit 0, but an error that says why and what to do; summary.json and the journal show what it wrote."""
    with FakeEngine(lambda payload: "I think it is carbon dioxide.") as fake:
        argv = ["build", "--questions", questions, "--engine-url", fake.url, "--engine-model", "m", "--langs", "sw",
                "--out", str(tmp_path / "o"), "--quiet"]
        with pytest.raises(SystemExit, match=r"no answer was kept \(4 items; no_boxed_answer: 4\), so there is no "
                                             r"parallel data.*\\boxed\{<the gold answer>\}.*answers.jsonl.*"
                                             r"docs/stage1.md"):
            S.main(argv)
        n = len(fake.requests)
        with pytest.raises(SystemExit, match="no answer was kept"):  # a rerun says it again, asks nothing
            S.main(argv)
        assert len(fake.requests) == n
    assert not (tmp_path / "o" / "parallel.jsonl").exists()
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["answer"]["mmlu"]["kept"] == 0


def test_full_disk_writing_the_output_is_a_clear_stop(tmp_path, questions, monkeypatch):
    """ENOSPC while parallel.jsonl is written: the old file stays, no temporary is left, the message says
    the journals are kept; the rerun (disk freed) finishes without asking the model again."""
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("parallel.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)
    with FakeEngine(lambda payload: fake_answers([payload["messages"][-1]["content"]], 0)[0]) as fake:
        argv = ["build", "--questions", questions, "--engine-url", fake.url, "--engine-model", "m", "--langs", "sw",
                "--out", str(tmp_path / "o"), "--quiet"]
        monkeypatch.setattr(os, "replace", full)
        with pytest.raises(SystemExit, match=r"parallel.jsonl: could not write \(No space left on device\)\n"
                                             r"The finished batches are kept in .*; rerun the same command"):
            S.main(argv)
        monkeypatch.setattr(os, "replace", real_replace)
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".lock", "answers.jsonl", "run.json",
                                                                      "translations.jsonl"]
        n = len(fake.requests)
        S.main(argv)
        assert len(fake.requests) == n
    assert len(load_parallel_jsonl(tmp_path / "o" / "parallel.jsonl")) == 8


DEMO_QUESTIONS = "mmlu=tests/fixtures/stage1/mmlu_pro.jsonl,gsm8k=tests/fixtures/stage1/gsm8k.jsonl"


def test_documented_offline_demo_route(tmp_path):
    """docs/stage1.md's offline route, its two commands as written (a free port for 8011, a temporary --out):
    the scripted demo model serves, stage1.py build runs through it and writes every file."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "tests/fake_engine.py", "--questions", DEMO_QUESTIONS, "--port",
                               str(port)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        assert server.stdout.readline().strip() == f"serving the scripted demo model 'oracle' at {url} (Ctrl-C stops)"
        out = tmp_path / "stage1_demo"
        proc = subprocess.run([sys.executable, "stage1.py", "build", "--questions", DEMO_QUESTIONS, "--engine-url", url,
                               "--engine-model", "oracle", "--langs", "sw", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "answer mmlu           3      3  -" in proc.stdout and "translate sw          5      5  -" in proc.stdout
    rows = load_parallel_jsonl(out / "parallel.jsonl")
    assert len(rows) == 10 and {r["lang"] for r in rows} == {"en", "sw"}
    assert rows[1]["prompt"].startswith("[Swahili] Answer the following multiple choice question")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "answers.jsonl", "parallel.jsonl", "run.json",
                                                     "summary.json", "translations.jsonl"]


def test_second_run_on_one_out_stops_before_loading_a_model(tmp_path, questions, checkpoint, monkeypatch):
    """Two runs on one --out: the second stops at once, not after loading its model (minutes at 30B)."""
    import checkpoint as C
    out = tmp_path / "o"
    out.mkdir()
    monkeypatch.setattr(C, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    with S.locked(out):
        with pytest.raises(SystemExit, match="another stage1 run is using this directory"):
            S.main(["build", "--questions", questions, "--langs", "sw", "--checkpoint", str(checkpoint),
                    "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_interrupt_and_unwritable_settings_are_clear_stops(tmp_path, questions, monkeypatch, capsys):
    with FakeEngine(lambda payload: fake_answers([payload["messages"][-1]["content"]], 0)[0]) as fake:
        argv = ["build", "--questions", questions, "--engine-url", fake.url + "/", "--engine-model", "m",
                "--langs", "sw", "--out", str(tmp_path / "o"), "--quiet", "--batch-size", "1"]
        real_write_atomic, real_run = S.write_atomic, S.run_stage1

        def full(path, text):
            raise OSError(errno.ENOSPC, f"{path}: could not write (No space left on device)")
        monkeypatch.setattr(S, "write_atomic", full)  # run.json cannot be written
        with pytest.raises(SystemExit, match=r"run.json: could not write \(No space left on device\)\nThe finished"):
            S.main(argv)
        monkeypatch.setattr(S, "write_atomic", real_write_atomic)

        def interrupted(items, respond, *a, **k):  # Ctrl-C after the first answer
            real_run(items[:1], respond, *a, **k)
            raise KeyboardInterrupt
        monkeypatch.setattr(S, "run_stage1", interrupted)
        with pytest.raises(SystemExit) as e:
            S.main(argv)
        assert e.value.code == 130 and "interrupted: the finished batches are kept in" in capsys.readouterr().err
        monkeypatch.setattr(S, "run_stage1", real_run)
        S.main(argv[:4] + [fake.url] + argv[5:])  # the same server without the trailing "/": the same run
    assert len(lines(tmp_path / "o" / "answers.jsonl")) == 4
