"""Bad input through the real CLI: a clear message naming what and where, exit 2, no traceback.

Each of these fails before Ray starts or any model loads."""

import subprocess

from tests.conftest import ROOT, pairs, run_cli, write_jsonl


def cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=120, cwd=cwd)


def assert_user_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    # Refused before Ray started a cluster or joined one (Ray logs either).
    assert "Started a local Ray instance" not in done.stderr
    assert "Connecting to existing Ray cluster" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


def test_bad_seed_files(tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "empty.jsonl").write_text("")
    assert_user_error(cli("run", "--seeds", str(tmp_path / "empty.jsonl"), "--output", out), "empty.jsonl is empty")
    (tmp_path / "seeds.tsv").write_text("a\tb\n")
    assert_user_error(cli("run", "--seeds", str(tmp_path / "seeds.tsv"), "--output", out), "unknown seed file format '.tsv'")
    bad = write_jsonl(tmp_path / "bad.jsonl", [*pairs(2), '{"instruction": "x", "response": 5}', "{oops"])
    assert_user_error(
        cli("run", "--seeds", str(bad), "--output", out, "--max-bad-seeds", "1"),
        "2 bad rows", "max_bad_seeds=1", "bad.jsonl:3: field 'response' must be a string, got int",
        "bad.jsonl:4: malformed JSON",
    )
    assert_user_error(cli("run", "--seeds", str(tmp_path / "missing.jsonl"), "--output", out), "seed file not found")


def test_bad_config_values(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("num_samples: -1\nsampling:\n  temperature: 9\nengine:\n  kind: magic\nbogus: 1\n")
    done = cli("run", "--config", str(config), "--output", str(tmp_path / "out"))
    assert_user_error(
        done, f"invalid config ({config})", "num_samples: Input should be greater than or equal to 1",
        "sampling.temperature: Input should be less than or equal to 2", "engine.kind: Input should be 'vllm', 'openai' or 'custom'",
        "bogus: unknown key",
    )


def test_unwritable_output_fails_fast(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = cli("run", "--output", str(blocker / "out"))
    assert_user_error(done, f"cannot write to output {blocker}/out")


def test_output_that_holds_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()  # a name refed-ray uses for its own folder
    (tmp_path / "data" / "mine.parquet").write_text("mine")
    for force in ([], ["--force-new"]):
        assert_user_error(cli("run", "--output", str(tmp_path), *force),
                          "is not empty and holds no refed-ray run (run.json)")
        assert (tmp_path / "notes.txt").read_text() == (tmp_path / "data" / "mine.parquet").read_text() == "mine"
    assert_user_error(cli("run", "--output", "nosuchproto://bucket/out"), "cannot open output nosuchproto://bucket/out")


def test_engine_settings_checked_before_any_actor(tmp_path):
    out = str(tmp_path / "out")
    assert_user_error(cli("run", "--output", out, "--engine", "openai"),
                      "engine: Value error, engine kind 'openai' needs model")
    assert_user_error(cli("run", "--output", out, "--model", str(tmp_path / "no-such-model")),
                      f"engine.model '{tmp_path}/no-such-model' is not a folder on this machine")
    config = tmp_path / "custom.yaml"
    config.write_text("engine:\n  kind: custom\n  class_path: 'no_such_module:Engine'\n")
    assert_user_error(cli("run", "--output", out, "--config", str(config)),
                      "engine.class_path 'no_such_module:Engine' cannot be imported")


def test_debug_shows_the_traceback(tmp_path):
    done = cli("run", "--debug", "--seeds", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"))
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_export_of_a_folder_without_a_run(tmp_path):
    assert_user_error(cli("export", str(tmp_path)), "holds no refed-ray run")
