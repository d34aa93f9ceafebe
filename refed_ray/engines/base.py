"""What every teacher engine offers the pipeline: one async chat completion with a JSON schema."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel


class ChatRequest(BaseModel):
    messages: list[dict[str, str]]
    json_schema: dict[str, Any]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int


class Completion(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache


# Four ways a call fails, each handled where it belongs:
# - RequestRejected: this request's content can never succeed (longer than the context window,
#   refused as malformed). Only its own sample is rejected, recorded in rejects/.
# - EngineUnavailable: the infrastructure failed (an API that gave up after its retries, a
#   timeout, a dropped connection). Nothing is the sample's fault: the call waits and tries again
#   (``workers.outage_patience_s``); past that the run stops with its shard uncommitted, so a
#   resubmission redoes it. Never recorded as a reject.
# - EngineDead: the engine in this actor is gone or hung. The actor exits, Ray restarts it and
#   retries its shards; a shard that kills its engine ``workers.max_shard_attempts`` times is
#   committed as rejects (a poison input).
# - EngineMisconfigured: the run's engine settings are wrong (an API key, model name or URL the
#   API refuses). No call can succeed and waiting cannot help: the run stops at once (exit 2) with
#   a message naming the setting to fix. Never an outage, never an engine death.
# An engine raises nothing else: the pipeline treats any other exception as an engine death.


class RequestRejected(Exception):
    """The engine refused this one request for its content (e.g. longer than the context window)."""


class EngineUnavailable(Exception):
    """The engine or API could not answer now (outage, rate limit past retries, timeout)."""


class EngineDead(Exception):
    """The engine itself died or hung: its actor must exit so Ray restarts it and retries its shards."""


class EngineMisconfigured(Exception):
    """The engine's settings cannot work (a key, model or URL the API refuses); the message names
    the setting to fix."""


class Engine(ABC):
    """One engine per actor. ``complete`` is called concurrently from many coroutines."""

    model_name: str
    #: Requests the engine batches at once (vLLM's ``max_num_seqs``); None when it has no such bound.
    #: Workers admit that many requests so the engine stays full (see ``workers.requests_in_flight``).
    max_concurrency: int | None = None

    async def wait_turn(self, request: ChatRequest) -> None:
        """Wait until the run's own budgets (an API's rate limits) let ``request`` go. Callers
        await it before ``complete``; the hang watchdog does not time it: it is our queueing,
        not the engine's silence."""

    @abstractmethod
    async def complete(self, request: ChatRequest) -> Completion: ...

    def shutdown(self) -> None:
        """Release the engine's processes and memory."""

    def metrics(self) -> dict[str, int]:
        """Cumulative engine counters worth reporting (e.g. prefix-cache queries and hits)."""
        return {}
