"""Dataset directories: feedsr writes only into directories it owns, never over a user's files.

Every dataset writer (the synthetic generator, the KuaiRand converter) claims its output directory
first. A missing or empty directory becomes feedsr's: a mark file is written before anything else,
so an interrupted write is still recognised as feedsr's own. A directory holding the mark, or a
dataset.json that a feedsr writer made, is feedsr's already. Anything else is refused with an error
that names the directory and what it holds: pointing ``data.path`` at one's own Parquet files
without a dataset.json once regenerated synthetic data over them.
"""

from __future__ import annotations

import json
from pathlib import Path

from feedsr.data.schema import DataError
from feedsr.data.sequences import DATASET_META

OWNER_MARK = ".feedsr-dataset"  # written first into every directory a feedsr writer claims
WRITERS = ("synthetic", "kuairand", "prepare")  # dataset.json "source" values of feedsr's writers


def owned(path: Path) -> bool:
    """Whether ``path`` is a directory a feedsr writer made (or is making)."""
    if (path / OWNER_MARK).is_file():
        return True
    meta = path / DATASET_META
    try:
        return meta.is_file() and json.loads(meta.read_text()).get("source") in WRITERS
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def check_writable(path: str | Path) -> None:
    """DataError unless a writer may fill ``path``: missing, empty, or feedsr's own."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise DataError(f"{path}: exists and is not a directory; a dataset is written into a directory")
    entries = sorted(p.name for p in path.iterdir())
    if entries and not owned(path):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise DataError(
            f"{path}: refusing to write a dataset into a directory feedsr did not create (it holds "
            f"{shown}). Point the output at a new or empty directory; to train on files already "
            f"there, add a {DATASET_META} (README: the data)")


def claim(path: str | Path) -> Path:
    """Check ``path`` (``check_writable``), create it and mark it as feedsr's; returns it."""
    path = Path(path)
    check_writable(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / OWNER_MARK).touch()
    return path
