"""
A client for an OpenAI-compatible chat-completions server (vLLM, SGLang, transformers serve, ...), shaped like
the built-in generator so that evaluation and stage 1 can hand their generations to a serving engine:

    respond = make_engine_responder("http://localhost:8000/v1", "sara", max_new_tokens=1024,
                                    concurrency=64, timeout=300, retries=2, seed=0)
    texts = respond(prompts, run)   # prompts in, completions out, same order, seed + run per request

The built-in generator (evaluation/generate.py make_generative_responder) stays the reference; this client
sends the same user prompt (the server applies the checkpoint's chat template), the same sampling settings
(temperature, top-p, max new tokens, seed + run), and returns plain completion texts, so scoring and every
later table are identical in format.

The sampling is the one asked for, not the server's: servers take sampling defaults from the checkpoint's
generation_config.json (Qwen3's sets temperature 0.6, top_k=20, top_p 0.95), and the built-in generator has
no top-k, min-p or repetition penalty. Each request therefore turns those off, in the first of two ways
(SAMPLING_WAYS) the server accepts:
- "fields" (vLLM, SGLang): top_k=-1, min_p=0, repetition_penalty=1 as request fields (vLLM uses a request
  field over its generation_config default, field by field);
- "generation_config" (transformers serve, which answers 422 "Unexpected fields" to the first way): a
  whole generation config as a JSON string, replacing the checkpoint's (its stop ids still come from it).
A server that refuses both stops the run with an EngineError (it would sample with its own defaults).
Both ways also send chat_template_kwargs={"enable_thinking": false}: the project's Qwen3 chat format has
thinking disabled; templates without the flag ignore it. `extra_body` (Python only) replaces all of this
with fixed fields, e.g. extra_body={} for the OpenAI API, which has no checkpoint defaults to turn off.

Errors: every failure is an EngineError (settings too: EngineSettingsError, also a ValueError) with a
one-line message that names the URL and what went wrong: unreachable, an HTTP error status (with the start
of the server's message), a timeout, a body that is not a chat completion, an error body sent with status
200. Connection failures, timeouts and statuses 408/429/5xx are retried `retries` times with exponential
backoff (backoff * 2**attempt seconds, or the server's Retry-After when it sends one, capped at
MAX_RETRY_AFTER); other statuses and malformed bodies fail at once (retrying would give the same answer).
The first failure stops the whole call at once (no new request starts; those in flight are not waited
for): no partial list is ever returned. Defaults: timeout 300 s per attempt, 2 retries, so a server that
never answers is given up after about 15 minutes (a non-streamed 2048-token answer from a loaded server
can take minutes; pass less for a quick check). A URL with credentials (user:password@host) is refused
without being echoed: the API key (a server started with --api-key) comes from the OPENAI_API_KEY
environment variable, as in OpenAI's own client, and is never printed or written.
"""
import email.utils
import http.client
import json
import math
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

THINKING_OFF = {"chat_template_kwargs": {"enable_thinking": False}}
SAMPLING_WAYS = ("fields", "generation_config")
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
MAX_RETRY_AFTER = 120.0  # seconds: a Retry-After beyond this is a server to give up on, not to wait for
DEFAULT_TIMEOUT, DEFAULT_RETRIES = 300.0, 2


class EngineError(RuntimeError):
    """The server could not be used: a one-line message naming the URL and what went wrong. `status`: the
    HTTP status when the server answered with one, `detail`: the start of its message."""

    def __init__(self, message, status=None, detail=""):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the server sent
        self.status, self.detail = status, detail


class EngineSettingsError(EngineError, ValueError):
    """A client setting that cannot work (timeout, retries, concurrency, URL)."""


def settings_problems(timeout, retries, concurrency=1, names=("timeout", "retries", "concurrency")):
    """The one check of the client's settings (stage1.py's and eval.py's flags): -> ["flag must be ..., got
    value"] (empty: valid). `names` are the caller's spellings of the three."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
    problems = []
    if not (number(timeout) and math.isfinite(timeout) and timeout > 0):
        problems.append(f"{names[0]} must be > 0 seconds (a finite number), got {timeout!r}")
    if not (integer(retries) and retries >= 0):
        problems.append(f"{names[1]} must be >= 0 (an integer), got {retries!r}")
    if not (integer(concurrency) and concurrency >= 1):
        problems.append(f"{names[2]} must be >= 1 (an integer), got {concurrency!r}")
    return problems


def check_url(url, flag="engine URL"):
    """An http(s) base URL without credentials, query or fragment. The message never repeats the URL: it may
    hold a password, which would then be in a terminal's scrollback and in CI logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number
    except ValueError:
        raise EngineSettingsError(f"{flag}: not a URL (expected e.g. http://localhost:8000/v1)") from None
    if parts.username is not None or parts.password is not None:
        raise EngineSettingsError(f"{flag}: a URL with credentials (user:password@host) is refused, since "
                                  "messages and run.json show the URL; start the server with --api-key and "
                                  "set OPENAI_API_KEY instead")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EngineSettingsError(f"{flag}: expected http://host:port/v1 (e.g. http://localhost:8000/v1)")
    if parts.query or parts.fragment:
        raise EngineSettingsError(f"{flag}: a base URL has no ?query or #fragment (e.g. http://localhost:8000/v1)")
    del port


def sampling_fields(way, temperature, top_p):
    """The request fields that make the server sample with temperature and top_p and nothing else."""
    if way == "fields":
        return {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, **THINKING_OFF}
    # transformers serve: GenerationConfig(**this) replaces the checkpoint's (unset values, None, are still
    # filled from it: hence every sampling knob is set, to its off value); temperature/top_p are applied
    # from the request fields afterwards, temperature 0 = greedy
    config = dict(do_sample=temperature > 0, top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
                  eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1)
    if temperature > 0:
        config.update(temperature=temperature, top_p=top_p)
    return {"generation_config": json.dumps(config), **THINKING_OFF}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an HTTPError, not followed: urllib would send the Authorization header (the API key) on
    to wherever the server points, and turn a POST into a GET."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


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
    with _OPENER.open(req, timeout=timeout) as resp:
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
    hint = (" (does the URL end in /v1?)" if e.code == 404 else
            " (the server redirects, which is not followed: pass the URL it redirects to)" if 300 <= e.code < 400
            else "")
    return EngineError(f"{url}: HTTP {e.code} {e.reason}: {detail}".rstrip(": ") + hint, e.code, detail)


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
    check_url(base_url)
    url = base_url.rstrip("/") + "/models"
    body = _with_retries(url, lambda: _request(url, timeout=timeout, api_key=api_key),
                         retries=retries, backoff=0.5, timeout=timeout)
    try:
        return [m["id"] for m in body["data"]]
    except (KeyError, TypeError):
        raise EngineError(f"{url}: malformed response, expected {{'data': [{{'id': ...}}]}}: "
                          f"{str(body)[:300]}") from None


def check_engine(base_url, model, *, timeout=10.0, api_key=None):
    """Fail early, before any work: the server answers and serves `model`. A model the listing lacks is
    asked for one token: transformers serve lists its download cache at /models (or fails with 500 when
    there is none), not the directory it serves, whose name is the path it was started with."""
    names = None
    try:
        names = served_models(base_url, timeout=timeout, api_key=api_key)
    except EngineError as e:
        if e.status is None or e.status < 500:  # unreachable, wrong URL (404), key (401): a probe says no more
            raise
    if names is not None and model in names:
        return
    try:
        chat_completion(base_url, model, "Hi", max_new_tokens=1, temperature=0.0, top_p=1.0, extra_body={},
                        timeout=timeout, retries=0)
    except EngineError as e:
        if names is None or e.status is None:
            raise
        raise EngineError(f"{base_url}: model {model!r} is not served; the server lists {names} (pass one of "
                          "them, e.g. the name given to vllm serve --served-model-name; transformers serve: "
                          f"the path it was started with); it said: {e.detail[:200]}") from None


def chat_completion(base_url, model, prompt, *, max_new_tokens, temperature, top_p, seed=None,
                    system=None, extra_body=None, timeout=DEFAULT_TIMEOUT, retries=DEFAULT_RETRIES, backoff=1.0,
                    api_key=None):
    """One user prompt -> the assistant's completion text (choices[0].message.content). extra_body: the
    fields added to the request (default: sampling_fields(SAMPLING_WAYS[0], ...))."""
    check_url(base_url)
    url = base_url.rstrip("/") + "/chat/completions"
    if extra_body is None:
        extra_body = sampling_fields(SAMPLING_WAYS[0], temperature, top_p)
    # system="" is a system turn with no text, as the built-in generator (encode_chat) writes it
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    payload = dict(model=model, messages=messages, max_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, n=1, **extra_body)
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


def _refuses(error, fields):
    """Whether an HTTP error is the server refusing one of these request fields (422 Unexpected fields,
    400 Unrecognized request argument, ...)."""
    return error.status in (400, 422) and any(f in error.detail for f in fields if f != "chat_template_kwargs")


def make_engine_responder(base_url, model, *, max_new_tokens, temperature=0.1, top_p=1.0, seed=None,
                          concurrency=16, timeout=DEFAULT_TIMEOUT, retries=DEFAULT_RETRIES, system=None,
                          extra_body=None, backoff=1.0, api_key=None):
    """-> respond(prompts, run) -> list of completion texts in prompt order: the same call as eval's
    make_generative_responder. `concurrency` requests are in flight at once (the engine batches them);
    request i of run r carries seed + r when seed is given (engines seed each request on its own).
    The way to fix the sampling (SAMPLING_WAYS) is found on the first requests and kept; extra_body, when
    given, is sent as is instead.
    NOTE: with temperature > 0, an engine's samples are reproducible only on the same server build and
    batch composition; with temperature 0 (greedy) they match the built-in generator up to numerics."""
    check_url(base_url)
    from model import sampling_problems  # (model.py imports nothing of ours that imports engine)
    problems = settings_problems(timeout, retries, concurrency) + sampling_problems(temperature, top_p, max_new_tokens)
    if problems:
        raise EngineSettingsError("; ".join(problems))
    refused = {}  # way -> the EngineError with which the server refused it

    def one(prompt, run):
        ways = [None] if extra_body is not None else SAMPLING_WAYS
        for way in ways:
            if way in refused:
                continue
            fields = extra_body if way is None else sampling_fields(way, temperature, top_p)
            try:
                return chat_completion(base_url, model, prompt, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, seed=None if seed is None else seed + run,
                                       system=system, extra_body=fields, timeout=timeout, retries=retries,
                                       backoff=backoff, api_key=api_key)
            except EngineError as e:
                if way is None or not _refuses(e, fields):
                    raise
                refused[way] = e
        raise EngineError(f"{base_url}: the server refuses both ways of setting the sampling to the one asked "
                          "for, so it would sample with its own defaults (e.g. the checkpoint's "
                          "generation_config.json): " + " | ".join(f"{w}: HTTP {e.status} {e.detail[:150]}"
                                                                   for w, e in refused.items())
                          + "; serve the model with vLLM, SGLang or transformers serve")

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
