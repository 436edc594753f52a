"""
bench.py runs end to end in its quick mode (a subprocess, as a user runs it) and prints its ratio
lines; its JSON carries the provenance; bench_hf builds transformers' model of the config's own family
(transformers' classes and logits are the oracle) and refuses a config of no known family.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
import bench_hf  # noqa: E402
import families  # noqa: E402
from hf_config import CheckpointError  # noqa: E402
from model import MoEConfig, MoETransformer, phi35_moe_config, qwen3_30b_a3b_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            intermediate_size=16, n_experts=4, top_k=2, moe_intermediate_size=16)


def test_quick_mode_runs_and_prints_ratio_lines(tmp_path):
    """The documented quick mode (docs/performance.md): `python bench.py --device=cpu --quick`."""
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "bench.py", "--device=cpu", "--quick", f"--out_json={out}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "FAILED" not in run.stdout, run.stdout[-3000:]
    # the interleaved pairs and the headline per family x depth x routing
    assert len(re.findall(r"ours/hf x\d+\.\d+ \[\d+\.\d+-\d+\.\d+\]", run.stdout)) >= 8
    for name in families.FAMILIES:
        for layers in (1, 2):
            for routing in ("balanced", "skewed"):
                assert re.search(rf"^{name} {layers} layers {routing}: ours \(eager\) .* ours/theirs tok/s "
                                 rf"x\d+\.\d+ \[\d+\.\d+-\d+\.\d+\]$", run.stdout, re.M), (name, layers, routing)
    # the parity check ran, and ours' reference path is transformers' eager path bit for bit (fp32, CPU)
    assert run.stdout.count("parity (eval, 2 x 512 tokens): ref_router0_identical True") == len(families.FAMILIES)
    results = json.loads(out.read_text())
    assert results["provenance"]["threads"] == 1 and results["provenance"]["device"] == "cpu"
    assert "commit" in results["provenance"] and results["clock"] == "process" and results["quick"] is True
    assert {r["shape"] for r in results["rows"]} == set(families.FAMILIES)


def test_bench_rejects_old_or_unknown_shape_names():
    run = subprocess.run([sys.executable, "bench.py", "--device=cpu", "--shapes=qwen,mixtral"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"--shapes: ['mixtral', 'qwen'] not in {list(families.FAMILIES)}" in run.stdout + run.stderr


@pytest.mark.parametrize("preset", [qwen3_30b_a3b_config, phi35_moe_config])
def test_bench_hf_builds_the_configs_own_family(preset):
    cfg = preset(**TINY) if preset is qwen3_30b_a3b_config else preset(**{**TINY, "intermediate_size": 16})
    torch.manual_seed(0)
    ours = MoETransformer(cfg).eval()
    theirs = bench_hf.build_hf(ours, "eager", "eager", torch.float32, "cpu").eval()
    family = families.of_config(cfg)
    assert type(theirs) is getattr(transformers, family.HF_MODEL_CLASS)
    assert theirs.config.model_type == family.MODEL_TYPE
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_bench_hf_refuses_a_config_of_no_known_family():
    mixtral_like = MoEConfig(**TINY)  # top-k router, RMSNorm, no qk-norm: Mixtral's shape, not Qwen3's
    with pytest.raises(CheckpointError, match=r"neither qwen3_moe .* nor phimoe .*unmet: qwen3_moe \['qk_norm'\]"):
        bench_hf.hf_config(mixtral_like, "eager", "eager")
    with pytest.raises(CheckpointError, match="neither qwen3_moe"):
        bench_hf.build_hf(MoETransformer(mixtral_like), "eager", "eager", torch.float32, "cpu")
