"""Where selections live, OUTPUT/selected/METHOD-N/, and how a committed one is read.

``refed-ray select`` (experiments/select.py) writes them in the dataset's layout (a manifest as the
one commit point); ``refed-ray export --selection METHOD-N`` reads them. A selection's name is
``METHOD-N`` and nothing else: a name is never a path, so it cannot reach outside OUTPUT/selected/.
"""

from __future__ import annotations

import re
from typing import Any

from refed_ray.data.dataset import read_manifest
from refed_ray.errors import UserError
from refed_ray.storage import Storage

FOLDER = "selected"
_NAME = re.compile(r"[a-z][a-z0-9_]*-[1-9][0-9]*")


def selection_folder(name: str) -> str:
    """OUTPUT-relative folder of the selection ``name`` (``METHOD-N``); refuses any other name."""
    if not _NAME.fullmatch(name):
        raise UserError(f"selection {name!r} is not a selection name: names are METHOD-N, e.g. rougel-1000 "
                        f"(refed-ray select --method METHOD --size N makes one)")
    return f"{FOLDER}/{name}"


def read_selection(storage: Storage, name: str) -> dict[str, Any]:
    """The committed manifest of OUTPUT/selected/NAME (``files``, ``rows``, ``summary``)."""
    folder = selection_folder(name)
    manifest = read_manifest(storage, folder)
    if manifest is None:
        present = [s.rsplit("/", 1)[1] for s in storage.subfolders(FOLDER)]
        raise UserError(f"{storage.uri} holds no selection {name!r} (none committed in {folder}); "
                        f"selections there: {', '.join(present) or 'none'} (refed-ray select makes one)")
    return manifest
