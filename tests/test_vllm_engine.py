"""The real thing: `refed-ray run` with the vLLM CPU engine and the embedded Gemma 3 270M, through
all four steps with structured outputs, then `refed-ray export`. Slow (loads the model twice)."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from refed_ray.records.commits import CommitLog
from refed_ray.records.models import Feedback, RefedRow, Reject, Sample
from refed_ray.storage import Storage
from tests.conftest import ROOT, committed_tables, run_cli, write_jsonl
from tests.test_cli_exit import assert_quiet_log

pytestmark = pytest.mark.engine

# Char bounds well under the token budgets: a reply can always finish, so none is truncated.
TINY_RUN = {
    "num_samples": 3,
    "max_extra_units": 0,  # no top-up: the test's time is bounded
    "instructions_per_aspect": 3,
    "engine": {"max_model_len": 2048, "cpu_kvcache_space_gib": 1},
    "sampling": {
        "feedback_max_tokens": 400, "feedback_max_chars": 300,
        "instructions_max_tokens": 600, "instruction_max_chars": 150,
        "response_max_tokens": 400, "response_max_chars": 300,
        "refinement_max_tokens": 900, "point_max_chars": 60, "max_points": 1,
    },
    "workers": {"num_engines": 1, "units_per_shard": 1},
}


def refed_ray(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=1200)


def assert_delivered_or_short(done: subprocess.CompletedProcess, report: dict, n: int) -> None:
    """Exit 0 with N delivered; a 270M teacher without a top-up budget often falls short: exit 4."""
    if report["delivered"] == n:
        assert done.returncode == 0, done.stderr[-4000:]
    else:
        assert done.returncode == 4, done.stderr[-4000:]
        assert f"refed-ray: short: delivered {report['delivered']} of {n} samples" in done.stderr
        assert "max_extra_units" in report["shortfall"]["message"]


def test_real_engine_runs_the_whole_method(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"instruction": "Give three tips for writing clear emails.",
         "response": "1. Put the request in the first line.\n2. Keep one topic per email.\n3. End with the next step and a date."},
    ])
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    out = tmp_path / "out"

    done = refed_ray("run", "--config", str(config), "--seeds", str(seeds), "--output", str(out))
    report = json.loads((out / "report.json").read_text())
    assert_delivered_or_short(done, report, 3)
    assert "refed-ray: " in done.stdout and "samples in" in done.stdout
    # Both passes' engines were stopped when their pass ended: no engine-dead traceback, no error.
    assert_quiet_log(done.stdout + done.stderr)

    storage = Storage(str(out))
    feedback = [Feedback(**r) for t in committed_tables(storage, "feedback") for r in t.to_pylist()]
    samples = [Sample(**r) for t in committed_tables(storage, "data") for r in t.to_pylist()]
    rejects = [Reject(**r) for t in committed_tables(storage, "rejects") for r in t.to_pylist()]
    plan = [r for f in storage.list("plan") for r in pq.read_table(out / f).to_pylist()]

    assert len(plan) == 1 and report["device"] == "cpu"
    assert len(feedback) == report["feedback_rows"] == 1 and report["feedback_calls"] >= 2
    assert feedback[0].subject_areas.strip() and feedback[0].response_feedback.strip()
    assert len(samples) >= 1, [r.reason for r in rejects]
    assert len(samples) + sum(r.lost_samples for r in rejects) == 3
    assert all(s.model == "gemma-3-270m" and s.prompt_tokens > 0 and s.completion_tokens > 0 for s in samples)
    assert report["all_planned_samples_accounted"]
    assert report["this_run"]["completion_tokens_per_second"] > 0

    exported = refed_ray("export", str(out), "--format", "refed-json", "--to", str(tmp_path / "refed.json"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    rows = json.loads((tmp_path / "refed.json").read_text())
    assert len(rows) == len(samples)
    for row in rows:
        RefedRow.model_validate(row)


def test_real_engine_runs_feedback_mode_sample_through_all_its_steps(tmp_path):
    """The paper's sample-level baseline: instruction feedback per reference, then each response its
    own feedback call and a refinement with it (refed_ray/method/sample_feedback.py)."""
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"instruction": "Give two tips for a good night's sleep.",
         "response": "1. Go to bed at the same time every night.\n2. Keep screens out of the bedroom."},
    ])
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    out = tmp_path / "out"

    done = refed_ray("run", "--config", str(config), "--seeds", str(seeds), "--output", str(out),
                     "--feedback-mode", "sample")
    report = json.loads((out / "report.json").read_text())
    assert_delivered_or_short(done, report, 3)
    assert_quiet_log(done.stdout + done.stderr)

    storage = Storage(str(out))
    feedback = [Feedback(**r) for t in committed_tables(storage, "feedback") for r in t.to_pylist()]
    samples = [Sample(**r) for t in committed_tables(storage, "data") for r in t.to_pylist()]
    rejects = [Reject(**r) for t in committed_tables(storage, "rejects") for r in t.to_pylist()]
    stages = report["stages"]

    assert report["feedback_mode"] == "sample" and storage.read_json("run.json")["fingerprint"]["feedback_mode"] == "sample"
    # The reference's instruction feedback only; its response feedback is never asked for.
    assert len(feedback) == 1 and feedback[0].subject_areas.strip() and feedback[0].response_feedback == ""
    assert stages["feedback"]["rows_in"] == 1 and stages["feedback"]["calls"] >= 1
    # Every response that came back got its own feedback call, and each one that passed was refined.
    assert stages["sample_feedback"]["rows_in"] == stages["responses"]["rows_out"] >= 1
    assert stages["refinement"]["rows_in"] == stages["sample_feedback"]["rows_out"]
    assert report["feedback_calls"] == stages["feedback"]["calls"] + stages["sample_feedback"]["calls"]
    assert len(samples) >= 1, [r.reason for r in rejects]
    assert len(samples) + sum(r.lost_samples for r in rejects) == 3 and report["all_planned_samples_accounted"]
    assert all(s.improved_response.strip() and s.prompt_tokens > 0 for s in samples)


def test_real_engine_run_killed_mid_synthesis_resumes_exactly_once(tmp_path):
    import os
    import signal
    import time

    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"instruction": "Name two uses of a hash map.", "response": "Counting word frequencies, and caching computed results by key."},
    ])
    config = tmp_path / "tiny.yaml"
    # Two units, one batch at a time: the kill lands after the first shard commits.
    config.write_text(yaml.safe_dump({**TINY_RUN, "num_samples": 6, "workers": {
        "num_engines": 1, "units_per_shard": 1, "shards_in_flight": 1}}))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "refed_ray.cli", "run", "--config", str(config), "--seeds", str(seeds),
               "--output", str(out)]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    markers = out / "_markers" / "synthesis"
    deadline = time.time() + 900
    while time.time() < deadline and driver.poll() is None and not (markers.exists() and any(markers.iterdir())):
        time.sleep(0.5)
    assert driver.poll() is None, "the run ended before the kill: " + (tmp_path / "first.log").read_text()[-3000:]
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    try:  # what the dead driver's local Ray cluster left running would only slow the resume down
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

    storage = Storage(str(out))
    assert len(CommitLog(storage).commits["synthesis"]) == 1  # killed with one of two units committed

    done = refed_ray("run", "--config", str(config), "--seeds", str(seeds), "--output", str(out))
    report = json.loads((out / "report.json").read_text())
    assert_delivered_or_short(done, report, 6)
    assert {k: report["units"][k] for k in ("planned", "committed", "resumed", "this_run")} == {
        "planned": 2, "committed": 2, "resumed": 1, "this_run": 1}

    plan = {r["unit_id"] for f in storage.list("plan") for r in pq.read_table(out / f).to_pylist()}
    samples = [(r["unit_id"], r["sample_index"]) for t in committed_tables(storage, "data") for r in t.to_pylist()]
    rejected = [(r["unit_id"], r["sample_index"], r["lost_samples"])
                for t in committed_tables(storage, "rejects") for r in t.to_pylist() if r["unit_id"]]
    assert len(samples) == len(set(samples))  # none twice
    covered = set(samples) | {(u, i) for u, i, lost in rejected if lost == 1}
    covered |= {(u, i) for u, i, lost in rejected if lost == 3 for i in range(3)}
    assert covered == {(u, i) for u in plan for i in range(3)}  # none missing
    assert sorted(storage.list("data")) == CommitLog(storage).files("data")  # no orphan left
