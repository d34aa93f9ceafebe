"""Where the vllm kind's model comes from, and what its config.json decides, before and as an
engine loads it: a local folder (checked on the driver, or on the engine's own node when the
engines may run elsewhere), the Hugging Face hub (its token forwarded to the engines, its
refusals named as HF_TOKEN: exit 2), and the context window vLLM will accept (``max_model_len``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from refed_ray.engines.base import EngineMisconfigured
from refed_ray.engines.config import DEFAULT_MAX_MODEL_LEN, EngineConfig
from refed_ray.errors import UserError

log = logging.getLogger(__name__)


def is_local_folder(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~"))


def check_model_folder(config: EngineConfig) -> None:
    """On the driver: a local model folder must exist, unless the engines may run on other machines
    (a folder only the GPU nodes have: a baked image, an NVMe mount), which check it themselves
    (``check_model_on_node``). Hub ids and object-storage folders are fetched later, by each node."""
    model = config.model or ""
    if not is_local_folder(model) or os.path.isdir(os.path.expanduser(model)):
        return
    if driver_on_a_cluster():
        log.info("engine.model %s is not a folder on this machine (%s): each engine checks it on its "
                 "own node", model, socket.gethostname())
        return
    raise UserError(f"engine.model {model!r} is not a folder on this machine")


def check_model_on_node(config: EngineConfig) -> None:
    """In an engine actor: a local model folder must be on the node this engine runs on."""
    model = config.model or ""
    if is_local_folder(model) and not os.path.isdir(os.path.expanduser(model)):
        raise EngineMisconfigured(
            f"engine.model {model!r} is not a folder on node {socket.gethostname()}, where an engine "
            "runs: put it on every GPU node (or in the image they run), or name a Hugging Face id or "
            "an s3:// folder"
        )


def driver_on_a_cluster() -> bool:
    """Whether engines may run on machines other than the driver's: the run joins a cluster
    (RAY_ADDRESS names one; ``ray job submit`` sets it for its driver), or Ray is up on several nodes."""
    if os.environ.get("RAY_ADDRESS", "") not in ("", "local"):
        return True
    import ray

    return ray.is_initialized() and len([node for node in ray.nodes() if node.get("Alive")]) > 1


# ---- the context window --------------------------------------------------------------------

# The config.json keys vLLM 0.32 derives a model's context window from, the smallest found
# winning (vllm/transformers_utils/model_arch_config_convertor.py), and the RoPE types whose
# lengths are already scaled (vllm/config/model.py _get_and_verify_max_len).
_WINDOW_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
_ROPE_ALREADY_SCALED = {"default", "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"}
_HUB_TIMEOUT_S = 10


def context_window(model_config: dict[str, Any]) -> int | None:
    """The longest max_model_len vLLM accepts for a model, from its config.json (None where it
    names none): the smallest of its length keys (in ``text_config`` for multimodal models),
    scaled by a RoPE factor where vLLM scales it, or ``model_max_length`` where that is longer."""
    text = model_config.get("text_config") or model_config
    lengths = [text[key] for key in _WINDOW_KEYS if isinstance(text.get(key), int)]
    if not lengths:
        return None
    window = min(lengths)
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind and kind not in _ROPE_ALREADY_SCALED and "gemma3" not in str(text.get("model_type", "")):
        window = int(window * (rope.get("factor") or 1.0))
    return max(window, text.get("model_max_length") or 0)


def resolve_max_model_len(config: EngineConfig, model_path: str) -> int | None:
    """engine.max_model_len for vLLM: auto is the model's window, at most 16384 (16384 where the
    model's config cannot be read here: vLLM then checks it as it did before ``auto``)."""
    if config.max_model_len != "auto":
        return config.max_model_len
    model_config = read_model_config(model_path)
    return max_model_len_for(config, context_window(model_config) if model_config else None)


def max_model_len_for(config: EngineConfig, window: int | None) -> int | None:
    """The context vLLM is given for a model whose window is ``window`` (None: not stated): an
    explicit value as it is, auto the window up to 16384, unset (None) the model's own."""
    if config.max_model_len == "auto":
        return min(DEFAULT_MAX_MODEL_LEN, window or DEFAULT_MAX_MODEL_LEN)
    return config.max_model_len


def check_model_config(config: EngineConfig) -> None:
    """On the driver, where the model's config.json is readable here (a local folder, the hub): the
    hub must not refuse the model (gated, private: exit 2 naming HF_TOKEN, before any engine
    loads), and an explicit engine.max_model_len must fit its context window."""
    if not config.model or ("://" in config.model and not config.model.startswith("file://")):
        return  # the embedded model (32768 tokens holds any auto value); an object-store folder: its engines check it
    try:
        model_config = read_model_config(config.model)
    except EngineMisconfigured as err:
        raise UserError(str(err)) from None
    window = context_window(model_config) if model_config else None
    if window and isinstance(config.max_model_len, int) and config.max_model_len > window:
        raise UserError(
            f"engine.max_model_len {config.max_model_len} is longer than {config.model}'s context window of "
            f"{window} tokens (its config.json): lower it, or unset it (auto: the model's own, at most "
            f"{DEFAULT_MAX_MODEL_LEN})"
        )


def read_model_config(model: str) -> dict[str, Any] | None:
    """A model's config.json: from a local folder, or for a hub id in one request to the hub (no
    retries: a driver without the internet must not wait on them). None where it cannot be read;
    raises ``EngineMisconfigured`` naming HF_TOKEN where the hub refuses the model."""
    folder = Path(os.path.expanduser(model.removeprefix("file://")))
    if is_local_folder(model) or model.startswith("file://") or folder.is_dir():
        try:
            return json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
    if "://" in model or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    return _hub_config(model)


def _hub_config(model: str) -> dict[str, Any] | None:
    import urllib.error
    import urllib.request

    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers

    url = f"{constants.ENDPOINT.rstrip('/')}/{model}/resolve/main/config.json"
    request = urllib.request.Request(url, headers=build_hf_headers())
    try:
        with urllib.request.urlopen(request, timeout=_HUB_TIMEOUT_S) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as err:
        # 401/403: gated or private (the hub answers 401 for an unknown id too); a 404 is a refusal
        # only for the repository (a repository without config.json is vLLM's to judge).
        if err.code in (401, 403) or err.headers.get("X-Error-Code") == "RepoNotFound":
            raise EngineMisconfigured(hub_refusal(model, f"HTTP {err.code}")) from None
        return None
    except (OSError, ValueError):  # no route to the hub, a timeout, a body that is not JSON
        return None


def hub_refusal(model: str, why: str) -> str:
    """The message for a model the Hugging Face hub refuses (exit 2): it names HF_TOKEN."""
    token = "is set" if any(os.environ.get(name) for name in HUB_TOKENS) else "is not set"
    return (f"the Hugging Face hub refused engine.model {model!r} ({why}): a gated or private model needs "
            f"HF_TOKEN (set for the driver, it reaches the engines) of an account granted access; "
            f"HF_TOKEN {token} here. Check the id too.")


# Hugging Face's token variables: read by huggingface_hub (and so by vLLM) in the engine actors.
HUB_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def hub_secrets(config: EngineConfig) -> dict[str, str]:
    """The kind's ``secrets`` hook: the driver's Hugging Face token, for the engine actors (gated
    and private models), through the object store as the openai key: never in the config,
    run.json, a runtime env or a log."""
    return {name: os.environ[name] for name in HUB_TOKENS if os.environ.get(name)}


@contextlib.contextmanager
def hub_refusals_named(config: EngineConfig) -> Iterator[None]:
    """vLLM's loading of a model the hub refuses (huggingface_hub's GatedRepoError and
    RepositoryNotFoundError, under whatever vLLM or transformers wrap them in) as
    ``EngineMisconfigured``: the run stops at once with exit 2, naming HF_TOKEN."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        yield
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, (GatedRepoError, RepositoryNotFoundError)):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise EngineMisconfigured(hub_refusal(config.model_name(), type(cause).__name__)) from err
