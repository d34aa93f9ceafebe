"""The actor's shard slots (refed_ray/run/slots.py): a shard whose engine died under it runs alone."""

import asyncio

from refed_ray.run.slots import ShardSlots


async def _hold(slots: ShardSlots, name: str, log: list, release: asyncio.Event, alone: bool = False):
    async with slots.take(alone=alone):
        log.append(f"start {name}")
        await release.wait()
        log.append(f"end {name}")


def test_a_shard_that_died_before_waits_for_its_neighbours_and_runs_alone():
    async def scenario():
        slots, log = ShardSlots(2), []
        first, second, retried, later = (asyncio.Event() for _ in range(4))
        tasks = [asyncio.create_task(_hold(slots, "a", log, first)),
                 asyncio.create_task(_hold(slots, "b", log, second))]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(_hold(slots, "retried", log, retried, alone=True)))
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(_hold(slots, "later", log, later)))  # a slot is free soon
        await asyncio.sleep(0.01)
        assert log == ["start a", "start b"]  # both slots held: the retried shard waits
        first.set()
        await asyncio.sleep(0.01)
        assert log[-1] == "end a"  # a slot is free, but "later" must not start beside the retried shard
        second.set()
        await asyncio.sleep(0.01)
        assert log[-1] == "start retried" and slots.running == 1
        retried.set()
        await asyncio.sleep(0.01)
        assert log[-2:] == ["end retried", "start later"]
        later.set()
        await asyncio.gather(*tasks)
        assert slots.running == 0

    asyncio.run(scenario())


def test_shards_that_never_died_share_the_slots():
    async def scenario():
        slots, log, release = ShardSlots(3), [], asyncio.Event()
        tasks = [asyncio.create_task(_hold(slots, str(i), log, release)) for i in range(4)]
        await asyncio.sleep(0.01)
        assert log == ["start 0", "start 1", "start 2"] and slots.running == 3
        release.set()
        await asyncio.gather(*tasks)
        assert log.count("start 3") == 1 and slots.running == 0

    asyncio.run(scenario())


def test_a_cancelled_wait_to_run_alone_lets_the_others_go_on():
    async def scenario():
        slots, log, release = ShardSlots(2), [], asyncio.Event()
        held = asyncio.create_task(_hold(slots, "a", log, release))
        await asyncio.sleep(0.01)
        alone = asyncio.create_task(_hold(slots, "retried", log, asyncio.Event(), alone=True))
        await asyncio.sleep(0.01)
        other = asyncio.create_task(_hold(slots, "b", log, release))
        await asyncio.sleep(0.01)
        assert log == ["start a"]  # b waits behind the shard that runs alone
        alone.cancel()
        await asyncio.sleep(0.01)
        assert log == ["start a", "start b"]
        release.set()
        await asyncio.gather(held, other)

    asyncio.run(scenario())
