"""A stand-in for a serving engine's OpenAI-compatible protocol, on 127.0.0.1 (tests, and the stage-1 demo):
GET /v1/models and POST /v1/chat/completions. `reply(payload) -> text` answers each request; `script` (a list, consumed
in order) can first answer with (status, body) or (status, body, headers) or ("sleep", seconds) to play
failures; `api_key`, when set, is required as "Authorization: Bearer <key>" (else 401). A request for a
model not in `models` gets vLLM's 404. `accepts`, when set, are the only request fields taken, as a strict
server (transformers serve) does: any other field gets its HTTP 422 "Unexpected fields in the request".

Also the offline demo route through stage 1 (docs/stage1.md): the toy has no model that can answer
questions, so `python tests/fake_engine.py --questions SPEC` serves a scripted stand-in "original model",
named "oracle": it answers each question of SPEC with its gold answer in \\boxed{}, and "translates" by
marking the text ("[Swahili] ..." with a -> á), which passes stage 1's checks for Latin-script languages.
Its output shows the pipeline's files and checks; it is not training data."""
import argparse
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that gave up on a slow reply (a timeout test) is expected: not worth a traceback."""
        import sys
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status, body, headers=None):
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _unauthorized(self):
        key = self.server.fake.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(401, {"error": {"message": "invalid api key"}})
            return True
        return False

    def do_GET(self):
        if self._unauthorized():
            return
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.fake.models]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        fake = self.server.fake
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self._unauthorized():
            return
        with fake.lock:
            fake.requests.append(payload)
        if fake.accepts is not None and set(payload) - set(fake.accepts):
            return self._send(422, {"detail": f"Unexpected fields in the request: {set(payload) - set(fake.accepts)}"})
        if payload.get("model") not in fake.models:
            message = f"The model `{payload.get('model')}` does not exist."
            return self._send(404, {"object": "error", "message": message})
        with fake.lock:
            step = fake.script.pop(0) if fake.script else None
        if step and step[0] == "sleep":
            time.sleep(step[1])
        elif step:
            return self._send(*step)
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": "not found"})
        text = fake.reply(payload)
        self._send(200, {"id": "x", "object": "chat.completion", "model": payload["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]})


class FakeEngine:
    def __init__(self, reply, models=("m",), api_key=None, accepts=None, port=0):
        self.reply, self.models, self.script, self.requests = reply, list(models), [], []
        self.api_key, self.accepts = api_key, accepts
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", port), _Handler)
        self.server.daemon_threads = True
        self.server.fake = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def oracle_reply(spec):
    """-> reply(payload) of the demo "original model" for the question files of spec (stage1 --questions)."""
    from data.questions import load_questions
    gold = {it["prompt"]: it["answer"] for it in load_questions(spec)}

    def reply(payload):
        text = payload["messages"][-1]["content"]
        asked = re.match(r"Translate the following text from .+? into (.+?)\. ", text)
        if asked:  # stage1.TRANSLATE_PROMPT: the text follows the first blank line
            return f"[{asked.group(1)}] " + text.split("\n\n", 1)[1].replace("a", "\u00e1")
        if text in gold:
            return f"A scripted answer (no model wrote this). The answer is \\boxed{{{gold[text]}}}."
        return "I do not know."
    return reply


def main(argv=None):
    p = argparse.ArgumentParser(description="The scripted demo 'original model' of docs/stage1.md, on 127.0.0.1")
    p.add_argument("--questions", required=True, help="the question files, as stage1.py build --questions")
    p.add_argument("--port", type=int, default=8011)
    args = p.parse_args(argv)
    with FakeEngine(oracle_reply(args.questions), models=["oracle"], port=args.port) as fake:
        print(f"serving the scripted demo model 'oracle' at {fake.url} (Ctrl-C stops)", flush=True)
        try:
            fake.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository's modules
    main()
