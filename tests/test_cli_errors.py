"""Bad input through the real CLI: a clear message naming what and where, exit 2, no traceback.

Each of these fails before Ray starts or any model loads."""

import subprocess
from pathlib import Path

import yaml

from tests.conftest import FAKE_ENGINE, ROOT, free_port, pairs, run_cli, write_jsonl


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


def tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def in_process(capsys, *args: str) -> tuple[int, str]:
    """The command in this process: its exit code and stderr (Ray must not start: checked after)."""
    import ray

    from refed_ray.cli import main

    capsys.readouterr()
    code = main(list(args))
    err = capsys.readouterr().err
    assert not ray.is_initialized(), f"{args} started Ray"
    assert "Traceback" not in err
    return code, err


# A judge's folder (a compare's or a selection's verdicts) and run.json files refed-ray never writes.
NOT_A_RUN = {
    "judging": ('{"run_id": "j1", "fingerprint": {"judged": {}, "judge": {}}, "settings": {}}',
                "holds a judge's verdicts (a compare's or a selection's), not a refed-ray run"),
    "truncated": ('{"run_id": "ab12", "fingerp', "run.json is not valid JSON"),
    "list": ("[]", "run.json holds list, not refed-ray's run record"),
    "no-config": ('{"run_id": "ab12", "fingerprint": {}}', "run.json lacks the run's config"),
}


def test_commands_pointed_at_what_is_not_a_run(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"engine": FAKE_ENGINE, "num_samples": 4}))
    for name, (content, why) in NOT_A_RUN.items():
        folder = tmp_path / name
        (folder / "data").mkdir(parents=True)
        (folder / "run.json").write_text(content)
        (folder / "data" / "verdicts.parquet").write_text("kept")
        before = tree(folder)
        for command in (["status", str(folder)], ["select", str(folder), "--method", "random", "--size", "2"],
                        ["export", str(folder)], ["run", "--config", str(config), "--output", str(folder)],
                        ["run", "--config", str(config), "--output", str(folder), "--force-new"],
                        ["plan", "--config", str(config), "--output", str(folder)]):
            code, err = in_process(capsys, *command)
            assert code == 2 and why in err and str(folder) in err, (command, err)
            assert tree(folder) == before, command  # nothing written, nothing discarded


def test_a_selection_name_is_never_a_path(tmp_path, capsys):
    run = tmp_path / "runs" / "a"
    (run / "dataset").mkdir(parents=True)
    (run / "dataset" / "_manifest.json").write_text("{}")
    before = tree(tmp_path)
    for name in ("../dataset", "../../../other/B/dataset", "judge-3/../../dataset", "/tmp/x", "judge-0", "Judge-3"):
        code, err = in_process(capsys, "export", str(run), "--selection", name)
        assert code == 2 and f"selection {name!r} is not a selection name: names are METHOD-N" in err, err
    assert tree(tmp_path) == before


def test_select_checks_the_judge_settings_before_anything(tmp_path, capsys):
    (tmp_path / "judge.d").mkdir()
    code, err = in_process(capsys, "select", str(tmp_path / "out"), "--method", "judge", "--size", "3",
                           "--seed", "-1")
    assert code == 2 and "--seed" in err and "seed: Input should be greater than or equal to 0" in err, err
    code, err = in_process(capsys, "select", str(tmp_path / "out"), "--method", "judge", "--size", "3",
                           "--judge-config", str(tmp_path / "judge.d"))
    assert code == 2 and f"judge config {tmp_path}/judge.d is a directory" in err, err
    code, err = in_process(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"),
                           "--judge-config", str(tmp_path / "judge.d"))
    assert code == 2 and "is a directory" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge.d"]


def test_object_store_without_credentials(tmp_path, capsys, monkeypatch):
    """No credentials anywhere (the client would sign requests to this unused local port)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for command in (["status", "s3://bucket/out"], ["compare", "s3://bucket/a", "s3://bucket/b"]):
        code, err = in_process(capsys, *command)
        assert code == 2 and "no credentials to read or write s3://bucket/" in err, err
        assert "NoCredentialsError" in err and len(err.strip().splitlines()) == 1, err
