"""``refed-ray plan`` against the runs it plans, and what one ``refed-ray status`` read costs.

    python benchmarks/watching.py demo                              # jobs/demo.yaml with the fake teacher
    python benchmarks/watching.py scale --pilot 10000 --size 100000 # zero-cost teacher, 1,000 references
    python benchmarks/watching.py rejects --pilot 60 --size 600     # fake teacher, 20% of refinements invalid
    python benchmarks/watching.py status /tmp/refed-watching/out-100000   # S3 requests of a status read

``demo``: the plan of jobs/demo.yaml (the config's budgets: an upper bound) against a run of it
with the fake teacher (tests/fake_engine.py), calls and tokens by stage.
``scale``: benchmarks/scale.py's zero-cost teacher: a pilot of ``--pilot`` samples, then the plan
of ``--size`` samples from that pilot (and from the budgets), then the run of ``--size``.
``rejects``: the fake teacher with 20% of refinement replies always invalid (retried, then rejected,
then topped up), the bundled 40 references, K=3: a pilot, then the plan from it, then the run.
``status``: OUTPUT copied into a bucket on moto's S3 server (loopback), then one status read:
its S3 requests, counted where s3fs makes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

STAGES = ("feedback", "instructions", "responses", "refinement")


def compare(estimate: dict, report: dict, label: str) -> None:
    """Calls (first attempts, and the pilot's expectation) and tokens by stage, estimate / actual."""
    tokens = estimate["tokens"]
    print(f"\n{label}: tokens from {tokens['source']}; plan {estimate['plan']['units']:,} units / "
          f"{estimate['plan']['shards']:,} shards, run {report['plan']['units']:,} / {report['plan']['shards']:,}")
    print(f"  {'stage':<13}{'calls plan':>12}{'calls run':>12}{'prompt est.':>16}{'prompt run':>16}"
          f"{'compl. est.':>16}{'compl. run':>16}")
    for stage in STAGES:
        ran, est = report["stages"][stage], tokens["by_stage"][stage]
        print(f"  {stage:<13}{estimate['calls'][stage]:>12,}{ran['calls']:>12,}{est['prompt_tokens']:>16,}"
              f"{ran['prompt_tokens']:>16,}{est['completion_tokens']:>16,}{ran['completion_tokens']:>16,}")
    actual = {kind: sum(report["stages"][s][kind] for s in STAGES) for kind in ("prompt_tokens", "completion_tokens")}
    print(f"  {'total':<13}{estimate['calls']['total']:>12,}{sum(report['stages'][s]['calls'] for s in STAGES):>12,}"
          f"{tokens['prompt_tokens']:>16,}{actual['prompt_tokens']:>16,}{tokens['completion_tokens']:>16,}"
          f"{actual['completion_tokens']:>16,}")
    print(f"  estimate / actual: prompt {tokens['prompt_tokens'] / max(1, actual['prompt_tokens']):.3f}, "
          f"completion {tokens['completion_tokens'] / max(1, actual['completion_tokens']):.3f}")


def demo(workdir: Path) -> None:
    import ray

    from refed_ray.config import load_config
    from refed_ray.run.pipeline import run
    from refed_ray.watch.estimate import plan_run

    config = load_config(str(ROOT / "jobs" / "demo.yaml"), {
        "output": str(workdir / "demo"), "engine.kind": "custom", "engine.class_path": "tests.fake_engine:FakeEngine"})
    estimate = plan_run(config)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    report = run(config)
    compare(estimate, report, "jobs/demo.yaml, fake teacher")


def scale(workdir: Path, pilot_size: int, size: int, engines: int, cpus: int) -> None:
    from benchmarks.scale import config_for, measure, write_seeds
    from refed_ray.config import RunConfig
    from refed_ray.watch.estimate import plan_run

    seeds = workdir / "seeds.jsonl"
    write_seeds(seeds, 1000)
    pilot = workdir / f"out-{pilot_size}"
    measure(config_for(str(seeds), str(pilot), pilot_size, engines), cpus)
    output = workdir / f"out-{size}"
    config = config_for(str(seeds), str(output), size, engines)
    started = time.time()
    from_pilot = plan_run(RunConfig.model_validate(config), pilot=str(pilot))
    plan_seconds = time.time() - started
    from_budgets = plan_run(RunConfig.model_validate(config))
    measure(config, cpus)
    report = json.loads((output / "report.json").read_text())
    print(f"\nplan of {size:,} samples took {plan_seconds:.1f} s (checks, seeds, the plan in memory, the pilot's index)")
    compare(from_pilot, report, f"N = {size:,}, zero-cost teacher, estimated from a {pilot_size:,}-sample pilot")
    compare(from_budgets, report, f"N = {size:,}, zero-cost teacher, bounded by the budgets")


def rejects(workdir: Path, pilot_size: int, size: int) -> None:
    import ray

    from refed_ray.config import RunConfig
    from refed_ray.run.pipeline import run
    from refed_ray.watch.estimate import plan_run

    def config(output: Path, num_samples: int) -> RunConfig:
        return RunConfig.model_validate({
            "output": str(output), "num_samples": num_samples, "instructions_per_aspect": 3,
            "engine": {"kind": "custom", "class_path": "tests.fake_engine:FakeEngine",
                       "engine_kwargs": {"invalid_rate": {"Refinement": 0.2}}},
            "workers": {"num_engines": 2, "units_per_shard": 4}})

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    run(config(workdir / "pilot", pilot_size))
    estimate = plan_run(config(workdir / "run", size), pilot=str(workdir / "pilot"))
    report = run(config(workdir / "run", size))
    compare(estimate, report, f"N = {size:,}, fake teacher, 20% of refinements invalid, from a {pilot_size}-sample pilot")
    expected = estimate["tokens"]["calls_expected"]
    print(f"  calls expected from the pilot (retries and top-ups included): {expected['total']:,}; "
          f"run: {sum(report['stages'][s]['calls'] for s in STAGES):,} "
          f"({report['plan']['extra_units']} extra units, {report['rejects']['samples_lost']} samples lost)")


def status_requests(output: Path) -> None:
    """Copy OUTPUT into moto's S3 server, then count the requests of one status read."""
    from moto.server import ThreadedMotoServer

    from tests.conftest import count_requests, free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    files = [p for p in output.rglob("*") if p.is_file()]
    for path in files:
        client.upload_file(str(path), "bench", f"run/{path.relative_to(output)}")
    from refed_ray.storage import Storage
    from refed_ray.watch.status import describe, read_status

    storage = Storage("s3://bench/run")
    calls = count_requests(storage)
    started = time.time()
    status = read_status(storage)
    seconds = time.time() - started
    print(describe(status))
    by_method = {m: calls.count(m) for m in sorted(set(calls))}
    print(f"\nstatus of {output} ({len(files):,} objects, {status['passes']['synthesis']['shards_committed']:,} "
          f"synthesis shards) on S3 (moto, loopback): {len(calls)} requests {by_method}, {seconds:.2f} s")
    server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["demo", "scale", "rejects", "status"])
    parser.add_argument("output", nargs="?", help="status: a finished or running OUTPUT on this machine")
    parser.add_argument("--pilot", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/refed-watching")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.what == "status":
        status_requests(Path(args.output))
        return 0
    subprocess.run(["rm", "-rf", str(workdir)], check=True)
    workdir.mkdir(parents=True)
    if args.what == "demo":
        demo(workdir)
    elif args.what == "rejects":
        rejects(workdir, args.pilot, args.size)
    else:
        scale(workdir, args.pilot, args.size, args.engines, args.cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
