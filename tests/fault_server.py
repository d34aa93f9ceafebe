"""A tiny OpenAI-compatible chat-completions server that injects faults, for the tests.

A marker word in the prompt picks the behaviour; ``transient`` faults hit only the first
``FAILURES`` requests carrying that marker, ``always`` faults hit every one:
- RATE429 (transient): 429 with Retry-After: 1        - RATE429BARE (transient): 429, no header
- ERR500 (transient): 500                               - HANG (transient): no answer for 30 s
- DROP (transient): connection closed without a reply   - ALWAYS429 (always): 429
- BADBODY (transient): a 200 whose JSON body is cut     - OFFSCHEMA (always): JSON off the schema
- HTML200 (transient): a 200 text/html page (a proxy's 502 page)
- ERROR200 (transient): a 200 whose JSON body is an {"error": ...} (a gateway's upstream failure)
- NOCHOICES (transient): a 200 chat.completion with empty ``choices``
- NOMESSAGE (transient): a 200 whose choice has no ``message``
- NOCONTENT (transient): a 200 whose message has ``content: null`` (a content filter's refusal)
- BAD400 (always): a 400 about the request (not about the model)
- FORBIDDEN403 (always): a 403, as for a key that may not use the model
While ``outage_until`` (a time.monotonic() value) lies ahead, every request gets a 503, and so
do the next ``outage_requests`` requests.
Otherwise it answers with a valid instance of the request's JSON schema (drawn from the request's
``seed`` when it sends one). A server made with ``json_schema=False`` refuses
``response_format: json_schema`` with a 400, like servers without structured outputs, and answers
JSON-mode requests from the schema given in the prompt. With ``api_key``, a request carrying
another key gets a 401 whose message echoes its ``Authorization`` header (as some proxies do);
with ``models``, a request for another model gets ``unknown_model_status`` (404 as vLLM and
OpenAI answer, or 400 as some gateways do) naming it. ``hits["SEEDED"]`` counts requests that
carried a ``seed``. It serves /v1/chat/completions only: any other path gets a 404.
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
TRANSIENT = ("RATE429BARE", "RATE429", "ERR500", "HANG", "DROP", "BADBODY", "HTML200", "ERROR200",
             "NOCHOICES", "NOMESSAGE", "NOCONTENT")
ALWAYS = ("ALWAYS429", "OFFSCHEMA", "BAD400", "FORBIDDEN403")
PROXY_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


class FaultServer:
    def __init__(self, json_schema: bool = True, api_key: str | None = None, models: set[str] | None = None,
                 unknown_model_status: int = 404):
        self.json_schema = json_schema
        self.api_key = api_key
        self.models = models
        self.unknown_model_status = unknown_model_status
        self.replies = 0  # draws replies for requests that carry no seed
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
                if self.path != "/v1/chat/completions":  # an api_base without /v1, say
                    return self.reply(404, {"detail": "Not Found"})
                refused = self.refusal(body)
                if refused:
                    return self.reply(*refused)
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
                    server.hits["SEEDED"] += "seed" in body
                    count = server.hits[marker]
                    server.replies += 1
                    draw = body.get("seed", server.replies)
                if marker in ALWAYS or (marker in TRANSIENT and count <= FAILURES):
                    return self.fault(marker, body)
                self.reply(200, completion(body, json.dumps(reply_for(body, draw))))

            def refusal(self, body):
                """What a server answers a wrong key or an unknown model, before any work."""
                sent = self.headers.get("Authorization", "")
                if server.api_key is not None and sent != f"Bearer {server.api_key}":
                    with server.lock:
                        server.hits["UNAUTHORIZED"] += 1
                    message = f"Incorrect API key provided. Request headers: Authorization: {sent}"
                    return 401, {"error": {"message": message, "code": "invalid_api_key"}}
                if server.models is not None and body["model"] not in server.models:
                    with server.lock:
                        server.hits["UNKNOWN_MODEL"] += 1
                    if server.unknown_model_status == 404:
                        message = f"The model `{body['model']}` does not exist."
                    else:
                        message = f"Invalid model name passed in model={body['model']}"
                    return server.unknown_model_status, {"error": {"message": message}}
                return None

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
                    return self.reply(200, json.dumps(completion(body, "{}")).encode()[:40])
                if marker == "HTML200":
                    return self.reply(200, PROXY_PAGE, content_type="text/html")
                if marker == "ERROR200":
                    message = "upstream provider unavailable"
                    return self.reply(200, {"error": {"message": message, "code": 502}})
                if marker == "NOCHOICES":
                    return self.reply(200, {**completion(body, "{}"), "choices": []})
                if marker == "NOMESSAGE":
                    reply = completion(body, "{}")
                    del reply["choices"][0]["message"]
                    return self.reply(200, reply)
                if marker == "NOCONTENT":
                    reply = completion(body, "")
                    reply["choices"][0].update(message={"role": "assistant", "content": None},
                                               finish_reason="content_filter")
                    return self.reply(200, reply)
                if marker == "BAD400":
                    message = "messages[0].content: too many images"
                    return self.reply(400, {"error": {"message": message, "type": "invalid_request_error"}})
                if marker == "FORBIDDEN403":
                    message = "You are not allowed to sample from this model"
                    return self.reply(403, {"error": {"message": message, "type": "invalid_request_error"}})
                return self.reply(200, completion(body, json.dumps({"unexpected": "shape"})))

            def reply(self, status, payload, headers=None, content_type="application/json"):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler


def reply_for(body: dict, draw: int) -> object:
    if body["response_format"]["type"] == "json_schema":
        schema = body["response_format"]["json_schema"]["schema"]
    else:  # JSON mode: the engine put the schema into its system message
        system = body["messages"][0]["content"]
        schema = json.loads(system[system.index("{"):])
    return instance(schema, random.Random(draw))


def completion(body: dict, content: str) -> dict:
    prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content) // 4,
                  "total_tokens": prompt_tokens + len(content) // 4},
    }
