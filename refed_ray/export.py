"""``refed-ray export``: committed samples to the formats training frameworks read.

- refed-json: one JSON list of REFED rows (the released REFED file's shape);
- jsonl: ``{"instruction", "response"}`` per line, the response being the refined one;
- sharegpt: ``{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}`` per line.
Rows stream shard by shard: memory holds one shard, whatever the size of the output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import fsspec

from refed_ray.errors import UserError
from refed_ray.records import RefedRow
from refed_ray.storage import Storage

FORMATS = ("refed-json", "jsonl", "sharegpt")
_REFED_FIELDS = list(RefedRow.model_fields)


def export(output: str, fmt: str, to: str | None = None, storage_options: dict | None = None) -> tuple[str, int]:
    storage = Storage(output, storage_options)
    if not storage.exists("run.json"):
        raise UserError(f"{output} holds no refed-ray run (no run.json)")
    target = to or f"{output.rstrip('/')}/export/{fmt}.{'json' if fmt == 'refed-json' else 'jsonl'}"
    count = 0
    with fsspec.open(target, "w", encoding="utf-8", **(storage_options or {})) as out:
        if fmt == "refed-json":
            out.write("[")
        for row in _rows(storage):
            count += 1
            if fmt == "refed-json":
                out.write(("\n" if count == 1 else ",\n") + json.dumps(row, ensure_ascii=False))
            else:
                out.write(json.dumps(_convert(row, fmt), ensure_ascii=False) + "\n")
        if fmt == "refed-json":
            out.write("\n]\n")
    return target, count


def _rows(storage: Storage) -> Iterator[dict]:
    for table in storage.iter_committed_tables("data"):
        yield from table.select(_REFED_FIELDS).to_pylist()


def _convert(row: dict, fmt: str) -> dict:
    if fmt == "jsonl":
        return {"instruction": row["instruction"], "response": row["improved_response"]}
    return {
        "conversations": [
            {"from": "human", "value": row["instruction"]},
            {"from": "gpt", "value": row["improved_response"]},
        ]
    }
