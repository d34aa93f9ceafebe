"""Stage and pass names as data: the one list every module reads.

A *stage* is a step whose rows and calls are counted (``stats.StageStats``) and which may reject
(``records.Reject.stage``). A *pass* is a unit of committed work (``commits.py``, ``passes.py``):
its shards, markers and index are named by it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class Stage(StrEnum):
    SEEDS = "seeds"  # seed rows skipped as bad or multi-turn
    FEEDBACK = "feedback"  # reference-level feedback: two calls a reference
    INSTRUCTIONS = "instructions"
    RESPONSES = "responses"
    SAMPLE_FEEDBACK = "sample_feedback"  # feedback.mode sample: one call per synthesized pair
    REFINEMENT = "refinement"
    DEDUP = "dedup"  # near-duplicates: in a unit (synthesis) and across units (the dedup filter)
    ENGINE = "engine"  # a shard abandoned after its engine died on every attempt
    JUDGE = "judge"  # pairwise judge calls of compare / select


#: The stages that make engine calls, in the order a sample meets them.
CALLING_STAGES: tuple[Stage, ...] = (
    Stage.FEEDBACK, Stage.INSTRUCTIONS, Stage.RESPONSES, Stage.SAMPLE_FEEDBACK, Stage.REFINEMENT, Stage.JUDGE,
)
#: The calling stages every run's report lists, counted or not (others appear once they count).
RUN_STAGES: tuple[Stage, ...] = (Stage.FEEDBACK, Stage.INSTRUCTIONS, Stage.RESPONSES, Stage.REFINEMENT)
#: The stages one work unit's chain runs (``synthesis.py``).
SYNTHESIS_STAGES: tuple[Stage, ...] = (Stage.INSTRUCTIONS, Stage.RESPONSES, Stage.REFINEMENT)
#: A sample reaches these stages only once its instruction is written: each instruction written
#: became a sample or a reject of one of them.
AFTER_INSTRUCTIONS: tuple[Stage, ...] = (Stage.DEDUP, Stage.RESPONSES, Stage.SAMPLE_FEEDBACK, Stage.REFINEMENT)

#: ``Reject.stage``'s type: the stage names as a Literal (pydantic validates and dumps plain strings).
StageName = Literal[tuple(s.value for s in Stage)]  # type: ignore[valid-type]


class PassName(StrEnum):
    SEEDS = "seeds"
    FEEDBACK = "feedback"
    SYNTHESIS = "synthesis"
    DEDUP = "dedup"
    JUDGE = "judge"  # compare / select: under their own Storage root


#: The passes a run's OUTPUT holds (``commits.CommitLog`` reads every ``PassName``).
RUN_PASSES: tuple[PassName, ...] = (PassName.SEEDS, PassName.FEEDBACK, PassName.SYNTHESIS, PassName.DEDUP)

#: The stages whose calls are feedback calls (report.json's feedback_calls).
FEEDBACK_STAGES: tuple[Stage, ...] = (Stage.FEEDBACK, Stage.SAMPLE_FEEDBACK)
