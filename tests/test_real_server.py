"""engine.py against a real OpenAI-compatible server: Hugging Face `transformers serve` (CPU, offline) on
127.0.0.1, started and stopped here, serving toy exports (checkpoint.save_hf + tokenizer.save_hf_tokenizer).
The fake server (tests/fake_engine.py) stays for faults; this is the protocol as a real server speaks it:
strict request validation (HTTP 422 for fields it does not know, such as top_k), the checkpoint's
generation_config.json applied unless overridden, /v1/models listing the download cache, not the model.
Skipped when transformers[serving] is not installed (requirements-test.txt has it)."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

MISSING = [m for m in ("transformers", "fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
if MISSING:
    pytest.skip(f"transformers serve needs pip install 'transformers[serving]' ({', '.join(MISSING)} missing)",
                allow_module_level=True)

import torch  # noqa: E402

import stage1 as S  # noqa: E402
from checkpoint import load_model_and_tokenizer, save_hf  # noqa: E402
from data.parallel import load_parallel_jsonl  # noqa: E402
from engine import check_engine, make_engine_responder  # noqa: E402
from evaluation.generate import make_generative_responder  # noqa: E402
from model import MoEConfig, MoETransformer  # noqa: E402
from test_stage1 import TOK_PATH, chain_model, write_jsonl  # noqa: E402
from tokenizer import MODEL_TYPE_TO_CHAT_FORMAT, load_tokenizer, save_hf_tokenizer  # noqa: E402

PROMPTS = ["Hello there", "What is 2 + 3?", "Habari ya asubuhi", "Kila mtu ana haki"]
# sampling defaults as a released checkpoint ships them (Qwen3's: do_sample, 0.6, top_k 20, top_p 0.95),
# plus two that change even greedy decoding: the client must override them all
CHECKPOINT_DEFAULTS = dict(do_sample=True, temperature=0.6, top_k=20, top_p=0.95, repetition_penalty=1.5,
                           no_repeat_ngram_size=2)


def export(model, tok, path):
    save_hf(model, path)
    save_hf_tokenizer(tok, path, model_max_length=model.config.max_position_embeddings)
    gen = path / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), **CHECKPOINT_DEFAULTS}))
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two toy exports: a random one (varied greedy text) and the stage-1 chain model (answers \\boxed{B})."""
    tok = load_tokenizer(TOK_PATH)
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    cfg = MoEConfig(vocab_size=tok.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    intermediate_size=128, n_experts=4, top_k=2, moe_intermediate_size=32, qk_norm=True,
                    max_position_embeddings=512, init_std=0.2)
    return dict(random=export(MoETransformer(cfg).eval(), tok, root / "random"),
                chain=export(chain_model(tok), tok, root / "chain"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`transformers serve` on 127.0.0.1 (CPU, offline, no preloaded model: a request's model is the export's
    path); -> its base URL. Stopped (and its log shown on a failed start) by the fixture."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "hub").mkdir()  # an empty download cache: /v1/models lists nothing (without one it fails with 500)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp / "hub"), OMP_NUM_THREADS="1")
    env.pop("OPENAI_API_KEY", None)
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from transformers.cli.transformers import main; "
                             "sys.exit(main())", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("transformers serve did not start:\n" + (tmp / "serve.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def builtin_greedy(path, prompts, max_new_tokens):
    model, tok = load_model_and_tokenizer(path)
    return make_generative_responder(model, tok, max_new_tokens=max_new_tokens, temperature=0.0)(prompts, 0), tok


def test_greedy_through_the_server_is_the_builtin_generators(server, exports):
    """The sampling the server applies is the one asked for: greedy through transformers serve (which refuses
    top_k with 422, so the client sends a generation_config) gives the built-in generator's tokens, although
    the export's generation_config.json asks for sampling, top_k 20, a repetition penalty and no repeated
    bigrams; a request without the override gets those and writes something else (the test can fail)."""
    path = str(exports["random"])
    check_engine(server, path, timeout=120)  # /v1/models lists the (empty) cache: the model is asked directly
    got = make_engine_responder(server, path, max_new_tokens=12, temperature=0.0, seed=0, concurrency=2,
                                timeout=120)(PROMPTS, 0)
    want, tok = builtin_greedy(path, PROMPTS, 12)
    assert len(set(want)) == len(PROMPTS)  # varied text, not one constant
    # the server's reply is the generated text, or (toy chat format, see the next test) the prompt + it
    for prompt, g, w in zip(PROMPTS, got, want):
        assert g in (w, tok.decode(tok.encode_chat(prompt)[0]) + w)
    plain = []  # the same requests without the client's override: the checkpoint's defaults apply
    for p in PROMPTS:
        payload = dict(model=path, messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0)
        req = urllib.request.Request(server + "/chat/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            plain.append(json.loads(r.read())["choices"][0]["message"]["content"])
    assert any(not p.endswith(w) for p, w in zip(plain, want))  # the checkpoint's defaults did apply


def _toy_chat_format_differs(path):
    config = json.loads((Path(path) / "config.json").read_text())
    return load_tokenizer(path).chat_format != MODEL_TYPE_TO_CHAT_FORMAT[config["model_type"]]


def test_server_reply_is_exactly_the_builtin_text(server, exports):
    """The server returns the assistant's text only: transformers serve parses a qwen3_moe reply as ChatML,
    which is the toy export's own format (a toy in another family's format got the prompt echoed back)."""
    path = str(exports["random"])
    got = make_engine_responder(server, path, max_new_tokens=12, temperature=0.0, concurrency=2,
                                timeout=120)(PROMPTS, 0)
    want = builtin_greedy(path, PROMPTS, 12)[0]
    if got != want and _toy_chat_format_differs(path):  # (the previous test pins the difference: the prompt)
        pytest.xfail("toy chat format (issue 21.4) pending")
    assert got == want


def test_stage1_build_through_the_server(server, exports, tmp_path):
    """`stage1.py build --engine-url` completes through transformers serve, with the verdicts of the
    built-in generator on the same export (the chain model answers \\boxed{B} to everything)."""
    mc = write_jsonl(tmp_path / "mmlu.jsonl", [
        dict(question_id=70, question="Which gas do plants take in?", answer="B",
             options=["Oxygen", "Carbon dioxide", "Helium", "Neon"]),
        dict(question_id=71, question="What is 2 + 3?", answer="C", options=["4", "6", "5", "7"])])
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [dict(question="Tom has 3 apples and buys 4 more. How many?",
                                                      answer="3 + 4 = 7\n#### 7")])
    common = ["build", "--questions", f"mmlu={mc},{gsm}", "--langs", "sw", "--max-new-tokens", "24",
              "--translate-max-new-tokens", "24", "--temperature", "0", "--quiet"]
    path = str(exports["chain"])
    S.main(common + ["--engine-url", server, "--engine-model", path, "--timeout", "120", "--concurrency", "2",
                     "--out", str(tmp_path / "served")])
    S.main(common + ["--checkpoint", path, "--out", str(tmp_path / "builtin")])
    verdicts = lambda d: [(r["group"], r["pred"], r["status"]) for r in
                          map(json.loads, (d / "answers.jsonl").read_text(encoding="utf-8").split("\n")[:-1])]
    assert verdicts(tmp_path / "served") == verdicts(tmp_path / "builtin") == [
        ("mmlu-70", "B", "kept"), ("mmlu-71", "B", "wrong_answer"), ("gsm8k-1", None, "no_boxed_answer")]
    rows = load_parallel_jsonl(tmp_path / "served" / "parallel.jsonl")
    assert [r["id"] for r in rows][:1] == ["mmlu-70-en"]
    run = json.loads((tmp_path / "served" / "run.json").read_text())
    assert run["answer_model"] == f"{server} {path}"
