"""Where a run stands, from OUTPUT alone: ``refed-ray status``.

``read_status`` needs nothing but read access to OUTPUT (a laptop and the bucket), while a job
writes into it or after. It reads what a run start reads, whatever the number of shards: one
listing of OUTPUT's top level (run.json's and report.json's times), run.json, the plan's parts
(one object per 100,000 units), and ``CommitLog``'s reads (per pass the index's few objects, one
listing of its parts and one of its markers, the markers not yet absorbed into the index, and one listing each of
data/, rejects/ and feedback/). Listings are paginated: one request per 1,000 keys.

Rates come from each commit's ``committed_at``: ``run/progress.py``'s ``progress_figures`` is the
one computation of samples, rates, ETA and yield, which the driver's progress line uses too.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from refed_ray.config import RunConfig, run_config
from refed_ray.data.filters.dedup import DEDUP
from refed_ray.data.kept import filter_applied, kept_samples
from refed_ray.data.kept import pass_totals as _pass_totals
from refed_ray.errors import UserError
from refed_ray.records.commits import RUN_FILE, CommitLog
from refed_ray.records.plan import plan_files, summarize, units_needed
from refed_ray.records.stages import PassName
from refed_ray.records.stats import ShardStats, empty_stats, merge
from refed_ray.reports.report import api_cost, reasons_by_count
from refed_ray.run.progress import duration, progress_figures, rate, share
from refed_ray.storage import Storage

# A commit gap longer than this (or 3 times the run's mean gap, if longer) makes a run look
# stopped: a call may wait out an outage for workers.outage_patience_s (30 minutes by default).
QUIET_S = 1800
READ_TRIES = 3  # a marker absorbed and deleted between its listing and its read: read again


# ---- refed-ray status ----------------------------------------------------------------------


def read_status(storage: Storage, now: float | None = None) -> dict[str, Any]:
    """The run in ``storage``, as ``refed-ray status`` shows it (``--json`` prints this dict)."""
    for attempt in range(READ_TRIES):
        try:
            return _read_status(storage, now)
        except FileNotFoundError:  # the driver absorbed and deleted a marker as it was read
            if attempt == READ_TRIES - 1:
                raise


def pass_totals(committed: CommitLog, config: RunConfig) -> dict[str, ShardStats]:
    """Each pass's summed counters, as report.json sums them (``kept.pass_totals``): a filter not
    yet applied over the committed synthesis shards (a pass or a top-up round in progress: filters
    come after it) counts nothing yet."""
    return _pass_totals(committed, config, stale_ok=True)


def _read_status(storage: Storage, now: float | None) -> dict[str, Any]:
    times = _top_level_times(storage)
    if RUN_FILE not in times:
        raise UserError(f"{storage.uri} holds no refed-ray run ({RUN_FILE})")
    config = run_config(storage)
    committed = CommitLog(storage)
    parts = plan_files(storage)
    plan = summarize(storage, parts) if parts else None
    clock = _RunClock.of(times, committed, time.time() if now is None else now)
    k = config.instructions_per_aspect
    synthesis = list(committed.commits[PassName.SYNTHESIS].values())
    units_planned = plan.units if plan else 0
    totals = pass_totals(committed, config)
    samples = kept_samples(totals)
    progress = progress_figures(
        synthesis, units_planned=units_planned, k=k, target=config.num_samples, started=clock.started,
        now=clock.end, dropped=totals[PassName.SYNTHESIS].samples - samples,
    )
    stages = empty_stats()
    for stats in totals.values():
        merge(stages, stats.stages)
    return {
        "output": storage.uri,
        "model": config.model_name(),
        "state": clock.state,
        "started_at": clock.started,
        "finished_at": clock.finished_at,
        "last_commit_at": clock.commit_times[-1] if clock.commit_times else None,
        "last_activity_age_s": round(clock.quiet_for, 1),
        "looks_alive": clock.state == "running",
        "num_samples": config.num_samples,
        "samples": samples,
        "passes": {
            "feedback": {
                "shards_committed": len(committed.commits[PassName.FEEDBACK]),
                "references_committed": len(committed.ids(PassName.FEEDBACK)),
                "references_in_plan": len(plan.references_used) if plan else None,
            },
            "synthesis": {
                "shards_committed": len(synthesis),
                "shards_planned": plan.shards if plan else None,
                "units_committed": progress.units_done,
                "units_planned": units_planned,
                "samples_committed": totals[PassName.SYNTHESIS].samples,
                "samples_planned": units_planned * k,
            },
            "dedup": {"enabled": config.dedup.enabled, "done": filter_applied(DEDUP, committed, config),
                      "dropped": totals[PassName.DEDUP].lost_samples},
        },
        "samples_per_hour": {"last_10_min": progress.samples_per_hour_recent, "run": progress.samples_per_hour},
        "eta_seconds": None if progress.eta_seconds is None else round(progress.eta_seconds),
        "yield": progress.yield_,
        "rejects": {
            "samples_lost": sum(stats.lost_samples for stats in totals.values()),
            "by_reason": reasons_by_count(totals.values()),
        },
        # Work started more than once: an engine died (or a run stopped) while the shard ran.
        "shards_redone": {p: sum(1 for c in committed.commits[p].values() if c.attempt > 1)
                          for p in (PassName.FEEDBACK, PassName.SYNTHESIS)},
        "top_up": _top_up(storage, parts, units_planned, config),
        "cost": api_cost(config, stages),
    }


@dataclass
class _RunClock:
    """When the run in OUTPUT started, whether and when it finished, and its commit times."""

    started: float  # run.json's time: each run (re)writes it when it starts
    finished_at: float | None  # report.json's time, when written by this run
    commit_times: list[float]  # this run's, sorted
    now: float

    @classmethod
    def of(cls, times: dict[str, float], committed: CommitLog, now: float) -> _RunClock:
        started = times[RUN_FILE]
        finished_at = times["report.json"] if times.get("report.json", 0) >= started else None
        every = sorted(c.committed_at for commits in committed.commits.values() for c in commits.values()
                       if c.committed_at > 0)
        if finished_at and every and every[-1] < started:
            started = every[0]  # a copy of a finished output: its objects' times are the copy's
        return cls(started, finished_at, [t for t in every if t >= started], now)

    @property
    def end(self) -> float:
        """Rates are taken up to now, or to the last commit of a finished run."""
        if self.finished_at is None:
            return self.now
        return self.commit_times[-1] if self.commit_times else self.started

    @property
    def quiet_for(self) -> float:
        return self.now - (self.commit_times[-1] if self.commit_times else self.started)

    @property
    def state(self) -> str:
        """finished; running; or quiet: no commit for longer than QUIET_S and 3 mean gaps."""
        if self.finished_at is not None:
            return "finished"
        times = self.commit_times
        mean_gap = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        return "running" if self.quiet_for <= max(QUIET_S, 3 * mean_gap) else "quiet"


def _top_level_times(storage: Storage) -> dict[str, float]:
    """Modification times (epoch seconds) of the files at OUTPUT's top level: one listing."""
    try:
        entries = storage.fs.ls(storage.root, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: _modified(e) for e in entries if e.get("type") != "directory"}


def _modified(entry: dict[str, Any]) -> float:
    value = entry.get("LastModified") or entry.get("mtime") or entry.get("created") or 0
    return value.timestamp() if isinstance(value, datetime) else float(value)


def _top_up(storage: Storage, plan_files: list[str], units_planned: int, config: RunConfig) -> dict[str, int]:
    """Units planned beyond ceil(N/K), and the top-up rounds that planned them: each top-up
    appends new plan parts, so a part that starts past the first ceil(N/K) units began a round
    (read from the parts' footers, and only when there are extra units)."""
    base = units_needed(config.num_samples, config.instructions_per_aspect)
    extra = max(0, units_planned - base)
    if not extra:
        return {"extra_units": 0, "rounds": 0}
    starts = itertools.accumulate([0] + [_rows(storage, f) for f in plan_files[:-1]])
    return {"extra_units": extra, "rounds": sum(1 for start in starts if start >= base)}


def _rows(storage: Storage, relative: str) -> int:
    with storage.parquet_file(relative) as parquet:
        return parquet.metadata.num_rows


# ---- rendering -----------------------------------------------------------------------------


def describe(status: dict[str, Any]) -> str:
    """``refed-ray status`` without ``--json``."""
    synthesis, feedback = status["passes"]["synthesis"], status["passes"]["feedback"]
    rates = status["samples_per_hour"]
    age = duration(status["last_activity_age_s"])
    alive = {"finished": "finished", "running": f"running, last commit {age} ago",
             "quiet": f"no commit for {age}: stopped, or stuck?"}[status["state"]]
    lines = [
        f"{status['output']}: {alive}",
        f"  samples: {status['samples']:,} accepted of {status['num_samples']:,}",
        f"  feedback:  {feedback['references_committed']:,} references in {feedback['shards_committed']:,} shards",
        (f"  synthesis: shards {synthesis['shards_committed']:,} of {_count(synthesis['shards_planned'])}, "
         f"units {synthesis['units_committed']:,} of {synthesis['units_planned']:,}, "
         f"samples {synthesis['samples_committed']:,} of {synthesis['samples_planned']:,} planned"),
        f"  dedup: {_dedup(status['passes']['dedup'])}",
        (f"  pace: {rate(rates['last_10_min'])} samples/h over the last 10 min, {rate(rates['run'])} over the run"
         + ("" if status["state"] == "finished" else f"; ETA {duration(status['eta_seconds'])} (the plan's shards)")),
        (f"  yield: {share(status['yield'])} accepted per planned sample; "
         f"{status['rejects']['samples_lost']:,} samples lost"),
    ]
    for reason, count in list(status["rejects"]["by_reason"].items())[:5]:
        lines.append(f"    {count:>8,} x {reason}")
    redone = status["shards_redone"]
    lines.append(f"  shards redone (engine died or run stopped): synthesis {redone['synthesis']}, "
                 f"feedback {redone['feedback']}")
    top_up = status["top_up"]
    lines.append(f"  top-up: {top_up['rounds']} rounds, {top_up['extra_units']:,} extra units")
    if status["cost"]:
        lines.append(f"  cost so far: {status['cost']['total']:.4f} (engine.api.prices)")
    return "\n".join(lines)


def _dedup(dedup: dict[str, Any]) -> str:
    if not dedup["enabled"]:
        return "off (dedup.enabled: false)"
    return f"done, {dedup['dropped']:,} dropped" if dedup["done"] else "not yet (after the synthesis pass)"


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"
