"""The engine's admission (engines/guard.py): at most N calls at once, the oldest shard's first."""

from __future__ import annotations

import asyncio

from refed_ray.engines.base import ChatRequest, Completion, Engine
from refed_ray.engines.guard import GuardedEngine, OldestShardFirst, shard_counters, shard_order


class Recording(Engine):
    """Answers when told to; records the order in which calls reached it."""

    model_name = "recording"
    max_concurrency = 2

    def __init__(self):
        self.reached: list[str] = []
        self.answers: dict[str, asyncio.Event] = {}

    async def complete(self, request: ChatRequest) -> Completion:
        name = request.messages[0]["content"]
        self.reached.append(name)
        self.answers[name] = asyncio.Event()
        await self.answers[name].wait()
        return Completion(text="{}", prompt_tokens=1, completion_tokens=1)


def request(name: str) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": name}], json_schema={}, max_tokens=8, temperature=0,
                       top_p=1, seed=0)


async def call(engine: GuardedEngine, shard: int, name: str, counters: dict | None = None) -> None:
    shard_order.set(shard)  # as the worker sets them for each shard it starts
    shard_counters.set(counters)
    await engine.complete(request(name))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_freed_slot_goes_to_the_oldest_shard_whatever_the_arrival_order():
    async def scenario():
        inner = Recording()
        engine = GuardedEngine(inner, requests_in_flight=2, outage_patience_s=1, hang_timeout_s=60)
        calls = [asyncio.create_task(call(engine, 1, "old-1")), asyncio.create_task(call(engine, 1, "old-2"))]
        await settle()
        # The engine is full; then a younger shard's calls arrive before an older shard's.
        calls += [asyncio.create_task(call(engine, 2, "young-1")), asyncio.create_task(call(engine, 2, "young-2"))]
        await settle()
        calls.append(asyncio.create_task(call(engine, 1, "old-3")))
        await settle()
        assert inner.reached == ["old-1", "old-2"]  # never more than 2 at once
        inner.answers["old-1"].set()
        await settle()
        assert inner.reached[2] == "old-3"  # not young-1, which came first
        for name in ("old-2", "old-3"):
            inner.answers[name].set()
        await settle()
        assert inner.reached[3:] == ["young-1", "young-2"]  # the same shard: first come, first served
        for name in ("young-1", "young-2"):
            inner.answers[name].set()
        await asyncio.gather(*calls)

    asyncio.run(scenario())


def test_a_new_shards_opening_calls_go_before_an_older_shards_later_calls():
    async def scenario():
        inner = Recording()
        engine = GuardedEngine(inner, requests_in_flight=2, outage_patience_s=1, hang_timeout_s=60)
        old, new = {"answered": 3}, {}  # the old shard has had answers; the new one none yet
        calls = [asyncio.create_task(call(engine, 1, f"old-{i}", old)) for i in range(4)]
        await settle()
        calls += [asyncio.create_task(call(engine, 2, f"new-{i}", new)) for i in range(2)]
        await settle()
        for i in range(2):
            inner.answers[f"old-{i}"].set()
        await settle()
        # The new shard's first calls (each unit's first step) were admitted before old-2, old-3.
        assert inner.reached[2:4] == ["new-0", "new-1"]
        for name in ("new-0", "new-1"):
            inner.answers[name].set()
        await settle()
        assert inner.reached[4:] == ["old-2", "old-3"] and new["answered"] == 2
        for name in ("old-2", "old-3"):
            inner.answers[name].set()
        await asyncio.gather(*calls)

    asyncio.run(scenario())


def test_a_cancelled_waiting_call_gives_up_its_turn_and_no_slot_is_lost():
    async def scenario():
        slots = OldestShardFirst(1)
        await slots.acquire((1, 0))
        waiting = [asyncio.create_task(slots.acquire((1, order))) for order in (1, 2)]
        await settle()
        waiting[0].cancel()  # the oldest waiter is cancelled (its shard's task was)
        await settle()
        slots.release()
        await settle()
        assert waiting[1].done() and not waiting[1].cancelled()  # the slot went on to the next
        slots.release()
        assert slots.free == 1 and not [w for w in slots.waiting if not w[2].done()]

    asyncio.run(scenario())
