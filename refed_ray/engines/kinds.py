"""Engine kinds: everything the run knows about one kind of teacher engine, in one registry entry.

The pipeline, the config, the CLI and the plan ask the entry of ``engine.kind`` and never branch
on the kind themselves (as Ray's batch processors register one config class per engine). A new
kind is its engine module plus one ``register(EngineKind(...))``; ``vllm``, ``openai`` and
``custom`` are registered below.

This module imports no engine module (and so neither vLLM nor the openai client) until a hook
runs: config.py validates ``engine.kind`` against it, and the driver sizes vLLM actors without
vLLM installed. A kind must be registered in every process that reads the config, the engine
actors included, which import this module: register new kinds here (a kind registered from a
test is known to that test's process only, which is enough for the driver-side checks).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from refed_ray.errors import UserError

if TYPE_CHECKING:
    from refed_ray.engines.base import Engine
    from refed_ray.engines.config import EngineConfig


def no_problem(config: EngineConfig) -> str | None:
    return None


def no_check(config: EngineConfig) -> None:
    return None


def nothing(config: EngineConfig) -> dict[str, Any]:
    return {}


def same_device(config: EngineConfig) -> EngineConfig:
    return config


def resources_from_config(config: EngineConfig) -> dict[str, Any]:
    """``engine.resources`` as Ray actor options; unset = one CPU and no GPU."""
    declared = config.resources
    if declared is None:
        return {"num_cpus": 1}
    options: dict[str, Any] = {"num_cpus": declared.num_cpus}
    if declared.num_gpus:
        options["num_gpus"] = declared.num_gpus
    if declared.resources:
        options["resources"] = dict(declared.resources)
    return options


@dataclass(frozen=True)
class EngineKind:
    """One kind of teacher engine. Every hook takes the run's ``EngineConfig``; the defaults suit
    an engine that needs nothing but its class."""

    name: str
    #: (config, rate_limiter) -> Engine, called in each engine actor; ``rate_limiter`` is the
    #: run's shared limiter when ``driver_args`` started one, else None.
    build: Callable[[EngineConfig, Any], Engine]
    #: What the config lacks for this kind (a message naming the field), checked when the config loads.
    config_problem: Callable[[EngineConfig], str | None] = no_problem
    #: Driver-side checks before Ray starts (a class imports, a local model folder exists, a key
    #: is set): raise UserError naming the setting to fix.
    check: Callable[[EngineConfig], None] = no_check
    #: Values the actors need but the config must not hold (an API key), read on the driver and
    #: handed to the actors through the object store: {environment variable: value}.
    secrets: Callable[[EngineConfig], dict[str, str]] = nothing
    #: Engine-actor constructor arguments started once on the driver and shared by the run's
    #: actors (openai: ``rate_limiter``, the actor that spaces every call to the configured rates).
    driver_args: Callable[[EngineConfig], dict[str, Any]] = nothing
    #: Ray options of one engine actor (num_cpus, num_gpus, resources, runtime_env).
    actor_resources: Callable[[EngineConfig], dict[str, Any]] = resources_from_config
    #: The config with ``device: auto`` resolved against the Ray cluster, once Ray is up.
    resolve_device: Callable[[EngineConfig], EngineConfig] = same_device
    #: ``refed-ray plan`` estimates GPU time (sizing.py) for this kind.
    estimates_gpu_time: bool = False
    #: Billed per token at ``engine.api.prices``: ``refed-ray plan`` says when the model has no price.
    priced_per_token: bool = False

    def problem(self, config: EngineConfig) -> str | None:
        """What is wrong with ``config`` for this kind, if anything."""
        if config.resources is not None and self.actor_resources is not resources_from_config:
            readers = ", ".join(kind.name for kind in _KINDS.values() if kind.reads_resources)
            return (f"engine.resources is not read by engine kind {self.name!r}, which sizes its actors "
                    f"itself: unset it (the kinds that read it: {readers})")
        return self.config_problem(config)

    @property
    def reads_resources(self) -> bool:
        return self.actor_resources is resources_from_config


_KINDS: dict[str, EngineKind] = {}


def register(kind: EngineKind) -> EngineKind:
    """Make ``kind`` known to the config, the CLI and the run; returns it."""
    known = _KINDS.get(kind.name)
    if known is not None and known != kind:
        raise ValueError(f"engine kind {kind.name!r} is registered already")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Forget the kind ``name`` (tests register kinds of their own)."""
    _KINDS.pop(name, None)


def names() -> list[str]:
    """The registered kinds, in registration order."""
    return list(_KINDS)


def listed() -> str:
    """The registered kinds as an error message lists them: 'vllm', 'openai' or 'custom'."""
    return _listed(_KINDS)


def engine_kind(name: str) -> EngineKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise UserError(f"engine.kind {name!r} is not a known engine kind: {listed()}") from None


def _listed(names) -> str:
    quoted = [repr(name) for name in names]
    return " or ".join(filter(None, [", ".join(quoted[:-1]), *quoted[-1:]]))


def _from(module: str, name: str) -> Callable:
    """``module.name``, imported when first called: registering a kind imports nothing."""

    def call(*args):
        return getattr(importlib.import_module(module), name)(*args)

    call.__qualname__ = call.__name__ = f"{module}:{name}"
    return call


def create_engine(config: EngineConfig, rate_limiter: Any = None) -> Engine:
    """The engine ``config`` names, built by its kind (engines/kinds.py); ``rate_limiter`` is the
    run's shared limiter (API engines)."""
    return engine_kind(config.kind).build(config, rate_limiter)


def load_class(class_path: str | None) -> type[Engine]:
    if not class_path or ":" not in class_path:
        raise UserError(f"engine.class_path must look like 'module:Class', got {class_path!r}")
    module_name, _, class_name = class_path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"engine.class_path {class_path!r} cannot be imported: {err}") from None


# ---- the built-in kinds ----------------------------------------------------------------------

VLLM_MODULE = "refed_ray.engines.vllm_engine"
OPENAI_MODULE = "refed_ray.engines.openai_engine"


def _build_custom(config: EngineConfig, rate_limiter: Any = None) -> Engine:
    return load_class(config.class_path)(config)


def _check_custom(config: EngineConfig) -> None:
    load_class(config.class_path)


def _openai_needs_model(config: EngineConfig) -> str | None:
    if not config.model:
        return "engine kind 'openai' needs model (the served model's name, --model)"
    return None


def _custom_needs_class(config: EngineConfig) -> str | None:
    if not config.class_path:
        return "engine kind 'custom' needs class_path ('module:Class')"
    return None


register(EngineKind(
    name="vllm",
    build=_from(VLLM_MODULE, "build"),
    check=_from(VLLM_MODULE, "check"),
    secrets=_from("refed_ray.engines.model_source", "hub_secrets"),
    actor_resources=_from(VLLM_MODULE, "actor_options"),
    resolve_device=_from(VLLM_MODULE, "resolve_device"),
    estimates_gpu_time=True,
))
register(EngineKind(
    name="openai",
    build=_from(OPENAI_MODULE, "OpenAIEngine"),
    config_problem=_openai_needs_model,
    check=_from(OPENAI_MODULE, "api_key"),
    secrets=_from(OPENAI_MODULE, "api_secrets"),
    driver_args=_from(OPENAI_MODULE, "rate_limiter_args"),
    priced_per_token=True,
))
register(EngineKind(
    name="custom",
    build=_build_custom,
    config_problem=_custom_needs_class,
    check=_check_custom,
))
