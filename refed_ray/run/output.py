"""The run's OUTPUT lifecycle: start it, resume it, or refuse it, before any engine starts.

- A run writes only into an empty OUTPUT or one holding a refed-ray run (``run.json``): it deletes
  files it does not know in its own folders, so it never touches a folder holding anything else.
- A resume must share the fingerprint (model, engine, prompts, references, sampling, plan
  settings) of the run that wrote OUTPUT, and may grow the plan, not shrink it.
- A local OUTPUT on a multi-node cluster is refused: each node would write to its own disk.
- ``run.json`` names the run that owns OUTPUT (``run_id``): drawn when a run creates OUTPUT, kept
  by its resumes; commits of any other run are ignored (``commits.py``).
- ``--force-new`` is crash-safe: it first marks ``run.json`` as discarding, then deletes every
  other folder, and only the new run's ``run.json`` ends the discard. Killed at any point, OUTPUT
  still holds a ``run.json``: the same command finishes the discard, and a plain rerun (or an
  export) is refused with that advice instead of resuming a half-deleted run.
"""

from __future__ import annotations

import uuid

import ray

from refed_ray.config import RunConfig
from refed_ray.data.seeds import SeedSet
from refed_ray.errors import UserError
from refed_ray.method.prompts import prompts_digest
from refed_ray.method.refiners import refiner_for
from refed_ray.records import commits
from refed_ray.storage import Storage

RUN_FILE = commits.RUN_FILE
# Commit records first: a discard killed midway leaves no commit naming deleted files.
KNOWN = (RUN_FILE, "_index", "_markers", "_attempts", "report.json", "report.html", "dataset", "export", "plan",
         "feedback", "data", "rejects", "selected")


# Fingerprint parts that outputs written before they existed lack, and the value those runs had.
PARTS_OF_LATER_RUNS = {"feedback_mode": "reference", "instructions_from": ""}


def run_fingerprint(config: RunConfig, seeds: SeedSet) -> dict[str, str]:
    """What a resume must share with the run that wrote OUTPUT (computed once per run: it hashes
    every reference). The prompts digest covers the prompts of the run's feedback mode."""
    return config.fingerprint(prompts_digest(refiner_for(config.feedback.mode).prompts), seeds.digest())


def check_output(storage: Storage, config: RunConfig, fingerprint: dict[str, str], force_new: bool) -> bool:
    """Whether OUTPUT may be used, read-only and before Ray starts: True when it holds a
    compatible earlier run to resume. ``force_new`` discards an earlier run, never a folder
    that holds something else."""
    if storage.exists(RUN_FILE):
        # A run's run.json, even for --force-new: a judge's verdicts or a broken file are not
        # discarded (a plain rerun also refuses a half-done discard).
        previous = commits.read_run(storage, discarding_ok=force_new)
        if not force_new:
            check_resume(storage, previous, fingerprint, config.num_samples)
        return not force_new
    if not storage.is_empty():
        raise UserError(
            f"{storage.uri} is not empty and holds no refed-ray run ({RUN_FILE}): choose a new or empty --output"
        )
    return False


def start_output(storage: Storage, config: RunConfig, fingerprint: dict[str, str], force_new: bool) -> str:
    """Claim OUTPUT for this run (after ``check_output``): discard an earlier run if asked, and
    record this run's fingerprint for the next resume to check. Returns the run's id: the earlier
    run's on a resume, a new one otherwise."""
    previous = commits.read_run(storage, discarding_ok=True) if storage.exists(RUN_FILE) else None
    if force_new and previous is not None:
        discard(storage, previous)
        previous = None
    # Outputs written before runs had ids keep none (""): their commits carry none either.
    run_id = previous.get("run_id", "") if previous else uuid.uuid4().hex[:16]
    # One atomic write: on a --force-new, it also ends the discard.
    storage.write_json(RUN_FILE, {"run_id": run_id, "fingerprint": fingerprint,
                                  "config": config.public_dump()})
    return run_id


def check_resume(storage: Storage, previous_run: dict, fingerprint: dict[str, str], num_samples: int) -> None:
    """Refuse to resume a run with another fingerprint, or with a smaller plan."""
    planned_for = previous_run["config"]["num_samples"]
    if num_samples < planned_for and commits.committed_any(storage, "synthesis"):
        raise UserError(
            f"{storage.uri} was planned for {planned_for} samples; a resume can grow the plan, not "
            f"shrink it (committed units would fall outside it): pass --num-samples {planned_for} "
            "or more, or --force-new"
        )
    previous = previous_run["fingerprint"]
    there = {key: previous.get(key, PARTS_OF_LATER_RUNS.get(key)) for key in fingerprint}
    differs = [key for key in fingerprint if there[key] != fingerprint[key]]
    if differs:
        details = "; ".join(f"{key}: {there[key]!r} there, {fingerprint[key]!r} now" for key in differs)
        raise UserError(
            f"{storage.uri} holds a run with a different {', '.join(differs)} ({details}). "
            "Resuming would mix incompatible samples: pass --force-new to discard it, "
            "or choose another --output."
        )


def discard(storage: Storage, previous_run: dict) -> None:
    """Delete an earlier run's folders, run.json last (the caller overwrites it): marked first, so a
    kill at any point leaves a run.json that says a discard is under way."""
    storage.write_json(RUN_FILE, {**previous_run, commits.DISCARDING: True})
    for name in KNOWN:
        if name != RUN_FILE and storage.exists(name):
            storage.delete(name)


def refuse_local_output_on_cluster(storage: Storage, config: RunConfig) -> None:
    """Before any engine starts: a local path on a multi-node cluster is each node's own disk.
    (Nodes that join later check it too: an engine actor refuses to start where it cannot see
    OUTPUT's run.json.)"""
    if not storage.is_local or config.output_shared_filesystem:
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1:
        raise UserError(
            f"--output {storage.uri} is a local path, but the Ray cluster has {len(nodes)} nodes: each "
            "would write to its own disk and the data would die with its node. Use an object-store "
            "URI (s3://bucket/path, gs://...), or, for a path every node mounts (NFS, EFS, Lustre), "
            "set output_shared_filesystem: true"
        )
