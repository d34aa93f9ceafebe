"""OUTPUT/dataset/README.md: the dataset card, in the Hugging Face Hub's format.

A YAML header (license placeholder, task categories, size category, ``configs`` naming the
dataset's Parquet files) and what the data is, how it was made and how to load it, with the
counts, lengths and diversity figures of report.json. Part of the dataset's commit: every
compaction writes the card of its generation before committing it (``dataset.compact_dataset``),
from that generation's manifest, so the card always names files that exist; the end of a run
(and ``refed-ray report``) writes it again with the run's report. Until a run has a report, the
card says so and how to load the data. A dataset of no rows has no card: there is nothing to
load, and Hugging Face ``datasets`` refuses an empty split. ``dataset/`` can be uploaded as it is
(``hf upload NAME OUTPUT/dataset . --repo-type dataset``, README, "The dataset card").
"""

from __future__ import annotations

import posixpath
from importlib.resources import files
from string import Template
from typing import Any

import yaml

from refed_ray.config import run_config
from refed_ray.storage import Storage

CARD = "dataset/README.md"
LENGTH_ROWS = ("instruction", "reference_instruction", "response", "improved_response", "reference_response")
# The Hub's size buckets (its `size_categories` values), by upper bound.
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
                   (10**11, "10B<n<100B"), (10**12, "100B<n<1T")]


def write_card(storage: Storage, manifest: dict[str, Any], report: dict[str, Any] | None = None,
               only_if_changed: bool = False) -> str | None:
    """Write the card of the generation ``manifest`` names, with ``report`` (report.json's
    content; by default the one in OUTPUT, if any); none, and any earlier one deleted, when the
    generation has no rows. Returns its path in OUTPUT, or None."""
    if not manifest["rows"]:
        if storage.exists(CARD):
            storage.delete(CARD)
        return None
    if report is None and storage.exists("report.json"):
        report = storage.read_json("report.json")
    text = card_text(storage, manifest, report).encode()
    if not (only_if_changed and storage.exists(CARD) and storage.read_bytes(CARD) == text):
        storage.write_bytes(CARD, text)
    return CARD


def card_text(storage: Storage, manifest: dict[str, Any], report: dict[str, Any] | None) -> str:
    title = _title(report["model"] if report else _teacher(storage))
    header = yaml.safe_dump(card_header(manifest, title), sort_keys=False, allow_unicode=True)
    if report is None:
        return f"---\n{header}---\n\n{_unfinished(storage, manifest, title)}"
    # The generation's own row count: a later compaction (an export after a crash) may differ from the report's.
    report = {**report, "delivered": manifest["rows"]}
    body = Template((files("refed_ray") / "templates" / "dataset_card.md").read_text(encoding="utf-8"))
    return f"---\n{header}---\n\n{body.substitute(_values(storage, report, title))}"


def card_header(manifest: dict[str, Any], title: str) -> dict[str, Any]:
    # One config. The messages export is not a second one: `datasets` reads every config of a
    # folder with the one builder its files' format picks (Parquet here), so a JSONL config fails.
    configs = [{"config_name": "default", "default": True,
                "data_files": [{"split": "train", "path": [_in_dataset(f) for f in manifest["files"]]}]}]
    return {
        "license": "other",  # a placeholder: the publisher sets it (see the card's "License")
        "pretty_name": title,
        "task_categories": ["text-generation"],
        "size_categories": [size_category(manifest["rows"])],
        "tags": ["synthetic", "instruction-tuning", "reference-level-feedback", "refed"],
        "configs": configs,
    }


def _teacher(storage: Storage) -> str:
    """The teacher run.json names (a dataset compacted outside a run, in tests, has none)."""
    return run_config(storage).model_name() if storage.exists("run.json") else "a teacher model"


def _unfinished(storage: Storage, manifest: dict[str, Any], title: str) -> str:
    """The card of a run that has no report yet: what the data is and how to load it."""
    return (f"# {title}\n\n{manifest['rows']:,} instruction-response pairs synthesized with Reference-Level "
            "Feedback by refed-ray. The run that writes them has not finished: its report completes this card "
            f"(`refed-ray report {storage.uri}` writes it again).\n\n## How to load\n\n"
            f"{_how_to_load(storage)}\n")


def size_category(rows: int) -> str:
    for bound, name in SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1T"


def _values(storage: Storage, report: dict[str, Any], title: str) -> dict[str, Any]:
    config, references, dedup = report["config"], report["references"], report["deduplicated"]
    run = storage.read_json("run.json")
    mode = (config.get("feedback") or {}).get("mode")
    return {
        "title": title,
        "model": report["model"],
        "feedback_mode_row": f"| Feedback mode | {mode} |\n" if mode else "",
        "references_used": f"{references['used']:,}",
        "references_usable": f"{references['usable']:,}",
        "references_skipped": f"{references['skipped']:,}",
        "seeds": config.get("seeds") or "the bundled reference set (refed_ray/default_references.jsonl)",
        "references_digest": run["fingerprint"]["references"],
        "temperature": config["sampling"]["temperature"],
        "top_p": config["sampling"]["top_p"],
        "seed": config["seed"],
        "k": config["instructions_per_aspect"],
        "dedup_method": _dedup_method(config["dedup"]),
        "planned": f"{report['plan']['planned_samples']:,}",
        "accepted": f"{report['samples']:,}",
        "delivered": f"{report['delivered']:,}",
        "rejected": f"{report['rejected_samples']:,}",
        "deduplicated": f"{dedup['total']:,}",
        "dedup_in_unit": f"{dedup['in_unit']:,}",
        "dedup_across": f"{dedup['across_units']:,}",
        "near_duplicate_rate": f"{dedup['near_duplicate_rate']:.1%}",
        "reject_table": _reject_table(report["rejects"]["by_reason"]),
        "quality": _quality(report.get("quality")),
        "how_to_load": _how_to_load(storage),
        "output": storage.uri,
    }


def _dedup_method(dedup: dict[str, Any]) -> str:
    if not dedup["enabled"]:
        return "Near-duplicate removal was off for this run."
    return (f"Instructions that nearly repeat another (Jaccard similarity of word {dedup['ngram']}-grams "
            f"{dedup['threshold']} or more) are dropped,\n   in their unit before their response and across "
            "the whole run after synthesis.")


def _reject_table(by_reason: dict[str, int]) -> str:
    if not by_reason:
        return "None."
    lines = ["| stage | reason | rows |", "|---|---|---:|"]
    for key, count in by_reason.items():
        stage, _, reason = key.partition(": ")
        lines.append(f"| {stage} | {_cell(reason)} | {count:,} |")
    return "\n".join(lines)


def _quality(quality: dict[str, Any] | None) -> str:
    if not quality or not quality.get("sampled_rows"):
        return "Not measured (no samples)."
    lines = [
        f"Measured on {quality['sampled_rows']:,} rows spread over the dataset. Lengths are in words and "
        "punctuation marks (model tokens run about 1.3 per such token in English).",
        "",
        "| | p10 | median | p90 |",
        "|---|---:|---:|---:|",
    ]
    lengths = quality["length_tokens"]
    for name in LENGTH_ROWS:
        values = lengths[name]
        lines.append(f"| {name.replace('_', ' ')} | {values['p10']:.0f} | {values['p50']:.0f} | {values['p90']:.0f} |")
    lines += [
        "",
        f"Instructions: distinct-1 {quality['distinct_1']}, distinct-2 {quality['distinct_2']} (distinct n-grams "
        f"over all n-grams), mean pairwise similarity {quality['mean_pairwise_similarity']} (Jaccard of word "
        f"n-grams, random pairs). The refinement changed {quality['improved_differs']:.0%} of the responses.",
    ]
    return "\n".join(lines)


def _title(model: str) -> str:
    return f"REFED-style instruction data from {model}"


def _how_to_load(storage: Storage) -> str:
    """The readers of README's "Reading the dataset": the card's folder for Hugging Face, its
    ``data/`` folder for Parquet readers (the card beside the data is no Parquet file)."""
    folder = storage.path("dataset") if storage.is_local else storage.full_uri("dataset")
    # A local folder loads through the card; `datasets` takes a remote one as a Hub id, so its data_dir.
    hf = (f'load_dataset("{folder}", split="train")  # through this card\'s `configs`' if storage.is_local
          else f'load_dataset("parquet", data_dir="{folder}/data", split="train")')
    return f"""```python
from datasets import load_dataset

data = {hf}
# once uploaded to the Hub:
# data = load_dataset("YOUR-NAME/YOUR-DATASET", split="train")
```

Parquet readers read the `data/` folder (the card and `_manifest.json` beside it are not Parquet):
`pandas.read_parquet("{folder}/data")`, `pyarrow.dataset.dataset("{folder}/data")`,
`ray.data.read_parquet("{folder}/data")`, DuckDB's
`read_parquet('{folder}/data/gen-*/*.parquet')` (`gen-*`: a `**` glob also takes a compaction's
hidden staging folder)."""


def _in_dataset(name: str) -> str:
    """A file's path relative to dataset/, where the card lives."""
    return posixpath.relpath(name, "dataset")


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
