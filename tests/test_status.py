"""``refed-ray status`` and the driver's progress line.

The main test runs the fake teacher into a bucket on moto's S3 server and pauses it at a known
point: every call of one reference's responses waits for a release file, so exactly one shard
cannot commit. Status read at that moment must show exactly what is committed, at a bounded
number of S3 requests; after the release and the end of the run it must agree with report.json.
"""

import json
import logging
import math
import re
import threading
import time

import pyarrow as pa
import pytest

from refed_ray.records.commits import INDEX_SCHEMA, PASSES, Commit, CommitLog, indexed_shards
from refed_ray.records.plan import read_plan
from refed_ray.records.stats import ShardStats
from refed_ray.run import pipeline
from refed_ray.run.progress import RECENT_S, progress_figures, progress_line
from refed_ray.storage import Storage
from refed_ray.watch.status import read_status
from tests.conftest import count_requests, pairs, run_cli, write_jsonl
from tests.test_object_storage import bucket  # noqa: F401  (the moto S3 server and a Ray cluster)
from tests.test_pipeline import make_config

INDEX_EVERY = 5  # markers absorbed into the index every 5 commits: status reads both
HELD = "held"


def test_status_while_a_run_writes_to_s3_and_after(bucket, tmp_path, monkeypatch, caplog):  # noqa: F811
    monkeypatch.setattr(pipeline, "INDEX_EVERY_SHARDS", INDEX_EVERY)
    monkeypatch.setattr(pipeline, "PROGRESS_EVERY_S", 0.2)
    caplog.set_level(logging.INFO, logger="refed_ray.run.progress")
    seeds = pairs(39) + [{"id": HELD, "instruction": "HOLD: explain the held topic.", "response": "An answer."}]
    release = tmp_path / "release"
    engine = {"kind": "custom", "class_path": "tests.fake_engine:FakeEngine", "model": "fake-teacher",
              "engine_kwargs": {"hold": {"marker": "HOLD", "schema": "SynthesizedResponse", "release_file": str(release)}},
              "api": {"prices": {"fake-teacher": {"input_per_million": 1.0, "output_per_million": 4.0}}}}
    out = f"{bucket}/status-run"
    # 40 references x 2 aspects = 80 units of K=2, one round, in 80 shards of one unit: the held
    # reference's two shards cannot commit before the release, the 78 others can.
    config = make_config(tmp_path, write_jsonl(tmp_path / "seeds.jsonl", seeds), output=out, num_samples=160,
                         instructions_per_aspect=2, engine=engine, workers={"num_engines": 2, "units_per_shard": 1})
    finished: dict = {}
    runner = threading.Thread(target=_run_into, args=(config, finished))
    runner.start()
    storage = Storage(out)
    try:
        held_moment = _wait_until_paused(storage, finished)
        plan = read_plan(storage)
        held_shards = set(plan.filter(pa.compute.equal(plan["reference_id"], HELD))["shard"].to_pylist())
        assert len(held_shards) == 2 and plan.num_rows == 80

        requests = count_requests(storage)
        status = read_status(storage)
        committed = CommitLog(Storage(out))
        synthesis = status["passes"]["synthesis"]
        assert synthesis["shards_committed"] == len(committed.commits["synthesis"]) == 78
        assert set(committed.commits["synthesis"]) == set(plan["shard"].to_pylist()) - held_shards
        assert synthesis["shards_planned"] == 80 and synthesis["units_planned"] == 80
        assert synthesis["units_committed"] == len(committed.ids("synthesis")) == 78
        assert synthesis["samples_committed"] == committed.stats("synthesis").samples
        assert status["samples"] == committed.stats("synthesis").samples > 0  # dedup comes after the pass
        assert status["passes"]["feedback"]["references_committed"] == 40
        assert status["state"] == "running" and status["looks_alive"]
        assert status["eta_seconds"] is not None and math.isfinite(status["eta_seconds"])
        assert status["samples_per_hour"]["last_10_min"] > 0
        assert status["cost"]["prompt_tokens"] == sum(committed.stats(p).stages[s].prompt_tokens
                                                      for p in PASSES for s in committed.stats(p).stages)
        # What a run start reads, not one request per shard.
        assert len(requests) <= request_bound(unabsorbed=78 - held_moment["indexed"]) < 78, " ".join(requests)

        # The same through the CLI, from another process.
        done = run_cli("status", out, "--json", timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["passes"]["synthesis"] == synthesis

        # The driver's progress line saw the same commits (dedup has not run yet: nothing dropped).
        line = _wait_for_log(caplog, "units 78 of 80")
        samples = committed.stats("synthesis").samples
        assert f"progress: {samples:,} of 160 samples (units 78 of 80)" in line
        assert "ETA unknown" not in line and f"yield {samples / 156:.2f}" in line
    finally:
        release.touch()
        runner.join(timeout=600)
    report = finished["report"]

    requests = count_requests(storage)
    after = read_status(storage)
    assert after["state"] == "finished" and not after["looks_alive"]
    assert after["samples"] == report["samples"] and after["num_samples"] == 160
    synthesis = after["passes"]["synthesis"]
    assert (synthesis["shards_committed"], synthesis["shards_planned"]) == (report["shards"]["committed"], report["shards"]["planned"])
    assert (synthesis["units_committed"], synthesis["units_planned"]) == (report["units"]["committed"], report["units"]["planned"])
    assert synthesis["samples_planned"] == report["plan"]["planned_samples"]
    assert after["rejects"] == {key: report["rejects"][key] for key in ("samples_lost", "by_reason")}
    assert after["shards_redone"]["synthesis"] == report["shards"]["redone"]
    assert after["top_up"]["extra_units"] == report["plan"]["extra_units"]
    assert after["passes"]["dedup"]["dropped"] == report["deduplicated"]["total"]
    assert after["cost"] == report["cost"] and after["cost"]["total"] > 0
    assert after["yield"] == round(report["samples"] / (report["units"]["committed"] * 2), 4)
    assert after["eta_seconds"] == 0
    assert len(requests) <= request_bound(unabsorbed=0) < 80, " ".join(requests)


def request_bound(unabsorbed: int) -> int:
    """S3 requests of one status read. s3fs reads an object with a HEAD and a GET, and takes two
    requests to list an empty folder or probe a missing object: the top-level listing (1) and
    run.json (2); data/, rejects/ and feedback/ listed (2 each); per pass the index probed (2),
    read (2) and its markers listed (2); each marker not yet absorbed into an index read (2);
    the plan listed (2) and its one part read (2)."""
    return 1 + 2 + 3 * 2 + len(PASSES) * 6 + 2 * unabsorbed + 2 + 2

def _run_into(config, finished: dict) -> None:
    try:
        finished["report"] = pipeline.run(config)
    except Exception as err:  # noqa: BLE001  (reported by the test's wait, not lost in this thread)
        finished["error"] = err


def _wait_until_paused(storage: Storage, finished: dict, timeout: float = 600) -> dict:
    """Until 78 of the 80 shards are committed and the driver absorbed what it will absorb
    (it rewrites the index every INDEX_EVERY commits): from then on the run writes nothing
    until the release. Polls a state that, once reached, holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert "error" not in finished, finished.get("error")
        try:
            committed = len(CommitLog(storage).commits["synthesis"])
            indexed = len(indexed_shards(storage, "synthesis"))
        except FileNotFoundError:  # a marker absorbed between its listing and its read
            continue
        if committed == 78 and indexed == 78 - 78 % INDEX_EVERY:
            return {"indexed": indexed}
        time.sleep(0.2)
    raise AssertionError("the run did not reach its pause")


def _wait_for_log(caplog, fragment: str, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = [r.getMessage() for r in caplog.records if fragment in r.getMessage()]
        if lines:
            return lines[-1]
        time.sleep(0.1)
    raise AssertionError(f"no progress line with {fragment!r}")


# ---- figures --------------------------------------------------------------------------------


def commit(at: float, samples: int, units: int = 2) -> Commit:
    return Commit(pass_name="synthesis", shard=f"s-{at}", token="t", ids=[f"u{at}-{i}" for i in range(units)],
                  files=[], stats=ShardStats(samples=samples), committed_at=at)


def test_progress_figures_from_commit_times():
    started, now = 10_000.0, 10_000.0 + 3600
    commits = [commit(0, 6)]  # an earlier run's commit (no time recorded): done, but not pace
    commits += [commit(started + 600 * i, 6) for i in range(1, 5)]  # at 10, 20, 30, 40 minutes
    commits += [commit(now - 300, 5), commit(now - 60, 6)]  # the last 10 minutes: 4 units, 11 samples
    figures = progress_figures(commits, units_planned=40, k=3, target=100, started=started, now=now, dropped=2)
    assert figures.units_done == 14 and figures.samples == 6 * 5 + 11 - 2
    assert figures.samples_per_hour_recent == pytest.approx(11 / RECENT_S * 3600)
    assert figures.samples_per_hour == pytest.approx((6 * 4 + 11) / 3600 * 3600)
    assert figures.eta_seconds == pytest.approx((40 - 14) / (4 / RECENT_S))  # the recent pace
    assert figures.yield_ == round((6 * 5 + 11 - 2) / (14 * 3), 4)
    line = progress_line(figures)
    assert line.startswith("progress: 39 of 100 samples (units 14 of 40), 66 samples/h over the last 10 min")
    assert re.search(r"ETA 1h 05m, yield 0\.93$", line), line
    quiet = progress_figures(commits, units_planned=40, k=3, target=100, started=started, now=now + 3600)
    assert quiet.samples_per_hour_recent == 0 and quiet.eta_seconds == pytest.approx(26 / (12 / 7200))
    assert progress_figures([], units_planned=40, k=3, target=100, started=now, now=now).eta_seconds is None


def test_an_index_written_before_commit_times_still_loads(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_bytes("data/synthesis-a.t.parquet", b"x")
    old_schema = pa.schema([field for field in INDEX_SCHEMA if field.name != "committed_at"])
    commit = Commit(pass_name="synthesis", shard="synthesis-a", token="t", ids=["u1"],
                    files=["data/synthesis-a.t.parquet"], stats=ShardStats(samples=3))
    row = {**commit.model_dump(include=set(old_schema.names)), "stats": commit.stats.model_dump_json()}
    storage.write_table("_index/synthesis.parquet", pa.Table.from_pylist([row], schema=old_schema))
    (loaded,) = CommitLog(storage).commits["synthesis"].values()
    assert loaded.committed_at == 0 and loaded.stats.samples == 3
    log = CommitLog(storage)
    log.commits["synthesis"].clear()
    log.write_index("synthesis")  # a whole rewrite, in today's schema
    assert storage.read_table("_index/synthesis.parquet").schema.equals(INDEX_SCHEMA)


def test_status_of_a_folder_without_a_run_is_refused(tmp_path):
    done = run_cli("status", str(tmp_path), timeout=120)
    assert done.returncode == 2 and f"{tmp_path} holds no refed-ray run (run.json)" in done.stderr
