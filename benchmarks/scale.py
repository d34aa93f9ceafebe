"""The pipeline's own cost at scale: a zero-cost teacher, 1,000 references, N = 10K, 100K, 1M.

    python benchmarks/scale.py                       # 10K, 100K and 1M samples (about an hour here)
    python benchmarks/scale.py --sizes 10000,100000  # quicker
    python benchmarks/scale.py --s3 100000           # also: a resume of a finished 100K output on S3 (moto)

Each N runs in a fresh driver process (so its peak RSS is its own), then the same command again
on the finished output (a resume with nothing left to do). Printed per N: wall time and time per
sample, driver peak RSS, peak RSS of the largest Ray worker process, objects written during the
run and left in OUTPUT, the compacted dataset's files, and the storage requests and wall time of
the resume. The teacher answers every call with one fixed valid reply (tests/fake_engine.py,
ZeroCostEngine): what is measured is refed-ray, Ray Data and storage, not a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def config_for(seeds: str, output: str, num_samples: int, engines: int, storage_options: dict | None = None) -> dict:
    return {
        "seeds": seeds,
        "output": output,
        "num_samples": num_samples,
        "instructions_per_aspect": 10,
        "storage_options": storage_options or {},
        "engine": {"kind": "custom", "class_path": "tests.fake_engine:ZeroCostEngine"},
        # The zero-cost teacher sends one reply for every unit: dedup would drop all but the
        # first unit's. benchmarks/diversity.py measures the dedup pass.
        "dedup": {"enabled": False},
        "workers": {"num_engines": engines, "units_per_shard": 64, "shards_in_flight": 2},
    }


def write_seeds(path: Path, count: int) -> None:
    with path.open("w") as handle:
        for i in range(count):
            handle.write(json.dumps({"instruction": f"Task {i}: explain topic {i} to a new colleague, with one example.",
                                     "response": f"Topic {i} matters because of reason {i}. For example, case {i}."}) + "\n")


# ---- one measured run, in its own driver process -------------------------------------------


class PeakWorkerRSS(threading.Thread):
    """Samples the resident memory of this driver's Ray worker processes (``ray::`` in their
    title, descendants of this process: other Ray clusters on the machine are not counted), and
    the machine's load average (a shared machine's other work slows every figure)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self.loads: list[float] = []
        # The driver's own peak and what it was doing then (its last refed-ray log line).
        self.driver_peak, self.driver_peak_during, self.phase = 0, "", "start"
        self.started = time.time()

    def run(self):
        while True:
            parents, titles, rss = {}, {}, {}
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    text = status.read_text()
                    titles[int(status.parent.name)] = (status.parent / "cmdline").read_bytes()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
                parents[int(status.parent.name)] = int(fields["PPid"])
                rss[int(status.parent.name)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
            for pid, title in titles.items():
                if title.startswith(b"ray::") and _descends(pid, os.getpid(), parents):
                    self.peak = max(self.peak, rss[pid])
            self.loads.append(os.getloadavg()[0])
            driver = rss.get(os.getpid(), 0)
            if driver > self.driver_peak:
                self.driver_peak = driver
                elapsed = time.time() - self.started  # from before Ray's start
                self.driver_peak_during = f"{elapsed:.0f} s after Ray's start began, after: {self.phase}"
            time.sleep(1.0)


class LastLine(logging.Handler):
    """Tells the watcher what the driver last said (refed-ray's INFO lines: plan, passes, filters)."""

    def __init__(self, watcher: PeakWorkerRSS):
        super().__init__(logging.INFO)
        self.watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        self.watcher.phase = record.getMessage()[:120]


def _descends(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    while pid > 1:
        pid = parents.get(pid, 1)
        if pid == ancestor:
            return True
    return False


def count_requests() -> dict[str, int]:
    """Count storage requests in this process: s3fs calls to S3, or local file-system calls."""
    counts = {"requests": 0}
    import s3fs
    from fsspec.implementations.local import LocalFileSystem

    original = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        counts["requests"] += 1
        return await original(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counted
    # Local: one count per file-system operation refed-ray asks for, not for the calls fsspec
    # makes inside it (its local ls() stats every entry; an object store lists them in one reply).
    depth = threading.local()
    for name in ("ls", "cat_file", "pipe_file", "info", "rm", "mv", "_open", "exists", "makedirs"):
        local = getattr(LocalFileSystem, name)

        def wrapped(self, *args, _local=local, **kwargs):
            outer = not getattr(depth, "inside", False)
            counts["requests"] += outer
            depth.inside = True
            try:
                return _local(self, *args, **kwargs)
            finally:
                depth.inside = not outer

        setattr(LocalFileSystem, name, wrapped)
    return counts


def one(config_json: str, cpus: int) -> None:

    from refed_ray.config import RunConfig
    from refed_ray.run.pipeline import run

    counts = count_requests()
    watcher = PeakWorkerRSS()
    watcher.start()
    refed_log = logging.getLogger("refed_ray")
    refed_log.setLevel(logging.INFO)
    refed_log.addHandler(LastLine(watcher))
    start_ray(cpus)
    started = time.time()
    report = run(RunConfig.model_validate_json(config_json))
    wall = time.time() - started
    hwm = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
    print("RESULT " + json.dumps({
        "wall_s": wall, "driver_peak_rss": hwm, "driver_peak_during": watcher.driver_peak_during,
        "worker_peak_rss": watcher.peak, "requests": counts["requests"],
        "load_mean": sum(watcher.loads) / max(len(watcher.loads), 1),
        "samples": report["samples"], "shards": report["shards"], "plan": report["plan"],
        "dataset_files": len(report["dataset"]["files"]), "synthesis_s": report["this_run"]["synthesis_seconds"],
    }))


def start_ray(cpus: int) -> None:
    """ray.init, tried again: on a loaded 2-core machine the raylet can miss Ray's 30 s start-up wait."""
    import ray

    for attempt in range(3):
        try:
            # address="local": a cluster of its own, never one another process on this machine started
            # (ray.init() alone joins the one `ray start` recorded, and refuses num_cpus there).
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING")
            return
        except Exception:
            if attempt == 2:
                raise
            ray.shutdown()
            time.sleep(10)


def measure(config: dict, cpus: int) -> dict:
    started = time.time()
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(config), "--cpus", str(cpus)],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "process_s": time.time() - started}


# ---- objects ---------------------------------------------------------------------------------


def objects_left(output: Path) -> int:
    return sum(1 for p in output.rglob("*") if p.is_file())


def objects_written(output: Path, shards: int) -> int:
    """What the protocol writes: per shard its files, marker and attempt counter; then the plan,
    index rewrites, dataset, run.json and report. Counted from OUTPUT's own records."""
    from refed_ray.records.commits import CommitLog
    from refed_ray.storage import Storage

    log = CommitLog(Storage(str(output)))
    per_shard = sum(len(c.files) + 2 for commits in log.commits.values() for c in commits.values())
    index_writes = sum(1 + shards_of // 200 for shards_of in (len(v) for v in log.commits.values()))
    return per_shard + index_writes + objects_left(output) - len(log.files("data")) - len(log.files("rejects")) \
        - len(log.files("feedback"))


def fmt_mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--references", type=int, default=1000)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=4, help="Ray's logical CPUs (engine actors take 1 each)")
    parser.add_argument("--workdir", default="/tmp/refed-scale")
    parser.add_argument("--s3", type=int, default=0, help="also resume a finished output of this size on S3 (moto)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.cpus)
        return 0

    work = Path(args.workdir)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    seeds = work / "seeds.jsonl"
    write_seeds(seeds, args.references)
    print(f"refed-ray scale benchmark: {args.references} references, K=10, {args.engines} zero-cost engines, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    per_sample = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        output = work / f"out-{size}"
        config = config_for(str(seeds), str(output), size, args.engines)
        first = measure(config, args.cpus)
        resume = measure(config, args.cpus)
        per_sample[size] = first["wall_s"] / max(first["samples"], 1)
        print(f"\nN = {size:,}: {first['samples']:,} samples in {first['wall_s']:.0f} s wall "
              f"(synthesis {first['synthesis_s']:.0f} s), {per_sample[size] * 1e3:.2f} ms per sample")
        print(f"  shards: {first['shards']['committed']:,}; dataset: {first['dataset_files']} files; "
              f"machine load average {first['load_mean']:.1f} on {os.cpu_count()} cores (mean of 1-min figures)")
        print(f"  driver peak RSS {fmt_mb(first['driver_peak_rss'])}; largest worker peak RSS "
              f"{fmt_mb(first['worker_peak_rss'])}")
        print(f"  driver peak sampled {first['driver_peak_during']}")
        print(f"  objects written during the run ~{objects_written(output, first['shards']['committed']):,}; "
              f"left in OUTPUT {objects_left(output):,}")
        print(f"  resume of the finished output: {resume['wall_s']:.1f} s in run() ({resume['process_s']:.0f} s with "
              f"the process and Ray's start), {resume['requests']:,} storage requests (driver), "
              f"{resume['shards']['this_run']} shards redone")
    sizes = sorted(per_sample)
    for small, large in zip(sizes, sizes[1:]):
        print(f"\ntime per sample at {large:,} / at {small:,}: {per_sample[large] / per_sample[small]:.2f}x")
    if args.s3:
        s3_resume(args, seeds)
    return 0


def s3_resume(args, seeds: Path) -> None:
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    config = config_for(str(seeds), "s3://bench/run", args.s3, args.engines)
    first = measure(config, args.cpus)
    resume = measure(config, args.cpus)
    print(f"\nS3 (moto on loopback), N = {args.s3:,}: run {first['wall_s']:.0f} s; resume of the finished output "
          f"{resume['wall_s']:.1f} s with {resume['requests']:,} S3 requests")
    server.stop()


if __name__ == "__main__":
    sys.exit(main())
