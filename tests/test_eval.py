"""eval.py, the command line, end to end on a tiny checkpoint: bench, table, compare, routing, band,
figures, and the input errors a user meets first."""
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

import eval as E
import evaluation.routing as R
from checkpoint import save_hf
from test_evaluation_model import tiny_model

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
PARALLEL = ROOT / "data" / "udhr" / "parallel.jsonl"
TOK_PATH = ROOT / "data" / "udhr" / "bpe.tiktoken"


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    """A tiny Hugging Face-layout checkpoint with its toy tokenizer, as train.py exports it."""
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    save_hf(tiny_model(tok), path)
    shutil.copy(TOK_PATH, path)
    return path


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
                   "--batch-size", "64", "--out", str(out), "--width", "2", "--edges"])  # 3 layers: no middle pair
    assert len(rows) == 2 * 3 * 3
    before = {(r["lang"], r["layer"]): r["js"] for r in rows if r["model"] == "before"}
    after = {(r["lang"], r["layer"]): r["js"] for r in rows if r["model"] == "after"}
    assert before == after  # the same checkpoint twice
    table = R.read_routing_csv(out / "routing.csv")
    assert len(table) == 18 and R.models_in(table) == ["before", "after"]
    printed = capsys.readouterr().out
    assert "--sara_band=[" in printed  # train.py's inclusive (start, end) band
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed: figures not checked")
    for name in ("routing_layers.png", "routing_heatmap.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    b = E.main(["band", "--routing-csv", str(out / "routing.csv"), "--width", "2", "--edges"])
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
    R.write_routing_csv(tmp_path / "routing.csv", routing)
    res = E.main(["compare", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--resamples", "500",
                  "--routing-csv", str(tmp_path / "routing.csv"), "--band", "1,2", "--out", str(tmp_path / "c.json")])
    corr = res["correlation"]
    assert corr["delta_acc"] == pytest.approx([30.0, 10.0, 20.0, 0.0])
    assert corr["delta_div"] == pytest.approx([-0.03, -0.01, -0.02, 0.0])
    assert corr["pearson"] == pytest.approx(-1.0) and corr["spearman"] == pytest.approx(-1.0)
    assert json.loads((tmp_path / "c.json").read_text())["correlation"]["n"] == 4
    assert "Spearman rho = -1.000" in capsys.readouterr().out


def write_run(path, correct_by_lang, benchmark="mgsm"):
    """A bench output dir written by hand: predictions.jsonl and results.json."""
    path.mkdir(parents=True)
    rows = [dict(benchmark=benchmark, protocol="generative", lang=l, id=str(i), run=0, gold="1", pred=None,
                 correct=bool(c), parallel=True) for l, v in correct_by_lang.items() for i, c in enumerate(v)]
    (path / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    langs = {l: dict(n=len(v), runs=[100 * sum(v) / len(v)], mean=100 * sum(v) / len(v), std=None, no_answer=0.0)
             for l, v in correct_by_lang.items()}
    avg = sum(d["mean"] for d in langs.values()) / len(langs)
    (path / "results.json").write_text(json.dumps(dict(benchmark=benchmark, protocol="generative", label=path.name,
                                                       langs=langs, average=dict(runs=[avg], mean=avg, std=None))))
    return path


def test_cli_inputs_that_would_mislead(tmp_path, capsys):
    a = write_run(tmp_path / "fft", {"sw": [1, 0, 0, 1], "hi": [1, 1, 0, 0]})
    b = write_run(tmp_path / "sara", {"sw": [1, 1, 0, 1], "hi": [1, 1, 0, 1], "bn": [0, 1, 0, 0]})
    E.main(["table", str(a), str(b)])
    out = capsys.readouterr().out
    assert "warning: the Avg column is over different language sets: fft: sw,hi; sara: sw,hi,bn" in out
    with pytest.raises(SystemExit, match="mgsm:bn only in --b"):
        E.main(["compare", "--a", str(a), "--b", str(b)])
    res = E.main(["compare", "--a", str(a), "--b", str(b), "--common-only", "--resamples", "300"])
    assert res["warnings"] == ["mgsm:bn only in --b"] and set(res["bootstrap"]) == {"sw", "hi", "overall"}
    out = capsys.readouterr().out
    assert "test-item noise only" in out and "jointly" in out
    (a / "results.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"fft/results\.json: not valid JSON"):
        E.main(["table", str(a), str(b)])
    # several seeds per condition: a seed-level t interval
    seeds_a = [write_run(tmp_path / f"a{s}", {"sw": [1, 0, 0, 1]}) for s in range(3)]
    seeds_b = [write_run(tmp_path / f"b{s}", {"sw": v}) for s, v in enumerate([[1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 0, 1]])]
    res = E.main(["compare", "--a", *map(str, seeds_a), "--b", *map(str, seeds_b), "--resamples", "300"])
    assert res["seed_level"]["overall"]["deltas"] == pytest.approx([25, 50, 0]) and res["seeds"] == 3
    assert "seed level overall" in capsys.readouterr().out


def test_cli_bench_with_an_engine_responder(tmp_path, monkeypatch, capsys):
    """--engine-url hands generation to engine.make_engine_responder (same call as the built-in responder);
    a stand-in module records the arguments and answers every MGSM item with its gold number."""
    calls = {}

    def make_engine_responder(base_url, model, **kw):
        calls.update(base_url=base_url, model=model, **kw)
        gold = {"sw": ["8", "8", "180"]}["sw"]
        return lambda prompts, run: [f"so \\boxed{{{g}}}" for g in gold[:len(prompts)]]

    def check_engine(base_url, model):  # bench asks the server for the model before any work
        calls.update(checked=(base_url, model))

    monkeypatch.setattr(E, "make_engine_responder", make_engine_responder)
    monkeypatch.setattr(E, "check_engine", lambda base_url, model, **kw: check_engine(base_url, model))
    s = E.main(["bench", "--engine-url", "http://localhost:8000/v1", "--engine-model", "sara", "--benchmark", "mgsm",
                "--data", str(FIX / "mgsm"), "--langs", "sw", "--runs", "2", "--max-new-tokens", "64",
                "--out", str(tmp_path / "e")])
    assert calls.pop("checked") == ("http://localhost:8000/v1", "sara")
    assert calls == dict(base_url="http://localhost:8000/v1", model="sara", max_new_tokens=64, temperature=0.1,
                         top_p=1.0, seed=0, concurrency=16, system=None, timeout=E.DEFAULT_TIMEOUT,
                         retries=E.DEFAULT_RETRIES)
    assert s["langs"]["sw"]["runs"] == [100.0, 100.0]
    assert json.loads((tmp_path / "e" / "results.json").read_text())["engine_model"] == "sara"
    with pytest.raises(SystemExit, match="needs --engine-model"):
        E.main(["bench", "--engine-url", "http://x/v1", "--benchmark", "mgsm", "--data", str(FIX / "mgsm"),
                "--langs", "sw"])
    with pytest.raises(SystemExit, match="needs --checkpoint"):
        E.main(["bench", "--benchmark", "mgsm", "--data", str(FIX / "mgsm"), "--langs", "sw"])


@pytest.mark.parametrize("extra, pattern", [
    (["--temperature", "-1"], r"--temperature must be >= 0 \(0: greedy\), got -1.0"),
    (["--runs", "0"], "--runs must be >= 1, got 0"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--langs", "sw,sw"], "--langs 'sw,sw': expected distinct"),
    (["--langs", ""], "--langs '': expected distinct"),
    (["--max-new-tokens", "100000"], r"--max-new-tokens 100000: the model's context is \d+ tokens"),
])
def test_bench_rejects_bad_flags_naming_them(checkpoint, tmp_path, extra, pattern):
    args = ["bench", "--checkpoint", str(checkpoint), "--benchmark", "mgsm", "--data", str(FIX / "mgsm"),
            "--langs", "sw", "--out", str(tmp_path / "o"), *extra]
    with pytest.raises(SystemExit, match=pattern):
        E.main(args)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, pattern", [
    (["--langs", "sw,xx"], r"--langs: \['xx'\] not in .*parallel.jsonl \(its languages: \['am', 'bn', 'en', 'ha', 'hi'"),
    (["--anchor", "EN"], r"--anchor: \['EN'\] not in .*its languages: \['am', 'bn', 'en'"),
    (["--max-len", "0"], "--max-len must be >= 2 .got 0."),
])
def test_routing_checks_languages_and_lengths_before_any_forward(tmp_path, monkeypatch, extra, pattern):
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    with pytest.raises(SystemExit, match=pattern):
        E.main(["routing", "--checkpoint", str(tmp_path / "none"), "--data", str(PARALLEL), "--langs", "sw,hi",
                "--out", str(tmp_path / "o"), *extra])


def test_table_rows_of_two_benchmarks_say_which_and_compare_needs_resamples(tmp_path, capsys):
    a = write_run(tmp_path / "mgsm", {"sw": [1, 0]})
    b = write_run(tmp_path / "bele", {"sw": [1, 1]}, benchmark="belebele")
    E.main(["table", str(a), str(b)])
    rows = capsys.readouterr().out.splitlines()
    assert any(r.startswith("mgsm [mgsm, generative]") for r in rows) and any(r.startswith("bele [belebele, generative]") for r in rows), rows
    with pytest.raises(SystemExit, match="--resamples must be >= 1"):
        E.main(["compare", "--a", str(a), "--b", str(a), "--resamples", "0"])


def test_bench_engine_faults_are_one_line_and_flags_bound_the_wait(tmp_path):
    """A server that answers 500, or too slowly, ends eval.py bench with one line naming the engine (no
    traceback), after --engine-retries retries of --engine-timeout seconds; bad values of those flags and a
    URL with credentials are refused before any request, and the password is never echoed."""
    import time
    from fake_engine import FakeEngine
    base = ["bench", "--engine-model", "m", "--benchmark", "mgsm", "--data", str(FIX / "mgsm"), "--langs", "sw",
            "--runs", "1", "--max-new-tokens", "8", "--out", str(tmp_path / "o")]
    with FakeEngine(lambda payload: "\\boxed{8}") as fake:
        fake.script = [(500, {"error": "boom"})] * 10
        with pytest.raises(SystemExit, match=r"^engine: .*500") as err:
            E.main(base + ["--engine-url", fake.url, "--engine-retries", "1", "--engine-timeout", "5",
                           "--engine-concurrency", "2"])
        assert "Traceback" not in str(err.value)
        fake.script = [("sleep", 3)] * 10
        t0 = time.time()
        with pytest.raises(SystemExit, match=r"^engine: "):
            E.main(base + ["--engine-url", fake.url, "--engine-retries", "0", "--engine-timeout", "0.5"])
        assert time.time() - t0 < 10
    for extra, pattern in [(["--engine-timeout", "inf"], "--engine-timeout must be > 0"),
                           (["--engine-timeout", "0"], "--engine-timeout must be > 0"),
                           (["--engine-retries", "-1"], "--engine-retries must be >= 0")]:
        with pytest.raises(SystemExit, match=pattern):
            E.main(base + ["--engine-url", "http://127.0.0.1:9/v1", *extra])
    with pytest.raises(SystemExit, match="credentials") as err:
        E.main(base + ["--engine-url", "http://u:s3cret@127.0.0.1:9/v1"])
    assert "s3cret" not in str(err.value)
    assert not (tmp_path / "o").exists()
