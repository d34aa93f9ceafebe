"""What `refed-ray run` says at the end of a run that ran: exit 0 only with N samples delivered,
exit 4 with why and what completes the run otherwise, and a log with no error in a healthy run."""

import json
import re
import sys

import pytest
import yaml

from refed_ray.errors import RunStopped

from tests.conftest import FAKE_ENGINE, pairs, run_cli, write_jsonl

# An error line of Ray's C++ core ("[2026-11-28 17:46:32,962 E 9822 9822] core_worker.cc:...").
RAY_CORE_ERROR = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\]")


def assert_quiet_log(output: str) -> None:
    """A healthy run's driver output (its actors' forwarded logs included) holds no error."""
    assert "Traceback" not in output, output[-6000:]
    assert "ERROR" not in output, [line for line in output.splitlines() if "ERROR" in line][:5]
    assert not RAY_CORE_ERROR.search(output), RAY_CORE_ERROR.findall(output)


def test_a_short_run_exits_4_naming_the_budget_and_raising_it_completes_the_run(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(6))
    shutdowns = tmp_path / "shutdowns.log"
    calls = tmp_path / "calls.log"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "num_samples": 12, "instructions_per_aspect": 3, "max_extra_units": 0,
        # About a third of refinements never validate (chosen by prompt content: reproducible).
        "engine": {**FAKE_ENGINE, "engine_kwargs": {"invalid_rate": {"Refinement": 0.35},
                                                     "shutdown_log": str(shutdowns), "calls_log": str(calls)}},
        "workers": {"num_engines": 1, "units_per_shard": 2},
    }))
    out = tmp_path / "out"
    command = ("run", "--config", str(config), "--seeds", str(seeds), "--output", str(out))

    short = run_cli(*command, timeout=600)
    assert short.returncode == 4, short.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["delivered"] < 12 and report["shortfall"]["missing"] == 12 - report["delivered"]
    (message,) = [line for line in short.stderr.splitlines() if line.startswith("refed-ray: short: ")]
    assert f"delivered {report['delivered']} of 12 samples" in message
    assert "the top-up budget is spent (max_extra_units=0: 0 units beyond the 4 that N needs)" in message
    assert message.removeprefix("refed-ray: short: ") == report["shortfall"]["message"]
    raise_to = re.search(r"raise max_extra_units to ([\d.]+) \(--max-extra-units", message).group(1)
    assert float(raise_to) > 0
    assert_quiet_log(short.stdout + short.stderr)

    done = run_cli(*command, "--max-extra-units", raise_to, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["delivered"] == 12 and report["shortfall"] is None
    assert report["units"]["resumed"] == 4 and report["plan"]["extra_units"] > 0
    assert report["dataset"]["rows"] == 12
    assert_quiet_log(done.stdout + done.stderr)

    # Every engine was stopped while its actor still ran (at the end of its pass), not left to
    # interpreter teardown, where vLLM's own exit hooks kill its processes under it.
    engines = {line.split()[0] for line in calls.read_text().splitlines()}
    stopped = [line.split() for line in shutdowns.read_text().splitlines()]
    assert {pid for pid, _ in stopped} == engines
    assert all(finalizing == "False" for _, finalizing in stopped)


def test_an_execution_error_escaping_a_pass_is_exit_3_in_one_line(tmp_path, monkeypatch, capsys):
    """Ray Data's ExecutionTimeoutError (or any error of the execution that is no engine's) ended
    `run` with exit 1 and a traceback: it is an infrastructure stop, exit 3, one line."""
    from ray.data.exceptions import ExecutionTimeoutError

    from refed_ray import cli
    from refed_ray.records.commits import CommitLog
    from refed_ray.run import passes
    from refed_ray.storage import Storage

    class Stalled:
        def iter_batches(self, **kwargs):
            raise ExecutionTimeoutError("Dataset execution made no progress for at least 1800s\nOperators ...")

    storage = Storage(str(tmp_path / "out"))
    with pytest.raises(RunStopped, match=r"^the synthesis pass stopped: Ray's execution failed \(ExecutionTimeoutError: "
                       r"Dataset execution made no progress for at least 1800s\)\. Committed shards are kept"):
        passes.drain(Stalled(), CommitLog(storage), "synthesis")

    def stalled_run(config, force_new=False):
        passes.drain(Stalled(), CommitLog(storage), "synthesis")

    monkeypatch.setattr("refed_ray.run.pipeline.run", stalled_run)
    assert cli.main(["run", "--output", str(tmp_path / "out2")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("refed-ray: stopped: the synthesis pass stopped: Ray's execution failed") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_result_is_printed_after_ray_shuts_down(monkeypatch, capsys):
    """Ray forwards raylet lines to stdout until it shuts down: a result printed before would not
    be the last line a script reads (a raylet warning came after an export's JSON once)."""
    import types

    from refed_ray import cli

    events = []
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True,
                                     shutdown=lambda: events.append(("shutdown", capsys.readouterr().out)))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    cli._say_result('{"exported": 4}')
    assert events == [("shutdown", "")]  # nothing printed before Ray went down
    assert capsys.readouterr().out.splitlines()[-1] == '{"exported": 4}'
