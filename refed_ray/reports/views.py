"""What a person reads after a run: the report page, the dataset card, a few samples in the terminal.

Written at the end of every run (after report.json) and again by ``refed-ray report OUTPUT``.
"""

from __future__ import annotations

import logging
import textwrap
from typing import Any

from refed_ray.data.card import CARD, write_card
from refed_ray.data.dataset import read_manifest
from refed_ray.data.quality import sample_rows
from refed_ray.errors import UserError
from refed_ray.reports.page import PAGE, write_page
from refed_ray.storage import Storage

log = logging.getLogger(__name__)
SHOWN_FIELDS = [("instruction", "instruction"), ("response", "response"), ("improved", "improved_response")]


def write_views(storage: Storage, report: dict[str, Any]) -> list[str]:
    """Write report.html and the dataset card for ``report`` (none for a dataset of no rows);
    returns their paths in OUTPUT."""
    manifest = read_manifest(storage)
    card = write_card(storage, manifest, report) if manifest else None
    return [write_page(storage, report), *([card] if card else [])]


def write_views_after_run(storage: Storage, report: dict[str, Any]) -> None:
    """``write_views`` at the end of a run. The data and report.json are written by then, so a
    failure here is logged, not raised: it must not turn a finished run into a failed job."""
    try:
        write_views(storage, report)
    except Exception:
        log.exception("the report page or the dataset card could not be written (the dataset and "
                      "report.json were): `refed-ray report %s` writes them again", storage.uri)


def refresh(output: str, storage_options: dict | None = None, samples: int = 3) -> str:
    """``refed-ray report``: write the page and card of a finished run again; returns what to
    print (a few samples and where to look)."""
    storage = Storage(output, storage_options)
    if not storage.exists("report.json"):
        raise UserError(f"{output} holds no report.json: the page and card need a run that has finished once")
    write_views(storage, storage.read_json("report.json"))
    return "\n".join([show_samples(storage, samples), "", where_to_look(storage)])


def show_samples(storage: Storage, count: int = 3, width: int = 300) -> str:
    """``count`` samples spread over the dataset, each text shortened to ``width`` characters."""
    manifest = read_manifest(storage) or {}
    columns = ["reference_id", "aspect", *(field for _, field in SHOWN_FIELDS)]
    rows = sample_rows(storage, manifest.get("files", []), columns, count, max_groups=count)
    if not rows:
        return "No samples in dataset/."
    lines = [f"{len(rows)} of the {manifest.get('rows', len(rows)):,} samples in dataset/:"]
    for number, row in enumerate(rows, 1):
        lines += ["", f"[{number}] reference {row['reference_id']}, {row['aspect']}"]
        for label, field in SHOWN_FIELDS:
            text = textwrap.shorten(row[field], width=width, placeholder=" [...]") or "(empty)"
            lines.append(textwrap.fill(text, width=100, initial_indent=f"  {label:<12} ", subsequent_indent=" " * 15))
    return "\n".join(lines)


def where_to_look(storage: Storage) -> str:
    return "\n".join([
        "Look at the data:",
        f"  dataset (Parquet)  {storage.uri}/dataset/data/  (Hugging Face: {storage.uri}/dataset/)",
        f"  report page        {storage.uri}/{PAGE}  (a browser opens it offline)",
        f"  dataset card       {storage.uri}/{CARD}",
    ])
