"""The run, end to end: seeds -> plan -> engine pass (feedback -> broadcast -> synthesis) -> filters -> top-up -> dataset -> report.

One pool of engine actors, each loading its engine once, works through the feedback shards and
then the synthesis shards in one Ray Data pass (``workers.RunWorker``); the synthesis shards wait
for the feedback's broadcast (``broadcast.py``). What grows with N on the driver: the plan's
shards, handed to Ray Data as one block each (about 60 KB of driver memory a shard, most of it
Ray's), and one commit row per shard (about 11 KB); the pass streams through Ray Data, one task
per shard (``passes.py``). README, "Scale": "100M samples: a plan" says how these would stay flat.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from refed_ray.cluster import connect_ray
from refed_ray.config import RunConfig
from refed_ray.data.dataset import compact_dataset
from refed_ray.data.filters.dedup import DEDUP, deduplicate
from refed_ray.data.kept import RUN_FILTERS, accepted_samples, dropped_keys, pass_totals
from refed_ray.data.quality import data_quality
from refed_ray.data.seeds import SeedSet, read_seeds
from refed_ray.engines.kinds import engine_kind
from refed_ray.records.commits import Commit, CommitLog, commit_on_driver
from refed_ray.records.models import Reference, Reject, to_table
from refed_ray.records.plan import (
    PlanSummary,
    pending_plan,
    planned_shards,
    references_reached,
    top_up_units,
    units_needed,
    write_plan,
)
from refed_ray.records.stages import Stage
from refed_ray.reports.report import build_report
from refed_ray.reports.views import write_views_after_run
from refed_ray.run.broadcast import FeedbackBroadcast
from refed_ray.run.instructions_from import EarlierRun, copy_plan, read_earlier_run
from refed_ray.run.output import check_output, refuse_local_output_on_cluster, run_fingerprint, start_output
from refed_ray.run.passes import (
    FEEDBACK,
    INDEX_EVERY_SHARDS,
    SEEDS,
    SYNTHESIS,
    PassResult,
    check_engines_fit,
    engine_worker_args,
    run_engine_pass,
)
from refed_ray.run.progress import ProgressLog
from refed_ray.run.reserve import Reserve
from refed_ray.run.restart_warning import explain_restart_warning
from refed_ray.run.workers import RunWorker
from refed_ray.storage import Storage

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 60  # how often the driver logs its progress line
__all__ = ["INDEX_EVERY_SHARDS", "PassResult"]  # the run's index cadence (tests set it here) and pass result


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
    on_cluster = resolve_device_on_cluster(config)  # run.json keeps the config as given (device: auto)
    check_engines_fit(on_cluster)
    run_id = start_output(storage, config, checked.fingerprint, force_new)

    committed = CommitLog(storage)
    committed.remove_leftovers()
    _commit_seed_rejects(storage, committed, seeds)
    reference_ids = [ref.reference_id for ref in seeds.references]
    plan = _first_plan(storage, committed, config, reference_ids, checked.earlier)
    log.info("plan: %d units in %d shards over %d rounds, %d references",
             plan.units, plan.shards, plan.rounds, len(plan.references_used))

    config = on_cluster
    # engine_args keeps the run's shared rate limiter (if any) alive until the run ends.
    engine_args = engine_worker_args(config, storage, checked.secrets, run_id)
    units_before = committed.units(SYNTHESIS.name)
    this_run = PassResult()
    reached = feedback_references(reference_ids, config, plan.units)
    feedback = _feedback_blocks(committed, config, [r for r in seeds.references if r.reference_id in reached])
    broadcast = FeedbackBroadcast(storage, committed, {b.column("shard")[0].as_py() for b in feedback})
    engine_args = {**engine_args, **broadcast.worker_args(),
                   **({"earlier": [ray.put(checked.earlier)]} if checked.earlier else {})}
    while True:
        reserve = _reserve(storage, committed, config, reference_ids, plan) if checked.earlier is None else None
        this_run += _engine_pass(storage, committed, config, engine_args, feedback, broadcast, reserve)
        feedback = []  # all collected by the first pass
        if reserve is not None:
            plan = reserve.absorb(storage, committed, reference_ids, config.num_samples, config.seed) or plan
            if not planned_shards(storage) <= set(committed.commits[SYNTHESIS.name]):
                continue  # a reserve shard refused while a later one ran: run the hole, then size a top-up
        _apply_filters(storage, committed, config)
        more = _top_up_units(committed, config, plan.units) if checked.earlier is None else 0
        if not more:
            break
        log.info("top-up: %d samples short of %d, planning %d more units", config.num_samples
                 - accepted_samples(committed, config), config.num_samples, more)
        plan = write_plan(
            storage, reference_ids, config.num_samples, config.instructions_per_aspect, config.seed,
            config.workers.units_per_shard, units=plan.units + more,
        )
    dataset = compact_dataset(storage, committed, config.dataset_file_mb, max_rows=config.num_samples,
                              drops=dropped_keys(storage, committed, config))

    quality = data_quality(storage, dataset["files"], seeds.references, config.dedup.ngram, config.seed)
    report = build_report(
        committed, config, seeds, plan, dataset, resumed=resumed, units_before=units_before,
        this_run=this_run, wall_seconds=time.time() - started, quality=quality,
    )
    report["shortfall"] = _shortfall(config, report, plan.units, pass_totals(committed, config))
    storage.write_json("report.json", report)
    write_views_after_run(storage, report)  # report.html and the dataset card
    return report


def _apply_filters(storage: Storage, committed: CommitLog, config: RunConfig) -> None:
    """Every run filter commits its drops over the committed samples (``kept.RUN_FILTERS``).
    Dedup goes by its module-level name here: test_dedup.py stops a run in it."""
    deduplicate(storage, committed, config.dedup)
    for one in RUN_FILTERS:
        if one is not DEDUP:
            one.apply(storage, committed, one.settings(config))


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
        config.workers.units_per_shard, keep_existing=bool(committed.commits[SYNTHESIS.name]),
    )


def _top_up_units(committed: CommitLog, config: RunConfig, planned_units: int) -> int:
    """Units to add so that N samples are accepted despite rejects and duplicates."""
    accepted = accepted_samples(committed, config)
    short = config.num_samples - accepted
    budget = max_units(config) - planned_units
    if short > 0 and budget <= 0:
        log.warning("%d samples short of %d: the top-up budget (max_extra_units=%g) is spent", short,
                    config.num_samples, config.max_extra_units)
    return top_up_units(short, accepted, committed.units(SYNTHESIS.name), config.instructions_per_aspect, budget)


def _shortfall(config: RunConfig, report: dict[str, Any], planned_units: int,
               totals: dict[str, Any]) -> dict[str, Any] | None:
    """Why a run delivered fewer than N samples and what completes it; None when it delivered N.
    The CLI exits with a status of its own on it (``errors.RunShort``)."""
    missing = config.num_samples - report["delivered"]
    if missing <= 0:
        return None
    k, base = config.instructions_per_aspect, units_needed(config.num_samples, config.instructions_per_aspect)
    why = [f"{report['rejected_samples']} of {report['plan']['planned_samples']} planned samples were rejected "
           "(report.json: rejects.by_reason)"]
    for stage, prefix, units_that in _WHOLE_UNITS_LOST:
        units = sum(t.rejected(stage, reason_prefix=prefix) for t in totals.values())
        if units:
            why.append(f"{units} units ({units * k} samples) {units_that}")
    if config.instructions_from:
        why.append(f"this run refines the samples of {config.instructions_from} and makes no top-up round")
        advice = ("run A with a larger --num-samples, then this run with the same one and --force-new; or "
                  "compare what both runs hold (refed-ray compare pairs the samples they share)")
    elif report["samples"] == 0:
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


# Reject reasons (stage, reason's start) that lose whole units, and what to say of them.
_WHOLE_UNITS_LOST = (
    (Stage.FEEDBACK, "no feedback", "whose reference got no feedback"),
    (Stage.ENGINE, "shard abandoned", "in shards abandoned after workers.max_shard_attempts engine deaths"),
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
    if committed.commits[SEEDS.name]:
        return
    tables = {"rejects": to_table(seeds.skipped, Reject)}
    commit_on_driver(storage, committed, SEEDS.name, SEEDS.shard_name(["seeds"]), ["seeds"], tables)


def _feedback_blocks(committed: CommitLog, config: RunConfig, references: list[Reference]) -> list[pa.Table]:
    """The feedback shards not committed yet."""
    done = committed.ids(FEEDBACK.name)
    todo = [ref.model_dump() for ref in references if ref.reference_id not in done]
    if todo:
        log.info("collecting feedback on %d references (%d already done)", len(todo), len(done))
    return FEEDBACK.cut(todo, "reference_id", config.workers.feedback_shard_size())


def _engine_pass(storage: Storage, committed: CommitLog, config: RunConfig, engine_args: dict,
                 feedback: list[pa.Table], broadcast: FeedbackBroadcast, reserve: Reserve | None = None) -> PassResult:
    """One pool of engines, each loaded once, over the feedback shards, then the plan's pending
    synthesis shards, then the reserve's shards not committed yet (``reserve.py``). The
    synthesis shards wait for the feedback's broadcast (``broadcast.py``). Returns synthesis's result."""
    done = set(committed.commits[SYNTHESIS.name])
    units_planned, synthesis = pending_plan(storage, done)
    if not feedback and not synthesis:
        return PassResult()
    log.info("synthesis: %d shards to do (%d committed)", len(synthesis), len(done))
    extra, listeners = {}, [broadcast.on_commit]
    if reserve is not None and synthesis:
        extra = reserve.worker_args(synthesis, done, _kept_now(storage, committed, config))
        synthesis += [b for b in reserve.blocks if b.column("shard")[0].as_py() not in done]
        listeners.append(reserve.on_commit)
    blocks = feedback + synthesis
    # A progress line every minute (samples, pace, ETA, yield) for `ray job logs -f`.
    progress = ProgressLog(committed, units_planned=units_planned, k=config.instructions_per_aspect,
                           target=config.num_samples, every_s=PROGRESS_EVERY_S)
    label = " and ".join(name for name, part in ((FEEDBACK.name, feedback), (SYNTHESIS.name, synthesis)) if part)
    results = run_engine_pass(label, blocks, RunWorker, {**engine_args, **extra}, committed, config=config,
                              engines=len(blocks), progress=progress, index_every=INDEX_EVERY_SHARDS,
                              on_commit=_each(listeners))
    return results.get(SYNTHESIS.name, PassResult())


def _kept_now(storage: Storage, committed: CommitLog, config: RunConfig) -> Callable[[], int | None]:
    """How the reserve measures the run inside its pass (``reserve.py``): the filters commit
    their drops over what is committed (a later run of them replaces it), and the samples they
    keep are counted. None when the cluster has no CPU free: the engines hold them all, and the
    filters' tasks would wait for the pass to end."""
    def kept() -> int | None:
        if ray.available_resources().get("CPU", 0) < 1:
            return None
        _apply_filters(storage, committed, config)
        return accepted_samples(committed, config)
    return kept


def _each(listeners: list[Callable[[Commit], None]]) -> Callable[[Commit], None]:
    def on_commit(commit: Commit) -> None:
        for listener in listeners:
            listener(commit)
    return on_commit


def _reserve(storage: Storage, committed: CommitLog, config: RunConfig, reference_ids: list[str],
             plan: PlanSummary) -> Reserve | None:
    """Reserve shards for the synthesis pass, sized from the top-up budget (``reserve.py``). The
    yield so far is synthesis's own (the filters' drops are not known until they run again)."""
    done = committed.commits[SYNTHESIS.name]
    planned = planned_shards(storage, plan.files)
    return Reserve.plan(
        reference_ids, config.seed, plan, config.workers.units_per_shard,
        units_done=sum(len(c.ids) for c in done.values()), accepted=sum(c.stats.samples for c in done.values()),
        k=config.instructions_per_aspect, num_samples=config.num_samples, budget=max_units(config) - plan.units,
        unplanned=set(done) - planned,
    )


def _check_engine(config: RunConfig) -> None:
    """What the driver can check of the engine before actors start (a custom engine's class
    imports, a local model folder exists, an API key is set): the kind's own checks."""
    engine_kind(config.engine.kind).check(config.engine)


def _engine_secrets(config: RunConfig) -> dict[str, str]:
    """What the engine needs from the driver's environment (an API key), handed to the actors
    without entering the config."""
    return engine_kind(config.engine.kind).secrets(config.engine)


def _connect_ray() -> None:
    connect_ray()  # joins RAY_ADDRESS's cluster when set, else starts a local one
    explain_restart_warning()  # before the first engine actor


def resolve_device_on_cluster(config: RunConfig) -> RunConfig:
    """``engine.device: auto`` as the kind resolves it against the Ray cluster now (vllm: cuda or cpu)."""
    engine = engine_kind(config.engine.kind).resolve_device(config.engine)
    return config if engine is config.engine else config.model_copy(update={"engine": engine})
