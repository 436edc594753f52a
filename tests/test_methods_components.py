"""The baselines and controls as training components on tiny models (methods/live_kl.LiveKL,
methods/controls.freeze / shuffled_anchors, loop.micro_steps' extend_batch hook), and train.py's
settings for them. The equations themselves are tested in tests/test_methods_live_kl.py etc."""
import math
import os
import subprocess
import sys

import pytest
import torch

from data.parallel import collate, group_key, load_parallel_jsonl, tokenize_samples
from loop import Dist, Run, train_phase
from methods.controls import freeze, frozen_router_names, shuffled_anchors
from methods.live_kl import LiveKL
from model import MoEConfig, MoETransformer
from settings import TrainSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=4096, hidden_size=32, n_layers=3, n_heads=2, n_kv_heads=1, intermediate_size=64, n_experts=4,
            top_k=2, moe_intermediate_size=32, qk_norm=True, router_aux_loss_coef=0.01)


@pytest.fixture(scope="module")
def examples(tok):
    rows = [r for r in load_parallel_jsonl(os.path.join(ROOT, "data/udhr/parallel.jsonl")) if r["lang"] == "sw"][:8]
    ex = tokenize_samples(tok, rows, 64)[0]
    ex[1] = dict(ex[1], has_anchor=False, anchor_input_ids=None)  # one row without an English source
    return ex


def fresh_model():
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**TINY)).train()


def tiny_run(tmp_path, **kw):
    s = TrainSettings(**{**dict(global_batch=4, micro_batch=2, log_interval=1, eval_interval=1000, ckpt_interval=1000,
                                lr=3e-3), **kw})
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Run(s, Dist(), pad_id=0, metrics_path=str(tmp_path / "metrics.jsonl"), quiet=True)


def pooled64(model, ids):
    """Oracle pooling: one sequence alone (no padding), softmax of each MoE layer's logits in float64,
    mean over tokens -> (L, E)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).router_logits
    return torch.stack([torch.softmax(l[0].double(), -1).mean(0) for l in logits])


# -----------------------------------------------------------------------------
# live_kl

def test_live_kl_one_forward_term_value_ce_and_gradient_into_both_sides(examples):
    """[target; English] in one forward: the term equals 200 α · batch-mean KL(q_en ‖ q_t) computed from
    separate unpadded forwards in float64; CE is the target rows' CE; the KL's gradient reaches the
    embeddings of the target rows AND of the English rows."""
    model, micro = fresh_model(), examples[:4]
    method = LiveKL([0, 1, 2], alpha=0.1)
    extra = method.extend_batch(micro)
    assert [r["input_ids"] for r in extra] == [e["anchor_input_ids"] for e in micro if e["has_anchor"]]
    batch = collate(micro + extra, 0)
    batch.update(examples=micro, mask=batch["attention_mask"])
    embedded = []

    def keep(module, args, output):  # (returns None: the output is unchanged)
        output.retain_grad()
        embedded.append(output)
    handle = model.embed_tokens.register_forward_hook(keep)
    out = model(batch["input_ids"], attention_mask=batch["mask"], labels=batch["labels"])
    handle.remove()
    terms = method.loss(out, batch, model, None)
    assert terms["kl"].weight == pytest.approx(20.0)
    # oracle: separate forwards, float64, the authors' formula written out
    kls = []
    for e in micro:
        if e["has_anchor"]:
            q_t, q_en = pooled64(model, e["input_ids"]), pooled64(model, e["anchor_input_ids"])
            q_t, q_en = q_t / (q_t.sum(-1, keepdim=True) + 1e-9), q_en / (q_en.sum(-1, keepdim=True) + 1e-9)
            kls.append((q_en * (q_en.log() - (q_t + 1e-9).log())).sum(-1))  # (L,)
    want = torch.stack(kls).mean(0).mean().item()  # batch-mean per layer, mean over the band
    assert terms["kl"].value.item() == pytest.approx(want, rel=1e-4)
    target_only = collate(micro, 0)
    with torch.no_grad():
        ce = model(target_only["input_ids"], attention_mask=target_only["attention_mask"], labels=target_only["labels"]).loss
    assert out.loss.item() == pytest.approx(ce.item(), rel=1e-5)
    terms["kl"].value.backward()
    g = embedded[0].grad.abs().sum((1, 2))  # per row
    assert (g[:len(micro)][[0, 2, 3]] > 0).all() and (g[len(micro):] > 0).all()
    assert g[1] == 0  # the row without an English source is in no pair


def test_live_kl_alpha_zero_is_plain_fine_tuning_bit_for_bit(tmp_path, examples):
    results = []
    for i, method in enumerate([None, LiveKL([1, 2], alpha=0.0), LiveKL([1, 2], alpha=0.1)]):
        model = fresh_model()
        records = train_phase(tiny_run(tmp_path / str(i)), "finetune", model, examples, 3, 3e-3, method, None, None)
        results.append((model.state_dict(), records))
    (plain, plain_log), (zero, zero_log), (kl, kl_log) = results
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert [r["ce"] for r in plain_log] == [r["ce"] for r in zero_log]
    assert [r["batch"] for r in plain_log] == [r["batch"] for r in kl_log]  # the same samples
    assert all(r["kl"] > 0 for r in kl_log) and "kl" not in zero_log[0]
    assert not all(torch.equal(plain[k], v) for k, v in kl.items())  # the term does act


def test_live_kl_evaluate_reports_kl_and_js_to_current_english(examples):
    from anchors import forward_and_pool
    from scipy.spatial.distance import jensenshannon
    model = fresh_model().eval()
    run = Run(TrainSettings(micro_batch=3), Dist(), pad_id=0, quiet=True)
    pooled = forward_and_pool(model, [e["input_ids"] for e in examples], pad_id=0, batch_size=3)
    res = LiveKL([1, 2]).evaluate(model, examples, pooled, run)
    js = [sum(jensenshannon(pooled64(model, e["anchor_input_ids"])[l].numpy(), pooled64(model, e["input_ids"])[l].numpy()) ** 2
              for l in (1, 2)) / 2 for e in examples if e["has_anchor"]]
    assert res["val_js"] == pytest.approx(sum(js) / len(js), rel=1e-3, abs=1e-7)
    assert res["val_kl"] > 0 and math.isfinite(res["val_kl"])


# -----------------------------------------------------------------------------
# controls

def test_frozen_routers_stay_bit_identical_while_the_rest_trains(tmp_path, examples):
    model = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = frozen_router_names(model)
    assert freeze(model, names) == 3
    train_phase(tiny_run(tmp_path), "finetune", model, examples, 3, 3e-3, None, None, None)
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in names)
    moved = [k for k in after if not torch.equal(before[k], after[k])]
    assert set(moved) & {"layers.0.self_attn.q_proj.weight", "layers.1.mlp.gate_up_proj", "lm_head.weight"}
    assert not set(moved) & set(names)
    with pytest.raises(ValueError, match="no parameter named"):
        freeze(model, ["layers.9.mlp.router.gate.weight"])


def test_shuffled_anchors_give_every_training_row_another_items_anchor():
    rows = [dict(id=f"q{i}-{lang}", lang=lang, has_anchor=True) for i in range(5) for lang in ("sw", "hi")]
    anchors = {r["id"]: torch.full((2, 3), float(i)) for i, r in enumerate(rows)}
    anchors["held-out-sw"] = torch.full((2, 3), -1.0)
    shuffled = shuffled_anchors(anchors, rows, seed=3)
    assert torch.equal(shuffled["held-out-sw"], anchors["held-out-sw"])  # not a training row: its own
    owner = {float(v[0, 0]): k for k, v in anchors.items()}  # which row's anchor each one is
    taken = [owner[float(shuffled[r["id"]][0, 0])] for r in rows]
    assert sorted(taken) == sorted(r["id"] for r in rows)  # a permutation of the training anchors
    assert all(group_key(dict(id=t, lang=t.split("-")[1])) != group_key(r) for t, r in zip(taken, rows))  # another item


# -----------------------------------------------------------------------------
# train.py

def run_train(tmp_path, *args):
    tiny = ("--model_config={'vocab_size': 4096, 'hidden_size': 32, 'n_layers': 3, 'n_heads': 2, 'n_kv_heads': 1, "
            "'intermediate_size': 64, 'n_experts': 4, 'top_k': 2, 'moe_intermediate_size': 32}")
    cmd = [sys.executable, "train.py", tiny, f"--out_dir={tmp_path}", "--pretrain_iters=2", "--epochs=1",
           "--global_batch=8", "--micro_batch=4", "--max_len=64", "--train_langs=['sw']", "--sara_band=(1, 2)",
           "--export_hf=False", "--eval_interval=1000", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_train_py_runs_live_kl_with_frozen_routers_and_refuses_a_shuffle_without_anchors(tmp_path):
    res = run_train(tmp_path / "a", "--method=live_kl", "--freeze_routers=True", "--live_kl_freeze=none")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "frozen: 3 parameter tensors (freeze_routers=True, live_kl_freeze='none')" in res.stdout + res.stderr
    from loop import read_metrics
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    steps = [r for r in rows if r.get("phase") == "live_kl" and "step" in r and "kl" in r]
    assert steps and all(r["kl"] > 0 for r in steps)
    assert any("val_kl" in r for r in rows)  # the component's evaluation ran
    res = run_train(tmp_path / "b", "--method=live_kl", "--anchor_shuffle=True")
    assert res.returncode != 0 and "is a control of SARA's stored anchors" in res.stderr
    assert "pretrain" not in res.stderr  # refused before any work
    res = run_train(tmp_path / "d", "--freeze_routers=True", "--lambda_js=0")  # the documented control (docs/method.md)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "freeze_routers=True" in res.stdout + res.stderr
    res = run_train(tmp_path / "c", "--live_kl_freeze=layers")
    assert res.returncode != 0 and "live_kl_freeze" in res.stderr


def test_live_kl_with_frozen_routers_under_ddp_matches_one_process(tmp_path):
    """Two gloo ranks (4 sequences each, + their English rows in the same forward) against one process
    with 2 micro-steps of 4: the same losses and KL terms (fp32 all-reduce order: ~1e-6 relative). DDP
    must accept the extended micro-batches and the parameters frozen before wrapping."""
    from test_train import metrics, run_train as run_train_py, tiny_args
    kw = dict(method="live_kl", freeze_routers=True, live_kl_freeze="early_layers")
    run_train_py(tiny_args(tmp_path / "one", **kw))
    run_train_py(tiny_args(tmp_path / "two", **kw), nproc=2)
    one, two = metrics(tmp_path / "one", "live_kl"), metrics(tmp_path / "two", "live_kl")
    assert len(one) == len(two) >= 2 and all(r["kl"] > 0 for r in one)
    for a, b in zip(one, two):
        assert a["batch"] != "" and abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["kl"] - b["kl"]) < 1e-4 * max(1e-3, abs(a["kl"])), (a, b)
