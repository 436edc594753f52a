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


def test_sara_comparison_driver_up_to_its_placeholder():
    """experiments/gated_sara.py with a stand-in training function: both conditions start from the same base
    model, see identical batches, get the base model's English-prior anchors, and only lambda_JS differs."""
    import gated_sara as C
    with pytest.raises(NotImplementedError, match="placeholder"):
        C.train_steps(None, [], [], lambda_js=1.5, band=[1, 2], prior=None, settings=G.FULL)
    calls = []

    def stand_in(model, batches, anchors, **kw):
        calls.append(dict(state={k: v.clone() for k, v in model.state_dict().items()}, ids=[[r["ids"] for r in b] for b in batches],
                          anchors=anchors, **kw))
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # a "training" that changes the model: the next condition must reset it
    settings = {**G.QUICK, "pretrain_steps": 5}
    compare = {**C.COMPARE, "finetune_epochs": 1, "finetune_batch": 16}
    out = C.compare_seed(settings, compare, 0, train=stand_in)
    plain, band = calls
    assert plain["lambda_js"] == 0.0 and band["lambda_js"] == compare["lambda_js"] and plain["band"] == band["band"] == [1, 2]
    assert plain["ids"] == band["ids"] and all(torch.equal(plain["state"][k], band["state"][k]) for k in plain["state"])
    vocab = G.make_vocab(settings)
    assert all(vocab.tgt in ids for b in plain["ids"] for ids in b)  # target-language rows
    assert plain["anchors"][0].shape == (16, 4, 8) and torch.allclose(plain["anchors"][0].sum(-1), torch.ones(16, 4))
    # the anchors are the English versions' pooled routing under the English prior: experts 0-3 favoured in the band
    a = torch.cat(plain["anchors"])
    assert (a[:, 1, :4].sum(-1) > 0.5).float().mean() > 0.9
    assert set(out) == {"seed", "band_layers", "base", "plain", "band"} and out["band_layers"] == [1, 2]
    assert {"tgt", "en", "oracle"} <= set(out["plain"])
    d = C.primary([dict(plain=dict(tgt=0.5), band=dict(tgt=0.6)), dict(plain=dict(tgt=0.4), band=dict(tgt=0.4))])
    assert d["per_seed"] == pytest.approx([0.1, 0.0]) and d["mean"] == pytest.approx(0.05)


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
