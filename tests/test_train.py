"""train.py end to end, in real processes: DDP/FSDP2 equivalence, kill -9 and resume, the
lambda_js=0 ablation, and the failure modes (bad data, missing anchors, stale cache, typos, NaN)."""
import json
import os
import re
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
    """A tiny run from scratch; with init_from=..., the same settings less the scratch-only ones
    (model_config, pretrain_iters: an error together with a checkpoint)."""
    scratch = kw.get("init_from", "scratch") == "scratch"
    args = dict(out_dir=str(out_dir), **(dict(pretrain_iters=4) if scratch else {}), epochs=1, global_batch=8,
                micro_batch=4, max_len=96, log_interval=1, eval_interval=1000, ckpt_interval=1000, export_hf=False,
                train_langs=["sw", "hi"], sara_band=(1, 2), lr=3e-3)
    args.update(kw)
    return [TINY] * scratch + [f"--{k}={v!r}" if isinstance(v, (str, list)) else f"--{k}={v}" for k, v in args.items()]


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
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl")) if '"header"' not in l]
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
    steps = [r["step"] for r in metrics(cut, "sara")]
    assert len(steps) == len(set(steps)), "metrics.jsonl logs re-done steps twice after a resume"
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
    anchors = torch.load(out / "anchors.pt", weights_only=True)["anchors"]
    assert anchors and not any(k.endswith("-hi") for k in anchors)
    assert all(torch.isfinite(torch.tensor(r["js"])) for r in metrics(out, "sara"))


def test_stale_anchor_cache_is_rebuilt(single_run, tmp_path):
    shutil.copy(single_run / "base.pt", tmp_path / "base.pt")
    shutil.copy(single_run / "anchors.pt", tmp_path / "anchors.pt")
    res = run_train(tiny_args(tmp_path, epochs=1))
    assert "loaded from" in res.stdout + res.stderr  # same model, data, format: reused
    shutil.rmtree(tmp_path / "ckpt")
    res = run_train(tiny_args(tmp_path, anchor_lang="zh"))  # other anchor token ids -> other fingerprint
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
    state = torch.load(ckpt / "state.pt", weights_only=True)
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
                                       tokenizer_path="data/udhr/bpe.tiktoken", **kw)  # (no tokenizer of its own)
    run_train(args(tmp_path / "one", export_hf=True))
    run_train(args(tmp_path / "two", parallel="fsdp"), nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"])), (a, b)
    from checkpoint import load_model
    exported = load_model(tmp_path / "one" / "hf")
    state = torch.load(tmp_path / "one" / "ckpt" / "state.pt", weights_only=True)["model"]
    for name, p in exported.state_dict().items():
        assert torch.equal(p, state[name]), name
    # a usable Hugging Face directory: transformers' AutoTokenizer gives our ids, its model our logits
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tokenizer import load_tokenizer
    ours = load_tokenizer(os.path.join(ROOT, "data/udhr/bpe.tiktoken"))
    text = "Kila mtu ana haki ya kuishi, uhuru na usalama."
    assert AutoTokenizer.from_pretrained(tmp_path / "one" / "hf")(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([ours.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, exported(ids).logits, rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# settings are checked before anything is loaded, and the message names the culprit

def run_in_process(monkeypatch, args):
    """train.py in this process (no torch import per case): every case here stops before training."""
    import runpy
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    monkeypatch.delenv("RANK", raising=False)
    def lock_fds():
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").endswith("/.lock"):
                    found.add(int(fd))
            except OSError:  # (listdir's own descriptor)
                pass
        return found
    before, handlers = lock_fds(), {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as err:
            runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    finally:  # the out_dir lock and the signal handlers train.py took (this process goes on)
        for fd in lock_fds() - before:
            os.close(fd)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return str(err.value)


@pytest.mark.parametrize("kw, pattern", [
    (dict(dtype="bf16"), r"dtype='bf16' \(command line\): must be one of \['float32', 'bfloat16'\]"),
    (dict(optimizer_states="bf16"), r"optimizer_states='bf16' \(command line\): must be one of"),
    (dict(parallel="fsdp2"), r"parallel='fsdp2'"),
    (dict(anchor_mode="offlne"), r"anchor_mode='offlne'"),
    (dict(device="gpu"), r"device='gpu'"),
    (dict(epochs=-24), r"epochs=-24 \(command line\): must be >= 0"),
    (dict(global_batch=0), r"global_batch=0 \(command line\): must be >= 1"),
    (dict(micro_batch=0), r"micro_batch=0 \(command line\): must be >= 1"),
    (dict(global_batch=6, micro_batch=4), r"global_batch=6 \(command line\) must be a multiple of micro_batch"),
    (dict(max_len=0), r"max_len=0 \(command line\): must be >= 2"),
    (dict(max_len=100000), r"max_len=100000 .* exceeds the model's context max_position_embeddings=\d+"),
    (dict(lambda_js=-1.0), r"lambda_js=-1.0 \(command line\): must be in \[0, inf\]"),
    (dict(lr=0.0), r"lr=0.0 \(command line\): must be in \(0, inf\]"),
    (dict(sara_band=(2, 1)), r"sara_band=\(2, 1\) \(command line\): must be an inclusive pair"),
    (dict(sara_band=(1,)), r"sara_band=\(1,\) \(command line\): must be an inclusive pair"),
    (dict(sara_band=(1, 7)), r"sara_band=\(1, 7\) \(command line\): layers \[3, 4, 5, 6, 7\] are not MoE layers"),
    (dict(sara_layer_list=[0, 9]), r"sara_layer_list=\[0, 9\] \(command line\): layers \[9\] are not MoE"),
    (dict(sara_layers=[1, 2]), r"'sara_layers' was renamed: use sara_band"),
    (dict(train_langs=["sw", "xx"]), r"train_langs \(command line\): \['xx'\] not in .*parallel.jsonl"),
    (dict(train_langs=["SW"]), r"\['SW'\] not in .* case-sensitive: the data spells \['sw'\]"),
    (dict(train_langs=["sw", "SW"]), r"\['SW'\] not in"),
    (dict(anchor_lang="xx"), r"SARA needs anchors: 0 of \d+ training samples have an anchor in anchor_lang='xx'"),
    (dict(method="shifcon", shifcon_positions=(1, 9)), r"shifcon_positions=\(1, 9\) \(command line\): ShifCon's "
                                                      r"positions .* need l_b <= n_layers = 3"),
    (dict(method="shifcon", sara_band=(1, 2)), r"sara_band=\(1, 2\) \(command line\): ShifCon's positions \(l_f, l_b\) = "
                                               r"\(2, 4\) need l_b <= n_layers = 3"),
    (dict(method="shifcon", sara_layer_list=[0, 2]), r"sara_layer_list=\[0, 2\] \(command line\): ShifCon shifts a contiguous"),
    (dict(method="shifcon", shifcon_contrastive_batch=1), r"shifcon_contrastive_batch=1 \(command line\)"),
    (dict(method="shifcon", shifcon_positions=(2, 1)), r"shifcon_positions=\(2, 1\) \(command line\): must be \(\)"),
    (dict(method="shifcon", shifcon_ce_weight=0.0), r"shifcon_ce_weight=0.0 \(command line\)"),
    (dict(method="shifcon", sara_band=(1, 1), anchor_lang="xx"), r"ShifCon needs each language's pairs for its language vector: \['sw', 'hi'\] have no"),
    (dict(method="live_kl", lambda_js=0.0, anchor_lang="xx"), r"live_kl needs anchors: 0 of"),  # (lambda_js is SARA's)
    (dict(init_from="/nonexistent"), r"init_from \(command line\): .*config.json"),
    (dict(tokenizer_path="/nonexistent.tiktoken"), r"tokenizer_path \(command line\): .*/nonexistent.tiktoken"),
    pytest.param(dict(device="cuda"), r"device='cuda' \(command line\): no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    (dict(init_from="BAD_JSON"), r"init_from \(command line\): .*config.json: not valid JSON"),
    (dict(init_from="data/udhr/parallel.jsonl"), r"init_from \(command line\): data/udhr/parallel.jsonl is a file: "
                                                 r"expected a checkpoint directory"),
])
def test_bad_settings_fail_first_naming_the_key(monkeypatch, tmp_path, kw, pattern):
    if kw.get("init_from") == "BAD_JSON":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text('{"model_type": "qwen3_moe",')
        kw = dict(init_from=str(tmp_path / "hf"))
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", **kw))
    assert re.search(pattern, msg), msg
    assert not (tmp_path / "o" / "base.pt").exists()  # nothing was trained


def test_a_shifcon_checkpoint_is_not_fine_tuned_without_its_shift(monkeypatch, tmp_path, tiny_hf_checkpoint):
    shutil.copytree(tiny_hf_checkpoint, tmp_path / "hf")
    (tmp_path / "hf" / "shifcon.json").write_text("{}")
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", init_from=str(tmp_path / "hf")))
    assert re.search(r"init_from=.* holds ShifCon language vectors \(shifcon.json\)", msg), msg


def test_language_spelled_in_another_case_is_an_error(monkeypatch, tmp_path):
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data/udhr/parallel.jsonl"))]
    rows += [dict(r, id=r["id"][:-3] + "-SW", lang="SW") for r in rows if r["lang"] == "sw"][:1]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", data_path=str(data)))
    assert "case-sensitive: the data spells ['SW']" in msg, msg


def test_a_language_left_without_training_samples_is_an_error(monkeypatch, tmp_path):
    """Every hi prompt longer than max_len: hi would be skipped entirely and the run train on sw alone."""
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data/udhr/parallel.jsonl"))]
    rows = [dict(r, prompt=r["prompt"] + " ..." * 200) if r["lang"] == "hi" else r for r in rows]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", data_path=str(data)))
    assert "train_langs (command line): no training sample of ['hi'] is left (max_len=96" in msg, msg


def test_anchor_lang_spelled_in_another_case_is_an_error(monkeypatch, tmp_path):
    """A target-only file (anchors inline) with one row whose anchor_lang is "EN": an error naming
    the spelling and the row, not "0 anchors" after every row's inline anchor was discarded."""
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data/udhr/parallel.jsonl"))]
    rows = [r for r in rows if r["lang"] in ("sw", "hi")]
    rows[3]["anchor_lang"] = "EN"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", data_path=str(data)))
    assert f"spell it ['EN'] (e.g. id {rows[3]['id']!r}); codes are case-sensitive" in msg, msg
    rows[3]["anchor_lang"] = "de"  # another language: that row alone loses its anchor (no de row)
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    res = run_train(tiny_args(tmp_path / "o2", data_path=str(data), pretrain_iters=1, epochs=0))
    no_anchor = int(re.search(r"'no_anchor': (\d+)", res.stdout + res.stderr).group(1))
    assert no_anchor <= 1, res.stdout + res.stderr


def test_config_file_errors_name_file_and_line(monkeypatch, tmp_path):
    cfg = tmp_path / "my.py"
    cfg.write_text("lr = 1e-3\nepochs = (2\n")
    assert f"{cfg}:2: syntax error" in run_in_process(monkeypatch, [str(cfg)])
    cfg.write_text("lr = 1e-3\nwarmup_frac = 2.0\n")
    assert f"warmup_frac=2.0 ({cfg}:2): must be in [0, 1]" in run_in_process(monkeypatch, [str(cfg)])



# -----------------------------------------------------------------------------
# run identity, resume for every optimizer, the non-finite guard, the JS mean of a step

def test_base_and_checkpoint_belong_to_their_run(single_run, tmp_path):
    shutil.copy(single_run / "base.pt", tmp_path / "base.pt")
    res = run_train(tiny_args(tmp_path, max_len=64), check=False)  # stage 0 trained on other data
    assert res.returncode != 0 and "base.pt belongs to another run" in res.stderr and "max_len: 96 -> 64" in res.stderr
    shutil.copytree(single_run, tmp_path / "r", dirs_exist_ok=True)
    res = run_train(tiny_args(tmp_path / "r", lambda_lb=0.5), check=False)  # a resume with another setting
    assert res.returncode != 0 and "ckpt belongs to another run" in res.stderr and "lambda_lb: -1.0 -> 0.5" in res.stderr


@pytest.mark.parametrize("change, named", [
    ("data", "data: '"), (dict(val_fraction=0.2), "val_fraction: 0.15 -> 0.2"),
    (dict(system_prompt="Be brief."), "system_prompt: '' -> 'Be brief.'"),
    (dict(warmup_frac=0.2), "warmup_frac: 0.1 -> 0.2"), (dict(weight_decay=0.1), "weight_decay: 0.01 -> 0.1"),
    ("model", "model_config: {"),
])
def test_another_run_is_never_resumed(single_run, tmp_path, change, named):
    """Every input that decides the trajectory is part of the run's identity: the data's contents,
    the settings, the toy model's shape (an existing base.pt of another shape is not reused)."""
    shutil.copy(single_run / "base.pt", tmp_path / "base.pt")
    kw = change if isinstance(change, dict) else {}
    if change == "data":
        rows = open(os.path.join(ROOT, "data/udhr/parallel.jsonl")).readlines()
        (tmp_path / "d.jsonl").write_text("".join(rows[:-1]))  # one row less, same name otherwise
        kw = dict(data_path=str(tmp_path / "d.jsonl"))
    args = tiny_args(tmp_path, **kw)
    if change == "model":
        args[0] = args[0].replace("'hidden_size': 32", "'hidden_size': 16")
    res = run_train(args, check=False)
    assert res.returncode != 0 and "base.pt belongs to another run" in res.stderr and named in res.stderr, res.stderr[-2000:]


@pytest.mark.slow  # (22 s; the default suite keeps test_adamw_bf16_state_dict_round_trip_keeps_fp32_moments and the fp32 kill/resume)
def test_bf16_sr_resume_equals_uninterrupted(tmp_path):
    """AdamWBF16 states (and its stochastic rounding's RNG) survive a resume: the NaN guard stops
    the run at step 7 (checkpoint at 5), the rerun resumes from 5, and every loss equals a run
    that was never interrupted."""
    common = dict(optimizer_states="bf16_sr", epochs=2, ckpt_interval=5, pretrain_iters=2, lr=1e-3)
    run_train(tiny_args(tmp_path / "full", **common))
    res = run_train(tiny_args(tmp_path / "cut", inject_nan_at_iter=7, **common), check=False)
    assert res.returncode != 0 and "loss is nan" in res.stderr and "nothing was written" in res.stderr
    assert (tmp_path / "cut" / "ckpt" / "COMPLETE").read_text() == "5"
    res = run_train(tiny_args(tmp_path / "cut", **common))
    assert "resumed from" in res.stdout + res.stderr
    a = {r["step"]: r["loss"] for r in metrics(tmp_path / "full", "sara")}
    b = {r["step"]: r["loss"] for r in metrics(tmp_path / "cut", "sara")}
    assert a == b and len(a) >= 10


def test_nan_gradient_with_finite_loss_is_never_applied(tmp_path):
    """lr=1e4 blows the weights up until a gradient is NaN while its loss is still finite: the
    step is not applied, and the checkpoint on disk holds the finite weights of the last good step."""
    res = run_train(tiny_args(tmp_path, lr=1e4, epochs=4, ckpt_interval=1), check=False)
    assert res.returncode != 0 and "stopping before the optimizer step" in res.stderr, res.stderr[-2000:]
    bad_step = int(re.search(r"sara step (\d+): (loss|grad norm) is", res.stderr).group(1))
    assert int((tmp_path / "ckpt" / "COMPLETE").read_text()) == bad_step  # checkpoints up to the last good step
    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("file", ["base.pt", "ckpt/state.pt"])
def test_nan_weights_in_base_or_checkpoint_are_an_error_naming_the_file(single_run, tmp_path, file):
    """A NaN in a row the data never uses (token 0's embedding) would train on silently into the export."""
    shutil.copytree(single_run, tmp_path / "r")
    state = torch.load(tmp_path / "r" / file, weights_only=True)
    state["model"]["embed_tokens.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "r" / file)
    if file == "base.pt":
        shutil.rmtree(tmp_path / "r" / "ckpt")
    res = run_train(tiny_args(tmp_path / "r"), check=False)
    where = tmp_path / "r" / ("base.pt" if file == "base.pt" else "ckpt")
    assert res.returncode != 0 and f"{where}: non-finite (NaN/Inf) weights in ['embed_tokens.weight']" in res.stderr, res.stderr[-2000:]


# (the JS term's step mean over anchored samples: tests/test_loop.py, which calls the loop directly)


FSDP_GRADS = """
import os, sys, warnings, json
import torch, torch.distributed as dist
sys.path.insert(0, os.getcwd())
from model import MoEConfig, MoETransformer
from sara_loss import pool_routing, sara_loss
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = MoEConfig(vocab_size=64, hidden_size=32, n_layers=3, n_heads=2, n_kv_heads=1, n_experts=4, top_k=2,
                moe_intermediate_size=16, intermediate_size=32, router=sys.argv[1], qk_norm=sys.argv[1] == "topk",
                norm="rmsnorm" if sys.argv[1] == "topk" else "layernorm", input_jitter=0.0,
                gradient_checkpointing=True)
torch.manual_seed(0)
ref = MoETransformer(cfg)
fsdp = MoETransformer(cfg)
fsdp.load_state_dict(ref.state_dict())
from torch.distributed.fsdp import fully_shard
for b in fsdp.layers:
    fully_shard(b)
fully_shard(fsdp)
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, 64, (world, 2, 9), generator=g)
anchor = torch.softmax(torch.randn(world, 2, 3, 4, generator=g), -1)
torch.manual_seed(5)  # sparsemixer samples in training: same draws on both sides
def loss_of(model, r):
    out = model(ids[r], labels=ids[r])
    return out.loss + 0.01 * out.aux_loss + 1.5 * sara_loss(pool_routing(out.router_logits), anchor[r], [0, 1, 2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.manual_seed(100 + rank)
    loss_of(fsdp, rank).backward()
views = [str(w.message)[:120] for w in caught if "view tensor" in str(w.message)]
# reference: the mean of every rank's loss in one process (each rank's sparsemixer draws as that rank
# had them); and, to show the comparison can fail, rank 0's loss alone
def ref_grads(weights):
    ref.zero_grad()
    total = 0
    for r in range(world):
        torch.manual_seed(100 + r)
        total = total + loss_of(ref, r) * weights[r]
    total.backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}
def worst(want):
    return max(((q.grad.full_tensor() - want[n]).abs().max() / (want[n].abs().max() + 1e-12)).item()
               for n, q in fsdp.named_parameters())
right = worst(ref_grads([1 / world] * world))
wrong = worst(ref_grads([1.0] + [0.0] * (world - 1)))
if rank == 0:
    print(json.dumps(dict(views=views, worst_rel=right, rank0_only_rel=wrong)), flush=True)
dist.barrier()  # no rank tears gloo down while another still talks to it
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo threads at exit sometimes abort ("terminate called ...")
"""


@pytest.mark.parametrize("router", ["topk", "sparsemixer"])
def test_fsdp2_gradients_equal_single_process_and_no_view_outputs(tmp_path, router):
    """Under FSDP2 (per-block fully_shard, gradient checkpointing) the gradients of CE + LB + the
    SARA term equal one process's gradients of the mean loss over the ranks' batches, and no wrapped
    module returns a view (FSDP2 warns: an in-place op on one would skip its hooks)."""
    script = tmp_path / "grads.py"
    script.write_text(FSDP_GRADS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(30500 + os.getpid() % 1000 + (router == "topk")), str(script), router],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["views"] == [], got["views"]
    assert got["worst_rel"] < 1e-5 and got["rank0_only_rel"] > 1e-2, got


def test_adamw_bf16_state_dict_round_trip_keeps_fp32_moments():
    from optim import AdamWBF16
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(100).to(torch.bfloat16))
    opt = AdamWBF16([p], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    p.grad = torch.randn(100).to(torch.bfloat16)
    opt.step(closure=None)  # torch.distributed.checkpoint calls it so
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    again = AdamWBF16([p], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    again.load_state_dict(opt.state_dict())
    assert again.state[p]["m"].dtype == torch.float32 and torch.equal(again.state[p]["m"], saved["m"])
    assert torch.equal(again.state[p]["v"], saved["v"]) and float(again.state[p]["step"]) == 1


def test_ddp_resume_matches_single_process(single_run, tmp_path):
    """Two DDP ranks stopped by the NaN guard at step 5 (checkpoint at 4; stage 0 has 4 steps) and
    resumed: every logged loss equals the single-process run's (the same global batch; fp32
    reduction-order noise only)."""
    res = run_train(tiny_args(tmp_path, parallel="ddp", ckpt_interval=2, inject_nan_at_iter=5), nproc=2, check=False)
    assert res.returncode != 0 and "loss is nan" in res.stderr
    res = run_train(tiny_args(tmp_path, parallel="ddp", ckpt_interval=2), nproc=2)
    assert "resumed from" in res.stdout + res.stderr
    one = {r["step"]: r["loss"] for r in metrics(single_run, "sara")}
    two = {r["step"]: r["loss"] for r in metrics(tmp_path, "sara")}
    assert one.keys() == two.keys()
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4 * max(1.0, abs(one[step])), (step, one[step], two[step])


def test_metrics_log_each_step_once_after_a_crash_before_any_checkpoint(tmp_path):
    """Stage 0 stops at step 3 with no checkpoint written: the rerun starts the phase over, and
    metrics.jsonl holds each step of each phase once (the first attempt's rows are dropped)."""
    res = run_train(tiny_args(tmp_path, inject_nan_at_iter=3), check=False)
    assert res.returncode != 0 and "pretrain step 3: loss is nan" in res.stderr
    assert [r["step"] for r in metrics(tmp_path, "pretrain")] == [0, 1, 2]
    run_train(tiny_args(tmp_path))
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    headers = [r for r in rows if "header" in r]  # one per invocation: where the rows below were made
    assert len(headers) == 2 and all(h["platform"]["torch"] == torch.__version__ for h in headers)
    rows = [r for r in rows if "header" not in r]
    keys = [(r["phase"], r["step"], "loss" in r) for r in rows]
    assert len(keys) == len(set(keys)), keys
    assert [r["step"] for r in metrics(tmp_path, "pretrain")] == [0, 1, 2, 3]


# -----------------------------------------------------------------------------
# issue 20: nothing silent, nothing lost -- the tokenizer of a checkpoint, one run per out_dir,
# damaged files named in one line, torn metrics; issue 21: base.pt is a checkpoint like any other

def own_tokenizer_checkpoint(tiny_hf_checkpoint, path):
    """The tiny Qwen3 checkpoint with a tokenizer of its own that is not the toy BPE (its last merge removed)."""
    shutil.copytree(tiny_hf_checkpoint, path)
    ranks = open(os.path.join(ROOT, "data/udhr/bpe.tiktoken")).read().splitlines(keepends=True)
    (path / "own.tiktoken").write_text("".join(ranks[:-1]))
    return path


def fingerprint_of(path):
    from tokenizer import load_tokenizer
    return load_tokenizer(path).fingerprint()


def test_a_checkpoint_is_fine_tuned_with_its_own_tokenizer(tiny_hf_checkpoint, tmp_path):
    """No tokenizer_path: the checkpoint's own tokenizer is used, and the export carries it (before: the
    toy BPE and its chat format, silently, and the export's tokenizer files were replaced by the toy's)."""
    ckpt = own_tokenizer_checkpoint(tiny_hf_checkpoint, tmp_path / "ckpt")
    run_train(tiny_args(tmp_path / "o", init_from=str(ckpt), lambda_lb=0.001, export_hf=True))
    toy = fingerprint_of(os.path.join(ROOT, "data/udhr/bpe.tiktoken"))
    assert fingerprint_of(tmp_path / "o" / "hf") == fingerprint_of(ckpt) != toy


def test_a_tokenizer_that_cannot_match_the_checkpoint_is_an_error(monkeypatch, tiny_hf_checkpoint, tmp_path):
    ckpt = own_tokenizer_checkpoint(tiny_hf_checkpoint, tmp_path / "ckpt")
    toy = os.path.join(ROOT, "data/udhr/bpe.tiktoken")
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", init_from=str(ckpt), tokenizer_path=toy))
    assert f"tokenizer_path='{toy}' (command line): tokenizer {fingerprint_of(toy)} is not {ckpt}'s own " \
           f"({fingerprint_of(ckpt)})" in msg, msg
    # a checkpoint without a tokenizer: one must be named (before: the toy BPE, silently)
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", init_from=str(tiny_hf_checkpoint)))
    assert f"init_from (command line): {tiny_hf_checkpoint} has no tokenizer (tokenizer.json): pass tokenizer_path" in msg
    # a vocabulary larger than the model's
    msg = run_in_process(monkeypatch, [a.replace("'vocab_size': 4096", "'vocab_size': 1000") for a in tiny_args(tmp_path / "o")])
    assert "tokenizer_path='data/udhr/bpe.tiktoken' (default): its 4096 tokens do not fit the model " \
           "(model_config: vocab_size 1000)" in msg, msg
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # before any work


def test_base_pt_is_a_checkpoint_and_exports_to_hugging_face(single_run, tmp_path, monkeypatch):
    """issue 21: --init_from=base.pt fine-tunes the toy base model exactly as the run that pretrained it did
    (same weights, data order and anchors: the same losses), and export.py (the command in its docstring)
    writes an HF directory that transformers loads with our logits and our token ids."""
    run_train(tiny_args(tmp_path / "ft", init_from=str(single_run / "base.pt")))
    a, b = metrics(single_run, "sara"), metrics(tmp_path / "ft", "sara")
    assert [r["batch"] for r in a] == [r["batch"] for r in b] and len(a) > 5
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5 * abs(x["loss"]), (x, y)
    res = subprocess.run([sys.executable, "export.py", str(single_run / "base.pt"), str(tmp_path / "base_hf"),
                          "--tokenizer", "data/udhr/bpe.tiktoken"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from checkpoint import load_model
    from tokenizer import load_tokenizer
    ours = load_tokenizer(os.path.join(ROOT, "data/udhr/bpe.tiktoken"))
    text = "Kila mtu ana haki ya kuishi, uhuru na usalama."
    assert AutoTokenizer.from_pretrained(tmp_path / "base_hf")(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", dtype=torch.float32).eval()
    ids = torch.tensor([ours.encode_chat("Habari?", "Nzuri.")[0] + ours.encode_chat("Habari?", "Nzuri.")[1]])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, load_model(single_run / "base.pt")(ids).logits,
                                   rtol=1e-4, atol=1e-4)
    # a tokenizer other than the one base.pt was trained with is refused, naming both
    other = tmp_path / "other.tiktoken"
    other.write_text("".join(open(os.path.join(ROOT, "data/udhr/bpe.tiktoken")).readlines()[:-1]))
    res = subprocess.run([sys.executable, "export.py", str(single_run / "base.pt"), str(tmp_path / "x"),
                          "--tokenizer", str(other)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and f"trained with tokenizer {ours.fingerprint()}" in res.stderr, res.stderr
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", init_from=str(single_run / "base.pt"),
                                                 tokenizer_path=str(other)))
    assert f"tokenizer {fingerprint_of(other)} is not the tokenizer {single_run / 'base.pt'} was trained with " \
           f"({ours.fingerprint()}): pass that one" in msg, msg


def test_two_runs_on_one_out_dir(tmp_path):
    """The second run stops at once naming the first (before: raw FileNotFoundErrors from each other's
    checkpoint files and metrics rows of both); the first finishes undisturbed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "train.py", *tiny_args(tmp_path, epochs=2)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock, deadline = tmp_path / ".lock", time.time() + 120
    while not (lock.exists() and lock.read_text()) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = run_train(tiny_args(tmp_path, epochs=2), check=False)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert f"{tmp_path}: another train.py run is using this directory (pid {first.pid} on " in second.stderr, second.stderr
    keys = [(r["phase"], r["step"]) for r in metrics(tmp_path)]
    assert len(keys) == len(set(keys)) and len(metrics(tmp_path, "sara")) == 22
    assert lock.read_text() == ""  # released at exit: the next run takes it without a word


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_message(monkeypatch, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / ".lock").write_text("pid 4000000 on gone-host\n")  # nobody holds the flock
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", data_path=str(bad)))
    assert "bad.jsonl:1" in msg  # it got past the lock
    assert "taking over the lock of pid 4000000 on gone-host, which ended without releasing it" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate ckpt/state.pt", "garble ckpt/COMPLETE", "truncate ckpt/meta.json"])
def test_a_damaged_checkpoint_is_one_line_naming_it(single_run, tmp_path, damage):
    """Rerunning on a damaged checkpoint: the message names the file and the fix; no traceback."""
    shutil.copytree(single_run, tmp_path / "r")
    verb, file = damage.split()
    f = tmp_path / "r" / file
    if verb == "truncate":
        f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    else:
        f.write_text("x7")
    res = run_train(tiny_args(tmp_path / "r"), check=False)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert str(tmp_path / "r" / "ckpt") in last and "older train.py" not in last, last


def test_a_torn_metrics_line_is_dropped_and_a_damaged_one_named(single_run, tmp_path):
    """A full disk mid-append leaves a torn last line: the rerun drops it (before: every later run died on
    a raw JSONDecodeError). A damaged line inside the file is named (file:line) and left for the user."""
    shutil.copytree(single_run, tmp_path / "r")
    path = tmp_path / "r" / "metrics.jsonl"
    before = path.read_text()
    path.write_text(before + '{"phase": "sara", "step": 3, "lo')
    run_train(tiny_args(tmp_path / "r"))
    rows = [json.loads(l) for l in path.read_text().splitlines()]  # every line whole
    assert path.read_text().startswith(before) and len(rows) == before.count("\n") + 1  # + this run's header
    lines = before.splitlines()
    lines[3] = lines[3][:20]
    path.write_text("\n".join(lines) + "\n")
    res = run_train(tiny_args(tmp_path / "r"), check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"{path}:4: invalid JSON" in res.stderr and "repair or delete that line" in res.stderr, res.stderr[-2000:]


def test_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler) mid-phase: one line saying what is kept, no traceback, the lock
    released; the same command resumes from the last checkpoint."""
    args = tiny_args(tmp_path, epochs=4, ckpt_interval=3, pretrain_iters=2)
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker, deadline = tmp_path / "ckpt" / "COMPLETE", time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait() != 0 and "Traceback" not in err, err[-3000:]
    assert (f"interrupted (SIGINT): the last complete checkpoint in {tmp_path} is kept; "
            "rerun the same command to resume from it") in err, err[-2000:]  # (the progress bar closes after it)
    assert (tmp_path / ".lock").read_text() == ""
    res = run_train(args)
    assert "resumed from" in res.stdout + res.stderr and "taking over the lock" not in res.stdout + res.stderr
    steps = [r["step"] for r in metrics(tmp_path, "sara")]
    assert steps == sorted(set(steps)) and len(steps) == 44


def test_exporting_over_the_checkpoint_it_starts_from_is_an_error(monkeypatch, tmp_path):
    (tmp_path / "o" / "hf").mkdir(parents=True)
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", init_from=str(tmp_path / "o" / "hf"), export_hf=True))
    assert "is where this run exports" in msg and "use another out_dir" in msg, msg


def test_a_damaged_init_from_checkpoint_is_one_line_naming_the_file(monkeypatch, tiny_hf_checkpoint, tmp_path):
    """(before: checkpoint.py's CheckpointError reached the user as a traceback from build_model)"""
    shutil.copytree(tiny_hf_checkpoint, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    msg = run_in_process(monkeypatch, tiny_args(tmp_path / "o", init_from=str(tmp_path / "ckpt"),
                                                tokenizer_path="data/udhr/bpe.tiktoken"))
    assert str(shard) in msg and "\n" not in msg.strip(), msg
