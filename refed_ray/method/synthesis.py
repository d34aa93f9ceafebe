"""The chain one engine runs for a work unit: instructions -> (in-unit dedup) -> responses -> refinement
(what refines a response is the run's feedback mode's refiner: ``refiners.py``).

Each new instruction runs its own response -> refinement chain as a coroutine, so one engine
holds requests of every step at once and no step's tail leaves it idle. Every planned sample
ends as a ``Sample`` or as a ``Reject`` whose ``lost_samples`` accounts for it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from refed_ray.config import RunConfig
from refed_ray.engines.base import Engine
from refed_ray.method.instructions import synthesize_instructions
from refed_ray.method.refiners import refiner_for
from refed_ray.method.responses import synthesize_response
from refed_ray.method.similarity import near_duplicates_within
from refed_ray.method.structured import Answer, derive_seed
from refed_ray.records.models import Feedback, Reject, Sample, WorkUnit
from refed_ray.records.stages import SYNTHESIS_STAGES, Stage
from refed_ray.records.stats import StageStats


@dataclass
class EarlierUnit:
    """One unit of an earlier run A (``--instructions-from``, run/instructions_from.py): its samples'
    (instruction, original response) by sample index, and the rejects B records for the samples A lost."""

    samples: dict[int, tuple[str, str]]
    lost: list[Reject]


@dataclass
class UnitResult:
    samples: list[Sample] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    stats: dict[str, StageStats] = field(
        default_factory=lambda: {stage.value: StageStats() for stage in SYNTHESIS_STAGES}
    )


async def synthesize_unit(
    engine: Engine, unit: WorkUnit, feedback: Feedback | None, config: RunConfig
) -> UnitResult:
    k = config.instructions_per_aspect
    result = UnitResult()
    if feedback is None:
        result.rejects.append(_no_feedback(unit, k))
        return result
    planned = await synthesize_instructions(engine, unit, feedback, config)
    step = result.stats["instructions"]
    step.rows_in = 1
    step.add_calls(planned)
    if planned.value is None:
        step.rejected = 1
        result.rejects.append(_reject(unit, "instructions", planned.error, k, detail=planned.raw))
        return result
    step.rows_out = k
    instructions = planned.value.instructions
    duplicates = _duplicates(instructions, feedback, config)
    for index, original in duplicates.items():
        why = f"near-duplicate of {original} (Jaccard >= {config.dedup.threshold:g})"
        result.rejects.append(_reject(unit, Stage.DEDUP, why, 1, index, instructions[index]))
    chains = [
        _one_sample(engine, unit, feedback, index, instruction, config)
        for index, instruction in enumerate(instructions) if index not in duplicates
    ]
    return await _gather_samples(result, chains)


async def refine_earlier_unit(
    engine: Engine, unit: WorkUnit, feedback: Feedback | None, earlier: EarlierUnit, config: RunConfig
) -> UnitResult:
    """A unit of a run with ``instructions_from``: the earlier run's instructions and original
    responses, refined by this run's feedback mode; the samples it lost stay lost."""
    result = UnitResult()
    if feedback is None:
        result.rejects.append(_no_feedback(unit, config.instructions_per_aspect))
        return result
    result.rejects += earlier.lost
    chains = [
        refine_sample(engine, unit, feedback, index, instruction, response, config)
        for index, (instruction, response) in sorted(earlier.samples.items())
    ]
    return await _gather_samples(result, chains)


def _no_feedback(unit: WorkUnit, k: int) -> Reject:
    return _reject(unit, "feedback", "no feedback for this reference: its collection failed", k)


async def _gather_samples(result: UnitResult, chains: list) -> UnitResult:
    """Run the unit's sample chains at once; each ends as a sample or a reject, counted by stage."""
    for outcome in await asyncio.gather(*chains):
        outcome.count(result.stats)
        if outcome.sample is not None:
            result.samples.append(outcome.sample)
        else:
            result.rejects.append(outcome.reject)
    return result


def _duplicates(instructions: list[str], feedback: Feedback, config: RunConfig) -> dict[int, str]:
    """Instructions that repeat the reference's or an earlier one of the unit: dropped here, before
    their response and refinement cost two calls (dedup.py finds the duplicates across units)."""
    if not config.dedup.enabled:
        return {}
    reference = [("the reference instruction", feedback.instruction)]
    return dict(near_duplicates_within(instructions, reference, config.dedup.ngram, config.dedup.threshold))


@dataclass
class _SampleOutcome:
    steps: list[tuple[str, Answer]] = field(default_factory=list)  # the sample's calls by stage, in order
    sample: Sample | None = None
    reject: Reject | None = None

    def count(self, stats: dict[str, StageStats]) -> None:
        """Each call a row into its stage; the one whose reply failed, a row rejected there."""
        for stage, answer in self.steps:
            step = stats.setdefault(stage, StageStats())
            step.rows_in += 1
            step.add_calls(answer)
            if answer.value is None:
                step.rejected += 1
            else:
                step.rows_out += 1


async def _one_sample(
    engine: Engine, unit: WorkUnit, feedback: Feedback, index: int, instruction: str, config: RunConfig
) -> _SampleOutcome:
    seed = derive_seed(unit.seed, "sample", index)
    answered = await synthesize_response(engine, instruction, feedback, derive_seed(seed, "response"), config)
    if answered.value is None:
        reject = _reject(unit, "responses", answered.error, 1, index, answered.raw)
        return _SampleOutcome([("responses", answered)], reject=reject)
    outcome = await refine_sample(engine, unit, feedback, index, instruction, answered.value.response, config)
    outcome.steps.insert(0, ("responses", answered))
    if outcome.sample is not None:
        outcome.sample.prompt_tokens += answered.prompt_tokens
        outcome.sample.completion_tokens += answered.completion_tokens
    return outcome


async def refine_sample(
    engine: Engine, unit: WorkUnit, feedback: Feedback, index: int, instruction: str, response: str,
    config: RunConfig,
) -> _SampleOutcome:
    """What the run's feedback mode makes of a response (``refiners.py``): a sample, or a reject
    at the stage whose call failed."""
    seed = derive_seed(unit.seed, "sample", index)
    refined = await refiner_for(config.feedback.mode).refine(engine, instruction, response, feedback, seed, config)
    outcome = _SampleOutcome(list(refined.steps))
    if refined.failed:
        stage, answer = refined.failed
        outcome.reject = _reject(unit, stage, answer.error, 1, index, answer.raw)
        return outcome
    outcome.sample = Sample(
        instruction=instruction,
        response=response,
        analysis=refined.analysis,
        implementation_strategy=refined.implementation_strategy,
        improved_response=refined.improved_response,
        unit_id=unit.unit_id,
        reference_id=unit.reference_id,
        aspect=unit.aspect,
        round=unit.round,
        sample_index=index,
        model=engine.model_name,
        prompt_tokens=sum(answer.prompt_tokens for _, answer in refined.steps),
        completion_tokens=sum(answer.completion_tokens for _, answer in refined.steps),
    )
    return outcome


def _reject(
    unit: WorkUnit, stage: str, reason: str, lost: int, index: int = -1, detail: str = ""
) -> Reject:
    return Reject(
        stage=stage,
        reason=reason,
        unit_id=unit.unit_id,
        reference_id=unit.reference_id,
        aspect=unit.aspect,
        sample_index=index,
        lost_samples=lost,
        detail=detail[:2000],
    )
