"""Prompt templates: one ``string.Template`` file per step, under prompts/.

Each template puts what every call of one reference shares first (the reference pair, the
reference's feedback) and what varies per call last (the new instruction, the response, the
seeded variation), so an engine's prefix cache serves the shared part once.

``instructions_variation.txt`` and ``instruction_facets.txt`` are the seeded variation of the
instruction step (see ``refed_ray.method.instructions``): they are prompt text too, and part of the digest.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files
from pathlib import Path
from string import Template

# The method's steps (feedback mode "reference"); refiners.py names each mode's.
STEPS = ("feedback_instruction", "feedback_response", "instructions", "response", "refinement")
VARIATION = "instructions_variation"
FACETS_FILE = "instruction_facets.txt"


def prompts_dir() -> Path:
    """The packaged copy (installed wheels) or the repository's prompts/ (editable installs)."""
    packaged = Path(str(files("refed_ray"))) / "prompts"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "prompts"


@cache
def template(step: str) -> Template:
    return Template((prompts_dir() / f"{step}.txt").read_text(encoding="utf-8"))


def render(step: str, **values: object) -> list[dict[str, str]]:
    """The chat messages for one step; a missing placeholder value raises ``KeyError``."""
    return [{"role": "user", "content": template(step).substitute(values)}]


@cache
def facets() -> dict[str, tuple[str, ...]]:
    """The choices of each facet of the instruction variation, in file order:
    ``{"audience": (...), "form": (...), "difficulty": (...), "setting": (...)}``."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in (prompts_dir() / FACETS_FILE).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is None:
            raise ValueError(f"{FACETS_FILE}: a choice before any [section]: {line!r}")
        else:
            current.append(line)
    return {name: tuple(choices) for name, choices in sections.items()}


def prompts_digest(steps: tuple[str, ...] = STEPS) -> str:
    """Changes whenever any of ``steps``' templates (a feedback mode's prompts: refiners.py) or the
    facets change: part of the resume fingerprint."""
    digest = hashlib.sha256()
    for step in (*steps, VARIATION):
        digest.update(template(step).template.encode())
    digest.update((prompts_dir() / FACETS_FILE).read_bytes())
    return digest.hexdigest()[:16]
