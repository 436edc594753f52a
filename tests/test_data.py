"""data/parallel.py: validation errors with file:line, the group split, label masking, collate,
anchors; and the committed data/udhr/parallel.jsonl itself."""
import json
from pathlib import Path

import pytest
import torch

from data.parallel import (IGNORE_INDEX, collate, group_key, load_parallel_jsonl, split_train_val,
                           tokenize_anchor, tokenize_sample, tokenize_samples, with_anchor_lang)
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PARALLEL = ROOT / "data" / "udhr" / "parallel.jsonl"
LANGS = {"en", "zh", "sw", "hi", "bn", "te", "ne", "yo", "ha", "am", "zu"}


@pytest.fixture(scope="module")
def toy():
    return load_tokenizer(ROOT / "data" / "udhr" / "bpe.tiktoken")


@pytest.fixture(scope="module")
def udhr():
    return load_parallel_jsonl(PARALLEL)


def _row(id_="g1-sw", lang="sw", **kw):
    row = dict(id=id_, lang=lang, prompt="p", response="r", anchor_lang="en",
               anchor_prompt="ap", anchor_response="ar")
    row.update(kw)
    return row


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


# -----------------------------------------------------------------------------
# loading
GOOD = _row()
BAD_LINES = {
    "bad json": ('{"id": "x-sw", ', "invalid JSON"),
    "not an object": ('["a", "b"]', "expected a JSON object"),
    "missing key": (json.dumps({k: v for k, v in _row("g2-sw").items() if k != "response"}),
                    "missing key 'response'"),
    "missing anchor key": (json.dumps({k: v for k, v in _row("g2-sw").items() if k != "anchor_prompt"}),
                           "missing key 'anchor_prompt'"),
    "wrong type": (json.dumps(_row("g2-sw", prompt=3)), "'prompt' must be a string"),
    "wrong anchor type": (json.dumps(_row("g2-sw", anchor_response=["x"])), "'anchor_response' must be a string or null"),
    "empty response": (json.dumps(_row("g2-sw", response="  ")), "'response' is empty"),
    "one anchor null": (json.dumps(_row("g2-sw", anchor_prompt=None)), "both be null or both be strings"),
    "other anchor null": (json.dumps(_row("g2-sw", anchor_response=None)), "both be null or both be strings"),
    # group_key() and the split by item need "<group>-<lang>" (before: a bare ValueError with no file or line)
    "id without lang suffix": (json.dumps(_row("g2")), "id 'g2' does not have the form '<group>-<lang>' ('<group>-sw')"),
    "id of another lang": (json.dumps(_row("g2-hi")), "id 'g2-hi' does not have the form '<group>-<lang>'"),
    "id that is only the suffix": (json.dumps(_row("-sw")), "id '-sw' does not have the form"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(tmp_path, case):
    line, what = BAD_LINES[case]
    path = _write(tmp_path / "d.jsonl", [GOOD, "", line, _row("g3-sw")])  # bad line is line 3
    with pytest.raises(ValueError) as e:
        load_parallel_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ") and what in str(e.value)


def test_duplicate_id_names_both_lines(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, _row("g2-sw"), _row("g1-sw", response="other")])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: duplicate id 'g1-sw' \(first on line 1\)"):
        load_parallel_jsonl(path)


def test_valid_file_loads_with_null_anchors(tmp_path):
    rows = [GOOD, _row("g2-sw", anchor_prompt=None, anchor_response=None, extra=1)]
    assert load_parallel_jsonl(_write(tmp_path / "d.jsonl", rows)) == rows


# -----------------------------------------------------------------------------
# split
def _multilingual(n_groups, langs=("en", "sw", "hi")):
    return [_row(f"item-{g:03d}-{lang}", lang) for g in range(n_groups) for lang in langs]


def test_split_has_no_group_leakage_and_is_deterministic():
    samples = _multilingual(50)
    train, val = split_train_val(samples, 0.2, seed=1)
    assert len(train) + len(val) == len(samples)
    assert {group_key(s) for s in train}.isdisjoint({group_key(s) for s in val})
    assert len({group_key(s) for s in val}) == 10 and len(val) == 30  # whole groups, all langs
    assert (train, val) == split_train_val(list(samples), 0.2, seed=1)
    assert val != split_train_val(samples, 0.2, seed=2)[1]
    # order-independent membership, order-preserving output
    shuffled = samples[::-1]
    assert {s["id"] for s in split_train_val(shuffled, 0.2, seed=1)[1]} == {s["id"] for s in val}
    assert val == [s for s in samples if s in val]


def test_split_edges_and_group_key():
    samples = _multilingual(5)
    assert split_train_val(samples, 0.0)[1] == []
    assert len({group_key(s) for s in split_train_val(samples, 0.01)[1]}) == 1  # at least one group
    with pytest.raises(ValueError):
        split_train_val(samples, 1.0)
    assert group_key(_row("udhr-a03-p01-sw")) == "udhr-a03-p01"
    with pytest.raises(ValueError, match="does not end with"):
        group_key(_row("udhr-a03-p01-hi", "sw"))
    train, val = split_train_val([_row("a-sw"), _row("b-sw")], 0.5, group_key=lambda s: s["id"])
    assert len(train) == len(val) == 1


# -----------------------------------------------------------------------------
# tokenize
def test_labels_mask_prompt_exactly(toy):
    prompt, response = "Kifungu 3", "Kila mtu ana haki ya kuishi, uhuru na usalama wa nafsi yake."
    p, r = toy.encode_chat(prompt, response)
    input_ids, labels = tokenize_sample(toy, prompt, response, max_len=512)
    assert input_ids == p + r and len(labels) == len(input_ids)
    assert labels[:len(p)] == [IGNORE_INDEX] * len(p)
    assert labels[len(p):] == r and r[-1] == toy.eos_id and IGNORE_INDEX not in r
    # right truncation keeps the prompt and as much response as fits; >= 1 response token
    ids, lab = tokenize_sample(toy, prompt, response, max_len=len(p) + 1)
    assert ids == p + r[:1] and lab == [IGNORE_INDEX] * len(p) + r[:1]
    with pytest.raises(ValueError, match="no response token"):
        tokenize_sample(toy, prompt, response, max_len=len(p))


def test_anchor_tokenization_and_missing_anchors_are_marked(toy):
    s = _row("g1-sw", prompt="Kifungu 3", response="Kila mtu.", anchor_prompt="Article 3",
             anchor_response="Everyone.")
    a = tokenize_anchor(toy, s, max_len=512)
    p, r = toy.encode_chat("Article 3", "Everyone.")
    assert a == p + r and tokenize_anchor(toy, s, max_len=5) == (p + r)[:5]
    none = _row("g2-sw", anchor_prompt=None, anchor_response=None)
    assert tokenize_anchor(toy, none, 512) is None
    too_long = _row("g3-sw", prompt="word " * 300)
    examples, stats = tokenize_samples(toy, [s, none, too_long], max_len=64)
    assert stats == dict(samples=3, kept=2, skipped_too_long=1, truncated=0, no_anchor=1)
    assert [(e["id"], e["has_anchor"]) for e in examples] == [("g1-sw", True), ("g2-sw", False)]
    assert examples[0]["anchor_input_ids"] == a and examples[1]["anchor_input_ids"] is None


# -----------------------------------------------------------------------------
# collate
BATCH = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]


def test_collate_right_padding():
    out = collate(BATCH, pad_id=0)
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == (2, 3)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_left_padding_and_multiple():
    out = collate(BATCH, pad_id=9, padding_side="left", pad_to_multiple_of=4)
    assert out["input_ids"].tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    anchors = collate([{"input_ids": [1, 2]}, {"input_ids": [3]}], pad_id=0)
    assert "labels" not in anchors and anchors["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError):
        collate(BATCH, 0, padding_side="middle")


# -----------------------------------------------------------------------------
# the committed UDHR data
def test_udhr_languages_and_anchors(udhr):
    by_lang = {}
    for s in udhr:
        by_lang.setdefault(s["lang"], []).append(s)
    assert set(by_lang) == LANGS
    assert len(by_lang["en"]) == 60 and all(len(v) >= 48 for v in by_lang.values())
    en = {group_key(s): s for s in by_lang["en"]}
    for s in udhr:
        e = en[group_key(s)]  # every row's group exists in English
        assert s["anchor_lang"] == "en"
        assert (s["anchor_prompt"], s["anchor_response"]) == (e["prompt"], e["response"]), s["id"]
        assert s["response"] != e["response"] or s["lang"] == "en", s["id"]
    assert all(s["anchor_response"] == s["response"] for s in by_lang["en"])


def test_udhr_zh_track_and_split(udhr, toy):
    zh_track = with_anchor_lang([s for s in udhr if s["lang"] != "en"], "zh")
    missing = [s for s in zh_track if s["anchor_response"] is None]
    # zh lacks the preamble (misaligned in the source), so preamble items have no zh anchor
    assert missing and all(group_key(s).startswith("udhr-a00-") for s in missing)
    _, stats = tokenize_samples(toy, zh_track, max_len=1024)
    assert stats["no_anchor"] == len(missing) and stats["skipped_too_long"] == 0
    train, val = split_train_val(udhr, 0.1, seed=0)
    assert {group_key(s) for s in train}.isdisjoint({group_key(s) for s in val})
    assert len({group_key(s) for s in val}) == 6


def test_non_utf8_line_names_file_and_line(tmp_path):
    good = open(PARALLEL, "rb").readlines()[:2]
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"".join(good) + '{"id": "x-sw", "lang": "sw", "prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl:3: not UTF-8"):
        load_parallel_jsonl(bad)


def test_step_batches_cover_each_epoch_once_and_resume_identically():
    from data.parallel import step_batches
    steps = list(step_batches(10, 6, 0, global_batch=4, micro_batch=2, seed=5))
    assert [s for s, _ in steps] == list(range(6))
    assert all(len(m) == 2 and all(len(x) == 2 for x in m) for _, m in steps)
    epoch0 = [i for _, m in steps[:2] for x in m for i in x]  # 10 // 4 = 2 steps per epoch
    assert len(set(epoch0)) == 8  # no repeat inside an epoch
    assert list(step_batches(10, 6, 3, 4, 2, 5)) == steps[3:]  # a resumed run sees the same data
    assert list(step_batches(10, 6, 0, 4, 4, 5))[1][1] == [sum(steps[1][1], [])]  # other split, same step
    wrap = list(step_batches(3, 1, 0, 4, 2, 0))[0][1]  # fewer examples than a step: wrap around
    assert sorted(sum(wrap, [])[:3]) == [0, 1, 2] and len(sum(wrap, [])) == 4
    wrap = list(step_batches(3, 1, 0, 8, 2, 0))[0][1]  # more than twice over: no empty micro-batch
    assert [len(x) for x in wrap] == [2, 2, 2, 2] and sorted(sum(wrap, []).count(i) for i in range(3)) == [2, 3, 3]
    with pytest.raises(ValueError, match="global_batch=4 is not a multiple of micro_batch=3"):
        list(step_batches(10, 1, 0, 4, 3, 0))


def test_responses_cut_at_max_len_are_counted(toy):
    """A response cut by max_len may lose its final answer: the count tells the user (train.py warns)."""
    short, long_ = _row("g1-sw", response="Ndiyo."), _row("g2-sw", response="neno " * 200)
    p, r = toy.encode_chat(long_["prompt"], long_["response"])
    assert len(p) < 64 < len(p) + len(r)  # the long response does not fit, its prompt does
    _, stats = tokenize_samples(toy, [short, long_], max_len=64)
    assert stats["truncated"] == 1 and stats["kept"] == 2
