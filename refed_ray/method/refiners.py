"""What becomes of a synthesized response, per feedback mode (config ``feedback.mode``): one refiner each.

A refiner names the feedback prompts its mode asks once per reference, every prompt its chain
renders (the resume fingerprint's prompts digest covers these), the stages each sample calls once
after its response (``refed-ray plan`` counts them), and the coroutine that turns a new
(instruction, response) into a REFED row's analysis, strategy and improved response
(``refined.Refiner``). A new mode is its module (with its ``Refiner``), its prompt and one entry in
``REFINERS``; mode none, which calls nothing, is here.
"""

from __future__ import annotations

from refed_ray.method.refined import SYNTHESIS_PROMPTS, Refined, Refiner
from refed_ray.method.refinement import REFERENCE
from refed_ray.method.sample_feedback import SAMPLE
from refed_ray.records.models import Analysis, ImplementationStrategy


async def _keep_response(engine, instruction, response, feedback, seed, config) -> Refined:
    """No refinement: the final response is the response, with an empty analysis and strategy."""
    empty_analysis = Analysis(original_strengths=[], improvement_opportunities=[], relevant_feedback=[])
    empty_strategy = ImplementationStrategy(planned_changes=[], rationale="")
    return Refined([], empty_analysis.model_dump(), empty_strategy.model_dump(), response)


NONE = Refiner("none", ("feedback_instruction",), ("feedback_instruction", *SYNTHESIS_PROMPTS), (), _keep_response)
REFINERS = {refiner.mode: refiner for refiner in (REFERENCE, SAMPLE, NONE)}


def refiner_for(mode: str) -> Refiner:
    return REFINERS[mode]
