#!/usr/bin/env python
"""Serving latency of a trained checkpoint: every scoring method, one request at a time.

    python scripts/bench_serve.py --checkpoint runs/synthetic_main --exported runs/synthetic_main/exported_1000 \
        [--history 1000] [--candidates 1 64 512] [--threads 1 2] [--repeats 100] [--json FILE]

A request is one member with ``--history`` impressions (2x as many tokens; as many with
``model.backbone=attnmvp``) and N candidates; its
ids are drawn within the model's tables (latency does not depend on the values). Rows:

- ``one_by_one``: the model's own forward on [history, candidate] for every candidate (the
  reference; timed in full for N <= ``--one-by-one-max``, else on that many candidates and scaled
  to N, which the note says);
- ``masked``: one pass over [history | candidates] with the shared-context mask;
- ``kv``: the history through the blocks once (keys and values kept), then the candidates over them;
- ``kv_cached``: the candidates over a history cache made before the request (a returning member);
- ``kv_update``: the cache of the history minus its last impression extended by that impression
  (``update_history``), then the candidates: a member back after one more impression;
- ``exported``, ``exported_cached``: the AOTInductor programs of ``--exported`` (encode + score,
  and score only); a folder without ``export.json`` is first exported to, with
  ``--max-history`` = ``--history`` (a few minutes of compiling).
- ``flex`` with ``--flex``: the masked pass with FlexAttention (compiles per shape).

Each method is warmed up, then timed ``--repeats`` times per request size (one-by-one
``--one-by-one-repeats`` times), the methods taking turns so that load on a shared machine hits
all of them alike; p50 and p99 are over those requests (with 100 requests the p99 is the second
slowest). Every method's scores are compared with one-by-one's on the candidates it scored
(``max|diff|``).

FLOP/s: the FLOPs each method executes (matrix products and attention, counted by
``torch.utils.flop_counter`` on one eager call; causal attention counted at half; the exported
programs run the ``kv`` path's) over its p50, against the machine's fp32 matmul peak measured here
with the same thread count (a 2048^3 product, best of 5).

Run it on idle cores: on a machine whose cores are busy, multi-threaded ops wait at their barriers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from feedsr.quiet import quiet_libraries


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/synthetic_main"),
                   help="step-N folder or run directory (default: the main job's, `make train`)")
    p.add_argument("--exported", type=Path, help="export folder (made here with --max-history = --history if empty)")
    p.add_argument("--history", type=int, default=1000, help="history impressions (2x tokens, interleaved)")
    p.add_argument("--candidates", type=int, nargs="+", default=[1, 64, 512])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, one table each")
    p.add_argument("--repeats", type=int, default=100, help="timed requests per method and size")
    p.add_argument("--one-by-one-max", type=int, default=64, help="largest N scored one by one in full")
    p.add_argument("--one-by-one-repeats", type=int, default=5)
    p.add_argument("--flex", action="store_true", help="add FlexAttention (compiles per shape)")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args(argv)


# ------------------------------------------------------------------ a request


def random_columns(spec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random values for the spec's id, dense and context columns."""
    from feedsr.data.schema import CONTEXT_PREFIX, DENSE_PREFIX

    values = {k: rng.integers(0, size, n) for k, size in spec.id_table_sizes.items()}
    numbers = [DENSE_PREFIX + c for c in spec.read.dense] + [CONTEXT_PREFIX + c for c in spec.read.context]
    return values | {c: rng.random(n).astype(np.float32) for c in numbers}


def request(spec, history: int, num_candidates: int, seed: int = 0):
    """(SequenceBlock of one member's history, Candidates) with random features."""
    from feedsr.data.block import SequenceBlock
    from feedsr.data.tasks import encode_actions
    from feedsr.serve.candidates import Candidates

    rng = np.random.default_rng(seed)
    timestamps = np.sort(rng.integers(1_600_000_000, 1_600_000_000 + 30 * 86400, history))
    values = random_columns(spec, history, rng) | {
        "timestamps": timestamps, "positions": rng.integers(0, 60, history),
        "action_bits": encode_actions(rng.integers(0, 2, (history, len(spec.read.action_names)))),
    }
    block = SequenceBlock(lengths=np.array([history]), values=values,
                          rows={"member_id": np.zeros(1, np.int64), "num_targets": np.ones(1, np.int64)})
    candidates = Candidates(counts=np.array([num_candidates]), request_times=np.array([timestamps[-1] + 60]),
                            values=random_columns(spec, num_candidates, rng))
    return block, candidates


def first(candidates, k: int):
    """The first k candidates of a one-member request."""
    from feedsr.serve.candidates import Candidates

    return Candidates(counts=np.array([k]), request_times=candidates.request_times,
                      values={c: v[:k] for c, v in candidates.values.items()})


def without_last(history):
    """Each member's history without its newest impression."""
    return history.gather(np.arange(len(history)), history.offsets[:-1], history.lengths - 1)


# ------------------------------------------------------------------ methods


@dataclasses.dataclass
class Method:
    """A way to score a request: ``call()`` -> (n, K) probabilities of the first ``n`` candidates."""

    name: str
    call: object
    scored: int  # candidates it scores per call (one-by-one may do fewer than N)
    flops_from: str | None = None  # count the FLOPs of this method's eager call instead
    note: str = ""


def methods(scorer, exported, history, candidates, args) -> list[Method]:
    n = candidates.num_candidates
    k = min(n, args.one_by_one_max)
    subset = first(candidates, k)
    cache = scorer.encode_history(history)
    shorter = scorer.encode_history(without_last(history))
    out = [Method("one_by_one", lambda: scorer.score(history, subset, "one_by_one"), k,
                  note="" if k == n else f"timed on {k} of {n} candidates, x{n / k:g}: extrapolated"),
           Method("masked", lambda: scorer.score(history, candidates, "masked"), n),
           Method("kv", lambda: scorer.score(history, candidates, "kv"), n),
           Method("kv_cached", lambda: scorer.score_cached(cache, candidates), n),
           Method("kv_update", lambda: scorer.score_cached(scorer.update_history(shorter, history), candidates), n)]
    if args.flex:
        out.append(Method("flex", lambda: scorer.score(history, candidates, "flex"), n))
    if exported is not None:
        columns = {c: v for c, v in history.values.items()}
        request_time = int(candidates.request_times[0])
        exported_cache = exported.encode(columns)
        out += [Method("exported", lambda: torch.from_numpy(exported.score(exported.encode(columns), candidates.values,
                                                                            request_time)), n, "kv"),
                Method("exported_cached", lambda: torch.from_numpy(exported.score(exported_cache, candidates.values,
                                                                                   request_time)), n, "kv_cached")]
    return out


def sdpa_cpu_flops(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    """CPU SDPA (not counted by torch's flop counter): QK^T and AV, half of it when causal."""
    b, h, s_q, d = query_shape
    flops = 2 * 2 * b * h * s_q * key_shape[-2] * d
    return flops // 2 if is_causal else flops


def sdpa_cpu_backward_flops(grad, query_shape, key_shape, value_shape, output, logsumexp,
                            dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    """Its backward: dV, dP, dQ, dK, twice the forward's products (the usual count)."""
    return 2 * sdpa_cpu_flops(query_shape, key_shape, value_shape, dropout_p, is_causal)


def count_flops(call) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    with FlopCounterMode(display=False, custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops}) as counter:
        call()
    return counter.get_total_flops()


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a size^3 matrix product with the current thread count (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b)[0] for _ in range(repeats))
    return 2 * size ** 3 / best


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ------------------------------------------------------------------ the table


def bench_request(scorer, exported, history, candidates, args) -> list[dict]:
    """One row per method for one request of N candidates."""
    n = candidates.num_candidates
    chosen = methods(scorer, exported, history, candidates, args)
    outputs = {m.name: timed(m.call)[1] for m in chosen}  # warm-up (flex compiles here), and the scores
    flops = {m.name: count_flops(m.call) * n / m.scored for m in chosen if m.flops_from is None}
    seconds = {m.name: [] for m in chosen}
    for i in range(args.repeats):
        for m in chosen:  # round robin: a busy machine slows every method alike
            if m.name != "one_by_one" or i < args.one_by_one_repeats:
                seconds[m.name].append(timed(m.call)[0] * n / m.scored)
    reference = outputs["one_by_one"]
    rows = []
    for m in chosen:
        p50, p99 = np.percentile(seconds[m.name], [50, 99])
        executed = flops[m.flops_from or m.name]
        rows.append({
            "method": m.name, "candidates": n, "requests": len(seconds[m.name]),
            "p50_ms": 1e3 * p50, "p99_ms": 1e3 * p99, "candidates_per_s": n / p50,
            "gflop": executed / 1e9, "gflop_per_s": executed / p50 / 1e9,
            "max_abs_diff": float((outputs[m.name][:len(reference)].double() - reference.double()).abs().max()),
            "note": m.note,
        })
    kv = next(r for r in rows if r["method"] == "kv")
    for row in rows:
        row["vs_kv"] = kv["p50_ms"] / row["p50_ms"]
    return rows


def print_row(row: dict, peak: float) -> None:
    share = 100 * row["gflop_per_s"] * 1e9 / peak
    print(f"{row['method']:16s} {row['candidates']:5d} {row['p50_ms']:10.1f} {row['p99_ms']:10.1f} "
          f"{row['candidates_per_s']:10.0f} {row['gflop']:8.3f} {row['gflop_per_s']:8.1f} {share:6.1f}% "
          f"{row['vs_kv']:7.2f}x {row['max_abs_diff']:9.1e}  {row['note']}", flush=True)


def load_exported(args, trained):
    """The ExportedScorer of ``--exported``, exporting there first if it holds no export."""
    from feedsr.serve.export import ExportError, export
    from feedsr.serve.exported import EXPORT_META, ExportedScorer

    if args.exported is None:
        return None
    if not (args.exported / EXPORT_META).is_file():
        print(f"exporting {trained.checkpoint} to {args.exported} (--max-history {args.history}) ...", flush=True)
        try:
            export(trained, args.exported, max_history=args.history)
        except ExportError as e:
            raise SystemExit(f"--exported: {e}") from None
    scorer = ExportedScorer(args.exported)
    if scorer.meta["max_history"] < args.history:
        raise SystemExit(f"{args.exported} serves histories of up to {scorer.meta['max_history']} impressions, "
                         f"the benchmark uses {args.history}: export again with --max-history {args.history}")
    return scorer


def main(argv=None) -> dict:
    quiet_libraries()
    args = parse_args(argv)
    from feedsr.eval.trained import load_trained
    from feedsr.serve.scorer import CandidateScorer

    trained = load_trained(args.checkpoint)
    model, spec = trained.model, trained.spec
    scorer = CandidateScorer(model, spec)
    exported = load_exported(args, trained)
    width = model.transformer.ln_out.normalized_shape[0]
    trained_max = trained.config.data.max_seq_len - 1
    print(f"{trained.checkpoint}: Feed-SR ({model.cfg.backbone}) width {width}, {len(model.transformer.blocks)} "
          f"layers, trained on histories of <= {trained_max} impressions; history {args.history} impressions "
          f"({model.tokens_per_impression * args.history} tokens), median of {args.repeats} requests (one by one: "
          f"{args.one_by_one_repeats}), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    cached_bytes = scorer.encode_history(request(spec, args.history, 1)[0]).nbytes
    print(f"a cached history (keys and values of every layer) takes {cached_bytes / 2 ** 20:.2f} MiB per member")
    result = {"checkpoint": str(trained.checkpoint), "history": args.history, "width": width,
              "layers": len(model.transformer.blocks), "backbone": model.cfg.backbone, "exported": str(args.exported) if exported else None,
              "cached_history_bytes": cached_bytes, "tables": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        peak = matmul_peak()
        print(f"\n{threads} thread(s): fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3)")
        print(f"{'method':16s} {'N':>5s} {'p50 ms':>10s} {'p99 ms':>10s} {'cand/s':>10s} {'GFLOP':>8s} "
              f"{'GFLOP/s':>8s} {'%peak':>7s} {'vs kv':>8s} {'max|diff|':>9s}  note")
        rows = []
        for n in args.candidates:
            history, candidates = request(spec, args.history, n)
            for row in bench_request(scorer, exported, history, candidates, args):
                rows.append(row | {"threads": threads})
                print_row(row, peak)
        result["tables"].append({"threads": threads, "matmul_peak_gflop_per_s": peak / 1e9, "rows": rows})
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
