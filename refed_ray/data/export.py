"""``refed-ray export``: the committed samples in the formats training frameworks read.

- refed-json: one JSON list of REFED rows (the released REFED file's shape);
- jsonl: ``{"instruction", "response"}`` per line, the response being the refined one;
- sharegpt: ``{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}`` per line;
- messages: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` per line (the
  conversational format TRL's SFTTrainer and axolotl's chat templates take as is).

It brings OUTPUT/dataset up to date first, with the settings the run recorded in ``run.json``:
the current commit of each filter in force (computed when the one left is stale: after a crash in
a top-up round, synthesis shards were committed after it; ``kept.py``), then the compaction.
It reads the files the dataset's
manifest names through Ray Data: files are read and rows converted in parallel tasks; the driver
only appends the converted lines to the one target file.

``--selection METHOD-N`` exports a selection instead (``select.py``: OUTPUT/selected/METHOD-N), as
it was committed: the same formats, from the files its manifest names.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import fsspec
import pyarrow as pa
import ray

from refed_ray.cluster import connect_ray
from refed_ray.config import run_config
from refed_ray.data.dataset import compact_dataset
from refed_ray.data.kept import apply_filters, dropped_keys
from refed_ray.data.selected import read_selection
from refed_ray.errors import UserError
from refed_ray.records.commits import CommitLog
from refed_ray.records.models import RefedRow
from refed_ray.storage import Storage

_REFED_FIELDS = list(RefedRow.model_fields)


def _refed(row: dict) -> dict:
    return row


def _jsonl(row: dict) -> dict:
    return {"instruction": row["instruction"], "response": row["improved_response"]}


def _messages(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["instruction"]},
                         {"role": "assistant", "content": row["improved_response"]}]}


def _sharegpt(row: dict) -> dict:
    return {
        "conversations": [
            {"from": "human", "value": row["instruction"]},
            {"from": "gpt", "value": row["improved_response"]},
        ]
    }


# A format: how a REFED row becomes one JSON value, and whether the values form one JSON list.
CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "refed-json": _refed, "jsonl": _jsonl, "sharegpt": _sharegpt, "messages": _messages,
}
JSON_LIST_FORMATS = {"refed-json"}
FORMATS = tuple(CONVERTERS)


def export(
    output: str, fmt: str, to: str | None = None, storage_options: dict | None = None, file_mb: int | None = None,
    selection: str | None = None,
) -> tuple[str, int]:
    """Write OUTPUT's dataset, or its selection ``selection`` (``METHOD-N``: OUTPUT/selected/METHOD-N),
    in format ``fmt`` to ``to`` (default OUTPUT/export/[SELECTION/]FORMAT.json[l])."""
    storage = Storage(output, storage_options)
    if fmt not in CONVERTERS:
        raise UserError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if selection is None:
        manifest = up_to_date_dataset(storage, file_mb)
    else:
        manifest = read_selection(storage, selection)
        connect_ray()
    as_list = fmt in JSON_LIST_FORMATS
    folder = f"{output.rstrip('/')}/export" + (f"/{selection}" if selection else "")
    target = to or f"{folder}/{fmt}.{'json' if as_list else 'jsonl'}"
    count = 0
    with fsspec.open(target, "w", encoding="utf-8", **(storage_options or {})) as out:
        if as_list:
            out.write("[")
        if manifest["files"]:
            lines = ray.data.read_parquet(
                [storage.full_uri(name) for name in manifest["files"]], filesystem=_arrow_fs(storage),
            ).map_batches(_to_lines, fn_kwargs={"fmt": fmt}, batch_format="pyarrow")
            for batch in lines.iter_batches(batch_format="pyarrow", batch_size=None):
                for line in batch.column("line").to_pylist():
                    count += 1
                    if as_list:
                        out.write(("\n" if count == 1 else ",\n") + line)
                    else:
                        out.write(line + "\n")
        if as_list:
            out.write("\n]\n")
    return target, count


def up_to_date_dataset(storage: Storage, file_mb: int | None = None) -> dict:
    """OUTPUT/dataset brought up to date with the settings the run recorded (its filters'
    commits, then the compaction); returns its manifest. Starts Ray when it is not running."""
    # Before Ray starts: refuses a folder without a run's run.json, or one whose --force-new was interrupted.
    config = run_config(storage)
    log = CommitLog(storage)
    connect_ray()
    apply_filters(storage, log, config)
    return compact_dataset(storage, log, file_mb or config.dataset_file_mb, max_rows=config.num_samples,
                           drops=dropped_keys(storage, log, config))


def _to_lines(batch: pa.Table, fmt: str) -> pa.Table:
    convert = CONVERTERS[fmt]
    rows = batch.select(_REFED_FIELDS).to_pylist()
    return pa.table({"line": [json.dumps(convert(row), ensure_ascii=False) for row in rows]})


def _arrow_fs(storage: Storage):
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs))
