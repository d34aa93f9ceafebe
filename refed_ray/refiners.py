"""What becomes of a synthesized response, per feedback mode (config ``feedback.mode``): one refiner each.

A refiner names the feedback prompts its mode asks once per reference, every prompt its chain
renders (the resume fingerprint's prompts digest covers these), the stages each sample calls once
after its response (``refed-ray plan`` counts them), and the coroutine that turns a new
(instruction, response) into a REFED row's analysis, strategy and improved response. A new mode
is one refiner here, its module and its prompt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from refed_ray.config import RunConfig
from refed_ray.engines.base import Engine
from refed_ray.records import Analysis, Feedback, ImplementationStrategy
from refed_ray.structured import Answer, derive_seed


@dataclass
class Refined:
    """What a refiner made of one response: its calls by stage, in order, and the REFED fields
    (None when a call failed: the last step's answer says why)."""

    steps: list[tuple[str, Answer]] = field(default_factory=list)
    analysis: dict | None = None
    implementation_strategy: dict | None = None
    improved_response: str | None = None

    @property
    def failed(self) -> tuple[str, Answer] | None:
        return self.steps[-1] if self.improved_response is None else None


RefineFn = Callable[[Engine, str, str, Feedback, int, RunConfig], Awaitable[Refined]]


@dataclass(frozen=True)
class Refiner:
    mode: str
    reference_feedback: tuple[str, ...]  # feedback prompts asked once per reference
    prompts: tuple[str, ...]  # every prompt the mode's chain renders
    sample_stages: tuple[str, ...]  # stages each sample calls once after its response
    refine: RefineFn  # (engine, instruction, response, feedback, sample seed, config) -> Refined


def refined_from(steps: list[tuple[str, Answer]]) -> Refined:
    """A Refined whose last step is a refinement reply (``records.refinement_model``)."""
    value = steps[-1][1].value
    if value is None:
        return Refined(steps)
    return Refined(steps, value.analysis.model_dump(), value.implementation_strategy.model_dump(),
                   value.improved_response)


async def _refine_with_reference_feedback(engine, instruction, response, feedback, seed, config) -> Refined:
    """The method: the reference's response feedback, written for a similar but different pair."""
    from refed_ray.refinement import refine_response

    refined = await refine_response(engine, instruction, response, feedback, derive_seed(seed, "refinement"), config)
    return refined_from([("refinement", refined)])


async def _refine_with_own_feedback(engine, instruction, response, feedback, seed, config) -> Refined:
    from refed_ray.sample_feedback import refine_with_own_feedback

    return await refine_with_own_feedback(engine, instruction, response, seed, config)


async def _keep_response(engine, instruction, response, feedback, seed, config) -> Refined:
    """No refinement: the final response is the response, with an empty analysis and strategy."""
    empty_analysis = Analysis(original_strengths=[], improvement_opportunities=[], relevant_feedback=[])
    empty_strategy = ImplementationStrategy(planned_changes=[], rationale="")
    return Refined([], empty_analysis.model_dump(), empty_strategy.model_dump(), response)


_SYNTHESIS_PROMPTS = ("instructions", "response")
REFINERS = {
    "reference": Refiner(
        "reference", ("feedback_instruction", "feedback_response"),
        ("feedback_instruction", "feedback_response", *_SYNTHESIS_PROMPTS, "refinement"),
        ("refinement",), _refine_with_reference_feedback,
    ),
    "sample": Refiner(
        "sample", ("feedback_instruction",),
        ("feedback_instruction", *_SYNTHESIS_PROMPTS, "feedback_response", "refinement_sample"),
        ("sample_feedback", "refinement"), _refine_with_own_feedback,
    ),
    "none": Refiner(
        "none", ("feedback_instruction",), ("feedback_instruction", *_SYNTHESIS_PROMPTS), (), _keep_response,
    ),
}


def refiner_for(mode: str) -> Refiner:
    return REFINERS[mode]
