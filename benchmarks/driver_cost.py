"""What the driver holds and does per shard, measured on a finished output (README, "100M samples: a plan").

    python benchmarks/scale.py --sizes 1000000 --workdir /tmp/refed-scale   # an output to measure
    python benchmarks/driver_cost.py /tmp/refed-scale/out-1000000           # add --blocks 3000 for Ray's part

Prints, per shard: the bytes of one commit row in the driver (``CommitLog.commits``), of the index
on disk, of the plan read whole and of the pass's blocks (``pending_shards``), the index rows a
run writes with a whole rewrite every 200 commits and with today's parts, and (``--blocks N``)
the driver RSS that ``ray.data.from_arrow`` adds per block, on a local Ray cluster of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from refed_ray.records.commits import Commit, read_index_objects  # noqa: E402
from refed_ray.records.plan import pending_shards, read_plan  # noqa: E402
from refed_ray.storage import Storage  # noqa: E402

INDEX_EVERY = 200


def commit_bytes(storage: Storage, count: int = 16_000) -> float:
    """Driver bytes of one synthesis commit: ``count`` copies of the output's first, names changed."""
    (_, table), *_ = [o for o in read_index_objects(storage, "synthesis")]
    row = table.slice(0, 1).to_pylist()[0]
    stats = json.loads(row["stats"])
    tracemalloc.start()
    commits = [Commit.model_validate_json(json.dumps({
        **row, "pass_name": "synthesis", "shard": f"synthesis-{i:020x}", "stats": stats,
        "ids": [f"{i:08x}{j:08x}" for j in range(len(row["ids"]))],
        "files": [f"data/synthesis-{i:020x}.{row['token']}.parquet"]})) for i in range(count)]
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del commits
    return size / count


def index_rows_written(shards: int) -> tuple[int, int, int]:
    """Rows written by a run of ``shards``: a whole rewrite every 200 commits, then the parts
    (binary counter, as ``CommitLog._append_index_part``); and the parts left at the end."""
    whole, parts, objects, done = 0, 0, [], 0
    while done < shards:
        new = min(INDEX_EVERY, shards - done)
        done += new
        whole += done
        while objects and objects[-1] <= new:
            new += objects.pop()
        objects.append(new)
        parts += new
    return whole, parts, len(objects)


def block_rss(count: int) -> float:
    """Driver RSS added per block by ``ray.data.from_arrow`` of ``count`` 64-row shard tables."""
    import ray

    def rss() -> int:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024

    from benchmarks.scale import start_ray  # a local cluster of its own, tried again on a loaded machine

    start_ray(2)
    blocks = [pa.table({"shard": [f"synthesis-{i:020x}"] * 64, "unit_id": [f"{i:08x}{j:08x}" for j in range(64)],
                        "round": np.arange(64), "reference_id": [f"r{j}" for j in range(64)],
                        "aspect": ["a"] * 64, "seed": np.arange(64)}) for i in range(count)]
    before = rss()
    dataset = ray.data.from_arrow(blocks)
    added = (rss() - before) / count
    del dataset
    ray.shutdown()
    return added


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="a finished run's OUTPUT (benchmarks/scale.py leaves them)")
    parser.add_argument("--blocks", type=int, default=0, help="also measure from_arrow with this many blocks")
    args = parser.parse_args()
    storage = Storage(args.output)
    index = read_index_objects(storage, "synthesis")
    shards = len({s for _, t in index for s in t.column("shard").to_pylist()})
    index_bytes = sum(len(storage.read_bytes(name)) for name, _ in index)
    print(f"{args.output}: {shards:,} synthesis shards")
    print(f"  commit row in the driver: {commit_bytes(storage):,.0f} bytes; index on disk: {index_bytes / shards:,.0f} bytes")
    base = pa.total_allocated_bytes()
    plan = read_plan(storage)
    print(f"  plan read whole: {(pa.total_allocated_bytes() - base) / shards:,.0f} bytes of Arrow "
          f"({plan.num_rows:,} units in {plan.column('shard').num_chunks} parts)")
    base, started = pa.total_allocated_bytes(), time.process_time()
    blocks = pending_shards(plan, set())
    print(f"  pending_shards: {(pa.total_allocated_bytes() - base) / len(blocks):,.0f} bytes of Arrow a block, "
          f"{time.process_time() - started:.1f} s CPU for {len(blocks):,} blocks")
    for n in (shards, 10 * shards, 100 * shards):
        whole, parts, objects = index_rows_written(n)
        print(f"  index rows written for {n:,} shards: {whole:,} rewriting it whole, {parts:,} in parts ({objects} objects)")
    if args.blocks:
        print(f"  ray.data.from_arrow: {block_rss(args.blocks):,.0f} bytes of driver RSS a block ({args.blocks:,} blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
