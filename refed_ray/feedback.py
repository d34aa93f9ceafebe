"""Stage 1, feedback collection: two teacher calls per reference, whatever N is later.

Both calls see the whole reference pair (the same text first in both prompts, so the engine's
prefix cache serves it once). The instruction call names the reference's subject areas and
relevant skills, each with what makes the instruction effective to train on (clear, actionable,
well structured); the response call says what makes the reference response good and how it
could improve.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from refed_ray.config import RunConfig
from refed_ray.engines.base import Engine
from refed_ray.prompts import render
from refed_ray.records import (
    Feedback,
    Reference,
    Reject,
    instruction_analysis_model,
    response_analysis_model,
)
from refed_ray.stats import StageStats
from refed_ray.structured import ask, derive_seed


@dataclass
class FeedbackResult:
    feedback: Feedback | None
    rejects: list[Reject] = field(default_factory=list)
    stats: StageStats = field(default_factory=StageStats)


async def collect_feedback(engine: Engine, reference: Reference, config: RunConfig) -> FeedbackResult:
    budget = dict(max_tokens=config.sampling.feedback_max_tokens, sampling=config.sampling)
    seed = derive_seed(config.seed, "feedback", reference.reference_id)
    on_instruction, on_response = await asyncio.gather(
        ask(
            engine,
            render("feedback_instruction", instruction=reference.instruction, response=reference.response),
            instruction_analysis_model(config.sampling.feedback_max_chars),
            seed=derive_seed(seed, "instruction"),
            **budget,
        ),
        ask(
            engine,
            render("feedback_response", instruction=reference.instruction, response=reference.response),
            response_analysis_model(config.sampling.feedback_max_chars),
            seed=derive_seed(seed, "response"),
            **budget,
        ),
    )
    stats = StageStats(rows_in=1)
    stats.add_calls(on_instruction, on_response)
    failed = [a for a in (on_instruction, on_response) if a.value is None]
    if failed:
        stats.rejected = 1
        reject = Reject(
            stage="feedback",
            reason="; ".join(a.error for a in failed),
            reference_id=reference.reference_id,
            source=reference.source,
            detail=failed[0].raw[:2000],
        )
        return FeedbackResult(None, [reject], stats)
    stats.rows_out = 1
    feedback = Feedback(
        reference_id=reference.reference_id,
        instruction=reference.instruction,
        reference_response=reference.response,
        subject_areas=on_instruction.value.subject_areas,
        relevant_skills=on_instruction.value.relevant_skills,
        response_feedback=on_response.value.response_feedback,
    )
    return FeedbackResult(feedback, [], stats)
