from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINE = {"kind": "custom", "class_path": "tests.fake_engine:FakeEngine"}

# Ray workers must import tests.fake_engine: they inherit PYTHONPATH from the driver.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster for one test module (2 cores: keep actor counts small)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pairs(count: int, prefix: str = "task") -> list[dict]:
    return [
        {"instruction": f"{prefix} {i}: explain topic number {i} clearly.", "response": f"A careful answer about topic {i}."}
        for i in range(count)
    ]


def committed_tables(storage, folder: str):
    """The committed tables of ``folder`` ("data", "rejects", "feedback"), as a reader sees them."""
    from refed_ray.commits import CommitLog

    for name in CommitLog(storage).files(folder):
        yield storage.read_table(name)
