"""A test engine kind sized exactly as the vllm kind: the fake teacher (tests/fake_engine.py) on
actors whose Ray options come from ``vllm_engine.actor_options`` (GPUs per engine, its runtime
env), with the vllm kind's driver checks, secrets and device resolution. Never a default.

A kind must be known in every process that reads the config, the engine actors included: the
driver registers it on import, and Ray's worker processes through the job's runtime env
(``worker_process_setup_hook: tests.gpu_kind.register``, see ``GPU_JOB_ENV``).

``engine_kwargs``: the fake engine's own (fake_engine.py), and ``gpus_log``: a file each engine
appends "<pid> <ray.get_gpu_ids()> <CUDA_VISIBLE_DEVICES> <HF_TOKEN set?>" to when it starts.
"""

from __future__ import annotations

import dataclasses
import json
import os

from refed_ray.engines import kinds
from tests.fake_engine import FakeEngine

NAME = "fake-vllm"
GPU_JOB_ENV = {"worker_process_setup_hook": "tests.gpu_kind.register"}


class GpuFakeEngine(FakeEngine):
    """The fake teacher, recording which GPUs Ray gave its actor."""

    def __init__(self, config):
        from refed_ray.engines.model_source import check_model_on_node

        check_model_on_node(config)  # as VLLMEngine does before it loads the model
        super().__init__(config)
        log = self.options.get("gpus_log")
        if log:
            import ray

            seen = {"pid": os.getpid(), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                    "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                    "node": ray.get_runtime_context().get_node_id(),
                    "hf_token": "HF_TOKEN" in os.environ, "hub_token": "HUGGING_FACE_HUB_TOKEN" in os.environ}
            with open(log, "a") as handle:
                handle.write(json.dumps(seen) + "\n")


def _build(config, rate_limiter=None):
    return GpuFakeEngine(config)


# The vllm kind's own entry, every hook but the engine it builds: the same checks, secrets, Ray
# options and device resolution as a real vLLM engine's.
FAKE_VLLM = dataclasses.replace(kinds.engine_kind("vllm"), name=NAME, build=_build)


def register() -> None:
    kinds.register(FAKE_VLLM)


register()
