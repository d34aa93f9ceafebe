"""The shards one engine actor works on at once (``workers.shards_in_flight``).

An engine death counts against every shard in flight on its actor (``commits.Attempt.deaths``):
the one whose input killed the engine cannot be told from its neighbours. So a shard's last
attempt before ``workers.max_shard_attempts`` makes it rejects runs alone (``alone_at``): a shard
is abandoned only once it has killed the engine by itself, never for a neighbour's poison. Earlier
attempts share the engine, so a node lost under an actor (the common death on spot clusters) costs
no engine time beyond the redone shards. A shard waiting to run alone holds new shards back, so
the actor drains and it gets its turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


def alone_at(max_shard_attempts: int) -> int:
    """The deaths after which a shard's next attempt runs alone: its last one."""
    return max(1, max_shard_attempts - 1)


class ShardSlots:
    def __init__(self, size: int):
        self.size = size
        self.running = 0
        self.running_alone = False
        self.waiting_alone = 0
        self.changed = asyncio.Condition()

    @asynccontextmanager
    async def take(self, alone: bool = False) -> AsyncIterator[None]:
        async with self.changed:
            if alone:
                self.waiting_alone += 1
                try:
                    await self.changed.wait_for(lambda: self.running == 0)
                finally:
                    self.waiting_alone -= 1
                    self.changed.notify_all()  # a cancelled wait must not hold the others back
                self.running_alone = True
            else:
                await self.changed.wait_for(self._room_beside_others)
            self.running += 1
        try:
            yield
        finally:
            async with self.changed:
                self.running -= 1
                if alone:
                    self.running_alone = False
                self.changed.notify_all()

    def _room_beside_others(self) -> bool:
        return not self.running_alone and not self.waiting_alone and self.running < self.size
