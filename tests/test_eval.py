"""Tests for eval.py: benchmark files in their public formats (tests/fixtures/), \\boxed{} extraction and
answer normalisation, the accuracy arithmetic with forced answers (a stub responder, and a tiny model whose
lm_head always prefers "B"), the routing analysis on the bundled parallel text, the statistics (scipy as
oracle), and the command line end to end on a tiny checkpoint."""
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import eval as E
from data.parallel import load_parallel_jsonl
from model import MoEConfig, MoETransformer
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
PARALLEL = ROOT / "data" / "udhr" / "parallel.jsonl"
TOK_PATH = ROOT / "data" / "udhr" / "bpe.tiktoken"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK_PATH)


def tiny_model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, hidden_size=32, n_layers=3, n_heads=2, n_kv_heads=1,
               intermediate_size=64, n_experts=4, top_k=2, moe_intermediate_size=32, qk_norm=True,
               max_position_embeddings=512)
    return MoETransformer(MoEConfig(**{**cfg, **kw})).eval()


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    """A tiny Hugging Face-layout checkpoint with its toy tokenizer, as train.py exports it."""
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    tiny_model(tok).save_pretrained(path)
    shutil.copy(TOK_PATH, path)
    return path


# -----------------------------------------------------------------------------
# files in the public row formats

def test_fixtures_load_in_every_format():
    items, path = E.load_benchmark("global_mmlu", FIX / "global_mmlu", "sw")
    assert path.name == "test.jsonl"  # sw/dev.jsonl is there too: the test split wins
    assert [it["answer"] for it in items] == ["A", "B", "B", "C"]
    assert items[1]["id"] == "high_school_mathematics/test/1" and items[1]["choices"][1] == "56"
    items, path = E.load_benchmark("global_mmlu", FIX / "global_mmlu", "hi")  # CSV, a quoted comma and quotes
    assert path.suffix == ".csv" and [it["answer"] for it in items] == ["B", "D", "A"]
    assert items[2]["question"] == 'पानी का रासायनिक सूत्र, यानी "formula", क्या है?'
    items, path = E.load_benchmark("belebele", FIX / "belebele", "sw")  # sw -> swh_Latn.jsonl
    assert path.name == "swh_Latn.jsonl" and [it["answer"] for it in items] == ["B", "C", "D"]
    assert items[0]["passage"].startswith("Mto Nile") and items[0]["id"] != items[1]["id"]
    items, _ = E.load_benchmark("mgsm", FIX / "mgsm", "sw")  # headerless TSV with a bare '"'
    assert [it["answer"] for it in items] == ["8", "8", "180"] and '"mengine"' in items[0]["question"]
    items, _ = E.load_benchmark("mgsm", FIX / "mgsm", "te")  # JSONL, answer_number an int
    assert [it["answer"] for it in items] == ["7", "2500"] and items[0]["choices"] is None
    items, _ = E.load_benchmark("mgsm", str(FIX / "mgsm" / "mgsm_{lang}.tsv"), "bn", limit=1)
    assert len(items) == 1 and items[0]["answer"] == "7"


def test_one_file_with_several_languages_is_filtered(tmp_path):
    both = tmp_path / "belebele_all.jsonl"
    both.write_text((FIX / "belebele" / "swh_Latn.jsonl").read_text(encoding="utf-8")
                    + (FIX / "belebele" / "hin_Deva.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    assert len(E.load_benchmark("belebele", both, "hi")[0]) == 2
    assert len(E.load_benchmark("belebele", both, "swh_Latn")[0]) == 3  # a FLORES code works too


def test_file_errors_are_clear(tmp_path):
    bad = tmp_path / "sw.jsonl"
    bad.write_text(json.dumps({"question": "q", "option_a": "1", "answer": "A"}) + "\n")
    with pytest.raises(ValueError, match="missing column.*option_b"):
        E.load_benchmark("global_mmlu", bad, "sw")
    bad.write_text(json.dumps(dict(question="q", option_a="1", option_b="2", option_c="3", option_d="4",
                                   answer="E")) + "\n")
    with pytest.raises(ValueError, match="not one of A, B, C, D"):
        E.load_benchmark("global_mmlu", bad, "sw")
    with pytest.raises(SystemExit, match="expected one file for language yo"):
        E.load_benchmark("global_mmlu", FIX / "global_mmlu", "yo")
    pq = tmp_path / "sw.parquet"
    pq.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pyarrow"):
            E.read_rows(pq)


# -----------------------------------------------------------------------------
# \boxed{} and answer normalisation

@pytest.mark.parametrize("text, want", [
    (r"so \boxed{B}", "B"),
    (r"\boxed{A} no, wait: \boxed{C}", "C"),  # several boxes: the last one
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{\boxed{D}}", "D"),  # a box in a box: the innermost starts last
    (r"\boxed {42}", "42"),
    (r"\boxed{7} then \boxed{8", "7"),  # an unclosed (truncated) box is no match
    ("the answer is B", None),
    ("", None),
])
def test_extract_boxed(text, want):
    assert E.extract_boxed(text) == want


@pytest.mark.parametrize("s, want", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("(B).", "B"), ("b", "B"), (r"\text{B}", "B"), ("$B$", "B"),
    ("B. Nairobi", "B"), ("(B) Nairobi", "B"), ("B) Nairobi", "B"), (" C ", "C"),
    ("E", None), ("A dog", None), ("Nairobi", None), ("42.0", None), ("AB", None), (None, None),
])
def test_normalize_choice(s, want):
    assert E.normalize_choice(s) == want


@pytest.mark.parametrize("s, want", [
    ("42", 42.0), ("42.0", 42.0), ("42.", 42.0), ("1,234", 1234.0), ("-3", -3.0), ("\u22125", -5.0),
    ("$18", 18.0), (r"18\%", 18.0), (r"\frac{1}{2}", 0.5), ("3/4", 0.75), (r"\text{18 dollars}", 18.0),
    ("x = 18", 18.0), (r"2 \times 9 = 18", 18.0), ("1,000,000", 1e6),
    ("3,5", None), ("B", None), ("1 or 2", None), (None, None), ("1/0", None),
])
def test_parse_number(s, want):
    assert E.parse_number(s) == want


def test_score_output_letters_vs_numbers():
    mc = dict(choices=["w", "x", "y", "z"], answer="B")
    num = dict(choices=None, answer="42")
    assert E.score_output(mc, r"\boxed{B}", "generative") == ("B", True)
    assert E.score_output(mc, r"\boxed{(B)}", "generative") == ("B", True)
    assert E.score_output(mc, r"\boxed{42.0}", "generative") == (None, False)
    assert E.score_output(mc, r"\boxed{B} hmm \boxed{A}", "generative") == ("A", False)
    assert E.score_output(num, r"\boxed{42.0}", "generative") == ("42", True)
    assert E.score_output(num, r"\boxed{42}", "generative") == ("42", True)
    assert E.score_output(num, r"\boxed{B}", "generative") == (None, False)
    assert E.score_output(num, "42", "generative") == (None, False)  # no box, no answer
    assert E.score_output(dict(num, answer="1,000"), r"\boxed{1000}", "generative")[1]
    assert E.score_output(mc, [-3.0, -1.0, -2.0, -9.0], "loglik") == ("B", True)


def test_templates():
    item = E.load_benchmark("belebele", FIX / "belebele", "sw")[0][0]
    prompt = E.build_prompt(item, E.get_template({}, "belebele", "generative", "sw"))
    assert r"\boxed{}" in prompt and r"\boxed{A}" in prompt  # literal braces survive
    assert item["passage"] in prompt and "B. Bahari ya Mediterania" in prompt
    user = E.load_templates(FIX / "templates.json", "mgsm")
    assert E.get_template(user, "mgsm", "generative", "sw").startswith("Tatua")
    assert E.get_template(user, "mgsm", "generative", "bn").startswith("Solve step by step")
    assert E.get_template(user, "global_mmlu", "loglik", "sw") == E.TEMPLATES["global_mmlu/loglik"]
    with pytest.raises(SystemExit, match="lacks placeholder"):
        E.get_template({"global_mmlu": {"sw": "{question} without options"}}, "global_mmlu", "generative", "sw")
    with pytest.raises(SystemExit, match="does not apply"):
        E.get_template({}, "mgsm", "loglik", "sw")


# -----------------------------------------------------------------------------
# accuracy arithmetic with forced answers

def mmlu_items():
    return {l: E.load_benchmark("global_mmlu", FIX / "global_mmlu", l)[0] for l in ("sw", "hi")}


def test_accuracy_arithmetic_with_a_stub_responder(tmp_path):
    items = mmlu_items()
    template = E.get_template({}, "global_mmlu", "generative", "sw")
    gold = {E.build_prompt(it, template): it["answer"] for its in items.values() for it in its}
    first = {E.build_prompt(its[0], template) for its in items.values()}

    def respond(prompts, run):  # run 0: all right; run 1: each language's first item wrong, another unboxed
        out = []
        for p in prompts:
            letter = gold[p] if run == 0 or p not in first else "ABCD"[("ABCD".index(gold[p]) + 1) % 4]
            out.append(f"Reasoning... the answer is \\boxed{{({letter})}}.")
        return out

    records = E.run_benchmark(items, respond, benchmark="global_mmlu", protocol="generative", runs=2)
    assert len(records) == 2 * (4 + 3)
    s = E.summarize(records)
    assert s["langs"]["sw"]["runs"] == [100.0, 75.0] and s["langs"]["sw"]["n"] == 4
    assert s["langs"]["hi"]["runs"] == pytest.approx([100.0, 200 / 3])
    assert s["langs"]["sw"]["mean"] == 87.5 and s["langs"]["sw"]["std"] == pytest.approx(25 / math.sqrt(2))
    assert s["average"]["runs"] == pytest.approx([100.0, (75 + 200 / 3) / 2])  # unweighted over languages
    assert s["average"]["std"] == pytest.approx(np.std([100.0, (75 + 200 / 3) / 2], ddof=1))
    table = E.format_table([("stub", s)], ["sw", "hi"])
    assert "87.50±17.68" in table and "83.33±23.57" in table and "85.42±20.62" in table
    E.write_bench_outputs(tmp_path, records, s, dict(label="stub"))
    rows = [json.loads(l) for l in open(tmp_path / "predictions.jsonl", encoding="utf-8")]
    assert sum(r["correct"] for r in rows) == 7 + 5 and rows[0]["output"].startswith("Reasoning")
    csv_rows = E.read_rows(tmp_path / "table.csv")
    assert [r["lang"] for r in csv_rows] == ["sw", "hi", "avg"] and float(csv_rows[0]["mean"]) == 87.5


def test_forced_model_loglik_accuracy(tok):
    """A model whose lm_head prefers the token "B" everywhere answers B to every question."""
    model = tiny_model(tok, lm_head_bias=True)
    b_token = tok.encode_chat("x", "B")[1][0]
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias[b_token] = 20.0
    respond = E.make_loglik_responder(model, tok, batch_size=3)
    s = E.summarize(E.run_benchmark(mmlu_items(), respond, benchmark="global_mmlu", protocol="loglik"))
    assert s["langs"]["sw"]["runs"] == [50.0] and s["langs"]["hi"]["runs"] == pytest.approx([100 / 3])
    items = {"sw": E.load_benchmark("belebele", FIX / "belebele", "sw")[0]}
    s = E.summarize(E.run_benchmark(items, respond, benchmark="belebele", protocol="loglik"))
    assert s["langs"]["sw"]["runs"] == pytest.approx([100 / 3])


def test_loglik_matches_a_direct_forward(tok):
    """Batched, left-padded, deduplicated scoring == log p(reply | prompt) from one plain forward per
    option, for one-token letters and for multi-token option texts."""
    model = tiny_model(tok, seed=3)
    prompts = ["Short?", "A much longer question with more tokens in it, to force left padding?"]
    for options in (E.LETTERS, ("Nairobi", "Mombasa ya pwani", "x", "Ziwa Viktoria")):
        got = E.letter_logliks(model, tok, prompts, batch_size=2, options=options)
        for n, p in enumerate(prompts):
            for c, o in enumerate(options):
                prompt_ids, reply = tok.encode_chat(p, o)
                reply = reply[:-1]  # without end-of-turn
                ids = torch.tensor([prompt_ids + reply])
                with torch.no_grad():
                    lp = torch.log_softmax(model(ids).logits[0].double(), -1)
                want = sum(lp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(reply))
                assert got[n, c].item() == pytest.approx(want.item(), abs=1e-4)


def test_generation_batched_equals_one_by_one(tok):
    model = tiny_model(tok, seed=1)
    prompts = ["Habari?", "Mji mkuu wa Kenya ni upi? Jibu kwa kifupi.", "Na?", "2 + 2 = ?"]
    kw = dict(max_new_tokens=6, temperature=0.0)
    batched = E.make_generative_responder(model, tok, batch_size=3, **kw)(prompts, 0)
    single = E.make_generative_responder(model, tok, batch_size=1, **kw)(prompts, 0)
    assert batched == single and all(isinstance(t, str) for t in batched)
    sampled = E.make_generative_responder(model, tok, batch_size=4, max_new_tokens=6, temperature=1.0, seed=5)
    assert sampled(prompts, 0) == sampled(prompts, 0)  # run r is seeded: reproducible


# -----------------------------------------------------------------------------
# routing analysis

def test_routing_on_bundled_text_one_value_per_layer_and_language(tok):
    model = tiny_model(tok, seed=2)
    samples = load_parallel_jsonl(PARALLEL)
    dists = E.routing_distributions(model, tok, samples, batch_size=64, max_len=48)
    rows = E.routing_divergence(dists, "en", layers=model.config.moe_layers)
    langs = sorted({s["lang"] for s in samples} - {"en"})
    assert len(langs) == 10 and sorted({r["lang"] for r in rows}) == langs
    assert len(rows) == len(langs) * 3 and {(r["lang"], r["layer"]) for r in rows} == {
        (l, k) for l in langs for k in range(3)}
    for r in rows:
        assert 0 < r["js"] <= r["js_paired"] + 1e-7  # JS is jointly convex: pooled <= mean of paired
        assert r["js_norm"] == pytest.approx(r["js"] / math.log(2)) and r["js_paired_norm"] <= 1
    assert {r["n_items"] for r in rows if r["lang"] == "ne"} == {48}


def test_routing_is_zero_for_identical_text(tok):
    model = tiny_model(tok, seed=2)
    en = [s for s in load_parallel_jsonl(PARALLEL) if s["lang"] == "en"][:12]
    copies = [dict(s, lang="xx", id=s["id"][:-3] + "-xx") for s in en]
    dists = E.routing_distributions(model, tok, en + copies[::-1], batch_size=5, max_len=64)
    rows = E.routing_divergence(dists, "en")
    assert len(rows) == 3 and all(r["n_items"] == 12 for r in rows)
    for key in E.METRICS:
        assert max(abs(r[key]) for r in rows) < 1e-6


def test_choose_band_is_the_bottom_of_the_u():
    u = [0.5, 0.2, 0.1, 0.15, 0.4, 0.6]
    assert E.choose_band(u, 1) == (2, 2) and E.choose_band(u, 2) == (2, 3) and E.choose_band(u, 3) == (1, 3)
    assert E.choose_band([1, 1, 1], 2) == (0, 1)  # ties: the earliest
    assert E.choose_band(u, 6) == (0, 5)
    with pytest.raises(SystemExit):
        E.choose_band(u, 7)
    rows = [dict(model="m", lang=l, layer=k + 10, js_norm=v + d) for l, d in (("sw", 0), ("hi", 0.1))
            for k, v in enumerate(u)]
    b = E.band_from_rows(rows, 2)
    assert (b["start"], b["end"]) == (12, 13) and b["mean"] == pytest.approx(0.175)  # decoder indices


# -----------------------------------------------------------------------------
# statistics

def test_rank_and_correlations_match_scipy():
    rng = np.random.default_rng(0)
    for x, y in [(rng.normal(size=7), rng.normal(size=7)), ([1, 2, 2, 3, 5, 5, 5], [3, 1, 2, 2, 9, 0, 4])]:
        np.testing.assert_allclose(E.rankdata(x), stats.rankdata(x))
        assert E.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert E.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    # exact permutation test: a perfect monotone relation over 5 languages; 2 of 120 orders reach |r| = 1
    assert E.permutation_p([1, 2, 3, 4, 5], [2, 4, 5, 8, 9], E.spearman) == pytest.approx(2 / 120)
    res = E.correlate({"sw": -0.03, "hi": -0.01, "bn": -0.02, "te": 0.0}, {"sw": 3.0, "hi": 1.0, "bn": 2.5, "te": 0.5,
                                                                          "ne": 9.0})
    assert res["langs"] == ["sw", "hi", "bn", "te"] and res["spearman"] == pytest.approx(-1.0)
    assert "note" in E.correlate({"sw": 1.0, "hi": 2.0}, {"sw": 1.0, "hi": 2.0})


def test_paired_bootstrap():
    a = {"sw": [1, 0, 0, 1, 0, 1, 0, 0], "hi": [0, 0, 1, 1]}
    b = {"sw": [1, 1, 0, 1, 1, 1, 0, 1], "hi": [0, 0, 1, 1]}
    res = E.paired_bootstrap(a, b, resamples=2000, seed=0)
    assert res["hi"]["delta"] == 0 and (res["hi"]["lo"], res["hi"]["hi"], res["hi"]["p"]) == (0, 0, 1.0)
    assert res["sw"]["delta"] == 37.5 and res["sw"]["acc_a"] == 37.5 and res["sw"]["acc_b"] == 75.0
    assert 0 < res["sw"]["lo"] < 37.5 < res["sw"]["hi"] <= 75 and res["sw"]["p"] < 0.05
    assert res["overall"]["delta"] == pytest.approx(18.75) and res["overall"]["n"] == 12
    assert res["overall"]["lo"] == pytest.approx(res["sw"]["lo"] / 2)  # hi adds exactly 0 to every resample
    assert E.paired_bootstrap(a, b, resamples=2000, seed=0) == res  # fixed seed: reproducible
    with pytest.raises(ValueError, match="same non-zero length"):
        E.paired_bootstrap({"sw": [1, 0]}, {"sw": [1]})


# -----------------------------------------------------------------------------
# command line, end to end on a tiny checkpoint

def test_cli_bench_table_and_compare(checkpoint, tmp_path, capsys):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    s = E.main(["bench", "--checkpoint", str(checkpoint), "--benchmark", "global_mmlu", "--data",
                str(FIX / "global_mmlu"), "--langs", "sw,hi", "--protocol", "loglik", "--out", str(out_a),
                "--label", "tiny"])
    assert set(s["langs"]) == {"sw", "hi"} and len(s["average"]["runs"]) == 1
    E.main(["bench", "--checkpoint", str(checkpoint), "--benchmark", "mgsm", "--data", str(FIX / "mgsm"),
            "--langs", "sw,bn", "--runs", "2", "--max-new-tokens", "3", "--templates", str(FIX / "templates.json"),
            "--out", str(out_b)])
    res = json.loads((out_b / "results.json").read_text())
    assert res["runs"] == 2 and res["langs"]["sw"]["n"] == 3 and res["temperature"] == 0.1
    preds = [json.loads(l) for l in open(out_b / "predictions.jsonl", encoding="utf-8")]
    assert len(preds) == 2 * (3 + 2) and {p["run"] for p in preds} == {0, 1}
    capsys.readouterr()
    E.main(["table", str(out_a), str(out_b)])
    printed = capsys.readouterr().out
    assert "tiny" in printed and "Avg" in printed and "bn" in printed
    result = E.main(["compare", "--a", str(out_a), "--b", str(out_a / "predictions.jsonl"), "--resamples", "200"])
    assert result["bootstrap"]["overall"]["delta"] == 0


def test_cli_routing_band_and_figures(checkpoint, tmp_path, capsys):
    out = tmp_path / "routing"
    rows = E.main(["routing", "--checkpoint", str(checkpoint), "--compare", str(checkpoint), "--labels",
                   "before,after", "--data", str(PARALLEL), "--langs", "sw,hi,zu", "--max-len", "32",
                   "--batch-size", "64", "--out", str(out), "--width", "2"])
    assert len(rows) == 2 * 3 * 3
    before = {(r["lang"], r["layer"]): r["js"] for r in rows if r["model"] == "before"}
    after = {(r["lang"], r["layer"]): r["js"] for r in rows if r["model"] == "after"}
    assert before == after  # the same checkpoint twice
    table = E.read_routing_csv(out / "routing.csv")
    assert len(table) == 18 and E.models_in(table) == ["before", "after"]
    printed = capsys.readouterr().out
    assert "--sara_layers=[" in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed: figures not checked")
    for name in ("routing_layers.png", "routing_heatmap.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    b = E.main(["band", "--routing-csv", str(out / "routing.csv"), "--width", "2"])
    assert b["end"] - b["start"] == 1 and b["model"] == "before"


def test_routing_without_matplotlib_still_writes_numbers(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "routing"
    E.main(["routing", "--checkpoint", str(checkpoint), "--data", str(PARALLEL), "--langs", "sw",
            "--max-len", "32", "--batch-size", "64", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "figures skipped: matplotlib is not installed" in printed
    assert (out / "routing.csv").exists() and not list(out.glob("*.png"))


def test_compare_correlates_divergence_and_accuracy_changes(tmp_path, capsys):
    langs, dacc_items = ["sw", "hi", "bn", "te"], {"sw": 3, "hi": 1, "bn": 2, "te": 0}  # items gained
    for run, extra in (("a", lambda l: 0), ("b", lambda l: dacc_items[l])):
        rows = [dict(benchmark="mgsm", protocol="generative", lang=l, id=str(i), run=0, gold="1", pred=None,
                     correct=i < 2 + extra(l)) for l in langs for i in range(10)]
        (tmp_path / run).mkdir()
        (tmp_path / run / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    routing = []
    for model, drop in (("fft", 0.0), ("sara", 1.0)):
        for k, l in enumerate(langs):
            for layer in range(4):
                js = 0.2 - (drop * 0.01 * dacc_items[l] if layer in (1, 2) else 0.0)
                routing.append(dict(model=model, lang=l, anchor="en", layer=layer, moe_index=layer, n_items=10,
                                    js=js * math.log(2), js_norm=js, js_paired=js, js_paired_norm=js))
    E.write_routing_csv(tmp_path / "routing.csv", routing)
    res = E.main(["compare", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--resamples", "500",
                  "--routing-csv", str(tmp_path / "routing.csv"), "--band", "1,2", "--out", str(tmp_path / "c.json")])
    corr = res["correlation"]
    assert corr["delta_acc"] == pytest.approx([30.0, 10.0, 20.0, 0.0])
    assert corr["delta_div"] == pytest.approx([-0.03, -0.01, -0.02, 0.0])
    assert corr["pearson"] == pytest.approx(-1.0) and corr["spearman"] == pytest.approx(-1.0)
    assert json.loads((tmp_path / "c.json").read_text())["correlation"]["n"] == 4
    assert "Spearman rho = -1.000" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tok):
    cpu = tiny_model(tok, seed=4)
    gpu = tiny_model(tok, seed=4).cuda()
    prompts = ["Habari?", "Mji mkuu wa Kenya ni upi? Jibu kwa kifupi."]
    np.testing.assert_allclose(E.letter_logliks(gpu, tok, prompts).numpy(),
                               E.letter_logliks(cpu, tok, prompts).numpy(), atol=1e-3)
    sampled = E.make_generative_responder(gpu, tok, max_new_tokens=5, temperature=0.1, seed=1)
    assert sampled(prompts, 0) == sampled(prompts, 0)  # a CUDA generator, seeded per run
    samples = [s for s in load_parallel_jsonl(PARALLEL) if s["lang"] in ("en", "sw")][:40]
    rows = {dev: E.routing_divergence(E.routing_distributions(m, tok, samples, max_len=64), "en")
            for dev, m in (("cpu", cpu), ("gpu", gpu))}
    np.testing.assert_allclose([r["js"] for r in rows["gpu"]], [r["js"] for r in rows["cpu"]], atol=1e-5)
