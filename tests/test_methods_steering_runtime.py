"""Steering at inference (methods/steering.py's statistics command, steering_interventions, and the flags of
eval.py bench and sample.py): statistics counted by hand, λ = 0 bit-identical to no steering, the rules
applied, and every impossible combination refused with a message naming the flag."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import eval as E
import sample
from checkpoint import save_hf
from methods import steering
from test_evaluation_model import tiny_model

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
PARALLEL = ROOT / "data" / "udhr" / "parallel.jsonl"
TOK_PATH = ROOT / "data" / "udhr" / "bpe.tiktoken"


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    """A tiny 4-layer HF checkpoint (layer 0 dense) and its statistics file, written by the documented command
    `python -m methods.steering --checkpoint DIR --data FILE --langs en,zh,sw --out FILE`."""
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    save_hf(tiny_model(tok, n_layers=4, mlp_only_layers=(0,)), path)
    shutil.copy(TOK_PATH, path)
    stats = path.parent / "stats.json"
    steering.main(["--checkpoint", str(path), "--data", str(PARALLEL), "--langs", "en,zh,sw", "--max-len", "48",
                   "--out", str(stats), "--device", "cpu"])
    return path, stats


def test_statistics_are_top_k_counts_over_real_tokens(ckpt, tok):
    """Oracle: each sample alone (no padding), argsort of each token's logits, counted in Python."""
    from data.parallel import load_parallel_jsonl
    path, stats_path = ckpt
    stats = json.loads(stats_path.read_text())
    assert stats["n_experts"] == 4 and stats["moe_layers"] == [1, 2, 3] and set(stats["freq"]) == {"en", "zh", "sw"}
    model = tiny_model(tok, n_layers=4, mlp_only_layers=(0,))
    counts, n = [[0] * 4 for _ in range(3)], 0
    for x in [x for x in load_parallel_jsonl(PARALLEL) if x["lang"] == "sw"]:
        p, r = tok.encode_chat(x["prompt"], x["response"])
        with torch.no_grad():
            logits = model(torch.tensor([(p + r)[:48]])).router_logits
        for l, z in enumerate(logits):
            for row in z[0].tolist():
                for e in sorted(range(4), key=lambda e: -row[e])[:2]:
                    counts[l][e] += 1
        n += len(logits[0][0])
    assert stats["n_tokens"]["sw"] == n
    got = [f for row in stats["freq"]["sw"] for f in row]
    assert got == pytest.approx([c / n for row in counts for c in row], abs=1e-12)


def test_lambda_zero_is_bit_identical_and_the_rules_act(ckpt, tok):
    path, stats_path = ckpt
    stats = steering.load_statistics(stats_path)
    model = tiny_model(tok, n_layers=4, mlp_only_layers=(0,))
    ids = torch.tensor([tok.encode_chat("Habari ya leo?", "Nzuri sana.")[0]])
    with torch.no_grad():
        plain = model(ids)
        steering.set_steering(model, steering.steering_interventions(stats, model.config, "chen", 0.0, (1, 3)))
        zero = model(ids)
        steering.set_steering(model, steering.steering_interventions(stats, model.config, "chen", 5.0, (1, 3)))
        strong = model(ids)
        s_LE = steering.shared_expert_strengths(torch.tensor([stats["freq"]["en"], stats["freq"]["zh"]], dtype=torch.float64), top_n=4)
        steering.set_steering(model, steering.steering_interventions(stats, model.config, "steermoe", 1, (2, 3), target="sw"))
        moe = model(ids)
    assert torch.equal(plain.logits, zero.logits) and all(torch.equal(a, b) for a, b in zip(plain.router_logits, zero.router_logits))
    # chen at λ = 5 on layer 2 (row 1): z + 5 s |z| from the unsteered layer-2 input is not available here, but
    # where s = 0 the logit of layer 1 (the first steered layer, same input as unsteered) is untouched
    z0, z1 = plain.router_logits[0][0], strong.router_logits[0][0]
    want = z0 + 5.0 * s_LE[0].float() * z0.abs()
    assert torch.allclose(z1, torch.where(s_LE[0] == 0, z0, want), atol=1e-6) and not torch.equal(z0, z1)
    assert not torch.equal(plain.logits, strong.logits)
    assert torch.equal(moe.router_logits[0], plain.router_logits[0])  # layer 1 not steered by steermoe (2..3)
    assert not torch.equal(moe.router_logits[1], plain.router_logits[1])


def test_impossible_combinations_are_errors(ckpt, tok):
    path, stats_path = ckpt
    stats = steering.load_statistics(stats_path)
    cfg = tiny_model(tok, n_layers=4, mlp_only_layers=(0,)).config
    with pytest.raises(ValueError, match=r"layers \[0\] are dense"):
        steering.steering_interventions(stats, cfg, "chen", 0.02, (0, 2))
    with pytest.raises(ValueError, match=r"outside the model's decoder layers 0..3"):
        steering.steering_interventions(stats, cfg, "chen", 0.02, (1, 4))
    other = tiny_model(tok, n_layers=4, mlp_only_layers=(0,), n_experts=8).config
    with pytest.raises(ValueError, match="measured on a model with 4 experts"):
        steering.steering_interventions(stats, other, "chen", 0.02, (1, 3))
    with pytest.raises(ValueError, match="steermoe needs the statistics of the target language"):
        steering.steering_interventions(stats, cfg, "steermoe", 2, (1, 3), target="hi")
    with pytest.raises(ValueError, match="not a statistics file|cannot read"):
        steering.load_statistics(path / "config.json")


def test_sample_py_steering_flags(ckpt):
    path, stats_path = ckpt
    base = [f"--checkpoint={str(path)!r}", "--prompt='Habari'", "--max_new_tokens=6", "--device='cpu'"]
    plain = sample.main(base)
    zero = sample.main(base + [f"--steering={str(stats_path)!r}", "--steering_strength=0.0"])
    assert zero == plain
    with pytest.raises(SystemExit, match="steering: --steering_layers 0,1: layers \\[0\\] are dense"):
        sample.main(base + [f"--steering={str(stats_path)!r}", "--steering_layers='0,1'"])
    # the documented SteerMoE call (docs/baselines.md): it runs, (strength 1: this tiny model has 2 experts to promote)
    steered = sample.main(base + [f"--steering={str(stats_path)!r}", "--steering_rule='steermoe'", "--steering_strength=1",
                                  "--steering_target='sw'"])
    assert isinstance(steered, list) and all(isinstance(t, int) for t in steered)


def bench(path, out, *extra):
    return E.main(["bench", "--checkpoint", str(path), "--benchmark", "global_mmlu", "--data", str(FIX / "global_mmlu"),
                   "--langs", "sw", "--protocol", "loglik", "--out", str(out), "--label", "t", *extra])


def test_eval_bench_steering_flags(ckpt, tmp_path):
    path, stats_path = ckpt
    plain = bench(path, tmp_path / "a")
    zero = bench(path, tmp_path / "b", "--steering", str(stats_path), "--steering-rule", "chen", "--steering-strength", "0")
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (tmp_path / "b" / "predictions.jsonl").read_text()
    assert zero == plain
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["steering"]["rule"] == "chen" and res["steering"]["strength"] == 0
    with pytest.raises(SystemExit, match="a serving engine \\(--engine-url\\) runs the model unsteered"):
        E.main(["bench", "--engine-url", "http://localhost:1/v1", "--engine-model", "m", "--benchmark", "mgsm",
                "--data", str(FIX / "mgsm"), "--langs", "sw", "--steering", str(stats_path)])
    with pytest.raises(SystemExit, match="outside the model's decoder layers"):
        bench(path, tmp_path / "c", "--steering", str(stats_path), "--steering-layers", "1,9")


def test_steermoe_boosted_expert_is_chosen_in_a_bf16_model(tok):
    """bf16 weights (CPU): the router picks the top-k from SteerMoE's fp32 log-probabilities, so the boosted
    expert (max + 0.01) is chosen for every token. Near-uniform routing over 128 experts puts the token's
    largest log-probability near log(1/128) = -4.85, where bf16's spacing is 2^-5 > 0.01: a router that chose
    from a bf16 rounding sees a tie there, and with top_k=1 may lose it to a lower-numbered expert (it did,
    before router.py kept the edited logits' fp32)."""
    E, layers = 128, [1, 2]
    model = tiny_model(tok, n_layers=3, mlp_only_layers=(0,), n_experts=E, top_k=1)
    with torch.no_grad():
        for l in layers:
            model.layers[l].mlp.router.gate.weight.mul_(0.05)  # near-uniform routing
    model = model.to(torch.bfloat16)
    ids = torch.tensor([tok.encode_chat("Habari ya leo? Watu wote wamezaliwa huru.", "Nzuri sana.")[0]])
    with torch.no_grad():
        raw_TE = model(ids).router_logits[0][0]  # layer 1, unsteered (its input does not depend on the steering)
    # English uses expert E-1 far more, the target expert 0: n = 2 boosts E-1 and suppresses 0 on both layers
    en = [[0.0] + [0.5 / (E - 2)] * (E - 2) + [0.5]] * 2
    target = [[0.5] + [0.5 / (E - 2)] * (E - 2) + [0.0]] * 2
    stats = dict(n_experts=E, top_k=1, moe_layers=layers, n_layers=3, freq=dict(en=en, sw=target))
    edits = steering.steering_interventions(stats, model.config, "steermoe", 2, (1, 2), target="sw")
    for edit in edits.values():
        edit.record = True
    steering.set_steering(model, edits)
    with torch.no_grad():
        out = model(ids)
    # the premise: on some token the boost is below bf16's resolution (a bf16 rounding of the edit ties)
    signs = torch.zeros(E, dtype=torch.int8)
    signs[E - 1], signs[0] = 1, -1
    z_TE = steering.steermoe_steer_logits(raw_TE, signs)
    assert bool((z_TE[:, :E - 1].max(-1).values.to(torch.bfloat16) == z_TE[:, E - 1].to(torch.bfloat16)).any())
    for l in layers:
        assert edits[l].recorded[0][0, :, 0].tolist() == [E - 1] * ids.shape[1]
    assert out.logits.dtype == torch.bfloat16  # the residual stream stays in the model's dtype
    assert all(z.dtype == torch.float32 for z in out.router_logits)  # the router returns the logits it chose from
    assert torch.equal(out.router_logits[0][0], z_TE)


def test_errors_name_the_callers_flags(ckpt, tok):
    """eval.py's dashed flags by default; sample.py's and compare.py's --key=value settings with SETTING_FLAGS."""
    path, stats_path = ckpt
    stats = steering.load_statistics(stats_path)
    cfg = tiny_model(tok, n_layers=4, mlp_only_layers=(0,)).config
    cases = [(lambda n: steering.parse_layers("1-3", cfg, names=n), "layers", r" '1-3': an inclusive pair"),
             (lambda n: steering.steering_interventions(stats, cfg, "chen", 0.02, (0, 2), names=n), "layers", r" 0,2: layers \[0\] are dense"),
             (lambda n: steering.steering_interventions(stats, cfg, "chen", 0.02, (1, 4), names=n), "layers", " 1,4: outside"),
             (lambda n: steering.steering_interventions(stats, cfg, "mean", 0.02, (1, 3), names=n), "rule", " 'mean': one of"),
             (lambda n: steering.steering_interventions(stats, cfg, "steermoe", 1.5, (1, 3), target="sw", names=n), "strength", " 1.5: for steermoe"),
             (lambda n: steering.steering_interventions(stats, cfg, "chen", float("nan"), (1, 3), names=n), "strength", " nan: for chen"),
             (lambda n: steering.steering_interventions(stats, cfg, "steermoe", 1, (1, 3), target="hi", names=n), "target", " 'hi': steermoe needs")]
    for call, key, message in cases:
        with pytest.raises(ValueError, match=f"^--steering-{key}{message}"):
            call(steering.DASHED_FLAGS)
        with pytest.raises(ValueError, match=f"^--steering_{key}{message}"):
            call(steering.SETTING_FLAGS)
    with pytest.raises(ValueError, match="^--steering-layers 'x'"):  # the default: eval.py's spelling
        steering.parse_layers("x", cfg)


def test_pooled_languages_are_the_statistics_of_their_rows_together(ckpt, tok):
    """Oracle: routing_statistics over the zh and sw rows relabelled as one language."""
    from data.parallel import load_parallel_jsonl
    path, stats_path = ckpt
    stats = steering.pool_languages(steering.load_statistics(stats_path), ["zh", "sw"], "zh+sw")
    model = tiny_model(tok, n_layers=4, mlp_only_layers=(0,))
    rows = [dict(x, lang="zh+sw") for x in load_parallel_jsonl(PARALLEL) if x["lang"] in ("zh", "sw")]
    together = steering.routing_statistics(model, tok, rows, max_len=48)
    assert stats["n_tokens"]["zh+sw"] == together["n_tokens"]["zh+sw"] == stats["n_tokens"]["zh"] + stats["n_tokens"]["sw"]
    got = [f for row in stats["freq"]["zh+sw"] for f in row]
    assert got == pytest.approx([f for row in together["freq"]["zh+sw"] for f in row], abs=1e-15)
