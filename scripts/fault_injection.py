"""Fault injection on real training processes: kills, corrupted checkpoints, a full disk, user files.

    python scripts/fault_injection.py --json /tmp/fault_injection.json    # 20 kills, 10 corruptions
    python scripts/fault_injection.py --quick --json /tmp/fi.json         # 4 and 4 (the slow test)

Everything is real: ``python -m feedsr.train`` processes killed with SIGKILL, files of a checkpoint
damaged on disk, a tmpfs mounted small enough that a save runs out of space (needs root; skipped
with a message otherwise), a folder of user files handed to the trainer and the KuaiRand converter.
Each training run is a tiny model on a small synthetic dataset (1 torch thread per process) and is
compared with one uninterrupted run of the same command: per-step losses of train_log.jsonl must
be equal bit for bit.

1. kills: SIGKILL at random moments, aimed either inside a checkpoint save (a ``step-N/sharded``
   folder exists, ``COMPLETE`` does not yet) or between saves (0-30 ms after a random step that
   saves nothing). Whether a kill landed inside a save is decided afterwards: it left a partial
   step folder.
   After each kill the same command is restarted until the run finishes; every restart must resume
   from the newest checkpoint that verifies.
2. corruptions: the newest checkpoint of a finished run gets a bit flip, a truncation, a deleted
   file or a garbage COMPLETE marker; the restart must warn "not resuming from a damaged
   checkpoint", resume from the checkpoint before it and finish with the reference losses.
3. disk full: the run's output_root is a small tmpfs, so the third save runs out of space, once
   in DCP's sharded file and once in the rank file (torch.save); the run must stop with one line
   naming the path and "no space left", leave no partial folder and a newest checkpoint that
   verifies; after a remount with room it resumes to the reference losses.
4. user files: a folder of Spark-style part files and a README without dataset.json, as the
   trainer's data.path (synthetic generation on) and as prepare_kuairand.py's --out: both commands
   must fail with the refusal message and leave every file as it was (sha256 before and after).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from feedsr.runtime.checkpoint import COMPLETE, checkpoint_root, is_complete, latest_valid_checkpoint

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 24
CHECKPOINT_EVERY = 2
KILLS_PER_RUN = 5  # then the run is left to finish and the next kills go to a new run
DAMAGED = "not resuming from a damaged checkpoint"
REFUSED = "refusing to write a dataset into a directory feedsr did not create"
ENV = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def log(message: str) -> None:
    print(f"[fault] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ runs


def train_command(data_dir: Path, output_root: Path, run_id: str) -> list[str]:
    """A tiny model and run for a 2-core machine (as tests/conftest.py's tiny_overrides)."""
    return [
        sys.executable, "-m", "feedsr.train",
        f"data.path={data_dir}", "data.generate=null", "data.max_seq_len=64", "data.batch_size=32",
        "data.eval_batch_size=128", "data.num_workers=0", "data.shuffle_buffer=512",
        "model.embedding_dim=8", "model.num_layers=1", "model.ffn_dim=64", "model.dropout=0.1",
        "model.head.expert_dims=[32]", "model.head.tower_dims=[16]", "model.position_bias.score_position=null",
        f"output_root={output_root}", f"run_id={run_id}",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.num_threads=1",
        "trainer.log_every=1", f"trainer.max_steps={MAX_STEPS}",
        f"trainer.checkpoint_every={CHECKPOINT_EVERY}", "trainer.keep_checkpoints=3",
    ]


class Process:
    """A training process in its own session, its output collected line by line."""

    def __init__(self, command: list[str], cwd: Path, transcript: Path):
        self.proc = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.transcript = transcript
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def saw_step(self, step: int) -> bool:
        return any(line.startswith(f"[feedsr] step {step}: loss") for line in self.lines)

    def kill(self) -> bool:
        """SIGKILL to the process group; False if the run had already ended."""
        if not self.alive():
            return False
        os.killpg(self.proc.pid, signal.SIGKILL)
        return True

    def wait(self) -> int:
        rc = self.proc.wait()
        self.reader.join()
        self.transcript.write_text("\n".join(self.lines) + "\n")
        return rc

    def resumed_from(self) -> str | None:
        for line in self.lines:
            if m := re.match(r"\[feedsr\] resumed from (\S+) at step", line):
                return m.group(1)
        return None


def last_step(process: Process) -> int | None:
    steps = [int(m.group(1)) for line in process.lines if (m := re.match(r"\[feedsr\] step (\d+): loss", line))]
    return steps[-1] if steps else None


def run_to_end(command: list[str], cwd: Path, transcript: Path) -> tuple[int, Process]:
    process = Process(command, cwd, transcript)
    return process.wait(), process


def train_log(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def last_valid_record(run_dir: Path) -> list[dict]:
    path = run_dir / "valid_metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def partial_folders(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Step folders without COMPLETE: name -> (inode, ctime) to tell a new one from a leftover."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        if p.name.startswith("step-") and p.is_dir() and not is_complete(p):
            st = p.stat()
            found[p.name] = (st.st_ino, st.st_ctime_ns)
    return found


def newest_valid(run_dir: Path) -> tuple[str | None, list[str]]:
    path, problems = latest_valid_checkpoint(run_dir)
    return (str(path) if path else None), problems


@dataclass
class Workspace:
    root: Path
    data: Path
    reference: list[tuple[int, float]] = field(default_factory=list)
    reference_valid: list[dict] = field(default_factory=list)

    def command(self, output_root: Path, run_id: str) -> list[str]:
        return train_command(self.data, output_root, run_id)

    def transcript(self, name: str) -> Path:
        (self.root / "transcripts").mkdir(exist_ok=True)
        return self.root / "transcripts" / f"{name}.txt"


def prepare(root: Path) -> Workspace:
    from feedsr.prepare.synthetic import generate

    ws = Workspace(root, root / "data")
    generate(ws.data, num_members=1500, seed=0, max_seq_len=64)
    start = time.perf_counter()
    rc, _ = run_to_end(ws.command(root / "runs", "reference"), root, ws.transcript("reference"))
    if rc != 0:
        raise SystemExit(f"the uninterrupted reference run failed (rc={rc}); see {ws.transcript('reference')}")
    ws.reference = train_log(root / "runs" / "reference")
    ws.reference_valid = last_valid_record(root / "runs" / "reference")
    log(f"reference run: {len(ws.reference)} steps in {time.perf_counter() - start:.1f} s")
    return ws


# ------------------------------------------------------------------ 1. kills


def aim_inside_save(process: Process, run_dir: Path, rng: np.random.Generator) -> bool:
    """Kill while a save is under way: a step folder with sharded/ and no COMPLETE yet. Targets
    are checkpoint steps whose folder does not exist yet (a leftover partial folder of an earlier
    kill would be found before the save started). False if the run ended first."""
    root = checkpoint_root(run_dir)
    start = latest_valid_checkpoint(run_dir)[0]
    first = int(start.name.split("-")[1]) + CHECKPOINT_EVERY if start else CHECKPOINT_EVERY
    targets = [s for s in range(first, MAX_STEPS + 1, CHECKPOINT_EVERY) if not (root / f"step-{s}").exists()]
    targets = targets[int(rng.integers(0, min(3, len(targets)))):] if targets else []
    delay = float(rng.uniform(0, 0.03))  # a save takes ~40 ms: sharded part, rank file or marker
    while targets and process.alive():
        folder = root / f"step-{targets[0]}"
        if (folder / "sharded").exists() and not (folder / COMPLETE).exists():
            time.sleep(delay)
            return process.kill()
        if (folder / COMPLETE).exists():
            targets.pop(0)  # the save was quicker than the poll: aim at the next one
        time.sleep(0.0005)
    return False


def aim_between_saves(process: Process, run_dir: Path, rng: np.random.Generator) -> bool:
    """Kill 0-30 ms after a random step without a save (1-5 steps past the resumed one): in the
    next step's forward/backward or its log write, not in a save (a save follows its step's log
    line at once, so a longer delay after any step often lands in one)."""
    start = latest_valid_checkpoint(run_dir)[0]
    step = (int(start.name.split("-")[1]) if start else 0) + int(rng.integers(1, 6))
    step = min(step - (step % CHECKPOINT_EVERY == 0), MAX_STEPS - 1)  # a step that saves nothing
    delay = float(rng.uniform(0, 0.03))
    while process.alive():
        if process.saw_step(step):
            time.sleep(delay)
            return process.kill()
        time.sleep(0.002)
    return False


def kill_campaign(ws: Workspace, num_kills: int, rng: np.random.Generator) -> dict:
    aims = ["save", "between"] * (num_kills // 2) + ["save"] * (num_kills % 2)
    rng.shuffle(aims)
    pending, runs, kills = list(aims), [], []
    while pending:
        run_id = f"kills-{len(runs)}"
        run_dir = ws.root / "runs" / run_id
        record = {"run_id": run_id, "kills": [], "restarts_resumed_newest": True, "rc": None}
        for attempt in range(100):
            expected = newest_valid(run_dir)[0]
            before = partial_folders(run_dir)
            process = Process(ws.command(ws.root / "runs", run_id), ws.root,
                              ws.transcript(f"{run_id}-attempt-{attempt}"))
            aim = pending[0] if pending and len(record["kills"]) < KILLS_PER_RUN else None
            killed = False
            if aim == "save":
                killed = aim_inside_save(process, run_dir, rng)
            elif aim == "between":
                killed = aim_between_saves(process, run_dir, rng)
            rc = process.wait()
            resumed = process.resumed_from()
            if resumed is not None or not killed:  # a kill during start-up may precede the line
                if resumed != expected:
                    record["restarts_resumed_newest"] = False
                    log(f"{run_id} attempt {attempt}: resumed from {resumed}, newest valid was {expected}")
            if killed:
                pending.pop(0)
                after = partial_folders(run_dir)
                new = sorted(n for n, key in after.items() if before.get(n) != key)
                landed = "save" if new else "between"
                files = sorted(str(p.relative_to(checkpoint_root(run_dir) / new[0]))
                               for p in (checkpoint_root(run_dir) / new[0]).rglob("*")) if new else []
                kill = {"run_id": run_id, "attempt": attempt, "aimed": aim, "landed": landed,
                        "partial_folder": new[0] if new else None, "partial_files": files,
                        "last_step_logged": last_step(process), "resumed_from_at_start": resumed,
                        "rc": rc}
                record["kills"].append(kill)
                kills.append(kill)
                log(f"kill {len(kills)}/{num_kills}: {run_id} attempt {attempt}, aimed {aim}, landed {landed}"
                    + (f" ({new[0]}: {', '.join(files) or 'empty'})" if new else ""))
                continue
            record["rc"] = rc
            break
        run_dir_log = train_log(run_dir)
        record["losses_equal"] = record["rc"] == 0 and run_dir_log == ws.reference
        record["valid_equal"] = last_valid_record(run_dir) == ws.reference_valid
        record["survived"] = record["losses_equal"] and record["restarts_resumed_newest"]
        log(f"{run_id}: {len(record['kills'])} kills, rc={record['rc']}, "
            f"losses equal: {record['losses_equal']}")
        runs.append(record)
        if not record["kills"] and pending:
            log("a whole run finished without a kill landing; giving up on the remaining kills")
            break
    survived = sum(len(r["kills"]) for r in runs if r["survived"])
    return {"planned": num_kills, "delivered": len(kills), "survived": survived,
            "inside_saves": sum(k["landed"] == "save" for k in kills),
            "aimed_inside_saves": sum(k["aimed"] == "save" for k in kills),
            "runs": runs, "kills": kills,
            "met": len(kills) == num_kills and survived == num_kills}


# ------------------------------------------------------------------ 2. corruptions

KINDS = ("bit flip", "truncation", "deleted file", "garbage COMPLETE")


def damage(checkpoint: Path, kind: str, rng: np.random.Generator) -> str:
    """Damage one file of ``checkpoint``; returns what was done."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE)
    target = files[int(rng.integers(0, len(files)))]
    name = target.relative_to(checkpoint)
    if kind == "bit flip":
        data = bytearray(target.read_bytes())
        offset, bit = int(rng.integers(0, len(data))), int(rng.integers(0, 8))
        data[offset] ^= 1 << bit
        target.write_bytes(bytes(data))
        return f"{name}: bit {bit} of byte {offset} of {len(data)} flipped"
    if kind == "truncation":
        size = target.stat().st_size
        keep = int(rng.integers(0, size))
        os.truncate(target, keep)
        return f"{name}: truncated from {size} to {keep} bytes"
    if kind == "deleted file":
        target.unlink()
        return f"{name}: deleted"
    garbage = rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes()
    (checkpoint / COMPLETE).write_bytes(garbage)
    return f"{COMPLETE}: replaced by {len(garbage)} random bytes"


def corruption_campaign(ws: Workspace, num_corruptions: int, rng: np.random.Generator) -> dict:
    run_id = "corrupt"
    run_dir = ws.root / "runs" / run_id
    rc, _ = run_to_end(ws.command(ws.root / "runs", run_id), ws.root, ws.transcript("corrupt-base"))
    records = []
    for i in range(num_corruptions):
        kind = KINDS[i % len(KINDS)]
        newest, problems = latest_valid_checkpoint(run_dir)
        complete = sorted((p for p in checkpoint_root(run_dir).iterdir() if is_complete(p)),
                          key=lambda p: int(p.name.split("-")[1]))
        fallback = str(complete[-2]) if len(complete) > 1 else None
        what = damage(newest, kind, rng)
        rc, process = run_to_end(ws.command(ws.root / "runs", run_id), ws.root,
                                 ws.transcript(f"corrupt-{i}"))
        warnings = [line for line in process.lines if DAMAGED in line]
        record = {"kind": kind, "checkpoint": newest.name, "damage": what,
                  "warning": warnings[0] if warnings else None,
                  "resumed_from": process.resumed_from(), "expected_fallback": fallback, "rc": rc,
                  "losses_equal": rc == 0 and train_log(run_dir) == ws.reference,
                  "newest_verifies_after": latest_valid_checkpoint(run_dir)[0] == newest}
        record["detected"] = (bool(warnings) and record["resumed_from"] == fallback and record["losses_equal"])
        log(f"corruption {i + 1}/{num_corruptions}: {newest.name} {what}; detected: {record['detected']}")
        records.append(record)
    detected = sum(r["detected"] for r in records)
    return {"planned": num_corruptions, "detected": detected, "records": records,
            "met": detected == num_corruptions}


# ------------------------------------------------------------------ 3. disk full

PAGE_KB = 4  # tmpfs counts whole pages


def pages_kb(files) -> int:
    return sum(-(-p.stat().st_size // (PAGE_KB * 1024)) * PAGE_KB for p in files if p.is_file())


def tmpfs_sizes(ws: Workspace) -> dict[str, int]:
    """tmpfs sizes (kB) with room for the run's files and two checkpoints, and then for half of
    the third save's sharded file (the save fails in DCP's write) or for its sharded part and half
    of its rank file (the save fails in torch.save of rank-0.pt)."""
    run_dir = ws.root / "runs" / "reference"
    checkpoint = checkpoint_root(run_dir) / f"step-{MAX_STEPS}"
    run_files = [p for p in run_dir.rglob("*") if checkpoint_root(run_dir) not in p.parents
                 and p.name not in ("best.json", "valid_metrics.jsonl", "train_log.jsonl")]
    base = pages_kb(run_files) + PAGE_KB + 2 * pages_kb(checkpoint.rglob("*"))  # + a page of train_log
    sharded = pages_kb((checkpoint / "sharded").rglob("*"))
    rank_file = pages_kb([checkpoint / "rank-0.pt"])
    return {"sharded write (DCP)": base + sharded // 2, "rank-0.pt write": base + sharded + rank_file // 2}


def disk_full(ws: Workspace) -> dict:
    cases = {}
    for i, (phase, size_kb) in enumerate(tmpfs_sizes(ws).items()):
        mount_point = ws.root / f"tmpfs-{i}"
        mount_point.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            message = f"skipped: cannot mount a tmpfs ({mounted.stderr.strip() or mounted.returncode})"
            log(f"disk full: {message}")
            return {"skipped": True, "message": message, "met": None, "cases": {}}
        try:
            cases[phase] = _disk_full_run(ws, mount_point, size_kb, phase)
        finally:
            subprocess.run(["umount", str(mount_point)], check=False)
    return {"skipped": False, "cases": cases, "met": all(c["met"] for c in cases.values())}


def _disk_full_run(ws: Workspace, mount_point: Path, size_kb: int, phase: str) -> dict:
    run_dir = mount_point / "full"
    command = ws.command(mount_point, "full")
    rc, process = run_to_end(command, ws.root, ws.transcript(f"disk-full-{phase.split()[0]}"))
    lines = process.lines
    space = [line for line in lines if "no space left" in line.lower()]
    error_line = space[-1] if space else (lines[-1] if lines else "")
    newest, problems = newest_valid(run_dir)
    record = {"aimed_at": phase, "tmpfs_kb": size_kb, "rc": rc, "error_line": error_line,
              "says_no_space_left": len(space) == 1,
              "traceback": any(line.startswith("Traceback") for line in lines),
              "names_path": str(checkpoint_root(run_dir)) in error_line,
              "partial_folders_left": sorted(partial_folders(run_dir)),
              "newest_checkpoint": newest, "newest_problems": problems,
              "stopped_at_step": train_log(run_dir)[-1][0] if train_log(run_dir) else 0}
    record["stop_ok"] = (rc != 0 and record["says_no_space_left"] and record["names_path"]
                         and not record["traceback"] and not record["partial_folders_left"]
                         and newest is not None and not problems)
    remount = subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)],
                             capture_output=True, text=True)
    record |= {"remounted": remount.returncode == 0, "resumed_from": None, "losses_equal": False}
    if record["remounted"]:
        resume_rc, process = run_to_end(command, ws.root,
                                        ws.transcript(f"disk-full-{phase.split()[0]}-resume"))
        record |= {"resume_rc": resume_rc, "resumed_from": process.resumed_from(),
                   "losses_equal": resume_rc == 0 and train_log(run_dir) == ws.reference}
    else:
        record["remount_error"] = remount.stderr.strip()
    record["resumed_ok"] = record["losses_equal"] and record["resumed_from"] == newest
    record["met"] = record["stop_ok"] and record["resumed_ok"]
    log(f"disk full in the {phase}: rc={rc}, {error_line!r}; resumed to equal losses: {record['losses_equal']}")
    return record


# ------------------------------------------------------------------ 4. user files


def user_folder(path: Path, rng: np.random.Generator) -> None:
    """What a user's Spark export looks like: part files per split, markers, checksums, a README."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir()
    (path / "README.md").write_text("# my feed logs\nExported by the nightly Spark job; do not edit.\n")
    for split in ("", "train", "valid"):
        folder = path / split
        folder.mkdir(exist_ok=True)
        table = pa.table({"member_id": rng.integers(0, 10**6, 50), "score": rng.random(50)})
        name = f"part-00000-{rng.integers(0, 2**63):x}-c000.snappy.parquet"
        pq.write_table(table, folder / name, compression="snappy")
        (folder / f".{name}.crc").write_bytes(rng.bytes(16))
        (folder / "_SUCCESS").write_text("")


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def user_files(ws: Workspace, rng: np.random.Generator) -> dict:
    folder = ws.root / "user-data"
    user_folder(folder, rng)
    src = ws.root / "empty-kuairand-src"
    src.mkdir()
    commands = {
        "train with data.path=<user folder>, synthetic generation on": [
            *[a for a in ws.command(ws.root / "runs", "user-data")
              if not a.startswith(("data.path=", "data.generate="))],
            f"data.path={folder}", "data.generate.num_members=300"],
        "prepare_kuairand.py --out <user folder>": [
            sys.executable, str(REPO / "scripts" / "prepare_kuairand.py"), "--src", str(src),
            "--out", str(folder),
            "--train-end", "20220502", "--valid-end", "20220505", "--members", "10"],
    }
    records = []
    for label, command in commands.items():
        before = snapshot(folder)
        result = subprocess.run(command, cwd=ws.root, env=ENV, capture_output=True, text=True)
        after = snapshot(folder)
        output = result.stdout + result.stderr
        refusal = [line for line in output.splitlines() if REFUSED in line]
        touched = sorted(n for n in before if after.get(n) != before[n])
        added = sorted(set(after) - set(before))
        record = {"command": label, "rc": result.returncode, "files": len(before), "touched": touched,
                  "added": added, "refusal": refusal[0] if refusal else None,
                  "traceback": "Traceback" in output}
        record["met"] = result.returncode != 0 and bool(refusal) and not touched and not added
        ws.transcript(f"user-files-{len(records)}").write_text(output)
        log(f"user files, {label}: rc={result.returncode}, {len(touched)} touched, {len(added)} added")
        records.append(record)
    touched = sum(len(r["touched"]) + len(r["added"]) for r in records)
    return {"files": len(snapshot(folder)), "touched": touched,
            "records": records, "met": all(r["met"] for r in records)}


# ------------------------------------------------------------------ report


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def disk_row(phase: str, c: dict) -> tuple[str, str, str, str]:
    verifies = c["newest_checkpoint"] is not None and not c["newest_problems"]
    how = "traceback" if c["traceback"] else "one line"
    measured = (f"rc={c['rc']} after step {c['stopped_at_step']}, {how}, "
                f"names path: {yes(c['names_path'])}, says no space left: {yes(c['says_no_space_left'])}, "
                f"partial left: {len(c['partial_folders_left'])}, newest verifies: {yes(verifies)}, "
                f"resumed equal: {yes(c['resumed_ok'])}")
    return f"disk full: {phase}", measured, "one line, no space left, resumes equal", yes(c["met"])


def table(result: dict) -> str:
    kills, corr, disk, user = result["kills"], result["corruptions"], result["disk_full"], result["user_files"]
    if disk["skipped"]:
        disk_rows = [("disk full (tmpfs)", disk["message"], "one line, no space left, resumes equal", "skipped")]
    else:
        disk_rows = [disk_row(phase, c) for phase, c in disk["cases"].items()]
    rows = [
        ("SIGKILL, restart until done",
         f"{kills['survived']}/{kills['planned']} survived ({kills['inside_saves']} inside saves, "
         f"{kills['delivered'] - kills['inside_saves']} between)",
         f"{kills['planned']}/{kills['planned']}, losses equal", yes(kills["met"])),
        ("corrupted newest checkpoint",
         f"{corr['detected']}/{corr['planned']} detected, fallen back, losses equal",
         f"{corr['planned']}/{corr['planned']}", yes(corr["met"])),
        *disk_rows,
        ("user files as data.path / --out",
         f"{user['touched']} of {user['files']} files touched, "
         f"{sum(r['refusal'] is not None for r in user['records'])}/{len(user['records'])} refused",
         "0 touched, refused", yes(user["met"])),
    ]
    widths = [max(len(r[i]) for r in rows + [("fault", "measured", "target", "met")]) for i in range(4)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(("fault", "measured", "target", "met"), widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def details(result: dict) -> str:
    """One line per kill, corruption and refused command."""
    lines = ["kills (run, attempt, aimed, landed, last step logged, partial folder and its files):"]
    for k in result["kills"]["kills"]:
        files = ", ".join(k["partial_files"]) or "empty"
        partial = f"{k['partial_folder']} [{files}]" if k["partial_folder"] else "-"
        lines.append(f"  {k['run_id']} #{k['attempt']}: aimed {k['aimed']:<7} landed {k['landed']:<7} "
                     f"after step {k['last_step_logged']}, {partial}")
    for r in result["kills"]["runs"]:
        lines.append(f"  {r['run_id']}: {len(r['kills'])} kills, final rc {r['rc']}, every restart from the newest "
                     f"valid checkpoint: {r['restarts_resumed_newest']}, losses equal: {r['losses_equal']}, "
                     f"final validation equal: {r['valid_equal']}")
    lines.append("corruptions (damage, warned, resumed from, losses equal):")
    for c in result["corruptions"]["records"]:
        resumed = Path(c["resumed_from"]).name if c["resumed_from"] else None
        lines.append(f"  {c['checkpoint']} {c['damage']}: warned {c['warning'] is not None}, resumed from "
                     f"{resumed}, losses equal {c['losses_equal']}")
    for phase, c in result["disk_full"]["cases"].items():
        lines.append(f"disk full, {phase} ({c['tmpfs_kb']} kB tmpfs): {c['error_line']}")
    for r in result["user_files"]["records"]:
        lines.append(f"user files, {r['command']}: rc {r['rc']}, {len(r['touched'])} touched, "
                     f"{len(r['added'])} added, traceback: {r['traceback']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    p.add_argument("--corruptions", type=int, default=10, help="checkpoint corruptions (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill plan, moments and damages")
    p.add_argument("--quick", action="store_true", help="4 kills and 4 corruptions (the slow test)")
    p.add_argument("--json", type=Path, help="write the full result here")
    p.add_argument("--keep", action="store_true", help="keep the work folder (runs, transcripts)")
    args = p.parse_args(argv)
    if args.quick:
        args.kills, args.corruptions = 4, 4
    if args.kills < 0 or args.corruptions < 0:
        p.error(f"--kills and --corruptions must be >= 0, got {args.kills} and {args.corruptions}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    started = datetime.now(timezone.utc)
    root = Path(tempfile.mkdtemp(prefix="feedsr-fault-"))
    log(f"work folder {root}")
    try:
        ws = prepare(root)
        result = {"started_utc": started.isoformat(timespec="seconds"),
                  "command": " ".join(["python", "scripts/fault_injection.py",
                                       *(argv if argv is not None else sys.argv[1:])]),
                  "seed": args.seed, "max_steps": MAX_STEPS, "checkpoint_every": CHECKPOINT_EVERY,
                  "kills": kill_campaign(ws, args.kills, rng),
                  "corruptions": corruption_campaign(ws, args.corruptions, rng),
                  "disk_full": disk_full(ws),
                  "user_files": user_files(ws, rng)}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result["seconds"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    parts = ("kills", "corruptions", "disk_full", "user_files")
    result["all_met"] = all(result[k]["met"] is not False for k in parts)  # None: skipped
    print(f"fault injection, {result['started_utc']}, {result['seconds']} s, seed {args.seed}")
    print(table(result))
    print(details(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
