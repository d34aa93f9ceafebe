"""Ray Data actors. Each hosts ONE engine; each task is ONE shard, committed when it finishes.

A task is a whole shard (the plan decides shards; the pipeline hands Ray Data one block per
shard), so whatever Ray retries is at most the shards in flight on an actor, never committed work:
a task first checks whether its shard was committed by an earlier attempt of this run.

The run's actor (``RunWorker``) serves both engine passes with one engine: feedback shards, then
synthesis shards (``PassWork`` each). The shared reference-level feedback reaches every actor
once, as one broadcast ``ObjectRef`` fetched from a board actor when the first synthesis shard
needs it (``broadcast.py``; Ray Data does not dereference refs in ``fn_kwargs``, so the board
travels inside a list in ``fn_constructor_kwargs``). ``__call__`` is async: the actor works on
several shards at once and every unit of a shard runs its chain concurrently on the one engine.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import socket
from typing import Any

import pyarrow as pa
import ray

from refed_ray.config import RunConfig
from refed_ray.engines.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineDead,
    EngineMisconfigured,
    EngineUnavailable,
)
from refed_ray.engines.guard import GuardedEngine, shard_counters, shard_order
from refed_ray.engines.kinds import create_engine
from refed_ray.method.feedback import collect_feedback
from refed_ray.method.refiners import refiner_for
from refed_ray.method.synthesis import EarlierUnit, refine_earlier_unit, synthesize_unit
from refed_ray.records import commits
from refed_ray.records.models import Feedback, Reference, Reject, Sample, WorkUnit, to_table
from refed_ray.records.stages import PassName, Stage
from refed_ray.records.stats import ShardStats, StageStats, merge
from refed_ray.run.instructions_from import EarlierRun, earlier_units
from refed_ray.run.slots import ShardSlots, alone_at
from refed_ray.storage import Storage

log = logging.getLogger(__name__)

COMMIT_SCHEMA = pa.schema([("commit", pa.string())])
OUTAGE = "refed-ray outage"  # how the driver recognises an outage among a failed pass's errors
MISCONFIGURED = "refed-ray misconfigured"  # ... and engine settings the API refused


class PassWork:
    """One pass's work on a shard: its pass, its rows' id column, and what to do with them. A
    worker of one pass is its own (``_EngineWorker``); ``RunWorker`` holds one per pass."""

    pass_name: str
    id_column: str
    engine: Engine
    config: RunConfig

    async def wanted(self, shard: str) -> bool:
        """Whether to work on ``shard`` (a reserve shard may not be needed: ``run/reserve.py``)."""
        return True

    async def ready(self) -> None:
        """Wait for what the shard's work needs before it takes a slot (synthesis: the feedback)."""

    async def process(self, rows: list[dict[str, Any]]) -> tuple[dict[str, pa.Table], dict[str, StageStats]]:
        raise NotImplementedError

    def abandon(self, rows: list[dict[str, Any]], attempts: int) -> dict[str, pa.Table]:
        """A shard whose engine died on every attempt (a poison input): rejects, with the reason."""
        raise NotImplementedError


class _EngineWorker(PassWork):
    def __init__(self, config_json: str, secrets: list[ray.ObjectRef], run_id: str, submission: str,
                 rate_limiter: list | None = None):
        # The run this actor works for (its commits carry it) and the driver process that started
        # it (engine deaths count within one): see commits.py.
        self.run_id, self.submission = run_id, submission
        # Secrets (an API key) come from the driver's environment through the object store, so
        # they never appear in the config, the runtime env or any log.
        os.environ.update(ray.get(secrets[0]))
        self.config = RunConfig.model_validate_json(config_json)
        self.storage = Storage(self.config.output, self.config.storage_options)
        _check_output_visible(self.storage)
        workers = self.config.workers
        self.engine = GuardedEngine(
            _start_engine(self.config, rate_limiter[0] if rate_limiter else None),
            requests_in_flight=workers.requests_in_flight,
            outage_patience_s=workers.outage_patience_s,
            hang_timeout_s=workers.hang_timeout_s,
        )
        # Ray Data may hand an async actor more shards than it should work on at once.
        self.shard_slots = ShardSlots(workers.shards_in_flight)
        self.shards_started = itertools.count()  # the engine admits the calls of older shards first
        # Ray Data ends a pass by letting its actors exit: the engine stops then, with the
        # interpreter intact. Not in __del__: vLLM keeps an import error's traceback, whose frames
        # hold this worker until interpreter teardown.
        atexit.register(self.engine.shutdown)

    def work_for(self, shard: str) -> PassWork:
        """What does ``shard``'s work: the worker itself for a worker of one pass (its
        ``pass_name``, ``id_column``, ``process``, ``abandon``); ``RunWorker`` picks by the shard's pass."""
        return self

    async def __call__(self, batch: pa.Table):
        shard = batch.column("shard")[0].as_py()
        work = self.work_for(shard)
        ids = batch.column(work.id_column).to_pylist()
        # Off the event loop: storage requests must not stall the other shards' engine calls.
        commit = await asyncio.to_thread(
            commits.find_commit, self.storage, work.pass_name, shard, self.run_id
        )
        if commit is None and not await work.wanted(shard):
            yield COMMIT_SCHEMA.empty_table()  # a reserve shard the run does not need: nothing to commit
            return
        if commit is None:
            await work.ready()  # before a slot: a shard waiting for the feedback holds none
            history = await asyncio.to_thread(
                commits.attempt_history, self.storage, work.pass_name, shard, self.submission
            )
            last_attempt = history.deaths >= alone_at(self.config.workers.max_shard_attempts)
            async with self.shard_slots.take(alone=last_attempt):
                attempt = await asyncio.to_thread(history.start)
                try:
                    commit = await self._attempt(work, attempt, shard, ids, batch.to_pylist())
                except BaseException:
                    # This process lives on, so whatever ended the attempt (an outage, a cancelled
                    # task, a failed write) was no engine death: it must not count as one.
                    await _end_cleanly(attempt)
                    raise
        yield pa.table({"commit": [commit.model_dump_json()]}, COMMIT_SCHEMA)

    async def _attempt(
        self, work: PassWork, attempt: commits.Attempt, shard: str, ids: list[str],
        rows: list[dict[str, Any]],
    ) -> commits.Commit:
        counters: dict[str, int] = {}
        shard_counters.set(counters)  # this task's context: its chains count their outage retries here
        shard_order.set(next(self.shards_started))  # its calls go before those of shards started later
        if attempt.deaths >= self.config.workers.max_shard_attempts:
            tables, stages = work.abandon(rows, attempt.deaths), {}
        else:
            try:
                tables, stages = await work.process(rows)
            except EngineDead as err:
                # Exit the actor: Ray restarts it with a fresh engine and retries its shards.
                # Nothing of this shard was committed, and its attempt has no end: a death.
                log.error("engine died, restarting the actor: %s", err)
                logging.shutdown()
                os._exit(1)
            except EngineUnavailable as err:
                # Fails the pass: the driver stops the run with this message; the shard stays
                # uncommitted and a resubmission redoes it.
                raise RuntimeError(f"{OUTAGE}: {err}") from None
            except EngineMisconfigured as err:
                # Fails the pass at once: no call can succeed until the settings are fixed.
                raise RuntimeError(f"{MISCONFIGURED}: {err}") from None
        stats = ShardStats.of(tables, stages, counters.get("outage_retries", 0))
        commit = await asyncio.to_thread(
            commits.commit_shard, self.storage, work.pass_name, shard, ids, tables, stats, attempt.number,
            self.run_id,
        )
        await _forget(attempt)
        return commit



def _start_engine(config: RunConfig, rate_limiter: Any) -> Engine:
    """The actor's engine, or where it refuses its settings on this node (a model folder the node
    lacks, a model the hub refuses) one that refuses every call with that message: the first
    shard then fails the pass as a refused setting (exit 2, one line). Raised here, Ray Data would
    report the actor's death with a traceback instead."""
    try:
        return create_engine(config.engine, rate_limiter)
    except EngineMisconfigured as err:
        log.error("the engine refused its settings: %s", err)
        return _Refusing(str(err))


class _Refusing(Engine):
    """An engine that could not start for its settings: every call says why."""

    model_name = "refused"

    def __init__(self, reason: str):
        self.reason = reason

    async def complete(self, request: ChatRequest) -> Completion:
        raise EngineMisconfigured(self.reason)


async def _end_cleanly(attempt: commits.Attempt) -> None:
    # Shielded: a second cancellation must not leave the record unwritten. A failure to write it
    # only makes the attempt count as a death; the error that ended the attempt goes up instead.
    try:
        await asyncio.shield(asyncio.to_thread(attempt.end_cleanly))
    except Exception as err:  # fsspec back ends raise many types
        log.warning("could not record the clean end of %s: %s", attempt.record, err)


async def _forget(attempt: commits.Attempt) -> None:
    # The shard is committed: a failure to delete its records costs a later clean-up, not the shard.
    try:
        await asyncio.to_thread(attempt.forget)
    except Exception as err:  # fsspec back ends raise many types
        log.warning("could not delete the attempt records of %s: %s", attempt.record, err)


def _abandon_reason(deaths: int) -> str:
    return (f"shard abandoned: its engine died on each of {deaths} attempts (a poison input, or an "
            "engine that cannot run it); workers.max_shard_attempts")


class FeedbackWork(PassWork):
    """Stage 1 over a shard of references."""

    pass_name = PassName.FEEDBACK
    id_column = "reference_id"

    def __init__(self, engine: Engine, config: RunConfig):
        self.engine, self.config = engine, config

    async def process(self, rows):
        references = [Reference(**{k: v for k, v in row.items() if k != "shard"}) for row in rows]
        steps = refiner_for(self.config.feedback.mode).reference_feedback
        results = await asyncio.gather(
            *(collect_feedback(self.engine, ref, self.config, steps) for ref in references)
        )
        stats = StageStats()
        for result in results:
            stats += result.stats
        tables = {
            "feedback": to_table([r.feedback for r in results if r.feedback], Feedback),
            "rejects": to_table([reject for r in results for reject in r.rejects], Reject),
        }
        return tables, {Stage.FEEDBACK.value: stats}

    def abandon(self, rows, attempts):
        rejects = [Reject(stage=Stage.FEEDBACK, reason=_abandon_reason(attempts), reference_id=row["reference_id"],
                          source=row["source"]) for row in rows]
        return {"rejects": to_table(rejects, Reject)}


class FeedbackCopy:
    """This actor's copy of the broadcast feedback, fetched once from the run's board
    (``broadcast.FeedbackBoard``) when the first synthesis shard needs it."""

    def __init__(self, board: ray.actor.ActorHandle):
        self.board, self.table = board, None
        self.lock = asyncio.Lock()

    async def get(self) -> dict[str, Feedback]:
        async with self.lock:
            if self.table is None:
                refs = await self.board.feedback.remote()
                self.table = await refs[0]
        return self.table


class SynthesisWork(PassWork):
    """Stages 2-4 over a shard of work units, with the broadcast feedback table."""

    pass_name = PassName.SYNTHESIS
    id_column = "unit_id"

    def __init__(self, engine: Engine, config: RunConfig, feedback: FeedbackCopy, earlier: EarlierRun | None,
                 reserve: list | None):
        self.engine, self.config = engine, config
        self.feedback = feedback
        # instructions_from: the earlier run's committed files by shard (instructions_from.py).
        self.earlier = earlier
        # The pass's reserve shards and the gate that says which of them are wanted (reserve.py).
        self.reserve_gate, self.reserve_shards = (reserve[0], set(reserve[1])) if reserve else (None, set())

    async def wanted(self, shard: str) -> bool:
        if shard not in self.reserve_shards:
            return True
        try:
            return await self.reserve_gate.claim.remote(shard)
        except ray.exceptions.RayError as err:
            # Run it: the driver settles the reserve once every wanted shard has committed, so a
            # wanted shard skipped would leave the others waiting; one unneeded costs a shard's work.
            log.warning("reserve gate unreachable, running reserve shard %s: %s", shard, err)
            return True

    async def ready(self) -> None:
        await self.feedback.get()

    async def process(self, rows):
        units = [WorkUnit(**{k: v for k, v in row.items() if k != "shard"}) for row in rows]
        feedback = await self.feedback.get()
        if self.earlier is None:
            chains = [synthesize_unit(self.engine, u, feedback.get(u.reference_id), self.config) for u in units]
        else:
            earlier = await asyncio.to_thread(self._earlier_units, rows)
            chains = [refine_earlier_unit(self.engine, u, feedback.get(u.reference_id), earlier[u.unit_id],
                                          self.config) for u in units]
        results = await asyncio.gather(*chains)
        stats: dict[str, StageStats] = {}
        for result in results:
            merge(stats, result.stats)
        tables = {
            "data": to_table([s for r in results for s in r.samples], Sample),
            "rejects": to_table([j for r in results for j in r.rejects], Reject),
        }
        return tables, stats

    def _earlier_units(self, rows) -> dict[str, EarlierUnit]:
        """The earlier run's units of this shard (B's shards are A's: the same name, the same units)."""
        files = self.earlier.shard_files[rows[0]["shard"]]
        storage = Storage(self.earlier.uri, self.config.storage_options)
        return earlier_units(storage, files, rows, self.config.instructions_per_aspect)

    def abandon(self, rows, attempts):
        k = self.config.instructions_per_aspect
        rejects = [Reject(stage=Stage.ENGINE, reason=_abandon_reason(attempts), unit_id=row["unit_id"],
                          reference_id=row["reference_id"], aspect=row["aspect"], lost_samples=k)
                   for row in rows]
        return {"rejects": to_table(rejects, Reject)}


class RunWorker(_EngineWorker):
    """The run's engine actor: one engine for both of the run's engine passes, feedback shards
    and synthesis shards, told apart by their names (``commits.shard_name``: the pass first).
    ``feedback``: the board the broadcast feedback comes from (``broadcast.py``)."""

    def __init__(self, config_json: str, secrets: list[ray.ObjectRef], feedback: list[ray.actor.ActorHandle],
                 earlier: list[ray.ObjectRef] | None = None, reserve: list | None = None, **kwargs):
        super().__init__(config_json, secrets, **kwargs)
        self.works: dict[str, PassWork] = {
            PassName.FEEDBACK: FeedbackWork(self.engine, self.config),
            PassName.SYNTHESIS: SynthesisWork(self.engine, self.config, FeedbackCopy(feedback[0]),
                                              ray.get(earlier[0]) if earlier else None, reserve),
        }
        _warn_if_underfilled(self.config, self.engine.max_concurrency)

    def work_for(self, shard: str) -> PassWork:
        return self.works[commits.pass_of(shard)]


def _check_output_visible(storage: Storage) -> None:
    """An engine on a node that cannot see a local OUTPUT would write where nobody reads."""
    if storage.is_local and not storage.exists("run.json"):
        raise RuntimeError(
            f"OUTPUT {storage.uri} is a local path that this node ({socket.gethostname()}) does not "
            "share with the driver: use an object-store URI (s3://...) or a path on a file system "
            "every node mounts, with output_shared_filesystem: true"
        )


def _warn_if_underfilled(config: RunConfig, engine_batch: int | None) -> None:
    """An engine batches up to ``engine_batch`` requests (vLLM: from max_num_seqs); an actor holds
    at most one request per sample chain of its shards in flight. Fewer leaves the engine idle."""
    workers = config.workers
    chains = workers.shards_in_flight * workers.units_per_shard * config.instructions_per_aspect
    if engine_batch and chains < engine_batch:
        log.warning(
            "this engine can batch %d requests but its actor holds at most %d sample chains "
            "(workers.shards_in_flight %d x units_per_shard %d x K %d): the engine runs under-filled; "
            "raise workers.units_per_shard or workers.shards_in_flight",
            engine_batch, chains, workers.shards_in_flight, workers.units_per_shard, config.instructions_per_aspect,
        )
