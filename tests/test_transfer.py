"""experiments/transfer.py and transfer_world.py: the world's construction (no training), and the --quick study end to end
(the CI run of the experiment): its invariants -- identical batches, no test-entity fact in
fine-tuning, control entities at chance -- and its statistics recomputed here from the per-item file.
Not the direction of the result."""
import csv
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, os.path.join(ROOT, "experiments"))
import transfer as T  # noqa: E402
import transfer_world as W  # noqa: E402


def test_languages_render_with_their_own_tokens_and_a_correct_alignment():
    en, en_src = W.render("the R of E is V .", "en", "Bakira", "color", "red")
    assert en == ["the", "color", "of", "Bakira", "is", "red", "."] and en_src == list(range(7))
    ren, ren_src = W.render("the R of E is V .", "ren", "Bakira", "color", "red")
    assert ren == ["ren:the", "ren:color", "ren:of", "Bakira", "ren:is", "ren:red", "ren:."] and ren_src == en_src
    # ord: each run of words between punctuation reversed; the alignment follows the words
    ordr, ord_src = W.render("question : what is the R of E ? answer :", "ord", "Bakira", "job")
    assert ordr == ["ord:question", "ord::", "Bakira", "ord:of", "ord:job", "ord:the", "ord:is", "ord:what",
                    "ord:?", "ord:answer", "ord::"]
    en_q, _ = W.render("question : what is the R of E ? answer :", "en", "Bakira", "job")
    assert [en_q[i] for i in ord_src] == [t.split(":", 1)[1] if t != "Bakira" else t for t in ordr]
    # sub: every word (not the entity) is two syllable tokens, both aligned to the word
    sub, sub_src = W.render("E has V as its R .", "sub", "Bakira", "food", "rice")
    assert len(sub) == 1 + 2 * 6 and sub[0] == "Bakira" and sub_src == [0] + [i for i in range(1, 7) for _ in (0, 1)]
    assert all(t.startswith("sub:") for t in sub[1:])
    assert len({W.SUB[w] for w in W.english_words()}) == len(W.english_words())  # spellings unique


def test_world_splits_and_the_data_that_each_split_may_appear_in():
    settings = T.QUICK
    vocab = W.Vocab(sum(settings["n_entities"].values()))
    world = W.build_world(settings, 3, vocab)
    s = world["split"]
    names = [e for part in s.values() for e in part]
    assert len(names) == len(set(names)) == sum(settings["n_entities"].values())
    en, tgt, par = W.pretraining_data(world, vocab)
    ft = W.finetuning_data(world, vocab, s["bridge"])
    ids = lambda ents: set(vocab.encode(ents))
    ft_tokens = {t for r in ft for t in r["ids"] + r["anchor_ids"]}
    assert not ft_tokens & ids(s["test"] + s["control"]) and ids(s["bridge"]) <= ft_tokens
    assert not {t for r in en + tgt + par for t in r["ids"]} & ids(s["control"])
    assert not {t for r in tgt + par for t in r["ids"]} & ids(s["test"] + s["bridge"])  # targets: shared entities only
    # the answer of a fine-tuning row is the world's fact, in the row's language; labels only on it
    row = ft[0]
    value = world["facts"][row["ent"], row["rel"]]
    answer = [t for t, l in zip(row["ids"], row["labels"]) if l != -100]
    assert answer == vocab.encode(W.render("V", row["lang"], row["ent"], row["rel"], value)[0]) + [vocab.eos]
    with pytest.raises(AssertionError, match="entity ids"):
        W.assert_no_entity(W.finetuning_data(world, vocab, s["test"][:1]), s["test"], vocab, "fine-tuning data")


def test_other_band_never_overlaps():
    for n_layers in (6, 8):
        for width in (1, 2):
            for start in range(1, n_layers - width):
                band = list(range(start, start + width))
                for seed in range(5):
                    other = T.other_band(band, width, n_layers, seed)
                    assert len(other) == width and not set(other) & set(band)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transfer")
    cmd = [sys.executable, "experiments/transfer.py", "--quick", "--results", str(tmp)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    with gzip.open(tmp / "per_item.csv.gz", "rt") as f:
        rows = list(csv.DictReader(f))
    return dict(dir=tmp, summary=json.load(open(tmp / "summary.json")), rows=rows, md=(tmp / "results.md").read_text())


def test_quick_identical_batches_and_primary_declared(quick):
    S = quick["summary"]
    assert S["primary_endpoint"] == ["band", "plain"]
    n_ft = sum(1 for _ in W.finetuning_data(W.build_world(S["settings"], 0, W.Vocab(sum(S["settings"]["n_entities"].values()))),
                                             W.Vocab(sum(S["settings"]["n_entities"].values())), S["splits"]["0"]["bridge"]))
    steps = S["settings"]["finetune_epochs"] * (n_ft // S["settings"]["finetune_batch"])
    for seed, per_cond in S["batch_digests"].items():
        assert set(per_cond) == set(T.CONDITIONS)
        assert len(per_cond["plain"]) == steps > 0 and all(d == per_cond["plain"] for d in per_cond.values())
        assert not set(S["bands"][seed]) & set(S["other_bands"][seed])
    assert "**primary: (b) band − (a) plain**" in quick["md"]
    import torch
    assert S["platform"]["torch"] == torch.__version__ and "cpu" in S["platform"]  # where the numbers were made


def test_quick_no_test_fact_in_fine_tuning(quick):
    S = quick["summary"]
    vocab = W.Vocab(sum(S["settings"]["n_entities"].values()))
    for seed in S["seeds"]:
        world = W.build_world(S["settings"], seed, vocab)
        assert world["split"] == S["splits"][str(seed)]  # the run used this world
        test_ids = set(vocab.encode(world["split"]["test"]))
        for row in W.finetuning_data(world, vocab, world["split"]["bridge"]):
            assert not test_ids & set(row["ids"] + row["anchor_ids"])


def test_quick_control_entities_at_chance(quick):
    S, rows = quick["summary"], quick["rows"]
    control = [int(r["correct"]) for r in rows if r["split"] == "control" and r["condition"] != "positive"]
    n_facts = S["settings"]["n_entities"]["control"] * 4 * len(S["seeds"])
    tol = 4 * np.sqrt(1 / 8 * 7 / 8 / n_facts)  # 4 binomial SE over distinct facts x seeds
    assert len(control) > 0 and abs(np.mean(control) - 1 / 8) <= tol, (np.mean(control), tol)


def test_quick_statistics_recomputed_from_the_per_item_file(quick):
    from scipy import stats as sps
    S, rows = quick["summary"], quick["rows"]
    acc = lambda cond, seed: np.mean([int(r["correct"]) for r in rows if r["condition"] == cond and r["seed"] == str(seed)
                                      and r["split"] == "test" and r["lang"] != "en"])
    for cond in ["base"] + T.CONDITIONS:
        assert np.allclose([acc(cond, s) for s in S["seeds"]], S["acc"][cond]["target"], atol=1e-12)
    d = np.array([acc("band", s) - acc("plain", s) for s in S["seeds"]])
    n = len(d)
    if d.std(ddof=1) > 0:
        half = sps.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)
        p = 2 * sps.t.sf(abs(d.mean()) / (d.std(ddof=1) / np.sqrt(n)), n - 1)
        assert np.allclose([S["primary"][k] for k in ("mean", "lo", "hi", "p")], [d.mean(), d.mean() - half, d.mean() + half, p])
    # Holm by hand: sort, multiply by (m - rank), running max, cap at 1
    ps = np.array([v["p"] for v in S["secondary"].values()])
    order = np.argsort(ps)
    adj = np.empty(len(ps))
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adj[i] = running
    assert np.allclose([v["p_holm"] for v in S["secondary"].values()], adj)
    if importlib.util.find_spec("matplotlib"):
        assert (quick["dir"] / "transfer.png").stat().st_size > 10_000


def test_candidate_logliks_match_forward_and_pool():
    # the one-forward shortcut for one-token answers and the batched multi-token path vs the shared
    # helper's per-sequence summed NLL (anchors.forward_and_pool) on an untrained model
    import torch
    from anchors import forward_and_pool
    settings = T.QUICK
    vocab = W.Vocab(sum(settings["n_entities"].values()))
    world = W.build_world(settings, 1, vocab)
    torch.manual_seed(0)
    model = T.MoETransformer(T.MoEConfig(vocab_size=len(vocab.itos), **settings["model"])).eval()
    items = W.eval_items(world, vocab, world["split"]["test"][:1], "test")  # 4 relations x 4 languages x 2 questions
    assert {len(c) for it in items for c in it["cands"]} == {1, 2}  # both paths exercised (sub: 2 tokens)
    seqs = [it["prompt"] + c for it in items for c in it["cands"]]
    labels = [[-100] * len(it["prompt"]) + c for it in items for c in it["cands"]]
    want = -forward_and_pool(model, seqs, pad_id=0, batch_size=7, labels=labels).nll.numpy().reshape(len(items), 8)
    assert np.allclose(T.candidate_logliks(model, items, batch=5), want, atol=1e-5)
    correct, margin = T.accuracy_items(model, items)
    gold = np.array([it["gold"] for it in items])
    assert (correct == (want.argmax(1) == gold)).all()


def test_quick_report_is_reproduced_from_the_summary(quick, tmp_path):
    import shutil
    shutil.copy(quick["dir"] / "summary.json", tmp_path / "summary.json")
    res = subprocess.run([sys.executable, "experiments/transfer.py", "--quick", "--report", "--results", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "results.md").read_text() == quick["md"]


def test_conditional_transfer_by_hand(tmp_path):
    """P(target correct | English correct on the same fact and template), per seed and condition, on a file
    small enough to count by hand; shared and control rows are left out."""
    rows = [  # seed, condition, split, entity, relation, lang, template, correct
        (0, "plain", "test", "A", "color", "en", 0, 1), (0, "plain", "test", "A", "color", "ren", 0, 1),
        (0, "plain", "test", "A", "color", "sub", 0, 0),
        (0, "plain", "test", "A", "color", "en", 1, 0), (0, "plain", "test", "A", "color", "ren", 1, 1),  # English wrong: out
        (0, "band", "test", "A", "color", "en", 0, 1), (0, "band", "test", "A", "color", "ren", 0, 1),
        (0, "band", "test", "A", "color", "sub", 0, 1),
        (0, "band", "shared", "B", "color", "en", 0, 1), (0, "band", "shared", "B", "color", "ren", 0, 0),  # not test: out
        (1, "plain", "test", "A", "job", "en", 0, 1), (1, "plain", "test", "A", "job", "ord", 0, 0),
        (1, "band", "test", "A", "job", "en", 0, 1), (1, "band", "test", "A", "job", "ord", 0, 0),
        (1, "band", "test", "C", "job", "en", 1, 1), (1, "band", "test", "C", "job", "ord", 1, 1),
    ]
    path = tmp_path / "per_item.csv.gz"
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "condition", "split", "entity", "relation", "lang", "template", "correct", "margin"])
        w.writerows([(*r, 0.0) for r in rows])
    C = T.conditional_transfer(str(path))
    assert C["seeds"] == [0, 1]
    assert C["rate"]["plain"] == [0.5, 0.0] and C["n"]["plain"] == [2, 1]
    assert C["rate"]["band"] == [1.0, 0.5] and C["n"]["band"] == [2, 2]
    assert C["diff"]["per_seed"] == pytest.approx([0.5, 0.5]) and C["diff"]["mean"] == pytest.approx(0.5)
