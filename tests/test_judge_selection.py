"""Selection by judge: a sample is kept when the judge prefers its improved response in both orders."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from refed_ray.cli import main
from refed_ray.config import RunConfig
from refed_ray.experiments.select import select
from refed_ray.experiments.selections.judge import SelectionContext, judge_improvements
from refed_ray.run.pipeline import run
from refed_ray.storage import Storage
from tests.conftest import pairs, write_jsonl
from tests.fake_judge import MARK

pytestmark = pytest.mark.usefixtures("local_ray")
COLUMNS = ["unit_id", "sample_index", "instruction", "response", "improved_response"]


@pytest.fixture(scope="module")
def marked_run(tmp_path_factory):
    """12 samples whose improved responses carry the mark when their refinement seed is even, and
    whose original responses carry it when their response seed is divisible by 3."""
    root = tmp_path_factory.mktemp("run")
    config = RunConfig.model_validate({
        "seeds": str(write_jsonl(root / "seeds.jsonl", pairs(2))), "output": str(root / "out"),
        "num_samples": 12, "instructions_per_aspect": 3, "max_extra_units": 0,
        "engine": {"kind": "custom", "class_path": "tests.fake_judge:MarkedTeacher",
                   "engine_kwargs": {"marks": {"Refinement": 2, "SynthesizedResponse": 3}}},
        "workers": {"num_engines": 1, "units_per_shard": 2},
    })
    assert run(config)["delivered"] == 12
    storage = Storage(config.output)
    manifest = storage.read_json("dataset/_manifest.json")
    return config, pa.concat_tables(storage.read_table(f, columns=COLUMNS) for f in manifest["files"])


def context(config, tmp_path, calls_log, name="judge-4", **options) -> SelectionContext:
    judge = tmp_path / f"{name}.yaml"
    judge.write_text(yaml.safe_dump({"engine": {
        "kind": "custom", "class_path": "tests.fake_judge:FakeJudge",
        "engine_kwargs": {"calls_log": str(calls_log), **options}}}))
    run_storage = Storage(config.output)
    return SelectionContext(selection=Storage(f"{config.output}/selected/{name}"), run=run_storage, config=config,
                            judge_config=str(judge), seed=0)


def test_keeps_the_first_samples_whose_improved_response_wins_both_orders(marked_run, tmp_path):
    config, samples = marked_run
    rows = samples.to_pylist()
    better = [MARK in r["improved_response"] and MARK not in r["response"] for r in rows]
    worse = [MARK in r["response"] and MARK not in r["improved_response"] for r in rows]
    assert sum(better) > 2 and any(worse) and not all(b or w for b, w in zip(better, worse))
    log = tmp_path / "calls.log"
    size = sum(better) - 1

    decisions = judge_improvements(samples, size, context(config, tmp_path, log, prefer_marker=MARK))
    assert decisions.schema.names == ["unit_id", "sample_index", "keep", "reason"]
    keys = ["unit_id", "sample_index"]
    assert decisions.select(keys).to_pylist() == samples.select(keys).to_pylist()
    first_better = [i for i, b in enumerate(better) if b][:size]
    assert [i for i, keep in enumerate(decisions["keep"].to_pylist()) if keep] == first_better
    reasons = decisions["reason"].to_pylist()
    for i, reason in enumerate(reasons):
        if better[i]:
            assert reason.startswith("improved response won both orders")
        elif worse[i]:
            assert reason == "original response won both orders"
        else:
            assert reason.startswith("tie")
    (over,) = [r for i, r in enumerate(reasons) if better[i] and i not in first_better]
    assert over.endswith(f"beyond the first {size}")
    assert len(log.read_text().splitlines()) == 24  # every sample in both orders

    again = judge_improvements(samples, size, context(config, tmp_path, log, prefer_marker=MARK))
    assert again.equals(decisions) and len(log.read_text().splitlines()) == 24  # resumed: no new call
    # Another judge over the same selection judges afresh, in a folder of its own, not refused.
    biased = judge_improvements(samples, size, context(config, tmp_path, log, always="1"))
    assert not any(biased["keep"].to_pylist()) and len(log.read_text().splitlines()) == 48
    assert len(Storage(f"{config.output}/selected/judge-4/judge").subfolders("")) == 2


def test_a_judge_with_a_position_bias_keeps_nothing(marked_run, tmp_path):
    config, samples = marked_run
    decisions = judge_improvements(samples, 12, context(config, tmp_path, tmp_path / "log", "judge-12", always="2"))
    assert not any(decisions["keep"].to_pylist())
    assert set(decisions["reason"].to_pylist()) == {"tie: the judge's two orders disagreed"}


def test_select_judge_writes_a_selection_with_its_judge_calls_counted_and_resumes(marked_run, tmp_path):
    """``refed-ray select --method judge`` end to end: the selection folder holds the kept rows with
    their reasons, _selection.json counts the judge's calls, and the same command again reuses it."""
    from refed_ray.data.export import export
    from refed_ray.data.selected import read_selection
    from refed_ray.experiments.select import select

    config, samples = marked_run
    rows = samples.to_pylist()
    better = sum(MARK in r["improved_response"] and MARK not in r["response"] for r in rows)
    log = tmp_path / "calls.log"
    judge = context(config, tmp_path, log, "judge-3", prefer_marker=MARK).judge_config

    summary = select(config.output, "judge", 3, judge_config=judge)
    assert (summary["kept"], summary["reused"]) == (min(3, better), False)
    assert summary["stats"]["calls"] == 24 == len(log.read_text().splitlines())
    storage = Storage(config.output)
    assert storage.read_json("selected/judge-3/_selection.json")["stats"]["calls"] == 24
    kept = pa.concat_tables(storage.read_table(f) for f in read_selection(storage, "judge-3")["files"])
    assert kept.num_rows == summary["kept"]
    assert all(r.startswith("improved response won both orders") for r in kept["selection_reason"].to_pylist())
    assert all(MARK in r for r in kept["improved_response"].to_pylist())

    assert select(config.output, "judge", 3, judge_config=judge)["reused"] is True
    assert len(log.read_text().splitlines()) == 24  # no new judge call
    path, rows = export(config.output, "jsonl", selection="judge-3")
    assert rows == summary["kept"] and path.endswith("export/judge-3/jsonl.jsonl")


def verdict_rows(selection: Storage) -> list[str]:
    """The pair ids of every verdict file under the selection's judge roots, duplicates included."""
    root = Path(selection.uri) / "judge"
    return [p for f in sorted(root.glob("*/data/*.parquet")) for p in pq.read_table(f)["pair_id"].to_pylist()]


def test_a_top_up_judges_only_the_new_samples(tmp_path, capsys):
    """12 samples judged, 6 added by a top-up (their units may sort anywhere in the dataset): the
    next selection judges the 6 new samples only, and holds one verdict per sample."""
    config = RunConfig.model_validate({
        "seeds": str(write_jsonl(tmp_path / "seeds.jsonl", pairs(3))), "output": str(tmp_path / "out"),
        "num_samples": 12, "instructions_per_aspect": 3, "max_extra_units": 0,
        "engine": {"kind": "custom", "class_path": "tests.fake_judge:MarkedTeacher",
                   "engine_kwargs": {"marks": {"Refinement": 2}}},
        "workers": {"num_engines": 1, "units_per_shard": 2},
    })
    assert run(config)["delivered"] == 12
    log = tmp_path / "calls.log"
    judge = context(config, tmp_path, log, prefer_marker=MARK).judge_config
    selection = Storage(f"{config.output}/selected/judge-30")

    # Settings a judge refuses are refused before anything is judged or written.
    assert main(["select", config.output, "--method", "judge", "--size", "30", "--seed", "-1"]) == 2
    assert "seed: Input should be greater than or equal to 0" in capsys.readouterr().err
    assert not Path(selection.uri).exists()

    assert select(config.output, "judge", 30, judge_config=judge)["stats"]["calls"] == 24
    assert run(config.model_copy(update={"num_samples": 18}))["delivered"] == 18
    summary = select(config.output, "judge", 30, judge_config=judge)
    assert summary["samples"] == 18 and len(log.read_text().splitlines()) == 24 + 12
    ids = verdict_rows(selection)
    assert len(ids) == len(set(ids)) == 18
