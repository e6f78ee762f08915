"""The run's JSON-lines logs (``train_log.jsonl``, ``valid_metrics.jsonl``, ...): one record per
line, each with the optimizer ``step`` it belongs to.

A resumed run redoes the steps after its checkpoint, so their old lines must go, or every step
after the checkpoint would appear twice. A line cut off by a kill or a full disk is dropped too.
"""

from __future__ import annotations

import json
from pathlib import Path

# Every log of a run directory that records steps.
RUN_LOGS = ("train_log.jsonl", "valid_metrics.jsonl", "test_metrics.jsonl", "hdet_converges.jsonl")


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def put(path: Path, record: dict) -> None:
    """Append ``record``, replacing a line of the same step: a run killed after its final
    validation was written redoes that validation when restarted."""
    if path.exists():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _step_of(line) != record["step"]]
        if len(kept) != len(lines):
            path.write_text("".join(line + "\n" for line in kept))
    append(path, record)


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def truncate(path: Path, step: int) -> tuple[int, int]:
    """Keep the lines of steps <= ``step``; returns (lines dropped, of which unreadable)."""
    if not path.exists():
        return 0, 0
    kept, torn = [], 0
    lines = path.read_text().splitlines()
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if record["step"] <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
    return len(lines) - len(kept), torn


def truncate_run_logs(run_dir: Path, step: int) -> list[str]:
    """Truncate every run log to ``step``; returns one message per log that lost lines."""
    messages = []
    for name in RUN_LOGS:
        dropped, torn = truncate(Path(run_dir) / name, step)
        if dropped:
            unreadable = f" ({torn} unreadable)" if torn else ""
            messages.append(f"{name}: dropped {dropped} line(s) after step {step}{unreadable}")
    return messages
