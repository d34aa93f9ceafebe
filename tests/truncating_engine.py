"""A fake teacher that writes replies cut off, as a real one does when it runs long. Selected like
``tests.fake_engine:FakeEngine``, with ``engine_kwargs``:
- ``bound_rate``: {schema title: fraction} of prompts (by content) whose every reply fills each
  bounded string to exactly its ``maxLength``: what the grammar leaves of a longer answer (valid
  JSON, cut mid-text);
- ``length_rate``: {schema title: fraction} of prompts whose every reply stops at max_tokens
  (finish reason "length", the JSON unfinished);
and every option of ``FakeEngine``.
"""

from __future__ import annotations

import hashlib
import json
import random

from refed_ray.engines.base import ChatRequest, Completion
from tests.fake_engine import FakeEngine, instance


class TruncatingEngine(FakeEngine):
    async def complete(self, request: ChatRequest) -> Completion:
        completion = await super().complete(request)
        prompt = request.messages[-1]["content"]
        title = request.json_schema.get("title", "")
        if _chosen("bound", prompt, self.options.get("bound_rate", {}).get(title, 0.0)):
            text = json.dumps(filled(request.json_schema, random.Random(request.seed)))
            return completion.model_copy(update={"text": text, "completion_tokens": len(text) // 4})
        if _chosen("length", prompt, self.options.get("length_rate", {}).get(title, 0.0)):
            cut = completion.text[: len(completion.text) // 2]
            return completion.model_copy(update={"text": cut, "finish_reason": "length"})
        return completion


def filled(schema: dict, rng: random.Random, defs: dict | None = None) -> object:
    """A valid instance of ``schema`` whose bounded strings are exactly at their bound."""
    defs = schema.get("$defs", defs or {})
    if "$ref" in schema:
        return filled(defs[schema["$ref"].rsplit("/", 1)[-1]], rng, defs)
    kind = schema.get("type")
    if kind == "object":
        return {name: filled(sub, rng, defs) for name, sub in schema["properties"].items()}
    if kind == "array":
        return [filled(schema["items"], rng, defs) for _ in range(schema.get("maxItems", schema.get("minItems", 1)))]
    if kind == "string" and "maxLength" in schema:
        text = ""
        while len(text) < schema["maxLength"]:
            text += rng.choice(["the answer continues ", "with more detail ", "and another step "])
        return text[: schema["maxLength"]]
    return instance(schema, rng, defs)


def _chosen(fault: str, prompt: str, rate: float) -> bool:
    """The same prompts every time (all attempts of a call), drawn apart for each fault."""
    bucket = int.from_bytes(hashlib.sha256(f"{fault}\0{prompt}".encode()).digest()[:4], "big") / 2**32
    return bucket < rate
