"""A teacher behind an OpenAI-compatible chat-completions API (OpenAI, Azure OpenAI, vllm serve,
SGLang, TGI, ...). Runs on CPU-only actors.

- Structured outputs through ``response_format`` (``json_schema``); servers without it get
  ``json_object`` mode, and the reply is validated either way (``structured.ask``).
- Retries: the openai SDK retries 408/409/429/5xx, timeouts and dropped connections with
  exponential backoff and jitter, honouring ``Retry-After``, up to ``max_retries``; each call is
  also capped in total time (``request_deadline_s``). A call that still fails is an outage
  (``EngineUnavailable``): the worker waits it out up to ``workers.outage_patience_s``, then stops
  the run with the shard uncommitted. Only a request the API refuses (HTTP 400) is a reject.
- A rate limit shared by every actor of the run (requests and tokens per minute), held by one
  Ray actor that the driver starts and hands to each engine.
- The API key is read from the environment variable named by ``api_key_env`` and never stored in
  the config, logs or outputs.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from refed_ray.config import EngineConfig
from refed_ray.engines.base import ChatRequest, Completion, Engine, EngineUnavailable, RequestRejected
from refed_ray.errors import UserError

JSON_MODE_INSTRUCTION = "Reply with one JSON object that follows this JSON schema: "


class OpenAIEngine(Engine):
    def __init__(self, config: EngineConfig, rate_limiter=None):
        import openai

        api = config.api
        key = os.environ.get(api.api_key_env)
        if not key:
            raise UserError(f"engine openai needs an API key in the environment variable {api.api_key_env}")
        client_kwargs = dict(api_key=key, max_retries=api.max_retries, timeout=api.request_timeout_s)
        if api.azure_api_version:
            self._client = openai.AsyncAzureOpenAI(
                azure_endpoint=api.api_base, api_version=api.azure_api_version, **client_kwargs
            )
        else:
            self._client = openai.AsyncOpenAI(base_url=api.api_base, **client_kwargs)
        self._errors = (openai.APIError, openai.APIConnectionError, openai.APITimeoutError)
        self._bad_request = openai.BadRequestError
        self._api = api
        self._json_schema = api.json_schema
        self._slots = asyncio.Semaphore(api.max_concurrent_requests)
        if (api.requests_per_minute or api.tokens_per_minute) and rate_limiter is None:
            raise ValueError("rate limits are configured but no shared rate limiter was given")
        self._limiter = rate_limiter
        self.model_name = config.model

    async def complete(self, request: ChatRequest) -> Completion:
        await self._wait_for_rate_limit(request)
        try:
            reply = await self._send(request, self._json_schema)
        except _SchemaUnsupported:
            self._json_schema = False  # this server has no json_schema: JSON mode from now on
            reply = await self._send(request, use_schema=False)
        choice = reply.choices[0]
        usage = reply.usage
        return Completion(
            text=choice.message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=choice.finish_reason,
        )

    async def _send(self, request: ChatRequest, use_schema: bool):
        """One call (with the SDK's retries) inside a concurrency slot; the slot is released
        before any fallback, so a retry never waits on its own slot."""
        async with self._slots:
            try:
                return await asyncio.wait_for(self._create(request, use_schema), self._api.request_deadline_s)
            except TimeoutError:
                raise EngineUnavailable(f"no reply within request_deadline_s={self._api.request_deadline_s}") from None
            except self._bad_request as err:
                if use_schema and "response_format" in str(err):
                    raise _SchemaUnsupported from None
                raise RequestRejected(f"API refused the request: {_describe(err)}") from None
            except self._errors as err:
                raise EngineUnavailable(f"API call failed after retries: {_describe(err)}") from None
            except ValueError as err:  # a 200 whose body is not JSON: a gateway's error page
                raise EngineUnavailable(f"unreadable reply from the API: {str(err)[:200]}") from None

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
        return await self._client.chat.completions.create(
            model=self.model_name,
            messages=messages,
            response_format=response_format,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
        )

    async def _wait_for_rate_limit(self, request: ChatRequest) -> None:
        if self._limiter is None:
            return
        # Tokens are reserved before the call: the prompt (about 4 chars a token) plus max_tokens.
        tokens = sum(len(m["content"]) for m in request.messages) // 4 + request.max_tokens
        delay = await self._limiter.reserve.remote(tokens)
        if delay > 0:
            await asyncio.sleep(delay)

    def shutdown(self) -> None:
        pass


class _SchemaUnsupported(Exception):
    """The server refused ``response_format: json_schema``."""


def _describe(err: Exception) -> str:
    status = getattr(err, "status_code", None)
    return f"{type(err).__name__}" + (f" (HTTP {status})" if status else "") + f": {str(err)[:300]}"


def start_rate_limiter(requests_per_minute: int | None, tokens_per_minute: int | None):
    """Called once by the driver, which hands the actor to every engine actor of the run and
    holds it until the run ends (an actor lives as long as a handle to it does)."""
    import ray

    if not requests_per_minute and not tokens_per_minute:
        return None
    return ray.remote(num_cpus=0)(RateLimiter).remote(requests_per_minute, tokens_per_minute)


class RateLimiter:
    """Two token buckets (requests, tokens), refilled continuously, holding 10 s of budget.

    ``reserve`` takes from both at once and returns how long the caller must wait before
    sending: reservations may run a bucket negative, so callers queue in arrival order.
    """

    BURST_SECONDS = 10.0

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None):
        rates = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self.buckets = {
            kind: _Bucket(rate / 60.0, rate / 60.0 * self.BURST_SECONDS) for kind, rate in rates.items() if rate
        }

    def reserve(self, tokens: int) -> float:
        now = time.monotonic()
        amounts = {"requests": 1, "tokens": tokens}
        return max(bucket.take(amounts[kind], now) for kind, bucket in self.buckets.items())


class _Bucket:
    def __init__(self, rate: float, capacity: float):
        self.rate, self.capacity = rate, capacity
        self.level, self.updated = capacity, time.monotonic()

    def take(self, amount: float, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        self.level -= amount
        return max(0.0, -self.level / self.rate)
