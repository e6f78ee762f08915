#!/usr/bin/env python
"""The real-data benchmark: Feed-SR against the DCNv2 ranker on KuaiRand, with ablations.

    python scripts/benchmark_kuairand.py --seeds 0 1 2 --parallel 2 \
        --json docs/benchmark_kuairand.json --markdown runs/benchmark_kuairand.md

For every configuration and seed: the pipeline (once, if ``--data`` holds no dataset: ``python -m
feedsr.prepare prepare=kuairand_full``, the wide point-in-time feature set) -> training (``python
-m feedsr.train experiment=...``) -> the run's best checkpoint by validation (mean validation AUC
over click, long_view and like, ``trainer.select_tasks`` in the experiment files) -> its AUC by
history length (``scripts/evaluate.py --history-buckets``, the trees' buckets).
Train 2022-04-25..05-02, validate 05-03..05-05: KuaiRand ships no later days, so the reported
numbers are validation AUCs of the checkpoint chosen on that same validation split, for every
configuration alike.

Configurations (each ablation changes one thing of ``feedsr``):

    feedsr              conf/experiment/kuairand_feedsr.yaml
    dcnv2               conf/experiment/kuairand_dcnv2.yaml (the pointwise ranker)
    learned_positions   no RoPE: learned absolute positions
    no_late_fusion      context features in the post tokens instead of next to the head
    token_context       context features in the post tokens as well as next to the head
    context_bins        the late-fused context also in 16 quantile bins per feature (PLE)
    linear_head         one linear layer per task instead of the recipe's head
    no_loss_weighting   no temporal and no position decay of the loss weights
    no_session_shuffle  no in-session shuffle of the training sequences
    no_history          every impression sees only itself
    no_context_norm     the context features raw, not standardised by the training moments
    attnmvp             the non-interleaved backbone (items only, actions in the values, AttnLFA)
    rope_time           half of the RoPE pairs turn with the impression time
    learned_time_rope   SIREN-RoPE: every pair turns by a learned function of time too
    attnmvp_learned_time  both

Runs go to ``--runs/<config>_seed<S>``; a run whose ``result.json`` exists is not run again, so an
interrupted benchmark continues where it stopped. ``--parallel`` runs train side by side, each
with cores / parallel threads. Prints progress, then the table (mean ± sample std over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from training_runs import best_and_log, finished, save, train_logged  # noqa: E402  (how every benchmark trains)

CONFIGS = {  # name -> (experiment, overrides, what it tests)
    "feedsr": ("kuairand_feedsr", [], "Feed-SR, default recipe"),
    "dcnv2": ("kuairand_dcnv2", [], "DCNv2 pointwise ranker (same features, loss, budget)"),
    "learned_positions": ("kuairand_feedsr", ["model.position_encoding=learned"],
                          "no RoPE: learned absolute positions"),
    # Context in the tokens needs the in-session shuffle off: a shuffled later impression's
    # point-in-time context counts the target's own actions (check_model_config refuses it).
    "no_late_fusion": ("kuairand_feedsr", ["model.late_fusion=false", "model.d_model=128", "data.session_shuffle=false"],
                       "context features in the tokens (projected to width 128), not late-fused; no shuffle"),
    "token_context": ("kuairand_feedsr", ["model.token_context=true", "model.d_model=216", "data.session_shuffle=false"],
                      "context features in the post tokens as well as late-fused (projected to width 216); no shuffle"),
    "context_bins": ("kuairand_feedsr", ["model.context_bins=16"],
                     "late-fused context also in 16 quantile bins per feature (PLE, 4 numbers each)"),
    "linear_head": ("kuairand_feedsr", ["model.head.type=linear"], "linear head instead of the recipe's (DCNv2 head)"),
    "no_loss_weighting": ("kuairand_feedsr", ["loss.temporal_decay=false", "loss.position_decay=false"],
                          "no temporal / position decay of loss weights"),
    "no_session_shuffle": ("kuairand_feedsr", ["data.session_shuffle=false"], "no in-session shuffle"),
    "no_history": ("kuairand_feedsr", ["model.use_history=false"], "only the target impression"),
    "no_context_norm": ("kuairand_feedsr", ["model.context_norm=false"],
                        "context features raw, not standardised"),
    "attnmvp": ("kuairand_feedsr", ["model.backbone=attnmvp"], "AttnMVP: items only, actions in the values"),
    "rope_time": ("kuairand_feedsr", ["model.rope=time"], "time-aware RoPE (half the pairs)"),
    "learned_time_rope": ("kuairand_feedsr", ["model.rope=learned_time"], "SIREN-RoPE: learned time rotations"),
    "attnmvp_learned_time": ("kuairand_feedsr", ["model.backbone=attnmvp", "model.rope=learned_time"],
                             "AttnMVP with learned time rotations"),
}
BEYOND = ("attnmvp", "rope_time", "learned_time_rope", "attnmvp_learned_time")  # run with --configs
DEFAULT_CONFIGS = [c for c in CONFIGS if c not in BEYOND]
REPORT_TASKS = ("click", "long_view", "like")  # the headline tasks; the rest are reported too


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2, help="training runs side by side")
    p.add_argument("--data", type=Path, default=REPO / "data/kuairand_full",
                   help="the dataset (made by python -m feedsr.prepare prepare=kuairand_full if absent)")
    p.add_argument("--history-buckets", type=int, nargs="+", default=[0, 10, 50, 100, 160],
                   help="AUC by history length: bucket edges, the last bucket open (as baseline_trees.py)")
    p.add_argument("--history-seeds", type=int, nargs="+",
                   help="the seeds whose runs get the breakdown by history length (default: every seed; "
                        "it scores the validation split once more per run)")
    p.add_argument("--runs", type=Path, default=REPO / "runs/kuairand_benchmark")
    p.add_argument("--json", type=Path, help="write all results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. trainer.max_steps=200)")
    return p.parse_args(argv)


def ensure_data(args) -> None:
    if (args.data / "dataset.json").exists():
        return
    print(f"[benchmark] preparing {args.data} (python -m feedsr.prepare prepare=kuairand_full)", flush=True)
    subprocess.run([sys.executable, "-m", "feedsr.prepare", "prepare=kuairand_full", f"prepare.out={args.data}"],
                   cwd=REPO, check=True)


def run_one(args, name: str, seed: int, threads: int) -> dict:
    """Train one configuration and seed (or reuse a finished run); its best-by-validation result."""
    run_id = f"{name}_seed{seed}"
    run_dir = args.runs / run_id
    result = finished(run_dir, None, "benchmark")
    if result is not None:
        return result
    experiment, overrides, _ = CONFIGS[name]
    cmd, seconds = train_logged([f"experiment={experiment}", *overrides, f"data.path={args.data}", f"run_id={run_id}",
                                 f"output_root={args.runs}", f"seed={seed}", "trainer.progress=false",
                                 "trainer.tensorboard=false", f"trainer.num_threads={threads}", *args.overrides],
                                run_dir, "benchmark.log")
    best, records = best_and_log(run_dir)
    result = {"config": name, "seed": seed, "seconds": seconds, "best_step": best["step"],
              "impressions_per_s": statistics.fmean(r["impressions_per_s"] for r in records),
              "select_score": best["score"], "select_tasks": best["tasks"],
              "valid": {t: {k: m[k] for k in ("auc", "ne", "count", "base_rate")}
                        for t, m in best["metrics"].items()},
              "by_history": by_history(args, run_dir / "checkpoints" / f"step-{best['step']}", threads)
              if args.history_seeds is None or seed in args.history_seeds else None,
              "command": " ".join(cmd[1:])}
    return save(run_dir, result)


def by_history(args, checkpoint: Path, threads: int) -> dict[str, dict[str, float]]:
    """Validation AUC per history-length bucket and task of a checkpoint (scripts/evaluate.py)."""
    out = checkpoint.parent.parent / "by_history.json"
    cmd = [sys.executable, "scripts/evaluate.py", "--checkpoint", str(checkpoint), "--split", "valid",
           "--out", str(out), "--history-buckets", *map(str, args.history_buckets)]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=env)
    report = json.loads(out.read_text())["by_history"]
    return {b: {t: m[t]["auc"] for t in REPORT_TASKS} | {"count": m[REPORT_TASKS[0]]["count"]}
            for b, m in report.items()}


def mean_by_history(parts: list[dict]) -> dict:
    """Per bucket and key, the mean over the runs that have the breakdown ({} when none has)."""
    return {b: {k: statistics.fmean(p[b][k] for p in parts) for k in m} for b, m in parts[0].items()} if parts else {}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarize(results: list[dict], configs: list[str]) -> list[dict]:
    rows = []
    for name in configs:
        runs = [r for r in results if r["config"] == name]
        row = {"config": name, "what": CONFIGS[name][2], "seeds": [r["seed"] for r in runs],
               "best_steps": [r["best_step"] for r in runs],
               "minutes_per_run": statistics.fmean(r["seconds"] for r in runs) / 60,
               "impressions_per_s": (statistics.fmean(r["impressions_per_s"] for r in runs)
                                     if all("impressions_per_s" in r for r in runs) else None),
               "by_history": mean_by_history([r["by_history"] for r in runs if r["by_history"]])}
        for task in runs[0]["valid"]:
            for key in ("auc", "ne"):
                row[f"{task}_{key}"], row[f"{task}_{key}_std"] = mean_std([r["valid"][task][key] for r in runs])
        rows.append(row)
    return rows


def difference(a: dict, b: dict, task: str) -> tuple[float, float]:
    """Row a's mean AUC minus row b's on a task, and the standard error of that difference of
    means, sqrt(s_a^2 / n_a + s_b^2 / n_b) (nan with a single seed on either side)."""
    se = (a[f"{task}_auc_std"] ** 2 / len(a["seeds"]) + b[f"{task}_auc_std"] ** 2 / len(b["seeds"])) ** 0.5
    return a[f"{task}_auc"] - b[f"{task}_auc"], se


def known(se: float) -> bool:
    """A standard error to divide by: two or more seeds on both sides, and some spread."""
    return bool(se) and not math.isnan(se)


def differences(rows: list[dict], base: str = "dcnv2", model: str = "feedsr") -> list[dict]:
    """Feed-SR minus DCNv2 per task, next to the seed spread (the larger sample std of the two)
    and the standard error of the difference of means."""
    by_name = {r["config"]: r for r in rows}
    if base not in by_name or model not in by_name:
        return []
    a, b = by_name[model], by_name[base]
    out = []
    for task in REPORT_TASKS:
        diff, se = difference(a, b, task)
        spread = max(a[f"{task}_auc_std"], b[f"{task}_auc_std"])
        out.append({"task": task, "feedsr_minus_dcnv2": diff, "larger_seed_std": spread,
                    "beyond_spread": diff > spread, "standard_error": se,
                    "in_standard_errors": diff / se if known(se) else math.nan})
    return out


def against_default(rows: list[dict], base: str = "feedsr") -> list[dict]:
    """Every other configuration minus the default recipe, per headline task: the ablations'
    effect, with the standard error of the difference."""
    by_name = {r["config"]: r for r in rows}
    if base not in by_name:
        return []
    out = []
    for row in rows:
        if row["config"] != base:
            out.append({"config": row["config"]} | {
                task: dict(zip(("difference", "standard_error"), difference(row, by_name[base], task)))
                for task in REPORT_TASKS})
    return out


def positives(results: list[dict]) -> dict[str, dict]:
    valid = results[0]["valid"]
    return {t: {"targets": m["count"], "positives": round(m["count"] * m["base_rate"])} for t, m in valid.items()}


def history_table(rows: list[dict]) -> list[str]:
    """Markdown lines: each configuration's AUC per history-length bucket (none without buckets)."""
    buckets = list(rows[0]["by_history"])
    if not buckets:
        return []
    lines = ["", "AUC by history length (impressions before the target in its row; mean over the seeds "
             "with the breakdown; " + " / ".join(REPORT_TASKS) + "):", "",
             "| config | " + " | ".join(f"{b} ({rows[0]['by_history'][b]['count']:,.0f})" for b in buckets) + " |",
             "|" + "---|" * (len(buckets) + 1)]
    for r in rows:
        lines.append(f"| {r['config']} | " + " | ".join(
            " / ".join(f"{r['by_history'][b][t]:.4f}" for t in REPORT_TASKS) for b in buckets) + " |")
    return lines


def markdown(rows: list[dict], diffs: list[dict], counts: dict[str, dict], against: list[dict] = ()) -> str:
    def fmt(r, k):  # one seed has no spread
        return f"{r[k]:.4f}" if len(r["seeds"]) < 2 else f"{r[k]:.4f} ± {r[k + '_std']:.4f}"

    rare = [t for t in counts if t not in REPORT_TASKS]
    lines = ["| config | what | " + " | ".join(f"{t} AUC" for t in REPORT_TASKS) + " | click NE | best step | min/run | imps/s |",
             "|" + "---|" * (len(REPORT_TASKS) + 6)]
    for r in rows:
        lines.append(f"| {r['config']} | {r['what']} | " + " | ".join(fmt(r, f"{t}_auc") for t in REPORT_TASKS)
                     + f" | {fmt(r, 'click_ne')} | {', '.join(map(str, r['best_steps']))} | {r['minutes_per_run']:.1f} | "
                     + ("-" if r.get("impressions_per_s") is None else f"{r['impressions_per_s']:,.0f}") + " |")
    lines += ["", "Rare tasks (validation AUC, mean ± std over seeds; positives in the validation split):", "",
              "| config | " + " | ".join(f"{t} ({counts[t]['positives']:,})" for t in rare) + " |",
              "|" + "---|" * (len(rare) + 1)]
    for r in rows:
        lines.append(f"| {r['config']} | " + " | ".join(fmt(r, f"{t}_auc") for t in rare) + " |")
    lines += history_table(rows)
    if diffs:
        lines += ["", "| task | Feed-SR − DCNv2 (AUC) | larger seed std | beyond the spread | standard error "
                  "of the difference | difference / SE |", "|---|---|---|---|---|---|"]
        for d in diffs:
            if not known(d["standard_error"]):  # one seed of either: no spread to compare with
                lines.append(f"| {d['task']} | {d['feedsr_minus_dcnv2']:+.4f} | - | - | - | - |")
                continue
            lines.append(f"| {d['task']} | {d['feedsr_minus_dcnv2']:+.4f} | {d['larger_seed_std']:.4f} | "
                         f"{'yes' if d['beyond_spread'] else 'no'} | {d['standard_error']:.4f} | "
                         f"{d['in_standard_errors']:+.1f} |")
    if against:
        lines += ["", "Each configuration minus feedsr (AUC; in standard errors of the difference where both have "
                  "2+ seeds):", "", "| config | " + " | ".join(REPORT_TASKS) + " |", "|" + "---|" * (len(REPORT_TASKS) + 1)]
        for a in against:
            lines.append(f"| {a['config']} | " + " | ".join(
                f"{a[t]['difference']:+.4f}" + (f" ({a[t]['difference'] / a[t]['standard_error']:+.1f} SE)"
                                                 if known(a[t]["standard_error"]) else "")
                for t in REPORT_TASKS) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    ensure_data(args)
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    jobs = [(name, seed) for seed in args.seeds for name in args.configs]
    start = time.perf_counter()
    print(f"[benchmark] {len(jobs)} runs, {args.parallel} at a time, {threads} thread(s) each", flush=True)

    def job(item):
        result = run_one(args, *item, threads)
        print(f"[benchmark] {item[0]} seed {item[1]}: best step {result['best_step']}, "
              + ", ".join(f"{t} {result['valid'][t]['auc']:.4f}" for t in REPORT_TASKS)
              + f" ({result['seconds'] / 60:.1f} min; {time.perf_counter() - start:.0f} s elapsed)", flush=True)
        return result

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(job, jobs))
    rows = summarize(results, args.configs)
    diffs, against = differences(rows), against_default(rows)
    table = markdown(rows, diffs, positives(results), against)
    total = sum(r["seconds"] for r in results)
    print(table)
    print(f"[benchmark] {len(results)} runs, {total / 60:.1f} run-minutes, "
          f"{(time.perf_counter() - start) / 60:.1f} min wall (runs reused from earlier calls count their own time)")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "summary": rows, "differences": diffs, "against_feedsr": against,
                                         "runs": results,
                                         "run_minutes": total / 60}, indent=2) + "\n")


if __name__ == "__main__":
    main()
