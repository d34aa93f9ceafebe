"""Per-stage counters: kept by workers per shard, stored in markers, summed into report.json."""

from __future__ import annotations

from pydantic import BaseModel

STAGES = ("feedback", "instructions", "responses", "refinement")


class StageStats(BaseModel):
    rows_in: int = 0
    rows_out: int = 0
    rejected: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add_calls(self, *answers) -> None:
        for answer in answers:
            self.calls += answer.calls
            self.prompt_tokens += answer.prompt_tokens
            self.completion_tokens += answer.completion_tokens

    def __iadd__(self, other: StageStats) -> StageStats:
        for name in StageStats.model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


def empty_stats() -> dict[str, StageStats]:
    return {stage: StageStats() for stage in STAGES}


def merge(total: dict[str, StageStats], part: dict[str, dict | StageStats]) -> None:
    for stage, values in part.items():
        total.setdefault(stage, StageStats())
        total[stage] += values if isinstance(values, StageStats) else StageStats(**values)
