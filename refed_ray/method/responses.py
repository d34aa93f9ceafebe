"""Stage 3, response synthesis: one call per new instruction, with the reference pair shown as
an in-context example of a good response and an explicit list of what the response must do.
The reference pair comes first in the prompt and the new instruction last (prefix caching)."""

from __future__ import annotations

from refed_ray.config import RunConfig
from refed_ray.engines.base import Engine
from refed_ray.method.prompts import render
from refed_ray.method.structured import Answer, ask
from refed_ray.records.models import Feedback, response_model


async def synthesize_response(
    engine: Engine, instruction: str, feedback: Feedback, seed: int, config: RunConfig
) -> Answer:
    """The ``Answer``'s value has ``.response``."""
    messages = render(
        "response",
        reference_instruction=feedback.instruction,
        reference_response=feedback.reference_response,
        instruction=instruction,
    )
    return await ask(
        engine,
        messages,
        response_model(config.sampling.response_max_chars),
        max_tokens=config.sampling.response_max_tokens,
        sampling=config.sampling,
        seed=seed,
    )
