"""The harness protocol: lm-evaluation-harness's prompts (written out by hand from its task files), its
flexible last-number extraction for MGSM, the plain-text log-likelihood of " A".." D" against a direct
forward, and `eval.py bench --protocol harness` end to end, its rows named beside ours."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import eval as E
import evaluation.benchmarks as B
import evaluation.generate as G
from checkpoint import save_hf
from evaluation.scoring import flexible_number, score_output
from test_evaluation_model import tiny_model

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TOK_PATH = ROOT / "data" / "udhr" / "bpe.tiktoken"


def test_harness_prompts_are_the_task_files():
    mmlu = B.load_benchmark("global_mmlu", FIX / "global_mmlu", "sw")[0][0]
    assert B.item_prompt(mmlu, "global_mmlu", "harness") == (
        "Ni sayari ipi iliyo karibu zaidi na Jua?\nA. Zebaki\nB. Zuhura\nC. Dunia\nD. Mirihi\nAnswer:")
    bele = B.load_benchmark("belebele", FIX / "belebele", "sw")[0][0]
    assert B.item_prompt(bele, "belebele", "harness") == (
        "P: Mto Nile ni mto mrefu zaidi barani Afrika. Unapita katika nchi kumi na moja kabla ya kufika Bahari ya "
        "Mediterania.\nQ: Mto Nile unaishia wapi?\nA: Bahari ya Hindi\nB: Bahari ya Mediterania\nC: Ziwa Viktoria\n"
        "D: Bahari ya Shamu\nAnswer:")
    mgsm = B.load_benchmark("mgsm", FIX / "mgsm", "sw")[0][1]
    assert B.item_prompt(mgsm, "mgsm", "harness") == (
        "Swali: Mama alinunua mayai 12 na akatumia 4. Yamebaki mayai mangapi?\nAnswer:")
    te = B.load_benchmark("mgsm", FIX / "mgsm", "te")[0][0]
    assert B.item_prompt(te, "mgsm", "harness").startswith("ప్రశ్న: ")
    assert B.item_prompt(dict(te, lang="ja"), "mgsm", "harness") == "問題： " + te["question"] + "\nAnswer:"
    assert B.item_prompt(dict(te, lang="fr"), "mgsm", "harness") == "Question : " + te["question"] + "\nRéponse :"
    with pytest.raises(SystemExit, match="MGSM prompts for en, sw, bn, te, .* not 'yo'"):
        B.item_prompt(dict(mgsm, lang="yo"), "mgsm", "harness")


@pytest.mark.parametrize("reply, value", [
    ("Jibu ni 8.", 8.0), ("5 + 3 = 8", 8.0), ("$1,234.", 1234.0), ("-3 degrees", -3.0), ("2.5 and then 7", 7.0),
    ("hakuna", None), ("...", None), ("", None), ("x 12\n", 12.0)])
def test_flexible_number_takes_the_last_number(reply, value):
    assert flexible_number(reply) == value


def test_harness_mgsm_reply_is_cut_at_the_next_question_and_scored_numerically():
    item = B.load_benchmark("mgsm", FIX / "mgsm", "sw")[0][0]  # gold 8
    cut = B.BENCHMARKS["mgsm"].harness_cut(item, " 8\n\nSwali: Ana machungwa 12?")
    assert cut == " 8\n\n"
    assert score_output(item, cut, "harness") == ("8", True)
    assert score_output(item, "8.0", "harness") == ("8", True)  # the harness's string match would say no
    assert score_output(item, "no number", "harness") == (None, False)


def test_plain_option_logliks_match_a_direct_forward(tok):
    model = tiny_model(tok)
    prompts = ["Ni sayari ipi?\nA. x\nB. y\nC. z\nD. w\nAnswer:", "P: p\nQ: q\nAnswer:"]
    got = G.letter_logliks(model, tok, prompts, batch_size=3, chat=False)
    for n, p in enumerate(prompts):
        context = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p)
        for c, letter in enumerate("ABCD"):
            whole = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p + " " + letter)
            cont = whole[len(context):]  # the harness's split
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            want = sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(cont))
            assert got[n, c].item() == pytest.approx(want, abs=1e-4)


def test_bench_harness_protocol_end_to_end_and_named_in_the_table(tok, tmp_path, capsys):
    ckpt = tmp_path / "hf"
    save_hf(tiny_model(tok), ckpt)
    shutil.copy(TOK_PATH, ckpt)
    common = ["--checkpoint", str(ckpt), "--label", "tiny"]
    s = E.main(["bench", *common, "--benchmark", "global_mmlu", "--data", str(FIX / "global_mmlu"), "--langs", "sw,hi",
                "--protocol", "harness", "--out", str(tmp_path / "h")])
    assert set(s["langs"]) == {"sw", "hi"} and len(s["average"]["runs"]) == 1 and s["average"]["no_answer"] == 0
    rows = [json.loads(l) for l in open(tmp_path / "h" / "predictions.jsonl", encoding="utf-8")]
    assert all(len(r["scores"]) == 4 and "output" not in r for r in rows)  # log-likelihoods, as loglik's
    res = json.loads((tmp_path / "h" / "results.json").read_text())
    assert res["protocol"] == "harness" and res["temperature"] == 0.0
    E.main(["bench", *common, "--benchmark", "global_mmlu", "--data", str(FIX / "global_mmlu"), "--langs", "sw,hi",
            "--protocol", "loglik", "--out", str(tmp_path / "l")])
    E.main(["bench", *common, "--benchmark", "mgsm", "--data", str(FIX / "mgsm"), "--langs", "sw",
            "--protocol", "harness", "--max-new-tokens", "4", "--out", str(tmp_path / "m")])
    preds = [json.loads(l) for l in open(tmp_path / "m" / "predictions.jsonl", encoding="utf-8")]
    assert len(preds) == 3 and all(p["protocol"] == "harness" for p in preds)
    capsys.readouterr()
    E.main(["table", str(tmp_path / "h"), str(tmp_path / "l")])
    rows = capsys.readouterr().out.splitlines()
    assert any(r.startswith("tiny [global_mmlu, harness]") for r in rows)
    assert any(r.startswith("tiny [global_mmlu, loglik]") for r in rows)
