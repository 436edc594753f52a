"""ShifCon as a training component (methods/shifcon.ShifCon in loop.train_phase): the one-forward loss against
the authors' structure written out independently (a shifted instruction forward, and SEPARATE unshifted forwards
of each English and target sequence for the contrastive term, float64), the language vectors' running means,
resume with the vectors restored, and the export file inference reads. The equations alone are tested in
tests/test_methods_shifcon.py, the hook in tests/test_methods_shifcon_hook.py."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from data.parallel import collate, load_parallel_jsonl, tokenize_samples
from loop import Dist, Run, train_phase
from methods.base import Component
from methods.shifcon import LanguageVectors, ShifCon, load_shift_hook, shift_hook
from model import MoEConfig, MoETransformer
from settings import TrainSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=4096, hidden_size=32, n_layers=4, n_heads=2, n_kv_heads=1, intermediate_size=64, n_experts=4,
            top_k=2, moe_intermediate_size=32, qk_norm=True, router_aux_loss_coef=0.01)
POSITIONS = (2, 4)  # layers 1 and 2 run shifted; the contrastive term on positions 2 and 3
CUT = 24  # shifcon_contrastive_max_len here


@pytest.fixture(scope="module")
def examples(tok):
    rows = load_parallel_jsonl(os.path.join(ROOT, "data/udhr/parallel.jsonl"))
    ex = [e for e in tokenize_samples(tok, [r for r in rows if r["lang"] in ("sw", "hi")], 48)[0] if e["has_anchor"]]
    sw, hi = [e for e in ex if e["lang"] == "sw"][:6], [e for e in ex if e["lang"] == "hi"][:6]
    return [x for pair in zip(sw, hi) for x in pair]  # sw, hi, sw, hi, ...


def fresh_model():
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**TINY)).train()


def make_run(tmp_path=None, **kw):
    s = TrainSettings(**{**dict(global_batch=4, micro_batch=4, log_interval=1, eval_interval=1000, ckpt_interval=1000,
                                lr=3e-3, train_langs=["sw", "hi"], lambda_lb=0.0, shifcon_contrastive_batch=4,
                                shifcon_contrastive_max_len=CUT), **kw})
    path = None
    if tmp_path is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        path = str(tmp_path / "metrics.jsonl")
    return Run(s, Dist(), pad_id=0, metrics_path=path, quiet=True)


def hidden_alone(model, ids, positions):
    """The residual stream at `positions` of ONE sequence (no padding, no shift): {p: (T, H)}."""
    seen, installed = {}, model.residual_hook
    model.residual_hook = lambda p, x: (seen.__setitem__(p, x[0]), x)[1]
    try:
        model(torch.tensor([ids]))
    finally:
        model.residual_hook = installed
    return {p: seen[p] for p in positions}


def unit64(h_TH):
    v = h_TH.double().mean(0)
    return v / v.norm()


def info_nce64(e_BH, t_BH):
    """Their contrastive term at one position, written out in float64."""
    g = t_BH - t_BH.mean(0) + e_BH.mean(0)
    logits = e_BH @ g.T
    diag = torch.arange(len(e_BH))
    return 0.5 * (F.cross_entropy(logits, diag) + F.cross_entropy(logits.T, diag))


def loop_forward(method, model, micro):
    """What loop.micro_steps does for one micro-batch: extend, set the rows' languages, one forward."""
    extra = method.extend_batch(micro)
    method.set_rows([e["lang"] for e in micro] + [None] * len(extra))
    batch = collate(micro + extra, 0)
    batch.update(examples=micro, mask=batch["attention_mask"] if len(micro) + len(extra) > 1 else None)
    return model(batch["input_ids"], attention_mask=batch["mask"], labels=batch["labels"]), batch


def test_one_forward_equals_their_separate_forwards_value_and_gradient(examples):
    """[micro-batch rows shifted; contrastive batch: English sources, target rows, unshifted] in ONE forward gives
    the loss (0.5 CE + 2 contrastive) and the gradient of: CE of a shifted forward of the micro-batch alone + the
    contrastive term of separate, unshifted, unpadded forwards of every contrastive sequence, cut to
    contrastive_max_len tokens (float64 pooling and InfoNCE): their two batches, written out."""
    micro = examples[:4]  # sw, hi, sw, hi: the contrastive batch is of sw, the first row's language
    model, run = fresh_model(), make_run()
    method = ShifCon.prepare(run, model, examples, [1, 2], POSITIONS)
    vectors = method.hook.vectors
    lang, pairs = method.contrastive_pairs(micro)
    assert lang == "sw" and len(pairs) == 4 and all(e["lang"] == "sw" for e in pairs) and len({e["id"] for e in pairs}) == 4
    assert method.contrastive_pairs(micro) == (lang, pairs)  # a seeded draw: a resumed run draws the same pairs
    assert max(len(e["input_ids"]) for e in pairs) > CUT  # the cut is exercised
    out, batch = loop_forward(method, model, micro)
    term = method.loss(out, batch, model, run)["contrastive"]
    ours = method.ce_weight * out.loss + term.weight * term.value
    model.zero_grad()
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # theirs: the instruction batch shifted, alone; every contrastive sequence alone, unshifted
    model.residual_hook = shift_hook(vectors, [e["lang"] for e in micro], *POSITIONS)
    target_only = collate(micro, 0)
    ce = model(target_only["input_ids"], attention_mask=target_only["attention_mask"], labels=target_only["labels"]).loss
    model.residual_hook = None
    en = [hidden_alone(model, e["anchor_input_ids"][:CUT], range(*POSITIONS)) for e in pairs]
    tg = [hidden_alone(model, e["input_ids"][:CUT], range(*POSITIONS)) for e in pairs]
    contrastive = torch.stack([info_nce64(torch.stack([unit64(h[p]) for h in en]), torch.stack([unit64(h[p]) for h in tg]))
                               for p in range(*POSITIONS)]).mean()
    theirs = 0.5 * ce.double() + 2.0 * contrastive
    assert out.loss.item() == pytest.approx(ce.item(), rel=1e-5)
    assert term.value.item() == pytest.approx(contrastive.item(), rel=1e-4) and term.value.item() > 0
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    model.zero_grad()
    theirs.backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad.to(grads[n].dtype), rtol=2e-3, atol=2e-6, msg=n)
    assert grads["embed_tokens.weight"].abs().sum() > 0


def test_a_micro_batch_of_one_row_still_has_its_contrastive_batch(examples):
    """The paper-scale configs use micro_batch=1: the contrastive term must not vanish there."""
    model, run = fresh_model(), make_run(micro_batch=1, global_batch=1)
    method = ShifCon.prepare(run, model, examples, [1, 2], POSITIONS)
    out, batch = loop_forward(method, model, examples[1:2])
    term = method.loss(out, batch, model, run)["contrastive"]
    assert method.contrastive_pairs(examples[1:2])[0] == "hi" and term.value.item() > 0.1


def test_language_vectors_start_from_the_original_model_and_take_each_contrastive_batch_mean(examples):
    model, run = fresh_model(), make_run()
    method = ShifCon.prepare(run, model, examples, [1, 2], POSITIONS)
    v = method.hook.vectors
    sw = [e for e in examples if e["lang"] == "sw"]
    model.eval()
    with torch.no_grad():  # prepare: batches of micro_batch = 4 pairs of one language, the original model, cut
        chunks = [sw[i:i + 4] for i in range(0, len(sw), 4)]
        want = torch.stack([torch.stack([unit64(hidden_alone(model, e["input_ids"][:CUT], [2])[2]) for e in c]).mean(0)
                            for c in chunks]).mean(0)
    assert v.sums_and_counts()[("sw", 2)][1] == len(chunks)
    torch.testing.assert_close(v.vector("sw", 2), want, rtol=1e-5, atol=1e-6)
    # one training micro-batch: its contrastive batch adds one batch mean to its language and to English
    model.train()
    micro = examples[:4]
    old = {k: v.sums_and_counts()[k] for k in [("sw", 4), ("en", 4), ("hi", 4)]}
    out, batch = loop_forward(method, model, micro)
    method.loss(out, batch, model, run)
    assert v.sums_and_counts()[("sw", 4)][1] == old[("sw", 4)][1]  # fixed within the step
    method.end_step(run)
    _, pairs = method.contrastive_pairs(micro)
    with torch.no_grad():
        sw_mean = torch.stack([unit64(hidden_alone(model, e["input_ids"][:CUT], [4])[4]) for e in pairs]).mean(0)
        en_mean = torch.stack([unit64(hidden_alone(model, e["anchor_input_ids"][:CUT], [4])[4]) for e in pairs]).mean(0)
    s, c = old[("sw", 4)]
    torch.testing.assert_close(v.vector("sw", 4), (s + sw_mean) / (c + 1), rtol=1e-5, atol=1e-6)
    s, c = old[("en", 4)]
    torch.testing.assert_close(v.vector("en", 4), (s + en_mean) / (c + 1), rtol=1e-5, atol=1e-6)
    assert v.sums_and_counts()[("hi", 4)][1] == old[("hi", 4)][1]  # hi rows were trained on, not contrasted


def test_resume_restores_the_vectors_and_equals_the_uninterrupted_run(tmp_path, examples):
    """A run stopped after step 2 (a NaN at step 2 stops it before that step's update; the checkpoint of
    step 2 holds the vectors in its meta) and resumed ends bit for bit where the uninterrupted run ends."""
    def run_once(path, **kw):
        model, run = fresh_model(), make_run(path, ckpt_interval=2, **kw)
        method = ShifCon.prepare(run, model, examples, [1, 2], POSITIONS)
        train_phase(run, "shifcon", model, examples, 4, 3e-3, method, str(path / "ckpt"), dict(run="shifcon-test"))
        return model, method
    full_model, full_method = run_once(tmp_path / "full")
    with pytest.raises(SystemExit, match="step 2: loss is nan"):
        run_once(tmp_path / "cut", inject_nan_at_iter=2)
    meta = json.load(open(tmp_path / "cut" / "ckpt" / "meta.json"))
    assert meta["step"] == 2 and set(meta["method_state"]["vectors"]) >= {"sw@2", "en@4"}
    cut_model, cut_method = run_once(tmp_path / "cut")
    assert all(torch.equal(a, b) for a, b in zip(full_model.state_dict().values(), cut_model.state_dict().values()))
    assert full_method.hook.vectors.to_json() == cut_method.hook.vectors.to_json()
    # a checkpoint without the vectors (written with another method) is refused, never resumed with the
    # original model's vectors
    model, run = fresh_model(), make_run(tmp_path / "other", ckpt_interval=2)
    train_phase(run, "shifcon", model, examples, 2, 3e-3, Component(), str(tmp_path / "other" / "ckpt"), dict(run="shifcon-test"))
    with pytest.raises(SystemExit, match="must hold its language vectors"):
        run_once(tmp_path / "other")
    # a damaged meta.json: the mismatch is named by its keys, not by thousands of numbers
    meta = json.load(open(tmp_path / "cut" / "ckpt" / "meta.json"))
    meta["step"] = 3
    json.dump(meta, open(tmp_path / "cut" / "ckpt" / "meta.json", "w"))
    with pytest.raises(SystemExit, match=r"saved with \{'step': 4\}, but meta.json says \{'step': 3\}") as err:
        run_once(tmp_path / "cut")
    assert len(str(err.value)) < 600


def test_rows_must_be_set_before_every_forward_and_match_the_batch():
    v = LanguageVectors()
    for lang in ("en", "sw"):
        for p in POSITIONS:
            v.update(lang, p, torch.randn(2, 32))
    model = fresh_model().eval()
    hook = shift_hook(v, ["sw", "en"], *POSITIONS)
    model.residual_hook = hook
    with pytest.raises(ValueError, match="a batch of 3 rows, but 2 languages"):
        model(torch.zeros(3, 5, dtype=torch.long))
    hook.set_rows(["sw", "en", "sw"])
    model(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="not set before the forward"):  # a list serves ONE forward: never stale
        model(torch.zeros(3, 5, dtype=torch.long))
    hook.set_rows("sw")  # one code: every row of any batch, every forward (generation)
    model(torch.zeros(3, 5, dtype=torch.long))
    model(torch.zeros(2, 5, dtype=torch.long))
    hook.set_rows(["xx"])
    with pytest.raises(KeyError, match="no language vector for language 'xx'"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_export_file_round_trips_and_damaged_files_are_named(tmp_path, examples):
    model, run = fresh_model(), make_run()
    method = ShifCon.prepare(run, model, examples, [1, 2], POSITIONS)
    path, = method.export_files(str(tmp_path))
    hook = load_shift_hook(path, model.config)
    assert (hook.forward, hook.back, hook.english) == (2, 4, "en")
    assert hook.vectors.to_json() == method.hook.vectors.to_json()  # float64 exact through JSON
    good = json.load(open(path))
    for change, pattern in [(dict(forward=4, back=5), "0 < forward < back <= 4"),
                            (dict(format="x"), "not a ShifCon vectors file"),
                            (dict(english="de"), "no vectors for its English language 'de'"),
                            (dict(vectors={**good["vectors"], "sw@2": dict(sum=[1.0] * 31, count=1)}), "sw@2 has 31 values"),
                            (dict(vectors={**good["vectors"], "sw@2": dict(sum=[float("nan")] * 32, count=1)}), "finite"),
                            (dict(vectors={**good["vectors"], "sw@2": dict(sum=[None] * 32, count=1)}),
                             "entry 'sw@2': 'sum' must be a list of numbers"),
                            (dict(vectors={**good["vectors"], "sw@2": dict(sum=["a"] * 32, count=1)}),
                             "entry 'sw@2': 'sum' must be a list of numbers"),
                            (dict(vectors={**good["vectors"], "sw@2": dict(sum=[1.0] * 32, count=True)}), "count >= 1")]:
        json.dump({**good, **change}, open(tmp_path / "bad.json", "w"))
        with pytest.raises(ValueError, match=pattern):
            load_shift_hook(str(tmp_path / "bad.json"), model.config)
    (tmp_path / "torn.json").write_text(open(path).read()[:100])
    with pytest.raises(ValueError, match="torn.json: not a readable"):
        load_shift_hook(str(tmp_path / "torn.json"), model.config)
    shutil.rmtree(tmp_path)
