"""The run, end to end: seeds -> plan -> feedback pass -> broadcast -> synthesis pass -> dedup -> top-up -> dataset -> report.

Nothing grows with N on the driver but the plan's shard list: both passes stream through Ray
Data, one task per shard, and the driver only sees one small commit row per shard.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from refed_ray import commits
from refed_ray.commits import Commit, CommitLog
from refed_ray.config import RunConfig
from refed_ray.dataset import compact_dataset
from refed_ray.dedup import accepted_samples, deduplicate, dropped_keys
from refed_ray.engines.base import load_class
from refed_ray.errors import RunStopped, UserError
from refed_ray.instructions_from import EarlierRun, copy_plan, read_earlier_run
from refed_ray.output import check_output, refuse_local_output_on_cluster, run_fingerprint, start_output
from refed_ray.plan import (
    PlanSummary, pending_shards, read_plan, references_reached, top_up_units, units_needed, write_plan,
)
from refed_ray.quality import data_quality
from refed_ray.records import Feedback, Reference, Reject, to_table
from refed_ray.report import build_report
from refed_ray.restart_warning import explain_restart_warning
from refed_ray.seeds import SeedSet, read_seeds
from refed_ray.stats import ShardStats
from refed_ray.status import ProgressLog
from refed_ray.storage import Storage
from refed_ray.views import write_views_after_run
from refed_ray.workers import MISCONFIGURED, OUTAGE, FeedbackWorker, SynthesisWorker

log = logging.getLogger(__name__)
INDEX_EVERY_SHARDS = 200  # commits absorbed into the index at once: bounds the markers a restart reads
PROGRESS_EVERY_S = 60  # how often the driver logs its progress line


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


@dataclass
class Preflight:
    """What a run checked and read before Ray starts."""

    storage: Storage
    seeds: SeedSet
    fingerprint: dict[str, str]
    resumed: bool
    secrets: dict[str, str]
    earlier: EarlierRun | None = None  # instructions_from: the run whose units this one reuses


def preflight(config: RunConfig, force_new: bool = False) -> Preflight:
    """Every check a run makes before Ray starts (``refed-ray plan`` makes the same): every user
    error surfaces here, before anything is written (the write probe is deleted at once) or any
    model loads."""
    storage = Storage(config.output, config.storage_options)
    storage.check_writable()
    _check_engine(config)
    secrets = _engine_secrets(config)
    seeds = read_seeds(config.seeds, config.max_bad_seeds, config.seeds_options())
    fingerprint = run_fingerprint(config, seeds)
    earlier = None
    if config.instructions_from:
        earlier = read_earlier_run(config, fingerprint["references"], storage.full_uri())
        fingerprint["instructions_from"] = earlier.label
    resumed = check_output(storage, config, fingerprint, force_new)
    return Preflight(storage, seeds, fingerprint, resumed, secrets, earlier)


def run(config: RunConfig, force_new: bool = False) -> dict[str, Any]:
    started = time.time()
    checked = preflight(config, force_new)
    storage, seeds, resumed = checked.storage, checked.seeds, checked.resumed
    _connect_ray()
    refuse_local_output_on_cluster(storage, config)
    run_id = start_output(storage, config, checked.fingerprint, force_new)

    committed = CommitLog(storage)
    committed.remove_leftovers()
    _commit_seed_rejects(storage, committed, seeds)
    reference_ids = [ref.reference_id for ref in seeds.references]
    plan = _first_plan(storage, committed, config, reference_ids, checked.earlier)
    log.info("plan: %d units in %d shards over %d rounds, %d references",
             plan.units, plan.shards, plan.rounds, len(plan.references_used))

    config = _resolve_device(config)
    # Workers get the output's full URI: their working directory is not the driver's.
    worker_config = config.model_copy(update={"output": storage.full_uri()})
    # engine_args keeps the run's shared rate limiter (if any) alive until the run ends.
    engine_args = {
        "config_json": worker_config.model_dump_json(),
        "secrets": [ray.put(checked.secrets)],
        # Commits carry the run's id; engine deaths count per driver process ("submission"): commits.py.
        "run_id": run_id,
        "submission": uuid.uuid4().hex[:12],
        **_rate_limiter(config),
    }
    units_before = len(committed.ids("synthesis"))
    this_run = PassResult()
    reached = feedback_references(reference_ids, config, plan.units)
    _feedback_pass(committed, config, engine_args, [r for r in seeds.references if r.reference_id in reached])
    synthesis_args = {**engine_args, "feedback": [ray.put(_read_feedback(storage, committed))],
                      **({"earlier": [ray.put(checked.earlier)]} if checked.earlier else {})}
    while True:
        this_run += _synthesis_pass(storage, committed, config, synthesis_args)
        deduplicate(storage, committed, config.dedup)
        more = _top_up_units(committed, config, plan.units) if checked.earlier is None else 0
        if not more:
            break
        log.info("top-up: %d samples short of %d, planning %d more units", config.num_samples
                 - accepted_samples(committed, config.dedup), config.num_samples, more)
        plan = write_plan(
            storage, reference_ids, config.num_samples, config.instructions_per_aspect, config.seed,
            config.workers.units_per_shard, units=plan.units + more,
        )
    dataset = compact_dataset(storage, committed, config.dataset_file_mb, max_rows=config.num_samples,
                              dropped=dropped_keys(storage, committed, config.dedup))

    quality = data_quality(storage, dataset["files"], seeds.references, config.dedup.ngram, config.seed)
    report = build_report(
        committed, config, seeds, plan, dataset, resumed=resumed, units_before=units_before,
        this_run=this_run, wall_seconds=time.time() - started, quality=quality,
    )
    report["shortfall"] = _shortfall(config, report, plan.units)
    storage.write_json("report.json", report)
    write_views_after_run(storage, report)  # report.html and the dataset card
    return report


def _first_plan(storage: Storage, committed: CommitLog, config: RunConfig, reference_ids: list[str],
                earlier: EarlierRun | None) -> PlanSummary:
    """The plan for N, or with instructions_from the earlier run's own plan (its units are all
    there are: no top-up round follows)."""
    if earlier is not None:
        log.info("instructions_from %s: its plan is this run's, and its units are all there are "
                 "(no top-up round)", earlier.label)
        return copy_plan(earlier, storage, config)
    return write_plan(
        storage, reference_ids, config.num_samples, config.instructions_per_aspect, config.seed,
        config.workers.units_per_shard, keep_existing=bool(committed.commits["synthesis"]),
    )


def _top_up_units(committed: CommitLog, config: RunConfig, planned_units: int) -> int:
    """Units to add so that N samples are accepted despite rejects and duplicates."""
    accepted = accepted_samples(committed, config.dedup)
    short = config.num_samples - accepted
    budget = max_units(config) - planned_units
    if short > 0 and budget <= 0:
        log.warning("%d samples short of %d: the top-up budget (max_extra_units=%g) is spent", short,
                    config.num_samples, config.max_extra_units)
    return top_up_units(short, accepted, len(committed.ids("synthesis")), config.instructions_per_aspect, budget)


def _shortfall(config: RunConfig, report: dict[str, Any], planned_units: int) -> dict[str, Any] | None:
    """Why a run delivered fewer than N samples and what completes it; None when it delivered N.
    The CLI exits with a status of its own on it (``errors.RunShort``)."""
    missing = config.num_samples - report["delivered"]
    if missing <= 0:
        return None
    k, base = config.instructions_per_aspect, units_needed(config.num_samples, config.instructions_per_aspect)
    why = [f"{report['rejected_samples']} of {report['plan']['planned_samples']} planned samples were rejected "
           "(report.json: rejects.by_reason)"]
    for prefix, units_that in _WHOLE_UNITS_LOST:
        units = sum(n for reason, n in report["rejects"]["by_reason"].items() if reason.startswith(prefix))
        if units:
            why.append(f"{units} units ({units * k} samples) {units_that}")
    if report["samples"] == 0:
        why.append("no unit yielded a sample, so no top-up can be sized")
        advice = "fix what rejected them (rejects/ holds each reason), then start again with --force-new"
    else:
        why.append(f"the top-up budget is spent (max_extra_units={config.max_extra_units:g}: "
                   f"{planned_units - base} units beyond the {base} that N needs)")
        # What the resumed run would plan at this run's yield, margin included.
        more = top_up_units(missing, report["samples"], report["units"]["committed"], k, budget=10**9)
        needed = math.ceil(10 * (planned_units + more - base) / base) / 10
        advice = (f"raise max_extra_units to {needed:g} (--max-extra-units or the config) and submit the same "
                  "command again: committed work is kept and only the missing samples are made")
        if needed > _MAX_EXTRA_UNITS:
            advice = (f"the yield is too low for any top-up budget (it would take max_extra_units={needed:g}, "
                      f"at most {_MAX_EXTRA_UNITS:g}): fix what rejects samples first (rejects/ holds each reason)")
    message = f"delivered {report['delivered']} of {config.num_samples} samples: {'; '.join(why)}. To complete it, {advice}."
    return {"missing": missing, "message": message}


# Reject reasons (report.json's rejects.by_reason) that lose whole units, and what to say of them.
_WHOLE_UNITS_LOST = (
    ("feedback: no feedback", "whose reference got no feedback"),
    ("engine: shard abandoned", "in shards abandoned after workers.max_shard_attempts engine deaths"),
)
_MAX_EXTRA_UNITS = next(m.le for m in RunConfig.model_fields["max_extra_units"].metadata if hasattr(m, "le"))


def feedback_references(reference_ids: list[str], config: RunConfig, planned_units: int) -> set[str]:
    """The references whose feedback the run collects: every one the plan can reach with its top-up
    budget, in one pass (a few calls per reference cost less than loading the engines again for a
    top-up round's feedback)."""
    return references_reached(reference_ids, config.seed, max(planned_units, max_units(config)))


def max_units(config: RunConfig) -> int:
    """The most units a run for N may plan: ceil(N/K) and its top-up budget (``max_extra_units``,
    a share of the ceil(N/K) units the run needs without rejects)."""
    base = units_needed(config.num_samples, config.instructions_per_aspect)
    return base + math.floor(base * config.max_extra_units)


def _commit_seed_rejects(storage: Storage, committed: CommitLog, seeds: SeedSet) -> None:
    """The seed rows skipped as bad or multi-turn, recorded once per output."""
    if committed.commits["seeds"]:
        return
    tables = {"rejects": to_table(seeds.skipped, Reject)}
    shard = commits.shard_name("seeds", ["seeds"])
    committed.add(commits.commit_shard(storage, "seeds", shard, ["seeds"], tables, ShardStats.of(tables, {})))
    committed.write_index("seeds")


def _feedback_pass(committed: CommitLog, config: RunConfig, engine_args: dict, references: list[Reference]) -> None:
    done = committed.ids("feedback")
    todo = [ref.model_dump() for ref in references if ref.reference_id not in done]
    if not todo:
        return
    size = config.workers.units_per_shard
    shards = [todo[i:i + size] for i in range(0, len(todo), size)]
    blocks = [
        pa.Table.from_pylist([{"shard": commits.shard_name("feedback", [r["reference_id"] for r in shard]), **r}
                              for r in shard])
        for shard in shards
    ]
    log.info("collecting feedback on %d references in %d shards (%d already done)", len(todo), len(blocks), len(done))
    # A few calls a reference: a pool sized to that work, not to synthesis, so most engines load once.
    engines = min(len(blocks), math.ceil(len(todo) / config.workers.feedback_references_per_engine))
    dataset = ray.data.from_arrow(blocks).map_batches(
        FeedbackWorker, fn_constructor_kwargs=engine_args, **_engine_map_args(config, engines)
    )
    _drain(dataset, committed, "feedback")


def _synthesis_pass(storage: Storage, committed: CommitLog, config: RunConfig, engine_args: dict) -> PassResult:
    plan = read_plan(storage)
    blocks = pending_shards(plan, set(committed.commits["synthesis"]))
    if not blocks:
        return PassResult()
    log.info("synthesis: %d shards to do (%d committed)", len(blocks), len(committed.commits["synthesis"]))
    # One Ray block per shard: a task is one shard, and a retried task redoes one shard at most.
    dataset = ray.data.from_arrow(blocks).map_batches(
        SynthesisWorker, fn_constructor_kwargs=engine_args, **_engine_map_args(config, len(blocks))
    )
    # A progress line every minute (samples, pace, ETA, yield) for `ray job logs -f`.
    with ProgressLog(committed, units_planned=plan.num_rows, k=config.instructions_per_aspect,
                     target=config.num_samples, every_s=PROGRESS_EVERY_S):
        return _drain(dataset, committed, "synthesis")


def _engine_map_args(config: RunConfig, engines: int) -> dict[str, Any]:
    """map_batches arguments shared by both engine passes: pool, resources, fault tolerance."""
    workers = config.workers
    if config.engine.kind == "vllm":
        from refed_ray.engines.vllm_engine import actor_resources, actor_runtime_env

        resources = {**actor_resources(config.engine), "runtime_env": actor_runtime_env()}
    else:
        resources = {"num_cpus": 1}  # API and custom engines: CPU-only actors, no GPU reserved
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


def _drain(dataset, committed: CommitLog, pass_name: str) -> PassResult:
    """Run a pass to the end, absorbing its commits into the index as they come."""
    result, started, unindexed = PassResult(), time.time(), 0
    try:
        # No prefetch: Ray Data's prefetcher holds each finished block back until the next one
        # comes, so the driver (its index, its progress line) would learn of a commit a shard late.
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            for line in batch.column("commit").to_pylist():
                commit = Commit.model_validate_json(line)
                committed.add(commit)
                result.stats += commit.stats
                result.shards += 1
                unindexed += 1
            if unindexed >= INDEX_EVERY_SHARDS:
                committed.write_index(pass_name)
                unindexed = 0
    except Exception as err:
        if MISCONFIGURED in str(err):
            reason = str(err).split(MISCONFIGURED + ": ", 1)[-1].splitlines()[0]
            raise UserError(f"the {pass_name} pass stopped: {reason}") from None
        if OUTAGE in str(err):
            reason = str(err).split(OUTAGE + ": ", 1)[-1].splitlines()[0]
            raise RunStopped(
                f"the {pass_name} pass stopped: the engine was unavailable ({reason}). Nothing was "
                "recorded as rejected for it, and committed shards are kept: submit the same command "
                "again to resume."
            ) from None
        raise
    finally:
        committed.write_index(pass_name)
    result.seconds = time.time() - started
    return result


def _read_feedback(storage: Storage, committed: CommitLog) -> dict[str, Feedback]:
    feedback: dict[str, Feedback] = {}
    for name in committed.files("feedback"):
        for row in storage.read_table(name).to_pylist():
            feedback.setdefault(row["reference_id"], Feedback(**row))
    return feedback


def _rate_limiter(config: RunConfig) -> dict[str, Any]:
    """The actor that spaces every API engine's calls to the configured rates, as an engine arg."""
    if config.engine.kind != "openai":
        return {}
    from refed_ray.engines.openai_engine import start_rate_limiter

    limiter = start_rate_limiter(config.engine.api.requests_per_minute, config.engine.api.tokens_per_minute)
    return {"rate_limiter": [limiter]} if limiter else {}


def _check_engine(config: RunConfig) -> None:
    """What the driver can check of the engine before actors start: a custom engine's class
    imports, a local model folder exists (hub ids and object-storage folders are fetched later)."""
    engine = config.engine
    if engine.kind == "custom":
        load_class(engine.class_path)
    model = engine.model or ""
    if engine.kind == "vllm" and model.startswith(("/", "./", "../", "~")):
        if not os.path.isdir(os.path.expanduser(model)):
            raise UserError(f"engine.model {model!r} is not a folder on this machine")


def _engine_secrets(config: RunConfig) -> dict[str, str]:
    """The API key an ``openai`` engine needs, from the driver's environment: checked here, before
    any actor starts, and handed to the actors without entering the config."""
    if config.engine.kind != "openai":
        return {}
    name = config.engine.api.api_key_env
    if not os.environ.get(name):
        raise UserError(f"engine openai needs an API key in the environment variable {name}")
    return {name: os.environ[name]}


def _connect_ray() -> None:
    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS's cluster when set, else starts a local one
    explain_restart_warning()  # before the first engine actor


def _resolve_device(config: RunConfig) -> RunConfig:
    if config.engine.device != "auto" or config.engine.kind != "vllm":
        return config
    device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    if device == "cpu":
        log.warning(
            "engine.device auto: no GPU in the Ray cluster now, so engines run on CPU. On an "
            "autoscaling cluster whose GPU workers start at zero, pass --device cuda."
        )
    return config.model_copy(update={"engine": config.engine.model_copy(update={"device": device})})
