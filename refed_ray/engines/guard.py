"""What a worker puts around its engine: admission, outage patience and a hang watchdog.

- Admission: at most ``requests_in_flight`` calls reach the engine at once (enough to fill it:
  vLLM's ``max_num_seqs`` by default), whatever the number of shards and chains waiting; the
  oldest shard's calls first (``OldestShardFirst``).
- Outages (``EngineUnavailable``: an API down past its own retries, a timeout) are waited out with
  backoff for up to ``outage_patience_s``; past that the error goes up and the run stops with the
  shard uncommitted. Each retry is counted in the shard's ``outage_retries``, never as a reject.
- A hung engine (calls in flight, no answer of any kind for ``hang_timeout_s``) is treated as a
  dead one: the process exits, Ray restarts the actor and retries its shards. The watchdog times
  the engine only: waits for admission and for the run's rate limits (``Engine.wait_turn``) are
  our own queueing, and a run throttled to one request a minute is not hung.
- Settings the API refuses (``EngineMisconfigured``) are not waited out: they go straight up and
  the run stops.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import os
import threading
import time

from refed_ray.engines.base import ChatRequest, Completion, Engine, EngineUnavailable

log = logging.getLogger(__name__)

# The counters of the shard a coroutine works for (set per shard by the worker): its outage retries,
# and its calls answered (admission tells its opening calls by that).
shard_counters: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("shard_counters", default=None)
# The order in which the worker started the shard a coroutine works for (set per shard): admission goes
# to the lowest first.
shard_order: contextvars.ContextVar[int] = contextvars.ContextVar("shard_order", default=0)


class OldestShardFirst:
    """At most ``limit`` calls at once; a freed slot goes first to a shard's opening calls (those
    sent before any call of their shard was answered: each unit's first step), then to the oldest
    shard's calls.

    Why not first come, first served: an actor's shards in flight then share the engine evenly, so
    shards started together end together, and their successors start together too, each with only
    its units' first calls to send while the engine waits for their chains to branch out (issue
    24 measured it as the largest share of a simulated GPU's under-filled batches). The oldest
    shard first finishes shards one at a time; a new shard's opening calls go ahead of it, so its
    chains have branched out (K responses a unit) by the time the older shard runs dry."""

    def __init__(self, limit: int):
        self.free = limit
        self.waiting: list[tuple[tuple[int, int], int, asyncio.Future]] = []  # (order, arrival, the call's turn)
        self.arrivals = itertools.count()

    async def acquire(self, order: tuple[int, int]) -> None:
        if self.free > 0:  # a free slot means no call is waiting (release hands slots on first)
            self.free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (order, next(self.arrivals), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # the slot came with the cancellation: hand it on
            raise

    def release(self) -> None:
        while self.waiting:
            _, _, turn = heapq.heappop(self.waiting)
            if not turn.done():  # a cancelled call left its entry behind
                turn.set_result(None)
                return
        self.free += 1


class GuardedEngine(Engine):
    def __init__(self, engine: Engine, *, requests_in_flight: int | None, outage_patience_s: float,
                 hang_timeout_s: float):
        self.engine = engine
        self.model_name = engine.model_name
        self.max_concurrency = engine.max_concurrency
        limit = requests_in_flight or engine.max_concurrency
        self._slots = OldestShardFirst(limit) if limit else None
        self._patience = outage_patience_s
        self._hang_timeout = hang_timeout_s
        self._in_flight = 0
        self._last_answer = time.monotonic()
        threading.Thread(target=self._watch, name="engine-watchdog", daemon=True).start()

    async def complete(self, request: ChatRequest) -> Completion:
        if self._slots is None:
            return await self._patiently(request)
        counters = shard_counters.get()
        opening = counters is not None and not counters.get("answered")
        await self._slots.acquire((0 if opening else 1, shard_order.get()))
        try:
            return await self._patiently(request)
        finally:
            self._slots.release()
            if counters is not None:
                counters["answered"] = counters.get("answered", 0) + 1

    async def _patiently(self, request: ChatRequest) -> Completion:
        started, delay = time.monotonic(), 1.0
        while True:
            await self.engine.wait_turn(request)  # our own queueing: the watchdog does not time it
            try:
                return await self._timed(request)
            except EngineUnavailable as err:
                waited = time.monotonic() - started
                if waited >= self._patience:
                    raise EngineUnavailable(
                        f"{err} (still failing after {waited:.0f} s: workers.outage_patience_s={self._patience:g})"
                    ) from err
                counters = shard_counters.get()
                if counters is not None:
                    counters["outage_retries"] = counters.get("outage_retries", 0) + 1
                log.warning("engine unavailable, retrying in %.0f s: %s", delay, err)
                await asyncio.sleep(min(delay, max(self._patience - waited, 0.1)))
                delay = min(delay * 2, 60.0)

    async def _timed(self, request: ChatRequest) -> Completion:
        if self._in_flight == 0:
            self._last_answer = time.monotonic()  # idle time is not a hang
        self._in_flight += 1
        try:
            return await self.engine.complete(request)
        finally:
            # Any answer, an error included, shows the engine is alive.
            self._in_flight -= 1
            self._last_answer = time.monotonic()

    def _watch(self) -> None:
        period = max(0.2, min(30.0, self._hang_timeout / 10))
        while True:
            time.sleep(period)
            silent = time.monotonic() - self._last_answer
            if self._in_flight and silent > self._hang_timeout:
                log.error(
                    "engine hung: %d calls in flight and no answer for %.0f s (workers.hang_timeout_s); "
                    "exiting so Ray restarts this actor and retries its shards", self._in_flight, silent,
                )
                logging.shutdown()
                os._exit(1)

    def metrics(self) -> dict[str, int]:
        return self.engine.metrics()

    def shutdown(self) -> None:
        self.engine.shutdown()
