"""The pairwise judge: which of two responses to one instruction is better, asked in both orders.

A judge that favours a position (the first answer it reads, say) would decide pairs by the order
they are shown in. So every pair (X, Y) is judged twice, X first and then Y first: two verdicts
for the same response make a win, two that disagree (each order won by its first response, or by
its second) make a tie. A pair whose judge never gave a valid reply in one of the orders, after
``max_attempts`` tries, is a reject with its reason: not a tie, since nothing was decided.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from refed_ray.config import SamplingConfig
from refed_ray.engines.base import Engine
from refed_ray.method.prompts import render
from refed_ray.method.structured import ask, derive_seed
from refed_ray.records.models import CHARS_PER_TOKEN, Reject, judge_verdict_model, worst_case_tokens
from refed_ray.records.stats import StageStats

STAGE = "judge"
Winner = Literal["x", "y", "tie"]


class JudgeSampling(BaseModel):
    """How the judge is asked: greedy by default (a verdict, not a creative text)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_attempts: int = Field(3, ge=1, le=10, description="tries per order before the pair is a reject")
    max_tokens: int = Field(1024, ge=16, description="one verdict: its reasoning and the choice")
    reasoning_max_chars: int = Field(1500, ge=20, description="bound on the verdict's reasoning")
    seed: int = Field(0, ge=0, description="the judge's sampling seeds follow it")

    @model_validator(mode="after")
    def _verdict_fits_its_budget(self) -> JudgeSampling:
        worst, _ = worst_case_tokens(judge_verdict_model(self.reasoning_max_chars))
        if worst > self.max_tokens:
            raise ValueError(
                f"max_tokens={self.max_tokens} cannot hold the longest verdict that reasoning_max_chars="
                f"{self.reasoning_max_chars} allows ({worst} tokens at {CHARS_PER_TOKEN} characters a token): "
                f"raise max_tokens to {worst} or more, or lower reasoning_max_chars"
            )
        return self

    def as_sampling(self) -> SamplingConfig:
        """What ``structured.ask`` reads of a sampling config (its other budgets are the run's)."""
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, max_attempts=self.max_attempts)


@dataclass
class PairJudgement:
    """Both orders' verdicts on one pair, or the reject that replaces them."""

    winner: Winner | None  # None: rejected
    first: str = ""  # "1" or "2": the verdict with X shown first
    second: str = ""  # ... with Y shown first
    reasoning_first: str = ""
    reasoning_second: str = ""
    reject_reason: str = ""
    detail: str = ""
    stats: StageStats = field(default_factory=lambda: StageStats(rows_in=1))


def winner_of(first: str, second: str) -> Winner:
    """X was response 1 in the first order and response 2 in the second."""
    if (first, second) == ("1", "2"):
        return "x"
    if (first, second) == ("2", "1"):
        return "y"
    return "tie"  # each order won by the same position: the position decided, not the responses


async def judge_pair(engine: Engine, instruction: str, x: str, y: str, sampling: JudgeSampling,
                     pair_id: str) -> PairJudgement:
    schema = judge_verdict_model(sampling.reasoning_max_chars)
    seed = derive_seed(sampling.seed, STAGE, pair_id)
    first, second = await asyncio.gather(*(
        ask(engine, render("judge_pair", instruction=instruction, response_1=one, response_2=two), schema,
            max_tokens=sampling.max_tokens, sampling=sampling.as_sampling(), seed=derive_seed(seed, order))
        for order, (one, two) in enumerate(((x, y), (y, x)))
    ))
    stats = StageStats(rows_in=1)
    stats.add_calls(first, second)
    failed = [(name, a) for name, a in (("X first", first), ("Y first", second)) if a.value is None]
    if failed:
        stats.rejected = 1
        reason = "; ".join(f"{name}: {a.error}" for name, a in failed)
        return PairJudgement(None, reject_reason=reason, detail=failed[0][1].raw[:2000], stats=stats)
    stats.rows_out = 1
    return PairJudgement(
        winner_of(first.value.better, second.value.better), first.value.better, second.value.better,
        first.value.reasoning, second.value.reasoning, stats=stats,
    )


def pair_reject(judgement: PairJudgement, unit_id: str, sample_index: int) -> Reject:
    """A pair the judge could not decide: counted as rejected, with its reason (one pair lost)."""
    return Reject(stage=STAGE, reason=judgement.reject_reason, unit_id=unit_id, sample_index=sample_index,
                  lost_samples=1, detail=judgement.detail)
