"""What a selection method returns: one decision per sample, in the order of its input."""

from __future__ import annotations

import pyarrow as pa

DECISIONS = pa.schema([("unit_id", pa.string()), ("sample_index", pa.int64()), ("keep", pa.bool_()),
                       ("reason", pa.string())])


def decisions_table(samples: pa.Table, keep: list[bool], reasons: list[str]) -> pa.Table:
    """The decisions on ``samples``: their keys, with ``keep`` and ``reasons`` row for row."""
    return pa.table({"unit_id": samples.column("unit_id"), "sample_index": samples.column("sample_index"),
                     "keep": pa.array(keep, pa.bool_()), "reason": pa.array(reasons, pa.string())}).cast(DECISIONS)
