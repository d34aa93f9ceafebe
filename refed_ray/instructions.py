"""Stage 2, instruction synthesis: K new instructions per (reference, aspect), guided by that
aspect's feedback (the reference's subject areas, or its relevant skills)."""

from __future__ import annotations

from refed_ray.config import RunConfig
from refed_ray.engines.base import Engine
from refed_ray.prompts import render
from refed_ray.records import Feedback, WorkUnit, instruction_list_model
from refed_ray.structured import Answer, ask, derive_seed

ASPECT_LABELS = {"subject_areas": "subject areas", "relevant_skills": "relevant skills"}


async def synthesize_instructions(
    engine: Engine, unit: WorkUnit, feedback: Feedback, config: RunConfig
) -> Answer:
    """The ``Answer``'s value has ``.instructions``: exactly K strings."""
    k = config.instructions_per_aspect
    messages = render(
        "instructions",
        instruction=feedback.instruction,
        aspect_label=ASPECT_LABELS[unit.aspect],
        aspect_feedback=getattr(feedback, unit.aspect),
        count=k,
    )
    return await ask(
        engine,
        messages,
        instruction_list_model(k, config.sampling.instruction_max_chars),
        max_tokens=config.sampling.instructions_max_tokens,
        sampling=config.sampling,
        seed=derive_seed(unit.seed, "instructions"),
    )
