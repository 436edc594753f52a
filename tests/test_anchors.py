"""anchors.py without training: forward_and_pool against a direct per-sequence computation (NLL from
F.cross_entropy on full logits, pooled routing from sara_loss.pool_routing on one sequence at a
time), build/cache/lookup of stage 2, and the cache's failure modes."""
import pytest
import torch
import torch.nn.functional as F

from anchors import anchor_fingerprint, build_anchors, forward_and_pool, load_or_build_anchors, lookup_anchors
from model import MoEConfig, MoETransformer
from sara_loss import pool_routing

CFG = dict(vocab_size=50, hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2,
           moe_intermediate_size=16, intermediate_size=32, mlp_only_layers=(1,))


def model_and_data(n=5, seed=0):
    torch.manual_seed(seed)
    model = MoETransformer(MoEConfig(**CFG))
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 50, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    labels = [[-100] * (len(s) // 2) + s[len(s) // 2:] for s in seqs]
    return model, seqs, labels


def test_forward_and_pool_matches_one_sequence_at_a_time():
    model, seqs, labels = model_and_data()
    model.train()
    got = forward_and_pool(model, seqs, pad_id=0, batch_size=3, labels=labels)
    assert model.training  # mode restored
    assert got.routing.shape == (5, 2, 4) and got.routing.dtype == torch.float32
    model.eval()
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        with torch.no_grad():
            out = model(torch.tensor([s]))
        logits = out.logits[0, :-1]
        target = torch.tensor(lab[1:])
        want = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        assert got.nll[i].item() == pytest.approx(want.item(), rel=1e-5)
        assert got.n_targets[i].item() == (target != -100).sum().item()
        torch.testing.assert_close(got.routing[i], pool_routing(out.router_logits)[0], atol=1e-6, rtol=1e-5)
    assert forward_and_pool(model, seqs, pad_id=0, batch_size=2).nll is None


def test_return_hidden_is_the_input_of_lm_head():
    model, seqs, _ = model_and_data(n=1)
    ids = torch.tensor(seqs)
    out = model(ids, return_hidden=True)
    assert out.logits is None and out.hidden.shape == (1, len(seqs[0]), 32)
    torch.testing.assert_close(model.lm_head(out.hidden), model(ids).logits)


def examples_of(seqs, missing=()):
    return [dict(id=f"s{i}", has_anchor=i not in missing, anchor_input_ids=None if i in missing else s)
            for i, s in enumerate(seqs)]


def test_build_lookup_and_cache(tmp_path):
    model, seqs, _ = model_and_data(n=6)
    ex = examples_of(seqs, missing=(2,))
    anchors = build_anchors(model, ex, pad_id=0, batch_size=2)
    assert sorted(anchors) == ["s0", "s1", "s3", "s4", "s5"]  # no made-up anchor for s2
    direct = forward_and_pool(model, seqs, pad_id=0, batch_size=1).routing
    torch.testing.assert_close(anchors["s4"], direct[4], atol=1e-6, rtol=1e-5)
    like = torch.zeros(3, 2, 4)
    dist, has = lookup_anchors(anchors, ex[1:4], like)
    assert has.tolist() == [True, False, True] and dist[1].isnan().all() and torch.equal(dist[0], anchors["s1"])

    fp = anchor_fingerprint("model", "tok", ex)
    assert fp != anchor_fingerprint("model2", "tok", ex) and fp != anchor_fingerprint("model", "tok", ex[:-1])
    path = tmp_path / "anchors.pt"
    logs = []
    kw = dict(fingerprint=fp, pad_id=0, batch_size=2, log=logs.append)
    first = load_or_build_anchors(path, model, ex, **kw)
    again = load_or_build_anchors(path, model, ex, **kw)
    assert "loaded" in logs[-1] and all(torch.equal(first[k], again[k]) for k in first)
    load_or_build_anchors(path, model, ex, **{**kw, "fingerprint": "other"})
    assert "stale" in logs[-1]


@pytest.mark.parametrize("content, pattern", [
    (b"", "unreadable anchors cache"),
    (b"garbage", "unreadable anchors cache"),
    ("nan", "holds NaN/Inf"),
    ("shape", r"is not a \(2, 4\) tensor"),
    ("list", "not an anchors file"),
])
def test_bad_cache_is_an_error_naming_the_file(tmp_path, content, pattern):
    model, seqs, _ = model_and_data(n=2)
    path = tmp_path / "anchors.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        anchors = {"s0": torch.full((2, 4), 0.25), "s1": torch.full((2, 4), 0.25)}
        if content == "nan":
            anchors["s1"][0, 0] = float("nan")
        if content == "shape":
            anchors["s1"] = torch.ones(3, 4)
        torch.save([1, 2] if content == "list" else dict(fingerprint="x", anchors=anchors), path)
    with pytest.raises(ValueError, match=f"{path}: .*{pattern}"):
        load_or_build_anchors(path, model, examples_of(seqs), fingerprint="x", pad_id=0, batch_size=2,
                              log=lambda m: None)


def test_flops_per_token_counts_by_hand():
    cfg = MoEConfig(**CFG)
    model = MoETransformer(cfg)
    H, V, I, E, K = 32, 50, 16, 4, 2
    attn = 4 * H * H - 2 * H * (H // 2)  # q, o: H x H; k, v: H x (nkv * hd) = H x 16
    norms = 2 * H
    moe = H * E + K * 3 * H * I  # router + K active experts
    dense = 3 * H * 32
    n_active = 3 * (attn + norms) + 2 * moe + dense + H + V * H  # final norm, lm_head (no embedding)
    assert model.flops_per_token(10) == 6 * n_active + 6 * 3 * 10 * 4 * 8


def _cache_with(edit):
    anchors = {"s0": torch.full((2, 4), 0.25), "s1": torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])}
    edit(anchors)
    return dict(fingerprint="x", anchors=anchors)


@pytest.mark.parametrize("damage, pattern", [
    (lambda a: a["s1"].__setitem__((1, 0), -0.1), r"anchor of sample 's1' holds negative probabilities"),
    (lambda a: a["s1"].__setitem__((1, 0), 0.8), r"'s1' is not a routing distribution \(MoE layer 1 sums to 1.1,"),
    (lambda a: a.__setitem__("s0", torch.zeros(2, 4)), r"'s0' is not a routing distribution \(MoE layer 0 sums to 0,"),
    (lambda a: a.__setitem__("s0", torch.ones(2, 4, dtype=torch.long)), r"'s0' is a torch.int64 tensor"),
    (lambda a: a.__setitem__("s0", torch.full((4, 2), 0.5)), r"'s0' is not a \(2, 4\) tensor"),
    (lambda a: a.__setitem__(3, a.pop("s0")), r"anchor of sample 3 is not a \(2, 4\) tensor"),
    (lambda a: a.pop("s1"), r"no anchor for 1 samples that have one \(e.g. \['s1'\]"),
], ids=["negative", "row_sum", "zeros", "integer", "transposed", "key_not_a_str", "missing_sample"])
def test_anchors_that_are_not_distributions_are_named(tmp_path, damage, pattern):
    """(A cache whose fingerprint matches but whose values could not have come from a router.)"""
    model, seqs, _ = model_and_data(n=2)
    path = tmp_path / "anchors.pt"
    torch.save(_cache_with(damage), path)
    with pytest.raises(ValueError, match=f"{path}: .*{pattern}.*delete it to rebuild"):
        load_or_build_anchors(path, model, examples_of(seqs), fingerprint="x", pad_id=0, batch_size=2,
                              log=lambda m: None)


@pytest.mark.parametrize("kind", ["zeros", "foreign", "truncate0", "truncate-1", "truncate_r1", "truncate_r2",
                                  "swap"])
def test_damaged_anchor_file_is_named_or_rebuilt(tmp_path, kind):
    """Hostile pass over anchors.pt: a named error saying to delete it, or (another run's file: a
    stale fingerprint) rebuilt to exactly what a fresh build gives."""
    import random
    model, seqs, _ = model_and_data(n=3)
    ex = examples_of(seqs)
    path, other = tmp_path / "anchors.pt", tmp_path / "other.pt"
    kw = dict(pad_id=0, batch_size=2, log=lambda m: None)
    fresh = load_or_build_anchors(path, model, ex, fingerprint="run1", **kw)
    load_or_build_anchors(other, model, ex[:2], fingerprint="run2", **kw)
    size = path.stat().st_size
    if kind == "zeros":
        path.write_bytes(bytes(size))
    elif kind == "foreign":
        torch.save({"weights": torch.ones(3)}, path)
    elif kind == "swap":
        path.write_bytes(other.read_bytes())
    else:
        offset = {"truncate0": 0, "truncate-1": size - 1}.get(kind, random.Random(kind).randrange(size))
        with open(path, "r+b") as f:
            f.truncate(offset)
    if kind == "swap":
        again = load_or_build_anchors(path, model, ex, fingerprint="run1", **kw)
        assert again.keys() == fresh.keys() and all(torch.equal(again[k], fresh[k]) for k in fresh)
        return
    with pytest.raises(ValueError, match=f"{path}: (unreadable anchors cache|not an anchors file).*delete it to rebuild"):
        load_or_build_anchors(path, model, ex, fingerprint="run1", **kw)


def test_disk_full_while_writing_anchors_is_named(tmp_path, monkeypatch):
    import checkpoint
    model, seqs, _ = model_and_data(n=2)

    def full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ValueError, match=r"anchors.pt: writing the anchors cache failed .*No space left.*free disk"):
        load_or_build_anchors(tmp_path / "anchors.pt", model, examples_of(seqs), fingerprint="x", pad_id=0,
                              batch_size=2, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []  # no partial anchors.pt(.part) to be mistaken for a cache
