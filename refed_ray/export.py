"""``refed-ray export``: the committed samples in the formats training frameworks read.

- refed-json: one JSON list of REFED rows (the released REFED file's shape);
- jsonl: ``{"instruction", "response"}`` per line, the response being the refined one;
- sharegpt: ``{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}`` per line;
- messages: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` per line (the
  conversational format TRL's SFTTrainer and axolotl's chat templates take as is).

It reads OUTPUT/dataset (brought up to date first) through Ray Data: files are read and rows
converted in parallel tasks; the driver only appends the converted lines to the one target file.
"""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import ray

from refed_ray.commits import CommitLog
from refed_ray.dataset import compact_dataset
from refed_ray.dedup import dropped_keys
from refed_ray.errors import UserError
from refed_ray.records import RefedRow
from refed_ray.storage import Storage

FORMATS = ("refed-json", "jsonl", "sharegpt", "messages")
_REFED_FIELDS = list(RefedRow.model_fields)


def export(
    output: str, fmt: str, to: str | None = None, storage_options: dict | None = None, file_mb: int = 256
) -> tuple[str, int]:
    storage = Storage(output, storage_options)
    if not storage.exists("run.json"):
        raise UserError(f"{output} holds no refed-ray run (no run.json)")
    if not ray.is_initialized():
        ray.init()
    log = CommitLog(storage)
    manifest = compact_dataset(storage, log, file_mb, max_rows=storage.read_json("run.json")["config"]["num_samples"],
                               dropped=dropped_keys(storage, log))
    target = to or f"{output.rstrip('/')}/export/{fmt}.{'json' if fmt == 'refed-json' else 'jsonl'}"
    count = 0
    with fsspec.open(target, "w", encoding="utf-8", **(storage_options or {})) as out:
        if fmt == "refed-json":
            out.write("[")
        if manifest["files"]:
            lines = ray.data.read_parquet(
                [storage.full_uri(name) for name in manifest["files"]], filesystem=_arrow_fs(storage),
            ).map_batches(_to_lines, fn_kwargs={"fmt": fmt}, batch_format="pyarrow")
            for batch in lines.iter_batches(batch_format="pyarrow", batch_size=None):
                for line in batch.column("line").to_pylist():
                    count += 1
                    if fmt == "refed-json":
                        out.write(("\n" if count == 1 else ",\n") + line)
                    else:
                        out.write(line + "\n")
        if fmt == "refed-json":
            out.write("\n]\n")
    return target, count


def _to_lines(batch: pa.Table, fmt: str) -> pa.Table:
    rows = batch.select(_REFED_FIELDS).to_pylist()
    return pa.table({"line": [json.dumps(_convert(row, fmt), ensure_ascii=False) for row in rows]})


def _convert(row: dict, fmt: str) -> dict:
    if fmt == "refed-json":
        return row
    if fmt == "jsonl":
        return {"instruction": row["instruction"], "response": row["improved_response"]}
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": row["instruction"]},
                             {"role": "assistant", "content": row["improved_response"]}]}
    return {
        "conversations": [
            {"from": "human", "value": row["instruction"]},
            {"from": "gpt", "value": row["improved_response"]},
        ]
    }


def _arrow_fs(storage: Storage):
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs))
