"""Ray Data actors. Each hosts ONE engine and commits one shard per batch it finishes.

The shared reference-level feedback reaches every actor once, at construction, as a broadcast
``ObjectRef`` (Ray Data does not dereference refs in ``fn_kwargs``, so it travels inside a list
in ``fn_constructor_kwargs``). ``__call__`` is async: the actor works on several batches at once
and every unit of a batch runs its chain concurrently on the one engine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from refed_ray.config import RunConfig
from refed_ray.engines.base import EngineDead, create_engine
from refed_ray.feedback import collect_feedback
from refed_ray.records import Feedback, Reference, Reject, Sample, WorkUnit, to_table
from refed_ray.stats import StageStats, merge
from refed_ray.storage import Storage
from refed_ray.synthesis import synthesize_unit

log = logging.getLogger(__name__)

STATS_SCHEMA = pa.schema([("shard", pa.string()), ("stats", pa.string())])


class _EngineWorker:
    pass_name: str
    id_column: str

    def __init__(self, config_json: str, secrets: list[ray.ObjectRef], rate_limiter: list | None = None):
        # Secrets (an API key) come from the driver's environment through the object store, so
        # they never appear in the config, the runtime env or any log.
        os.environ.update(ray.get(secrets[0]))
        self.config = RunConfig.model_validate_json(config_json)
        self.storage = Storage(self.config.output, self.config.storage_options)
        self.engine = create_engine(self.config.engine, rate_limiter[0] if rate_limiter else None)
        # Ray Data runs several batches of an async UDF at once within one task, on top of the
        # tasks an actor takes in parallel: this caps what the actor works on at batches_in_flight.
        self.batch_slots = asyncio.Semaphore(self.config.workers.batches_in_flight)

    async def __call__(self, batch: pa.Table):
        ids = batch.column(self.id_column).to_pylist()
        attempt = await asyncio.to_thread(self.storage.start_attempt, self.pass_name, ids)
        try:
            async with self.batch_slots:
                tables, stats = await self.process(batch.to_pylist())
        except EngineDead as err:
            # Exit the actor: Ray restarts it (max_restarts) with a fresh engine and retries
            # its in-flight batches (max_task_retries). Nothing of this batch was committed.
            log.error("engine died, restarting the actor: %s", err)
            os._exit(1)
        # Off the event loop: a shard's writes (object-store PUTs) must not stall the other
        # batches' requests to the engine.
        marker = await asyncio.to_thread(self.storage.commit_shard, self.pass_name, ids, tables, stats, attempt)
        yield pa.table({"shard": [marker.shard], "stats": [json.dumps(marker.stats)]}, STATS_SCHEMA)

    async def process(self, rows: list[dict[str, Any]]):
        raise NotImplementedError


class FeedbackWorker(_EngineWorker):
    """Stage 1 over a batch of references."""

    pass_name = "feedback"
    id_column = "reference_id"

    async def process(self, rows):
        references = [Reference(**row) for row in rows]
        results = await asyncio.gather(
            *(collect_feedback(self.engine, ref, self.config) for ref in references)
        )
        stats = StageStats()
        for result in results:
            stats += result.stats
        tables = {
            "feedback": to_table([r.feedback for r in results if r.feedback], Feedback),
            "rejects": to_table([reject for r in results for reject in r.rejects], Reject),
        }
        return tables, {"feedback": stats.model_dump()}


class SynthesisWorker(_EngineWorker):
    """Stages 2-4 over a batch of work units, with the broadcast feedback table."""

    pass_name = "synthesis"
    id_column = "unit_id"

    def __init__(self, config_json: str, secrets: list[ray.ObjectRef], feedback: list[ray.ObjectRef], **kwargs):
        super().__init__(config_json, secrets, **kwargs)
        self.feedback: dict[str, Feedback] = ray.get(feedback[0])

    async def process(self, rows):
        units = [WorkUnit(**row) for row in rows]
        results = await asyncio.gather(
            *(synthesize_unit(self.engine, u, self.feedback.get(u.reference_id), self.config) for u in units)
        )
        stats: dict[str, StageStats] = {}
        for result in results:
            merge(stats, result.stats)
        tables = {
            "data": to_table([s for r in results for s in r.samples], Sample),
            "rejects": to_table([j for r in results for j in r.rejects], Reject),
        }
        return tables, {k: v.model_dump() for k, v in stats.items()}


def skip_committed(batch: pa.Table, id_column: str, committed: list[ray.ObjectRef]) -> pa.Table:
    """Drops rows whose id a committed shard already covers (the resume filter).

    A plain function, not an actor: Ray Data fuses it into the read tasks, so it takes no CPU of
    its own (an actor here starved the reads of a 2-core machine whose other core hosts the engine).
    """
    return batch.filter(pc.invert(pc.is_in(batch[id_column], value_set=_committed_ids(committed[0]))))


@functools.lru_cache(maxsize=4)
def _committed_ids(ref: ray.ObjectRef) -> pa.Array:
    return pa.array(ray.get(ref), pa.string())  # once per worker process, not once per batch
