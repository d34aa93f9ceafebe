"""`ray job submit` to a real Ray head started on 127.0.0.1 by the test, with the fake teacher.

Submit and wait for SUCCEEDED; then submit again, `ray job stop` it mid-run, resubmit, and check
that the second submission resumed: every planned sample once, none twice."""

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from refed_ray.records.commits import CommitLog
from refed_ray.storage import Storage
from tests.conftest import ROOT, committed_tables, free_port, pairs, write_jsonl

RAY = str(Path(sys.executable).parent / "ray")
# Ray 2.60 clusters use token auth: the head, the job client and the job's driver share a token.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}


def ray_env() -> dict[str, str]:
    """The tests' environment for the head and the job client: addresses are passed explicitly,
    so conftest's RAY_ADDRESS=local (for in-process clusters) is left out."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **AUTH}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    port, dashboard = free_port(), free_port()
    env = ray_env()
    subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=180,
    )
    address = f"http://127.0.0.1:{dashboard}"
    # The job agent starts after `ray start` returns: wait until it takes requests.
    deadline = time.time() + 120
    while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True,
                         timeout=60).returncode and time.time() < deadline:
        time.sleep(2)
    yield address
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=env)  # this machine runs no other head


def job(address: str, command: str, *args: str, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([RAY, "job", command, "--address", address, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=ray_env())
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def submit(address: str, config: Path, seeds: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    # The documented entrypoint; PYTHONPATH=. lets the job import the tests' fake teacher.
    entrypoint = ["env", "PYTHONPATH=.", sys.executable, "jobs/synthesize.py",
                  "--config", str(config), "--seeds", str(seeds), "--output", str(out)]
    return job(address, "submit", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", *extra, "--", *entrypoint)


def fake_config(tmp_path: Path, **engine_kwargs) -> Path:
    path = tmp_path / f"fake-{len(engine_kwargs)}.yaml"
    path.write_text(yaml.safe_dump({
        "num_samples": 24, "instructions_per_aspect": 3,
        "engine": {"kind": "custom", "class_path": "tests.fake_engine:FakeEngine", "engine_kwargs": engine_kwargs},
        "workers": {"num_engines": 1, "units_per_shard": 1, "shards_in_flight": 1},
    }))
    return path


def test_submit_stop_and_resubmit(head, tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(4))
    out = tmp_path / "first"
    done = submit(head, fake_config(tmp_path), seeds, out)
    assert "succeeded" in (done.stdout + done.stderr).lower()
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 24 and report["all_planned_samples_accounted"]

    # A slow teacher, so the stop lands mid-run.
    slow = fake_config(tmp_path, delay=2.0)
    out = tmp_path / "second"
    submitted = submit(head, slow, seeds, out, "--no-wait", "--submission-id", "refed-stop-me")
    markers = out / "_markers" / "synthesis"
    deadline = time.time() + 300
    while time.time() < deadline and not (markers.exists() and len(list(markers.iterdir())) >= 2):
        time.sleep(0.5)
    job(head, "stop", "refed-stop-me")
    status = job(head, "status", "refed-stop-me").stdout
    assert "was stopped" in status, (submitted.stdout, status)
    committed_before = len(CommitLog(Storage(str(out))).commits["synthesis"])
    assert 2 <= committed_before < 8

    submit(head, slow, seeds, out)
    report = json.loads((out / "report.json").read_text())
    assert report["units"]["resumed"] >= committed_before and report["units"]["committed"] == 8
    storage = Storage(str(out))
    samples = [(r["unit_id"], r["sample_index"]) for t in committed_tables(storage, "data") for r in t.to_pylist()]
    assert len(samples) == len(set(samples)) == 24
