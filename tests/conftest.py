from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINE = {"kind": "custom", "class_path": "tests.fake_engine:FakeEngine"}

# Ray workers must import tests.fake_engine: they inherit PYTHONPATH from the driver.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(ROOT))
# Every ray.init here and in the CLIs the tests start makes its own local cluster. Without this,
# ray.init() joins the cluster named in /tmp/ray/ray_current_cluster, which a `ray start` left
# on this machine may still name after its head died (a hang, then "num_cpus must not be provided").
os.environ["RAY_ADDRESS"] = "local"
# Hub ids in tests name no real model: the driver's check must not ask the hub about them (a
# refusal of a made-up id would be exit 2). Tests of the hub's answers unset it.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster for one test module (2 cores: keep actor counts small)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_cli(*args: str, timeout: float, cwd=ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m refed_ray.cli ARGS`` (in ``env``, default this process's). On a timeout its whole
    process group is killed, so a local Ray cluster it started does not outlive it and disturb later tests."""
    with subprocess.Popen([sys.executable, "-m", "refed_ray.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True, env=env) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


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
    from refed_ray.records.commits import CommitLog

    for name in CommitLog(storage).files(folder):
        yield storage.read_table(name)


def count_requests(storage) -> list[str]:
    """The S3 API calls this storage's own file system makes from now on (every s3fs request,
    listings' pages included, goes through ``_call_s3``)."""
    calls: list[str] = []
    original = storage.fs._call_s3

    async def counted(method, *args, **kwargs):
        calls.append(method)
        return await original(method, *args, **kwargs)

    storage.fs._call_s3 = counted
    return calls
