"""Reading the reference set: JSONL, JSON or Parquet, on any fsspec URI, in three row shapes.

Shapes: ``{instruction, response}``; LIMA-style ``{conversations: [user, assistant, ...]}``;
chat ``{messages: [{role, content}, ...]}``. Multi-turn conversations are skipped, as the paper
did, and reported. Bad rows (malformed JSON, missing fields, empty text, text that is not valid
Unicode, duplicates) are skipped and recorded as rejects with their file and line, until
``max_bad_seeds`` is exceeded.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from refed_ray.errors import UserError
from refed_ray.records.models import Reference, Reject
from refed_ray.records.stages import Stage

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
# Parquet rows are turned into Python rows a batch at a time; a batch that holds text that is not
# UTF-8 is redone row by row, so only the bad rows are skipped.
_PARQUET_ROWS_AT_ONCE = 4096


class BadRow(Exception):
    """A row that cannot be used; ``bad=False`` marks skips by design (multi-turn pairs)."""

    def __init__(self, reason: str, bad: bool = True):
        super().__init__(reason)
        self.bad = bad


@dataclass
class SeedSet:
    references: list[Reference]
    skipped: list[Reject] = field(default_factory=list)

    @property
    def bad_rows(self) -> int:
        return sum(1 for reject in self.skipped if not reject.reason.startswith("skipped:"))

    def digest(self) -> str:
        """Identifies the reference set: part of the resume fingerprint."""
        hasher = hashlib.sha256()
        for ref in sorted(self.references, key=lambda r: r.reference_id):
            hasher.update(f"{ref.reference_id}\0{ref.instruction}\0{ref.response}\0".encode())
        return hasher.hexdigest()[:16]


def default_seeds_uri() -> str:
    return str(files("refed_ray") / "default_references.jsonl")


def read_seeds(uri: str | None, max_bad_seeds: int, storage_options: dict | None = None) -> SeedSet:
    uri = uri or default_seeds_uri()
    seeds = SeedSet(references=[])
    # A duplicate is the same pair (whatever its id), or the same id on another pair.
    seen_pairs: dict[str, str] = {}
    seen_ids: dict[str, str] = {}
    for source, row in _rows(uri, storage_options or {}):
        try:
            if isinstance(row, BadRow):
                raise row
            reference = _to_reference(row, source)
            content = _content_id(reference.instruction, reference.response)
            if content in seen_pairs:
                raise BadRow(f"duplicate reference (same pair as {seen_pairs[content]})")
            if reference.reference_id in seen_ids:
                raise BadRow(f"duplicate id {reference.reference_id!r} (also {seen_ids[reference.reference_id]})")
        except BadRow as problem:
            reason = str(problem) if problem.bad else f"skipped: {problem}"
            seeds.skipped.append(Reject(stage=Stage.SEEDS, reason=reason, source=source))
            continue
        seen_pairs[content] = seen_ids[reference.reference_id] = source
        seeds.references.append(reference)
    _check(uri, seeds, max_bad_seeds)
    return seeds


def _check(uri: str, seeds: SeedSet, max_bad_seeds: int) -> None:
    if seeds.bad_rows > max_bad_seeds:
        shown = "\n".join(f"  {r.source}: {r.reason}" for r in seeds.skipped[:10])
        raise UserError(
            f"{seeds.bad_rows} bad rows in {uri}, more than max_bad_seeds={max_bad_seeds}:\n{shown}"
        )
    if not seeds.references:
        reasons = "".join(f"\n  {r.source}: {r.reason}" for r in seeds.skipped[:10])
        raise UserError(f"no usable reference pairs in {uri}{reasons}")


def _rows(uri: str, storage_options: dict) -> Iterator[tuple[str, dict | BadRow]]:
    name = uri.rsplit("/", 1)[-1]
    stem = name.removesuffix(".gz")
    suffix = "." + stem.rsplit(".", 1)[-1] if "." in stem else ""
    if suffix not in FORMATS:
        raise UserError(
            f"{uri}: unknown seed file format {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(sorted(FORMATS))}"
        )
    try:
        with fsspec.open(uri, "rb", compression="infer", **storage_options) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise UserError(f"seed file not found: {uri}") from None
    except (OSError, ValueError, ImportError) as err:  # ValueError, ImportError: unknown protocol
        raise UserError(f"cannot read seed file {uri}: {err}") from None
    if not data.strip():
        raise UserError(f"seed file {uri} is empty")
    fmt = FORMATS[suffix]
    if fmt == "jsonl":
        yield from _jsonl_rows(name, data)
    elif fmt == "json":
        yield from _json_rows(name, data)
    else:
        yield from _parquet_rows(name, data)


def _jsonl_rows(name: str, data: bytes) -> Iterator[tuple[str, dict | BadRow]]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        source = f"{name}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield source, BadRow(f"not UTF-8 text (byte {err.start} of the line)")
            continue
        except json.JSONDecodeError as err:
            yield source, BadRow(f"malformed JSON at column {err.colno}: {err.msg}")
            continue
        yield source, row


def _json_rows(name: str, data: bytes) -> Iterator[tuple[str, dict | BadRow]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{name}:{line}: not UTF-8 text") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{name}:{err.lineno}: malformed JSON at column {err.colno}: {err.msg}") from None
    if not isinstance(rows, list):
        raise UserError(f"{name}: a JSON seed file must hold a list of rows, not {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield f"{name}[{index}]", row


def _parquet_rows(name: str, data: bytes) -> Iterator[tuple[str, dict | BadRow]]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:  # pyarrow raises several types for a broken file
        raise UserError(f"{name}: not a readable Parquet file: {err}") from None
    first = 0
    for batch in table.to_batches(max_chunksize=_PARQUET_ROWS_AT_ONCE):
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8
            rows = [_decoded_row(batch, index) for index in range(batch.num_rows)]
        for index, row in enumerate(rows, start=first):
            yield f"{name}:row {index}", row
        first += batch.num_rows


def _decoded_row(batch: pa.RecordBatch, index: int) -> dict | BadRow:
    """Row ``index`` of ``batch``, or the bad row naming the field that is not UTF-8 text."""
    row = {}
    for column, values in zip(batch.schema.names, batch.columns):
        try:
            row[column] = values[index].as_py()
        except UnicodeDecodeError as err:
            return BadRow(f"field '{column}' is not UTF-8 text (byte {err.start} of its value)")
    return row


def _to_reference(row: Any, source: str) -> Reference:
    if not isinstance(row, dict):
        raise BadRow(f"a row must be a JSON object, got {type(row).__name__}")
    if "instruction" in row or "response" in row:
        instruction, response = _text(row, "instruction"), _text(row, "response")
    elif "conversations" in row:
        instruction, response = _single_turn(row["conversations"], "conversations")
    elif "messages" in row:
        instruction, response = _single_turn(row["messages"], "messages")
    else:
        raise BadRow(
            f"no known fields: expected instruction/response, conversations or messages, "
            f"got {sorted(row)[:6]}"
        )
    row_id = row.get("id")
    if row_id not in (None, ""):
        reference_id = _encodable(str(row_id), "field 'id'")
    else:
        reference_id = _content_id(instruction, response)
    return Reference(
        reference_id=reference_id, instruction=instruction, response=response, source=source
    )


def _content_id(instruction: str, response: str) -> str:
    return hashlib.sha256(f"{instruction}\0{response}".encode()).hexdigest()[:12]


def _text(row: dict, key: str) -> str:
    if key not in row:
        raise BadRow(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(f"field '{key}' is empty")
    return _encodable(value.strip(), f"field '{key}'")


def _encodable(text: str, what: str) -> str:
    """``text`` if it can be written as UTF-8. JSON's escapes can spell a lone surrogate
    ("\\ud800"), which Python decodes into a str that no hash, Parquet file or log can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRow(
            f"{what} is not valid Unicode text: {err.reason} ({text[err.start]!r} at character {err.start})"
        ) from None
    return text


def _single_turn(turns: Any, key: str) -> tuple[str, str]:
    if not isinstance(turns, list):
        raise BadRow(f"field '{key}' must be a list, got {type(turns).__name__}")
    texts = [_turn_text(turn, key, i) for i, turn in enumerate(turns) if not _is_system(turn)]
    if len(texts) > 2:
        raise BadRow(f"multi-turn conversation ({len(texts)} turns); only single-turn pairs are used", bad=False)
    if len(texts) < 2:
        raise BadRow(f"field '{key}' needs a user turn and an assistant turn, got {len(texts)}")
    roles = [_role(turn) for turn in turns if not _is_system(turn)]
    if roles[0] not in (None, "user", "human") or roles[1] not in (None, "assistant", "gpt", "model"):
        raise BadRow(f"field '{key}' must be a user turn then an assistant turn, got roles {roles}")
    return texts[0], texts[1]


def _role(turn: Any) -> str | None:
    return (turn.get("role") or turn.get("from")) if isinstance(turn, dict) else None


def _is_system(turn: Any) -> bool:
    return _role(turn) == "system"


def _turn_text(turn: Any, key: str, index: int) -> str:
    content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else turn
    if not isinstance(content, str):
        raise BadRow(f"{key}[{index}] must be text, got {type(content).__name__}")
    if not content.strip():
        raise BadRow(f"{key}[{index}] is empty")
    return _encodable(content.strip(), f"{key}[{index}]")
