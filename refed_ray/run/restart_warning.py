"""Ray's warning about restartable actors with constructor arguments in the object store
(ray-project/ray#53727), judged once per driver and explained in one INFO line.

Ray Core logs it at ERROR, once per driver process, for any actor with ``max_restarts != 0`` whose
constructor takes an object ref: if the object is lost, a restart fails. Every Ray Data actor pool
meets both conditions (Ray Data restarts its actors without bound and hands each one its data
context and UDF as object refs), so this project cannot avoid them; its engine actors' own
arguments (the secrets, the feedback table, the rate limiter's handle) add to them. None can be
lost while the run lives: the driver put them, owns them and holds them until its passes end, and
an object that ``ray.put`` made is lost only with its node, the driver's, whose loss ends the job
anyway. So the warning does not apply, and a healthy run should not print an ERROR for it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable
from typing import TypeVar

import ray

log = logging.getLogger(__name__)

NOTE = (
    "engine actors restart with constructor arguments in Ray's object store (Ray's warning "
    "ray-project/ray#53727): this driver put them and holds them until the run ends, so only the "
    "loss of its own node, which ends the job anyway, could lose them"
)
_RAY_WARNING = "ray-project/ray/issues/53727"
_explained = False
T = TypeVar("T")


@ray.remote(num_cpus=0, max_restarts=1)
class _Probe:
    """An actor that meets the warning's conditions and does nothing."""

    def __init__(self, argument: object):
        pass


def explain_restart_warning() -> None:
    """Log NOTE, and let Ray spend its once-per-process warning on a probe actor while the
    driver's stderr is captured (Ray Core writes it to file descriptor 2 when the actor is
    submitted; nothing but its log level could silence it, and that would silence every error)."""
    global _explained
    if _explained:
        return
    _explained = True
    log.info(NOTE)
    probe, captured = _with_stderr_captured(lambda: _Probe.remote(ray.put(None)))
    # Whatever else reached stderr in that moment goes on to it.
    sys.stderr.write("".join(line for line in captured.splitlines(keepends=True) if _RAY_WARNING not in line))
    # Dropped once it runs: dropping an actor that is still being created makes the GCS log a
    # failed kill.
    ray.get(probe.__ray_ready__.remote())


def _with_stderr_captured(action: Callable[[], T]) -> tuple[T, str]:
    """What ``action`` returns, and what it and anything else in this process wrote to file
    descriptor 2 meanwhile."""
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            result = action()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        return result, capture.read().decode(errors="replace")
