"""Spot-instance chaos: a 100K-sample run whose engine actors are killed at random, and whose
driver is killed once and resubmitted. Checks that nothing is lost, nothing is doubled, and that
every actor death cost at most the shards it had in flight.

    python benchmarks/chaos.py                 # 100K samples, >= 10 actor kills, 1 driver kill
    python benchmarks/chaos.py --samples 20000 --kills 4

The teacher is the zero-cost one (tests/fake_engine.py, ZeroCostEngine) with a small delay per
call, so that kills land in the middle of shards. Printed: kills, shards redone and the bound,
samples in the final output, duplicates (must be 0), missing (must be 0).
"""

from __future__ import annotations

import argparse
import json
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

ACTOR_TITLE = b"ray::MapWorker(MapBatches(SynthesisWorker))"


def driver(config_json: str) -> None:

    from refed_ray.config import RunConfig
    from refed_ray.pipeline import run

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


def synthesis_markers(output: Path) -> int:
    folder = output / "_markers" / "synthesis"
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
    parser.add_argument("--every", type=float, default=12.0, help="mean seconds between kills")
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
        "instructions_per_aspect": 10,
        "engine": {"kind": "custom", "class_path": "tests.fake_engine:ZeroCostEngine",
                   "engine_kwargs": {"delay": args.delay}},
        # The zero-cost teacher sends one reply for every unit: dedup would drop all but the
        # first unit's. benchmarks/diversity.py measures the dedup pass.
        "dedup": {"enabled": False},
        "workers": {"num_engines": args.engines, "units_per_shard": 64, "shards_in_flight": shards_in_flight},
    }
    started = time.time()
    kills, driver_kills, runs = 0, 0, 1
    proc = start_driver(config, log)
    while proc.poll() is None:
        if kills >= args.kills and driver_kills:
            time.sleep(1)  # enough chaos: let the run finish
            continue
        time.sleep(rng.expovariate(1 / args.every))
        pids = engine_actor_pids()
        if proc.poll() is not None or not pids:
            continue
        markers = synthesis_markers(output)
        if driver_kills == 0 and kills >= args.kills // 2 and markers > 0:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray cluster
            proc.wait()
            driver_kills += 1
            time.sleep(2)
            for pid in engine_actor_pids():  # what the lost cluster left behind
                os.kill(pid, signal.SIGKILL)
            print(f"  {time.time() - started:6.0f} s: driver killed ({markers} shard markers since the last index); resubmitting")
            proc, runs = start_driver(config, log), runs + 1
            continue
        victim = rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        kills += 1
        print(f"  {time.time() - started:6.0f} s: engine actor {victim} killed ({kills})")
    if proc.returncode:
        print(log.read_text()[-3000:])
        raise SystemExit(f"the last driver failed with {proc.returncode}")
    wall = time.time() - started
    check(output, args, kills, driver_kills, runs, shards_in_flight, wall)
    return 0


def check(output: Path, args, kills: int, driver_kills: int, runs: int, shards_in_flight: int, wall: float) -> None:
    from collections import Counter

    from refed_ray.commits import CommitLog
    from refed_ray.plan import read_plan
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
                lost.update((row["unit_id"], i) for i in range(10))
    planned = {(u, i) for u in read_plan(storage).column("unit_id").to_pylist() for i in range(10)}
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
