"""The package as users get it: its layers, and a plain (non-editable) install that runs anywhere."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "feedsr"
# Each layer may import itself and the layers listed for it, nothing else of feedsr:
# data -> model -> runtime -> eval -> {train, serve}.
ALLOWED = {
    "data": {"data"},
    "model": {"data", "model"},
    "runtime": {"data", "model", "runtime"},
    "eval": {"data", "model", "runtime", "eval"},
    "train": {"data", "model", "runtime", "eval", "train", "prepare"},  # prepare: synthetic data on first use
    "serve": {"data", "model", "runtime", "eval", "serve"},
    "prepare": {"data", "prepare"},  # logs -> datasets: beside the model stack, on top of data
}
ANYWHERE = {"quiet"}  # feedsr/quiet.py: keeps library logs down, depends on nothing of ours


def feedsr_imports(path: Path) -> set[str]:
    """The feedsr subpackages a file imports (``feedsr.X...`` -> X), at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        found |= {n.split(".")[1] for n in names if n.startswith("feedsr.")}
    return found


def test_layers_import_only_the_layers_below_them():
    violations = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            bad = feedsr_imports(path) - allowed - ANYWHERE
            violations += [f"{path.relative_to(REPO)} imports feedsr.{b}" for b in sorted(bad)]
    assert not violations, violations
    assert set(ALLOWED) >= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}


def test_non_editable_install_runs_from_another_directory(tmp_path):
    """`pip install .` (not -e) must ship the Hydra configs: they used to live outside the package."""
    source, target = tmp_path / "src", tmp_path / "site"
    # from a copy: setuptools builds inside the source tree (build/, *.egg-info)
    local = {".git", ".venv", "runs", "data", "outputs", "build", "feedsr.egg-info"}
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=lambda where, names: [n for n in names if Path(where) == REPO and n in local])
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    env = os.environ | {"PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import feedsr; print(feedsr.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(target), where  # the installed copy, not the checkout
    out = subprocess.run([sys.executable, "-m", "feedsr.train", "--cfg", "job", "experiment=synthetic_main",
                          "trainer=hdet"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "run_id: synthetic_main" in out.stdout and "converge_every: 100" in out.stdout
    # the HDET plot imports matplotlib: the installed package must declare it
    (metadata,) = target.glob("feedsr-*.dist-info/METADATA")
    assert "Requires-Dist: matplotlib" in metadata.read_text()
