"""Spot-instance chaos: a 100K-sample run whose engine actors are SIGKILLed (a random one each
time, at evenly spaced points of the run's progress), and whose driver is killed once, halfway,
and resubmitted. Checks that nothing is lost, nothing is doubled, and that every actor death cost
at most the shards it had in flight.

    python benchmarks/chaos.py                 # 100K samples, 10 actor kills, 1 driver kill
    python benchmarks/chaos.py --samples 20000 --kills 4

The teacher is the zero-cost one (tests/fake_engine.py, ZeroCostEngine) with a small delay per
call, so that kills land in the middle of shards. Printed: kills, shards redone and the bound,
samples in the final output, duplicates (must be 0), missing (must be 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from benchmarks.scale import start_ray, write_seeds  # noqa: E402

ACTOR_TITLE = b"ray::MapWorker(MapBatches(RunWorker))"
K, UNITS_PER_SHARD = 10, 64


def driver(config_json: str) -> None:

    from refed_ray.config import RunConfig
    from refed_ray.run.pipeline import run

    start_ray(4)
    report = run(RunConfig.model_validate_json(config_json))
    print("RESULT " + json.dumps({"samples": report["samples"], "shards": report["shards"]}))


def engine_actor_pids() -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(ACTOR_TITLE):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def files_in(folder: Path) -> int:
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def start_driver(config: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--driver", json.dumps(config)],
                            stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--references", type=int, default=1000)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--kills", type=int, default=10, help="engine actor kills")
    parser.add_argument("--delay", type=float, default=0.002, help="seconds per teacher call")
    parser.add_argument("--workdir", default="/tmp/refed-chaos")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver(args.driver)
        return 0

    rng = random.Random(args.seed)
    work = Path(args.workdir)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    write_seeds(work / "seeds.jsonl", args.references)
    output, log = work / "out", work / "driver.log"
    shards_in_flight = 2
    config = {
        "seeds": str(work / "seeds.jsonl"), "output": str(output), "num_samples": args.samples,
        "instructions_per_aspect": K,
        "engine": {"kind": "custom", "class_path": "tests.fake_engine:ZeroCostEngine",
                   "engine_kwargs": {"delay": args.delay}},
        # The zero-cost teacher sends one reply for every unit: dedup would drop all but the
        # first unit's. benchmarks/diversity.py measures the dedup pass.
        "dedup": {"enabled": False},
        "workers": {"num_engines": args.engines, "units_per_shard": UNITS_PER_SHARD, "shards_in_flight": shards_in_flight},
    }
    started = time.time()
    kills, driver_kills, runs = 0, 0, 1
    # Kills are paced by progress, not by the clock, so they land inside the run however fast
    # this machine is: evenly between 5% and 85% of the shards, the driver's at the middle.
    shards = math.ceil(math.ceil(args.samples / K) / UNITS_PER_SHARD)
    kill_at = [int(shards * (0.05 + 0.8 * i / max(args.kills, 1))) for i in range(args.kills)]
    driver_kill_at = shards // 2
    proc = start_driver(config, log)
    while proc.poll() is None:
        time.sleep(0.2)
        # Shards written so far (one data file each): the run's progress, across driver runs.
        done, pids = files_in(output / "data"), engine_actor_pids()
        if not pids:
            continue  # actors starting or restarting: wait for one to kill
        if driver_kills == 0 and done >= driver_kill_at:
            markers = files_in(output / "_markers" / "synthesis")
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray cluster
            proc.wait()
            driver_kills += 1
            time.sleep(2)
            for pid in engine_actor_pids():  # what the lost cluster left behind
                os.kill(pid, signal.SIGKILL)
            print(f"  {time.time() - started:6.0f} s: driver killed at {done} of {shards} shards "
                  f"({markers} shard markers since the last index); resubmitting")
            proc, runs = start_driver(config, log), runs + 1
        elif kills < len(kill_at) and done >= kill_at[kills]:
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            kills += 1
            print(f"  {time.time() - started:6.0f} s: engine actor {victim} killed at {done} of {shards} shards ({kills})")
    if proc.returncode:
        print(log.read_text()[-3000:])
        raise SystemExit(f"the last driver failed with {proc.returncode}")
    wall = time.time() - started
    check(output, args, kills, driver_kills, runs, shards_in_flight, wall)
    return 0


def check(output: Path, args, kills: int, driver_kills: int, runs: int, shards_in_flight: int, wall: float) -> None:
    from collections import Counter

    from refed_ray.records.commits import CommitLog
    from refed_ray.records.plan import read_plan
    from refed_ray.storage import Storage

    storage = Storage(str(output))
    log = CommitLog(storage)
    seen: Counter = Counter()
    for name in log.files("data"):
        table = storage.read_table(name).select(["unit_id", "sample_index"])
        seen.update(zip(table.column("unit_id").to_pylist(), table.column("sample_index").to_pylist()))
    lost: Counter = Counter()
    for name in log.files("rejects"):
        for row in storage.read_table(name).select(["unit_id", "sample_index", "lost_samples"]).to_pylist():
            if row["unit_id"] and row["sample_index"] >= 0:
                lost[(row["unit_id"], row["sample_index"])] += 1
            elif row["unit_id"]:
                lost.update((row["unit_id"], i) for i in range(K))
    planned = {(u, i) for u in read_plan(storage).column("unit_id").to_pylist() for i in range(K)}
    covered = seen + lost
    duplicates = sum(count - 1 for count in covered.values() if count > 1)
    missing = len(planned - set(covered))
    commits = log.commits["synthesis"].values()
    redone = sum(1 for c in commits if c.attempt > 1)
    extra_attempts = sum(c.attempt - 1 for c in commits)
    bound = (kills + driver_kills * args.engines) * shards_in_flight
    print(f"\nchaos: {args.samples:,} samples planned, {args.engines} engines, {wall:.0f} s wall, {runs} driver runs")
    print(f"  engine actor kills {kills}, driver kills {driver_kills}")
    print(f"  shards {len(commits):,}; redone {redone} ({extra_attempts} extra attempts); bound "
          f"(kills x shards in flight, the driver kill counting once per engine) {bound}: "
          f"{'met' if extra_attempts <= bound else 'NOT MET'}")
    print(f"  samples in the final output {sum(seen.values()):,}; rejected {sum(lost.values()):,}")
    print(f"  duplicates {duplicates} (must be 0); missing {missing} (must be 0)")


if __name__ == "__main__":
    sys.exit(main())
