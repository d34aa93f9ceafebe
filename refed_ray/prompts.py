"""Prompt templates: one ``string.Template`` file per step, under prompts/."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files
from pathlib import Path
from string import Template

STEPS = ("feedback_instruction", "feedback_response", "instructions", "response", "refinement")


def prompts_dir() -> Path:
    """The packaged copy (installed wheels) or the repository's prompts/ (editable installs)."""
    packaged = Path(str(files("refed_ray"))) / "prompts"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "prompts"


@cache
def template(step: str) -> Template:
    return Template((prompts_dir() / f"{step}.txt").read_text(encoding="utf-8"))


def render(step: str, **values: object) -> list[dict[str, str]]:
    """The chat messages for one step; a missing placeholder value raises ``KeyError``."""
    return [{"role": "user", "content": template(step).substitute(values)}]


def prompts_digest() -> str:
    """Changes whenever any template changes: part of the resume fingerprint."""
    digest = hashlib.sha256()
    for step in STEPS:
        digest.update(template(step).template.encode())
    return digest.hexdigest()[:16]
