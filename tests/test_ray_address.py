"""A cluster a ``ray start`` recorded on this machine that has since died: a command without
RAY_ADDRESS says so and how to fix it, in seconds, exit 3, no traceback (Ray alone retries the
dead GCS for about a minute, then fails with a traceback)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import yaml

from tests.conftest import FAKE_ENGINE, free_port, pairs, run_cli, write_jsonl


def test_a_dead_recorded_cluster_stops_the_run_at_once_with_what_to_do(tmp_path):
    # Ray looks for ray_current_cluster in $RAY_TMPDIR/ray/: a temp folder of this test's own, not
    # /tmp/ray, which other tests' clusters use. Short: Ray's socket paths live under it.
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        os.makedirs(f"{ray_tmp}/ray")
        dead = f"127.0.0.1:{free_port()}"  # a closed port: nothing listens there
        with open(f"{ray_tmp}/ray/ray_current_cluster", "w") as handle:
            handle.write(dead)
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({
            "seeds": str(write_jsonl(tmp_path / "seeds.jsonl", pairs(2))), "output": str(tmp_path / "out"),
            "num_samples": 2, "instructions_per_aspect": 2, "engine": FAKE_ENGINE,
        }))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}

        started = time.monotonic()
        result = run_cli("run", "--config", str(config), timeout=120, env=env)
        elapsed = time.monotonic() - started
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert result.returncode == 3, result.stderr
    assert f"refed-ray: stopped: this machine's Ray names a cluster at {dead}" in result.stderr
    assert "`ray stop`" in result.stderr and "RAY_ADDRESS=local" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 30, elapsed  # Python and the imports: seconds, not Ray's minute of retries
