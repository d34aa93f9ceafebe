"""Stage 4, refinement: apply the reference's response feedback to a synthesized response.

The prompt says the feedback was written for a similar but different pair, and walks the
teacher through a quality assessment: analyse the original, keep the feedback points that apply
and ignore the rest, make the highest-impact changes, keep what works. The reply is the REFED
analysis, strategy and improved response. The feedback, shared by every sample of a reference,
comes first in the prompt; the instruction and response last (prefix caching).
"""

from __future__ import annotations

from refed_ray.config import RunConfig
from refed_ray.engines.base import Engine
from refed_ray.method.prompts import render
from refed_ray.method.refined import SYNTHESIS_PROMPTS, Refined, Refiner, refined_from
from refed_ray.method.structured import Answer, ask, derive_seed
from refed_ray.records.models import Feedback, refinement_model


async def refine_response(
    engine: Engine, instruction: str, response: str, feedback: Feedback, seed: int, config: RunConfig
) -> Answer:
    """The ``Answer``'s value has ``.analysis``, ``.implementation_strategy``, ``.improved_response``."""
    return await refine_with(engine, "refinement", instruction, response, feedback.response_feedback, seed, config)


async def refine_with(
    engine: Engine, step: str, instruction: str, response: str, response_feedback: str, seed: int, config: RunConfig
) -> Answer:
    """A refinement reply from prompt ``step`` ("refinement", or feedback mode sample's own)."""
    messages = render(step, instruction=instruction, response=response, response_feedback=response_feedback)
    return await ask(
        engine,
        messages,
        refinement_model(
            config.sampling.response_max_chars, config.sampling.point_max_chars, config.sampling.max_points
        ),
        max_tokens=config.sampling.refinement_max_tokens,
        sampling=config.sampling,
        seed=seed,
    )


async def _refine_with_reference_feedback(engine, instruction, response, feedback, seed, config) -> Refined:
    """The method: the reference's response feedback, written for a similar but different pair."""
    refined = await refine_response(engine, instruction, response, feedback, derive_seed(seed, "refinement"), config)
    return refined_from([("refinement", refined)])


REFERENCE = Refiner(
    "reference", ("feedback_instruction", "feedback_response"),
    ("feedback_instruction", "feedback_response", *SYNTHESIS_PROMPTS, "refinement"),
    ("refinement",), _refine_with_reference_feedback,
)
