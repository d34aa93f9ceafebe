"""``random``: a seeded subset of N samples, the baseline the other selections are measured against.

Each sample gets a 64-bit hash of ``(seed, unit_id, sample_index)`` and the N smallest are kept:
the same seed keeps the same samples whatever the order or the number of files they were read
from, a sample's draw does not depend on the others (a top-up keeps most of an earlier subset),
and it is one sort of a hash column, whatever the size.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from refed_ray.experiments.selections.decisions import decisions_table


def random_subset(samples: pa.Table, size: int, context) -> pa.Table:
    seed = context.seed
    units = samples.column("unit_id").to_pylist()
    indexes = samples.column("sample_index").to_pylist()
    draws = np.fromiter((_draw(seed, unit, index) for unit, index in zip(units, indexes)), np.uint64, len(units))
    keep = np.zeros(len(units), dtype=bool)
    keep[np.argsort(draws, kind="stable")[:size]] = True  # stable: equal draws (never seen) keep dataset order
    kept, dropped = f"random subset (seed {seed})", f"not drawn in the random subset of {size} (seed {seed})"
    return decisions_table(samples, keep.tolist(), [kept if k else dropped for k in keep.tolist()])


def _draw(seed: int, unit_id: str, sample_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x1f{unit_id}\x1f{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
