"""Training runs as the benchmark scripts launch them: one ``python -m feedsr.train`` per run
folder, its output in a log there, and its ``result.json`` reused by a later call.

Shared by ``benchmark_synthetic.py``, ``benchmark_kuairand.py`` and ``scaling.py``, which differ
in what they train and what they read back, not in how a run is started, logged or reused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def finished(run_dir: Path, settings: dict | None, tag: str) -> dict | None:
    """The ``result.json`` of a finished run in ``run_dir``, or None when it must be trained.

    ``settings``: what the figures depend on; a result made with other settings is removed with
    its folder (printed, prefixed by ``tag``) and trained again. None: any finished run is reused.
    """
    done = run_dir / "result.json"
    if not done.exists():
        return None
    result = json.loads(done.read_text())
    if settings is None or result.get("settings") == settings:
        return result
    print(f"[{tag}] {run_dir.name}: its result.json was made with other settings; training it again", flush=True)
    shutil.rmtree(run_dir)
    return None


def train_logged(overrides: list[str], run_dir: Path, log_name: str) -> tuple[list[str], float]:
    """Train ``python -m feedsr.train *overrides`` with its output in ``run_dir/log_name``;
    returns the command and its wall seconds. A failed run raises, naming its log."""
    cmd = [sys.executable, "-m", "feedsr.train", *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / log_name, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{run_dir.name} failed (exit {proc.returncode}); see {run_dir / log_name}")
    return cmd, seconds


def best_and_log(run_dir: Path) -> tuple[dict, list[dict]]:
    """A finished run's ``best.json`` (the best step by validation, its metrics) and its
    training log's records (``train_log.jsonl``)."""
    best = json.loads((run_dir / "best.json").read_text())
    records = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return best, records


def save(run_dir: Path, result: dict) -> dict:
    """Write ``result`` as the run's ``result.json`` (what ``finished`` reads back)."""
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
