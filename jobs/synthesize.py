"""Entry point for `ray job submit`: the same flags as `refed-ray run`, on the running cluster.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/synthesize.py --seeds s3://bucket/seeds.jsonl --output s3://bucket/run \
        --model meta-llama/Llama-3.1-8B-Instruct --num-engines 8 --num-samples 100000
"""

import sys

import ray

from refed_ray.cli import main

if __name__ == "__main__":  # vLLM starts engine subprocesses: the guard is required
    ray.init(address="auto")  # join the job's cluster; never start a new one here
    sys.exit(main(["run", *sys.argv[1:]]))
