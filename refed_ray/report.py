"""report.json: what OUTPUT holds (summed from committed shards) and what this run did."""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from refed_ray.config import RunConfig
from refed_ray.plan import PlanSummary
from refed_ray.seeds import SeedSet
from refed_ray.stats import StageStats, empty_stats, merge
from refed_ray.storage import Storage


def build_report(
    storage: Storage,
    config: RunConfig,
    seeds: SeedSet,
    plan: PlanSummary,
    *,
    resumed: bool,
    units_before: int,
    this_run: dict[str, Any],
    wall_seconds: float,
) -> dict[str, Any]:
    stages = empty_stats()
    units_committed = 0
    retried = {"feedback": 0, "synthesis": 0}  # ids whose batch ran more than once
    for pass_name in retried:
        for marker in storage.markers(pass_name):
            merge(stages, marker.stats)
            units_committed += len(marker.ids) if pass_name == "synthesis" else 0
            retried[pass_name] += len(marker.ids) if marker.attempt > 1 else 0
    lost = units_rejected = 0
    for table in storage.iter_committed_tables("rejects"):
        lost += pc.sum(table.column("lost_samples")).as_py() or 0
        # A whole unit failed (its feedback or its instructions): one row, sample_index -1.
        whole_unit = pc.and_(pc.equal(table.column("sample_index"), -1), pc.not_equal(table.column("unit_id"), ""))
        units_rejected += pc.sum(pc.cast(whole_unit, "int64")).as_py() or 0
    samples = stages["refinement"].rows_out
    planned_samples = plan.units * config.instructions_per_aspect
    run_stats = {k: StageStats(**v.model_dump()) for k, v in this_run["stats"].items()}
    run_tokens = sum(s.completion_tokens for s in run_stats.values())
    return {
        "output": storage.uri,
        "model": config.model_name(),
        "device": config.engine.device,
        "references": {
            "usable": len(seeds.references),
            "skipped": len(seeds.skipped),
            "used": len(plan.references_used),
            "feedback_retried": retried["feedback"],
        },
        "feedback_calls": stages["feedback"].calls,
        "feedback_rows": stages["feedback"].rows_out,
        "plan": {
            "units": plan.units,
            "rounds": plan.rounds,
            "instructions_per_unit": config.instructions_per_aspect,
            "planned_samples": planned_samples,
        },
        "units": {
            "planned": plan.units,
            "committed": units_committed,
            "resumed": units_before,
            "this_run": units_committed - units_before,
            "retried": retried["synthesis"],
            "rejected": units_rejected,
        },
        "cost": _cost(config, stages),
        "samples": samples,
        "rejected_samples": lost,
        "all_planned_samples_accounted": samples + lost == planned_samples,
        "stages": {name: s.model_dump() | {"retries": s.calls - _first_calls(name, s)} for name, s in stages.items()},
        "this_run": {
            "resumed": resumed,
            "wall_seconds": round(wall_seconds, 1),
            "synthesis_seconds": round(this_run["seconds"], 1),
            "completion_tokens": run_tokens,
            "completion_tokens_per_second": round(run_tokens / max(this_run["seconds"], 1e-9), 1),
        },
        "config": config.public_dump(),
    }


def _cost(config: RunConfig, stages: dict[str, StageStats]) -> dict[str, Any] | None:
    """Cost of every call in OUTPUT, from the configured price of the model (engine openai)."""
    price = config.engine.api.prices.get(config.engine.model or "")
    if price is None:
        return None
    prompt = sum(s.prompt_tokens for s in stages.values())
    completion = sum(s.completion_tokens for s in stages.values())
    total = prompt / 1e6 * price.input_per_million + completion / 1e6 * price.output_per_million
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total": round(total, 6)}


def _first_calls(stage: str, stats: StageStats) -> int:
    """Calls a stage makes when nothing is retried: feedback makes two per reference."""
    return stats.rows_in * (2 if stage == "feedback" else 1)


def summary(report: dict[str, Any]) -> str:
    stages = report["stages"]
    lines = [
        f"refed-ray: {report['samples']} samples in {report['output']}/data "
        f"({report['rejected_samples']} of {report['plan']['planned_samples']} planned samples rejected)",
        f"  references used: {report['references']['used']}  feedback calls: {report['feedback_calls']}"
        f"  units: {report['units']['committed']}/{report['units']['planned']}"
        f" ({report['units']['resumed']} resumed)",
    ]
    for name, s in stages.items():
        lines.append(
            f"  {name:<13} in {s['rows_in']:>7}  out {s['rows_out']:>7}  rejected {s['rejected']:>5}"
            f"  tokens {s['prompt_tokens']:>9} in / {s['completion_tokens']:>8} out"
        )
    if report["cost"]:
        lines.append(f"  cost: {report['cost']['total']:.4f} (from engine.api.prices)")
    run = report["this_run"]
    lines.append(
        f"  this run: {run['wall_seconds']} s, {run['completion_tokens_per_second']} tokens/s generated"
    )
    return "\n".join(lines)
