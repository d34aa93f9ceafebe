"""What a feedback mode's refiner is (``Refiner``) and what it makes of one response (``Refined``).

A refiner names the feedback prompts its mode asks once per reference, every prompt its chain
renders (the resume fingerprint's prompts digest covers these), the stages each sample calls once
after its response (``refed-ray plan`` counts them), and the coroutine that turns a new
(instruction, response) into a REFED row's analysis, strategy and improved response. Each mode's
refiner lives in its own module (refinement.py: reference; sample_feedback.py: sample;
refiners.py: none) and ``refiners.REFINERS`` lists them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from refed_ray.config import RunConfig
from refed_ray.engines.base import Engine
from refed_ray.method.structured import Answer
from refed_ray.records.models import Feedback

SYNTHESIS_PROMPTS = ("instructions", "response")  # every mode's chain renders these


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
