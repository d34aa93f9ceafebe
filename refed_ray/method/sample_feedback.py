"""Feedback mode ``sample`` (the paper's sample-level baseline): each new response gets its own
feedback call, the response-feedback prompt applied to the new (instruction, response) pair
(stage "sample_feedback"), and is then refined with that feedback, without the method's
"written for a similar but different pair" framing (prompts/refinement_sample.txt).

One feedback call per sample, against the method's two per reference (feedback.py).
"""

from __future__ import annotations

from refed_ray.config import RunConfig
from refed_ray.engines.base import Engine
from refed_ray.method.feedback import ask_feedback
from refed_ray.method.refined import SYNTHESIS_PROMPTS, Refined, Refiner, refined_from
from refed_ray.method.refinement import refine_with
from refed_ray.method.structured import Answer, derive_seed


async def feedback_on_sample(engine: Engine, instruction: str, response: str, seed: int, config: RunConfig) -> Answer:
    """The response-feedback prompt on the new pair. The ``Answer``'s value has ``.response_feedback``."""
    return await ask_feedback(engine, "feedback_response", instruction, response, seed, config)


async def refine_with_own_feedback(
    engine: Engine, instruction: str, response: str, seed: int, config: RunConfig
) -> Refined:
    own = await feedback_on_sample(engine, instruction, response, derive_seed(seed, "sample_feedback"), config)
    if own.value is None:
        return Refined([("sample_feedback", own)])
    refined = await refine_with(
        engine, "refinement_sample", instruction, response, own.value.response_feedback,
        derive_seed(seed, "refinement"), config,
    )
    return refined_from([("sample_feedback", own), ("refinement", refined)])


async def _refine_with_own_feedback(engine, instruction, response, feedback, seed, config) -> Refined:
    return await refine_with_own_feedback(engine, instruction, response, seed, config)


SAMPLE = Refiner(
    "sample", ("feedback_instruction",),
    ("feedback_instruction", *SYNTHESIS_PROMPTS, "feedback_response", "refinement_sample"),
    ("sample_feedback", "refinement"), _refine_with_own_feedback,
)
