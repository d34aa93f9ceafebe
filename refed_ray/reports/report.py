"""report.json: what OUTPUT holds (summed from the commits' counters) and what this run did.

Every count comes from the counters committed with each shard (``stats.ShardStats``): the report
reads the index, never a data or rejects file.
"""

from __future__ import annotations

from typing import Any

from refed_ray.config import RunConfig
from refed_ray.data.kept import kept_samples, pass_totals
from refed_ray.data.seeds import SeedSet
from refed_ray.records.commits import CommitLog
from refed_ray.records.plan import PlanSummary, units_needed
from refed_ray.records.stages import AFTER_INSTRUCTIONS, CALLING_STAGES, FEEDBACK_STAGES, PassName, Stage
from refed_ray.records.stats import ShardStats, StageStats, empty_stats, first_calls, merge


def build_report(
    committed: CommitLog,
    config: RunConfig,
    seeds: SeedSet,
    plan: PlanSummary,
    dataset: dict[str, Any],
    *,
    resumed: bool,
    units_before: int,
    this_run,
    wall_seconds: float,
    quality: dict[str, Any] | None = None,
) -> dict[str, Any]:
    totals = pass_totals(committed, config)  # the filters' current commits', never a stale one's
    stages = empty_stats()
    for stats in totals.values():
        merge(stages, stats.stages)
    synthesis_totals, dedup_totals = totals[PassName.SYNTHESIS], totals[PassName.DEDUP]
    synthesis = committed.commits[PassName.SYNTHESIS].values()
    redone = [c for c in synthesis if c.attempt > 1]
    samples = kept_samples(totals)
    lost = sum(t.lost_samples for t in totals.values())
    duplicates = {"in_unit": synthesis_totals.rejected(Stage.DEDUP), "across_units": dedup_totals.rejected(Stage.DEDUP)}
    # Every instruction written became a sample, or a reject of one of these stages.
    instructions = synthesis_totals.samples + synthesis_totals.rejected(*AFTER_INSTRUCTIONS)
    planned_samples = plan.units * config.instructions_per_aspect
    units_committed = sum(len(c.ids) for c in synthesis)
    run_tokens = sum(s.completion_tokens for s in this_run.stats.stages.values())
    reasons = reasons_by_count(totals.values())
    return {
        "output": committed.storage.uri,
        "model": config.model_name(),
        "device": config.engine.device,
        "references": {
            "usable": len(seeds.references),
            "skipped": len(seeds.skipped),
            "used": len(plan.references_used),
            "feedback_retried": sum(len(c.ids) for c in committed.commits[PassName.FEEDBACK].values() if c.attempt > 1),
        },
        # Every feedback call: per reference, and per sample in feedback mode sample.
        "feedback_calls": sum(stages[stage].calls for stage in FEEDBACK_STAGES if stage in stages),
        "feedback_mode": config.feedback.mode,
        "feedback_rows": stages[Stage.FEEDBACK].rows_out,
        "plan": {
            "units": plan.units,
            "shards": plan.shards,
            "rounds": plan.rounds,
            "instructions_per_unit": config.instructions_per_aspect,
            "planned_samples": planned_samples,
            # Units beyond ceil(N/K), planned to replace rejected samples (max_extra_units).
            "extra_units": max(0, plan.units - units_needed(config.num_samples, config.instructions_per_aspect)),
        },
        "units": {
            "planned": plan.units,
            "committed": units_committed,
            "resumed": units_before,
            "this_run": units_committed - units_before,
            "retried": sum(len(c.ids) for c in redone),
            "rejected": synthesis_totals.units_rejected,
        },
        "shards": {
            "planned": plan.shards,
            "committed": len(committed.commits[PassName.SYNTHESIS]),
            "this_run": this_run.shards,
            "redone": len(redone),  # their work started more than once: an actor died, a run stopped
        },
        # Content failures: a reply that never validated, a prompt too long. Samples lost for good.
        "rejects": {"samples_lost": lost, "by_reason": reasons},
        # Infrastructure failures: never rejects, retried until they pass or the run stops.
        "infrastructure": {
            "outage_retries": sum(t.outage_retries for t in totals.values()),
            "shards_redone": len(redone),
            "shard_attempts_beyond_first": sum(c.attempt - 1 for c in synthesis),
        },
        "cost": api_cost(config, stages),
        "samples": samples,
        "delivered": dataset["rows"],  # in dataset/: N, unless the top-up budget ran out
        "deduplicated": {
            **duplicates,
            "total": sum(duplicates.values()),
            # Share of the instructions written that were near-duplicates (of the reference, of
            # their unit, or of the run), before dedup removed them.
            "near_duplicate_rate": round(sum(duplicates.values()) / max(1, instructions), 4),
            "threshold": config.dedup.threshold if config.dedup.enabled else None,
        },
        "quality": quality,
        "rejected_samples": lost,
        "all_planned_samples_accounted": samples + lost == planned_samples,
        "dataset": {"files": dataset["files"], "rows": dataset["rows"]},
        "stages": {name: s.model_dump(exclude={"first_calls"}) | {"retries": s.calls - first_calls(name, s)}
                   for name, s in sorted(stages.items(), key=_stage_order)},
        # Share of prompt tokens vLLM served from its prefix cache (0 for engines that do not say).
        "prefix_cache_hit_rate": round(
            sum(s.cached_prompt_tokens for s in stages.values()) / max(1, sum(s.prompt_tokens for s in stages.values())), 3
        ),
        "this_run": {
            "resumed": resumed,
            "wall_seconds": round(wall_seconds, 1),
            "synthesis_seconds": round(this_run.seconds, 1),
            "completion_tokens": run_tokens,
            "completion_tokens_per_second": round(run_tokens / max(this_run.seconds, 1e-9), 1),
        },
        "config": config.public_dump(),
    }


def api_cost(config: RunConfig, stages: dict[str, StageStats]) -> dict[str, Any] | None:
    """Cost of every call in OUTPUT, from the configured price of the model (engine openai)."""
    price = config.engine.api.prices.get(config.engine.model or "")
    if price is None:
        return None
    prompt = sum(s.prompt_tokens for s in stages.values())
    completion = sum(s.completion_tokens for s in stages.values())
    total = prompt / 1e6 * price.input_per_million + completion / 1e6 * price.output_per_million
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total": round(total, 6)}


def reasons_by_count(totals) -> dict[str, int]:
    """Reject rows of every pass in ``totals`` by "stage: reason", most frequent first (report.json's
    ``rejects.by_reason``)."""
    total = ShardStats()
    for stats in totals:
        total += stats
    return dict(sorted(total.by_reason().items(), key=lambda kv: -kv[1]))


def summary(report: dict[str, Any]) -> str:
    stages = report["stages"]
    mode = report.get("feedback_mode", "reference")
    mode = "" if mode == "reference" else f" (feedback mode {mode})"
    lines = [
        f"refed-ray: {report['delivered']} samples in {report['output']}/dataset "
        f"({len(report['dataset']['files'])} files; {report['samples']} accepted, {report['rejected_samples']} of "
        f"{report['plan']['planned_samples']} planned samples rejected, {report['plan']['extra_units']} extra units)",
        f"  references used: {report['references']['used']}  feedback calls: {report['feedback_calls']}{mode}"
        f"  units: {report['units']['committed']}/{report['units']['planned']}"
        f" ({report['units']['resumed']} resumed)  shards redone: {report['shards']['redone']}",
    ]
    for name, s in stages.items():
        lines.append(
            f"  {name:<15} in {s['rows_in']:>7}  out {s['rows_out']:>7}  rejected {s['rejected']:>5}"
            f"  tokens {s['prompt_tokens']:>9} in / {s['completion_tokens']:>8} out"
        )
    for reason, count in list(report["rejects"]["by_reason"].items())[:6]:
        lines.append(f"  rejected {count:>6} x {reason}")
    dedup, quality = report["deduplicated"], report.get("quality")
    lines.append(f"  near-duplicates: {dedup['near_duplicate_rate']:.1%} of instructions ({dedup['in_unit']} caught "
                 f"before their response, {dedup['across_units']} dropped across units)")
    if quality and quality["sampled_rows"]:
        lengths = quality["length_tokens"]
        lines.append(f"  diversity: distinct-1 {quality['distinct_1']}  distinct-2 {quality['distinct_2']}  "
                     f"mean pairwise similarity {quality['mean_pairwise_similarity']}  "
                     f"improved differs {quality['improved_differs']:.0%}")
        lines.append("  length p10/p50/p90 (tokens): " + "  ".join(
            f"{name} {v['p10']:.0f}/{v['p50']:.0f}/{v['p90']:.0f}" for name, v in lengths.items()))
    if report["infrastructure"]["outage_retries"]:
        lines.append(f"  outage retries (not rejects): {report['infrastructure']['outage_retries']}")
    if report["cost"]:
        lines.append(f"  cost: {report['cost']['total']:.4f} (from engine.api.prices)")
    run = report["this_run"]
    lines.append(
        f"  this run: {run['wall_seconds']} s, {run['completion_tokens_per_second']} tokens/s generated"
    )
    lines.append(f"  look at: {report['output']}/report.html (charts, samples), {report['output']}/dataset/README.md (card)")
    return "\n".join(lines)


def _stage_order(item: tuple[str, StageStats]) -> int:
    """Stages in the order a sample meets them (``stages.CALLING_STAGES``), others after."""
    order = [str(stage) for stage in CALLING_STAGES]
    return order.index(item[0]) if item[0] in order else len(order)
