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
- ``poison_marker``: a call whose prompt contains it (and whose schema is titled
  ``poison_schema``, if given) kills the actor's process, every time (a poison input);
- ``outage_file``: while this file exists every call raises ``EngineUnavailable`` (an API outage);
  with ``outage_seconds``, the outage ends that long after the first call that met it;
- ``hang_file``: while this file exists, the first call of an actor deletes it and never returns
  (a hung engine);
- ``die_after_commits``: ``{"file": path, "count": n, "output": dir}``: the first call after n
  synthesis markers exist in ``dir`` deletes the file and kills the process;
- ``calls_log``: a file each call appends "<pid> <schema title>" to (which process served what);
- ``shutdown_log``: a file ``shutdown`` appends "<pid> <whether the interpreter is finalizing>" to
  (when an engine is stopped, and whether it was stopped while its actor still ran);
- ``repeat_instructions``: every round of a (reference, aspect) gets the same K instructions of 30
  words but for the last word, drawn by the request's seed (near-duplicates across units, Jaccard
  of word 3-grams about 0.93, or 1 when the draws meet), and a unit's last instruction repeats its
  first likewise (a near-duplicate within the unit);
- ``die_writing``: ``{"file": path, "folder": "data"}``: while the file exists, the actor's first
  write into that output folder stops half way through its staging file and kills the process
  (a node lost in the middle of committing a shard);
- ``hold``: ``{"marker": text, "schema": title, "release_file": path}``: a call whose prompt
  contains the marker and whose schema has that title waits until the file exists (a run paused
  at a known point: the shards holding such calls cannot commit before the release);
- ``loads_log``: a file each engine construction appends its pid to (engine loads);
- ``config_log``: a file each engine construction appends its engine config to, as JSON (what
  the engine was given: the real settings, not run.json's masked ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import sys
import time

from refed_ray.engines.base import ChatRequest, Completion, Engine, EngineUnavailable, RequestRejected
from refed_ray.engines.config import EngineConfig


class FakeEngine(Engine):
    def __init__(self, config: EngineConfig):
        self.model_name = "fake-teacher"
        self.options = config.engine_kwargs
        if "die_writing" in self.options:
            _die_in_the_middle_of_a_write(**self.options["die_writing"])
        if "config_log" in self.options:
            with open(self.options["config_log"], "a") as handle:
                handle.write(config.model_dump_json() + "\n")
        if "loads_log" in self.options:
            with open(self.options["loads_log"], "a") as handle:
                handle.write(f"{os.getpid()}\n")

    async def complete(self, request: ChatRequest) -> Completion:
        prompt = request.messages[-1]["content"]
        if "calls_log" in self.options:
            with open(self.options["calls_log"], "a") as handle:
                handle.write(f"{os.getpid()} {request.json_schema.get('title', '')}\n")
        self._maybe_die(prompt, request.json_schema.get("title", ""))
        if self._in_outage():
            raise EngineUnavailable("HTTP 503 service unavailable (injected outage)")
        if _take(self.options.get("hang_file", "")):
            await asyncio.Event().wait()
        await asyncio.sleep(self.options.get("delay", 0.0))
        hold = self.options.get("hold")
        if hold and hold["marker"] in prompt and request.json_schema.get("title") == hold["schema"]:
            while not os.path.exists(hold["release_file"]):
                await asyncio.sleep(0.05)
        if self.options.get("reject_marker", "\0") in prompt:
            raise RequestRejected("prompt of 99999 tokens does not fit the context window of 4096 tokens")
        if self._always_invalid(prompt, request.json_schema.get("title", "")):
            text = '{"truncated": '
        elif self.options.get("repeat_instructions") and request.json_schema.get("title") == "InstructionList":
            text = json.dumps({"instructions": repeated_instructions(prompt, request)})
        else:
            text = json.dumps(instance(request.json_schema, random.Random(request.seed)))
        return Completion(
            text=text,
            prompt_tokens=len(prompt) // 4,
            completion_tokens=max(1, len(text) // 4),
            finish_reason="stop",
        )

    def shutdown(self) -> None:
        if "shutdown_log" in self.options:
            with open(self.options["shutdown_log"], "a") as handle:
                handle.write(f"{os.getpid()} {sys.is_finalizing()}\n")

    def _in_outage(self) -> bool:
        """While ``outage_file`` exists; with ``outage_seconds``, only for that long after the
        first call that met it (the file then holds the outage's start)."""
        path = self.options.get("outage_file")
        if not path or not os.path.exists(path):
            return False
        seconds = self.options.get("outage_seconds")
        if seconds is None:
            return True
        try:
            with open(path, "r+") as handle:
                started = handle.read().strip()
                if not started:
                    handle.write(str(time.time()))
                    return True
        except FileNotFoundError:
            return False
        if time.time() - float(started) < seconds:
            return True
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return False

    def _always_invalid(self, prompt: str, title: str) -> bool:
        if self.options.get("invalid_marker", "\0") in prompt:
            return True
        rate = self.options.get("invalid_rate", {}).get(title, 0.0)
        bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") / 2**32
        return bucket < rate

    def _maybe_die(self, prompt: str, title: str) -> None:
        path = self.options.get("die_file")
        poisoned = self.options.get("poison_marker", "\0") in prompt and self.options.get("poison_schema", title) == title
        if (path and _take(path)) or poisoned:
            os._exit(1)
        after = self.options.get("die_after_commits")
        if after and os.path.exists(after["file"]):
            markers = os.path.join(after["output"], "_markers", "synthesis")
            done = len(os.listdir(markers)) if os.path.isdir(markers) else 0
            if done >= after["count"] and _take(after["file"]):
                os._exit(1)


class ZeroCostEngine(Engine):
    """A teacher that costs nothing: one fixed valid reply per schema, built once. For benchmarks
    of the pipeline's own cost (benchmarks/scale.py, benchmarks/chaos.py)."""

    def __init__(self, config: EngineConfig):
        self.model_name = "zero-cost-teacher"
        self._replies: dict[int, Completion] = {}

    async def complete(self, request: ChatRequest) -> Completion:
        key = id(request.json_schema)  # the pipeline reuses one schema object per step
        reply = self._replies.get(key)
        if reply is None:
            text = json.dumps(instance(request.json_schema, random.Random(0)))
            reply = self._replies[key] = Completion(
                text=text, prompt_tokens=500, completion_tokens=max(1, len(text) // 4), finish_reason="stop"
            )
        return reply


VOCABULARY = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "po", "ri", "su", "te") for b in ("x", "y", "z", "q", "w", "v")]


def repeated_instructions(prompt: str, request: ChatRequest) -> list[str]:
    """See ``repeat_instructions`` above."""
    count = request.json_schema["properties"]["instructions"]["minItems"]
    shared = random.Random(prompt.split("Analysis of its")[0])  # the reference and the aspect
    own = random.Random(request.seed)
    bodies = [[shared.choice(VOCABULARY) for _ in range(29)] for _ in range(count)]
    bodies[-1] = list(bodies[0])
    return [" ".join([*body, own.choice(VOCABULARY)]) for body in bodies]


def instance(schema: dict, rng: random.Random, defs: dict | None = None) -> object:
    """A value valid under ``schema`` (the subset pydantic emits: objects, arrays, strings, ints)."""
    defs = schema.get("$defs", defs or {})
    if "$ref" in schema:
        return instance(defs[schema["$ref"].rsplit("/", 1)[-1]], rng, defs)
    if "enum" in schema:  # a choice (the judge's verdict)
        return rng.choice(schema["enum"])
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
    if not flag:
        return False
    try:
        os.remove(flag)
        return True
    except FileNotFoundError:
        return False
