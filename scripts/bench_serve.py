#!/usr/bin/env python
"""Serving latency: one-by-one vs shared-context scoring of N candidates for one member.

    python scripts/bench_serve.py [--history 1000] [--candidates 1 64 512] [--json FILE]
                                  [--one-by-one-max 16] [--no-flex] [--profile]

The model is the default Feed-SR (conf/model/feedsr.yaml composed with Hydra, as training does)
over the synthetic data's features with post ids added: 4 id features x 16 = width 64, 2 layers,
2 heads, FFN 256, MMoE head, 5 tasks; random weights (latency does not depend on them). One
request = one member with ``--history`` impressions and N candidates, one process, 2 torch
threads (``--threads``). Each method is warmed up, then timed ``--repeats`` times, the methods taking turns (on a
shared machine, load then hits all of them alike); the table gives the median.

One-by-one scoring is timed on the first ``--one-by-one-max`` candidates and extrapolated
linearly to N (it is N independent forward passes; the table says when it was). Every method's
scores are checked against one-by-one on those candidates. ``flex`` (FlexAttention) compiles
once per shape; its first call is reported separately. ``--profile`` prints a torch.profiler
breakdown of each shared-context method at the largest N.

On a machine whose cores are busy with other work, every multi-threaded op waits at its barrier
for a core to come free, which swamps small ops; ``--threads 1`` then measures the compute.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from feedsr.quiet import quiet_libraries


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--history", type=int, default=1000, help="history impressions (2x tokens)")
    p.add_argument("--candidates", type=int, nargs="+", default=[1, 64, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--one-by-one-max", type=int, default=16, help="candidates timed one by one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles per shape)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args(argv)


def build(history: int):
    """(model, BatchSpec): the default model config over the synthetic data's features."""
    from feedsr.data.config import batch_spec
    from feedsr.model import build_model
    from feedsr.runtime.config import compose_config, to_config

    cfg = to_config(compose_config(["data=synthetic", "model=feedsr", "+data.id_tables.item_ids=100000"]))
    spec = batch_spec(cfg.data)
    torch.manual_seed(0)
    return build_model(cfg.model, spec, max_seq_len=history + 1).eval(), spec


def random_columns(spec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random values for the spec's id and context columns."""
    from feedsr.data.schema import CONTEXT_PREFIX

    values = {k: rng.integers(0, size, n) for k, size in spec.id_table_sizes.items()}
    return values | {CONTEXT_PREFIX + c: rng.random(n).astype(np.float32) for c in spec.read.context}


def request(spec, history: int, num_candidates: int, seed: int = 0):
    """(SequenceBlock of one member's history, Candidates) with random features."""
    from feedsr.data.block import SequenceBlock
    from feedsr.data.tasks import encode_actions
    from feedsr.serve import Candidates

    rng = np.random.default_rng(seed)
    timestamps = np.sort(rng.integers(0, 30 * 86400, history))
    values = random_columns(spec, history, rng) | {
        "timestamps": timestamps, "positions": rng.integers(0, 60, history),
        "action_bits": encode_actions(rng.integers(0, 2, (history, len(spec.read.action_names)))),
    }
    block = SequenceBlock(lengths=np.array([history]), values=values,
                          rows={"member_id": np.zeros(1, np.int64), "num_targets": np.ones(1, np.int64)})
    candidates = Candidates(counts=[num_candidates], request_times=[timestamps[-1] + 60],
                            values=random_columns(spec, num_candidates, rng))
    return block, candidates


def first(candidates, k: int):
    """The first k candidates of a one-member request."""
    from feedsr.serve import Candidates

    return Candidates(counts=[k], request_times=candidates.request_times,
                      values={c: v[:k] for c, v in candidates.values.items()})


def clock(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_request(scorer, history, candidates, args, methods) -> list[dict]:
    """One row per method for one request of N candidates."""
    n = candidates.num_candidates
    k = min(n, args.one_by_one_max)
    subset = first(candidates, k)
    calls = {"one_by_one": lambda: scorer.score(history, subset, "one_by_one")}
    calls |= {m: functools.partial(scorer.score, history, candidates, m) for m in methods}
    warm_up = {m: clock(fn) for m, fn in calls.items()}  # flex compiles for this shape here
    seconds = {m: [] for m in calls}
    for _ in range(args.repeats):
        for method, fn in calls.items():  # round robin: a busy machine slows every method alike
            seconds[method].append(clock(fn)[0])
    reference = warm_up["one_by_one"][1]
    rows = []
    for method in calls:
        scale = n / k if method == "one_by_one" else 1.0  # one-by-one cost is linear in N
        median = statistics.median(seconds[method]) * scale
        rows.append({
            "method": method, "candidates": n, "seconds": median, "candidates_per_s": n / median,
            "max_abs_diff": float((warm_up[method][1][:k] - reference).abs().max()),
            "note": f"timed {k} of {n}, x{scale:g}" if scale != 1
                    else f"first call {warm_up[method][0]:.1f} s" if method == "flex" else "",
        })
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    return rows


def profile(scorer, history, candidates, method: str) -> None:
    from torch.profiler import profile as torch_profile

    with torch_profile() as prof:
        scorer.score(history, candidates, method)
    print(f"\nprofile: {method}, N={candidates.num_candidates}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def main(argv=None) -> list[dict]:
    quiet_libraries()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from feedsr.serve import CandidateScorer

    model, spec = build(args.history)
    scorer = CandidateScorer(model, spec)
    methods = ["masked", "kv"] + ([] if args.no_flex else ["flex"])
    width = model.transformer.ln_out.normalized_shape[0]
    print(f"Feed-SR width {width}, {len(model.transformer.blocks)} layers, history {args.history} "
          f"impressions ({2 * args.history} tokens), {args.threads} threads, median of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'method':11s} {'N':>5s} {'ms/request':>11s} {'cand/s':>10s} {'speedup':>8s} "
          f"{'max|diff|':>9s}  note")
    rows = []
    for n in args.candidates:
        history, candidates = request(spec, args.history, n)
        for row in bench_request(scorer, history, candidates, args, methods):
            rows.append(row)
            print(f"{row['method']:11s} {n:5d} {1e3 * row['seconds']:11.1f} {row['candidates_per_s']:10.0f} "
                  f"{row['speedup']:7.1f}x {row['max_abs_diff']:9.1e}  {row['note']}", flush=True)
    if args.profile:
        history, candidates = request(spec, args.history, max(args.candidates))
        for method in methods:
            profile(scorer, history, candidates, method)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps({"history": args.history, "threads": args.threads, "rows": rows},
                                        indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
