"""A ShifCon checkpoint at inference (methods/shifcon.install_for_inference): eval.py bench and routing and
sample.py run it with its shift by the prompt's language (--shifcon off / the English code: unshifted),
and refuse, before any prompt runs, a language it has no vector for. Oracle: the same forward with
shift_hook set by hand (tests/test_methods_shifcon_hook.py checks the hook against the equations)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import eval as E
import sample
from checkpoint import save_hf
from configurator import ConfigError
from evaluation.benchmarks import item_prompt, load_benchmarks
from evaluation.generate import letter_logliks
from methods.shifcon import LanguageVectors, save_vectors, shift_hook
from test_evaluation_model import tiny_model

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TOK_PATH = ROOT / "data" / "udhr" / "bpe.tiktoken"
FORWARD, BACK = 2, 3  # 3 layers: layer 1 runs shifted


def vectors():
    torch.manual_seed(3)
    v = LanguageVectors()
    for lang in ("en", "sw", "hi"):
        for p in (FORWARD, BACK):
            v.update(lang, p, 3 * torch.randn(4, 32))  # large: the shift must change the outputs
    return v


@pytest.fixture(scope="module")
def shifcon_checkpoint(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("shifcon") / "hf"
    save_hf(tiny_model(tok), path)
    shutil.copy(TOK_PATH, path)
    save_vectors(path / "shifcon.json", vectors(), FORWARD, BACK, "en")
    return path


def test_bench_runs_each_language_shifted_by_its_own_vectors(shifcon_checkpoint, tok, tmp_path):
    def scores(*extra):
        out = tmp_path / "-".join(extra or ("auto",))
        E.main(["bench", "--checkpoint", str(shifcon_checkpoint), "--benchmark", "global_mmlu", "--data",
                str(FIX / "global_mmlu"), "--langs", "sw,hi", "--protocol", "loglik", "--out", str(out), *extra])
        return {(r["lang"], r["id"]): r["scores"] for r in map(json.loads, open(out / "predictions.jsonl"))}
    shifted, unshifted = scores(), scores("--shifcon", "off")
    items = load_benchmarks("global_mmlu", str(FIX / "global_mmlu"), ["sw", "hi"], None)
    model = tiny_model(tok)
    for lang in ("sw", "hi"):
        prompts = [item_prompt(it, "global_mmlu", "loglik", None) for it in items[lang]]
        for hook, got in ((shift_hook(vectors(), lang, FORWARD, BACK), shifted), (None, unshifted)):
            model.residual_hook = hook
            want = letter_logliks(model, tok, prompts)
            for it, w in zip(items[lang], want):
                assert got[lang, it["id"]] == pytest.approx(w.tolist(), abs=1e-4)
    assert any(abs(a - b) > 1e-3 for k in shifted for a, b in zip(shifted[k], unshifted[k]))
    assert json.load(open(tmp_path / "auto" / "results.json"))["shifcon"] == "auto"


def test_a_language_without_a_vector_is_refused_before_any_prompt(shifcon_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "run_benchmark", lambda *a, **k: pytest.fail("a prompt ran"))
    with pytest.raises(SystemExit, match=r"no language vector for \['bn'\].*pass --shifcon off"):
        E.main(["bench", "--checkpoint", str(shifcon_checkpoint), "--benchmark", "mgsm", "--data", str(FIX / "mgsm"),
                "--langs", "sw,bn", "--protocol", "generative", "--runs", "1", "--max-new-tokens", "2"])


def test_a_serving_engine_is_refused_for_a_shifcon_checkpoint(shifcon_checkpoint):
    """An engine runs the weights without the shift: not ShifCon, so refused before any request (--shifcon off:
    the unshifted weights, said so)."""
    with pytest.raises(SystemExit, match="is a ShifCon model .* runs its weights without the shift"):
        E.main(["bench", "--checkpoint", str(shifcon_checkpoint), "--engine-url", "http://127.0.0.1:9/v1",
                "--engine-model", "m", "--benchmark", "mgsm", "--data", str(FIX / "mgsm"), "--langs", "sw"])


def test_an_export_over_a_shifcon_directory_drops_its_vectors(shifcon_checkpoint, tok, tmp_path):
    """A run that writes no vectors, exported into a directory that held another model's, must not inherit them."""
    shutil.copytree(shifcon_checkpoint, tmp_path / "hf")
    save_hf(tiny_model(tok, seed=1), tmp_path / "hf")
    assert not (tmp_path / "hf" / "shifcon.json").exists() and (tmp_path / "hf" / "bpe.tiktoken").exists()


def test_routing_is_shifted_from_the_shifted_layer_on(shifcon_checkpoint, tmp_path):
    """Layer 0 runs before the shift (identical routing), layer 1 inside it (different)."""
    common = ["--data", str(ROOT / "data" / "udhr" / "parallel.jsonl"), "--anchor", "en", "--langs", "sw",
              "--max-len", "32", "--batch-size", "64"]
    auto = E.main(["routing", "--checkpoint", str(shifcon_checkpoint), "--out", str(tmp_path / "a"), *common])
    off = E.main(["routing", "--checkpoint", str(shifcon_checkpoint), "--out", str(tmp_path / "b"), "--shifcon", "off", *common])
    js = lambda rows, layer: next(r["js"] for r in rows if r["layer"] == layer)
    assert js(auto, 0) == pytest.approx(js(off, 0), abs=1e-7)
    assert abs(js(auto, 1) - js(off, 1)) > 1e-4


def test_sample_needs_the_prompts_language_and_generates_shifted(shifcon_checkpoint, tok, monkeypatch):
    args = ["--checkpoint=" + str(shifcon_checkpoint), "--prompt=habari", "--max_new_tokens=6"]
    with pytest.raises(ConfigError, match="is a ShifCon model .*pass --lang=CODE"):
        sample.main(args)
    with pytest.raises(ConfigError, match=r"lang='xx'.*no language vector for \['xx'\].*pass its English code as --lang"):
        sample.main(args + ["--lang=xx"])
    got = sample.main(args + ["--lang=sw"])
    model = tiny_model(tok)
    model.residual_hook = shift_hook(vectors(), "sw", FORWARD, BACK)
    ids, _ = tok.encode_chat("habari", None)
    want = model.generate(torch.tensor([ids]), 6, stop_ids=tok.stop_ids)[0]
    assert got == [t for t in want if t not in tok.stop_ids][:len(got)] and got
    unshifted = sample.main(args + ["--lang=en"])  # English: no shift
    model.residual_hook = None
    want = model.generate(torch.tensor([ids]), 6, stop_ids=tok.stop_ids)[0]
    assert unshifted == [t for t in want if t not in tok.stop_ids][:len(unshifted)]


def test_lang_on_a_checkpoint_without_shifcon_is_an_error(tok, tmp_path):
    save_hf(tiny_model(tok), tmp_path / "hf")
    shutil.copy(TOK_PATH, tmp_path / "hf")
    with pytest.raises(ConfigError, match="only a ShifCon checkpoint"):
        sample.main(["--checkpoint=" + str(tmp_path / "hf"), "--prompt=x", "--lang=sw"])


# -----------------------------------------------------------------------------
# end to end: train.py --method=shifcon -> hf/shifcon.json -> sample.py; two ranks against one

@pytest.fixture(scope="module")
def shifcon_run(tmp_path_factory):
    from test_train import run_train, tiny_args
    out = tmp_path_factory.mktemp("toy_shifcon")
    run_train(tiny_args(out_dir=out, method="shifcon", sara_band=(1, 1), export_hf=True))  # (a 3-layer toy: band (1, 1))
    return out, tiny_args


def test_train_exports_vectors_that_reproduce_the_loops_held_out_ce(shifcon_run, tok):
    """The exported weights + shifcon.json, loaded as eval.py loads them, give the held-out CE the loop logged
    at its last evaluation (with the shift; without it the CE differs): training and inference shift alike."""
    from anchors import forward_and_pool
    from checkpoint import load_model_and_tokenizer
    from data.parallel import load_parallel_jsonl, split_train_val, tokenize_samples
    from methods.shifcon import install_for_inference
    from test_train import metrics
    out, _ = shifcon_run
    logged = [json.loads(l) for l in open(out / "metrics.jsonl") if '"val_ce"' in l][-1]
    model, tok = load_model_and_tokenizer(str(out / "hf"), str(TOK_PATH))
    _, val = split_train_val(load_parallel_jsonl(str(ROOT / "data" / "udhr" / "parallel.jsonl")), 0.15, seed=0)
    val_set, _ = tokenize_samples(tok, [x for x in val if x["lang"] in ("sw", "hi")], 96)

    def held_out_ce():
        hook = model.residual_hook
        pooled = forward_and_pool(model, [e["input_ids"] for e in val_set], labels=[e["labels"] for e in val_set],
                                  pad_id=tok.pad_id, batch_size=4,
                                  before_batch=(lambda rows: hook.set_rows([e["lang"] for e in val_set[rows]])) if hook else None)
        per_batch = [pooled.nll[i:i + 4].sum().item() / pooled.n_targets[i:i + 4].sum().item() * len(val_set[i:i + 4])
                     for i in range(0, len(val_set), 4)]
        return sum(per_batch) / len(val_set)
    unshifted = held_out_ce()
    hook = install_for_inference(model, str(out / "hf"), ["sw", "hi"])
    assert (hook.forward, hook.back) == (2, 3) and logged["phase"] == "shifcon"
    assert held_out_ce() == pytest.approx(logged["val_ce"], rel=1e-5)
    assert abs(unshifted - logged["val_ce"]) > 1e-4
    assert all(r["contrastive"] > 0 for r in metrics(out, "shifcon"))


def test_sample_py_on_the_exported_shifcon_model(shifcon_run, capsys):
    out, _ = shifcon_run
    got = sample.main(["--checkpoint=" + str(out / "hf"), "--prompt=Habari", "--lang=sw", "--max_new_tokens=4"])
    assert 1 <= len(got) <= 4


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_ranks_keep_the_same_vectors_as_one_process(shifcon_run, tmp_path, mode):
    """Global batch 8: one process with 2 micro-steps of 4 against two ranks with 4 each. The step's batch means
    are all-reduced, so the exported vectors agree (float64, summed in another order) and so do the losses.
    (FSDP: the vectors' start runs forwards with no backward, after which the root must be resharded.)"""
    from test_train import metrics, run_train
    out, tiny_args = shifcon_run
    run_train(tiny_args(tmp_path, method="shifcon", sara_band=(1, 1), export_hf=True, parallel=mode), nproc=2)
    one, two = (json.load(open(d / "hf" / "shifcon.json"))["vectors"] for d in (out, tmp_path))
    assert one.keys() == two.keys() and all(one[k]["count"] == two[k]["count"] for k in one)
    for k in one:
        assert one[k]["sum"] == pytest.approx(two[k]["sum"], rel=1e-5, abs=1e-6), k
    a, b = metrics(out, "shifcon"), metrics(tmp_path, "shifcon")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4 * max(1.0, abs(x["loss"])), (x, y)
