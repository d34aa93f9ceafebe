"""``refed-ray select OUTPUT --method M --size N``: a subset of the run's dataset worth training on.

A selection method is a filter (``refed_ray/experiments/selections/``): given the dataset's samples in dataset
order (a table with ``unit_id``, ``sample_index`` and the columns the method reads), it decides
per sample keep or drop, with a reason, purely and deterministically:
``decide(samples, size, context) -> (unit_id, sample_index, keep, reason)``, one row per sample in
their order, ``size`` keeps at most. ``METHODS`` names them; each is imported when used, so a
method whose module is missing (``judge``, written beside this one) is reported as not available.

The selection is written to OUTPUT/selected/METHOD-N/ in the dataset's layout (``dataset.py``: a
hidden generation folder published as ``gen-TOKEN/``, ``_manifest.json`` the one commit point),
each row the dataset's row plus its ``selection_reason``; beside it:

- ``_decisions/gen-TOKEN.parquet``: every sample's decision, drops included with their reasons
  (why a sample was not selected); directory readers skip ``_`` folders;
- ``_selection.json``: the counts (and what a method reports, e.g. the judge's calls and cost).

The manifest records what the selection was computed from: the dataset's generation, the method,
N and its settings. Running the same selection again reuses it (nothing recomputed); once the
dataset changed (a top-up, a rerun of dedup) or a setting did, it is computed again.

When fewer than N samples qualify, the selection holds those that did, and the command exits 4
(``RunShort``), as a run that delivers fewer than N samples does.
"""

from __future__ import annotations

import hashlib
import importlib
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refed_ray.config import run_config
from refed_ray.data.dataset import (
    delete_other_generations,
    new_generation_name,
    pack,
    read_manifest,
    write_generation,
)
from refed_ray.data.export import up_to_date_dataset
from refed_ray.data.selected import selection_folder
from refed_ray.errors import UserError
from refed_ray.experiments.judge_pass import check_judge_settings
from refed_ray.experiments.selections.decisions import DECISIONS, SelectionContext
from refed_ray.records.models import Sample, arrow_schema
from refed_ray.storage import Storage

DECISIONS_FOLDER = "_decisions"
SUMMARY = "_selection.json"  # "_": directory readers (pyarrow, Spark) skip it
KEYS = ["unit_id", "sample_index"]
ROW_SCHEMA = arrow_schema(Sample).append(pa.field("selection_reason", pa.string()))


@dataclass(frozen=True)
class Method:
    decide: str  # "module:function", imported when used
    columns: tuple[str, ...]  # sample columns it reads besides unit_id and sample_index
    default_threshold: float | None = None  # None: it takes no --threshold
    seeded: bool = False
    judged: bool = False


# What selects more samples when too few qualify, per method.
_MORE = {
    "judge": "a larger run (--num-samples) or a stronger judge (--judge-config) selects more",
    "rougel": "a larger run (--num-samples) or a higher --threshold selects more",
    "random": "a larger run (--num-samples) selects more",
}
METHODS: dict[str, Method] = {
    "judge": Method("refed_ray.experiments.selections.judge:judge_improvements", ("instruction", "response", "improved_response"),
                    judged=True),
    "rougel": Method("refed_ray.experiments.selections.rougel:rougel_diversity", ("instruction",), default_threshold=0.7),
    "random": Method("refed_ray.experiments.selections.random_subset:random_subset", (), seeded=True),
}


def select(output: str, method: str, size: int, threshold: float | None = None, seed: int | None = None,
           judge_config: str | None = None, storage_options: dict | None = None) -> dict[str, Any]:
    """Compute (or reuse) OUTPUT/selected/METHOD-SIZE; returns its summary (_selection.json)."""
    spec = _method(method)
    threshold = _threshold(method, spec, threshold)
    if size < 1:
        raise UserError(f"--size must be at least 1 (got {size})")
    decide = _load(method, spec)
    if spec.judged:  # before Ray starts and anything is written
        check_judge_settings(judge_config, seed)
    storage = Storage(output, storage_options)
    dataset = up_to_date_dataset(storage)
    config = run_config(storage)
    folder = selection_folder(f"{method}-{size}")
    context = SelectionContext(selection=Storage(f"{storage.uri}/{folder}", storage.storage_options), run=storage,
                               config=config, judge_config=judge_config, threshold=threshold,
                               seed=config.seed if seed is None else seed)
    source = {"dataset": dataset["generation"], "method": method, "size": size, "settings": _settings(spec, context)}
    committed = read_manifest(storage, folder)
    if committed and committed.get("source") == source:
        return {**committed["summary"], "reused": True}
    samples, rows_per_file = _read_samples(storage, dataset["files"], spec.columns)
    decisions = _checked(decide(samples, size, context), samples, size, method)
    summary = _commit(storage, folder, source, dataset["files"], rows_per_file, decisions, config.dataset_file_mb,
                      context.stats)
    return {**summary, "reused": False}


def describe(summary: dict[str, Any]) -> str:
    done = "reused (the dataset and settings are unchanged)" if summary["reused"] else "computed"
    return (f"selection {summary['selection']}: {summary['kept']:,} of {summary['samples']:,} samples kept, "
            f"{done}, in {summary['path']}")


# ---- the method -----------------------------------------------------------------------------


def _method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown selection method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def _threshold(name: str, spec: Method, threshold: float | None) -> float | None:
    if threshold is None:
        return spec.default_threshold
    if spec.default_threshold is None:
        raise UserError(f"--threshold does not apply to the {name} selection")
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1] (got {threshold:g})")
    return threshold


def _load(name: str, spec: Method) -> Callable[..., pa.Table]:
    module, function = spec.decide.split(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as err:
        raise UserError(f"the {name} selection is not available in this installation: "
                        f"{spec.decide} cannot be loaded ({err})") from None


def _settings(spec: Method, context: SelectionContext) -> dict[str, Any]:
    """The settings that name a selection's result (with the dataset, the method and N)."""
    settings: dict[str, Any] = {}
    if spec.default_threshold is not None:
        settings["threshold"] = context.threshold
    if spec.seeded or spec.judged:  # the judge's sampling seed too
        settings["seed"] = context.seed
    if spec.judged:
        settings["judge_config"] = _file_digest(context.judge_config, context.run.storage_options)
    return settings


def _file_digest(uri: str | None, storage_options: dict) -> str | None:
    if uri is None:
        return None
    try:
        with fsspec.open(uri, "rb", **storage_options) as handle:
            return hashlib.sha256(handle.read()).hexdigest()[:16]
    except FileNotFoundError:
        raise UserError(f"--judge-config {uri}: no such file") from None


def _read_samples(storage: Storage, files: list[str], columns: tuple[str, ...]) -> tuple[pa.Table, list[int]]:
    """The dataset's samples in dataset order (its files', then their rows'), with the method's
    columns only; and each file's row count."""
    wanted = KEYS + [c for c in columns if c not in KEYS]
    tables = [storage.read_table(name, columns=wanted) for name in files]
    schema = pa.schema([arrow_schema(Sample).field(c) for c in wanted])
    samples = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    return samples, [t.num_rows for t in tables]


def _checked(decisions: pa.Table, samples: pa.Table, size: int, method: str) -> pa.Table:
    """The method's decisions, held to the contract: one per sample, in their order, at most N kept."""
    problem = None
    if decisions.num_rows != samples.num_rows:
        problem = f"{decisions.num_rows} decisions for {samples.num_rows} samples"
    elif not all(decisions.column(k).to_pylist() == samples.column(k).to_pylist() for k in KEYS):
        problem = "decisions not in the samples' order"
    elif (pc.sum(decisions.column("keep")).as_py() or 0) > size:
        problem = f"more than {size} samples kept"
    if problem:
        raise RuntimeError(f"the {method} selection broke its contract: {problem}")
    return decisions.select(DECISIONS.names).cast(DECISIONS)


# ---- the commit -----------------------------------------------------------------------------


def _commit(storage: Storage, folder: str, source: dict, files: list[str], rows_per_file: list[int],
            decisions: pa.Table, file_mb: int, stats: dict[str, Any]) -> dict[str, Any]:
    """Write the selection's generation and decisions, then its manifest (the commit point); then
    delete what the previous selection left."""
    generation = new_generation_name()
    tasks = _tasks(storage, files, rows_per_file, decisions, file_mb)
    written, rows = write_generation(storage, folder, generation, tasks, _write_selected)
    decisions_file = f"{folder}/{DECISIONS_FOLDER}/{generation}.parquet"
    storage.write_table(decisions_file, decisions)
    kept, size = int(pc.sum(decisions.column("keep")).as_py() or 0), source["size"]
    summary = {
        "selection": folder.rsplit("/", 1)[1], "method": source["method"], "size": size,
        "settings": source["settings"], "dataset_generation": source["dataset"], "samples": decisions.num_rows,
        "kept": kept, "dropped": decisions.num_rows - kept, "path": storage.full_uri(folder), "stats": stats,
        "shortfall": None if kept >= size else (
            f"{kept:,} of the {size:,} samples asked for qualified (of {decisions.num_rows:,} in the dataset): "
            f"the selection holds those; {_MORE[source['method']]} (_decisions/ gives each sample's reason)"),
    }
    storage.write_json(f"{folder}/_manifest.json", {"generation": generation, "files": written, "rows": rows,
                                                    "source": source, "decisions": decisions_file,
                                                    "summary": summary})
    delete_other_generations(storage, folder, generation)
    storage.delete_many([f for f in storage.list(f"{folder}/{DECISIONS_FOLDER}") if f != decisions_file])
    storage.write_json(f"{folder}/{SUMMARY}", summary)
    return summary


def _tasks(storage: Storage, files: list[str], rows_per_file: list[int], decisions: pa.Table,
           file_mb: int) -> list[dict[str, Any]]:
    """One write task per group of dataset files (groups of about ``file_mb`` of kept rows): each
    file's kept row numbers and their reasons."""
    keep = np.asarray(decisions.column("keep").to_numpy(zero_copy_only=False), dtype=bool)
    reasons = decisions.column("reason").to_pylist()
    starts = np.concatenate([[0], np.cumsum(rows_per_file)]).astype(np.int64)
    kept_rows: dict[str, list[int]] = {}
    for name, start, end in zip(files, starts[:-1].tolist(), starts[1:].tolist()):
        rows = np.flatnonzero(keep[start:end]).tolist()
        if rows:
            kept_rows[name] = rows
    offsets = dict(zip(files, starts[:-1].tolist()))
    file_sizes = storage.sizes(posixpath.dirname(files[0])) if files else {}  # one generation folder
    # A group's expected size: its files' bytes in the share of their rows kept.
    sizes = {f: file_sizes.get(f, 0) * len(kept_rows[f]) // max(1, n) for f, n in zip(files, rows_per_file) if f in kept_rows}
    return [{"files": group, "rows": [kept_rows[f] for f in group],
             "reasons": [[reasons[offsets[f] + r] for r in kept_rows[f]] for f in group]}
            for group in pack(list(kept_rows), sizes, file_mb * 2**20)]


def _write_selected(batch: pa.Table, uri: str, storage_options: dict) -> pa.Table:
    """One file of the selection: the kept rows of its dataset files, each with its reason."""
    storage = Storage(uri, storage_options)
    rows = 0
    with storage.open_output(batch["target"][0].as_py()) as handle, pq.ParquetWriter(
        handle, ROW_SCHEMA, compression="zstd"
    ) as writer:
        for name, kept, reasons in zip(batch["files"][0].as_py(), batch["rows"][0].as_py(), batch["reasons"][0].as_py()):
            table = storage.read_table(name).select(arrow_schema(Sample).names).cast(arrow_schema(Sample))
            table = table.take(pa.array(kept, pa.int64())).append_column("selection_reason", pa.array(reasons, pa.string()))
            writer.write_table(table.cast(ROW_SCHEMA))
            rows += table.num_rows
    return pa.table({"rows": [rows]})
