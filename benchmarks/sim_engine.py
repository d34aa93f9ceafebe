"""A simulated GPU engine: vLLM-style continuous batching on a clock, no model. For
``benchmarks/gpu_sim.py``; never a default: a config selects it with
``engine: {kind: custom, class_path: benchmarks.sim_engine:SimGPUEngine, resources: {num_gpus: 1}}``.

The model of the GPU (``engine_kwargs``, all optional):

- ``max_num_seqs`` (256): sequences decoded together; the engine advertises
  ``ceil(1.1 x max_num_seqs)`` as its capacity, as ``VLLMEngine`` does, so the worker admits that many.
- A decode step of ``b`` sequences takes ``step_s(b) = t0 + t1 x b`` and gives each of them one token.
  Calibrated on two published points for an 8B model in bf16 on one H100: about 6,400 output
  tokens/s at a full batch of 256 (datatrove's Qwen3-8B figure), so ``step_s(256) = 40 ms``, and
  about 100 tokens/s for a single stream, so ``step_s(1) = 10 ms``: ``t1 = 30 ms / 255``,
  ``t0 = 10 ms - t1``. Prefill is not modelled apart: the full-batch figure includes it.
- Completion tokens per call by step (``tokens``), as the README's sizing: feedback 300 a call,
  K instructions 40 each, response 400, refinement 700.
- ``load_s`` (120): the engine load (weights, compile, CUDA graphs), slept in the constructor,
  counted from when the driver started the pass (``_load_left``).
- ``reject_rate`` (0.03): the share of refinement prompts (by content, so every attempt) that get
  invalid JSON: a yield below 1, so the run needs a top-up round as real runs do.
- ``time_scale`` (0.01): real seconds per simulated second. Every duration above is multiplied by it.
- ``records_dir``: where the engine writes its record (``<pid>-<n>.json``): load and ready times,
  every change of the batch size with its time, tokens and calls by schema, and each call's end
  with its shard (the worker's ``shard_order``) and tokens.

The engine is self-clocked: it reads the real clock when it wakes and credits each running
sequence the tokens ``elapsed / step_s(b)`` steps make, so an oversleeping event loop on a busy
machine changes nothing of its tokens per (scaled) second. Replies are valid instances of each
request's JSON schema (``tests.fake_engine.instance``) drawn from the request's seed.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import math
import os
import random
import time
from collections import deque
from itertools import count

from refed_ray.engines.base import ChatRequest, Completion, Engine
from refed_ray.engines.config import EngineConfig
from refed_ray.engines.guard import shard_order
from tests.fake_engine import instance

FULL_BATCH = 256
FULL_BATCH_TOKENS_S = 6400.0  # datatrove: Qwen3-8B, one H100, full batch
SINGLE_STREAM_TOKENS_S = 100.0  # an 8B model in bf16, one H100, batch of one
T1 = (FULL_BATCH / FULL_BATCH_TOKENS_S - 1 / SINGLE_STREAM_TOKENS_S) / (FULL_BATCH - 1)
T0 = 1 / SINGLE_STREAM_TOKENS_S - T1
# Completion tokens per call, by reply schema; InstructionList's is per instruction.
TOKENS = {"InstructionAnalysis": 300, "ResponseAnalysis": 300, "InstructionList": 40,
          "SynthesizedResponse": 400, "Refinement": 700}
MIN_WAKE_S = 0.002  # real seconds: the shortest sleep worth a wake-up
FLUSH_EVERY_S = 2.0  # real seconds between rewrites of the record
_ENGINES = count()


def step_s(batch: int) -> float:
    """Simulated seconds of one decode step of ``batch`` sequences."""
    return T0 + T1 * batch


def full_batch_rate(max_num_seqs: int = FULL_BATCH) -> float:
    """Tokens per simulated second of an engine that always holds ``max_num_seqs`` sequences."""
    return max_num_seqs / step_s(max_num_seqs)


class _Sequence:
    __slots__ = ("arrived", "done_at", "future", "tokens")

    def __init__(self, tokens: int, future: asyncio.Future):
        self.tokens, self.future, self.done_at = tokens, future, 0.0
        self.arrived = time.monotonic()

    def __lt__(self, other: _Sequence) -> bool:
        return self.done_at < other.done_at


class SimGPUEngine(Engine):
    def __init__(self, config: EngineConfig):
        options = config.engine_kwargs
        self.model_name = "simulated-8b-h100"
        self.scale = float(options.get("time_scale", 0.01))
        self.max_num_seqs = int(options.get("max_num_seqs", FULL_BATCH))
        self.max_concurrency = math.ceil(1.1 * self.max_num_seqs)  # as VLLMEngine
        self.tokens_by_title = {**TOKENS, **options.get("tokens", {})}
        self.reject_rate = float(options.get("reject_rate", 0.03))
        self.records_dir = options.get("records_dir")
        self.record = {"pid": os.getpid(), "node": os.environ.get("RAY_NODE_ID", ""), "scale": self.scale,
                       "max_num_seqs": self.max_num_seqs, "load_start": time.time(), "calls": {}, "tokens": {},
                       "changes": [], "answered": []}
        self._name = f"{os.getpid()}-{next(_ENGINES)}.json"
        time.sleep(self._load_left(float(options.get("load_s", 120)) * self.scale))
        self.record["ready"] = time.time()
        self._waiting: deque[_Sequence] = deque()  # in arrival order
        self._running: list[_Sequence] = []  # a heap by done_at, in "tokens per sequence" units
        self._made = 0.0  # tokens each running sequence has received since the engine started
        self._last = time.monotonic()  # the simulated engine's clock has caught up to here
        self._wall_offset = time.time() - time.monotonic()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._flushed = 0.0
        self._flush()

    def _load_left(self, load: float) -> float:
        """Real seconds of the load still to go. It counts from when the driver asked for the
        pass's engines (``pass_started`` in records_dir, written by gpu_sim.py): a real load's
        minutes include the actor's start, and this machine's actor start (real seconds, 1/scale
        times too long in simulated time) must not come on top. An actor started long after its
        pass began (a restart) loads in full."""
        try:
            with open(os.path.join(self.records_dir or "", "pass_started")) as handle:
                asked = float(handle.read())
        except (OSError, ValueError):
            return load
        since = time.time() - asked
        return max(0.0, load - since) if since < 2 * load else load

    async def complete(self, request: ChatRequest) -> Completion:
        title = request.json_schema.get("title", "")
        prompt = request.messages[-1]["content"]
        tokens = self._tokens(title, request)
        if self._wake is None:
            self._wake, self._loop_task = asyncio.Event(), asyncio.create_task(self._schedule())
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Sequence(tokens, future))
        if len(self._running) < self.max_num_seqs:
            self._wake.set()  # a free slot: join the batch now, not at the next finish
        await future
        # For what a death would redo (gpu_sim.py): when each call ended, for which of the actor's shards.
        self.record["answered"].append((round(time.time(), 3), shard_order.get(), tokens))
        self.record["calls"][title] = self.record["calls"].get(title, 0) + 1
        self.record["tokens"][title] = self.record["tokens"].get(title, 0) + tokens
        if title == "Refinement" and _bucket(prompt) < self.reject_rate:
            text = '{"truncated": '
        else:
            text = json.dumps(instance(request.json_schema, random.Random(request.seed)))
        return Completion(text=text, prompt_tokens=len(prompt) // 4, completion_tokens=tokens, finish_reason="stop")

    def _tokens(self, title: str, request: ChatRequest) -> int:
        per_call = self.tokens_by_title.get(title, 300)
        if title == "InstructionList":
            per_call *= request.json_schema["properties"]["instructions"].get("minItems", 1)
        return per_call

    async def _schedule(self) -> None:
        """The engine's step loop: catch the clock up, then sleep until the next finish or arrival."""
        while True:
            self._catch_up(time.monotonic())
            self._wake.clear()
            if time.monotonic() - self._flushed > FLUSH_EVERY_S:
                self._flush()
            if not self._running:
                await self._wake.wait()
                continue
            until_next = (self._running[0].done_at - self._made) * self._per_token()
            try:
                await asyncio.wait_for(self._wake.wait(), max(until_next, MIN_WAKE_S))
            except TimeoutError:
                pass

    def _per_token(self) -> float:
        """Real seconds per decode step of the running batch."""
        return step_s(len(self._running)) * self.scale

    def _catch_up(self, now: float) -> None:
        """Replay the steps since the last wake event by event (each finish, each arrival that
        found a free slot), at the times they fell: how late the event loop woke changes nothing."""
        while True:
            self._admit()
            if not self._running:
                if not self._waiting:
                    self._last = now
                    return
                self._last = max(self._last, self._waiting[0].arrived)
                continue
            per_token = self._per_token()
            at = self._last + (self._running[0].done_at - self._made) * per_token
            if len(self._running) < self.max_num_seqs and self._waiting:
                at = min(at, max(self._waiting[0].arrived, self._last))
            if at > now:
                self._made += (now - self._last) / per_token
                self._last = now
                return
            self._made += (at - self._last) / per_token
            self._last = at
            while self._running and self._running[0].done_at <= self._made + 1e-6:
                done = heapq.heappop(self._running)
                if not done.future.done():
                    done.future.set_result(None)
            self._admit()
            self._note_batch()

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_num_seqs and self._waiting[0].arrived <= self._last:
            new = self._waiting.popleft()
            new.done_at = self._made + new.tokens
            heapq.heappush(self._running, new)
        self._note_batch()

    def _note_batch(self) -> None:
        changes = self.record["changes"]
        batch = len(self._running)
        if not changes or changes[-1][1] != batch:
            changes.append((round(self._last + self._wall_offset, 4), batch))

    def _flush(self) -> None:
        self._flushed = time.monotonic()
        if not self.records_dir:
            return
        path = os.path.join(self.records_dir, self._name)
        with open(path + ".tmp", "w") as handle:
            json.dump(self.record, handle)
        os.replace(path + ".tmp", path)

    def shutdown(self) -> None:
        self.record["shutdown"] = time.time()
        self._flush()


def _bucket(prompt: str) -> float:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") / 2**32
