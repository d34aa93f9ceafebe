"""``refed-ray plan``: what a run will do and what it will cost, before anything starts.

It makes the run's own checks (``pipeline.preflight``: seeds, config, output, API key) and the
run's own planning (``plan.write_plan``, into memory), so its counts are the run's: references,
units, shards, rounds, calls by stage and engine loads. Tokens come from a pilot output's
measured tokens per sample (``--pilot``), else from the config's budgets as an upper bound;
then the cost (API engines, ``engine.api.prices``) or GPU time (vLLM engines, ``sizing.py``).
No engine, no Ray, nothing left written (the run's write probe is deleted at once).

Calls are first attempts: each invalid or truncated reply adds a retry (up to
``sampling.max_attempts`` tries a call), and each top-up round adds units (up to
``max_extra_units``). A pilot's figures include both, as they happened there.
"""

from __future__ import annotations

import math
import os
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import pyarrow as pa

from refed_ray.config import RunConfig, run_config
from refed_ray.data.kept import kept_samples
from refed_ray.engines.kinds import engine_kind
from refed_ray.errors import UserError
from refed_ray.method.instructions import instruction_messages
from refed_ray.method.prompts import render
from refed_ray.method.refiners import refiner_for
from refed_ray.records.commits import CommitLog
from refed_ray.records.models import CHARS_PER_TOKEN, Feedback, Reference, WorkUnit
from refed_ray.records.plan import (
    PLAN_SCHEMA,
    PlanSummary,
    pending_shards,
    plan_files,
    read_plan,
    write_plan,
)
from refed_ray.records.stages import PassName, Stage
from refed_ray.records.stats import STAGES, StageStats, empty_stats, merge
from refed_ray.reports.report import api_cost
from refed_ray.run.output import RUN_FILE
from refed_ray.run.pipeline import Preflight, feedback_references, max_units, preflight
from refed_ray.storage import Storage
from refed_ray.watch.sizing import GPUS, describe_shape, gpu_estimate, model_shape
from refed_ray.watch.status import pass_totals


def plan_run(
    config: RunConfig, *, force_new: bool = False, pilot: str | None = None, gpu: str | None = None,
    model_params: float | None = None,
) -> dict[str, Any]:
    """The plan of ``config``'s run (what ``refed-ray plan --json`` prints)."""
    checked = preflight_leaving_no_folder(config, force_new)
    committed = CommitLog(checked.storage) if checked.resumed else None
    references = checked.seeds.references
    reference_ids = [ref.reference_id for ref in references]
    plan, pending = _plan_in_memory(checked.storage, committed, config, reference_ids)
    reached = feedback_references(reference_ids, config, plan.units)
    have_feedback = committed.ids(PassName.FEEDBACK) if committed else set()
    feedback_todo = [ref for ref in references if ref.reference_id in reached and ref.reference_id not in have_feedback]
    units = pa.concat_tables(pending) if pending else PLAN_SCHEMA.empty_table()
    k = config.instructions_per_aspect
    calls = first_calls(config, len(feedback_todo), units.num_rows)
    samples_done = kept_samples(pass_totals(committed, config)) if committed else 0
    samples_to_go = max(0, config.num_samples - samples_done)
    if pilot:
        tokens = _tokens_from_pilot(pilot, config, samples_to_go, len(feedback_todo))
    else:
        tokens = _tokens_from_budgets(config, references, feedback_todo, units)
    estimate = {
        "output": checked.storage.uri,
        "resume": checked.resumed,
        "model": config.model_name(),
        "engine": config.engine.kind,
        "references": {
            "usable": len(references),
            "skipped": len(checked.seeds.skipped),
            "used": len(plan.references_used),
            "feedback_to_collect": len(feedback_todo),
        },
        "plan": {
            "units": plan.units,
            "shards": plan.shards,
            "rounds": plan.rounds,
            "instructions_per_unit": k,
            "planned_samples": plan.units * k,
            "top_up_budget_units": max(0, max_units(config) - plan.units),
        },
        "committed": {
            "units": plan.units - units.num_rows,
            "shards": plan.shards - len(pending),
            "samples": samples_done,
        },
        "to_do": {"units": units.num_rows, "shards": len(pending), "samples": samples_to_go},
        "calls": {**calls, "total": sum(calls.values())},
        "engine_loads": _engine_loads(config, len(feedback_todo), len(pending)),
        "tokens": tokens,
        "cost": _estimated_cost(config, tokens),
        "gpu": None,
    }
    if engine_kind(config.engine.kind).estimates_gpu_time:
        estimate["gpu"] = _gpu_time(config, tokens, estimate["calls"]["total"], gpu, model_params)
    return estimate


def first_calls(config: RunConfig, feedback_references: int, units: int) -> dict[str, int]:
    """Calls by stage when nothing is retried: the feedback mode's per reference, one instruction
    call per unit, one response call per sample (none with instructions_from: it reuses them), and
    each of the mode's per-sample stages."""
    refiner, samples = refiner_for(config.feedback.mode), units * config.instructions_per_aspect
    synthesized = 0 if config.instructions_from else 1
    calls = {"feedback": len(refiner.reference_feedback) * feedback_references,
             "instructions": units * synthesized, "responses": samples * synthesized}
    calls.update({stage: samples for stage in refiner.sample_stages})
    calls.setdefault("refinement", 0)
    return calls


def preflight_leaving_no_folder(config: RunConfig, force_new: bool) -> Preflight:
    """The run's checks. Its write probe creates a new local OUTPUT's folders: plan removes
    the ones it created (empty), so it leaves nothing behind."""
    storage = Storage(config.output, config.storage_options)
    created = []
    if storage.is_local:
        folder = Path(storage.root)
        while not folder.exists():
            created.append(folder)
            folder = folder.parent
    try:
        return preflight(config, force_new)
    finally:
        for folder in created:  # the deepest first
            with suppress(OSError):
                os.rmdir(folder)


def _plan_in_memory(
    storage: Storage, committed: CommitLog | None, config: RunConfig, reference_ids: list[str]
) -> tuple[PlanSummary, list[pa.Table]]:
    """The run's own ``write_plan`` into memory (over a copy of OUTPUT's plan when the run
    resumes), and the shards it will schedule: exactly the run's numbers, nothing written."""
    memory = Storage(f"memory://refed-ray-plan-{uuid.uuid4().hex}")
    keep = bool(committed and committed.commits[PassName.SYNTHESIS])
    try:
        if keep:
            for name in plan_files(storage):
                memory.write_bytes(name, storage.read_bytes(name))
        summary = write_plan(
            memory, reference_ids, config.num_samples, config.instructions_per_aspect, config.seed,
            config.workers.units_per_shard, keep_existing=keep,
        )
        done = set(committed.commits[PassName.SYNTHESIS]) if committed else set()
        return summary, pending_shards(read_plan(memory, summary.files), done)
    finally:
        with suppress(FileNotFoundError):
            memory.fs.rm(memory.root, recursive=True)


def _engine_loads(config: RunConfig, feedback_references: int, shards: int) -> dict[str, int]:
    """As ``pipeline._engine_pass`` sizes its one pool of engines: one per shard (the feedback's,
    cut by ``workers.feedback_shard_size()``, and synthesis's) up to ``num_engines``, each loaded
    once for both. A top-up round, an actor restart, add loads."""
    feedback_shards = math.ceil(feedback_references / config.workers.feedback_shard_size())
    return {"engines": min(config.workers.num_engines, feedback_shards + shards)}


# ---- tokens --------------------------------------------------------------------------------


def _tokens_from_pilot(uri: str, config: RunConfig, samples: int, feedback_references: int) -> dict[str, Any]:
    """The pilot's measured tokens per accepted sample (synthesis stages, rejects and retries
    included) times the samples to go; feedback per reference times the references to go."""
    storage = Storage(uri, config.storage_options)
    if not storage.exists(RUN_FILE):
        raise UserError(f"--pilot {uri} holds no refed-ray run ({RUN_FILE})")
    pilot_config = run_config(storage)
    _same_stages(uri, pilot_config, config)
    totals = pass_totals(CommitLog(storage), pilot_config)
    stages = empty_stats()
    for stats in totals.values():
        merge(stages, stats.stages)
    accepted = kept_samples(totals)
    references = stages[Stage.FEEDBACK].rows_in
    if not accepted:
        raise UserError(f"--pilot {uri} has no accepted sample yet: wait for its first shards to commit")
    by_stage, calls = {}, {}
    for stage, stats in stages.items():
        per_reference = feedback_references / references if references else 0.0
        scale = per_reference if stage == Stage.FEEDBACK else samples / accepted
        by_stage[stage] = {"prompt_tokens": round(stats.prompt_tokens * scale),
                           "completion_tokens": round(stats.completion_tokens * scale)}
        calls[stage] = round(stats.calls * scale)
    pilot_model = pilot_config.model_name()
    return {
        "source": "pilot",
        "pilot": {"output": uri, "model": pilot_model, "accepted_samples": accepted, "feedback_references": references,
                  "same_model": pilot_model == config.model_name()},
        "per_sample": {stage: {kind: round(stages[stage].model_dump()[kind] / accepted, 1)
                               for kind in ("prompt_tokens", "completion_tokens")}
                       for stage in stages if stage != "feedback"},
        "calls_expected": {**calls, "total": sum(calls.values())},
        **_totals(by_stage),
    }


def _same_stages(uri: str, pilot: RunConfig, config: RunConfig) -> None:
    """A pilot measures its own stages: one of another feedback mode, or with instructions_from
    where this run has none (or the reverse), calls stages this run does not, and not others."""
    def shape(run: RunConfig) -> str:
        return f"feedback mode {run.feedback.mode}" + (", instructions_from" if run.instructions_from else "")

    if shape(pilot) != shape(config):
        raise UserError(f"--pilot {uri} ran {shape(pilot)}, this run {shape(config)}: their stages differ, so its "
                        "tokens per sample do not estimate this run's. Pilot with this run's feedback.mode "
                        "(and instructions_from), or plan without --pilot (the budgets' upper bound)")


def _tokens_from_budgets(
    config: RunConfig, references: list[Reference], feedback_todo: list[Reference], units: pa.Table
) -> dict[str, Any]:
    """An upper bound for first attempts: every reply at its step's max_tokens; every prompt is
    its template with the real references (at ``CHARS_PER_TOKEN`` characters a token, as the
    budget check counts) and the model-written parts it quotes at their bounds."""
    sampling, k = config.sampling, config.instructions_per_aspect
    feedback_text = _text_bound(sampling.feedback_max_chars, sampling.feedback_max_tokens)
    response_text = _text_bound(sampling.response_max_chars, sampling.response_max_tokens)
    # The K instructions of a unit together fit one instruction reply.
    unit_instructions = sampling.instructions_max_tokens
    if sampling.instruction_max_chars:
        unit_instructions = min(unit_instructions, k * _tokens(sampling.instruction_max_chars))
    refiner = refiner_for(config.feedback.mode)
    per_sample = _per_sample_prompts(refiner.sample_stages, feedback_text, response_text)
    calls = first_calls(config, len(feedback_todo), units.num_rows)
    by_stage = {stage: {"prompt_tokens": 0, "completion_tokens": 0} for stage in (*STAGES, *calls)}
    for ref in feedback_todo:
        by_stage["feedback"]["prompt_tokens"] += sum(
            _tokens_of(render(step, instruction=ref.instruction, response=ref.response))
            for step in refiner.reference_feedback)
    by_stage["feedback"]["completion_tokens"] = calls["feedback"] * sampling.feedback_max_tokens
    by_id = {ref.reference_id: ref for ref in references}
    response_fixed: dict[str, int] = {}
    for row in units.drop_columns(["shard"]).to_pylist():
        unit, ref = WorkUnit(**row), by_id[row["reference_id"]]
        if calls["instructions"]:  # none with instructions_from: the earlier run wrote them
            blank = Feedback(reference_id=ref.reference_id, instruction=ref.instruction, reference_response=ref.response,
                             subject_areas="", relevant_skills="", response_feedback="")
            by_stage["instructions"]["prompt_tokens"] += (
                _tokens_of(instruction_messages(unit, blank, config)) + feedback_text)
            if ref.reference_id not in response_fixed:
                response_fixed[ref.reference_id] = _tokens_of(render("response", reference_instruction=ref.instruction,
                                                                     reference_response=ref.response, instruction=""))
            by_stage["responses"]["prompt_tokens"] += k * response_fixed[ref.reference_id] + unit_instructions
        for stage, fixed in per_sample.items():
            by_stage[stage]["prompt_tokens"] += k * fixed + unit_instructions
    budgets = {"instructions": sampling.instructions_max_tokens, "responses": sampling.response_max_tokens,
               "sample_feedback": sampling.feedback_max_tokens, "refinement": sampling.refinement_max_tokens}
    for stage, max_tokens in budgets.items():
        if stage in calls:
            by_stage[stage]["completion_tokens"] = calls[stage] * max_tokens
    return {"source": "budgets", "bound": "upper bound for first attempts", **_totals(by_stage)}


def _per_sample_prompts(stages: tuple[str, ...], feedback_text: int, response_text: int) -> dict[str, int]:
    """Prompt tokens of each per-sample stage but the sample's instruction: its template, the
    response and the feedback it quotes at their bounds."""
    blank = {"instruction": "", "response": "", "response_feedback": ""}
    # Feedback mode sample refines with its own prompt (the two refinement prompts differ by a few words).
    refinement = "refinement_sample" if "sample_feedback" in stages else "refinement"
    fixed = {
        "sample_feedback": _tokens_of(render("feedback_response", instruction="", response="")) + response_text,
        "refinement": _tokens_of(render(refinement, **blank)) + feedback_text + response_text,
    }
    return {stage: fixed[stage] for stage in stages}


def _totals(by_stage: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {
        "by_stage": by_stage,
        "prompt_tokens": sum(s["prompt_tokens"] for s in by_stage.values()),
        "completion_tokens": sum(s["completion_tokens"] for s in by_stage.values()),
    }


def _text_bound(max_chars: int | None, max_tokens: int) -> int:
    """Tokens a model-written text quoted in a prompt may take: its reply's budget, or its char bound."""
    return min(max_tokens, _tokens(max_chars)) if max_chars else max_tokens


def _tokens_of(messages: list[dict[str, str]]) -> int:
    return _tokens(sum(len(m["content"]) for m in messages))


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


# ---- cost and GPU time ---------------------------------------------------------------------


def _estimated_cost(config: RunConfig, tokens: dict[str, Any]) -> dict[str, Any] | None:
    """As report.json prices a run's tokens (engine openai, a price for the model)."""
    stages = {stage: StageStats(**counts) for stage, counts in tokens["by_stage"].items()}
    return api_cost(config, stages)


def _gpu_time(
    config: RunConfig, tokens: dict[str, Any], first_calls: int, gpu: str | None, model_params: float | None,
) -> dict[str, Any]:
    shape = model_shape(config, model_params)
    if shape is None:
        return {"note": f"the size of {config.model_name()} is unknown here (not a local folder): "
                        "pass --model-params, e.g. 8e9"}
    calls = tokens.get("calls_expected", {}).get("total", first_calls)
    return {
        "model": describe_shape(shape),
        "estimates": [gpu_estimate(name, shape, config, prompt_tokens=tokens["prompt_tokens"],
                                   completion_tokens=tokens["completion_tokens"], calls=calls)
                      for name in ([gpu] if gpu else GPUS)],
    }


# ---- rendering -----------------------------------------------------------------------------


def describe(estimate: dict[str, Any]) -> str:
    """``refed-ray plan`` without ``--json``."""
    refs, plan, todo = estimate["references"], estimate["plan"], estimate["to_do"]
    run = "resumes an earlier run" if estimate["resume"] else "a new run"
    lines = [
        f"refed-ray plan for {estimate['output']} ({run}), teacher {estimate['model']} ({estimate['engine']})",
        (f"  references: {refs['usable']:,} usable ({refs['skipped']:,} skipped), {refs['used']:,} in the plan, "
         f"feedback to collect on {refs['feedback_to_collect']:,}"),
        (f"  plan: {plan['units']:,} units of {plan['instructions_per_unit']} in {plan['shards']:,} shards over "
         f"{plan['rounds']:,} rounds = {plan['planned_samples']:,} samples; top-up budget "
         f"{plan['top_up_budget_units']:,} units"),
    ]
    if estimate["resume"]:
        done = estimate["committed"]
        lines.append(f"  committed already: {done['units']:,} units in {done['shards']:,} shards, "
                     f"{done['samples']:,} samples; to do: {todo['units']:,} units in {todo['shards']:,} shards")
    calls = estimate["calls"]
    lines.append("  calls (first attempts): "
                 + ", ".join(f"{stage} {n:,}" for stage, n in calls.items() if stage != "total")
                 + f"; total {calls['total']:,}")
    loads = estimate["engine_loads"]
    lines.append(f"  engine loads: {loads['engines']}, each for the feedback and the synthesis "
                 "(plus one per top-up round's engine and per actor restart)")
    tokens = estimate["tokens"]
    if tokens["source"] == "pilot":
        pilot = tokens["pilot"]
        lines.append(f"  tokens, estimated from the pilot {pilot['output']} ({pilot['accepted_samples']:,} samples"
                     f"{'' if pilot['same_model'] else ', teacher ' + pilot['model'] + ': another model'}):")
    else:
        lines.append(f"  tokens, from the config's budgets ({tokens['bound']}: every reply at its max_tokens):")
    for stage, counts in tokens["by_stage"].items():
        lines.append(f"    {stage:<13} prompt {counts['prompt_tokens']:>15,}  completion {counts['completion_tokens']:>15,}")
    lines.append(f"    {'total':<13} prompt {tokens['prompt_tokens']:>15,}  completion {tokens['completion_tokens']:>15,}")
    if estimate["cost"]:
        lines.append(f"  cost (estimate, engine.api.prices): {estimate['cost']['total']:,.2f}")
    elif engine_kind(estimate["engine"]).priced_per_token:
        lines.append(f"  cost: no price for {estimate['model']} in engine.api.prices")
    gpu = estimate["gpu"]
    if gpu and "note" in gpu:
        lines.append(f"  GPU time: {gpu['note']}")
    elif gpu:
        shape = gpu["model"]
        lines.append(f"  GPU time (an estimate: README \"Sizing\" model, half the ceiling), {shape['params']:.3g} "
                     f"parameters ({shape['source']}):")
        for row in gpu["estimates"]:
            if not row["fits"] or row["gpu_hours"] is None:
                lines.append(f"    {row['name']:<11} does not fit: KV cache {row['kv_cache_gb']} GB")
                continue
            lines.append(f"    {row['name']:<11} batch {row['batch']:>5}  {row['gpu_hours']:>10,.4g} GPU-hours  "
                         f"{row['wall_hours']:>10,.4g} h wall on {row['engines']} x {row['gpus_per_engine']} GPU "
                         f"({row['bound_by']} bound)")
    return "\n".join(lines)
