#!/usr/bin/env python
"""``feedsr.prepare`` on synthetic flat logs: wall time per step, impressions/s, peak memory.

    python scripts/bench_prepare.py [--sizes 1000000 10000000] [--work /tmp/feedsr_bench_prepare]
                                    [--memory-limit 4GB] [--json out.json] [--each-feature 100000]

Per size N: writes a KuaiRand-like flat log of N impressions (Parquet, in pieces of
``PIECE_ROWS``, so generating 100M needs no 100M arrays) with an item and a member table, and a
prepare config of 41 point-in-time features plus 3 side-table attributes and 5 categoricals; then
runs ``python -m feedsr.prepare`` in a child process, so generation does not count in its memory.
The child's peak resident memory comes from ``wait4`` (its own ``ru_maxrss``); step times from the
pipeline's progress lines. A log already generated for the same N is reused.

``--each-feature N`` instead times the feature query once per feature alone (in this process) on
an N-impression log, minus the same query without features: which feature kinds cost what.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
PIECE_ROWS = 2_000_000
T0_MS = 1_649_347_200_000  # 2022-04-08 00:00 Asia/Shanghai, KuaiRand's first day
DAY_MS = 86_400_000
SPAN_DAYS = 28
ACTION_RATES = {"click": 0.35, "long_view": 0.25, "like": 0.03, "follow": 0.005, "comment": 0.004,
                "forward": 0.003, "hate": 0.002, "profile_enter": 0.02}
SESSIONS_PER_MEMBER = 24  # impressions cluster in sessions of up to SESSION_MS
SESSION_MS = 20 * 60_000
TABS, TAGS = 15, 60


def shape(n: int) -> dict[str, int]:
    """Entity counts for N impressions: about 200 impressions a member, 50 an item, 8 items an author."""
    items = max(1_000, n // 50)
    return {"members": max(500, n // 200), "items": items, "authors": max(100, items // 8)}


def log_piece(rng: np.random.Generator, rows: int, sizes: dict[str, int], sessions: np.ndarray) -> pa.Table:
    """``rows`` impressions: skewed member activity and item popularity, times clustered in
    sessions (``sessions``: (members, SESSIONS_PER_MEMBER) start times), ~8 actions at
    KuaiRand-like rates."""
    member = (sizes["members"] * rng.random(rows) ** 2).astype(np.int64)
    start = sessions[member, rng.integers(0, SESSIONS_PER_MEMBER, rows)]
    columns = {
        "user_id": member,
        "video_id": (sizes["items"] * rng.random(rows) ** 2).astype(np.int64),
        "time_ms": start + rng.integers(0, SESSION_MS, rows),
        "position": rng.integers(0, 10, rows),
        "tab": rng.integers(0, TABS, rows),
    }
    columns |= {f"is_{a}": (rng.random(rows) < p).astype(np.int8) for a, p in ACTION_RATES.items()}
    return pa.table(columns)


def side_tables(rng: np.random.Generator, sizes: dict[str, int]) -> tuple[pa.Table, pa.Table]:
    items, members = np.arange(sizes["items"]), np.arange(sizes["members"])
    video = pa.table({
        "video_id": items, "author_id": rng.integers(0, sizes["authors"], len(items)),
        "tag": rng.integers(0, TAGS, len(items)),
        "video_type": np.array(["NORMAL", "AD"])[(rng.random(len(items)) < 0.05).astype(int)],
        "duration_ms": rng.integers(5_000, 300_000, len(items)).astype(np.float64),
        "upload_ms": T0_MS - rng.integers(0, 365, len(items)) * DAY_MS,
    })
    user = pa.table({
        "user_id": members,
        "active_degree": np.array(["full_active", "high_active", "middle_active", "low_active"])[
            rng.integers(0, 4, len(members))],
        "follow_range": rng.integers(0, 8, len(members)),
        "register_days": rng.integers(1, 2_000, len(members)).astype(np.float64),
        "fans_num": rng.pareto(1.5, len(members)),
    })
    return video, user


def generate(work: Path, n: int, seed: int = 0) -> None:
    """log.parquet, video.parquet, user.parquet under ``work`` (skipped if there for this N)."""
    done = work / "generated.json"
    if done.exists() and json.loads(done.read_text()) == {"n": n, "seed": seed}:
        return
    work.mkdir(parents=True, exist_ok=True)
    rng, sizes = np.random.default_rng(seed), shape(n)
    sessions = T0_MS + rng.integers(0, SPAN_DAYS * DAY_MS - SESSION_MS, (sizes["members"], SESSIONS_PER_MEMBER))
    writer = None
    for lo in range(0, n, PIECE_ROWS):
        piece = log_piece(rng, min(PIECE_ROWS, n - lo), sizes, sessions)
        writer = writer or pq.ParquetWriter(work / "log.parquet", piece.schema, compression="zstd")
        writer.write_table(piece, row_group_size=256 * 1024)
    writer.close()
    video, user = side_tables(rng, sizes)
    pq.write_table(video, work / "video.parquet")
    pq.write_table(user, work / "user.parquet")
    done.write_text(json.dumps({"n": n, "seed": seed}))


def rate(name: str, keys: list[str], action: str, window_s: int | None = None, prior: float = 0.1) -> dict:
    feature = {"name": name, "kind": "action_rate", "keys": keys, "action": action,
               "prior_rate": prior, "prior_strength": 20.0}
    return feature | ({"window_s": window_s} if window_s else {})


def imps(name: str, keys: list[str], window_s: int | None = None) -> dict:
    return {"name": name, "kind": "impressions", "keys": keys, "log1p": True} | (
        {"window_s": window_s} if window_s else {})


HOUR, DAY, WEEK = 3_600, 86_400, 7 * 86_400
FEATURES = [
    imps("member_imps", ["member"]), imps("member_imps_1h", ["member"], HOUR),
    rate("member_click_rate", ["member"], "click", prior=0.35),
    rate("member_click_rate_24h", ["member"], "click", DAY, prior=0.35),
    rate("member_like_rate", ["member"], "like", prior=0.03),
    rate("member_long_view_rate", ["member"], "long_view", prior=0.25),
    {"name": "member_since_imp", "kind": "since_impression", "keys": ["member"], "log1p": True},
    {"name": "member_since_click", "kind": "since_action", "keys": ["member"], "action": "click", "log1p": True},
    {"name": "member_click_last10", "kind": "last_k_mean", "keys": ["member"], "action": "click", "k": 10},
    imps("item_imps", ["item"]), imps("item_imps_1h", ["item"], HOUR), imps("item_imps_24h", ["item"], DAY),
    rate("item_click_rate", ["item"], "click", prior=0.35),
    rate("item_click_rate_1h", ["item"], "click", HOUR, prior=0.35),
    rate("item_click_rate_24h", ["item"], "click", DAY, prior=0.35),
    rate("item_click_rate_7d", ["item"], "click", WEEK, prior=0.35),
    rate("item_like_rate", ["item"], "like", prior=0.03),
    rate("item_like_rate_7d", ["item"], "like", WEEK, prior=0.03),
    rate("item_follow_rate", ["item"], "follow", prior=0.005),
    rate("item_long_view_rate_24h", ["item"], "long_view", DAY, prior=0.25),
    rate("item_hate_rate", ["item"], "hate", prior=0.002),
    {"name": "item_click_last10", "kind": "last_k_mean", "keys": ["item"], "action": "click", "k": 10},
    {"name": "item_since_imp", "kind": "since_impression", "keys": ["item"], "log1p": True},
    imps("author_imps", ["author"]),
    rate("author_click_rate", ["author"], "click", prior=0.35),
    rate("author_like_rate_7d", ["author"], "like", WEEK, prior=0.03),
    rate("author_follow_rate", ["author"], "follow", prior=0.005),
    rate("tag_click_rate_24h", ["tag"], "click", DAY, prior=0.35),
    rate("tag_long_view_rate", ["tag"], "long_view", prior=0.25),
    rate("tab_click_rate_1h", ["tab"], "click", HOUR, prior=0.35),
    imps("member_author_imps", ["member", "author"]),
    rate("member_author_click_rate", ["member", "author"], "click", prior=0.35),
    {"name": "member_author_since_click", "kind": "since_action", "keys": ["member", "author"],
     "action": "click", "log1p": True},
    rate("member_tag_click_rate", ["member", "tag"], "click", prior=0.35),
    {"name": "member_tag_click_last5", "kind": "last_k_mean", "keys": ["member", "tag"], "action": "click", "k": 5},
    rate("item_tab_click_rate", ["item", "tab"], "click", prior=0.35),
    imps("item_tab_imps_24h", ["item", "tab"], DAY),
    {"name": "item_age_days", "kind": "item_age"},
    {"name": "session_imps", "kind": "session_impressions"},
    {"name": "session_clicks", "kind": "session_actions", "action": "click"},
    {"name": "local_hour", "kind": "hour_of_day"},
]


def prepare_config(work: Path, memory_limit: str, window_method: str = "auto") -> dict:
    """The prepare config: 7 days of history, then train 14 days, valid 4, test 3."""
    bounds = [str((T0_MS + d * DAY_MS) // 1000) for d in (7, 21, 25, 28)]
    return {
        "name": "bench", "logs": [str(work / "log.parquet")], "out": str(work / "out"),
        "columns": {"member": "user_id", "item": "video_id", "timestamp": "time_ms", "position": "position",
                    "actions": {a: f"is_{a}" for a in ACTION_RATES}, "categoricals": {"tab": "tab"}},
        "time": {"unit": "ms", "timezone": "Asia/Shanghai"},
        "item_table": {"path": str(work / "video.parquet"), "key": "video_id", "author": "author_id",
                       "numeric": ["duration_ms"], "categorical": ["tag", "video_type"], "created": "upload_ms"},
        "member_table": {"path": str(work / "user.parquet"), "key": "user_id",
                         "numeric": ["register_days", "fans_num"], "categorical": ["active_degree", "follow_range"]},
        "features": FEATURES,
        "splits": {"names": ["train", "valid", "test"], "boundaries": bounds},
        "max_seq_len": 256, "rows_per_file": 8192,
        "engine": {"memory_limit": memory_limit, "temp_directory": str(work / "duckdb_tmp"),
                   "window_method": window_method},
    }


PROGRESS = re.compile(r"^\[prepare\s+([\d.]+)s\] (.*)$")
# Step of the pipeline that a progress line closes (see feedsr/prepare/pipeline.py).
STEPS = [("checked", "checks"), ("dropped", "read + dedup"), ("built events", "events + joins"),
         ("built vocabularies", "vocabularies"), ("computed", "feature tables"),
         ("wrote", "per-chunk features, windowing + writing")]


def key_set_lines(lines: list[str]) -> list[str]:
    """The per-key-set progress lines (seconds since start, key set, window method)."""
    return [line.split("] ", 1)[0].split()[-1] + " " + line.split("] ", 1)[1]
            for line in lines if "features keyed by" in line]


def step_times(lines: list[str]) -> dict[str, float]:
    """Seconds per step, from the times on the progress lines (the last line of a step closes it)."""
    ends = {}
    for line in lines:
        match = PROGRESS.match(line)
        if match:
            step = next((s for prefix, s in STEPS if match[2].startswith(prefix)), "per-chunk features, windowing + writing")
            ends[step] = float(match[1])
    steps, before = {}, 0.0
    for _, step in STEPS:
        if step in ends:
            steps[step], before = round(ends[step] - before, 1), ends[step]
    return steps


def run_prepare(work: Path, cfg: dict) -> tuple[float, int, list[str]]:
    """Run ``python -m feedsr.prepare`` on ``cfg``; (seconds, child peak RSS in bytes, output lines)."""
    conf = work / "conf" / "prepare"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "bench.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    cmd = [sys.executable, "-m", "feedsr.prepare", "--config-dir", str(work / "conf"), "prepare=bench"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in child.stdout:
        print("   ", line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest child so far
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"feedsr.prepare failed ({child.returncode}) on {work}")
    return seconds, usage.ru_maxrss * 1024, lines  # Linux: ru_maxrss in KiB


def bench(n: int, work: Path, memory_limit: str, window_method: str = "auto") -> dict:
    start = time.perf_counter()
    generate(work, n)
    print(f"N = {n:,}: log ready in {time.perf_counter() - start:.0f} s ({shape(n)})", flush=True)
    seconds, peak, lines = run_prepare(work, prepare_config(work, memory_limit, window_method))
    meta = json.loads((work / "out" / "dataset.json").read_text())
    steps = step_times(lines)
    steps["startup + exit"] = round(seconds - sum(steps.values()), 1)
    return {"impressions": n, "seconds": seconds, "impressions_per_s": n / seconds,
            "peak_rss_gb": peak / 1e9, "steps_s": steps, "memory_limit": memory_limit,
            "window_method": window_method, "key_sets": key_set_lines(lines),
            "features": len(meta["features"]), "context": len(meta["context"]),
            "splits": meta["splits"], "duplicates_dropped": meta["duplicates_dropped"]}


def each_feature(n: int, work: Path, memory_limit: str) -> dict[str, float]:
    """Seconds of the feature queries with one feature, minus without any, per feature: the
    whole-log feature table, or the per-chunk query run over the whole log as one chunk."""
    import dataclasses

    from feedsr.prepare.config import to_prepare_config
    from feedsr.prepare.engine import DuckDBEngine
    from feedsr.prepare.features import feature_tables, plan_key_sets, range_queries
    from feedsr.prepare.pipeline import build_events, largest_key_rows, load_logs

    generate(work, n)
    cfg = to_prepare_config(prepare_config(work, memory_limit))
    engine = DuckDBEngine(cfg.engine)
    load_logs(engine, cfg, n)
    build_events(engine, cfg)
    con = engine.con
    [(top,)] = engine.fetch("SELECT MAX(rid) FROM events")

    def seconds(features: list) -> float:
        one = dataclasses.replace(cfg, features=features)
        plans = plan_key_sets(one, largest_key_rows(engine, one))
        start = time.perf_counter()
        for _, sql, _ in feature_tables(one, "events", plans):
            con.execute(f"CREATE OR REPLACE TEMP TABLE featured AS {sql}")
        for sql in range_queries(one, "events", [], plans, (0, top)):
            con.execute(f"CREATE OR REPLACE TEMP TABLE featured AS {sql}")
        return time.perf_counter() - start

    base = seconds([])
    alone = {f"{f.name} ({f.kind})": round(seconds([f]) - base, 3) for f in cfg.features}
    return dict(sorted(alone.items(), key=lambda kv: -kv[1])) | {"all together": round(seconds(cfg.features) - base, 3)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--work", type=Path, default=Path("/tmp/feedsr_bench_prepare"),
                   help="logs, DuckDB spill and the prepared datasets go under WORK/<N>")
    p.add_argument("--memory-limit", default="4GB", help="engine.memory_limit")
    p.add_argument("--window-method", default="auto", choices=["auto", "range", "probe"],
                   help="engine.window_method")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--each-feature", type=int, metavar="N", help="time each feature alone on N impressions")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, {len(FEATURES)} features")
    if args.each_feature:
        alone = each_feature(args.each_feature, args.work / str(args.each_feature), args.memory_limit)
        for name, seconds in alone.items():
            print(f"    {name:48s} {seconds:7.2f} s")
        if args.json:
            args.json.write_text(json.dumps({"impressions": args.each_feature, "seconds": alone}, indent=2) + "\n")
        return [alone]
    results = []
    for n in args.sizes:
        if (args.work / str(n) / "out").exists():  # a dataset of an earlier run: prepare writes anew
            shutil.rmtree(args.work / str(n) / "out")
        result = bench(n, args.work / str(n), args.memory_limit, args.window_method)
        results.append(result)
        print(f"N = {n:,}: {result['seconds']:.1f} s, {result['impressions_per_s']:,.0f} impressions/s, "
              f"peak RSS {result['peak_rss_gb']:.2f} GB")
        for step, seconds in result["steps_s"].items():
            print(f"    {step:24s} {seconds:8.1f} s")
        if args.json:  # after every size: a long run keeps what it measured
            args.json.write_text(json.dumps({"measured_at": time.strftime("%Y-%m-%d %H:%M %Z"),
                                             "cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
