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


def test_sara_comparison_driver_conditions_share_base_batches_and_anchors():
    """experiments/gated_sara.py with a stand-in training function: every condition starts from the same base
    model, sees identical batches and the base model's English-prior anchors (mismatched: another fact's);
    lambda_JS, the SARA layers and the frozen routers differ as declared."""
    import gated_sara as C
    calls = []

    def stand_in(model, batches, anchors, **kw):
        calls.append(dict(state={k: v.clone() for k, v in model.state_dict().items()}, ids=[[r["ids"] for r in b] for b in batches],
                          rows=batches, anchors=anchors, frozen={n for n, p in model.named_parameters() if not p.requires_grad}, **kw))
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # a "training" that changes the model: the next condition must reset it
    settings = {**G.QUICK, "pretrain_steps": 5}
    compare = {**C.COMPARE, "finetune_epochs": 1, "finetune_batch": 16}
    out = C.compare_seed(settings, compare, 0, train=stand_in)
    by = dict(zip(C.CONDITIONS, calls))
    plain, band = by["plain"], by["band"]
    assert plain["lambda_js"] == 0.0 and band["lambda_js"] == compare["lambda_js"] and plain["band"] == band["band"] == [1, 2]
    assert by["all"]["band"] == [0, 1, 2, 3] and by["layer3"]["band"] == [3]
    assert all(c["lambda_js"] == compare["lambda_js"] for k, c in by.items() if k != "plain")
    for c in calls:
        assert c["ids"] == plain["ids"] and all(torch.equal(plain["state"][k], c["state"][k]) for k in plain["state"])
        assert c["lr"] == compare["finetune_lr"]
    assert by["frozen_router"]["frozen"] == {f"layers.{l}.mlp.router.gate.weight" for l in range(4)}
    assert all(not c["frozen"] for k, c in by.items() if k != "frozen_router")
    vocab = G.make_vocab(settings)
    assert all(vocab.tgt in ids for b in plain["ids"] for ids in b)  # target-language rows
    assert plain["anchors"][0].shape == (16, 4, 8) and torch.allclose(plain["anchors"][0].sum(-1), torch.ones(16, 4))
    # the anchors are the English versions' pooled routing under the English prior: experts 0-3 favoured in the band
    a = torch.cat(plain["anchors"])
    assert (a[:, 1, :4].sum(-1) > 0.5).float().mean() > 0.9
    # mismatched: each row's anchor is the (matched) anchor of a row about ANOTHER fact
    rows = [r for b in plain["rows"] for r in b]
    m = torch.cat(by["mismatched"]["anchors"])
    for i, r in enumerate(rows):
        j = [k for k, q in enumerate(rows) if torch.equal(a[k], m[i])]
        assert j and all((rows[k]["ent"], rows[k]["rel"]) != (r["ent"], r["rel"]) for k in j)
    assert set(out) == {"seed", "band_layers", "base", "base_wall_s", "batches"} | set(C.CONDITIONS) and out["band_layers"] == [1, 2]
    assert {"tgt", "en", "oracle", "topk", "js"} <= set(out["plain"])
    d = C.primary([dict(plain=dict(tgt=0.5), band=dict(tgt=0.6)), dict(plain=dict(tgt=0.4), band=dict(tgt=0.4))])
    assert d["per_seed"] == pytest.approx([0.1, 0.0]) and d["mean"] == pytest.approx(0.05)


def _tiny(seed=0):
    settings = {**G.QUICK, "pretrain_steps": 6}
    vocab = G.make_vocab(settings)
    w = G.build_world(settings, seed, vocab)
    torch.manual_seed(seed)
    model = MoETransformer(MoEConfig(vocab_size=len(vocab.itos), **settings["model"]))
    return settings, vocab, w, model


def _pretrain_reference(model, en, tgt, settings, seed, prior):
    """The experiment's own training loop before it moved onto loop.train_phase (commit 6c96911), kept here
    as the oracle: the move must leave the base models bit for bit the same."""
    import math
    rng = np.random.default_rng(2000 + seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=settings["weight_decay"]), dict(params=rest, weight_decay=0.0)],
                            lr=settings["pretrain_lr"])
    B, steps, ces = settings["pretrain_batch"], settings["pretrain_steps"], []
    warmup = max(1, int(settings["warmup_frac"] * steps))
    model.train()
    for step in range(steps):
        lr = settings["pretrain_lr"] * ((step + 1) / warmup if step < warmup else
                                        0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        n_t = rng.binomial(B, settings["target_share"])
        rows = [en[i] for i in rng.integers(len(en), size=B - n_t)] + [tgt[i] for i in rng.integers(len(tgt), size=n_t)]
        ids, mask = G.collate([r["ids"] for r in rows])
        with intervene(model, G.language_prior([r["lang"] for r in rows], prior, model.config)):
            out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        loss = out.loss + model.config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        opt.step()
        ces.append(out.loss.item())
    return float(np.mean(ces[-20:]))


def test_pretrain_on_the_product_loop_is_bit_identical_to_the_experiments_former_loop():
    import copy
    settings, vocab, w, model = _tiny()
    en, tgt = G.pretraining_rows(w, vocab)
    prior = G.world_prior(settings, 2.0, model.config)
    ref = copy.deepcopy(model)
    ce = G.pretrain(model, en, tgt, settings, 0, prior)
    assert ce == _pretrain_reference(ref, en, tgt, settings, 0, prior)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    assert all(b.mlp.intervention is None for b in model.layers)  # the prior is removed after training


def test_the_prior_acts_in_every_training_forward_and_plain_is_sara_at_weight_0():
    """LanguagePrior sets each step's per-row prior on the routers of the prior layers: in the training forward,
    layer 1's router logits (its input is untouched by a prior on layers 1-2) are the unbiased ones + beta on the
    rows' language half. And train_steps with lambda_JS = 0 is bit for bit the loop without any method term."""
    import copy
    import gated_sara as C
    settings, vocab, w, model = _tiny()
    prior = G.world_prior(settings, 2.0, model.config)
    ft = G.finetuning_rows(w, vocab, w["split"]["bridge"])
    en_rows = [dict(r, ids=r["anchor_ids"], labels=[-100] * len(r["anchor_ids"]), lang="en") for r in ft[:3]]
    rows = ft[:5] + en_rows  # a mixed batch: 5 target rows, 3 English
    seen = []

    from methods.base import Component

    class Probe(Component):
        def begin_step(self, micro_batches, run):
            pass

        def loss(self, out, batch, net, run):
            with torch.no_grad(), intervene(net, {l: G.RoutingIntervention() for l in prior["layers"]}):  # no prior
                bare = net(batch["input_ids"], attention_mask=batch["mask"]).router_logits
            seen.append((out.router_logits[1].detach(), bare[1]))
            return {}
    ex = [dict(id=str(i), input_ids=r["ids"], labels=r["labels"], lang=r["lang"]) for i, r in enumerate(rows)]
    G.train_steps_under_prior(model, ex, [(0, [list(range(len(ex)))]), (1, [list(range(len(ex)))])], settings, 1e-3, prior, inner=Probe())
    want = torch.tensor([[0.0] * 4 + [2.0] * 4] * 5 + [[2.0] * 4 + [0.0] * 4] * 3)[:, None, :]  # (B, 1, E)
    assert len(seen) == 2
    for biased, bare in seen:
        torch.testing.assert_close(biased, bare + want)
    assert all(b.mlp.intervention is None for b in model.layers)
    with pytest.raises(ValueError, match="one micro-batch per step"):
        G.train_steps_under_prior(model, ex, [(0, [[0, 1], [2, 3]])], settings, 1e-3, prior)
    # plain = SARA at weight 0, bit-identical to no method term
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    batches = [ft[:8], ft[8:16]]
    anchors = [C.anchor_routing(model, bt, prior) for bt in batches]
    recs = C.train_steps(a, batches, anchors, lambda_js=0.0, band=[1, 2], prior=prior, settings=settings, lr=3e-3)
    ex = [dict(id=f"{s}:{i}", input_ids=r["ids"], labels=r["labels"], lang=r["lang"]) for s, bt in enumerate(batches) for i, r in enumerate(bt)]
    G.train_steps_under_prior(b, ex, [(0, [list(range(8))]), (1, [list(range(8, 16))])], settings, 3e-3, prior)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(r["js"] > 0 for r in recs)  # the term was computed and logged
    c = copy.deepcopy(model)
    C.train_steps(c, batches, anchors, lambda_js=1.5, band=[1, 2], prior=prior, settings=settings, lr=3e-3)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


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


def test_quick_sara_comparison_end_to_end(tmp_path):
    """python experiments/gated_sara.py --quick (CI), and --report from its runs.jsonl; statistics recomputed
    here with scipy, the decision rule by hand."""
    from scipy import stats as sps
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "gated_sara.py"), "--quick", "--jobs", "1",
                        "--results", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    S = json.load(open(tmp_path / "summary.json"))
    assert S["platform"]["torch"] == torch.__version__ and "commit" in S["platform"]
    assert [x["seed"] for x in S["runs"]] == [0, 1] and S["conditions"] == ["plain", "band", "all", "layer3", "frozen_router", "mismatched"]
    A = S["analysis"]
    d = np.array([x["band"]["tgt"] - x["plain"]["tgt"] for x in S["runs"]])
    np.testing.assert_allclose(A["primary"]["per_seed"], d)
    if d.std() > 0:
        lo, hi = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
        assert A["primary"]["lo"] == pytest.approx(lo) and A["primary"]["hi"] == pytest.approx(hi)
    js = lambda c: np.mean([np.mean(x[c]["js"][1:3]) for x in S["runs"]])
    assert A["manipulation"]["passed"] == (js("band") < js("plain"))
    ceiling = np.mean([x["plain"]["oracle"]["band"] - x["plain"]["tgt"] for x in S["runs"]])
    want = ("supported" if A["primary"]["lo"] > 0 else "falsified" if A["manipulation"]["passed"] and A["primary"]["hi"] < ceiling / 4
            else "inconclusive")
    assert A["verdict"] == want
    for x in S["runs"]:
        assert x["frozen_router"]["sara_layers"] == [1, 2] and x["layer3"]["sara_layers"] == [3]
        assert all(0 <= v <= 1 for c in S["conditions"] for v in x[c]["topk"])
    md = (tmp_path / "tables.md").read_text()
    assert md.startswith("Command: `python experiments/gated_sara.py --quick`") and "Verdict" in md
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "gated_sara.py"), "--quick", "--report",
                        "--results", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    R = json.load(open(tmp_path / "summary.json"))
    assert R["analysis"] == A and R["command"].endswith("--report")
