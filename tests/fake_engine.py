"""A stand-in for a serving engine's OpenAI-compatible protocol, on 127.0.0.1 (tests only): GET /v1/models
and POST /v1/chat/completions. `reply(payload) -> text` answers each request; `script` (a list, consumed
in order) can first answer with (status, body) or (status, body, headers) or ("sleep", seconds) to play
failures; `api_key`, when set, is required as "Authorization: Bearer <key>" (else 401). A request for a
model not in `models` gets vLLM's 404. `accepts`, when set, are the only request fields taken, as a strict
server (transformers serve) does: any other field gets its HTTP 422 "Unexpected fields in the request"."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
            return self._send(404, {"object": "error", "message": f"The model `{payload.get('model')}` does not exist."})
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
    def __init__(self, reply, models=("m",), api_key=None, accepts=None):
        self.reply, self.models, self.script, self.requests = reply, list(models), [], []
        self.api_key, self.accepts = api_key, accepts
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
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
