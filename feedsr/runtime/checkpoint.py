"""Checkpoints: ``<run>/checkpoints/step-N/`` folders that are complete only once marked so.

Layout of one checkpoint:

    step-N/sharded/        torch.distributed.checkpoint: model (sharded tables included) and the
                           fused sparse optimizer's state; written collectively by all ranks
    step-N/rank-R.pt       per rank: dense optimizer, step, data position, RNG states, trainer state
    step-N/COMPLETE        written last, by rank 0, after every rank finished: a folder without it
                           (a save interrupted by a kill) is never loaded and is cleaned up later.
                           JSON: step, world size and the sha256 of every other file, so a
                           corrupted or truncated file is found before it is loaded: resuming then
                           falls back, loudly, to the newest checkpoint that verifies.

A save that fails (a full disk, an unwritable file) on any rank removes its partial folder on every
rank's word and raises CheckpointError naming the path; the previous checkpoints stay as they were.

Resuming needs the same world size (each rank reloads its own rank-R.pt; the sharded part could be
resharded by DCP, but the data position and RNG streams are per rank). Loading only the weights
(evaluation, ``trainer.init_from``) works from any world size.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from feedsr.runtime.collectives import all_reduce, barrier
from feedsr.runtime.distributed import DistContext
from feedsr.runtime.sharding import unwrap

COMPLETE = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the path and the reason."""


class NonFiniteStateError(RuntimeError):
    """Parameters or optimizer state hold NaN/inf: such a state is never saved as complete."""


def nonfinite_entries(tree, prefix: str = "") -> list[str]:
    """Names of the tensors in ``tree`` (nested dicts/lists of tensors; sharded tables count by
    their local shards) that hold a NaN or an infinity."""
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in nonfinite_entries(v, f"{prefix}{k}.")]
    if isinstance(tree, (list, tuple)):
        return [n for i, v in enumerate(tree) for n in nonfinite_entries(v, f"{prefix}{i}.")]
    if hasattr(tree, "local_shards"):  # ShardedTensor: this rank's rows only
        tensors = [shard.tensor for shard in tree.local_shards()]
    elif isinstance(tree, torch.Tensor):
        tensors = [tree]
    else:
        return []
    bad = any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors)
    return [prefix.rstrip(".")] if bad else []


def check_finite_state(state: dict, step: int) -> None:
    """A collective: NonFiniteStateError on every rank if any rank's ``state`` is not finite."""
    bad = nonfinite_entries(state)
    total = int(all_reduce(torch.tensor([len(bad)], dtype=torch.int64)))
    if total:
        mine = f" (this rank: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})" if bad else ""
        raise NonFiniteStateError(
            f"step {step}: {total} parameter or optimizer tensor(s) hold NaN/inf{mine}; the update of "
            f"step {step} diverged. Not saved; the newest complete checkpoint is still the last "
            "finite state. Lower optimizer.lr or check the data.")

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found)


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = [p for _, p in _step_dirs(checkpoint_root(run_dir)) if is_complete(p)]
    return complete[-1] if complete else None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sharded_state(model, sparse_optimizer) -> dict:
    """The collectively saved part; the same structure is the target of a load."""
    state = {"model": model.state_dict()}
    if sparse_optimizer is not None:
        state["sparse_optimizer"] = sparse_optimizer.state_dict()
    return state


def save_checkpoint(run_dir: Path, step: int, model, sparse_optimizer, rank_state: dict,
                    ctx: DistContext, keep: int, protect: int | None = None) -> Path:
    """Save collectively; mark complete only after every rank wrote; keep the newest ``keep``
    (and step ``protect``: the best checkpoint by validation). A state with NaN/inf anywhere is
    refused before anything is written (NonFiniteStateError on every rank)."""
    path = checkpoint_path(run_dir, step)
    check_finite_state({"sharded": sharded_state(model, sparse_optimizer), "rank": rank_state}, step)
    if ctx.is_main and path.exists():  # a leftover of an interrupted save of this same step
        shutil.rmtree(path)
    barrier()
    error = _attempt(path, lambda: _write_state(path, model, sparse_optimizer, rank_state, ctx))
    _agree_or_remove(path, error, ctx)
    error = _attempt(path, lambda: write_marker(path, step, ctx.world_size)) if ctx.is_main else ""
    _agree_or_remove(path, error, ctx)
    if ctx.is_main:
        prune(checkpoint_root(run_dir), keep, protect)
    barrier()
    return path


def _write_state(path: Path, model, sparse_optimizer, rank_state: dict, ctx: DistContext) -> None:
    dcp.save(sharded_state(model, sparse_optimizer), checkpoint_id=path / "sharded")
    tmp = path / f"rank-{ctx.rank}.pt.tmp"
    torch.save(rank_state | {"rank": ctx.rank, "world_size": ctx.world_size, "rng": rng_state()}, tmp)
    os.replace(tmp, path / f"rank-{ctx.rank}.pt")


def _attempt(path: Path, write) -> str:
    """'' if ``write()`` succeeds, else what went wrong, naming ``path`` (a full disk says so)."""
    try:
        write()
        return ""
    except (OSError, CheckpointException, RuntimeError) as e:
        if _disk_full(e, path):
            return f"{path}: no space left on the device"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        return f"{path}: {reason}"


def _disk_full(e: Exception, path: Path) -> bool:
    """ENOSPC; or torch.save's short write ("unexpected pos ..."), a RuntimeError without an error
    code, on a device that the partial checkpoint has left with next to no free space."""
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e):
        return True
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free < 1 << 20
    except OSError:
        return False


def _agree_or_remove(path: Path, error: str, ctx: DistContext) -> None:
    """A collective: if any rank failed, remove the partial checkpoint and raise on every rank."""
    if not int(all_reduce(torch.tensor([int(bool(error))]))):
        return
    if ctx.is_main:
        shutil.rmtree(path, ignore_errors=True)
    barrier()
    raise CheckpointError(f"saving failed: {error or 'another rank could not write its part'}; the "
                          f"partial {path.name} was removed and the older checkpoints are unchanged")


def file_digests(path: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder but its marker (relative path -> hex)."""
    path, digests = Path(path), {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(COMPLETE)):
        with open(file, "rb") as f:
            digests[str(file.relative_to(path))] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def write_marker(path: Path, step: int, world_size: int) -> None:
    """COMPLETE, written last and atomically: the folder is whole, with its files' checksums."""
    marker = Path(path) / (COMPLETE + ".tmp")
    record = {"step": step, "world_size": world_size, "sha256": file_digests(path)}
    marker.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(marker, Path(path) / COMPLETE)


def read_marker(path: Path) -> dict | None:
    """The marker's record; ``{"world_size": W}`` for a marker from before checksums ("step N,
    world size W"); None if unreadable."""
    text = (Path(path) / COMPLETE).read_text(errors="replace")
    try:
        record = json.loads(text)
        return record if isinstance(record, dict) else None
    except json.JSONDecodeError:
        match = re.fullmatch(r"step \d+, world size (\d+)\s*", text)
        return {"world_size": int(match.group(1))} if match else None


def verify(path: Path) -> str | None:
    """None if the checkpoint's files match its marker; else what is wrong, naming the file."""
    path = Path(path)
    record = read_marker(path)
    if record is None:
        return f"{path / COMPLETE} is unreadable"
    found = file_digests(path)
    for name, digest in record.get("sha256", {}).items():
        if name not in found:
            return f"{path / name} is missing"
        if found[name] != digest:
            return f"{path / name} does not match its checksum (corrupted or truncated)"
    return None


def latest_valid_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint that verifies, and what was wrong with newer ones."""
    problems = []
    for _, path in reversed(_step_dirs(checkpoint_root(run_dir))):
        if is_complete(path):
            problem = verify(path)
            if problem is None:
                return path, problems
            problems.append(problem)
    return None, problems


TABLE_SIZES = "table_sizes.json"  # in the run directory: the rows of every embedding table


def record_table_sizes(run_dir: Path, sizes: dict[str, int]) -> None:
    """Write the run's table sizes (config nulls resolved against the dataset's vocabularies)."""
    (Path(run_dir) / TABLE_SIZES).write_text(json.dumps(sizes, sort_keys=True) + "\n")


def table_size_changes(run_dir: Path, sizes: dict[str, int]) -> list[str]:
    """'feature: recorded -> now' for every table whose size differs from the run's record."""
    path = Path(run_dir) / TABLE_SIZES
    if not path.exists():
        return []
    recorded = json.loads(path.read_text())
    return [f"{k}: {recorded.get(k)} -> {sizes.get(k)}" for k in sorted(set(recorded) | set(sizes))
            if recorded.get(k) != sizes.get(k)]


def check_writable_root(run_dir: Path, rank: int) -> None:
    """CheckpointError now, rather than at the first save, if checkpoints cannot be written."""
    root = checkpoint_root(run_dir)
    probe = root / f".write-probe-{rank}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{root}: cannot write checkpoints there ({e.strerror})") from None


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step-{step}"


def prune(root: Path, keep: int, protect: int | None = None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and ``protect``), and incomplete
    ones older than them."""
    dirs = _step_dirs(root)
    complete = [s for s, p in dirs if is_complete(p)]
    if not complete:
        return
    kept = set(complete[-keep:]) | {protect}
    newest = complete[-1]
    for step, p in dirs:
        if step not in kept and (is_complete(p) or step < newest):
            shutil.rmtree(p, ignore_errors=True)


def check_complete(path: Path) -> None:
    """CheckpointError naming ``path`` unless it is a complete checkpoint whose files verify."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker: an "
                              "interrupted save, or not a step-N folder)")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"{path}: cannot be used: {problem}")


def load_sharded(path: Path, model, sparse_optimizer) -> None:
    """Load model weights (and the sparse optimizer if given) from a complete checkpoint."""
    path = Path(path)
    check_complete(path)
    state = sharded_state(model, sparse_optimizer)
    skipped = _skip_unused_context_norm(path, model, state["model"])
    dcp.load(state, checkpoint_id=path / "sharded")
    loaded = model.load_state_dict(state["model"], strict=not skipped)
    if skipped and (set(loaded.missing_keys) != set(skipped) or loaded.unexpected_keys):
        raise CheckpointError(f"{path}: its weights do not fit the model (missing {loaded.missing_keys}, "
                              f"unexpected {loaded.unexpected_keys})")
    if sparse_optimizer is not None:
        sparse_optimizer.load_state_dict(state["sparse_optimizer"])


def _skip_unused_context_norm(path: Path, model, model_state: dict) -> list[str]:
    """Checkpoints from before ``model.context_norm`` lack its buffers. A model with the option off
    (as ``run_config`` builds for such a run) does not use them: they are not loaded. With the
    option on, the weights were trained on other inputs: refused with the reason."""
    saved = dcp.FileSystemReader(str(path / "sharded")).read_metadata().state_dict_metadata
    missing = [k for k in model_state if "context_norm." in k and f"model.{k}" not in saved]
    if not missing:
        return []
    norm = getattr(unwrap(model), "context_norm", None)
    if norm is not None and norm.enabled:
        raise CheckpointError(f"{path} was saved before feedsr standardised the context features and "
                              "its model was trained on them raw: load it with model.context_norm=false "
                              "(scoring does so from the run's config.yaml), or train a new run")
    for key in missing:
        del model_state[key]
    return missing


def saved_world_size(path: Path) -> int | None:
    """The world size a complete checkpoint's marker records."""
    record = read_marker(path) if is_complete(path) else None
    return record.get("world_size") if record else None


def load_rank_state(path: Path, ctx: DistContext) -> dict:
    """This rank's own state (never another rank's: HDET multipliers and RNGs are per rank)."""
    saved_by = saved_world_size(path)
    if saved_by is not None and saved_by != ctx.world_size:
        raise CheckpointError(
            f"{path} was saved by {saved_by} ranks, this run has {ctx.world_size}; resuming needs "
            "the same world size (use trainer.init_from to warm-start instead)")
    file = Path(path) / f"rank-{ctx.rank}.pt"
    if not file.is_file():
        raise CheckpointError(f"{file} missing: the checkpoint is damaged (it was saved by "
                              f"{saved_by or 'an unknown number of'} ranks, each writing its rank file)")
    state = torch.load(file, weights_only=False)
    if state["world_size"] != ctx.world_size:  # a marker from before it recorded the world size
        raise CheckpointError(
            f"{path} was saved by {state['world_size']} ranks, this run has {ctx.world_size}; "
            "resuming needs the same world size (use trainer.init_from to warm-start instead)")
    return state
