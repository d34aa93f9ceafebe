"""Passes: units of committed work, each cut into shards, committed shard by shard, indexed.

A pass (``Pass``) has a name (its markers, index and shard names carry it: ``stages.PassName``),
and cuts its work into shards named by the ids they cover (``Pass.shard_name``: the same work
always has the same name, so a resumed pass skips what is committed). The run's passes:

- ``SEEDS``: the driver commits the skipped seed rows once (``commits.commit_on_driver``);
- ``FEEDBACK``: shards of references (``workers.FeedbackWork``);
- ``SYNTHESIS``: the plan's shards of work units (``plan.py`` cuts them; ``workers.SynthesisWork``);
  both in one engine pass, on one pool of engines (``workers.RunWorker``, ``broadcast.py``);
- ``DEDUP`` and any filter: the driver commits a filter's drops (``filters/base.py``).

The commit protocol (markers, index, run_id, attempts, and the driver's own commits:
``commit_on_driver``, ``retract``) is ``records/commits.py``'s; this module absorbs an engine
pass's commits into its index as they come (``CommitLog.write_index``).

**Engine passes** (``run_engine_pass``), for the run's passes and for new ones (a judge pass of
``compare``/``select`` under its own Storage root)::

    blocks = JUDGE.cut(rows, id_key="pair_id", size=64)        # one pa.Table per shard, "shard" first
    committed = CommitLog(judge_storage, run_id="", passes=(JUDGE.name,))
    todo = JUDGE.pending(blocks, committed)                    # shards not yet committed
    results = run_engine_pass(JUDGE.name, todo, JudgeWorker, worker_args, committed, config=config,
                              engines=min(len(todo), 4))             # {pass name: PassResult}

- ``blocks``: one small pyarrow table per shard, with a ``shard`` column (every row the same
  name) and the worker's ``id_column``. Ray Data gets one block per shard: a task is one shard,
  and a retried task redoes one shard at most.
- ``worker``: a ``workers._EngineWorker`` subclass (``pass_name``, ``id_column``, ``process``,
  ``abandon``; a worker of several passes hands each shard to its pass's ``PassWork``: ``work_for``). Its actors each host one engine (``engine_map_args``: the pool, the engine kind's
  resources, Ray's restarts and retries); ``worker_args`` are its constructor's keyword arguments
  (``engine_args``: config_json, secrets, run_id, submission, ...). A worker commits to
  ``Storage(config.output)``; one committing elsewhere sets ``self.storage`` in its ``__init__``
  (the driver's ``CommitLog`` must read that same Storage), with the ``run_id`` that log reads.
- ``committed``: the pass's ``CommitLog``; commits are added to it and absorbed into the pass's
  index as they come (every ``INDEX_EVERY_SHARDS``, and at the end whatever happens).
- Faults, as for the run's passes: an engine that refuses its settings raises ``UserError``, an
  outage ``RunStopped`` (committed shards kept: a resubmission resumes), an engine death restarts
  the actor (``workers.py``), a shard whose engine dies every time becomes the worker's rejects;
  any other error of Ray's execution stops the run (``RunStopped``, one line). Ray Data's own
  no-progress timeout is off (``NO_PROGRESS_TIMEOUT_OFF``).
- Returns a ``PassResult`` per pass: shards committed now, seconds, summed ``ShardStats``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from refed_ray.config import RunConfig
from refed_ray.engines.kinds import engine_kind
from refed_ray.errors import RunStopped, UserError
from refed_ray.records import commits
from refed_ray.records.commits import Commit, CommitLog
from refed_ray.records.stages import PassName
from refed_ray.records.stats import ShardStats
from refed_ray.run.workers import MISCONFIGURED, OUTAGE
from refed_ray.storage import Storage

log = logging.getLogger(__name__)

INDEX_EVERY_SHARDS = 200  # commits absorbed into the index at once: bounds the markers a restart reads
# Ray Data's no-progress guard (DataContext.execution_no_progress_timeout_s, 1800 s by default in
# Ray 2.60, RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S) fails a pass when no block moves for that
# long. Here a block is a whole shard, which may take longer than that on a GPU, and GPU nodes
# may take longer than that to join an autoscaling cluster. The run has its own watchdogs (a
# hung engine: workers.hang_timeout_s; an outage: workers.outage_patience_s), so the guard is
# off: -1 is the value ray/data/_internal/execution/no_progress_guard.py takes to disable it.
NO_PROGRESS_TIMEOUT_OFF = -1


@dataclass(frozen=True)
class Pass:
    """A pass's name and how its shards are cut and named."""

    name: str

    def shard_name(self, ids: list[str]) -> str:
        """A shard is named by the ids it covers: the same work always has the same name."""
        return commits.shard_name(self.name, ids)

    def cut(self, rows: list[dict[str, Any]], id_key: str, size: int) -> list[pa.Table]:
        """``rows`` in shards of ``size`` consecutive rows, one table each, with its ``shard`` name."""
        shards = [rows[i:i + size] for i in range(0, len(rows), size)]
        named = [(self.shard_name([r[id_key] for r in shard]), shard) for shard in shards]
        return [pa.Table.from_pylist([{"shard": name, **r} for r in shard]) for name, shard in named]

    def pending(self, blocks: list[pa.Table], committed: CommitLog) -> list[pa.Table]:
        """The blocks whose shard is not committed yet."""
        done = committed.commits.get(self.name, {})
        return [block for block in blocks if block.column("shard")[0].as_py() not in done]


SEEDS, FEEDBACK, SYNTHESIS, DEDUP, JUDGE = (Pass(name) for name in PassName)


@dataclass
class PassResult:
    shards: int = 0
    seconds: float = 0.0
    stats: ShardStats = field(default_factory=ShardStats)

    def __iadd__(self, other: PassResult) -> PassResult:
        self.shards += other.shards
        self.seconds += other.seconds
        self.stats += other.stats
        return self


def _stopped(pass_name: str, err: Exception) -> RunStopped:
    """Whatever else ended a pass's execution (Ray Data's own errors, a cluster that went away):
    one line for the user, exit 3, no traceback (Ray Data keeps its own in its log file)."""
    log.debug("the %s pass's execution failed", pass_name, exc_info=err)
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return RunStopped(
        f"the {pass_name} pass stopped: Ray's execution failed ({type(err).__name__}: {first}). "
        "Committed shards are kept: submit the same command again to resume."
    )


# ---- engine passes -------------------------------------------------------------------------


def run_engine_pass(
    label: str, blocks: list[pa.Table], worker: type, worker_args: dict[str, Any], committed: CommitLog, *,
    config: RunConfig, engines: int, progress: AbstractContextManager | None = None,
    index_every: int = INDEX_EVERY_SHARDS, on_commit: Callable[[Commit], None] | None = None,
) -> dict[str, PassResult]:
    """Run ``worker`` actors over ``blocks`` (one shard each) and drain their commits into
    ``committed``; see the module's docstring. ``label``: the pass as messages name it (blocks
    of several passes, as the run's engine pass has: ``RunWorker``, say "feedback and synthesis").
    ``engines``: the pool's size before ``workers.num_engines`` bounds it. ``progress``: entered
    while the pass drains. ``index_every``: commits absorbed into the index at once.
    ``on_commit``: called with each commit as it comes (the run's feedback broadcast and reserve
    shards: ``broadcast.py``, ``reserve.py``). Returns each pass's ``PassResult``."""
    if not blocks:
        return {}
    dataset = engine_dataset(blocks, worker, worker_args, config, engines)
    with progress or nullcontext():
        return drain(dataset, committed, label, index_every, on_commit)


def engine_worker_args(config: RunConfig, root: Storage, secrets: dict[str, str], run_id: str) -> dict[str, Any]:
    """The constructor arguments of an engine pass's workers (``workers._EngineWorker``), made on
    the driver once per command: every pass of the command shares them, and with them its engine
    kind's driver-side helpers (the openai rate limiter), alive until the command ends."""
    return {
        # Workers get the root's full URI: their working directory is not the driver's.
        "config_json": config.model_copy(update={"output": root.full_uri()}).model_dump_json(),
        # Secrets travel through the object store, never in the config or a runtime env.
        "secrets": [ray.put(secrets)],
        # Commits carry the run's id; engine deaths count per driver process ("submission"): commits.py.
        "run_id": run_id,
        "submission": uuid.uuid4().hex[:12],
        **engine_kind(config.engine.kind).driver_args(config.engine),
    }


def check_engines_fit(config: RunConfig) -> None:
    """Once Ray is up, before a pass: one engine's GPUs must fit on one node (an actor cannot span
    nodes). A cluster with no GPU node yet waits for one, as an autoscaler starting GPU workers
    from zero needs; a cluster whose GPU nodes are all too small is refused at once instead of
    waiting for ever. (An autoscaler whose bigger GPU node type has no node up yet is refused
    too: start one first, e.g. with min_workers.)"""
    gpus = engine_kind(config.engine.kind).actor_resources(config.engine).get("num_gpus", 0)
    if not gpus:
        return
    largest = max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if not largest:
        log.warning("no GPU node in the Ray cluster yet: the engines (%g GPUs each) wait for one to join", gpus)
    elif largest < gpus:
        raise UserError(
            f"one engine needs {gpus:g} GPUs on one node (engine.tensor_parallel_size x "
            f"engine.pipeline_parallel_size), but the largest GPU node of the Ray cluster has {largest:g}: "
            f"lower --tensor-parallel-size, or add nodes with {gpus:g} GPUs or more"
        )


def engine_dataset(blocks: list[pa.Table], worker: type, worker_args: dict[str, Any], config: RunConfig,
                   engines: int) -> ray.data.Dataset:
    """The pass as a lazy Ray Dataset: one Ray block per shard, so a task is one shard and a
    retried task redoes one shard at most.

    ``map_batches_internal``, not ``map_batches``: Ray 2.60's public method refuses
    ``batch_size=None`` with ``num_gpus > 0`` ("You must provide `batch_size` ... when requesting
    GPUs"), i.e. every GPU engine. A whole block must stay one batch (a number would let Ray merge
    shards into one task), so the pass takes the same DeveloperAPI that Ray's own ``map_groups``
    takes for the same reason; it differs only in skipping that check."""
    dataset = ray.data.from_arrow(blocks).map_batches_internal(
        worker, fn_constructor_kwargs=worker_args, **engine_map_args(config, engines)
    )
    # The executor runs on the driver, built from this Dataset's own DataContext
    # (Dataset._create_executor): set here, it holds for this pass whatever the process default.
    dataset.context.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT_OFF
    return dataset


def engine_map_args(config: RunConfig, engines: int) -> dict[str, Any]:
    """map_batches arguments shared by every engine pass: pool, resources, fault tolerance."""
    workers = config.workers
    resources = engine_kind(config.engine.kind).actor_resources(config.engine)
    return dict(
        batch_size=None,  # the whole block, i.e. the whole shard, is one batch
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            size=min(workers.num_engines, engines),  # no engine loads for a pass with less work
            max_tasks_in_flight_per_actor=workers.shards_in_flight,
            max_concurrent_calls_per_actor=workers.shards_in_flight,  # async actor: shards overlap
        ),
        # Ray 2.60 has no named parameter for these two yet, hence its deprecation warning on
        # "ray_remote_args". Unbounded by default: spot clusters lose nodes as long as they run.
        max_restarts=workers.max_restarts,
        max_task_retries=workers.max_task_retries,
        **resources,
    )


def drain(dataset, committed: CommitLog, label: str, index_every: int = INDEX_EVERY_SHARDS,
          on_commit: Callable[[Commit], None] | None = None) -> dict[str, PassResult]:
    """Run a pass to the end, absorbing its commits into each pass's index as they come."""
    results: dict[str, PassResult] = {}
    unindexed: dict[str, int] = {}
    started = time.time()
    try:
        # No prefetch: Ray Data's prefetcher holds each finished block back until the next one
        # comes, so the driver (its index, its progress line) would learn of a commit a shard late.
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            for line in batch.column("commit").to_pylist():
                commit = Commit.model_validate_json(line)
                committed.add(commit)
                result = results.setdefault(commit.pass_name, PassResult())
                result.stats += commit.stats
                result.shards += 1
                unindexed[commit.pass_name] = unindexed.get(commit.pass_name, 0) + 1
                if on_commit is not None:
                    on_commit(commit)
            for pass_name in [name for name, count in unindexed.items() if count >= index_every]:
                committed.write_index(pass_name)
                unindexed[pass_name] = 0
    except Exception as err:
        raise _stopped_by(label, err) from None
    finally:
        for pass_name in unindexed:
            committed.write_index(pass_name)
    for result in results.values():
        result.seconds = time.time() - started  # the passes share the engines for the whole drain
    return results


def _stopped_by(label: str, err: Exception) -> Exception:
    """The error that ended a pass, as the user reads it: settings (exit 2), an outage or anything
    else (exit 3), in one line."""
    if MISCONFIGURED in str(err):
        reason = str(err).split(MISCONFIGURED + ": ", 1)[-1].splitlines()[0]
        return UserError(f"the {label} pass stopped: {reason}")
    if OUTAGE in str(err):
        reason = str(err).split(OUTAGE + ": ", 1)[-1].splitlines()[0]
        return RunStopped(
            f"the {label} pass stopped: the engine was unavailable ({reason}). Nothing was "
            "recorded as rejected for it, and committed shards are kept: submit the same command "
            "again to resume."
        )
    return _stopped(label, err)
