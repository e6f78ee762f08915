#!/usr/bin/env python
"""The synthetic benchmark: what attention over a long history buys, against a reachable oracle.

    python scripts/benchmark_synthetic.py --seeds 0 1 2 --parallel 2 \
        --json docs/benchmark_synthetic.json --markdown runs/benchmark_synthetic.md

The world is ``feedsr/conf/data/synthetic_bench.yaml``: 10k members with skewed histories up to
1,000 impressions, every factor of the true probability observable (the post's topic vector as
``dense_content_<i>``), and history effects at three time scales (short-term engagement state,
long-range state, order-dependent fatigue; ``feedsr/data/synthetic.py``). It is generated once
into ``--data`` when absent (``scripts/make_synthetic.py --data synthetic_bench``).

For every configuration and seed: training (``python -m feedsr.train experiment=...``) -> the
run's best checkpoint by validation (mean validation AUC over click and long_view) -> its test
split scored with ``scripts/evaluate.py --history-buckets`` (AUC, NE and the oracle fraction
``(AUC - 0.5) / (oracle AUC - 0.5)`` per task, overall and by history length). The trees
(``scripts/baseline_trees.py``, LightGBM on each impression's own features, early stopped on
validation) are scored on the same test impressions. Test figures of models chosen on
validation: the test split is read once per run, by this script, never to choose anything.

Configurations:

    feedsr       conf/experiment/synthetic_bench_feedsr.yaml
    dcnv2        conf/experiment/synthetic_bench_dcnv2.yaml (the same features, history mean-pooled)
    no_history   DCNv2 with model.use_history=false: each impression sees only itself
    trees        LightGBM per task on the impression's own columns (no history)
    attnmvp      Feed-SR with model.backbone=attnmvp (items only, actions in the values, AttnLFA)
    rope_time    Feed-SR with model.rope=time; learned_time_rope: model.rope=learned_time (SIREN-RoPE)

Runs go to ``--runs/<config>_seed<S>``; one whose ``result.json`` exists is reused, so an
interrupted benchmark continues where it stopped. ``--parallel`` trainings run side by side with
cores / parallel threads each. Prints progress, then the tables (mean ± sample std over seeds).
"""

from __future__ import annotations

import argparse
import json
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
CONFIGS = {  # name -> (experiment, overrides, what it is)
    "feedsr": ("synthetic_bench_feedsr", [], "Feed-SR: attention over the interleaved history"),
    "dcnv2": ("synthetic_bench_dcnv2", [], "DCNv2: the same features, the history mean-pooled"),
    # DCNv2's, not Feed-SR's: without a history the two are the same kind of model (features ->
    # head), and DCNv2's costs a fraction of the attention's compute.
    "no_history": ("synthetic_bench_dcnv2", ["model.use_history=false"],
                   "DCNv2 with model.use_history=false: each impression alone"),
    "attnmvp": ("synthetic_bench_feedsr", ["model.backbone=attnmvp"], "Feed-SR, AttnMVP backbone"),
    "rope_time": ("synthetic_bench_feedsr", ["model.rope=time"], "Feed-SR, time-aware RoPE (half the pairs)"),
    "learned_time_rope": ("synthetic_bench_feedsr", ["model.rope=learned_time"],
                          "Feed-SR, SIREN-RoPE learned time rotations"),
}
TREES = "trees"
ALL_CONFIGS = [*CONFIGS, TREES]
BEYOND = ("attnmvp", "rope_time", "learned_time_rope")  # the beyond-the-paper variants: run with --configs
DEFAULT_CONFIGS = [c for c in ALL_CONFIGS if c not in BEYOND]
DATA_CONFIG = "synthetic_bench"
REPORT_TASKS = ("click", "long_view")  # the targets' tasks; the rest are reported too
BUCKETS = [0, 50, 200, 500]  # history length: <50, 50-199, 200-499, 500+ (the tail ends at 1,000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=ALL_CONFIGS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2, help="training runs side by side")
    p.add_argument("--data", type=Path, default=REPO / "data/synthetic_bench",
                   help=f"the dataset (generated from feedsr/conf/data/{DATA_CONFIG}.yaml if absent)")
    p.add_argument("--history-buckets", type=int, nargs="+", default=BUCKETS,
                   help="history-length bucket edges, the last bucket open")
    p.add_argument("--runs", type=Path, default=REPO / "runs/synthetic_benchmark")
    p.add_argument("--json", type=Path, help="write all results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every training run (e.g. trainer.max_steps=50)")
    return p.parse_args(argv)


def ensure_data(args) -> None:
    if (args.data / "dataset.json").exists():
        return
    print(f"[benchmark] generating {args.data} (scripts/make_synthetic.py --data {DATA_CONFIG})", flush=True)
    subprocess.run([sys.executable, "scripts/make_synthetic.py", "--data", DATA_CONFIG, "--out", str(args.data)],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def planted_effects(data: Path) -> dict[str, dict[str, float]]:
    """The test split's oracle AUC per task: in full, and with each history effect taken out."""
    from make_synthetic import oracle_aucs_without

    from feedsr.data.sequences import read_dataset_meta

    return oracle_aucs_without(str(data), read_dataset_meta(data))


def pick(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("auc", "ne", "oracle_auc", "oracle_ne", "oracle_fraction", "count", "base_rate")}


def evaluate_test(args, checkpoint: Path, threads: int) -> dict:
    """The test split's metrics of a checkpoint, overall and by history length."""
    out = checkpoint.parent.parent / "test_metrics.json"
    cmd = [sys.executable, "scripts/evaluate.py", "--checkpoint", str(checkpoint), "--split", "test",
           "--data", str(args.data), "--out", str(out), "--history-buckets", *map(str, args.history_buckets)]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=env)
    report = json.loads(out.read_text())
    return {"test": {t: pick(m) for t, m in report["metrics"].items()},
            "by_history": {b: {t: pick(m) for t, m in ms.items()} for b, ms in report["by_history"].items()},
            "eval_seconds": report["seconds"]}


def run_model(args, name: str, seed: int, threads: int) -> dict:
    """Train one configuration and seed (or reuse a finished run); its test figures."""
    run_id = f"{name}_seed{seed}"
    run_dir = args.runs / run_id
    experiment, overrides, _ = CONFIGS[name]
    # what the figures depend on: a finished run made with other settings is trained again
    settings = {"experiment": experiment, "overrides": [*overrides, *args.overrides], "seed": seed,
                "data": str(args.data), "history_buckets": args.history_buckets}
    result = finished(run_dir, settings, "benchmark")
    if result is not None:
        return result
    cmd, seconds = train_logged([f"experiment={experiment}", *overrides, f"data.path={args.data}", f"run_id={run_id}",
                                 f"output_root={args.runs}", f"seed={seed}", "trainer.progress=false",
                                 "trainer.tensorboard=false", f"trainer.num_threads={threads}", *args.overrides],
                                run_dir, "benchmark.log")
    best, records = best_and_log(run_dir)
    result = {"config": name, "seed": seed, "settings": settings, "train_seconds": seconds, "best_step": best["step"],
              "impressions_per_s": statistics.fmean(r["impressions_per_s"] for r in records),
              "valid": {t: pick(m) for t, m in best["metrics"].items()},
              **evaluate_test(args, run_dir / "checkpoints" / f"step-{best['step']}", threads),
              "command": " ".join(cmd[1:])}
    result["seconds"] = seconds + result["eval_seconds"]
    return save(run_dir, result)


def run_trees(args, threads: int) -> list[dict]:
    """LightGBM per task and seed, early stopped on validation, scored on test (one process: the
    impressions are read once for every seed)."""
    out = args.runs / "trees" / "trees.json"
    settings = {"seeds": args.seeds, "data": str(args.data), "history_buckets": args.history_buckets}
    if out.exists() and json.loads(out.read_text()).get("settings") != settings:
        print("[benchmark] trees: made with other settings; fitting them again", flush=True)
        out.unlink()
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "scripts/baseline_trees.py", f"data={DATA_CONFIG}", f"data.path={args.data}",
               "--report-split", "test", "--threads", str(threads), "--seeds", *map(str, args.seeds),
               "--history-buckets", *map(str, args.history_buckets), "--json", str(out)]
        start = time.perf_counter()
        with open(out.parent / "benchmark.log", "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"trees failed (exit {proc.returncode}); see {out.parent / 'benchmark.log'}")
        report = json.loads(out.read_text())
        report["seconds"] = time.perf_counter() - start
        report["settings"] = settings
        out.write_text(json.dumps(report, indent=1) + "\n")
    report = json.loads(out.read_text())
    per_seed = report["seconds"] / len(report["runs"])
    return [{"config": TREES, "seed": r["seed"], "seconds": per_seed,
             "best_step": sum(r["rounds"].values()) // len(r["rounds"]),  # mean boosting rounds
             "test": {t: pick(m) for t, m in r["metrics"].items()},
             "by_history": {b: {t: pick(m) for t, m in ms.items()} for b, ms in r["by_history"].items()}}
            for r in report["runs"] if r["seed"] in args.seeds]


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample std of the values that exist (an oracle fraction is null where a task or
    bucket has no positives); NaN when there are none."""
    values = [v for v in values if v is not None]
    mean = statistics.fmean(values) if values else float("nan")
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarize(results: list[dict], configs: list[str]) -> list[dict]:
    """Per configuration: mean and std over seeds of each task's test AUC, NE and oracle
    fraction, and per history bucket the means."""
    rows = []
    for name in configs:
        runs = [r for r in results if r["config"] == name]
        if not runs:
            continue
        row = {"config": name, "what": CONFIGS[name][2] if name in CONFIGS else
               "LightGBM per task on the impression's own features (no history)",
               "seeds": [r["seed"] for r in runs], "best_steps": [r["best_step"] for r in runs],
               "minutes_per_run": statistics.fmean(r["seconds"] for r in runs) / 60, "test": {}, "by_history": {},
               "impressions_per_s": (statistics.fmean(r["impressions_per_s"] for r in runs)
                                     if all("impressions_per_s" in r for r in runs) else None),
               "valid_auc": ({t: mean_std([r["valid"][t]["auc"] for r in runs]) for t in runs[0]["valid"]}
                             if all("valid" in r for r in runs) else None)}
        for task in runs[0]["test"]:
            row["test"][task] = {}
            for key in ("auc", "ne", "oracle_fraction"):
                row["test"][task][key], row["test"][task][key + "_std"] = mean_std([r["test"][task][key] for r in runs])
            row["test"][task]["oracle_auc"] = runs[0]["test"][task]["oracle_auc"]
        for bucket, tasks in runs[0]["by_history"].items():
            row["by_history"][bucket] = {t: {k: mean_std([r["by_history"][bucket][t][k] for r in runs])[0]
                                             for k in ("auc", "oracle_fraction")}
                                         | {"oracle_auc": m["oracle_auc"], "count": m["count"]}
                                         for t, m in tasks.items()}
        rows.append(row)
    return rows


def differences(rows: list[dict], model: str = "feedsr", base: str = "dcnv2") -> list[dict]:
    """Feed-SR minus DCNv2 test AUC per task, overall and per history bucket, with the standard
    error of the overall difference of means, sqrt(s_a^2 / n_a + s_b^2 / n_b)."""
    by_name = {r["config"]: r for r in rows}
    if base not in by_name or model not in by_name:
        return []
    a, b = by_name[model], by_name[base]
    out = []
    for task in a["test"]:
        x, y = a["test"][task], b["test"][task]
        se = (x["auc_std"] ** 2 / len(a["seeds"]) + y["auc_std"] ** 2 / len(b["seeds"])) ** 0.5
        out.append({"task": task, "overall": x["auc"] - y["auc"], "standard_error": se,
                    "by_history": {k: a["by_history"][k][task]["auc"] - b["by_history"][k][task]["auc"]
                                   for k in a["by_history"] if k in b["by_history"]}})
    return out


def markdown(rows: list[dict], diffs: list[dict], effects: dict[str, dict[str, float]]) -> str:
    fmt = lambda m, k, d=4: f"{m[k]:.{d}f} ± {m[k + '_std']:.{d}f}"  # noqa: E731
    tasks = list(rows[0]["test"])
    lines = ["Test split, mean ± sample std over seeds (models chosen on validation):", "",
             "| config | task | AUC | oracle AUC | oracle fraction | NE |", "|---|---|---|---|---|---|"]
    for r in rows:
        for t in REPORT_TASKS:
            m = r["test"][t]
            lines.append(f"| {r['config']} | {t} | {fmt(m, 'auc')} | {m['oracle_auc']:.4f} | "
                         f"{fmt(m, 'oracle_fraction', 3)} | {fmt(m, 'ne')} |")
    trained = [r for r in rows if r["valid_auc"]]
    if trained:
        lines += ["", "Validation AUC (the split the checkpoint was chosen on), mean ± std over seeds, and training "
                  "impressions/s:", "", "| config | " + " | ".join(f"{t} AUC" for t in REPORT_TASKS) + " | imps/s |",
                  "|" + "---|" * (len(REPORT_TASKS) + 2)]
        for r in trained:
            speed = "-" if r["impressions_per_s"] is None else f"{r['impressions_per_s']:,.0f}"
            lines.append(f"| {r['config']} | " + " | ".join(
                "{:.4f} ± {:.4f}".format(*r["valid_auc"][t]) for t in REPORT_TASKS) + f" | {speed} |")
    rare = [t for t in tasks if t not in REPORT_TASKS]
    lines += ["", "Every task, test AUC (oracle fraction), mean over seeds:", "",
              "| config | " + " | ".join(tasks) + " | min/run | best steps (trees: mean rounds) |",
              "|" + "---|" * (len(tasks) + 3)]
    for r in rows:
        lines.append(f"| {r['config']} | " + " | ".join(
            f"{r['test'][t]['auc']:.4f} ({r['test'][t]['oracle_fraction']:.3f})" for t in tasks)
            + f" | {r['minutes_per_run']:.1f} | {', '.join(map(str, r['best_steps']))} |")
    lines += ["", "| oracle AUC | " + " | ".join(f"{rows[0]['test'][t]['oracle_auc']:.4f}" for t in tasks) + " | | |"]
    buckets = list(rows[0]["by_history"])
    for t in REPORT_TASKS:
        first = rows[0]["by_history"]
        lines += ["", f"{t}: test AUC (oracle fraction) by history length (impressions before the target "
                  "in its row; mean over seeds):", "",
                  "| config | " + " | ".join(f"{b} ({first[b][t]['count']:,})" for b in buckets) + " |",
                  "|" + "---|" * (len(buckets) + 1),
                  "| oracle | " + " | ".join(f"{first[b][t]['oracle_auc']:.4f}" for b in buckets) + " |"]
        for r in rows:
            lines.append(f"| {r['config']} | " + " | ".join(
                f"{r['by_history'][b][t]['auc']:.4f} ({r['by_history'][b][t]['oracle_fraction']:.3f})"
                if b in r["by_history"] else "-" for b in buckets) + " |")
    if diffs:
        lines += ["", "Feed-SR − DCNv2, test AUC:", "",
                  "| task | overall | SE of the difference | " + " | ".join(buckets) + " |",
                  "|" + "---|" * (len(buckets) + 3)]
        for d in diffs:
            lines.append(f"| {d['task']} | {d['overall']:+.4f} | {d['standard_error']:.4f} | "
                         + " | ".join(f"{d['by_history'].get(b, float('nan')):+.4f}" for b in buckets) + " |")
    if effects:
        lines += ["", "Planted effects: the test split's oracle AUC with each history effect taken out "
                  "(feedsr.data.synthetic.probs_without):", "",
                  "| oracle | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        for label, aucs in effects.items():
            lines.append(f"| {label} | " + " | ".join(f"{aucs[t]:.4f}" for t in tasks) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    ensure_data(args)
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    # Longest first (Feed-SR's attention costs ~3.5x DCNv2's step), so the pool's last minutes are
    # not one long run alone.
    jobs = sorted(((name, seed) for name in args.configs if name in CONFIGS for seed in args.seeds),
                  key=lambda job: job[0] != "feedsr")
    start = time.perf_counter()
    print(f"[benchmark] {len(jobs)} training runs, {args.parallel} at a time, {threads} thread(s) each"
          + (", then the trees" if TREES in args.configs else ""), flush=True)

    def job(item):
        result = run_model(args, *item, threads)
        print(f"[benchmark] {item[0]} seed {item[1]}: best step {result['best_step']}, test "
              + ", ".join(f"{t} {result['test'][t]['auc']:.4f} ({mean_std([result['test'][t]['oracle_fraction']])[0]:.3f})"
                          for t in REPORT_TASKS)
              + f" ({result['seconds'] / 60:.1f} min; {time.perf_counter() - start:.0f} s elapsed)", flush=True)
        return result

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(job, jobs))
    if TREES in args.configs:
        results += run_trees(args, os.cpu_count() or 1)
        print(f"[benchmark] trees done ({time.perf_counter() - start:.0f} s elapsed)", flush=True)
    rows = summarize(results, args.configs)
    diffs = differences(rows)
    effects = planted_effects(args.data)
    table = markdown(rows, diffs, effects)
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
                                         "summary": rows, "differences": diffs, "planted_effects": effects,
                                         "runs": results, "run_minutes": total / 60}, indent=2) + "\n")


if __name__ == "__main__":
    main()
