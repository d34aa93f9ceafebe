"""What a selection method (``refed-ray select``, ``select.METHODS``) is given and returns: one
decision per sample, in the order of its input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from refed_ray.config import RunConfig
from refed_ray.storage import Storage

DECISIONS = pa.schema([("unit_id", pa.string()), ("sample_index", pa.int64()), ("keep", pa.bool_()),
                       ("reason", pa.string())])


def decisions_table(samples: pa.Table, keep: list[bool], reasons: list[str]) -> pa.Table:
    """The decisions on ``samples``: their keys, with ``keep`` and ``reasons`` row for row."""
    return pa.table({"unit_id": samples.column("unit_id"), "sample_index": samples.column("sample_index"),
                     "keep": pa.array(keep, pa.bool_()), "reason": pa.array(reasons, pa.string())}).cast(DECISIONS)


@dataclass
class SelectionContext:
    """What a method may use besides the samples. ``stats`` is the method's to fill (e.g. judge
    calls, tokens, cost): it goes into _selection.json."""

    selection: Storage  # OUTPUT/selected/METHOD-N/: a method's own commits go under it
    run: Storage  # OUTPUT
    config: RunConfig  # the run's, from run.json
    judge_config: str | None = None
    threshold: float | None = None
    seed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
