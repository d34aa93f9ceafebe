"""Stage 2, instruction synthesis: K new instructions per (reference, aspect), guided by that
aspect's feedback (the reference's subject areas, or its relevant skills).

Rounds past the first of a (reference, aspect) would otherwise resend round 0's prompt with only
another seed, and at scale (1M samples from 1K references is about 50 rounds) the teacher then
writes the same few instructions again and again. So each unit's request carries its own seeded
variation: round 0 keeps the plain prompt; round r >= 1 adds one combination of facets
(audience, form, difficulty, setting; ``prompts/instruction_facets.txt``). The combination follows
from (run seed, reference, aspect, round) alone, so units stay independent and resumable, and
rounds 1 .. N of one (reference, aspect) all get different combinations (N = their product,
1,152 with the bundled facets), walked in a seeded order.
"""

from __future__ import annotations

import math

from refed_ray.config import RunConfig
from refed_ray.engines.base import Engine
from refed_ray.method.prompts import VARIATION as VARIATION_TEMPLATE
from refed_ray.method.prompts import facets, render, template
from refed_ray.method.structured import Answer, ask, derive_seed
from refed_ray.records.models import Feedback, WorkUnit, instruction_list_model

ASPECT_LABELS = {"subject_areas": "subject areas", "relevant_skills": "relevant skills"}


def instruction_messages(unit: WorkUnit, feedback: Feedback, config: RunConfig) -> list[dict[str, str]]:
    """The unit's prompt: the reference and its aspect feedback first, the unit's variation last."""
    k = config.instructions_per_aspect
    return render(
        "instructions",
        instruction=feedback.instruction,
        aspect_label=ASPECT_LABELS[unit.aspect],
        aspect_feedback=getattr(feedback, unit.aspect),
        count=k,
        variation=variation(config.seed, unit),
    )


def variation(run_seed: int, unit: WorkUnit) -> str:
    """The unit's variation sentence (with blank lines around it); empty for round 0."""
    choice = facet_choice(run_seed, unit.reference_id, unit.aspect, unit.round)
    if not choice:
        return ""
    return "\n" + template(VARIATION_TEMPLATE).substitute(choice).strip() + "\n"


def facet_choice(run_seed: int, reference_id: str, aspect: str, round_: int) -> dict[str, str]:
    """One choice per facet for this round of (reference, aspect); {} for round 0.

    Combinations are numbered 0 .. N-1 (mixed radix over the facets). Round r >= 1 takes number
    ``(start + (r - 1) * step) mod N``, where start and step (coprime to N) are hashes of
    (run seed, reference, aspect): a seeded walk that visits every combination once per N rounds.
    """
    if round_ <= 0:
        return {}
    options = facets()
    total = math.prod(len(choices) for choices in options.values())
    start = derive_seed(run_seed, "facets", reference_id, aspect, "start") % total
    step = derive_seed(run_seed, "facets", reference_id, aspect, "step") % total
    while math.gcd(step, total) != 1:
        step = (step + 1) % total
    number = (start + (round_ - 1) * step) % total
    choice = {}
    for name, choices in options.items():
        number, index = divmod(number, len(choices))
        choice[name] = choices[index]
    return choice


async def synthesize_instructions(
    engine: Engine, unit: WorkUnit, feedback: Feedback, config: RunConfig
) -> Answer:
    """The ``Answer``'s value has ``.instructions``: exactly K strings."""
    return await ask(
        engine,
        instruction_messages(unit, feedback, config),
        instruction_list_model(config.instructions_per_aspect, config.sampling.instruction_max_chars),
        max_tokens=config.sampling.instructions_max_tokens,
        sampling=config.sampling,
        seed=derive_seed(unit.seed, "instructions"),
    )
