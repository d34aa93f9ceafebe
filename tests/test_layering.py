"""The layering is a test: pyproject.toml's import-linter contracts hold on the tree, and they
catch a knotted graph (an import that climbs, a cycle, Ray in the method)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def copy_of_the_tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "refed_ray", tmp_path / "refed_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_every_contract_holds_on_the_tree():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    # the records import the run: an import that climbs
    ("records/stats.py", "from refed_ray.run import pipeline", "Layers"),
    # the method imports Ray
    ("method/structured.py", "import ray", "The method imports no Ray"),
    # an engine imports the run's config
    ("engines/guard.py", "from refed_ray.config import RunConfig", "Engines import no run module"),
    # two siblings of one package import each other
    ("method/feedback.py", "from refed_ray.method import refiners", "No import cycles"),
])
def test_a_knotted_graph_fails(tmp_path, module, line, broken):
    tree = copy_of_the_tree(tmp_path)
    path = tree / "refed_ray" / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # noqa\n", encoding="utf-8")
    result = lint(tree)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout
