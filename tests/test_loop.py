"""The training loop called directly (loop.py, no train.py process), the eq. 12 assembly (step_loss.py)
against an independent float64 computation, and the SARA component (methods/sara.py): weight 0
changes nothing, bit for bit; the logged JS term is the step mean over anchored samples (scipy)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from anchors import build_anchors
from data.parallel import load_parallel_jsonl, tokenize_samples
from loop import Dist, Run, read_metrics, train_phase
from methods.sara import Sara
from model import MoEConfig, MoETransformer
from settings import TrainSettings
from step_loss import Term, step_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=4096, hidden_size=32, n_layers=3, n_heads=2, n_kv_heads=1, intermediate_size=64, n_experts=4,
            top_k=2, moe_intermediate_size=32, qk_norm=True, router_aux_loss_coef=0.01)


# -----------------------------------------------------------------------------
# eq. 12, assembled

def fake_out(ce, lb, z):
    t = lambda x: None if x is None else torch.tensor(x, dtype=torch.float64, requires_grad=True)
    return SimpleNamespace(loss=t(ce), aux_loss=t(lb), z_loss=t(z))


@pytest.mark.parametrize("n_micro", [1, 3])
def test_total_is_ce_plus_weighted_lb_z_and_method_terms(n_micro):
    out = fake_out(2.5, 1.25, 0.75)
    js = torch.tensor(0.125, dtype=torch.float64, requires_grad=True)
    other = torch.tensor(0.5, dtype=torch.float64)
    terms = dict(js=Term(js, 1.5, step_share=True), other=Term(other, 0.2))
    loss, logged = step_loss(out, terms, lb_weight=0.01, z_weight=0.001, n_micro=n_micro)
    # by hand: per-micro-batch means are averaged over the n_micro micro-batches; the step-share
    # term (already this micro-batch's share of the step mean) is summed, i.e. enters at full weight
    want = (2.5 + 0.01 * 1.25 + 0.001 * 0.75 + 0.2 * 0.5) / n_micro + 1.5 * 0.125
    assert loss.item() == pytest.approx(want, rel=1e-15)
    assert logged["ce"].item() == pytest.approx(2.5 / n_micro) and logged["js"].item() == pytest.approx(0.125)
    assert logged["loss"].item() == pytest.approx(want, rel=1e-15)
    loss.backward()
    assert js.grad.item() == pytest.approx(1.5) and out.loss.grad.item() == pytest.approx(1 / n_micro)
    assert out.aux_loss.grad.item() == pytest.approx(0.01 / n_micro)


def test_ce_weight_scales_l_ce_only_and_ce_is_logged_unweighted():
    """ShifCon's 0.5 · L_CE (their pipeline): the total and L_CE's gradient halve, the logged ce does not."""
    out = fake_out(2.5, 1.25, None)
    loss, logged = step_loss(out, {}, lb_weight=0.01, z_weight=0.0, n_micro=2, ce_weight=0.5)
    assert loss.item() == pytest.approx((0.5 * 2.5 + 0.01 * 1.25) / 2, rel=1e-15)
    assert logged["ce"].item() == pytest.approx(2.5 / 2)
    loss.backward()
    assert out.loss.grad.item() == pytest.approx(0.25) and out.aux_loss.grad.item() == pytest.approx(0.005)


def test_missing_lb_and_z_count_as_zero():
    loss, logged = step_loss(fake_out(2.0, None, None), {}, lb_weight=0.5, z_weight=0.5, n_micro=2)
    assert loss.item() == 1.0 and logged["lb"].item() == 0.0 and set(logged) == {"ce", "lb", "loss"}


def test_weight_zero_term_gives_bit_identical_gradients_to_no_term():
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(**TINY))
    ids = torch.randint(0, 4096, (2, 12))
    anchor = torch.softmax(torch.randn(2, 3, 4), -1)
    grads = []
    for with_term in (False, True):
        model.zero_grad()
        out = model(ids, labels=ids)
        terms = {}
        if with_term:
            sara = Sara({"a": anchor[0], "b": anchor[1]}, [1, 2], 0.0)
            examples = [dict(id="a", has_anchor=True), dict(id="b", has_anchor=True)]
            sara.begin_step([examples], SimpleNamespace(dist=Dist()))
            terms = sara.loss(out, dict(mask=None, examples=examples), model, SimpleNamespace(dist=Dist()))
            assert terms["js"].value.item() > 0 and not terms["js"].value.requires_grad  # logged, not differentiated
        loss, _ = step_loss(out, terms, lb_weight=0.01, z_weight=0.0, n_micro=1)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


# -----------------------------------------------------------------------------
# the loop, called directly

@pytest.fixture(scope="module")
def sw_examples(tok):
    rows = [r for r in load_parallel_jsonl(os.path.join(ROOT, "data/udhr/parallel.jsonl")) if r["lang"] == "sw"][:8]
    examples = tokenize_samples(tok, rows, 96)[0]
    examples[2] = dict(examples[2], has_anchor=False)  # one sample without an anchor
    return examples


def tiny_run(tmp_path, **kw):
    s = TrainSettings(**{**dict(global_batch=4, micro_batch=1, log_interval=1, eval_interval=1000, ckpt_interval=1000,
                                lr=3e-3), **kw})
    tmp_path.mkdir(exist_ok=True)
    return Run(s, Dist(), pad_id=0, metrics_path=str(tmp_path / "metrics.jsonl"), quiet=True)


def fresh_model():
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**TINY))


def test_lambda_js_zero_is_plain_fine_tuning_bit_for_bit(tmp_path, sw_examples):
    """The SARA component with weight 0 (phase "finetune" of train.py) against no component at all:
    every weight after 4 steps is identical, and so is every logged CE."""
    anchors = build_anchors(fresh_model(), sw_examples, pad_id=0, batch_size=4)
    results = []
    for i, method in enumerate([None, Sara(anchors, [1, 2], 0.0)]):
        model = fresh_model().train()
        records = train_phase(tiny_run(tmp_path / str(i)), "finetune", model, sw_examples, 4, 3e-3, method, None, None)
        results.append((model.state_dict(), records))
    (plain, plain_log), (zero, zero_log) = results
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert [r["ce"] for r in plain_log] == [r["ce"] for r in zero_log] and len(plain_log) == 4
    assert all(r["js"] > 0 for r in zero_log) and "js" not in plain_log[0]
    with_sara = fresh_model().train()
    train_phase(tiny_run(tmp_path / "2"), "sara", with_sara, sw_examples, 4, 3e-3, Sara(anchors, [1, 2], 1.0), None, None)
    assert not all(torch.equal(plain[k], v) for k, v in with_sara.state_dict().items())  # the term does act


def test_js_term_is_the_step_mean_over_anchored_samples(tmp_path, sw_examples):
    """One step of 4 micro-batches of 1, one sample without an anchor: the logged JS is the mean over
    the 3 anchored samples. Oracle: scipy's JS of each sample's pooled routing vs its anchor."""
    from scipy.spatial.distance import jensenshannon
    examples = sw_examples[:4]
    assert [e["has_anchor"] for e in examples] == [True, True, False, True]
    anchors = build_anchors(fresh_model(), examples, pad_id=0, batch_size=1)
    base = fresh_model().eval()
    per_sample = []
    for e in examples:
        if e["has_anchor"]:
            with torch.no_grad():
                logits = base(torch.tensor([e["input_ids"]])).router_logits
            target = [torch.softmax(l[0].double(), -1).mean(0).numpy() for l in logits]  # eq. 1-2, 6-7
            per_sample.append(sum(jensenshannon(anchors[e["id"]].double().numpy()[l], target[l]) ** 2 for l in (1, 2)) / 2)
    model = fresh_model().train()
    records = train_phase(tiny_run(tmp_path), "sara", model, examples, 1, 3e-3, Sara(anchors, [1, 2], 1.0), None, None)
    assert len(per_sample) == 3
    # JS of near-identical distributions (~1e-4 here) is a difference of O(1) fp32 terms: its absolute
    # rounding error is O(1e-8), so a relative bound alone depends on how close the routings happen to be
    assert records[0]["js"] == pytest.approx(sum(per_sample) / 3, rel=1e-4, abs=1e-7)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == json.loads(json.dumps(records))  # what was returned is what was written


def test_importing_the_loop_starts_nothing(tmp_path):
    code = "import loop, settings, step_loss, methods.sara; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0 and res.stdout == "ok\n" and res.stderr == "", res.stderr[-2000:]


def test_nan_guard_then_resume_equals_uninterrupted(tmp_path, sw_examples):
    """Called directly: the loss poisoned at step 2 stops the phase before the optimizer step (the
    checkpoint of step 2 holds the weights the run had then); a second call resumes from it, and the
    final weights equal those of a run that was never interrupted, bit for bit."""
    full = fresh_model().train()
    train_phase(tiny_run(tmp_path / "full", ckpt_interval=1), "sara", full, sw_examples, 4, 3e-3, None,
                str(tmp_path / "full" / "ckpt"), dict(run=1))
    cut = fresh_model().train()
    with pytest.raises(SystemExit, match="sara step 2: loss is nan -- stopping before the optimizer step"):
        train_phase(tiny_run(tmp_path / "cut", ckpt_interval=1, inject_nan_at_iter=2), "sara", cut, sw_examples, 4,
                    3e-3, None, str(tmp_path / "cut" / "ckpt"), dict(run=1))
    assert (tmp_path / "cut" / "ckpt" / "COMPLETE").read_text() == "2"
    saved = torch.load(tmp_path / "cut" / "ckpt" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in cut.state_dict().items())  # step 2 was never applied
    with pytest.raises(SystemExit, match="belongs to another run"):  # another run's checkpoint is never resumed
        train_phase(tiny_run(tmp_path / "cut"), "sara", fresh_model().train(), sw_examples, 4, 3e-3, None,
                    str(tmp_path / "cut" / "ckpt"), dict(run=2))
    resumed = fresh_model().train()
    train_phase(tiny_run(tmp_path / "cut", ckpt_interval=1), "sara", resumed, sw_examples, 4, 3e-3, None,
                str(tmp_path / "cut" / "ckpt"), dict(run=1))
    assert all(torch.equal(full.state_dict()[k], v) for k, v in resumed.state_dict().items())
    steps = [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]  # each step logged once: the poisoned attempt's row is not kept


def test_a_full_disk_while_appending_metrics_is_one_line_and_the_file_stays_whole(tmp_path, monkeypatch):
    import errno
    import jsonl
    run = tiny_run(tmp_path)
    run.write_metrics(dict(phase="sara", step=0, loss=1.0))
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real_write = os.write

    def full_after_10_bytes(fd, data):  # part of the line gets out, then ENOSPC
        if len(data) > 10:
            real_write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(jsonl.os, "write", full_after_10_bytes)
    with pytest.raises(SystemExit, match=rf"{tmp_path / 'metrics.jsonl'}: could not append a metrics row "
                                         r"\(No space left on device\); the file is intact"):
        run.write_metrics(dict(phase="sara", step=1, loss=1.0))
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_a_failed_checkpoint_write_is_one_line_naming_the_step_kept(tmp_path, sw_examples, monkeypatch):
    """A full disk while saving: the phase stops with checkpoint.py's message (the step still on disk, the
    fix), not a traceback; the committed checkpoint is untouched."""
    import errno
    net, ckpt = fresh_model().train(), str(tmp_path / "ckpt")
    real_save = torch.save
    calls = []

    def full_on_second_checkpoint(obj, f, *a, **k):
        calls.append(1)
        if isinstance(obj, dict) and "optimizer" in obj and obj.get("step") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_on_second_checkpoint)
    with pytest.raises(SystemExit) as err:
        train_phase(tiny_run(tmp_path, ckpt_interval=1), "sara", net, sw_examples, 4, 3e-3, None, ckpt, dict(run=1))
    msg = str(err.value)
    assert "writing the step-2 checkpoint failed" in msg and f"{ckpt} still holds step 1" in msg, msg
    assert (tmp_path / "ckpt" / "COMPLETE").read_text() == "1"
