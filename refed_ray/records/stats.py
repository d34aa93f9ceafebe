"""Counters: kept by workers per shard, stored with the shard's commit, summed into report.json.

Everything the report needs travels in these counters, so the report never reads data or
rejects files: a finished 1M-sample output is summed from one index object.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, model_validator

from refed_ray.records.stages import RUN_STAGES, Stage

STAGES = RUN_STAGES  # the stages every report lists (stages.py holds them all)
REASON_SEPARATOR = ": "  # report.json's by_reason keys: "stage: reason" (stage names hold no colon)


class StageStats(BaseModel):
    rows_in: int = 0
    rows_out: int = 0
    rejected: int = 0
    calls: int = 0
    first_calls: int = 0  # one per question asked: calls beyond these are retries (0 in commits before it was counted)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the engine's prefix cache (vLLM)

    def add_calls(self, *answers) -> None:
        for answer in answers:
            self.first_calls += 1
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
    # Reject rows by stage, then by reason category: kept apart, never parsed back from one string.
    rejects: dict[str, dict[str, int]] = Field(default_factory=dict)
    # Infrastructure, never a sample's fault: calls that met an outage and were tried again.
    outage_retries: int = 0

    def __iadd__(self, other: ShardStats) -> ShardStats:
        merge(self.stages, other.stages)
        for name in ("samples", "lost_samples", "units_rejected", "outage_retries"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for stage, reasons in other.rejects.items():
            for reason, count in reasons.items():
                self.count_reject(stage, reason, count)
        return self

    @model_validator(mode="before")
    @classmethod
    def _read_flat_reasons(cls, data):
        """Commits written before stage and reason were kept apart hold ``reject_reasons``
        ({"stage: reason": rows}): read them into ``rejects``."""
        if isinstance(data, dict) and "reject_reasons" in data:
            data = dict(data)
            rejects: dict[str, dict[str, int]] = {}
            for key, count in data.pop("reject_reasons").items():
                stage, _, reason = key.partition(REASON_SEPARATOR)
                rejects.setdefault(stage, {})[reason] = rejects.get(stage, {}).get(reason, 0) + count
            data["rejects"] = rejects
        return data

    def count_reject(self, stage: str, reason: str, count: int = 1) -> None:
        by_reason = self.rejects.setdefault(stage, {})
        by_reason[reason] = by_reason.get(reason, 0) + count

    def rejected(self, *stages: str, reason_prefix: str = "") -> int:
        """Reject rows of ``stages`` (all when none is named) whose reason starts with ``reason_prefix``."""
        return sum(count for stage, reasons in self.rejects.items() if not stages or stage in stages
                   for reason, count in reasons.items() if reason.startswith(reason_prefix))

    @property
    def reject_reasons(self) -> dict[str, int]:
        """The flat ``{"stage: reason": rows}`` view (as commits held it before); prefer ``rejects``."""
        return self.by_reason()

    def by_reason(self) -> dict[str, int]:
        """Reject rows as report.json shows them: ``{"stage: reason": rows}``."""
        return {f"{stage}{REASON_SEPARATOR}{reason}": count
                for stage, reasons in self.rejects.items() for reason, count in reasons.items()}

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
                stats.count_reject(stage, reason_category(reason))
        return stats


# A number a comparison or a bound states is a setting (Jaccard >= 0.7, max_tokens=4096, at most
# 200 characters): it stays, so a category reads true. Any other (an index, a count, a field
# path's position) is a particular of one reject, and becomes N.
_NUMBER = re.compile(r"(?P<bound>(?:[<>]=?|==?|\bat (?:most|least))\s*)?(?P<number>\d+(?:\.\d+)?)")


def reason_category(reason: str) -> str:
    """A reject reason without its particulars (numbers but settings, field paths), for counting by kind."""
    head = reason.split(" (after ")[0]
    head = _NUMBER.sub(lambda m: m.group(0) if m.group("bound") else "N", head)
    return head[:100]


def empty_stats() -> dict[str, StageStats]:
    return {stage.value: StageStats() for stage in STAGES}


def first_calls(stage: str, stats: StageStats) -> int:
    """Calls a stage made when nothing is retried: its questions asked. Commits written before
    those were counted tell only rows: reference-level feedback asked two questions a row then."""
    if stats.first_calls or not stats.calls:
        return stats.first_calls
    legacy_per_row = 2 if stage == Stage.FEEDBACK else 1
    return stats.rows_in * legacy_per_row


def merge(total: dict[str, StageStats], part: dict[str, dict | StageStats]) -> None:
    for stage, values in part.items():
        total.setdefault(stage, StageStats())
        total[stage] += values if isinstance(values, StageStats) else StageStats(**values)
