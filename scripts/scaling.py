#!/usr/bin/env python
"""A scaling curve: validation AUC against training FLOPs on the synthetic benchmark's world.

    python scripts/scaling.py --sizes xs s m l --steps 60 240 --json docs/scaling.json \
        --png docs/scaling.png

A family of Feed-SR models (``SIZES``: width, layers, heads; FFN 4x the width) each trained for
every budget in ``--steps`` (OneCycle anneals over the budget, so every point is a finished
run, not a point on a longer run's curve) on ``data/synthetic_bench`` (generated when absent, as
``scripts/benchmark_synthetic.py`` does): 10k members with histories up to 1,000 impressions.
The budgets stay under one epoch (``--batch-size`` x steps < the 10k training sequences by
default), so a bigger model is not judged on data it has seen twice.

- Training FLOPs per step are counted, not estimated: ``torch.utils.flop_counter`` over a forward
  and backward of the model on ``--flop-batches`` real training batches, times the steps. It counts
  matrix products and attention (CPU SDPA, which torch's counter skips, as ``bench_serve.py``
  counts it: QK^T and AV, half of it under the causal flag, the backward twice the forward; a
  masked attention, such as attnmvp's strict one, at full cost, as the kernel runs it), not
  embedding lookups, norms or the optimizer. Counted once per size, one after another, after
  the trainings.
- The score of a run is its validation mean AUC over click and long_view (``best.json``, one
  validation at the end of the budget).
- The fit: AUC = a + b log10(FLOPs) over the compute-efficient frontier (the runs no cheaper run
  beats), by least squares; b is the AUC gained per 10x training FLOPs (the paper: +0.0093 long
  dwell AUC per 10x). With the seeds' spread it says how much of the slope is noise.

Runs go to ``--runs/<size>_steps<S>_seed<K>`` and are reused when their ``result.json`` holds the
same settings (the overrides, seed and data; else the run is trained again).
``--parallel`` runs train side by side with cores / parallel threads each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_serve import sdpa_cpu_backward_flops, sdpa_cpu_flops  # noqa: E402  (one way to count attention)
from benchmark_synthetic import ensure_data  # noqa: E402  (the same world, generated the same way)
from training_runs import best_and_log, finished, save, train_logged  # noqa: E402  (how every benchmark trains)

SIZES = {  # name -> (width d_model, layers, heads)
    "xs": (16, 1, 2),
    "s": (32, 2, 2),
    "m": (64, 2, 4),
    "l": (96, 3, 4),
}
EXPERIMENT = "synthetic_bench_feedsr"
TASKS = ("click", "long_view")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--steps", type=int, nargs="+", default=[60, 240], help="training budgets (steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=32, help="training sequences per step")
    p.add_argument("--flop-batches", type=int, default=4, help="batches whose FLOPs are counted per run")
    p.add_argument("--parallel", type=int, default=2, help="training runs side by side")
    p.add_argument("--data", type=Path, default=REPO / "data/synthetic_bench")
    p.add_argument("--runs", type=Path, default=REPO / "runs/scaling")
    p.add_argument("--json", type=Path, help="write the points and the fit as JSON here")
    p.add_argument("--png", type=Path, help="write the plot here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. model.backbone=attnmvp)")
    return p.parse_args(argv)


def overrides_of(args, size: str, steps: int) -> list[str]:
    width, layers, heads = SIZES[size]
    return [f"experiment={EXPERIMENT}", f"data.path={args.data}", f"data.batch_size={args.batch_size}",
            f"model.d_model={width}", f"model.num_layers={layers}", f"model.num_heads={heads}",
            f"model.ffn_dim={4 * width}", f"trainer.max_steps={steps}", f"trainer.val_every={steps}",
            f"trainer.checkpoint_every={steps}", *args.overrides]


def flops_per_step(overrides: list[str], batches: int, root: Path) -> tuple[float, int]:
    """(training FLOPs per step, dense parameters): the mean over ``batches`` real batches of a
    forward and backward pass, counted by torch's FlopCounterMode (CPU attention as bench_serve
    counts it). One process-wide trainer: call it from one thread at a time."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from feedsr.runtime.sharding import unwrap
    from feedsr.train.trainer import sampled_trainer

    aten = torch.ops.aten
    attention = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward_flops}
    with sampled_trainer([*overrides, "run_id=flops", f"output_root={root}", "data.num_workers=0",
                          "trainer.tensorboard=false"], batches) as (trainer, sample):
        model = unwrap(trainer.model)
        total = 0
        for batch in sample:
            with FlopCounterMode(display=False, custom_mapping=attention) as counter:
                model(batch).float().sum().backward()
            total += counter.get_total_flops()
            model.zero_grad(set_to_none=True)
        dense = sum(p.numel() for n, p in model.named_parameters() if "embedding" not in n)
    return total / len(sample), dense


def size_flops(args, size: str) -> dict:
    """FLOPs per step and dense parameters of a size (they do not depend on the budget), counted
    once and kept in ``--runs/<size>_flops.json`` with the settings they were counted under."""
    path = args.runs / f"{size}_flops.json"
    overrides = overrides_of(args, size, max(args.steps))
    settings = {"overrides": overrides, "flop_batches": args.flop_batches}
    if path.exists() and json.loads(path.read_text())["settings"] == settings:
        return json.loads(path.read_text())
    per_step, dense = flops_per_step(overrides, args.flop_batches, args.runs / "_flops")
    record = {"settings": settings, "flops_per_step": per_step, "dense_parameters": dense}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def run_one(args, size: str, steps: int, seed: int, threads: int) -> dict:
    """Train one size, budget and seed (or reuse its finished run); its validation AUC."""
    run_id = f"{size}_steps{steps}_seed{seed}"
    run_dir = args.runs / run_id
    overrides = overrides_of(args, size, steps)
    settings = {"overrides": overrides, "seed": seed}
    result = finished(run_dir, settings, "scaling")
    if result is not None:
        return result
    cmd, seconds = train_logged([*overrides, f"run_id={run_id}", f"output_root={args.runs}", f"seed={seed}",
                                 "trainer.progress=false", "trainer.tensorboard=false",
                                 f"trainer.num_threads={threads}"], run_dir, "scaling.log")
    best, _ = best_and_log(run_dir)
    result = {"size": size, "steps": steps, "seed": seed, "settings": settings, "seconds": seconds,
              "auc": statistics.fmean(best["metrics"][t]["auc"] for t in TASKS),
              "valid": {t: best["metrics"][t]["auc"] for t in best["metrics"]}, "command": " ".join(cmd[1:])}
    return save(run_dir, result)


def frontier(points: list[dict]) -> list[dict]:
    """The compute-efficient runs: those whose AUC no cheaper run reaches."""
    best, out = -math.inf, []
    for p in sorted(points, key=lambda p: p["flops"]):
        if p["auc"] > best:
            out.append(p)
            best = p["auc"]
    return out


def fit(points: list[dict]) -> dict:
    """Least squares AUC = a + b log10(FLOPs); b per 10x, with its standard error."""
    xs, ys = [math.log10(p["flops"]) for p in points], [p["auc"] for p in points]
    n = len(xs)
    if n < 2:
        return {"points": n, "slope_per_10x": float("nan"), "slope_se": float("nan"), "intercept": float("nan")}
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:  # one FLOPs value: no slope to fit
        return {"points": n, "slope_per_10x": float("nan"), "slope_se": float("nan"), "intercept": float("nan")}
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    resid = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    se = math.sqrt(resid / (n - 2) / sxx) if n > 2 else float("nan")
    return {"points": n, "slope_per_10x": slope, "slope_se": se, "intercept": intercept}


def mean_points(results: list[dict]) -> list[dict]:
    """One point per (size, steps): the seeds' mean AUC (and spread)."""
    keys = sorted({(r["size"], r["steps"]) for r in results}, key=lambda k: (list(SIZES).index(k[0]), k[1]))
    points = []
    for size, steps in keys:
        runs = [r for r in results if (r["size"], r["steps"]) == (size, steps)]
        aucs = [r["auc"] for r in runs]
        points.append({"size": size, "steps": steps, "flops": runs[0]["flops"], "auc": statistics.fmean(aucs),
                       "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else None, "seeds": len(runs),
                       "dense_parameters": runs[0]["dense_parameters"],
                       "minutes": statistics.fmean(r["seconds"] for r in runs) / 60})
    return points


def plot(points: list[dict], line: dict, best: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for size in dict.fromkeys(p["size"] for p in points):
        mine = [p for p in points if p["size"] == size]
        width, layers, _ = SIZES[size]
        ax.plot([p["flops"] for p in mine], [p["auc"] for p in mine], "o-",
                label=f"{size}: d={width}, {layers} layer(s), {mine[0]['dense_parameters']:,} dense params")
    if math.isfinite(line["slope_per_10x"]):
        xs = [best[0]["flops"], best[-1]["flops"]]  # over the frontier it was fitted on, not beyond
        ax.plot(xs, [line["intercept"] + line["slope_per_10x"] * math.log10(x) for x in xs], "k--",
                label=f"frontier fit: {line['slope_per_10x']:+.4f} AUC per 10x FLOPs")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (counted: forward + backward, x steps)")
    ax.set_ylabel("validation AUC, mean of click and long_view")
    ax.set_title("Feed-SR on the synthetic benchmark's world")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    ensure_data(args)
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    jobs = [(size, steps, seed) for seed in args.seeds for size in args.sizes for steps in args.steps]
    print(f"[scaling] {len(jobs)} runs, {args.parallel} at a time, {threads} thread(s) each", flush=True)
    start = time.perf_counter()

    def job(item):
        result = run_one(args, *item, threads)
        print(f"[scaling] {item[0]} {item[1]} steps seed {item[2]}: AUC {result['auc']:.4f} "
              f"({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
        return result

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(job, jobs))
    counted = {size: size_flops(args, size) for size in args.sizes}  # one at a time: one trainer per process
    for r in results:
        r["flops_per_step"], r["dense_parameters"] = counted[r["size"]]["flops_per_step"], counted[r["size"]]["dense_parameters"]
        r["flops"] = r["flops_per_step"] * r["steps"]
    points = mean_points(results)
    best = frontier(points)
    line = fit(best)
    print(f"{'size':5s} {'steps':>6s} {'FLOPs':>10s} {'AUC':>8s} {'min':>5s}")
    for p in points:
        print(f"{p['size']:5s} {p['steps']:6d} {p['flops']:10.3g} {p['auc']:8.4f} {p['minutes']:5.1f}")
    print(f"frontier fit over {line['points']} points: {line['slope_per_10x']:+.4f} AUC per 10x FLOPs "
          f"(standard error {line['slope_se']:.4f})")
    if args.json:
        args.json.write_text(json.dumps({"sizes": {s: SIZES[s] for s in args.sizes}, "batch_size": args.batch_size,
                                         "overrides": args.overrides, "points": points, "fit": line,
                                         "frontier": [(p["size"], p["steps"]) for p in best],
                                         "runs": results}, indent=1) + "\n")
    if args.png:
        plot(points, line, best, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
