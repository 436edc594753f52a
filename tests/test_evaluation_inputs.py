"""Benchmark records and the input checks of the evaluation (issues 19-21): unknown names, the data/ ->
evaluation/ edge, JSONL with Unicode line separators, non-UTF-8 files, gold answer formats, --templates keys,
context and sampling checks before any work, one-line checkpoint errors, progress and the no-answer rate,
provenance in results files."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

import eval as E
import evaluation.accuracy as A
import evaluation.benchmarks as B
import evaluation.generate as G
from checkpoint import save_hf
from data.prompts import GOLD_NUMBER, gold_number
from evaluation.scoring import parse_number
from test_evaluation_model import tiny_model

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TOK_PATH = ROOT / "data" / "udhr" / "bpe.tiktoken"
MMLU_ROW = dict(question="q", option_a="1", option_b="2", option_c="3", option_d="4", answer="B")
SEPARATORS = "\u2028\u2029\u0085"  # legal raw inside a JSON string; str.splitlines() splits at each


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    save_hf(tiny_model(tok), path)  # context 512
    shutil.copy(TOK_PATH, path)
    return path


def bench(checkpoint, out, *extra, benchmark="mgsm", data=FIX / "mgsm", langs="sw"):
    return ["bench", "--checkpoint", str(checkpoint), "--benchmark", benchmark, "--data", str(data),
            "--langs", langs, "--out", str(out), *extra]


def no_model(monkeypatch):
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("the weights were read before the check"))


# -----------------------------------------------------------------------------
# the records

def test_unknown_benchmark_is_an_error_listing_the_known_ones():
    for call in (lambda: B.get_benchmark("mmlu"), lambda: B.load_benchmark("mmlu", FIX / "mgsm", "sw"),
                 lambda: B.get_template({}, "gsm8k", "generative", "sw")):
        with pytest.raises(SystemExit, match="unknown benchmark .*known: global_mmlu, belebele, mgsm"):
            call()


def test_each_records_example_row_loads_and_is_in_the_docs():
    docs = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    for name, b in B.BENCHMARKS.items():
        item = b.to_item(b.example, 0, "sw", "example")
        assert item["question"] == b.example["question"] and item["lang"] == "sw"
        assert json.dumps(b.example, ensure_ascii=False) in docs, f"docs/evaluation.md lacks {name}'s example row"
    assert B.BENCHMARKS["belebele"].to_item(B.BENCHMARKS["belebele"].example, 0, "sw", "x")["answer"] == "B"


def test_data_does_not_import_evaluation():
    code = ("import sys, data.questions, data.rows, data.prompts, data.parallel; "
            "bad = sorted(m for m in sys.modules if m == 'evaluation' or m.startswith('evaluation.')); "
            "assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -----------------------------------------------------------------------------
# files

def test_jsonl_with_unicode_line_separators_inside_strings_loads(tmp_path):
    row = dict(MMLU_ROW, question="line" + SEPARATORS + "end")
    bench_file = tmp_path / "sw.jsonl"
    bench_file.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    items, _ = B.load_benchmark("global_mmlu", bench_file, "sw")
    assert items[0]["question"] == "line" + SEPARATORS + "end" and items[0]["answer"] == "B"
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(dict(question="x" + SEPARATORS, options=["a", "b"], answer="B"),
                                    ensure_ascii=False) + "\n", encoding="utf-8")
    from data.questions import load_questions
    assert load_questions(str(questions))[0]["question"] == "x" + SEPARATORS
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(json.dumps(dict(benchmark="mgsm", protocol="generative", lang="sw", id="0", run=0, gold="8",
                                     pred=None, correct=False, output="a" + SEPARATORS), ensure_ascii=False) + "\n",
                     encoding="utf-8")
    assert A.load_predictions(preds) == {("mgsm", "sw"): {"0": ("8", 0.0, False)}}


def test_non_utf8_benchmark_files_name_file_and_line(tmp_path):
    csv_file = tmp_path / "sw.csv"
    csv_file.write_bytes(b"question,option_a,option_b,option_c,option_d,answer\nok,1,2,3,4,A\ncaf\xe9,1,2,3,4,B\n")
    with pytest.raises(ValueError, match=r"sw\.csv:3: not UTF-8"):
        B.load_benchmark("global_mmlu", csv_file, "sw")
    jsonl_file = tmp_path / "sw.jsonl"
    jsonl_file.write_bytes(json.dumps(MMLU_ROW).encode() + b"\n" + b'{"question": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"sw\.jsonl:2: not UTF-8"):
        B.load_benchmark("global_mmlu", jsonl_file, "sw")
    preds = tmp_path / "predictions.jsonl"
    preds.write_bytes(b'{"x": "\xe9"}\n')
    with pytest.raises(SystemExit, match=r"predictions\.jsonl:1: not UTF-8"):
        A.load_predictions(preds)


@pytest.mark.parametrize("benchmark, row, message", [
    ("global_mmlu", dict(MMLU_ROW, answer="BC", sample_id="s/1"), r"sw\.jsonl:2 \(id s/1\): answer 'BC' is not one of"),
    ("global_mmlu", dict(MMLU_ROW, answer=""), r"sw\.jsonl:2 \(id 1\): answer '' is not one of"),
    ("mgsm", dict(question="q", answer_number="12 apples"), r"sw\.jsonl:2 \(id 1\): answer_number '12 apples' is not a number"),
    ("mgsm", dict(question="q", answer_number=True), r"sw\.jsonl:2 \(id 1\): answer_number True is not a number"),
    ("belebele", dict(flores_passage="p", question="q", mc_answer1="a", mc_answer2="b", mc_answer3="c",
                      mc_answer4="d", correct_answer_num="12"), r"sw\.jsonl:2 \(id 1\): correct_answer_num '12' is not 1-4"),
])
def test_a_gold_answer_of_the_wrong_format_names_file_line_and_id(tmp_path, benchmark, row, message):
    good = B.BENCHMARKS[benchmark].example
    path = tmp_path / "sw.jsonl"
    path.write_text(json.dumps({k: v for k, v in good.items() if k not in ("dialect", "link")}) + "\n"
                    + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        B.load_benchmark(benchmark, path, "sw")


@given(st.from_regex(GOLD_NUMBER, fullmatch=True))
def test_every_accepted_gold_number_is_read_by_the_scorer(text):
    assert gold_number(text, "x") == text
    value = parse_number(text)
    assert value is not None and value == pytest.approx(float(text.replace(",", "")), rel=1e-12)


# -----------------------------------------------------------------------------
# templates

def test_unknown_template_keys_are_errors_listing_the_valid_ones(tmp_path):
    path = tmp_path / "t.json"
    for spec, message in [
            ({"gobal_mmlu": {"sw": "{question} {A} {B} {C} {D}"}, "mgsm": "{question}"},
             r"unknown key 'gobal_mmlu'; expected benchmark keys \(global_mmlu, global_mmlu/loglik, belebele, "),
            ({"gobal_mmlu": "{question}"}, r"unknown language key\(s\) \['gobal_mmlu'\]; expected 'default' or one of"),
            ({"mgsm": {"swh": "{question}"}}, r"mgsm: unknown language key\(s\) \['swh'\]"),
            ({"mgsm": {"sw": 3}}, r"mgsm: expected a template, or \{language: template\}")]:
        path.write_text(json.dumps(spec), encoding="utf-8")
        with pytest.raises(SystemExit, match=message):
            B.load_templates(path, "mgsm", ["sw"])
    path.write_text(json.dumps({"mgsm": {"swh_Latn": "Swali: {question}", "xx": "X: {question}"}}), encoding="utf-8")
    spec = B.load_templates(path, "mgsm", ["xx"])  # a FLORES code and a --langs code are language keys
    assert B.get_template(spec, "mgsm", "generative", "sw") == "Swali: {question}"
    assert B.get_template(spec, "mgsm", "generative", "xx") == "X: {question}"


# -----------------------------------------------------------------------------
# context and sampling flags

def test_generation_past_the_context_is_refused_naming_the_prompt(tok):
    model = tiny_model(tok, max_position_embeddings=64)
    respond = G.make_generative_responder(model, tok, max_new_tokens=40, temperature=0.0)
    with pytest.raises(ValueError, match=r"prompt 1 \('a a a .*exceeds the model's context of 64 tokens"):
        respond(["short", "a " * 30], 0)
    with pytest.raises(ValueError, match=r"prompt 0 .*the model's context is 64: nothing can be generated"):
        G.letter_logliks(model, tok, ["a " * 70])


def test_bench_checks_the_context_before_the_weights_and_says_what_fits(checkpoint, tmp_path, monkeypatch):
    no_model(monkeypatch)
    with pytest.raises(SystemExit, match=r"--max-new-tokens 1024: the model's context is 512 tokens; the longest "
                                         r"prompt \(sw item \d+\) \(\d+ tokens\) \+ max_new_tokens=1024 .*; "
                                         r"--max-new-tokens \d+ or less fits every prompt"):
        E.main(bench(checkpoint, tmp_path / "o"))  # the default --max-new-tokens
    assert not (tmp_path / "o").exists()


def test_a_pt_checkpoints_context_is_read_without_its_weights(tok, tmp_path, monkeypatch):
    from checkpoint import save_base
    model = tiny_model(tok, max_position_embeddings=256)
    save_base(tmp_path / "base.pt", model.state_dict(), model.config)
    assert G.peek_context(tmp_path / "base.pt") == 256 and G.peek_context(tmp_path / "nothing.pt") is None
    no_model(monkeypatch)
    with pytest.raises(SystemExit, match=r"--max-new-tokens 300: the model's context is 256 tokens"):
        E.main(bench(tmp_path / "base.pt", tmp_path / "o", "--tokenizer", str(TOK_PATH), "--max-new-tokens", "300"))


@pytest.mark.parametrize("extra, pattern", [
    (["--temperature", "nan"], r"--temperature must be >= 0 \(0: greedy\), got nan \(not a finite number\)"),
    (["--temperature", "inf"], r"--temperature must be >= 0 \(0: greedy\), got inf \(not a finite number\)"),
    (["--top-p", "2"], r"--top-p must be in \(0, 1\], got 2.0"),
    (["--top-p", "nan"], r"--top-p must be in \(0, 1\], got nan"),
    (["--seed", "-1"], r"--seed must be in 0..2\*\*63 - 1 - --runs .*got -1"),
    (["--seed", str(2 ** 63)], r"--seed must be in 0..2\*\*63"),
    (["--protocol", "loglik"], r"the loglik protocol does not apply to mgsm \(its protocols: generative, harness\)"),
    (["--protocol", "harness", "--templates", str(FIX / "templates.json")], "--templates does not apply to the harness"),
])
def test_bench_flags_are_checked_before_any_work(checkpoint, tmp_path, monkeypatch, extra, pattern):
    no_model(monkeypatch)
    monkeypatch.setattr(E, "load_benchmarks", lambda *a, **k: pytest.fail("the data was read before the check"))
    with pytest.raises(SystemExit, match=pattern):
        E.main(bench(checkpoint, tmp_path / "o", *extra))


@pytest.mark.parametrize("extra, pattern", [
    (["--temperature=1e999"], r"temperature=inf \(command line\): must be >= 0 and finite"),
    (["--top_p=2.0"], r"top_p=2.0 \(command line\): must be in \(0, 1\]"),
    (["--seed=-1"], r"seed=-1 \(command line\): must be in 0..2\*\*63 - 1"),
])
def test_sample_py_checks_sampling_flags_with_the_shared_validator(checkpoint, extra, pattern):
    import sample
    with pytest.raises(SystemExit, match=pattern):
        sample.main(["--checkpoint", str(checkpoint), "--prompt", "hello", "--device", "cpu", *extra])


def test_sample_py_refuses_a_prompt_past_the_context_before_loading(checkpoint, monkeypatch):
    import sample
    monkeypatch.setattr(sample, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("weights read first"))
    with pytest.raises(SystemExit, match=r"max_new_tokens=600 \(command line\): the prompt's \d+ tokens \+ "
                                         r"max_new_tokens exceed the model's context of 512 tokens"):
        sample.main(["--checkpoint", str(checkpoint), "--prompt", "hello", "--device", "cpu", "--max_new_tokens=600"])


# -----------------------------------------------------------------------------
# checkpoint errors as one line

def test_missing_checkpoint_and_a_too_large_tokenizer_are_one_line_errors(tok, checkpoint, tmp_path):
    with pytest.raises(SystemExit, match=r"--checkpoint .*/nowhere: no such file or directory"):
        E.main(bench(tmp_path / "nowhere", tmp_path / "o"))
    small = tmp_path / "small"
    save_hf(tiny_model(tok, vocab_size=300), small)
    shutil.copy(TOK_PATH, small)
    with pytest.raises(SystemExit, match=r"--checkpoint .*small: tokenizer .* has \d+ tokens but the model .* only "
                                         r"300 embeddings") as err:
        E.main(bench(small, tmp_path / "o", "--max-new-tokens", "4"))
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit, match=r"--checkpoint .*/nowhere: no such file or directory"):
        E.main(["routing", "--checkpoint", str(tmp_path / "nowhere"), "--langs", "sw", "--out", str(tmp_path / "r")])


def test_compare_checks_band_and_seed_before_reading_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "load_predictions", lambda *a, **k: pytest.fail("read before the check"))
    for extra, pattern in [(["--band", "7-34"], r"--band '7-34': expected START,END"),
                           (["--band", "9,3"], r"--band '9,3': expected START,END with START <= END"),
                           (["--seed", "-2"], r"--seed must be in 0..2\*\*63 - 1, got -2")]:
        with pytest.raises(SystemExit, match=pattern):
            E.main(["compare", "--a", "x", "--b", "y", "--routing-csv", "r.csv", *extra])


# -----------------------------------------------------------------------------
# what a run shows and records

def test_bench_shows_progress_and_the_no_answer_rate_and_records_the_platform(checkpoint, tmp_path, capsys):
    E.main(bench(checkpoint, tmp_path / "o", "--max-new-tokens", "3", "--runs", "1", "--temperature", "0",
                 "--label", "tiny"))
    captured = capsys.readouterr()
    assert "run 0: 3/3 prompts" in captured.err and "% no answer" in captured.err
    # a 3-token reply of a random tiny model holds no \boxed{}: 100 % unread, said beside the 0 %
    assert "100.00  <- tiny: no answer read (%)" in captured.out
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["platform"]["torch"] and res["platform"]["device"] == "cpu" and "commit" in res["platform"]
    assert res["average"]["no_answer"] == 100.0
