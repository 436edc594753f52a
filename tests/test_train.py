"""train.py end to end, in real processes: DDP/FSDP2 equivalence, kill -9 and resume, the
lambda_js=0 ablation, and the failure modes (bad data, missing anchors, stale cache, typos, NaN)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--model_config={'vocab_size': 4096, 'hidden_size': 32, 'n_layers': 3, 'n_heads': 2, "
        "'n_kv_heads': 1, 'intermediate_size': 64, 'n_experts': 4, 'top_k': 2, "
        "'moe_intermediate_size': 32, 'qk_norm': True, 'router_aux_loss_coef': 0.01}")


def tiny_args(out_dir, **kw):
    args = dict(out_dir=str(out_dir), pretrain_iters=4, epochs=1, global_batch=8, micro_batch=4,
                max_len=96, log_interval=1, eval_interval=1000, ckpt_interval=1000, export_hf=False,
                train_langs=["sw", "hi"], sara_layers=[1, 2], lr=3e-3)
    args.update(kw)
    return [TINY] + [f"--{k}={v!r}" if isinstance(v, (str, list)) else f"--{k}={v}" for k, v in args.items()]


def run_train(args, nproc=1, check=True, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "train.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), "train.py", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"train.py failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def metrics(out_dir, phase=None):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [r for r in rows if "loss" in r and (phase is None or r["phase"] == phase)]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_train(tiny_args(out))
    return out


def test_toy_run_logs_losses_and_per_layer_js(single_run):
    rows = metrics(single_run, "sara")
    assert [r["step"] for r in rows] == list(range(len(rows))) and len(rows) >= 5  # every step logged
    assert all(r["js"] > 0 and r["ce"] > 0 and r["lb"] > 0 for r in rows)
    evals = [json.loads(l) for l in open(single_run / "metrics.jsonl") if "val_js_per_layer" in l]
    assert len(evals[-1]["val_js_per_layer"]) == 3  # one value per MoE layer
    assert (single_run / "anchors.pt").exists() and (single_run / "ckpt" / "COMPLETE").exists()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(single_run, tmp_path, mode):
    # same global batch (8): one process with 2 micro-steps of 4 vs two ranks with 4 each
    run_train(tiny_args(tmp_path, parallel=mode), nproc=2)
    one = metrics(single_run)
    two = metrics(tmp_path)
    assert [r["batch"] for r in one if r["phase"] == "sara"] != []
    assert len(one) == len(two)
    for a, b in zip(one, two):
        # fp32 all-reduce sums in another order than local accumulation: ~1e-6 relative
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"])), (mode, a, b)


def test_lambda_js_zero_sees_the_same_batches(single_run, tmp_path):
    shutil.copy(single_run / "base.pt", tmp_path / "base.pt")  # same original model
    run_train(tiny_args(tmp_path, lambda_js=0.0))
    sara, plain = metrics(single_run, "sara"), metrics(tmp_path, "finetune")
    assert [r["batch"] for r in sara] == [r["batch"] for r in plain]
    assert sara[0]["ce"] == plain[0]["ce"]  # step 0: same weights, same batch
    assert sara[-1]["ce"] != plain[-1]["ce"]  # the JS term changed the trajectory
    assert all(r["js"] > 0 for r in plain)  # logged, not optimised


def test_kill_minus_9_then_resume_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = dict(epochs=4, ckpt_interval=3, pretrain_iters=2)
    run_train(tiny_args(full, **common))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_args(cut, **common)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = cut / "ckpt" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "no checkpoint was written before the kill"
    done = int(marker.read_text())
    assert done < 20, "the run finished before it could be killed"
    run_train(tiny_args(cut, **common))
    a = {r["step"]: r["loss"] for r in metrics(full, "sara")}
    b = {r["step"]: r["loss"] for r in metrics(cut, "sara")}  # includes the pre-kill steps too
    assert set(a) == set(b)
    for step in a:
        assert a[step] == b[step], (step, a[step], b[step])


def test_malformed_data_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = open(os.path.join(ROOT, "data/udhr/parallel.jsonl")).readlines()[:3]
    bad.write_text("".join(good) + '{"id": "x-sw", "lang": "sw"}\n')
    res = run_train(tiny_args(tmp_path / "o", data_path=str(bad)), check=False)
    assert res.returncode != 0 and "bad.jsonl:4" in res.stderr


def test_missing_anchors_are_excluded_not_faked(tmp_path):
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data/udhr/parallel.jsonl"))]
    for r in rows:
        if r["lang"] == "hi":
            r["anchor_prompt"] = r["anchor_response"] = None
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "o"
    res = run_train(tiny_args(out, data_path=str(data)))
    assert "have no anchor" in res.stdout + res.stderr
    anchors = torch.load(out / "anchors.pt", weights_only=False)["anchors"]
    assert anchors and not any(k.endswith("-hi") for k in anchors)
    assert all(torch.isfinite(torch.tensor(r["js"])) for r in metrics(out, "sara"))


def test_stale_anchor_cache_is_rebuilt(single_run, tmp_path):
    shutil.copy(single_run / "base.pt", tmp_path / "base.pt")
    shutil.copy(single_run / "anchors.pt", tmp_path / "anchors.pt")
    res = run_train(tiny_args(tmp_path, epochs=1))
    assert "loaded from" in res.stdout + res.stderr  # same model, data, format: reused
    shutil.rmtree(tmp_path / "ckpt")
    res = run_train(tiny_args(tmp_path, max_len=64))  # other token ids -> other fingerprint
    assert "stale" in res.stdout + res.stderr


def test_config_typo_lists_valid_keys(tmp_path):
    res = run_train(tiny_args(tmp_path, lamda_js=1.0), check=False)
    assert res.returncode != 0 and "unknown config key 'lamda_js'" in res.stderr and "lambda_js" in res.stderr
    res = run_train(tiny_args(tmp_path, epochs="two"), check=False)
    assert res.returncode != 0 and "expected int" in res.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    res = run_train(tiny_args(tmp_path, epochs=4, ckpt_interval=2, inject_nan_at_iter=13), check=False)
    assert res.returncode != 0 and "loss is nan" in res.stderr
    ckpt = tmp_path / "ckpt"
    # the sara phase reaches step 13 after checkpoints at 2, 4, ..., 12
    assert (ckpt / "COMPLETE").read_text() == "12"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_stochastic_rounding_keeps_small_updates():
    from optim import stochastic_round_
    torch.manual_seed(0)
    w = torch.full((100000,), 0.01, dtype=torch.bfloat16)
    target = w.float() - 1e-7  # an lr=2e-5-sized step, ~1/600 of bf16's spacing at 0.01
    assert torch.equal(target.to(torch.bfloat16), w)  # round-to-nearest loses it entirely
    stochastic_round_(w, target)
    assert abs(w.double().mean().item() - target.double().mean().item()) < 3e-9


def test_adamw_bf16_tracks_fp32_adamw_where_plain_bf16_stalls():
    from optim import AdamWBF16
    torch.manual_seed(0)
    init = torch.randn(20000) * 0.02
    grads = [torch.randn(20000) for _ in range(30)]
    params = {"fp32": init.clone(), "sr": init.to(torch.bfloat16), "bf16": init.to(torch.bfloat16)}
    params = {k: torch.nn.Parameter(v) for k, v in params.items()}
    opts = {"fp32": torch.optim.AdamW([params["fp32"]], lr=2e-5, weight_decay=0.0),
            "sr": AdamWBF16([params["sr"]], lr=2e-5, betas=(0.9, 0.999), weight_decay=0.0),
            "bf16": torch.optim.AdamW([params["bf16"]], lr=2e-5, weight_decay=0.0)}
    for g in grads:
        for k, p in params.items():
            p.grad = g.to(p.dtype)
            opts[k].step()
    moved = {k: (p.detach().double() - init.to(p.dtype).double()) for k, p in params.items()}
    want = moved["fp32"]  # ~30 * 2e-5 = 6e-4 per weight
    assert (moved["bf16"] - want).abs().mean() > 0.5 * want.abs().mean()  # mostly lost
    assert abs((moved["sr"] - want).mean()) < 0.02 * want.abs().mean()  # unbiased on average


@pytest.fixture(scope="module")
def tiny_hf_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf_qwen3")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=4096, hidden_size=32, intermediate_size=64,
                                      moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                      norm_topk_prob=True, initializer_range=0.1)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(path)
    return path


def test_from_checkpoint_single_vs_fsdp_and_export(tiny_hf_checkpoint, tmp_path):
    """The real-checkpoint path: init_from an HF dir; FSDP2 builds on meta and broadcasts rank 0's
    weights into the shards; the result equals a single process, and the export reloads."""
    args = lambda out, **kw: tiny_args(out, init_from=str(tiny_hf_checkpoint), lambda_lb=0.001,
                                       tokenizer_path="data/udhr/bpe.tiktoken", **kw)[1:]  # no model_config
    run_train(args(tmp_path / "one", export_hf=True))
    run_train(args(tmp_path / "two", parallel="fsdp"), nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"])), (a, b)
    from checkpoint import load_model
    exported = load_model(tmp_path / "one" / "hf")
    state = torch.load(tmp_path / "one" / "ckpt" / "state.pt", weights_only=False)["model"]
    for name, p in exported.state_dict().items():
        assert torch.equal(p, state[name]), name
