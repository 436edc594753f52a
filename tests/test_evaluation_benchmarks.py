"""evaluation/benchmarks.py: the benchmark files in their public formats (tests/fixtures/), bad input as
clear errors naming file and line, and the prompt templates."""
import json
from pathlib import Path

import pytest

import evaluation.benchmarks as B

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


def test_fixtures_load_in_every_format():
    items, path = B.load_benchmark("global_mmlu", FIX / "global_mmlu", "sw")
    assert path.name == "test.jsonl"  # sw/dev.jsonl is there too: the test split wins
    assert [it["answer"] for it in items] == ["A", "B", "B", "C"]
    assert items[1]["id"] == "high_school_mathematics/test/1" and items[1]["choices"][1] == "56"
    items, path = B.load_benchmark("global_mmlu", FIX / "global_mmlu", "hi")  # CSV, a quoted comma and quotes
    assert path.suffix == ".csv" and [it["answer"] for it in items] == ["B", "D", "A"]
    assert items[2]["question"] == 'पानी का रासायनिक सूत्र, यानी "formula", क्या है?'
    items, path = B.load_benchmark("belebele", FIX / "belebele", "sw")  # sw -> swh_Latn.jsonl
    assert path.name == "swh_Latn.jsonl" and [it["answer"] for it in items] == ["B", "C", "D"]
    assert items[0]["passage"].startswith("Mto Nile") and items[0]["id"] != items[1]["id"]
    items, _ = B.load_benchmark("mgsm", FIX / "mgsm", "sw")  # headerless TSV with a bare '"'
    assert [it["answer"] for it in items] == ["8", "8", "180"] and '"mengine"' in items[0]["question"]
    items, _ = B.load_benchmark("mgsm", FIX / "mgsm", "te")  # JSONL, answer_number an int
    assert [it["answer"] for it in items] == ["7", "2500"] and items[0]["choices"] is None
    items, _ = B.load_benchmark("mgsm", str(FIX / "mgsm" / "mgsm_{lang}.tsv"), "bn", limit=1)
    assert len(items) == 1 and items[0]["answer"] == "7"


def test_one_file_with_several_languages_is_filtered(tmp_path):
    both = tmp_path / "belebele_all.jsonl"
    both.write_text((FIX / "belebele" / "swh_Latn.jsonl").read_text(encoding="utf-8")
                    + (FIX / "belebele" / "hin_Deva.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    assert len(B.load_benchmark("belebele", both, "hi")[0]) == 2
    assert len(B.load_benchmark("belebele", both, "swh_Latn")[0]) == 3  # a FLORES code works too


def test_file_errors_are_clear(tmp_path):
    bad = tmp_path / "sw.jsonl"
    bad.write_text(json.dumps({"question": "q", "option_a": "1", "answer": "A"}) + "\n")
    with pytest.raises(ValueError, match="missing column.*option_b"):
        B.load_benchmark("global_mmlu", bad, "sw")
    bad.write_text(json.dumps(dict(question="q", option_a="1", option_b="2", option_c="3", option_d="4",
                                   answer="E")) + "\n")
    with pytest.raises(ValueError, match="not one of A, B, C, D"):
        B.load_benchmark("global_mmlu", bad, "sw")
    with pytest.raises(SystemExit, match="expected one file for language yo"):
        B.load_benchmark("global_mmlu", FIX / "global_mmlu", "yo")
    pq = tmp_path / "sw.parquet"
    pq.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pyarrow"):
            B.read_rows(pq)


def test_templates():
    item = B.load_benchmark("belebele", FIX / "belebele", "sw")[0][0]
    prompt = B.build_prompt(item, B.get_template({}, "belebele", "generative", "sw"))
    assert r"\boxed{}" in prompt and r"\boxed{A}" in prompt  # literal braces survive
    assert item["passage"] in prompt and "B. Bahari ya Mediterania" in prompt
    user = B.load_templates(FIX / "templates.json", "mgsm")
    assert B.get_template(user, "mgsm", "generative", "sw").startswith("Tatua")
    assert B.get_template(user, "mgsm", "generative", "bn").startswith("Solve step by step")
    assert B.get_template(user, "global_mmlu", "loglik", "sw") == B.TEMPLATES["global_mmlu/loglik"]
    with pytest.raises(SystemExit, match="lacks placeholder"):
        B.get_template({"global_mmlu": {"sw": "{question} without options"}}, "global_mmlu", "generative", "sw")
    with pytest.raises(SystemExit, match="does not apply"):
        B.get_template({}, "mgsm", "loglik", "sw")


def test_csv_row_with_an_unquoted_comma_names_file_and_line(tmp_path):
    bad = tmp_path / "sw.csv"
    bad.write_text("question,option_a,option_b,option_c,option_d,answer\n"
                   "\"Ok, quoted\",1,2,3,4,A\n"
                   "\n"
                   "Two, unquoted,1,2,3,4,B\n", encoding="utf-8")  # 7 fields: options and gold would shift
    with pytest.raises(ValueError, match=r"sw\.csv:4: 7 fields where the header has 6"):
        B.load_benchmark("global_mmlu", bad, "sw")
    tsv = tmp_path / "mgsm_sw.tsv"
    tsv.write_text("Swali la kwanza\t8\nSwali\tla pili\t9\n", encoding="utf-8")  # a tab inside the question
    with pytest.raises(ValueError, match=r"mgsm_sw\.tsv:2: 3 fields .* unquoted tab"):
        B.load_benchmark("mgsm", tsv, "sw")


def test_one_file_without_language_column_for_several_languages_is_an_error(tmp_path):
    one = FIX / "mgsm" / "mgsm_sw.tsv"
    assert set(B.load_benchmarks("mgsm", one, ["sw"])) == {"sw"}
    with pytest.raises(SystemExit, match="one file for languages sw and bn"):
        B.load_benchmarks("mgsm", one, ["sw", "bn"])
    both = tmp_path / "belebele_all.jsonl"  # a language column: filtered, fine
    both.write_text((FIX / "belebele" / "swh_Latn.jsonl").read_text(encoding="utf-8")
                    + (FIX / "belebele" / "hin_Deva.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    assert {l: len(v) for l, v in B.load_benchmarks("belebele", both, ["sw", "hi"]).items()} == {"sw": 3, "hi": 2}


def test_parallel_ids(tmp_path):
    """Items carry `parallel` when their id names the same item in every language."""
    mmlu = B.load_benchmark("global_mmlu", FIX / "global_mmlu", "sw")[0]  # sample_id
    bele = B.load_benchmark("belebele", FIX / "belebele", "sw")[0]  # link + question_number
    mgsm = B.load_benchmark("mgsm", FIX / "mgsm", "sw")[0]  # row index
    assert all(it["parallel"] for it in mmlu + bele + mgsm)
    assert bele[0]["id"] == "https://en.wikibooks.org/wiki/Nile#1" and mgsm[2]["id"] == "2"
    no_ids = tmp_path / "sw.jsonl"  # Global-MMLU rows without sample_id: row index, not known to be parallel
    no_ids.write_text(json.dumps(dict(question="q", option_a="1", option_b="2", option_c="3", option_d="4",
                                      answer="C")) + "\n", encoding="utf-8")
    item = B.load_benchmark("global_mmlu", no_ids, "sw")[0][0]
    assert item["id"] == "0" and item["parallel"] is False


def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    """Excel saves CSVs with a UTF-8 byte-order mark; it must not become part of the first column's name."""
    from evaluation.benchmarks import read_rows
    csv_path, jsonl_path = tmp_path / "q.csv", tmp_path / "q.jsonl"
    csv_path.write_bytes("\ufeffquestion,answer\nTwo plus two?,4\n".encode("utf-8"))
    jsonl_path.write_bytes('\ufeff{"question": "q", "answer": "1"}\n'.encode("utf-8"))
    assert read_rows(csv_path)[0]["question"] == "Two plus two?"
    assert read_rows(jsonl_path) == [{"question": "q", "answer": "1"}]
