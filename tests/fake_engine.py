"""A deterministic fake teacher for orchestration tests. Never a default: tests select it with
``engine: {kind: custom, class_path: tests.fake_engine:FakeEngine}``.

It answers any JSON schema with a valid instance built from the request's seed, so runs are
reproducible. ``engine_kwargs`` inject faults:
- ``reject_marker``: prompts containing it are refused as longer than the context window;
- ``invalid_marker``: prompts containing it always get invalid JSON;
- ``invalid_rate``: {schema title: fraction} of prompts (by content) that always get invalid JSON;
- ``delay``: seconds per call;
- ``die_file``: while this file exists, the first call of an actor deletes it and kills the
  actor's process (an engine that dies mid-batch);
- ``die_writing``: ``{"file": path, "folder": "data"}``: while the file exists, the actor's first
  write into that output folder stops half way through its staging file and kills the process
  (a node lost in the middle of committing a shard).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random

from refed_ray.config import EngineConfig
from refed_ray.engines.base import ChatRequest, Completion, Engine, RequestRejected


class FakeEngine(Engine):
    def __init__(self, config: EngineConfig):
        self.model_name = "fake-teacher"
        self.options = config.engine_kwargs
        if "die_writing" in self.options:
            _die_in_the_middle_of_a_write(**self.options["die_writing"])

    async def complete(self, request: ChatRequest) -> Completion:
        prompt = request.messages[-1]["content"]
        self._maybe_die()
        await asyncio.sleep(self.options.get("delay", 0.0))
        if self.options.get("reject_marker", "\0") in prompt:
            raise RequestRejected("prompt of 99999 tokens does not fit the context window of 4096 tokens")
        if self._always_invalid(prompt, request.json_schema.get("title", "")):
            text = '{"truncated": '
        else:
            text = json.dumps(instance(request.json_schema, random.Random(request.seed)))
        return Completion(
            text=text,
            prompt_tokens=len(prompt) // 4,
            completion_tokens=max(1, len(text) // 4),
            finish_reason="stop",
        )

    def _always_invalid(self, prompt: str, title: str) -> bool:
        if self.options.get("invalid_marker", "\0") in prompt:
            return True
        rate = self.options.get("invalid_rate", {}).get(title, 0.0)
        bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") / 2**32
        return bucket < rate

    def _maybe_die(self) -> None:
        path = self.options.get("die_file")
        if path and _take(path):
            os._exit(1)


def instance(schema: dict, rng: random.Random, defs: dict | None = None) -> object:
    """A value valid under ``schema`` (the subset pydantic emits: objects, arrays, strings, ints)."""
    defs = schema.get("$defs", defs or {})
    if "$ref" in schema:
        return instance(defs[schema["$ref"].rsplit("/", 1)[-1]], rng, defs)
    kind = schema.get("type")
    if kind == "object":
        return {name: instance(sub, rng, defs) for name, sub in schema["properties"].items()}
    if kind == "array":
        count = schema.get("maxItems", schema.get("minItems", 1))
        return [instance(schema["items"], rng, defs) for _ in range(count)]
    if kind == "integer":
        return rng.randint(0, 100)
    words = ["clear", "precise", "example", "step", "reason", "data", "context", "answer", "idea"]
    text = " ".join(rng.choice(words) for _ in range(12))
    return text[: schema.get("maxLength", len(text))]


def _die_in_the_middle_of_a_write(file: str, folder: str) -> None:
    from refed_ray.storage import Storage

    write_bytes = Storage.write_bytes

    def dying_write(self, relative: str, data: bytes) -> None:
        if relative.startswith(folder + "/") and _take(file):
            target = self.path(relative)
            self.fs.makedirs(os.path.dirname(target), exist_ok=True)
            with open(f"{target}.tmp-killed", "wb") as handle:  # what a staged write leaves
                handle.write(data[: len(data) // 2])
            os._exit(1)
        write_bytes(self, relative, data)

    Storage.write_bytes = dying_write


def _take(flag: str) -> bool:
    """True for the one caller that removes ``flag``: each injected death happens once."""
    try:
        os.remove(flag)
        return True
    except FileNotFoundError:
        return False
