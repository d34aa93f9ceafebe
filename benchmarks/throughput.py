"""Measure a run: engine throughput, tokens per sample by stage, and the feedback calls saved.

    python benchmarks/throughput.py --config jobs/demo.yaml --output /tmp/bench [--num-samples N]
    python benchmarks/throughput.py --config my-gpu.yaml --output s3://bucket/bench --num-samples 20000

It runs `refed-ray run` into a fresh OUTPUT and prints figures from its report.json: use them to
size a cluster (README, "Run on a cluster"). Numbers from one machine and one run only.
"""

import argparse
import sys

from refed_ray.config import load_config
from refed_ray.run.pipeline import run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-samples", type=int)
    args = parser.parse_args()
    config = load_config(args.config, {"output": args.output, "num_samples": args.num_samples})
    report = run(config, force_new=True)
    print_figures(report)
    return 0


def print_figures(report: dict) -> None:
    samples = max(report["samples"], 1)
    stages = report["stages"]
    this_run = report["this_run"]
    print(f"model {report['model']} on {report['device']}, {report['config']['workers']['num_engines']} engine(s)")
    print(f"samples {report['samples']} of {report['plan']['planned_samples']} planned, "
          f"{report['rejected_samples']} rejected")
    print(f"wall {this_run['wall_seconds']} s (synthesis pass {this_run['synthesis_seconds']} s)")
    print(f"engine throughput {this_run['completion_tokens_per_second']} completion tokens/s")
    synthesis_seconds = max(this_run["synthesis_seconds"], 1e-9)
    print(f"samples per engine-hour {3600 * report['samples'] / synthesis_seconds / report['config']['workers']['num_engines']:.0f}")
    for name, s in stages.items():
        print(f"  {name:<13} {s['prompt_tokens'] / samples:8.0f} prompt + {s['completion_tokens'] / samples:6.0f} "
              f"completion tokens per sample, {s['retries']} retries")
    total_out = sum(s["completion_tokens"] for s in stages.values()) / samples
    total_in = sum(s["prompt_tokens"] for s in stages.values()) / samples
    print(f"  total         {total_in:8.0f} prompt + {total_out:6.0f} completion tokens per sample")
    print(f"feedback calls {report['feedback_calls']} (sample-level feedback would need {report['samples']})")


if __name__ == "__main__":
    sys.exit(main())
