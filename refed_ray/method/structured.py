"""One structured call to the teacher: schema-constrained, validated, retried a bounded number of times.

A reply is never accepted cut off: one that stopped at max_tokens (finish reason "length"), and
one whose string stopped at its grammar bound (valid JSON, but cut), are both "truncated".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel, ValidationError

from refed_ray.config import SamplingConfig
from refed_ray.engines.base import (
    ChatRequest,
    Engine,
    EngineDead,
    EngineMisconfigured,
    EngineUnavailable,
    RequestRejected,
)
from refed_ray.records.models import string_at_bound


@dataclass
class Answer:
    """A validated reply, or why there is none; tokens and calls count every attempt."""

    value: BaseModel | None = None
    error: str = ""
    raw: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    calls: int = 0


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (run seed, unit, step, index, attempt)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


async def ask(
    engine: Engine,
    messages: list[dict[str, str]],
    schema: type[BaseModel],
    *,
    max_tokens: int,
    sampling: SamplingConfig,
    seed: int,
) -> Answer:
    answer = Answer()
    json_schema = _json_schema(schema)
    for attempt in range(sampling.max_attempts):
        # Built from trusted values: no validation pass per call (it shows at a million samples).
        request = ChatRequest.model_construct(
            messages=messages,
            json_schema=json_schema,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=derive_seed(seed, attempt),
        )
        answer.calls += 1
        try:
            completion = await engine.complete(request)
        except RequestRejected as err:
            # The request's content (a prompt too long for the context): trying again would fail
            # the same way. Earlier attempts' tokens stay counted.
            answer.error = str(err)
            return answer
        except (EngineDead, EngineUnavailable, EngineMisconfigured):
            raise  # infrastructure or settings, not this sample's fault: its shard stays uncommitted
        except Exception as err:
            # An engine that raises what it does not declare is broken, not the sample: treat it
            # as dead, so its actor restarts and the shard is retried (bounded, see workers.py).
            raise EngineDead(f"engine error: {type(err).__name__}: {err}") from err
        answer.prompt_tokens += completion.prompt_tokens
        answer.completion_tokens += completion.completion_tokens
        answer.cached_tokens += completion.cached_tokens
        answer.raw = completion.text
        if completion.finish_reason == "length":
            answer.error = f"output truncated at max_tokens={max_tokens}"
            continue
        try:
            value = schema.model_validate_json(completion.text)
        except ValidationError as err:
            answer.error = f"output does not validate: {_first_problem(err)}"
            continue
        cut = string_at_bound(request.json_schema, value.model_dump())
        if cut:
            # Valid JSON, but the grammar closed a string at its maxLength: cut mid-text.
            answer.error = f"output truncated: {cut}"
            continue
        answer.value = value
        answer.error = ""
        return answer
    answer.error = f"{answer.error} (after {answer.calls} attempts)"
    return answer


@cache
def _json_schema(schema: type[BaseModel]) -> dict:
    return schema.model_json_schema()


def _first_problem(err: ValidationError) -> str:
    problem = err.errors()[0]
    where = ".".join(str(part) for part in problem["loc"]) or "(reply)"
    return f"{where}: {problem['msg']}"
