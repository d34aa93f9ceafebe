"""refed-ray compare on two fake-teacher runs, with a fake judge whose preferences the test sets."""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from refed_ray.config import RunConfig
from refed_ray.errors import UserError
from refed_ray.cli import main
from refed_ray.experiments.compare import compare, win_rate
from refed_ray.run.pipeline import run
from refed_ray.storage import Storage
from tests.conftest import pairs, run_cli, write_jsonl
from tests.fake_judge import MARK

pytestmark = pytest.mark.usefixtures("local_ray")
TEACHER = {"kind": "custom", "class_path": "tests.fake_judge:MarkedTeacher"}
JUDGE = {"kind": "custom", "class_path": "tests.fake_judge:FakeJudge", "model": "fake-judge"}


def make_run(root, name: str, every: int) -> str:
    """12 samples; the same run seed in every run, so the same instructions; the final responses
    of samples whose refinement seed is divisible by ``every`` carry the mark."""
    config = RunConfig.model_validate({
        "seeds": str(root / "seeds.jsonl"), "output": str(root / name), "num_samples": 12,
        "instructions_per_aspect": 3, "max_extra_units": 0,
        "engine": {**TEACHER, "engine_kwargs": {"marks": {"Refinement": every}}},
        "workers": {"num_engines": 1, "units_per_shard": 2},
    })
    report = run(config)
    assert report["delivered"] == 12
    return config.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_jsonl(root / "seeds.jsonl", pairs(3))
    return make_run(root, "a", 2), make_run(root, "b", 3)


def judge_config(path, calls_log=None, **options) -> str:
    kwargs = {**options, **({"calls_log": str(calls_log)} if calls_log else {})}
    engine = {**JUDGE, "engine_kwargs": kwargs,
              "api": {"prices": {"fake-judge": {"input_per_million": 1.0, "output_per_million": 2.0}}}}
    path.write_text(yaml.safe_dump({"engine": engine, "workers": {"num_engines": 1, "units_per_shard": 5}}))
    return str(path)


def final_responses(output: str) -> dict[tuple[str, int], str]:
    storage = Storage(output)
    manifest = storage.read_json("dataset/_manifest.json")
    table = pa.concat_tables(storage.read_table(f) for f in manifest["files"])
    return {(u, i): r for u, i, r in zip(table["unit_id"].to_pylist(), table["sample_index"].to_pylist(),
                                         table["improved_response"].to_pylist())}


def calls(log) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_compare_counts_the_judges_preferences_and_resumes_without_new_calls(runs, tmp_path):
    a, b = runs
    finals_a, finals_b = final_responses(a), final_responses(b)
    assert finals_a.keys() == finals_b.keys() and len(finals_a) == 12
    marked = [(MARK in finals_a[key], MARK in finals_b[key]) for key in finals_a]
    expected = {"a_wins": marked.count((True, False)), "b_wins": marked.count((False, True))}
    expected["ties"] = 12 - expected["a_wins"] - expected["b_wins"]
    assert expected["a_wins"] and expected["b_wins"] and expected["ties"]  # the runs exercise every case

    log = tmp_path / "judge_calls.log"
    config = judge_config(tmp_path / "judge.yaml", log, prefer_marker=MARK)
    result = compare(a, b, config)
    judge = result["judge"]
    assert result["output"] == f"{a}/compare/b" and result["pairs"] == 12
    assert result["unpaired"] == {"only_a": 0, "only_b": 0, "different_instruction": 0}
    assert {key: judge[key] for key in expected} == expected and judge["rejected"] == 0
    assert judge["win_rate_a"] == round((expected["a_wins"] + expected["ties"] / 2) / 12, 4)
    low, high = judge["ci95"]
    assert 0 <= low < judge["win_rate_a"] < high <= 1
    assert judge["calls"] == 24 == calls(log)  # each pair in both orders
    assert judge["cost"]["total"] == pytest.approx(
        (judge["prompt_tokens"] * 1.0 + judge["completion_tokens"] * 2.0) / 1e6, abs=1e-6)
    for side in ("a", "b"):
        figures = result["runs"][side]
        assert figures["delivered"] == 12 and figures["feedback_calls"] == 4  # 4 units reach 2 references, 2 calls each
        assert figures["per_sample"]["refinement"]["calls"] == 1 and figures["per_sample"]["feedback"]["calls"] == 0.333
        assert figures["diversity"]["distinct_1"] is not None
    assert result["response_lengths"]["a"]["mean"] > 0
    assert json.loads(open(f"{a}/compare/b/compare.json").read()) == result

    again = compare(a, b, config)
    assert calls(log) == 24  # nothing judged twice
    assert again["judge"] == judge

    other = judge_config(tmp_path / "other.yaml", log, always="1")
    with pytest.raises(UserError, match=r"another judging \(judge: .*--force-new"):
        compare(a, b, other)


def test_a_judge_that_always_prefers_the_first_position_yields_only_ties(runs, tmp_path):
    a, b = runs
    result = compare(a, b, judge_config(tmp_path / "judge.yaml", always="1"), output=str(tmp_path / "cmp"))
    judge = result["judge"]
    assert (judge["a_wins"], judge["b_wins"], judge["ties"]) == (0, 0, 12)
    # Wilson's interval: 12 ties say nothing either way, and the interval is wide, not a point.
    assert judge["win_rate_a"] == 0.5 and judge["ci95"] == [0.2538, 0.7462]
    assert (tmp_path / "cmp" / "compare.json").exists()


def test_an_undecided_pair_is_a_counted_reject_not_a_tie(runs, tmp_path):
    a, b = runs
    finals_a, finals_b = final_responses(a), final_responses(b)
    unreadable = sum(MARK in finals_a[key] or MARK in finals_b[key] for key in finals_a)
    config = judge_config(tmp_path / "judge.yaml", prefer_marker="nowhere", invalid_marker=MARK)
    judge = compare(a, b, config, output=str(tmp_path / "cmp"))["judge"]
    assert 0 < unreadable < 12
    assert judge["rejected"] == unreadable and judge["ties"] == 12 - unreadable == judge["judged"]
    (reason,) = judge["reject_reasons"]
    assert reason.startswith("judge: ") and "does not validate" in reason


def test_cli_judges_with_the_teacher_of_a_by_default(runs, tmp_path):
    a, b = runs
    out = tmp_path / "cmp"
    result = run_cli("compare", a, b, "--output", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "refed-ray compare: 12 pairs" in result.stdout and "win rate A" in result.stdout
    assert "not conclusive: too few pairs to conclude anything (12 judged, fewer than 30)" in result.stdout
    judge = json.loads((out / "compare.json").read_text())["judge"]
    assert judge["a_wins"] + judge["b_wins"] + judge["ties"] + judge["rejected"] == 12 and judge["calls"] >= 24
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["judge"]["engine"]["class_path"] == TEACHER["class_path"]


def tree(folder) -> dict[str, str]:
    """Every file under ``folder`` and a digest of its bytes: what a command must leave alone."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def cli(capsys, *args: str) -> tuple[int, str]:
    """The command in this process (its Ray: the module's), and what it printed to stderr."""
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def test_compare_never_writes_over_a_run_whatever_the_flags(runs, tmp_path, capsys):
    a, b = runs
    before = {a: tree(a), b: tree(b)}
    log = tmp_path / "calls.log"
    config = judge_config(tmp_path / "judge.yaml", log, prefer_marker=MARK)
    over_a = {a: "is run A", b: "is run B", str(Path(a).parent): "or a folder above it",
              f"{a}/compare/../dataset": "lies inside run A", f"{b}/rejects": "lies inside run B",
              f"{a}/compare": "lies inside run A", f"{b}/x/..": "is run B"}
    for output, why in over_a.items():
        for flags in ([], ["--force-new"]):
            code, err = cli(capsys, "compare", a, b, "--judge-config", config, "--output", output, *flags)
            assert code == 2 and why in err, (output, err)
    # A folder holding another run (not A's nor B's own) is a run too: never a judge's output.
    other = tmp_path / "other"
    shutil.copytree(a, other, ignore=shutil.ignore_patterns("compare"))
    code, err = cli(capsys, "compare", a, b, "--judge-config", config, "--output", str(other), "--force-new")
    assert code == 2 and "holds a refed-ray run" in err and "even with --force-new" in err, err
    assert {a: tree(a), b: tree(b)} == before and calls(log) == 0

    # B named through "..": the default output is still A/compare/<B's name>, never A itself.
    result = compare(a, f"{b}/dataset/..", config, force_new=True)
    assert result["output"] == f"{a}/compare/b"
    assert {f: d for f, d in tree(a).items() if not f.startswith("compare/")} == {
        f: d for f, d in before[a].items() if not f.startswith("compare/")}
    assert main(["export", a]) == 0


def test_compare_refuses_what_no_other_command_reads(runs, tmp_path, capsys):
    a, b = runs
    log = tmp_path / "calls.log"
    config = judge_config(tmp_path / "judge.yaml", log, prefer_marker=MARK)
    copy = tmp_path / "copy-of-a"
    shutil.copytree(a, copy, ignore=shutil.ignore_patterns("compare"))
    for other in (a, f"{a}/", str(copy)):  # the same folder, or a copy: the same run (its id)
        code, err = cli(capsys, "compare", a, other, "--judge-config", config)
        assert code == 2 and "are the same run" in err, err
    halfway = tmp_path / "halfway"  # B left in the middle of --force-new
    shutil.copytree(b, halfway, ignore=shutil.ignore_patterns("compare"))
    run_json = json.loads((halfway / "run.json").read_text())
    (halfway / "run.json").write_text(json.dumps({**run_json, "discarding": True}))
    code, err = cli(capsys, "compare", a, str(halfway), "--judge-config", config)
    assert code == 2 and "a --force-new that discards the run there was interrupted" in err, err
    judging = f"{a}/compare/b"  # a compare's folder, named as a run
    assert (Path(judging) / "run.json").exists()
    code, err = cli(capsys, "compare", a, judging, "--judge-config", config)
    assert code == 2 and "holds a judge's verdicts" in err, err

    # Two runs of other references: not one pair in common.
    other_root = tmp_path / "other"
    other_root.mkdir()
    write_jsonl(other_root / "seeds.jsonl", pairs(3, prefix="other"))
    unrelated = make_run(other_root, "c", 2)
    code, err = cli(capsys, "compare", a, unrelated, "--judge-config", config)
    assert code == 2 and "have no pair to judge" in err, err
    assert calls(log) == 0 and not Path(f"{a}/compare/c").exists()


def test_refusals_come_before_ray_starts(runs, tmp_path):
    a, _ = runs
    done = run_cli("compare", a, a, timeout=120)
    assert done.returncode == 2 and "are the same run" in done.stderr and "Traceback" not in done.stderr
    assert "Started a local Ray instance" not in done.stderr


def test_the_interval_is_never_a_point_at_small_n():
    rate, (low, high) = win_rate(2, 0, 0)  # two pairs, both A's: the normal approximation said 100% to 100%
    assert rate == 1.0 and low < 0.4 and high == 1.0
    rate, (low, high) = win_rate(0, 2, 0)
    assert rate == 0.0 and low == 0.0 and high > 0.6
    assert win_rate(80, 20, 0)[1] == [0.7112, 0.8666]  # Wilson's, by hand


def test_after_a_top_up_of_both_runs_only_the_new_pairs_are_judged(runs, tmp_path):
    """Copies of A and B (their run ids kept), compared, then both topped up from 12 to 18
    samples: the next compare judges the 6 new pairs only, and counts each pair once."""
    from refed_ray.config import run_config

    copies = [str(tmp_path / name) for name in ("a", "b")]
    for run_output, copy in zip(runs, copies):
        shutil.copytree(run_output, copy, ignore=shutil.ignore_patterns("compare"))
    log = tmp_path / "calls.log"
    config = judge_config(tmp_path / "judge.yaml", log, prefer_marker=MARK)
    assert compare(*copies, config)["judge"]["judged"] == 12 and calls(log) == 24
    for copy in copies:
        grown = run_config(Storage(copy)).model_copy(update={"output": copy, "num_samples": 18})
        assert run(grown)["delivered"] == 18
    result = compare(*copies, config)
    assert result["pairs"] == 18 and calls(log) == 24 + 12
    judge = result["judge"]
    assert judge["judged"] == 18 == judge["a_wins"] + judge["b_wins"] + judge["ties"]
