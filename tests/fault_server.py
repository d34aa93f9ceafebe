"""A tiny OpenAI-compatible chat-completions server that injects faults, for the tests.

A marker word in the prompt picks the behaviour; ``transient`` faults hit only the first
``FAILURES`` requests carrying that marker, ``always`` faults hit every one:
- RATE429 (transient): 429 with Retry-After: 1        - RATE429BARE (transient): 429, no header
- ERR500 (transient): 500                               - HANG (transient): no answer for 30 s
- DROP (transient): connection closed without a reply   - ALWAYS429 (always): 429
- BADBODY (always): a 200 whose body is not JSON        - OFFSCHEMA (always): JSON off the schema
While ``outage_until`` (a time.monotonic() value) lies ahead, every request gets a 503, and so
do the next ``outage_requests`` requests.
Otherwise it answers with a valid instance of the request's JSON schema. A server made with
``json_schema=False`` refuses ``response_format: json_schema`` with a 400, like servers without
structured outputs, and answers JSON-mode requests from the schema given in the prompt.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.fake_engine import instance

FAILURES = 2
TRANSIENT = ("RATE429BARE", "RATE429", "ERR500", "HANG", "DROP")
ALWAYS = ("ALWAYS429", "BADBODY", "OFFSCHEMA")


class FaultServer:
    def __init__(self, json_schema: bool = True):
        self.json_schema = json_schema
        self.hits: Counter[str] = Counter()
        self.outage_until = 0.0  # time.monotonic() before which every request gets a 503
        self.outage_requests = 0  # the next this many requests get a 503
        self.lock = threading.Lock()
        self.last_request = time.monotonic()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()

    def wait_quiet(self, seconds: float = 2.0, timeout: float = 60.0) -> None:
        """Wait until no request came for ``seconds``: the engines of a stopped run have let go."""
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last_request < seconds:
            assert time.monotonic() < deadline, f"the server still gets requests after {timeout:g} s"
            time.sleep(0.2)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if body["response_format"]["type"] == "json_schema" and not server.json_schema:
                    with server.lock:
                        server.hits["REFUSED_SCHEMA"] += 1
                    message = "response_format json_schema is not supported by this server"
                    return self.reply(400, {"error": {"message": message, "type": "invalid_request_error"}})
                with server.lock:
                    server.last_request = time.monotonic()
                    down = time.monotonic() < server.outage_until or server.outage_requests > 0
                    server.outage_requests = max(0, server.outage_requests - 1)
                    server.hits["OUTAGE"] += down
                if down:
                    return self.reply(503, {"error": {"message": "service unavailable", "type": "overloaded"}})
                prompt = body["messages"][-1]["content"]
                marker = next((m for m in TRANSIENT + ALWAYS if m in prompt), None)
                with server.lock:
                    server.hits[marker] += 1
                    count = server.hits[marker]
                if marker in ALWAYS or (marker in TRANSIENT and count <= FAILURES):
                    return self.fault(marker, body)
                self.reply(200, completion(body, json.dumps(reply_for(body))))

            def fault(self, marker, body):
                if marker in ("RATE429", "RATE429BARE", "ALWAYS429"):
                    headers = {"Retry-After": "1"} if marker == "RATE429" else {}
                    return self.reply(429, {"error": {"message": "slow down", "type": "rate_limit"}}, headers)
                if marker == "ERR500":
                    return self.reply(500, {"error": {"message": "boom"}})
                if marker == "HANG":
                    time.sleep(30)
                    return None
                if marker == "DROP":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                if marker == "BADBODY":
                    return self.reply(200, b"<html>gateway error</html>")
                return self.reply(200, completion(body, json.dumps({"unexpected": "shape"})))

            def reply(self, status, payload, headers=None):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler


def reply_for(body: dict) -> object:
    if body["response_format"]["type"] == "json_schema":
        schema = body["response_format"]["json_schema"]["schema"]
    else:  # JSON mode: the engine put the schema into its system message
        system = body["messages"][0]["content"]
        schema = json.loads(system[system.index("{"):])
    return instance(schema, random.Random(body.get("seed", 0)))


def completion(body: dict, content: str) -> dict:
    prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content) // 4,
                  "total_tokens": prompt_tokens + len(content) // 4},
    }
