"""``refed-ray select``: the ROUGE-L and random selections, exact, deterministic, resumable, and
exportable; the selection written in the dataset's layout."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from refed_ray.experiments import select as select_module
from refed_ray.config import RunConfig
from refed_ray.data.selected import read_selection
from refed_ray.errors import UserError
from refed_ray.experiments.select import Method, SelectionContext, select
from refed_ray.experiments.selections.random_subset import random_subset
from refed_ray.experiments.selections.rougel import greedy_selection, lcs_length, rougel_diversity, tokens
from refed_ray.storage import Storage
from tests.conftest import FAKE_ENGINE, pairs, run_cli, write_jsonl

WORDS = "the a of to explain write list why how data model train code river stone light fast slow".split()


def lcs_by_table(a: list[str], b: list[str]) -> int:
    """The textbook LCS table, to check the bit-parallel one against."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def brute_rouge_l(a: list[str], b: list[str]) -> float:
    return 2 * lcs_by_table(a, b) / (len(a) + len(b)) if a and b else 0.0


def brute_greedy(texts: list[list[str]], size: int, threshold: float) -> list[bool]:
    """The selection by its definition: every candidate against every instruction selected."""
    chosen: list[list[str]] = []
    keep = []
    for text in texts:
        ok = len(chosen) < size and all(brute_rouge_l(text, other) < threshold for other in chosen)
        keep.append(ok)
        if ok:
            chosen.append(text)
    return keep


def near_duplicates(count: int, rng: random.Random) -> list[list[str]]:
    """Instructions of which half are edits (a few words inserted, deleted, replaced) of earlier ones."""
    texts: list[list[str]] = []
    for _ in range(count):
        if texts and rng.random() < 0.5:
            text = list(rng.choice(texts))
            for _ in range(rng.randint(0, 4)):
                edit = rng.random()
                if edit < 0.4 and text:
                    text.pop(rng.randrange(len(text)))
                elif edit < 0.8:
                    text.insert(rng.randint(0, len(text)), rng.choice(WORDS))
                elif text:
                    text[rng.randrange(len(text))] = rng.choice(WORDS)
        else:
            text = [rng.choice(WORDS) for _ in range(rng.randint(0, 16))]
        texts.append(text)
    return texts


def context(**fields) -> SelectionContext:
    storage = Storage("/nonexistent")
    return SelectionContext(selection=storage, run=storage, config=RunConfig(), **fields)


def samples_of(instructions: list[str]) -> pa.Table:
    return pa.table({"unit_id": [f"u{i // 3}" for i in range(len(instructions))],
                     "sample_index": [i % 3 for i in range(len(instructions))], "instruction": instructions})


# ---- the methods, without Ray ---------------------------------------------------------------


def test_bit_parallel_lcs_matches_the_table():
    rng = random.Random(3)
    for _ in range(2000):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        assert lcs_length(a, b) == lcs_by_table(a, b)


def test_rougel_tokens_are_rouge_scores():
    assert tokens("Explain, in 3 steps: how Rivers form!") == ["explain", "in", "3", "steps", "how", "rivers", "form"]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.85, 1.0])
def test_the_prefix_filter_selects_exactly_what_comparing_every_pair_selects(threshold):
    rng = random.Random(int(threshold * 100))
    texts = near_duplicates(400, rng)
    keys = [str(i) for i in range(len(texts))]
    for size in (len(texts), 25):
        keep, _ = greedy_selection(texts, size, threshold, keys)
        assert keep == brute_greedy(texts, size, threshold)
    kept = [t for t, k in zip(texts, greedy_selection(texts, len(texts), threshold, keys)[0]) if k]
    assert 0 < len(kept) < len(texts)  # near-duplicates were dropped, the rest kept
    assert all(brute_rouge_l(a, b) < threshold for i, a in enumerate(kept) for b in kept[i + 1:])


def test_rougel_reasons_name_the_instruction_met():
    instructions = ["Explain how rivers form.", "explain how rivers form!", "Write a poem about a stone.",
                    "Explain how rivers form deltas.", "List three fast trains.", "Describe the light."]
    decisions = rougel_diversity(samples_of(instructions), 3, context(threshold=0.7)).to_pylist()
    assert [d["keep"] for d in decisions] == [True, False, True, False, True, False]
    reasons = [d["reason"] for d in decisions]
    assert reasons[0] == "the first instruction selected"
    assert reasons[1] == "ROUGE-L F 1.00 >= 0.7 with u0#0"
    assert reasons[2] == "ROUGE-L F below 0.7 against all 1 selected so far (none shares enough words to come near)"
    assert reasons[3] == "ROUGE-L F 0.89 >= 0.7 with u0#0"  # 2 * 4 / (4 + 5)
    assert reasons[4].startswith("ROUGE-L F below 0.7 against all 2 selected so far")
    assert reasons[5] == "size 3 reached"
    assert [(d["unit_id"], d["sample_index"]) for d in decisions] == [(f"u{i // 3}", i % 3) for i in range(6)]


def test_random_subset_is_seeded_and_independent_of_the_order():
    table = samples_of([f"instruction {i}" for i in range(300)])
    first = random_subset(table, 40, context(seed=7))
    kept = {(d["unit_id"], d["sample_index"]) for d in first.to_pylist() if d["keep"]}
    assert len(kept) == 40 and random_subset(table, 40, context(seed=7)).equals(first)
    shuffled = table.take(list(reversed(range(table.num_rows))))
    assert {(d["unit_id"], d["sample_index"]) for d in random_subset(shuffled, 40, context(seed=7)).to_pylist()
            if d["keep"]} == kept
    other = {(d["unit_id"], d["sample_index"]) for d in random_subset(table, 40, context(seed=8)).to_pylist() if d["keep"]}
    assert other != kept
    assert {d["reason"] for d in first.to_pylist() if d["keep"]} == {"random subset (seed 7)"}
    assert {d["reason"] for d in first.to_pylist() if not d["keep"]} == {"not drawn in the random subset of 40 (seed 7)"}


def test_a_method_that_cannot_be_imported_is_not_available(tmp_path, monkeypatch):
    monkeypatch.setitem(select_module.METHODS, "judge", Method("refed_ray.filters.no_such_module:judge", ()))
    with pytest.raises(UserError, match="the judge selection is not available in this installation"):
        select(str(tmp_path / "out"), "judge", 10)


def test_a_threshold_is_refused_where_it_does_not_apply(tmp_path):
    with pytest.raises(UserError, match="--threshold does not apply to the random selection"):
        select(str(tmp_path / "out"), "random", 10, threshold=0.5)
    with pytest.raises(UserError, match=r"--threshold must be in \(0, 1\]"):
        select(str(tmp_path / "out"), "rougel", 10, threshold=1.5)


# ---- on a run's output ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def output(tmp_path_factory, local_ray):
    """A fake-teacher run of 24 samples whose instructions repeat across rounds (near-duplicates
    ROUGE-L drops), dedup off so that they reach the dataset."""
    from refed_ray.run.pipeline import run

    folder = tmp_path_factory.mktemp("select")
    seeds = write_jsonl(folder / "seeds.jsonl", pairs(2))
    run(RunConfig.model_validate({
        "seeds": str(seeds), "output": str(folder / "out"), "num_samples": 24, "instructions_per_aspect": 3,
        "engine": {**FAKE_ENGINE, "engine_kwargs": {"repeat_instructions": True}},
        "workers": {"num_engines": 1, "units_per_shard": 2}, "dedup": {"enabled": False},
    }))
    return str(folder / "out")


def selected_rows(storage: Storage, name: str) -> list[dict]:
    return [row for f in read_selection(storage, name)["files"] for row in storage.read_table(f).to_pylist()]


def test_a_rougel_selection_is_written_in_the_dataset_layout(output):
    storage = Storage(output)
    summary = select(output, "rougel", 10)
    rows = selected_rows(storage, "rougel-10")
    dataset = [row for f in storage.read_json("dataset/_manifest.json")["files"] for row in storage.read_table(f).to_pylist()]
    decisions = storage.read_table(read_selection(storage, "rougel-10")["decisions"]).to_pylist()

    assert len(decisions) == len(dataset) == summary["samples"] == 24
    assert summary["kept"] == len(rows) == sum(d["keep"] for d in decisions) and summary["reused"] is False
    # Each unit's last instruction repeats its first, and round 1 repeats round 0 (the fake
    # teacher's repeat_instructions): 2 of each of round 0's 4 units qualify, 8 of the 10 asked for.
    assert summary["kept"] == 8 and summary["dropped"] == 16
    assert summary["shortfall"].startswith("8 of the 10 samples asked for qualified (of 24 in the dataset)")
    # Each row is the dataset's row plus its reason; the kept ones are the decisions' keeps, in dataset order.
    by_key = {(r["unit_id"], r["sample_index"]): r for r in dataset}
    assert [(r["unit_id"], r["sample_index"]) for r in rows] == [(d["unit_id"], d["sample_index"]) for d in decisions if d["keep"]]
    assert all({k: v for k, v in r.items() if k != "selection_reason"} == by_key[(r["unit_id"], r["sample_index"])] for r in rows)
    assert [r["selection_reason"] for r in rows] == [d["reason"] for d in decisions if d["keep"]]
    assert all(re.fullmatch(r"ROUGE-L F 0\.9\d >= 0\.7 with \w+#[0-2]", d["reason"]) for d in decisions if not d["keep"])
    kept = [tokens(r["instruction"]) for r in rows]
    assert all(brute_rouge_l(a, b) < 0.7 for i, a in enumerate(kept) for b in kept[i + 1:])
    assert {**storage.read_json("selected/rougel-10/_selection.json"), "reused": False} == summary
    # A directory reader of the selection takes its rows only (the decisions live in a "_" folder).
    folder = pads.dataset(storage.path("selected/rougel-10"), format="parquet")
    assert folder.count_rows() == len(rows) and "selection_reason" in folder.schema.names


def test_a_selection_is_deterministic_resumed_and_recomputed_when_the_dataset_changes(output, monkeypatch):
    storage = Storage(output)
    first = select(output, "random", 7, seed=3)
    kept = selected_rows(storage, "random-7")
    assert len(kept) == 7 and {r["selection_reason"] for r in kept} == {"random subset (seed 3)"}

    random_method = select_module.METHODS["random"]
    monkeypatch.setitem(select_module.METHODS, "random", dataclasses.replace(random_method, decide=f"{__name__}:refuse_to_decide"))
    again = select(output, "random", 7, seed=3)  # reused: the method is not even called
    assert again["reused"] is True and {**again, "reused": False} == first
    monkeypatch.undo()

    storage.delete("dataset/_manifest.json")  # the dataset is written again: a new generation
    recomputed = select(output, "random", 7, seed=3)
    assert recomputed["reused"] is False and recomputed["dataset_generation"] != first["dataset_generation"]
    assert selected_rows(storage, "random-7") == kept  # the same subset: deterministic
    generations = [f for f in storage.subfolders("selected/random-7") if "gen-" in f]
    assert generations == [f"selected/random-7/{read_selection(storage, 'random-7')['generation']}"]
    assert len(storage.list("selected/random-7/_decisions")) == 1  # the previous decisions are gone

    reseeded = select(output, "random", 7, seed=4)  # another setting: computed again
    assert reseeded["reused"] is False and selected_rows(storage, "random-7") != kept


def refuse_to_decide(samples, size, context):
    raise AssertionError("a committed selection was computed again")


def test_a_short_selection_exits_4_and_exports_what_qualified(output, tmp_path):
    done = run_cli("select", output, "--method", "random", "--size", "100", timeout=300)
    assert done.returncode == 4, done.stderr
    assert "24 of the 100 samples asked for qualified" in done.stderr
    from refed_ray.data.export import export

    target, count = export(output, "jsonl", selection="random-100")
    assert count == 24 and target.endswith("export/random-100/jsonl.jsonl")
    lines = [json.loads(line) for line in open(target)]
    rows = selected_rows(Storage(output), "random-100")
    assert lines == [{"instruction": r["instruction"], "response": r["improved_response"]} for r in rows]
    with pytest.raises(UserError, match="holds no selection 'rougel-99'.*selections there: .*random-100"):
        export(output, "jsonl", selection="rougel-99")
