"""The driver's progress line while the synthesis pass drains, and the figures behind it.

``progress_figures`` is the one computation of samples, rates, ETA and yield from synthesis
commits: the driver's ``ProgressLog`` and ``refed-ray status`` (watch/status.py) both use it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

from refed_ray.records.commits import Commit, CommitLog
from refed_ray.records.stages import PassName

log = logging.getLogger(__name__)

RECENT_S = 600  # "samples per hour over the last 10 minutes"


@dataclass
class Progress:
    """A pass's figures at one moment (samples accepted; before the run's dedup pass)."""

    samples: int  # accepted samples committed
    target: int  # N
    units_done: int
    units_planned: int
    samples_per_hour_recent: float | None  # over the last RECENT_S seconds (or since ``started``)
    samples_per_hour: float | None  # since ``started``
    eta_seconds: float | None  # the plan's remaining units at the recent pace; None: no pace yet
    yield_: float | None  # accepted per planned sample of the units done


def progress_figures(
    commits: Iterable[Commit], *, units_planned: int, k: int, target: int, started: float, now: float,
    dropped: int = 0,
) -> Progress:
    """Figures of synthesis ``commits``: rates from the commits made since ``started`` (this
    run: earlier runs' commits count as done, not as pace), ``dropped`` samples (dedup) off."""
    commits = list(commits)
    units_done = sum(len(c.ids) for c in commits)
    samples = sum(c.stats.samples for c in commits) - dropped
    elapsed = max(now - started, 0.0)
    this_run = [c for c in commits if c.committed_at >= started]
    recent = [c for c in this_run if c.committed_at >= now - RECENT_S]
    window = min(elapsed, RECENT_S)
    units_left = max(units_planned - units_done, 0)
    units_per_s = sum(len(c.ids) for c in recent) / window if window else 0.0
    if units_per_s == 0 and elapsed:  # nothing in the window: the run's pace
        units_per_s = sum(len(c.ids) for c in this_run) / elapsed
    return Progress(
        samples=samples,
        target=target,
        units_done=units_done,
        units_planned=units_planned,
        samples_per_hour_recent=_per_hour(sum(c.stats.samples for c in recent), window),
        samples_per_hour=_per_hour(sum(c.stats.samples for c in this_run), elapsed),
        eta_seconds=0.0 if not units_left else (units_left / units_per_s if units_per_s else None),
        yield_=round(samples / (units_done * k), 4) if units_done else None,
    )


def _per_hour(count: int, seconds: float) -> float | None:
    return round(count / seconds * 3600, 1) if seconds > 0 else None


def progress_line(progress: Progress) -> str:
    """The driver's log line, e.g. ``progress: 1,200 of 100,000 samples (units 130 of 10,000),
    5,400 samples/h over the last 10 min (4,900 over the pass), ETA 3h 12m, yield 0.92``."""
    return (
        f"progress: {progress.samples:,} of {progress.target:,} samples (units {progress.units_done:,} of "
        f"{progress.units_planned:,}), {rate(progress.samples_per_hour_recent)} samples/h over the last "
        f"{RECENT_S // 60} min ({rate(progress.samples_per_hour)} over the pass), ETA "
        f"{duration(progress.eta_seconds)}, yield {share(progress.yield_)}"
    )


class ProgressLog:
    """Logs the synthesis pass's ``progress_line`` every ``every_s`` seconds while it drains, from a
    thread: a shard can take longer than a minute, so the log cannot wait for commits to come.
    It reads the ``CommitLog`` the drain loop adds to (a dict copied whole under the GIL)."""

    def __init__(self, committed: CommitLog, *, units_planned: int, k: int, target: int, every_s: float = 60):
        self.committed, self.every_s = committed, every_s
        self.plan = {"units_planned": units_planned, "k": k, "target": target}
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="refed-ray-progress", daemon=True)

    def figures(self) -> Progress:
        commits = list(self.committed.commits[PassName.SYNTHESIS].values())
        return progress_figures(commits, **self.plan, started=self.started, now=time.time())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            log.info(progress_line(self.figures()))


# ---- figures as text ----------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
