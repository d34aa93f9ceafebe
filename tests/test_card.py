"""The dataset card (OUTPUT/dataset/README.md) and the messages export, read by Hugging Face ``datasets``."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import yaml

from refed_ray.config import RunConfig
from refed_ray.data.card import size_category
from refed_ray.data.dataset import read_manifest
from refed_ray.data.export import export
from refed_ray.run.pipeline import run
from refed_ray.storage import Storage
from tests.conftest import FAKE_ENGINE, committed_tables, pairs, run_cli, write_jsonl

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def deduplicated(tmp_path_factory, local_ray):
    """A finished run whose teacher repeats itself: dedup drops samples that data/ keeps, so the
    dataset (18 rows) is not data/ (and the run ends short of its 24: the top-up budget runs out)."""
    root = tmp_path_factory.mktemp("card")
    seeds = write_jsonl(root / "seeds.jsonl", pairs(3))
    config = RunConfig.model_validate({
        "seeds": str(seeds), "output": str(root / "out"), "num_samples": 24, "instructions_per_aspect": 4,
        "engine": {**FAKE_ENGINE, "engine_kwargs": {"repeat_instructions": True}},
        "workers": {"num_engines": 1, "units_per_shard": 2},
    })
    report = run(config)
    storage = Storage(str(root / "out"))
    return SimpleNamespace(out=root / "out", storage=storage, report=report, seeds=seeds)


def header_and_body(path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def delivered_rows(storage: Storage) -> list[dict]:
    return [row for name in read_manifest(storage)["files"] for row in storage.read_table(name).to_pylist()]


def load(*args, cache, **kwargs):
    from datasets import load_dataset

    return load_dataset(*args, split="train", cache_dir=str(cache), **kwargs)


def test_the_card_header_parses_and_its_counts_are_the_reports(deduplicated):
    header, body = header_and_body(deduplicated.out / "dataset" / "README.md")
    report, storage = deduplicated.report, deduplicated.storage
    files = read_manifest(storage)["files"]

    assert header["license"] == "other" and header["task_categories"] == ["text-generation"]
    assert header["size_categories"] == ["n<1K"]
    assert header["configs"] == [{"config_name": "default", "default": True, "data_files": [
        {"split": "train", "path": [name.removeprefix("dataset/") for name in files]}]}]

    dedup = report["deduplicated"]
    assert report["delivered"] == 18 and dedup["in_unit"] > 0 and dedup["across_units"] > 0
    digest = storage.read_json("run.json")["fingerprint"]["references"]
    for expected in (
        f"| Delivered (this dataset) | {report['delivered']} |",
        f"| Planned | {report['plan']['planned_samples']} |",
        f"| Rejected (planned samples lost) | {report['rejected_samples']} |",
        f"| Near-duplicates removed | {dedup['total']} ({dedup['in_unit']} in their unit, "
        f"{dedup['across_units']} across units;",
        f"| References | 3 used of 3 usable (0 seed rows skipped) |",
        f"| Reference source | `{deduplicated.seeds}` |",
        f"| Reference set digest | `{digest}`",
        f"| Teacher model | `{report['model']}` |",
        f"distinct-1 {report['quality']['distinct_1']}",
        'load_dataset("' + str(deduplicated.out / "dataset") + '", split="train")',
        "@inproceedings{mehri-etal-2026-beyond",
    ):
        assert expected in body, expected
    for reason, count in report["rejects"]["by_reason"].items():
        stage, _, why = reason.partition(": ")
        assert f"| {stage} | {why.replace('|', chr(92) + '|')} | {count} |" in body


def test_size_categories_are_the_hubs_buckets():
    assert [size_category(n) for n in (0, 999, 1_000, 99_999, 100_000, 1_000_000, 10**13)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "n>1T"]


def test_datasets_loads_exactly_the_delivered_rows(deduplicated, tmp_path):
    storage = deduplicated.storage
    expected = sorted((r["unit_id"], r["sample_index"]) for r in delivered_rows(storage))
    in_data = sum(t.num_rows for t in committed_tables(storage, "data"))
    assert len(expected) == deduplicated.report["delivered"] < in_data  # dedup's drops are not delivered

    by_folder = load("parquet", data_dir=str(deduplicated.out / "dataset" / "data"), cache=tmp_path / "a")
    assert sorted(zip(by_folder["unit_id"], by_folder["sample_index"])) == expected
    # The folder as the Hub reads it once uploaded: through the card's `configs`.
    by_card = load(str(deduplicated.out / "dataset"), cache=tmp_path / "b")
    assert sorted(zip(by_card["unit_id"], by_card["sample_index"])) == expected


def test_the_messages_export_has_one_user_and_one_assistant_turn_per_row(deduplicated, tmp_path):
    target, count = export(str(deduplicated.out), "messages", str(tmp_path / "messages.jsonl"))
    rows = load("json", data_files=target, cache=tmp_path / "cache")
    pairs_delivered = sorted((r["instruction"], r["improved_response"]) for r in delivered_rows(deduplicated.storage))
    assert rows.num_rows == count == deduplicated.report["delivered"]
    assert all([turn["role"] for turn in row] == ["user", "assistant"] for row in rows["messages"])
    assert sorted((row[0]["content"], row[1]["content"]) for row in rows["messages"]) == pairs_delivered
    assert set(json.loads(open(target).readline())) == {"messages"}


def delivered_keys(storage: Storage) -> list[tuple[str, int]]:
    return sorted((r["unit_id"], r["sample_index"]) for r in delivered_rows(storage))


def test_every_reader_the_card_names_reads_exactly_the_delivered_rows(deduplicated, tmp_path):
    """pandas, pyarrow.dataset, Ray Data, DuckDB and Hugging Face datasets, each as the card's
    "How to load" tells a user to call it."""
    import duckdb
    import pandas
    import pyarrow.dataset
    import ray

    folder = deduplicated.out / "dataset"
    expected = delivered_keys(deduplicated.storage)
    _, body = header_and_body(folder / "README.md")
    calls = [f'pandas.read_parquet("{folder}/data")', f'pyarrow.dataset.dataset("{folder}/data")',
             f'ray.data.read_parquet("{folder}/data")', f"read_parquet('{folder}/data/gen-*/*.parquet')",
             f'load_dataset("{folder}", split="train")']
    assert all(call in body for call in calls), body

    def keys(table) -> list[tuple[str, int]]:
        return sorted(zip(table["unit_id"], table["sample_index"]))

    assert keys(pandas.read_parquet(f"{folder}/data")) == expected
    assert keys(pyarrow.dataset.dataset(f"{folder}/data").to_table().to_pydict()) == expected
    assert keys(ray.data.read_parquet(f"{folder}/data").to_pandas()) == expected
    rows = duckdb.sql(f"select unit_id, sample_index from read_parquet('{folder}/data/gen-*/*.parquet')").fetchall()
    assert sorted(rows) == expected
    assert keys(load(str(folder), cache=tmp_path / "hf")) == expected


def test_the_card_follows_the_dataset_into_a_new_generation(deduplicated, tmp_path):
    """An export that compacts the dataset again (here: its manifest made stale, as shards
    committed after it would) writes the new generation's card: the folder still loads."""
    out = tmp_path / "out"
    shutil.copytree(deduplicated.out, out)
    storage = Storage(str(out))
    before = read_manifest(storage)
    storage.write_json("dataset/_manifest.json", {**before, "digest": "stale"})

    result = run_cli("export", str(out), "--format", "jsonl", timeout=300)
    assert result.returncode == 0, result.stderr
    after = read_manifest(storage)
    assert after["generation"] != before["generation"] and not (out / before["files"][0]).exists()
    header, _ = header_and_body(out / "dataset" / "README.md")
    assert header["configs"][0]["data_files"][0]["path"] == [f.removeprefix("dataset/") for f in after["files"]]
    loaded = load(str(out / "dataset"), cache=tmp_path / "hf")
    assert sorted(zip(loaded["unit_id"], loaded["sample_index"])) == delivered_keys(deduplicated.storage)


def test_a_run_of_no_rows_has_no_card_and_parquet_readers_read_no_rows(tmp_path):
    import pandas

    out, config = tmp_path / "out", tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "seeds": str(write_jsonl(tmp_path / "seeds.jsonl", pairs(1))), "output": str(out), "num_samples": 2,
        "instructions_per_aspect": 2, "max_extra_units": 0, "sampling": {"max_attempts": 1},
        "engine": {**FAKE_ENGINE, "engine_kwargs": {"invalid_rate": {"InstructionList": 1.0}}},
        "workers": {"num_engines": 1},
    }))
    result = run_cli("run", "--config", str(config), timeout=300)
    assert result.returncode == 4, result.stderr  # short: nothing delivered
    assert json.loads((out / "report.json").read_text())["delivered"] == 0
    assert not (out / "dataset" / "README.md").exists()
    assert len(pandas.read_parquet(out / "dataset" / "data")) == 0
