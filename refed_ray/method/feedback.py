"""Stage 1, feedback collection: two teacher calls per reference, whatever N is later (feedback
modes sample and none make the instruction call only: ``refiners.py``).

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
from refed_ray.method.prompts import render
from refed_ray.method.structured import Answer, ask, derive_seed
from refed_ray.records.models import (
    Feedback,
    Reference,
    Reject,
    instruction_analysis_model,
    response_analysis_model,
)
from refed_ray.records.stats import StageStats


@dataclass
class FeedbackResult:
    feedback: Feedback | None
    rejects: list[Reject] = field(default_factory=list)
    stats: StageStats = field(default_factory=StageStats)


async def collect_feedback(engine: Engine, reference: Reference, config: RunConfig,
                           steps: tuple[str, ...]) -> FeedbackResult:
    """The feedback calls (``steps``: prompts) the run's feedback mode asks per reference, its
    refiner's ``reference_feedback`` (``refiners.py``): both in mode reference; only the
    instruction's, which instruction synthesis needs, in the others (their ``response_feedback``
    stays empty)."""
    seed = derive_seed(config.seed, "feedback", reference.reference_id)
    answers = await asyncio.gather(*(_ask_feedback(engine, step, reference, seed, config) for step in steps))
    stats = StageStats(rows_in=1)
    stats.add_calls(*answers)
    failed = [a for a in answers if a.value is None]
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
    replies = dict(zip(steps, (a.value for a in answers)))
    on_instruction, on_response = replies["feedback_instruction"], replies.get("feedback_response")
    feedback = Feedback(
        reference_id=reference.reference_id,
        instruction=reference.instruction,
        reference_response=reference.response,
        subject_areas=on_instruction.subject_areas,
        relevant_skills=on_instruction.relevant_skills,
        response_feedback=on_response.response_feedback if on_response else "",
    )
    return FeedbackResult(feedback, [], stats)


# Each feedback prompt: its reply's model, and the name its seed derives from.
_REPLIES = {
    "feedback_instruction": (instruction_analysis_model, "instruction"),
    "feedback_response": (response_analysis_model, "response"),
}


async def _ask_feedback(engine: Engine, step: str, reference: Reference, seed: int, config: RunConfig) -> Answer:
    return await ask_feedback(engine, step, reference.instruction, reference.response,
                              derive_seed(seed, _REPLIES[step][1]), config)


async def ask_feedback(engine: Engine, step: str, instruction: str, response: str, seed: int,
                       config: RunConfig) -> Answer:
    """One feedback call (``step``: a feedback prompt) on a pair: a reference's, or in feedback
    mode sample a synthesized one (``sample_feedback.py``)."""
    return await ask(
        engine,
        render(step, instruction=instruction, response=response),
        _REPLIES[step][0](config.sampling.feedback_max_chars),
        seed=seed,
        max_tokens=config.sampling.feedback_max_tokens,
        sampling=config.sampling,
    )
