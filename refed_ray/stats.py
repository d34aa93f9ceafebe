"""Counters: kept by workers per shard, stored with the shard's commit, summed into report.json.

Everything the report needs travels in these counters, so the report never reads data or
rejects files: a finished 1M-sample output is summed from one index object.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

STAGES = ("feedback", "instructions", "responses", "refinement")


class StageStats(BaseModel):
    rows_in: int = 0
    rows_out: int = 0
    rejected: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the engine's prefix cache (vLLM)

    def add_calls(self, *answers) -> None:
        for answer in answers:
            self.calls += answer.calls
            self.prompt_tokens += answer.prompt_tokens
            self.completion_tokens += answer.completion_tokens
            self.cached_prompt_tokens += answer.cached_tokens

    def __iadd__(self, other: StageStats) -> StageStats:
        for name in StageStats.model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


class ShardStats(BaseModel):
    """One committed shard's counters."""

    stages: dict[str, StageStats] = Field(default_factory=dict)
    samples: int = 0
    lost_samples: int = 0  # planned samples the shard's rejects account for
    units_rejected: int = 0  # whole units lost (no feedback, no instructions, a poison shard)
    reject_reasons: dict[str, int] = Field(default_factory=dict)  # "stage: reason" -> reject rows
    # Infrastructure, never a sample's fault: calls that met an outage and were tried again.
    outage_retries: int = 0

    def __iadd__(self, other: ShardStats) -> ShardStats:
        merge(self.stages, other.stages)
        for name in ("samples", "lost_samples", "units_rejected", "outage_retries"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, count in other.reject_reasons.items():
            self.reject_reasons[reason] = self.reject_reasons.get(reason, 0) + count
        return self

    @classmethod
    def of(cls, tables: dict[str, pa.Table], stages: dict[str, StageStats], outage_retries: int = 0) -> ShardStats:
        """The counters of a shard about to be committed, from its tables and call counters."""
        stats = cls(stages=stages, outage_retries=outage_retries)
        data = tables.get("data")
        stats.samples = data.num_rows if data is not None else 0
        rejects = tables.get("rejects")
        if rejects is not None and rejects.num_rows:
            stats.lost_samples = pc.sum(rejects.column("lost_samples")).as_py() or 0
            # A whole unit failed: one row with sample_index -1 that names a unit.
            whole = pc.and_(pc.equal(rejects.column("sample_index"), -1), pc.not_equal(rejects.column("unit_id"), ""))
            stats.units_rejected = pc.sum(pc.cast(whole, "int64")).as_py() or 0
            for stage, reason in zip(rejects.column("stage").to_pylist(), rejects.column("reason").to_pylist()):
                key = f"{stage}: {reason_category(reason)}"
                stats.reject_reasons[key] = stats.reject_reasons.get(key, 0) + 1
        return stats


def reason_category(reason: str) -> str:
    """A reject reason without its particulars (numbers, field paths), for counting by kind."""
    head = reason.split(" (after ")[0]
    head = re.sub(r"\d+", "N", head)
    return head[:100]


def empty_stats() -> dict[str, StageStats]:
    return {stage: StageStats() for stage in STAGES}


def merge(total: dict[str, StageStats], part: dict[str, dict | StageStats]) -> None:
    for stage, values in part.items():
        total.setdefault(stage, StageStats())
        total[stage] += values if isinstance(values, StageStats) else StageStats(**values)
