"""The judge pass: pairs judged in both orders on engine actors, sharded, committed and resumable
like the run's own passes, under a root of its own (a compare's or a selection's folder).

The root holds a small ``run.json`` (what is judged, the judge's settings, a ``run_id``): the
commit log takes only commits of that run, and a later pass with other inputs or other judge
settings is refused there (or, with ``force_new``, starts afresh) rather than mixing verdicts.

A pair is one row: ``pair_id``, ``unit_id``, ``sample_index``, ``instruction``, ``response_x``,
``response_y``. Its verdict row says which won (x, y or tie); a pair the judge could not decide
is a reject of stage "judge".

Verdicts are keyed and sharded by what they judge, the pair's id, never by the pair's position in
a dataset: a pass judges only the pairs no commit of the root holds yet (``_pending_shards``), so
after any change of the dataset (a top-up's units sorting first, a dedup dropping samples) only
the new pairs are judged, and no pair twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from refed_ray.config import (
    _REPLY_SHAPING_ENGINE_FIELDS,
    RunConfig,
    WorkersConfig,
    _digest,
    format_validation_error,
    run_config,
)
from refed_ray.engines.config import EngineConfig
from refed_ray.errors import UserError
from refed_ray.method.judge import STAGE, JudgeSampling, judge_pair, pair_reject
from refed_ray.method.prompts import template
from refed_ray.records import commits
from refed_ray.records.commits import CommitLog
from refed_ray.records.models import Reject, to_table
from refed_ray.records.stats import StageStats
from refed_ray.reports.report import api_cost
from refed_ray.run.passes import engine_worker_args, run_engine_pass
from refed_ray.run.workers import _abandon_reason, _EngineWorker
from refed_ray.secrets import has_masked, mask_value
from refed_ray.storage import Storage

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["pair_id", "unit_id", "sample_index", "instruction", "response_x", "response_y"]
# What a judge root holds; a force_new discards exactly these.
KNOWN = (commits.RUN_FILE, "_index", "_markers", "_attempts", "data", "rejects")


class JudgeConfig(BaseModel):
    """The judge: any engine refed-ray supports (``--judge-config`` YAML: ``engine:`` and optional
    ``sampling:``, ``workers:``, ``storage_options:``)."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig
    sampling: JudgeSampling = Field(default_factory=JudgeSampling)
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="units_per_shard: pairs per shard")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of the outputs read and written"
    )

    def model_name(self) -> str:
        return self.engine.model_name()

    def fingerprint(self) -> dict[str, str]:
        """What verdicts depend on: a resume under other settings would mix verdicts of two judges."""
        return {
            "model": self.model_name(),
            "engine": _digest(self.engine.model_dump(include=_REPLY_SHAPING_ENGINE_FIELDS)),
            "sampling": _digest(self.sampling.model_dump()),
            "prompt": _digest(template("judge_pair").template),
        }

    def run_config(self, root: Storage) -> RunConfig:
        """The judge as a run config: what engine actors, ``pipeline._engine_map_args`` and
        ``report.api_cost`` read (engine, workers, the root as the output)."""
        return RunConfig(output=root.full_uri(), storage_options=self.storage_options, engine=self.engine,
                         workers=self.workers)


def load_judge_config(path: str) -> JudgeConfig:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"judge config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"judge config {path} is a directory: name its YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"judge config file {path} cannot be read: {err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"judge config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or "engine" not in data:
        raise UserError(f"judge config file {path} must hold a mapping with an engine: section")
    try:
        return JudgeConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, path)) from None


def check_judge_settings(judge_config: str | None, seed: int | None) -> None:
    """A command's judge settings, checked before Ray starts or anything is written (an invalid
    seed would otherwise fail inside the engine actors, after the judge root was claimed)."""
    if judge_config:
        load_judge_config(judge_config)
    if seed is not None:
        try:
            JudgeSampling(seed=seed)
        except ValidationError as err:
            raise UserError(format_validation_error(err, "--seed")) from None


def judge_of_run(run: Storage, judge_config: str | None) -> JudgeConfig:
    """The judge a command asked for, or else the run's own teacher (its run.json), on the run's workers."""
    if judge_config:
        return load_judge_config(judge_config)
    if not run.exists(commits.RUN_FILE):
        raise UserError(f"{run.uri} holds no refed-ray run ({commits.RUN_FILE})")
    config = run_config(run)
    if has_masked(config.engine.model_dump()):
        raise UserError(f"{run.uri}/{commits.RUN_FILE} holds the run's engine settings with credentials masked: "
                        "pass --judge-config with the engine: section to judge with")
    return JudgeConfig(engine=config.engine, workers=config.workers, storage_options=run.storage_options)


class Verdict(BaseModel):
    """One row of a judge root's data/: a pair judged in both orders."""

    pair_id: str
    unit_id: str
    sample_index: int
    winner: Literal["x", "y", "tie"]
    first: str  # "1" or "2", X shown first
    second: str  # Y shown first
    reasoning_first: str
    reasoning_second: str
    model: str
    prompt_tokens: int
    completion_tokens: int


class JudgeWorker(_EngineWorker):
    """The judge pass over a shard of pairs."""

    pass_name = "judge"
    id_column = "pair_id"

    def __init__(self, config_json: str, secrets: list, judge_sampling_json: str, **kwargs):
        super().__init__(config_json, secrets, **kwargs)
        self.sampling = JudgeSampling.model_validate_json(judge_sampling_json)

    async def process(self, rows):
        judgements = await asyncio.gather(*(
            judge_pair(self.engine, row["instruction"], row["response_x"], row["response_y"], self.sampling,
                       row["pair_id"])
            for row in rows
        ))
        stats, verdicts, rejects = StageStats(), [], []
        for row, judged in zip(rows, judgements):
            stats += judged.stats
            if judged.winner is None:
                rejects.append(pair_reject(judged, row["unit_id"], row["sample_index"]))
                continue
            verdicts.append(Verdict(
                pair_id=row["pair_id"], unit_id=row["unit_id"], sample_index=row["sample_index"],
                winner=judged.winner, first=judged.first, second=judged.second,
                reasoning_first=judged.reasoning_first, reasoning_second=judged.reasoning_second,
                model=self.engine.model_name, prompt_tokens=judged.stats.prompt_tokens,
                completion_tokens=judged.stats.completion_tokens,
            ))
        return {"data": to_table(verdicts, Verdict), "rejects": to_table(rejects, Reject)}, {STAGE: stats}

    def abandon(self, rows, attempts):
        rejects = [Reject(stage="engine", reason=_abandon_reason(attempts), unit_id=row["unit_id"],
                          sample_index=row["sample_index"], lost_samples=1) for row in rows]
        return {"rejects": to_table(rejects, Reject)}


def pair_id(unit_id: str, sample_index: int) -> str:
    return f"{unit_id}#{sample_index}"


def run_judge_pass(root: Storage, pairs: pa.Table, judge: JudgeConfig, judged: dict[str, Any],
                   force_new: bool = False) -> CommitLog:
    """Judge every pair of ``pairs`` (``PAIR_COLUMNS``, in a stable order) not judged yet under
    ``root``; ``judged`` says what the pairs are (part of the root's fingerprint). Returns the
    root's commit log: its verdicts (``read_verdicts``) and its counters (``.stats("judge")``).

    An engine pass like the run's (``passes.run_engine_pass``), with the run's engine checks."""
    from refed_ray.run import pipeline

    config = judge.run_config(root)
    pipeline._check_engine(config)
    secrets = pipeline._engine_secrets(config)
    run_id = _claim_root(root, {"judged": _digest(judged), "judge": judge.fingerprint()},
                         {"judged": judged, "judge": mask_value(judge.model_dump(exclude={"storage_options"}))}, force_new)
    committed = CommitLog(root, passes=(STAGE,))
    committed.remove_leftovers()
    blocks = _pending_shards(pairs, judge.workers.units_per_shard, committed.ids(STAGE))
    if not blocks:
        return committed
    log.info("judge: %d shards of pairs to do (%d committed)", len(blocks), len(committed.commits[STAGE]))
    pipeline._connect_ray()
    config = pipeline.resolve_device_on_cluster(config)
    engine_args = {**engine_worker_args(config, root, secrets, run_id),
                   "judge_sampling_json": judge.sampling.model_dump_json()}
    run_engine_pass(STAGE, blocks, JudgeWorker, engine_args, committed, config=config, engines=len(blocks))
    return committed


def _pending_shards(pairs: pa.Table, size: int, judged: set[str]) -> list[pa.Table]:
    """Shards of the pairs whose ids no commit holds (``judged``), one table each: the pending
    pairs sorted by id and cut every ``size``. Only the last cut can be short, so a resume, whose
    pending pairs lack only whole committed shards, cuts and names the rest as the first pass did;
    pairs added later are shards of their own, and a judged pair is in none."""
    judged_before = pc.is_in(pairs["pair_id"], value_set=pa.array(sorted(judged), pa.string()))
    pending = pairs.filter(pc.invert(judged_before)).sort_by("pair_id").select(PAIR_COLUMNS)
    blocks = []
    for start in range(0, pending.num_rows, size):
        shard = pending.slice(start, size)
        name = commits.shard_name(STAGE, shard.column("pair_id").to_pylist())
        blocks.append(shard.append_column("shard", pa.array([name] * shard.num_rows, pa.string())))
    return blocks


def _claim_root(root: Storage, fingerprint: dict[str, Any], settings: dict[str, Any], force_new: bool) -> str:
    """The run id of the judge root: its own on a resume with the same fingerprint, a new one
    for a fresh (or ``force_new``) root. Another fingerprint is refused, naming what differs."""
    root.check_writable()
    if root.exists(commits.RUN_FILE):
        previous = commits.read_run_file(root)
        _refuse_a_run(root, previous)
        if force_new:
            for name in KNOWN:
                if name != commits.RUN_FILE and root.exists(name):
                    root.delete(name)
        else:
            differs = {key: (previous.get("fingerprint", {}).get(key), value) for key, value in fingerprint.items()
                       if previous.get("fingerprint", {}).get(key) != value}
            if differs:
                named = "; ".join(f"{key}: {json.dumps(was)} there, {json.dumps(now)} now"
                                  for key, (was, now) in differs.items())
                raise UserError(
                    f"{root.uri} holds verdicts of another judging ({named}): pass --force-new to discard "
                    "them, or choose another --output"
                )
            return previous["run_id"]
    elif not root.is_empty():
        raise UserError(f"{root.uri} is not empty and holds no judge run ({commits.RUN_FILE}): choose another --output")
    run_id = uuid.uuid4().hex[:16]
    root.write_json(commits.RUN_FILE, {"run_id": run_id, "fingerprint": fingerprint, "settings": settings})
    return run_id


def _refuse_a_run(root: Storage, previous: dict) -> None:
    """A judge root is only ever a judging's folder: a run, its dataset or its selections are never
    written into nor discarded, whatever the flags."""
    if not commits.is_judging(previous) or root.exists("dataset") or root.exists("selected"):
        raise UserError(f"{root.uri} holds a refed-ray run (its {commits.RUN_FILE}, dataset or selections), not a "
                        "judge's verdicts: verdicts never go there, even with --force-new; choose another --output")


def read_verdicts(root: Storage, committed: CommitLog) -> pa.Table:
    """``pair_id``, ``unit_id``, ``sample_index``, ``winner``: one committed verdict per pair (the
    first in commit order where roots cut by position, before pairs were sharded by id, hold two)."""
    columns = ["pair_id", "unit_id", "sample_index", "winner"]
    tables = [root.read_table(name, columns=columns) for name in committed.files("data")]
    if not tables:
        return pa.table({c: pa.array([], pa.int64() if c == "sample_index" else pa.string()) for c in columns})
    verdicts = pa.concat_tables(tables)
    first: dict[str, int] = {}
    for row, pair in enumerate(verdicts["pair_id"].to_pylist()):
        first.setdefault(pair, row)
    return verdicts.take(pa.array(sorted(first.values()), pa.int64()))


def read_rejects(root: Storage, committed: CommitLog) -> pa.Table | None:
    tables = [root.read_table(name, columns=["unit_id", "sample_index", "stage", "reason"])
              for name in committed.files("rejects")]
    return pa.concat_tables(tables) if tables else None


def judge_counts(root: Storage, committed: CommitLog, judge: JudgeConfig) -> dict[str, Any]:
    """The judge's calls, tokens and cost (API engines) under ``root``: compare.json's and a
    judge selection's."""
    calls = committed.stats(STAGE).stages.get(STAGE)
    return {
        "calls": calls.calls if calls else 0,
        "prompt_tokens": calls.prompt_tokens if calls else 0,
        "completion_tokens": calls.completion_tokens if calls else 0,
        "cost": api_cost(judge.run_config(root), {STAGE: calls} if calls else {}),
    }
