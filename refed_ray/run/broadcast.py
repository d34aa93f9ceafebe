"""The broadcast of the reference-level feedback, while the same engines collect it.

The run's engines work through one Ray Data pass: the feedback shards first, then the synthesis
shards (``pipeline.py``). Ray Data hands an actor pool its blocks in order (Ray 2.60's actor pool
operator dispatches from a FIFO queue), so every feedback shard is running or done before any
synthesis shard starts; a synthesis shard then waits, without holding one of the actor's shard
slots, until the feedback is complete. When the last feedback shard commits, the driver reads
the committed feedback once, puts it in the object store, and hands that one ``ObjectRef`` to a
board actor; every engine actor fetches it from there once (``workers.FeedbackCopy``). Each
engine thus loads once for both passes, and the GPUs go from the feedback straight to synthesis.

A resumed run whose feedback is all committed publishes at once: nothing waits.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from refed_ray.records.commits import Commit, CommitLog
from refed_ray.records.models import Feedback
from refed_ray.records.stages import PassName
from refed_ray.storage import Storage

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class FeedbackBoard:
    """Where engine actors wait for the feedback: one ``ObjectRef`` (in a list, so Ray hands
    the reference itself, not its value) once the driver publishes it."""

    def __init__(self):
        self.published = asyncio.Event()
        self.refs: list[ray.ObjectRef] = []

    async def publish(self, refs: list[ray.ObjectRef]) -> None:
        self.refs = refs
        self.published.set()

    async def feedback(self) -> list[ray.ObjectRef]:
        await self.published.wait()
        return self.refs


class FeedbackBroadcast:
    """The driver's side: publishes the feedback when the last of ``feedback_shards`` commits."""

    def __init__(self, storage: Storage, committed: CommitLog, feedback_shards: set[str]):
        self.storage, self.committed = storage, committed
        self.waiting = set(feedback_shards) - set(committed.commits[PassName.FEEDBACK])
        # On the driver's node: a board lost with a spot node would restart empty, and the
        # engines would wait for a feedback the driver already published. The driver's node
        # lives as long as the run does.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = FeedbackBoard.options(scheduling_strategy=here).remote()
        self.ref: ray.ObjectRef | None = None  # held here: the driver owns the broadcast object
        if not self.waiting:
            self.publish()

    def on_commit(self, commit: Commit) -> None:
        if commit.pass_name != PassName.FEEDBACK or self.ref is not None:
            return
        self.waiting.discard(commit.shard)
        if not self.waiting:
            self.publish()

    def publish(self) -> None:
        feedback = read_feedback(self.storage, self.committed)
        log.info("feedback on %d references broadcast to the engines", len(feedback))
        self.ref = ray.put(feedback)
        self.board.publish.remote([self.ref])

    def worker_args(self) -> dict:
        """The synthesis side's ``feedback``: the board to wait on."""
        return {"feedback": [self.board]}


def read_feedback(storage: Storage, committed: CommitLog) -> dict[str, Feedback]:
    """Every reference's committed feedback (the first commit of it, should a shard have two)."""
    feedback: dict[str, Feedback] = {}
    for name in committed.files(PassName.FEEDBACK):
        for row in storage.read_table(name).to_pylist():
            feedback.setdefault(row["reference_id"], Feedback(**row))
    return feedback
