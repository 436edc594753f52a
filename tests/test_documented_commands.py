"""
Every command that README.md, docs/*.md and the entry points' docstrings show is run by the suite.

How: each documented command, exactly as written (whitespace normalised, a trailing "# comment" and
"\\" line continuations folded), is listed in COVERAGE with the test that runs it, scaled down only where
the doc gives a quick mode or a flag only changes sizes or paths (a real checkpoint replaced by a tiny one).
The checks:
- a documented command that COVERAGE lacks fails (add its test, then its row), and a row whose command
  is no longer documented fails (the table cannot rot);
- the covering test exists, and every flag and setting the documented command passes appears in the
  source of that test's module: a flag added to a doc but never exercised fails;
- commands of other projects (vLLM, SGLang: the servers a user starts) are listed as EXTERNAL; they are
  not ours to run, and the client side of them is run against `transformers serve` (test_real_server).
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = "external"
GPU_ONLY = "gpu_only"  # needs GPUs and a real checkpoint; the doc says "not run here"; its CPU twin is tested


def doc_sources():
    """-> [(path, text)] of every place that shows commands: README, docs/*.md, entry-point docstrings."""
    out = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    out += sorted(ROOT.glob("*.py")) + sorted((ROOT / "experiments").glob("*.py"))
    return out


def _blocks(path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        return [m.group(1) for m in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S)]
    return [ast.get_docstring(ast.parse(text)) or ""]


def documented_commands():
    """-> {command: [where it is shown]} for every line of a code block (or docstring) that runs python,
    torchrun or one of the servers."""
    found = {}
    for path in doc_sources():
        for block in _blocks(path):
            lines, i = block.split("\n"), 0
            while i < len(lines):
                line = lines[i].strip()
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1].rstrip() + " " + lines[i].strip()
                i += 1
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if re.match(r"^(python3?|torchrun|vllm|transformers serve)(?=\s|$)", line) or "&& python" in line:
                    found.setdefault(re.sub(r"\s+", " ", line), []).append(str(path.relative_to(ROOT)))
    return found


def flags(command):
    """The flags and settings a command passes: --name, --name=value, name=value after the script."""
    names = set(re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", command))
    return {n for n in names if n not in ("nproc_per_node",)}


# command (as documented) -> ("tests/test_x.py", "test_name") that runs it, or EXTERNAL
T = "tests/test_documented_commands.py"
TRAIN, EVAL, STAGE1, CKPT = "tests/test_train.py", "tests/test_eval.py", "tests/test_stage1.py", "tests/test_checkpoint.py"
REHEARSAL = ("tests/test_rehearsal.py", "test_rehearsal_8_ranks_kill_resume_export")
COMPARE = ("tests/test_compare.py", "test_quick_comparison_then_reanalyse")
STEERING = "tests/test_methods_steering_runtime.py"
COVERAGE = {
    # README: the two commands, the toy run and its plain twin
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && python train.py":
        (T, "test_default_toy_run_lands_in_the_readme_range"),
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements-test.txt && python -m pytest -q":
        (T, "test_ci_runs_the_readme_test_command"),
    "python train.py": (T, "test_default_toy_run_lands_in_the_readme_range"),
    "mkdir -p out/toy_plain && cp out/toy/base.pt out/toy_plain/ && python train.py --out_dir=out/toy_plain --lambda_js=0.0":
        (TRAIN, "test_lambda_js_zero_sees_the_same_batches"),
    "python train.py configs/toy.py --lambda_js=0.0": (TRAIN, "test_lambda_js_zero_sees_the_same_batches"),
    "python train.py --help": ("tests/test_configurator.py", "test_scripts_print_help"),
    "python train.py configs/phi35.py --init_from=/ckpt/Phi-3.5-MoE-instruct --lr=1e-5": ("tests/test_train.py", "test_two_processes_match_one"),
    # the studies (their --quick modes are the documented quick versions of the full runs)
    "python experiments/transfer.py": ("tests/test_transfer.py", "test_quick_identical_batches_and_primary_declared"),
    "python experiments/transfer.py --quick": ("tests/test_transfer.py", "test_quick_identical_batches_and_primary_declared"),
    "python experiments/toy_sara.py": ("tests/test_experiment.py", "test_table_has_every_language_and_condition"),
    "python experiments/toy_sara.py --quick": ("tests/test_experiment.py", "test_table_has_every_language_and_condition"),
    "python experiments/toy_sara.py --reanalyse": ("tests/test_experiment.py", "test_reanalyse_reproduces_the_run"),
    "python experiments/gated_world.py": ("tests/test_gated_world.py", "test_quick_study_end_to_end"),
    "python experiments/gated_world.py --quick": ("tests/test_gated_world.py", "test_quick_study_end_to_end"),
    "python experiments/gated_sara.py": ("tests/test_gated_world.py", "test_quick_sara_comparison_end_to_end"),
    "python experiments/gated_sara.py --quick": ("tests/test_gated_world.py", "test_quick_sara_comparison_end_to_end"),
    "python experiments/gated_sara.py --report": ("tests/test_gated_world.py", "test_quick_sara_comparison_end_to_end"),
    "python experiments/generation_throughput.py": (T, "test_generation_throughput_runs"),
    "python experiments/generation_throughput.py --shape qwen3 --n-layers 4 --dtype bfloat16 --device cuda":
        (T, "test_generation_throughput_runs"),
    "python experiments/generation_throughput.py --checkpoint out/toy/hf --batch-sizes 1,16,64":
        (T, "test_generation_throughput_runs"),
    # the three stages at scale: the 8-rank rehearsal runs train.py under torchrun with the configs
    "torchrun --nproc_per_node 8 train.py configs/qwen3_30b_a3b.py --init_from=/models/Qwen3-30B-A3B "
    "--data_path=data/stage1/parallel.jsonl --train_langs='[\"sw\"]' --out_dir=out/qwen3-sara-sw": ("tests/test_train.py", "test_two_processes_match_one"),
    "torchrun --nproc_per_node 8 train.py configs/qwen3_30b_a3b.py --init_from=/models/Qwen3-30B-A3B --data_path=sw.jsonl": REHEARSAL,
    "torchrun --nproc_per_node 8 train.py configs/phi35.py --init_from=/models/Phi-3.5-MoE-instruct --data_path=sw.jsonl": REHEARSAL,
    "torchrun --nproc_per_node 8 train.py configs/phi35.py ... --lambda_js=0.0": ("tests/test_train.py", "test_two_processes_match_one"),
    "torchrun --nproc_per_node 8 train.py configs/phi35.py --init_from=DIR --data_path=FILE": REHEARSAL,
    "vllm serve /models/Qwen3-30B-A3B --served-model-name orig --tensor-parallel-size 8 --generation-config vllm --port 8000": EXTERNAL,
    "vllm serve out/qwen3-sara-sw/hf --served-model-name sara-sw --tensor-parallel-size 8 --generation-config vllm --port 8000": EXTERNAL,
    "vllm serve /models/Qwen3-30B-A3B --served-model-name orig --tensor-parallel-size 8 --generation-config vllm "
    "--max-model-len 8192 --port 8000": EXTERNAL,
    "python -m sglang.launch_server --model-path /models/Qwen3-30B-A3B --served-model-name orig --tp 8 --port 30000": EXTERNAL,
    "transformers serve --host 127.0.0.1 --port 8000 --device cpu": EXTERNAL,  # run by tests/test_real_server.py
    # stage 1
    "python stage1.py build --questions mmlu=raw/mmlu_prox_en.parquet,gsm8k=raw/gsm8k_train.jsonl --engine-url "
    "http://localhost:8000/v1 --engine-model orig --concurrency 64 --batch-size 256 --langs sw,hi,bn,te,ne --out data/stage1":
        (STAGE1, "test_engine_path"),
    "python stage1.py build --questions mmlu=raw/mmlu_prox_en.parquet,gsm8k=raw/gsm8k_train.jsonl --checkpoint "
    "/models/Qwen3-30B-A3B --dtype bfloat16 --langs sw,hi,bn,te,ne --out data/stage1": (STAGE1, "test_end_to_end_builtin_generator"),
    "python stage1.py build --questions mmlu=raw/mmlu_prox_en.parquet,gsm8k=raw/gsm8k_train.jsonl --checkpoint "
    "Qwen3-30B-A3B --langs sw,hi,bn,te,ne --out data/stage1": (STAGE1, "test_end_to_end_builtin_generator"),
    "python stage1.py build --questions ... --langs sw,hi,bn,te,ne --out data/stage1 --engine-url http://localhost:8000/v1 "
    "--engine-model orig --concurrency 64 --batch-size 256 --translator engine --translate-url http://localhost:8001/v1 "
    "--translate-model translator": (STAGE1, "test_engine_path"),
    "python stage1.py build ... --translator file --translations my_translations.jsonl": (STAGE1, "test_translation_file"),
    "python stage1.py build ... --engine-url http://localhost:8000/v1 --engine-model sara": (STAGE1, "test_engine_path"),
    "python tests/fake_engine.py --questions mmlu=tests/fixtures/stage1/mmlu_pro.jsonl,gsm8k=tests/fixtures/stage1/gsm8k.jsonl "
    "--port 8011 &": (STAGE1, "test_documented_offline_demo_route"),
    "python stage1.py build --questions mmlu=tests/fixtures/stage1/mmlu_pro.jsonl,gsm8k=tests/fixtures/stage1/gsm8k.jsonl "
    "--engine-url http://127.0.0.1:8011/v1 --engine-model oracle --langs sw --out out/stage1_demo":
        (STAGE1, "test_documented_offline_demo_route"),
    # evaluation
    "python eval.py bench --engine-url http://localhost:8000/v1 --engine-model sara-sw --engine-concurrency 64 --benchmark "
    "global_mmlu --data ~/data/global_mmlu --langs sw --runs 3 --out results/gmmlu-sara-sw":
        (EVAL, "test_bench_engine_faults_are_one_line_and_flags_bound_the_wait"),
    "python eval.py bench --engine-url http://localhost:8000/v1 --engine-model sara-sw --benchmark mgsm --data ~/data/mgsm "
    "--langs sw,bn,te --runs 3": (EVAL, "test_cli_bench_with_an_engine_responder"),
    "python eval.py bench --checkpoint out/fft-sw/hf --benchmark global_mmlu --data ~/data/global_mmlu --langs sw --out "
    "results/fft-sw": (EVAL, "test_cli_bench_table_and_compare"),
    "python eval.py bench --checkpoint out/sara-sw/hf --benchmark mgsm --data ~/data/mgsm --langs sw,bn,te --runs 3":
        (EVAL, "test_cli_bench_table_and_compare"),
    "python eval.py bench --checkpoint DIR --benchmark global_mmlu --data DIR_OR_FILE --langs sw,hi,bn,te,ne":
        (EVAL, "test_cli_bench_table_and_compare"),
    "python eval.py bench --checkpoint out/sara-sw/hf --benchmark global_mmlu --data ~/data/global_mmlu --langs sw,hi "
    "--protocol harness": ("tests/test_evaluation_harness.py", "test_bench_harness_protocol_end_to_end_and_named_in_the_table"),
    "python eval.py table results/fft-sw results/sara-sw": (EVAL, "test_cli_bench_table_and_compare"),
    "python eval.py table results/mgsm-generative-fft-sw results/mgsm-generative-sara-sw": (EVAL, "test_cli_bench_table_and_compare"),
    "python eval.py table results/fft results/sara": (EVAL, "test_cli_bench_table_and_compare"),
    "python eval.py routing --checkpoint out/fft-sw/hf --compare out/sara-sw/hf --labels FFT,SARA --out results/routing":
        (EVAL, "test_cli_routing_band_and_figures"),
    "python eval.py routing --checkpoint out/base/hf --compare out/sara-sw/hf --labels before,after --data "
    "data/udhr/parallel.jsonl --anchor en --width 28": (EVAL, "test_cli_routing_band_and_figures"),
    "python eval.py routing --checkpoint DIR [--compare DIR2] --data data/udhr/parallel.jsonl --anchor en":
        (EVAL, "test_cli_routing_band_and_figures"),
    "python eval.py routing --checkpoint out/toy/base.pt --tokenizer data/udhr/bpe.tiktoken --compare out/toy/hf --labels "
    "original,SARA --max-len 256 --out results/toy_routing": (T, "test_readme_routing_figure_command_on_a_toy_run"),
    "python eval.py band --routing-csv results/routing/routing.csv --width 2": (EVAL, "test_cli_routing_band_and_figures"),
    "python eval.py band --routing-csv results/routing/routing.csv --width 28": (EVAL, "test_cli_routing_band_and_figures"),
    "python eval.py band --routing-csv results/routing/routing.csv --width K [--edges]": (EVAL, "test_cli_routing_band_and_figures"),
    "python eval.py compare --a results/fft-s0 results/fft-s1 results/fft-s2 --b results/sara-s0 results/sara-s1 "
    "results/sara-s2 --routing-csv results/routing/routing.csv --band 1,2": (EVAL, "test_compare_correlates_divergence_and_accuracy_changes"),
    "python eval.py compare --a results/fft-s0 results/fft-s1 results/fft-s2 --b results/sara-s0 results/sara-s1 "
    "results/sara-s2": (EVAL, "test_compare_correlates_divergence_and_accuracy_changes"),
    "python eval.py compare --a results/fft [more seeds] --b results/sara [more seeds]":
        (EVAL, "test_compare_correlates_divergence_and_accuracy_changes"),
    "python sample.py --checkpoint=/models/Phi-3.5-MoE-instruct --prompt=\"Why is the sky blue?\" --dtype=bfloat16":
        (CKPT, "test_sample_py_chats_with_a_checkpoint"),
    "python sample.py --checkpoint=DIR --prompt=\"Why is the sky blue?\"": (CKPT, "test_sample_py_chats_with_a_checkpoint"),
    "python sample.py --checkpoint=DIR --prompt=\"...\" --system=\"Be brief.\" --temperature=0.7 --top_p=0.9":
        (CKPT, "test_sample_py_chats_with_a_checkpoint"),
    "python sample.py --checkpoint=out/toy/base.pt --tokenizer=data/udhr/bpe.tiktoken --prompt=\"...\"":
        (CKPT, "test_sample_py_takes_a_training_pt_with_a_tokenizer"),
    "python export.py out/toy/base.pt out/toy/base_hf --tokenizer data/udhr/bpe.tiktoken":
        (TRAIN, "test_base_pt_is_a_checkpoint_and_exports_to_hugging_face"),
    # methods, steering, the comparison
    "python train.py --method=live_kl --live_kl_alpha=0.1 --live_kl_freeze=early_layers":
        ("tests/test_methods_components.py", "test_train_py_runs_live_kl_with_frozen_routers_and_refuses_a_shuffle_without_anchors"),
    "python train.py --method=shifcon --out_dir=out/toy_shifcon":
        ("tests/test_shifcon_inference.py", "test_train_exports_vectors_that_reproduce_the_loops_held_out_ce"),
    "python sample.py --checkpoint=out/toy_shifcon/hf --prompt=\"Habari\" --lang=sw":
        ("tests/test_shifcon_inference.py", "test_sample_py_on_the_exported_shifcon_model"),
    "python train.py --freeze_routers=True --lambda_js=0":
        ("tests/test_methods_components.py", "test_train_py_runs_live_kl_with_frozen_routers_and_refuses_a_shuffle_without_anchors"),
    "python train.py --anchor_shuffle=True":
        ("tests/test_methods_components.py", "test_train_py_runs_live_kl_with_frozen_routers_and_refuses_a_shuffle_without_anchors"),
    "python -m methods.steering --checkpoint DIR --data data/udhr/parallel.jsonl --langs en,zh,sw --out stats.json":
        (STEERING, "test_statistics_are_top_k_counts_over_real_tokens"),
    "python eval.py bench --checkpoint DIR --benchmark mgsm --data DATA --langs sw --steering stats.json --steering-rule chen "
    "--steering-strength 0.022 --steering-layers 10,39": (STEERING, "test_eval_bench_steering_flags"),
    "python sample.py --checkpoint=DIR --prompt='...' --steering=stats.json --steering_rule=steermoe --steering_strength=4 "
    "--steering_target=sw": (STEERING, "test_sample_py_steering_flags"),
    "python compare.py --quick --out_dir out/compare_quick": COMPARE,
    "python compare.py --reanalyse --quick --out_dir out/compare_quick": COMPARE,
    "python compare.py --out_dir out/compare --seeds 1,2,3 --jobs 2 configs/toy.py": COMPARE,
    "python compare.py --out_dir out/compare --seeds 1,2,3 configs/toy.py": COMPARE,
    "python compare.py --reanalyse --out_dir out/compare": COMPARE,
    "python compare.py --reanalyse --quick --out_dir out/compare_quick --methods sara+steering --steering_rule steermoe "
    "--steering_strength 1": COMPARE,
    "python compare.py --out_dir out/cmp --seeds 1,2,3 --launcher \"torchrun --nproc_per_node 8\" configs/qwen3_30b_a3b.py "
    "--init_from=DIR --data_path=FILE": GPU_ONLY,
    "python compare.py --out_dir out/cmp --launcher \"torchrun --nproc_per_node 8\" configs/qwen3_30b_a3b.py --init_from=DIR "
    "--data_path=FILE --seeds 1,2,3": GPU_ONLY,
    # speed and memory
    "python bench.py": ("tests/test_bench.py", "test_quick_mode_runs_and_prints_ratio_lines"),
    "python bench.py --device=cpu": ("tests/test_bench.py", "test_quick_mode_runs_and_prints_ratio_lines"),
    "python bench.py --device=cpu --quick": ("tests/test_bench.py", "test_quick_mode_runs_and_prints_ratio_lines"),
    "python bench.py --shapes=phimoe --modes=eager --out_json=bench.json": (T, "test_bench_documented_subsets"),
    "python bench.py --shapes=phimoe --routing=balanced --depths=1 --parity=False": (T, "test_bench_documented_subsets"),
    "python memory.py": (T, "test_memory_fast_mode_prints_the_table"),
    "python memory.py --models qwen3 --real none --sim_layers \"\"": (T, "test_memory_fast_mode_prints_the_table"),
}


def test_every_documented_command_has_a_test_and_every_row_a_command():
    documented = documented_commands()
    missing = {c: w for c, w in documented.items() if c not in COVERAGE}
    stale = [c for c in COVERAGE if c not in documented]
    assert not missing, "documented commands that no test runs (add a test, then a COVERAGE row):\n" + "\n".join(
        f"  {c!r}  ({', '.join(sorted(set(w)))})" for c, w in missing.items())
    assert not stale, f"COVERAGE rows whose command is documented nowhere: {stale}"


@pytest.mark.parametrize("command", sorted(COVERAGE))
def test_the_covering_test_exists_and_passes_the_documented_flags(command):
    where = COVERAGE[command]
    if where == EXTERNAL:
        assert re.match(r"^(vllm|python -m sglang|transformers serve)", command), f"{command!r} is ours, not external"
        return
    if where == GPU_ONLY:  # 8 GPUs and a real checkpoint: the same command's CPU form is run by its tests
        shown_in = documented_commands()[command]
        assert "torchrun" in command and any("not run here" in (ROOT / f).read_text() for f in shown_in), command
        return
    file, name = where
    source = (ROOT / file).read_text(encoding="utf-8")
    assert re.search(rf"^def {name}\(", source, re.M), f"{file} has no test {name} (for {command!r})"
    unexercised = [f for f in flags(command) if f not in source and f.replace("-", "_") not in source]
    assert not unexercised, f"{file} never passes {unexercised} of the documented {command!r}"


# -----------------------------------------------------------------------------
# the documented commands that no other test file runs

def run(args, timeout=600):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, f"{args} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def test_ci_runs_the_readme_test_command():
    """.ci/run is the README's second command: the same requirements file, then `python -m pytest -q`."""
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "pip install -r requirements-test.txt && python -m pytest -q" in readme
    assert re.search(r"pip install( -q)? -r requirements-test.txt && python -m pytest -q\s*$", ci.strip() + "\n", re.M)


# The range README.md states for the default toy run (`python train.py`, seed 1337): final held-out CE and
# the band's mean routing JS, over machines of this kind and reruns (README, "The toy SARA experiment");
# the README must quote these same numbers.
TOY_CE_RANGE, TOY_BAND_JS_MAX = (5.66, 5.78), 0.01


@pytest.mark.slow  # ~90 s on 2 idle cores; its short version: test_train.py's tiny runs of the same script
def test_default_toy_run_lands_in_the_readme_range(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert f"{TOY_CE_RANGE[0]:.2f}–{TOY_CE_RANGE[1]:.2f}" in readme and f"{TOY_BAND_JS_MAX}" in readme
    out = run(["train.py", f"--out_dir={tmp_path / 'toy'}", "--export_hf=False"], timeout=1800)
    last = re.findall(r"val CE ([0-9.]+)\s+val JS\(band\) ([0-9.]+)", out)[-1]
    assert TOY_CE_RANGE[0] <= float(last[0]) <= TOY_CE_RANGE[1], last
    assert float(last[1]) <= TOY_BAND_JS_MAX, last
    assert re.search(r"done in \d+ s wall", out)


@pytest.fixture(scope="module")
def tiny_toy_run(tmp_path_factory):
    """A tiny train.py run with its export: base.pt (the original model) and hf/ (after SARA)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import run_train, tiny_args
    out = tmp_path_factory.mktemp("toy")
    run_train(tiny_args(out, export_hf=True))
    return out


def test_readme_routing_figure_command_on_a_toy_run(tiny_toy_run, tmp_path):
    """README's command, with the tiny run's directory for out/toy; it writes into its --out, never docs/."""
    out = run(["eval.py", "routing", "--checkpoint", str(tiny_toy_run / "base.pt"), "--tokenizer", "data/udhr/bpe.tiktoken",
               "--compare", str(tiny_toy_run / "hf"), "--labels", "original,SARA", "--max-len", "256",
               "--out", str(tmp_path / "toy_routing"), "--langs", "sw,hi"])
    assert (tmp_path / "toy_routing" / "routing.csv").exists() and "original" in out


def test_generation_throughput_runs(tiny_toy_run):
    """The three documented forms, scaled down by their size flags only (batch sizes, lengths, layers)."""
    small = ["--batch-sizes", "1,2", "--new-tokens", "3", "--prompt-len", "4"]
    for extra in ([], ["--checkpoint", str(tiny_toy_run / "hf")],
                  ["--shape", "qwen3", "--n-layers", "1", "--dtype", "bfloat16", "--device", "cpu"]):
        out = run(["experiments/generation_throughput.py", *extra, *small])
        assert re.search(r"^\s+2\s+[0-9.]+\s+[0-9.]+", out, re.M), out  # the batch-2 row: seconds, tokens/s


def test_memory_fast_mode_prints_the_table():
    out = run(["memory.py", "--models", "qwen3", "--real", "none", "--sim_layers", ""])
    assert re.search(r"\| qwen3 \| fp32 \| on \|.*\| fits \|", out), out[-2000:]


def test_bench_documented_subsets(tmp_path):
    """bench.py's docstring and docs/performance.md forms, at the quick sizes (--quick changes sizes only)."""
    out = run(["bench.py", "--device=cpu", "--quick", "--shapes=phimoe", "--modes=eager", "--routing=balanced",
               "--depths=1", "--parity=False", f"--out_json={tmp_path / 'bench.json'}"])
    assert "phimoe" in out and (tmp_path / "bench.json").exists()
