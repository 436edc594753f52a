"""experiments/gated_world.py: the world (target = English + a tag, splits, the per-sequence prior through the
routing hook) and the --quick study end to end (CI), its statistics recomputed here with scipy. Not the result."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import gated_world as G  # noqa: E402
from model import MoEConfig, MoETransformer  # noqa: E402
from router import intervene  # noqa: E402


def world(seed=3):
    vocab = G.make_vocab(G.QUICK)
    return G.build_world(G.QUICK, seed, vocab), vocab


def test_the_target_is_english_with_a_tag_and_aligned_token_for_token():
    w, vocab = world()
    en, tgt = G.pretraining_rows(w, vocab)
    assert vocab.itos[vocab.tgt] == "<tgt>" and len(vocab.itos) == vocab.tgt + 1
    assert all(r["ids"][:2] == [vocab.bos, vocab.tgt] for r in tgt) and not any(vocab.tgt in r["ids"] for r in en)
    items = G.eval_items(w, vocab, w["split"]["test"], "test")
    for it in items:
        if it["lang"] == "tgt":
            pos = G.english_position(len(it["prompt"]))
            assert [it["english"][p] for p in pos if p >= 0] == [t for t in it["prompt"] if t != vocab.tgt]
            assert pos[1] == -1  # the tag keeps its own routing
    ft = G.finetuning_rows(w, vocab, w["split"]["bridge"])
    row = ft[0]
    answer = [t for t, l in zip(row["ids"], row["labels"]) if l != -100]
    assert vocab.itos[answer[0]] == w["facts"][row["ent"], row["rel"]] and answer[1] == vocab.eos
    assert row["ids"][2:] == row["anchor_ids"][1:]
    G.check_splits(w, vocab, en, tgt, ft)
    leak = dict(ft[0], ids=ft[0]["ids"] + vocab.encode(w["split"]["test"][:1]))
    with pytest.raises(AssertionError, match="test or control"):
        G.check_splits(w, vocab, en, tgt, ft + [leak])


def test_language_prior_is_a_per_sequence_router_bias():
    cfg = MoEConfig(vocab_size=50, hidden_size=16, n_layers=2, n_heads=2, n_kv_heads=1, n_experts=8, top_k=2,
                    moe_intermediate_size=8, intermediate_size=16)
    every = {**G.FULL, "prior_layers": "all"}
    assert G.language_prior(["en"], G.world_prior(every, 0.0, cfg), cfg) == {}
    assert G.world_prior({**G.FULL, "prior_layers": "middle"}, 4.0, MoEConfig(**{**cfg.to_dict(), "n_layers": 4}))["layers"] == [1, 2]
    edits = G.language_prior(["en", "tgt"], G.world_prior(every, 4.0, cfg), cfg)
    assert sorted(edits) == [0, 1]
    bias = edits[0].logit_bias
    assert bias.shape == (2, 1, 8)
    assert bias[0, 0].tolist() == [4.0] * 4 + [0.0] * 4 and bias[1, 0].tolist() == [0.0] * 4 + [4.0] * 4
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        plain = model(ids).router_logits
        with intervene(model, edits):
            biased = model(ids).router_logits
    torch.testing.assert_close(biased[0], plain[0] + bias)  # layer 0's input is the same: exactly + prior


def test_train_steps_is_an_explicit_placeholder():
    with pytest.raises(NotImplementedError, match="train_steps"):
        G.train_steps(None, [], lambda_js=1.5, band=[1, 2], prior=None, settings=G.FULL)


def test_quick_study_end_to_end(tmp_path):
    from scipy import stats as sps
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "gated_world.py"), "--quick",
                        "--results", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    S = json.load(open(tmp_path / "summary.json"))
    assert S["platform"]["torch"] == torch.__version__ and "commit" in S["platform"]
    assert (tmp_path / "tables.md").read_text().startswith("Command: `python experiments/gated_world.py --quick`")
    assert sorted(S["by_beta"]) == ["0", "2"]
    L = S["settings"]["model"]["n_layers"]
    for run in S["runs"]:
        assert set(run["oracle"]) == {"all", "band"} | {f"L{l}" for l in range(L)}
        assert len(run["random_en"]) == len(run["removed_en"]) == len(run["js"]) == len(run["topk"]) == L
        assert all(0 <= x <= np.log(2) + 1e-6 for x in run["js"])
    for b, a in S["by_beta"].items():
        runs = sorted([x for x in S["runs"] if f"{x['beta']:g}" == b], key=lambda x: x["seed"])
        gain = np.array([x["oracle"]["band"] - x["tgt"] for x in runs])
        np.testing.assert_allclose(a["gain_band"]["per_seed"], gain)
        if gain.std() > 0:
            lo, hi = sps.t.interval(0.95, len(gain) - 1, loc=gain.mean(), scale=sps.sem(gain))
            assert a["gain_band"]["lo"] == pytest.approx(lo) and a["gain_band"]["hi"] == pytest.approx(hi)
    # beta = 0: both languages route with the same (no) prior, the tag is the only difference; with beta = 2 on
    # the middle layers the target's routing there is pulled apart from the English one
    assert S["settings"]["prior_layers"] == "middle"
    assert S["by_beta"]["0"]["js"][1] < S["by_beta"]["2"]["js"][1]
