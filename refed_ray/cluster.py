"""Joining Ray: the one ``ray.init`` of every command (run, export, select, compare).

``ray.init()`` joins the cluster ``RAY_ADDRESS`` names; without it, the one a ``ray start`` on this
machine recorded in Ray's temp folder (``ray_current_cluster``), else starts a local one. A
recorded cluster that has died (a crashed ``ray start``, a killed test cluster) still names its
address there, and Ray retries its dead GCS for about a minute before it fails with a traceback:
that case is told apart here, in a second, and stops the command with what to do.
"""

from __future__ import annotations

import os
import socket

import ray

from refed_ray.errors import RunStopped

ANSWER_TIMEOUT_S = 3.0


def connect_ray() -> None:
    """Join or start Ray as ``ray.init()`` does; RunStopped (exit 3) when no RAY_ADDRESS is set
    and the cluster recorded on this machine does not answer."""
    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        recorded = _recorded_address()
        if recorded and not _answers(recorded):
            raise RunStopped(
                f"this machine's Ray names a cluster at {recorded} (a `ray start` recorded it), which does not "
                "answer: it has stopped. Run `ray stop` to forget it, or set RAY_ADDRESS=local to start a "
                "local cluster for this command (RAY_ADDRESS=HOST:PORT joins another)"
            )
    ray.init()


def _recorded_address() -> str | None:
    """The address ``ray start`` recorded, where ``ray.init()`` looks for it (Ray's temp folder:
    RAY_TMPDIR, TMPDIR or /tmp, then ray/ray_current_cluster)."""
    from ray._private.services import find_bootstrap_address  # what ray.init() itself reads

    return find_bootstrap_address(None)


def _answers(address: str) -> bool:
    """Whether the GCS at ``host:port`` accepts a connection within ANSWER_TIMEOUT_S."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=ANSWER_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False
