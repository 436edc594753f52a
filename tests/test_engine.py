"""Tests for engine.py against a stand-in server on 127.0.0.1 (tests/fake_engine.py): the request it sends,
order under concurrency, retries, each failure's message, and the same benchmark records as the built-in
generator when the server returns the built-in generator's own completions."""
import email.utils
import itertools
import json
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from evaluation.accuracy import run_benchmark
from evaluation.benchmarks import TEMPLATES, build_prompt, load_benchmark
from evaluation.generate import make_generative_responder
import engine
from engine import EngineError, check_engine, make_engine_responder, served_models
from fake_engine import FakeEngine
from model import MoEConfig, MoETransformer
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(max_new_tokens=32, retries=2, backoff=0.01, timeout=5.0)


def user_text(payload):
    return payload["messages"][-1]["content"]


def test_request_and_order_under_concurrency():
    prompts = [f"question {i}" for i in range(20)]

    def reply(payload):  # later prompts answer sooner: completion order is the reverse of prompt order
        i = int(user_text(payload).split()[1])
        time.sleep(0.002 * (20 - i))
        return f"answer {i}"
    with FakeEngine(reply) as fake:
        respond = make_engine_responder(fake.url, "m", temperature=0.1, top_p=0.9, seed=5, concurrency=8,
                                        system="be brief", **FAST)
        assert respond(prompts, 2) == [f"answer {i}" for i in range(20)]
        req = fake.requests[0]
        assert req["model"] == "m" and req["max_tokens"] == 32 and req["temperature"] == 0.1
        assert req["top_p"] == 0.9 and req["n"] == 1
        assert {r["seed"] for r in fake.requests} == {7}  # seed + run
        assert req["messages"][0] == {"role": "system", "content": "be brief"}
        assert req["top_k"] == -1 and req["chat_template_kwargs"] == {"enable_thinking": False}
        fake.requests.clear()
        make_engine_responder(fake.url, "m", extra_body={}, **FAST)(["question 1"], 0)
        assert "seed" not in fake.requests[0] and "top_k" not in fake.requests[0]
        assert fake.requests[0]["messages"] == [{"role": "user", "content": "question 1"}]


def test_retries_then_success():
    with FakeEngine(lambda p: "ok") as fake:
        fake.script = [(503, {"error": "busy"}), (429, {"error": "slow down"})]
        assert make_engine_responder(fake.url, "m", concurrency=1, **FAST)(["q"], 0) == ["ok"]
        assert len(fake.requests) == 3


def test_retry_after_is_honoured():
    """A 429/503 with Retry-After waits what the server asks (not the short backoff), capped at MAX_RETRY_AFTER."""
    with FakeEngine(lambda p: "ok") as fake:
        fake.script = [(429, {"error": "slow down"}, {"Retry-After": "1"})]
        t0 = time.perf_counter()
        assert make_engine_responder(fake.url, "m", concurrency=1, **FAST)(["q"], 0) == ["ok"]
        assert time.perf_counter() - t0 >= 0.95
    assert engine._retry_after("7") == 7 and engine._retry_after("junk") is None
    assert engine._retry_after("100000") == engine.MAX_RETRY_AFTER
    assert 0 <= engine._retry_after(email.utils.formatdate(time.time() + 5, usegmt=True)) <= 5


def raw_server(handle):
    """A bare TCP server on 127.0.0.1 whose handle(conn, n) plays the n-th connection (n = 0, 1, ...)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def loop():
        for n in itertools.count():
            conn, _ = srv.accept()
            conn.recv(65536)
            handle(conn, n)
            conn.close()
    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/v1"


def test_body_cut_short_and_reset():
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "whole"}}]}).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)

    def cut_once(conn, n):  # the first answer stops after 10 bytes of body, the second is whole
        conn.sendall(head + (body[:10] if n == 0 else body))
    assert make_engine_responder(raw_server(cut_once), "m", concurrency=1, **FAST)(["q"], 0) == ["whole"]

    def reset(conn, n):  # the server was reached: the message must not send the user looking for it
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with pytest.raises(EngineError, match=r"/v1/chat/completions: connection failed \(.*reset.*\) after 3 attempts"):
        make_engine_responder(raw_server(reset), "m", concurrency=1, **FAST)(["q"], 0)


def test_first_failure_does_not_wait_for_slow_requests():
    """A request that fails at once ends the call at once: not after the slow requests still in flight
    (with the default timeout of 600 s and retries, Ctrl-C or an error could otherwise wait many minutes)."""
    def reply(payload):
        time.sleep(3.0)
        return "slow"
    with FakeEngine(reply) as fake:
        fake.script = [(400, {"error": {"message": "bad request"}})]
        t0 = time.perf_counter()
        with pytest.raises(EngineError, match="HTTP 400"):
            make_engine_responder(fake.url, "m", concurrency=4, **FAST)([f"q{i}" for i in range(8)], 0)
        assert time.perf_counter() - t0 < 2.0
        assert len(fake.requests) <= 4  # no new request after the failure


def test_error_status_names_url_and_status():
    with FakeEngine(lambda p: "ok") as fake:
        fake.script = [(400, {"error": {"message": "max_tokens is too large"}})]
        with pytest.raises(EngineError, match=r"/v1/chat/completions: HTTP 400 .*max_tokens is too large"):
            make_engine_responder(fake.url, "m", concurrency=1, **FAST)(["q"], 0)
        assert len(fake.requests) == 1  # a client error is not retried
        fake.script = [(500, b"boom")] * 3  # retried, then reported
        with pytest.raises(EngineError, match="HTTP 500.*boom"):
            make_engine_responder(fake.url, "m", concurrency=1, **FAST)(["q"], 0)


def test_timeout():
    with FakeEngine(lambda p: "late") as fake:
        fake.script = [("sleep", 1.0), ("sleep", 1.0)]
        t0 = time.perf_counter()
        with pytest.raises(EngineError, match=r"127\.0\.0\.1.*no answer within 0.2 s \(2 attempts\)"):
            make_engine_responder(fake.url, "m", max_new_tokens=8, timeout=0.2, retries=1, backoff=0.01)(["q"], 0)
        assert time.perf_counter() - t0 < 1.5


def test_malformed_bodies():
    with FakeEngine(lambda p: "ok") as fake:
        respond = make_engine_responder(fake.url, "m", concurrency=1, **FAST)
        fake.script = [(200, b"<html>gateway</html>")]
        with pytest.raises(EngineError, match="malformed response, not JSON.*gateway"):
            respond(["q"], 0)
        fake.script = [(200, {"object": "chat.completion", "choices": []})]
        with pytest.raises(EngineError, match=r"malformed response, expected choices\[0\]\.message\.content"):
            respond(["q"], 0)
        fake.script = [(200, {"choices": [{"message": {"role": "assistant", "content": None}}]})]
        with pytest.raises(EngineError, match="reasoning-parser"):
            respond(["q"], 0)
        # an error body under status 200 (some proxies): the server's message, not "malformed"
        fake.script = [(200, {"object": "error", "message": "maximum context length is 4096 tokens", "code": 400})]
        with pytest.raises(EngineError, match=r"completions: the server answered with an error: maximum context"):
            respond(["q"], 0)
        fake.script = [(200, {"error": {"message": "model overloaded", "type": "server_error"}})]
        with pytest.raises(EngineError, match=r"answered with an error: model overloaded"):
            respond(["q"], 0)
        assert len(fake.requests) == 5  # none retried
        # a lone surrogate (valid JSON, not valid text) becomes U+FFFD instead of failing every later write
        fake.script = [(200, b'{"choices": [{"message": {"content": "ok \\ud800 \\ud83d\\ude00"}}]}')]
        assert respond(["q"], 0) == ["ok \ufffd \U0001F600"]


def test_unreachable_and_model_check():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(EngineError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions: unreachable"):
        make_engine_responder(url, "m", max_new_tokens=8, retries=1, backoff=0.01)(["q"], 0)
    with pytest.raises(EngineError, match="unreachable"):
        check_engine(url, "m")
    with pytest.raises(ValueError, match="retries must be >= 0"):
        make_engine_responder(url, "m", max_new_tokens=8, retries=-1)
    with FakeEngine(lambda p: "ok", models=["sara-sw"]) as fake:
        with pytest.raises(EngineError, match=r"/models: HTTP 404 Not Found.*does the URL end in /v1\?"):
            check_engine(fake.url[:-len("/v1")], "sara-sw")
        assert served_models(fake.url) == ["sara-sw"]
        check_engine(fake.url, "sara-sw")
        with pytest.raises(EngineError, match=r"model 'qwen' is not served; the server lists \['sara-sw'\]"):
            check_engine(fake.url, "qwen")


def test_api_key_from_the_environment(monkeypatch):
    """A server started with --api-key: OPENAI_API_KEY is sent by every call, check_engine included."""
    with FakeEngine(lambda p: "ok", api_key="sk-test") as fake:
        with pytest.raises(EngineError, match="HTTP 401"):
            check_engine(fake.url, "m")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        check_engine(fake.url, "m")
        assert make_engine_responder(fake.url, "m", **FAST)(["q"], 0) == ["ok"]


def test_same_records_as_builtin_generator():
    """The server returns what the built-in generator produced for each prompt: eval's records (prompts,
    scoring, order, format) are then identical, so table and compare work on either path."""
    tok = load_tokenizer(ROOT / "data" / "udhr" / "bpe.tiktoken")
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(vocab_size=tok.vocab_size, hidden_size=32, n_layers=2, n_heads=2,
                                     n_kv_heads=1, intermediate_size=64, n_experts=4, top_k=2,
                                     moe_intermediate_size=32, max_position_embeddings=512)).eval()
    items, _ = load_benchmark("global_mmlu", ROOT / "tests" / "fixtures" / "global_mmlu", "sw")
    builtin = make_generative_responder(model, tok, max_new_tokens=6, temperature=0.1, seed=0)
    kw = dict(benchmark="global_mmlu", protocol="generative", runs=2)
    want = run_benchmark({"sw": items}, builtin, **kw)
    prompts = [build_prompt(it, TEMPLATES["global_mmlu"]) for it in items]
    table = {(p, run): builtin(prompts, run)[i] for run in range(2) for i, p in enumerate(prompts)}
    with FakeEngine(lambda payload: table[(user_text(payload), payload["seed"])]) as fake:
        engine = make_engine_responder(fake.url, "m", max_new_tokens=6, seed=0, concurrency=4)
        got = run_benchmark({"sw": items}, engine, **kw)
    assert json.dumps(got) == json.dumps(want)
    assert len({r["output"] for r in got}) > 1  # real, varied completions, not one constant


def test_eval_bench_cli_same_outputs_through_an_engine(tmp_path):
    """`eval.py bench` end to end: on a tiny checkpoint, then with --engine-url against a server that returns
    the checkpoint's own completions. predictions.jsonl and table.csv are byte-identical."""
    import shutil
    import eval as E
    from checkpoint import save_hf
    tok_path = ROOT / "data" / "udhr" / "bpe.tiktoken"
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(vocab_size=4096, hidden_size=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                     intermediate_size=64, n_experts=4, top_k=2, moe_intermediate_size=32,
                                     qk_norm=True, max_position_embeddings=512))
    save_hf(model, tmp_path / "hf")
    shutil.copy(tok_path, tmp_path / "hf")
    data = ROOT / "tests" / "fixtures" / "global_mmlu"
    common = ["bench", "--benchmark", "global_mmlu", "--data", str(data), "--langs", "sw,hi", "--runs", "2",
              "--max-new-tokens", "6"]
    E.main(common + ["--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "a")])
    by_prompt = {}
    for lang in ("sw", "hi"):
        items, _ = load_benchmark("global_mmlu", data, lang)
        for it in items:
            by_prompt[build_prompt(it, TEMPLATES["global_mmlu"])] = (lang, it["id"])
    outputs = {}
    for line in (tmp_path / "a" / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        outputs[(r["lang"], r["id"], r["run"])] = r["output"]
    with FakeEngine(lambda p: outputs[(*by_prompt[user_text(p)], p["seed"])], models=["tiny"]) as fake:
        E.main(common + ["--engine-url", fake.url, "--engine-model", "tiny", "--out", str(tmp_path / "b")])
    for name in ("predictions.jsonl", "table.csv"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()


# fields transformers serve 5.x takes on /v1/chat/completions (a subset: those this client could send)
STRICT = ("model", "messages", "max_tokens", "temperature", "top_p", "n", "seed", "stream", "generation_config",
          "chat_template_kwargs")


def test_strict_server_gets_the_sampling_as_a_generation_config():
    """A server that refuses top_k (transformers serve: HTTP 422 "Unexpected fields") is sent the same sampling
    as a whole generation config, so the checkpoint's generation_config.json (top_k=20, ...) cannot apply;
    the way is found once and kept. A server that refuses both ways is an error, never silently its defaults."""
    with FakeEngine(lambda p: "ok", accepts=STRICT) as fake:
        respond = make_engine_responder(fake.url, "m", temperature=0.7, top_p=0.9, concurrency=1, **FAST)
        assert respond(["a", "b"], 0) == ["ok", "ok"]
        assert "top_k" in fake.requests[0] and len(fake.requests) == 3  # refused once, then the second way
        config = json.loads(fake.requests[1]["generation_config"])
        assert config["do_sample"] is True and config["temperature"] == 0.7 and config["top_p"] == 0.9
        assert config["top_k"] == 0 and config["repetition_penalty"] == 1.0 and config["min_p"] == 0.0
        assert fake.requests[1]["chat_template_kwargs"] == {"enable_thinking": False}
        fake.requests.clear()
        make_engine_responder(fake.url, "m", temperature=0, concurrency=1, **FAST)(["a"], 0)
        assert json.loads(fake.requests[-1]["generation_config"])["do_sample"] is False
    with FakeEngine(lambda p: "ok", accepts=[f for f in STRICT if f != "generation_config"]) as fake:
        with pytest.raises(EngineError, match=r"refuses both ways of setting the sampling.*fields: HTTP 422.*"
                                              r"generation_config: HTTP 422"):
            make_engine_responder(fake.url, "m", concurrency=2, **FAST)(["a", "b", "c"], 0)


def test_credentials_in_the_url_are_refused_unechoed():
    for url in ("http://user:s3cret@127.0.0.1:1/v1", "http://s3cret@127.0.0.1:1/v1"):
        for call in (lambda: check_engine(url, "m"), lambda: make_engine_responder(url, "m", max_new_tokens=8)):
            with pytest.raises(EngineError, match="credentials .* refused.*OPENAI_API_KEY") as e:
                call()
            assert "s3cret" not in str(e.value)
    for url in ("localhost:8000/v1", "http://127.0.0.1:x/v1", "http://h:1/v1?key=s3cret"):
        with pytest.raises(EngineError) as e:
            check_engine(url, "m")
        assert "s3cret" not in str(e.value)


@pytest.mark.parametrize("kw, message", [
    (dict(timeout=float("inf")), r"timeout must be > 0 seconds \(a finite number\), got inf"),
    (dict(timeout=float("nan")), "timeout must be > 0 seconds"),
    (dict(timeout=0), "timeout must be > 0 seconds"),
    (dict(timeout=-5.0), "timeout must be > 0 seconds"),
    (dict(retries=1.5), r"retries must be >= 0 \(an integer\), got 1.5"),
    (dict(concurrency=0), "concurrency must be >= 1"),
    (dict(temperature=-1.0), "temperature=-1.0: must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
    (dict(temperature=float("nan")), "temperature=nan"),
])
def test_bad_settings_fail_before_any_request(kw, message):
    with pytest.raises(EngineError, match=message) as e:
        make_engine_responder("http://127.0.0.1:1/v1", "m", max_new_tokens=8, **kw)
    assert isinstance(e.value, ValueError)  # EngineSettingsError: one type to catch, still a ValueError


def test_messages_are_one_line():
    with FakeEngine(lambda p: "ok") as fake:
        fake.script = [(400, b"Traceback (most recent call last):\n  File x\nValueError: bad\n")]
        with pytest.raises(EngineError) as e:
            make_engine_responder(fake.url, "m", concurrency=1, **FAST)(["q"], 0)
    assert "\n" not in str(e.value) and "ValueError: bad" in str(e.value) and e.value.status == 400


def test_model_missing_from_the_listing_is_asked_directly(monkeypatch):
    """transformers serve lists its download cache at /models (500 when there is none), not the directory it
    serves: check_engine then asks the model for one token."""
    def listing_fails(*a, **k):
        raise EngineError("x/models: HTTP 500", 500)
    with FakeEngine(lambda p: "ok", models=["/models/toy"]) as fake:
        monkeypatch.setattr(engine, "served_models", listing_fails)
        check_engine(fake.url, "/models/toy")
        with pytest.raises(EngineError, match="does not exist"):
            check_engine(fake.url, "other")
        monkeypatch.setattr(engine, "served_models", lambda *a, **k: ["cached/model"])
        check_engine(fake.url, "/models/toy")
        with pytest.raises(EngineError, match=r"model 'other' is not served; the server lists \['cached/model'\]"):
            check_engine(fake.url, "other")


def test_redirects_are_not_followed():
    """urllib would follow a 307 and send the API key on to wherever the server points."""
    with FakeEngine(lambda p: "ok") as elsewhere, FakeEngine(lambda p: "ok") as fake:
        fake.script = [(307, b"", {"Location": elsewhere.url + "/chat/completions"})]
        with pytest.raises(EngineError, match=r"HTTP 307 .*redirects, which is not followed"):
            make_engine_responder(fake.url, "m", concurrency=1, **FAST)(["q"], 0)
        assert elsewhere.requests == []


def test_empty_system_prompt_is_sent_as_the_builtin_writes_it(tok):
    """--system "": the built-in generator writes an (empty) system turn; the server must be sent one too."""
    assert tok.encode_chat("q", None, system="")[0] != tok.encode_chat("q", None)[0]
    with FakeEngine(lambda p: "ok") as fake:
        make_engine_responder(fake.url, "m", system="", concurrency=1, **FAST)(["q"], 0)
    assert fake.requests[0]["messages"] == [{"role": "system", "content": ""}, {"role": "user", "content": "q"}]
