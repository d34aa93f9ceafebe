"""The run, end to end: seeds -> plan -> feedback pass -> broadcast -> synthesis pass -> report.

Nothing grows with N on the driver: the plan is written round by round, both passes stream
through Ray Data, and the driver only sees one small stats row per committed shard.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import pyarrow.fs
import ray

from refed_ray.config import RunConfig
from refed_ray.engines.base import load_class
from refed_ray.errors import UserError
from refed_ray.plan import write_plan
from refed_ray.prompts import prompts_digest
from refed_ray.records import Feedback, Reject, to_table
from refed_ray.report import build_report
from refed_ray.seeds import SeedSet, read_seeds
from refed_ray.stats import merge
from refed_ray.storage import Storage
from refed_ray.workers import FeedbackWorker, SynthesisWorker, skip_committed

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


def run(config: RunConfig, force_new: bool = False) -> dict[str, Any]:
    started = time.time()
    storage = Storage(config.output, config.storage_options)
    # Every user error surfaces here, before anything is written or any model loads.
    storage.check_writable()
    _check_engine(config)
    secrets = _engine_secrets(config)
    seeds = read_seeds(config.seeds, config.max_bad_seeds, config.seeds_options())
    resumed = _open_output(storage, config, seeds, force_new)
    plan = write_plan(
        storage,
        [ref.reference_id for ref in seeds.references],
        config.num_samples,
        config.instructions_per_aspect,
        config.seed,
    )
    log.info("plan: %d units over %d rounds, %d references", plan.units, plan.rounds, len(plan.references_used))

    _connect_ray()
    config = _resolve_device(config)
    # Workers get the output's full URI: their working directory is not the driver's.
    worker_config = config.model_copy(update={"output": storage.full_uri()})
    # engine_args keeps the run's shared rate limiter (if any) alive until the run ends.
    engine_args = {
        "config_json": worker_config.model_dump_json(),
        "secrets": [ray.put(secrets)],
        **_rate_limiter(config),
    }
    used = set(plan.references_used)
    _feedback_pass(storage, config, engine_args, [r for r in seeds.references if r.reference_id in used])
    feedback_ref = ray.put(_read_feedback(storage))
    units_before = _committed_ids(storage, "synthesis")
    this_run = _synthesis_pass(storage, config, {**engine_args, "feedback": [feedback_ref]}, units_before)

    report = build_report(
        storage, config, seeds, plan, resumed=resumed, units_before=len(units_before),
        this_run=this_run, wall_seconds=time.time() - started,
    )
    storage.write_json("report.json", report)
    return report


def _open_output(storage: Storage, config: RunConfig, seeds: SeedSet, force_new: bool) -> bool:
    """Start or resume OUTPUT: True when resuming an earlier, compatible run."""
    fingerprint = config.fingerprint(prompts_digest(), seeds.digest())
    if force_new:
        _clear(storage)
    resumed = storage.exists(RUN_FILE)
    if resumed:
        _check_resume(storage, storage.read_json(RUN_FILE), fingerprint, config.num_samples)
    else:
        _refuse_foreign_output(storage)
    storage.write_json(RUN_FILE, {"fingerprint": fingerprint, "config": config.public_dump()})
    storage.remove_orphans(["feedback", "data", "rejects"])
    storage.commit_shard("seeds", ["seeds"], {"rejects": to_table(seeds.skipped, Reject)}, {})
    return resumed


def _rate_limiter(config: RunConfig) -> dict[str, Any]:
    """The actor that spaces every API engine's calls to the configured rates, as an engine arg."""
    if config.engine.kind != "openai":
        return {}
    from refed_ray.engines.openai_engine import start_rate_limiter

    limiter = start_rate_limiter(config.engine.api.requests_per_minute, config.engine.api.tokens_per_minute)
    return {"rate_limiter": [limiter]} if limiter else {}


def _check_engine(config: RunConfig) -> None:
    """What the driver can check of the engine before actors start: a custom engine's class
    imports, a local model folder exists (hub ids and object-storage folders are fetched later)."""
    engine = config.engine
    if engine.kind == "custom":
        load_class(engine.class_path)
    model = engine.model or ""
    if engine.kind == "vllm" and model.startswith(("/", "./", "../", "~")):
        if not os.path.isdir(os.path.expanduser(model)):
            raise UserError(f"engine.model {model!r} is not a folder on this machine")


def _engine_secrets(config: RunConfig) -> dict[str, str]:
    """The API key an ``openai`` engine needs, from the driver's environment: checked here, before
    any actor starts, and handed to the actors without entering the config."""
    if config.engine.kind != "openai":
        return {}
    name = config.engine.api.api_key_env
    if not os.environ.get(name):
        raise UserError(f"engine openai needs an API key in the environment variable {name}")
    return {name: os.environ[name]}


def _feedback_pass(storage: Storage, config: RunConfig, engine_args: dict, references: list) -> None:
    done = set(_committed_ids(storage, "feedback"))
    todo = [ref.model_dump() for ref in references if ref.reference_id not in done]
    if not todo:
        return
    log.info("collecting feedback on %d references (%d already done)", len(todo), len(done))
    dataset = ray.data.from_items(todo).map_batches(
        FeedbackWorker,
        fn_constructor_kwargs=engine_args,
        **_engine_map_args(config),
    )
    _drain(dataset)


def _synthesis_pass(storage: Storage, config: RunConfig, engine_args: dict, committed: list[str]) -> dict:
    plan = ray.data.read_parquet(
        storage.path("plan"), filesystem=_arrow_fs(storage), file_extensions=["parquet"]
    )
    if committed:
        plan = plan.map_batches(
            skip_committed,
            fn_kwargs={"id_column": "unit_id", "committed": [ray.put(committed)]},
            batch_format="pyarrow",
        )
    dataset = plan.map_batches(
        SynthesisWorker,
        fn_constructor_kwargs=engine_args,
        **_engine_map_args(config),
    )
    return _drain(dataset)


def _engine_map_args(config: RunConfig) -> dict[str, Any]:
    """map_batches arguments shared by both engine passes: pool, resources, fault tolerance."""
    workers = config.workers
    if config.engine.kind == "vllm":
        from refed_ray.engines.vllm_engine import actor_resources

        resources = actor_resources(config.engine)
    else:
        resources = {"num_cpus": 1}  # API and custom engines: CPU-only actors, no GPU reserved
    return dict(
        batch_size=workers.units_per_batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            size=workers.num_engines,
            max_tasks_in_flight_per_actor=workers.batches_in_flight,
            max_concurrent_calls_per_actor=workers.batches_in_flight,  # async actor: batches overlap
        ),
        # Bounded, not Ray Data's default of forever. Ray 2.60 has no named parameter for these
        # two yet, hence its deprecation warning on "ray_remote_args".
        max_restarts=workers.max_restarts,
        max_task_retries=workers.max_task_retries,
        **resources,
    )


def _drain(dataset) -> dict[str, Any]:
    """Run a pass to the end; sum what the driver sees: one stats row per committed shard."""
    totals: dict = {}
    shards = 0
    started = time.time()
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for stats_json in batch.column("stats").to_pylist():
            merge(totals, json.loads(stats_json))
            shards += 1
    return {"shards": shards, "seconds": time.time() - started, "stats": totals}


def _read_feedback(storage: Storage) -> dict[str, Feedback]:
    return {
        row["reference_id"]: Feedback(**row)
        for table in storage.iter_committed_tables("feedback")
        for row in table.to_pylist()
    }


def _committed_ids(storage: Storage, pass_name: str) -> list[str]:
    return [i for marker in storage.markers(pass_name) for i in marker.ids]


def _refuse_foreign_output(storage: Storage) -> None:
    """A run deletes files it does not know in its folders: never in a folder that holds no run."""
    if storage.list(""):
        raise UserError(
            f"{storage.uri} is not empty and holds no refed-ray run ({RUN_FILE}): "
            "choose a new or empty --output"
        )


def _check_resume(storage: Storage, previous_run: dict, fingerprint: dict[str, str], num_samples: int) -> None:
    """Refuse to resume a run with another fingerprint, or with a smaller plan."""
    planned_for = previous_run["config"]["num_samples"]
    committed_any = any(name.endswith(".json") for name in storage.list("_markers/synthesis"))
    if num_samples < planned_for and committed_any:
        raise UserError(
            f"{storage.uri} was planned for {planned_for} samples; a resume can grow the plan, not "
            f"shrink it (committed units would fall outside it): pass --num-samples {planned_for} "
            "or more, or --force-new"
        )
    previous = previous_run["fingerprint"]
    differs = [key for key in fingerprint if previous.get(key) != fingerprint[key]]
    if differs:
        details = "; ".join(f"{key}: {previous.get(key)!r} there, {fingerprint[key]!r} now" for key in differs)
        raise UserError(
            f"{storage.uri} holds a run with a different {', '.join(differs)} ({details}). "
            "Resuming would mix incompatible samples: pass --force-new to discard it, "
            "or choose another --output."
        )


def _clear(storage: Storage) -> None:
    for name in (RUN_FILE, "report.json", "plan", "feedback", "data", "rejects", "_markers", "_attempts"):
        if storage.exists(name):
            storage.delete(name)


def _connect_ray() -> None:
    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS's cluster when set, else starts a local one


def _resolve_device(config: RunConfig) -> RunConfig:
    if config.engine.device != "auto" or config.engine.kind != "vllm":
        return config
    device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    if device == "cpu":
        log.warning(
            "engine.device auto: no GPU in the Ray cluster now, so engines run on CPU. On an "
            "autoscaling cluster whose GPU workers start at zero, pass --device cuda."
        )
    return config.model_copy(update={"engine": config.engine.model_copy(update={"device": device})})


def _arrow_fs(storage: Storage) -> pyarrow.fs.FileSystem:
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs))

