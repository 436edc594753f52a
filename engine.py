"""
A client for an OpenAI-compatible chat-completions server (vLLM, SGLang, ...), shaped like the built-in
generator so that evaluation and stage 1 can hand their generations to a serving engine:

    respond = make_engine_responder("http://localhost:8000/v1", "sara", max_new_tokens=1024,
                                    concurrency=64, timeout=600, retries=3, seed=0)
    texts = respond(prompts, run)   # prompts in, completions out, same order, seed + run per request

The built-in generator (eval's make_generative_responder) stays the reference; this client sends the same
user prompt (the server applies the checkpoint's chat template), the same sampling settings (temperature,
top-p, max new tokens, seed + run), and returns plain completion texts, so scoring and every later table
are identical in format. Two server-side defaults would silently change the sampling; the request
overrides both by default (extra_body, see DEFAULT_EXTRA_BODY):
- top_k: vLLM and SGLang apply the checkpoint's generation_config.json (Qwen3's sets top_k=20); the
  built-in generator has no top-k, so the request sends top_k=-1 (= off in both engines).
- thinking: the project's Qwen3 chat format has thinking disabled (an empty <think></think> block); the
  request sends chat_template_kwargs={"enable_thinking": false}. Templates without the flag ignore it.
A server that rejects these extra fields (e.g. the OpenAI API itself) needs extra_body={}.

Plain standard library (urllib + a thread pool), no dependency. Errors name the URL and say what went
wrong: unreachable, an HTTP error status (with the start of the server's message), a timeout, a body
that is not a chat completion, an error body sent with status 200. Connection failures, timeouts and
statuses 408/429/5xx are retried `retries` times with exponential backoff (backoff * 2**attempt seconds,
or the server's Retry-After when it sends one, capped at MAX_RETRY_AFTER); other statuses and malformed
bodies fail at once (retrying would give the same answer). The first failure stops the whole call at
once (no new request starts; those in flight are not waited for): no partial list is ever returned. The API key (a server started with --api-key) defaults to the
OPENAI_API_KEY environment variable, as in OpenAI's own client.
"""
import email.utils
import http.client
import json
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.request

DEFAULT_EXTRA_BODY = {"top_k": -1, "chat_template_kwargs": {"enable_thinking": False}}
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
MAX_RETRY_AFTER = 120.0  # seconds: a Retry-After beyond this is a server to give up on, not to wait for


class EngineError(RuntimeError):
    """The server could not be used: the message names the URL and what went wrong."""


def _request(url, payload=None, *, timeout, api_key=None):
    """One HTTP request (POST with a JSON payload, GET without) -> the decoded JSON body.
    Raises urllib's errors unchanged (the caller decides about retries) and EngineError for a
    body that is not JSON."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    req.add_header("Content-Type", "application/json")
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EngineError(f"{url}: malformed response, not JSON: {body[:300]!r}") from None


def _http_error(url, e):
    try:
        detail = e.read().decode("utf-8", "replace")[:500]
    except Exception:  # the error body itself may be unreadable; the status is what matters
        detail = ""
    hint = " (does the URL end in /v1?)" if e.code == 404 else ""
    return EngineError(f"{url}: HTTP {e.code} {e.reason}: {detail}".rstrip(": ") + hint)


def _retry_after(value):
    """A Retry-After header (seconds, or an HTTP date) -> seconds to wait (at most MAX_RETRY_AFTER), or None."""
    if not value:
        return None
    try:
        wait = float(value)
    except ValueError:
        try:
            wait = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(wait, 0.0), MAX_RETRY_AFTER)


def _with_retries(url, call, *, retries, backoff, timeout):
    """call() with retries on connection failures, timeouts and RETRY_STATUSES."""
    for attempt in range(retries + 1):
        wait = backoff * 2 ** attempt
        try:
            return call()
        except urllib.error.HTTPError as e:  # a subclass of URLError: handled first
            if e.code not in RETRY_STATUSES or attempt == retries:
                raise _http_error(url, e) from None
            wait = _retry_after(e.headers.get("Retry-After")) or wait
        except (TimeoutError, socket.timeout) as e:
            if attempt == retries:
                raise EngineError(f"{url}: no answer within {timeout} s ({retries + 1} attempts)") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                if attempt == retries:
                    raise EngineError(f"{url}: no answer within {timeout} s ({retries + 1} attempts)") from e
            elif isinstance(e.reason, ConnectionResetError):  # reached, then dropped: not "is it running?"
                if attempt == retries:
                    raise EngineError(f"{url}: connection failed ({e.reason}) after {retries + 1} attempts") from e
            elif attempt == retries:
                raise EngineError(f"{url}: unreachable ({e.reason}) after {retries + 1} attempts; is the "
                                  "server running and the URL right (it ends in /v1)?") from e
        except (ConnectionError, http.client.HTTPException) as e:  # reset, or a body cut short
            if attempt == retries:
                raise EngineError(f"{url}: connection failed ({e}) after {retries + 1} attempts") from e
        time.sleep(wait)


def served_models(base_url, *, timeout=10.0, retries=0, api_key=None):
    """-> the model names the server lists at GET {base_url}/models (EngineError if it cannot)."""
    url = base_url.rstrip("/") + "/models"
    body = _with_retries(url, lambda: _request(url, timeout=timeout, api_key=api_key),
                         retries=retries, backoff=0.5, timeout=timeout)
    try:
        return [m["id"] for m in body["data"]]
    except (KeyError, TypeError):
        raise EngineError(f"{url}: malformed response, expected {{'data': [{{'id': ...}}]}}: "
                          f"{str(body)[:300]}") from None


def check_engine(base_url, model, *, timeout=10.0, api_key=None):
    """Fail early, before any work: the server answers and serves `model`."""
    names = served_models(base_url, timeout=timeout, api_key=api_key)
    if model not in names:
        raise EngineError(f"{base_url}: model {model!r} is not served; the server lists {names} "
                          "(pass one of them, e.g. the name given to vllm serve --served-model-name)")


def chat_completion(base_url, model, prompt, *, max_new_tokens, temperature, top_p, seed=None,
                    system=None, extra_body=DEFAULT_EXTRA_BODY, timeout=600.0, retries=3, backoff=1.0,
                    api_key=None):
    """One user prompt -> the assistant's completion text (choices[0].message.content)."""
    url = base_url.rstrip("/") + "/chat/completions"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    payload = dict(model=model, messages=messages, max_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, n=1, **(extra_body or {}))
    if seed is not None:
        payload["seed"] = seed
    body = _with_retries(url, lambda: _request(url, payload, timeout=timeout, api_key=api_key),
                         retries=retries, backoff=backoff, timeout=timeout)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(body, dict) and (error or body.get("object") == "error"):  # some proxies send errors as 200
        message = (error.get("message") if isinstance(error, dict) else error) or body.get("message") or body
        raise EngineError(f"{url}: the server answered with an error: {str(message)[:500]}")
    try:
        text = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EngineError(f"{url}: malformed response, expected choices[0].message.content: "
                          f"{str(body)[:300]}") from None
    if not isinstance(text, str):
        raise EngineError(f"{url}: choices[0].message.content is {text!r}, not text (a server started with "
                          "a --reasoning-parser moves the text elsewhere; serve without one)")
    # JSON may carry a lone surrogate ("\ud800"), which no UTF-8 file can hold: U+FFFD instead
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def make_engine_responder(base_url, model, *, max_new_tokens, temperature=0.1, top_p=1.0, seed=None,
                          concurrency=16, timeout=600.0, retries=3, system=None,
                          extra_body=DEFAULT_EXTRA_BODY, backoff=1.0, api_key=None):
    """-> respond(prompts, run) -> list of completion texts in prompt order: the same call as eval's
    make_generative_responder. `concurrency` requests are in flight at once (the engine batches them);
    request i of run r carries seed + r when seed is given (engines seed each request on its own).
    NOTE: with temperature > 0, an engine's samples are reproducible only on the same server build and
    batch composition; with temperature 0 (greedy) they match the built-in generator up to numerics."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if retries < 0:  # range(retries + 1) would be empty: no request at all
        raise ValueError(f"retries must be >= 0, got {retries}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")

    def one(prompt, run):
        return chat_completion(base_url, model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=None if seed is None else seed + run, system=system,
                               extra_body=extra_body, timeout=timeout, retries=retries, backoff=backoff,
                               api_key=api_key)

    def respond(prompts, run):
        # daemon worker threads, not a ThreadPoolExecutor: its workers are joined at exit, so Ctrl-C or a
        # failed request would wait for every request in flight (up to timeout x attempts each)
        results, errors, left = [None] * len(prompts), [], [len(prompts)]
        todo, lock, done = queue.SimpleQueue(), threading.Lock(), threading.Event()
        for i in range(len(prompts)):
            todo.put(i)

        def work():
            while not done.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    results[i] = one(prompts[i], run)
                except Exception as e:  # the first failure ends the call; no new requests start
                    errors.append(e)
                    done.set()
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        if prompts:
            for _ in range(min(concurrency, len(prompts))):
                threading.Thread(target=work, daemon=True).start()
            done.wait()
        if errors:
            raise errors[0]
        return results
    return respond
