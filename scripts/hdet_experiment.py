#!/usr/bin/env python
"""HDET's claims at small scale, where they can fail: does it spare a learning-rate sweep, and does
it survive rates that break plain DDP?

    python scripts/hdet_experiment.py sweep --out docs/hdet_sweep.json
    python scripts/hdet_experiment.py search --out docs/hdet_search.json
    python scripts/hdet_experiment.py stability --lr 0.1 --residual post_ln --out docs/hdet_stability.json
    python scripts/hdet_experiment.py replicas --out docs/hdet_replicas.json

Every run: ``--nproc`` CPU processes (torchrun, gloo, one thread each), synthetic data, the same
model, data order, seeds and number of steps, no gradient clipping (so that instability can show).

- ``sweep``: plain DDP at 5 peak rates spanning ``--span`` (30x) below ``--top-lr``, against one
  HDET run started at the top rate with each auto-LR variant (``geometric``: the paper's decay to
  the floor; ``schedule``: a factor on OneCycle), with the paper's constants, and one with the
  ``schedule`` variant set to be able to cross the range (``WIDE``). One HDET run costs a fifth
  of the sweep.
- ``search``: the unstable regime (``--unstable``: no warm-up; ``--search-residuals``: the block
  forms the paper found unstable, ``plain`` and ``post_ln``), plain DDP at rising rates, one seed:
  where does it diverge or collapse?
- ``stability``: in that regime at ``--lr``: plain DDP vs HDET without auto-LR and with each
  variant, and the wide setting (its spread reaches rates that survive); diverged and collapsed
  runs counted, the others' loss and AUC.
- ``replicas``: HDET with gradient-synchronous vs independent replicas at the top rate: loss,
  AUC, training speed and the values communicated per step.

Reported per configuration (mean ± std over seeds): runs that stopped on a non-finite loss or
parameter ("diverged"), final training loss (mean of the last 10% of steps, over ranks), validation
AUC and NE per task (validation capped at the split's first 40,960 rows), converge share of wall
time. A finished run is reused when its command is the same (``result.json`` in its run directory).
Prints Markdown and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from feedsr.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
UNSTABLE = "optimizer.warmup_pct=0"
TASKS = ("click", "long_view", "like")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=("sweep", "search", "stability", "replicas"))
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--top-lr", type=float, default=0.03, help="sweep's highest rate; HDET starts here")
    p.add_argument("--span", type=float, default=30.0, help="sweep: highest / lowest rate")
    p.add_argument("--lr", type=float, help="stability: the rate (from search)")
    p.add_argument("--search-lrs", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--search-residuals", nargs="+", default=["post_ln", "plain"])
    p.add_argument("--residual", default="post_ln", help="stability: model.residual (from search)")
    p.add_argument("--unstable", default=UNSTABLE, help="overrides of the unstable regime")
    p.add_argument("--collapse-auc", type=float, default=0.55,
                   help="a finished run whose validation click AUC is below this collapsed")
    p.add_argument("--modes", nargs="+", default=["geometric", "schedule"],
                   help="replicas: the auto-LR variants to run both ways")
    p.add_argument("--converge-every", type=int, default=25)
    p.add_argument("--data", type=Path, default=REPO / "data/synthetic_hdet")
    p.add_argument("--members", type=int, default=6000)
    p.add_argument("--runs", type=Path, default=REPO / "runs/hdet_experiment")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.experiment == "stability" and args.lr is None:
        p.error("stability needs --lr (the rate at which plain DDP diverged in `search`)")
    return args


# HDET set so that auto-LR can cross the sweep's range in one run: with the paper's alpha = 1/9
# and lambda = 0.5 the base moves by at most ~lambda * alpha = 5.5% per converge, i.e. < 2x over
# the ~10 converges of a 300-step run. A wider spread (alpha 0.5), twice as many converges, and the
# learning rates scored on the held-out rows (the same rows for every replica, so the gaps are the
# rates' and not the data's, sigma sized for them). Set by that arithmetic, not searched.
WIDE = ["trainer.hdet.lr_score=clean", "trainer.hdet.alpha=0.5", "trainer.hdet.sigma=0.01"]


def hdet(args, mode: str | None, replicas: str = "sync", every: int | None = None) -> list[str]:
    """HDET overrides; ``mode`` None: without auto-LR (spread and averaging only)."""
    every = every or args.converge_every
    out = ["trainer=hdet", f"trainer.hdet.converge_every={every}",
           f"trainer.hdet.warm_steps={2 * every}", f"trainer.hdet.mode={replicas}"]
    return out + (["trainer.hdet.auto_lr=false"] if mode is None else [f"trainer.hdet.auto_lr_mode={mode}"])


def wide(args) -> list[str]:
    """HDET with the WIDE settings, converging twice as often as ``--converge-every``."""
    return [*hdet(args, "schedule", every=max(args.converge_every // 2, 1)), *WIDE]


def sweep_rates(args) -> list[float]:
    return [args.top_lr / args.span ** (k / 4) for k in range(4, -1, -1)]


def configurations(args) -> dict[str, list[str]]:
    """Name -> overrides of every run of the experiment (each for every seed)."""
    top = f"optimizer.lr={args.top_lr}"
    unstable = args.unstable.split()
    if args.experiment == "sweep":
        runs = {f"ddp_lr{lr:.4g}": [f"optimizer.lr={lr}"] for lr in sweep_rates(args)}
        runs |= {f"hdet_{m}_top": [top, *hdet(args, m)] for m in ("geometric", "schedule")}
        return runs | {"hdet_schedule_wide_top": [top, *wide(args)]}
    if args.experiment == "search":
        return {f"ddp_{res}_lr{lr:g}": [*unstable, f"model.residual={res}", f"optimizer.lr={lr}"]
                for res in args.search_residuals for lr in args.search_lrs}
    if args.experiment == "stability":
        lr = [*unstable, f"model.residual={args.residual}", f"optimizer.lr={args.lr}"]
        return {"ddp": lr, "hdet_noauto": [*lr, *hdet(args, None)],
                **{f"hdet_{m}": [*lr, *hdet(args, m)] for m in ("geometric", "schedule")},
                "hdet_schedule_wide": [*lr, *wide(args)]}
    # the synchronous runs are the sweep's own (same run ids and commands: reused when there)
    return {f"hdet_{m}_top{'' if r == 'sync' else '_independent'}": [top, *hdet(args, m, r)]
            for m in args.modes for r in ("sync", "independent")}


def run_one(args, name: str, overrides: list[str], seed: int) -> dict:
    run_id = f"{name}_seed{seed}"
    cmd = ["-m", "feedsr.train",
           f"run_id={run_id}", f"output_root={args.runs}", f"seed={seed}",
           f"data.path={args.data}", f"data.generate.num_members={args.members}",
           "data.batch_size=32", "data.num_workers=0", "data.max_seq_len=128",
           "model.num_layers=2", "model.ffn_dim=128",
           f"trainer.max_steps={args.steps}", "trainer.checkpoint_every=0", "trainer.progress=false",
           "trainer.val_max_rows=40960", "trainer.num_threads=1", "optimizer.grad_clip=0", *overrides]
    run_dir = args.runs / run_id
    saved = run_dir / "result.json"
    if saved.exists() and json.loads(saved.read_text()).get("cmd") == cmd:
        return json.loads(saved.read_text())
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                           "--master-port", str(free_port()), *cmd], cwd=REPO, capture_output=True, text=True)
    result = {"config": name, "seed": seed, "cmd": cmd, "seconds": time.perf_counter() - start,
              "diverged": proc.returncode != 0}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        result["error"] = " | ".join(tail)
        if "non-finite" not in result["error"]:
            raise RuntimeError(f"{run_id} failed: {result['error']}")
    else:
        result |= read_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result, indent=2) + "\n")
    return result


def read_run(run_dir: Path) -> dict:
    """Final loss, validation metrics, speed and HDET's converges of a finished run."""
    records = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = records[-1]["step"]
    losses = [r["loss"] for r in records]
    tail = max(1, len(losses) // 10)
    valid = json.loads((run_dir / "valid_metrics.jsonl").read_text().splitlines()[-1])["metrics"]
    out = {"final_loss": statistics.fmean(losses[-tail:]), "steps": steps,
           "impressions_per_s": statistics.fmean(r["impressions_per_s"] for r in records),
           "valid": {t: {"auc": m["auc"], "ne": m["ne"]} for t, m in valid.items()}}
    converges = run_dir / "hdet_converges.jsonl"
    if converges.exists():
        conv = [json.loads(x) for x in converges.read_text().splitlines()]
        out["converge_seconds"] = sum(c["seconds"] for c in conv)
        out["base_lrs"] = [{"step": c["step"], **c["base_lrs"]} for c in conv]
        out["averaged_values"] = conv[-1].get("averaged_values")
        out["converges"] = len(conv)
    return out


def communicated_per_step(run: dict, replicas: str) -> float | None:
    """Dense values all-reduced per step: the gradients every step (sync), plus the parameters at
    each converge. (A step's few loss statistics are left out: both modes send them.)"""
    n = run.get("averaged_values")
    if n is None:
        return None
    return (n if replicas == "sync" else 0) + n * run["converges"] / run["steps"]


def summarize(results: list[dict], collapse_auc: float) -> list[dict]:
    """Per configuration: runs, diverged (stopped non-finite), collapsed (finished with validation
    click AUC below ``collapse_auc``), and the means ± std of the other runs."""
    rows = []
    for name in dict.fromkeys(r["config"] for r in results):
        runs = [r for r in results if r["config"] == name]
        finished = [r for r in runs if not r["diverged"]]
        ok = [r for r in finished if r["valid"]["click"]["auc"] >= collapse_auc]
        row = {"config": name, "runs": len(runs), "diverged": len(runs) - len(finished),
               "collapsed": len(finished) - len(ok)}
        if ok:
            values = {"final_loss": [r["final_loss"] for r in ok],
                      "impressions_per_s": [r["impressions_per_s"] for r in ok]}
            for t in TASKS:
                values[f"{t}_auc"] = [r["valid"][t]["auc"] for r in ok]
                values[f"{t}_ne"] = [r["valid"][t]["ne"] for r in ok]
            for key, vs in values.items():
                row[key], row[key + "_std"] = statistics.fmean(vs), statistics.pstdev(vs)
            if "converge_seconds" in ok[0]:
                row["converge_share"] = statistics.fmean(r["converge_seconds"] / r["seconds"] for r in ok)
                replicas = "independent" if name.endswith("independent") else "sync"
                row["communicated_per_step"] = communicated_per_step(ok[0], replicas)
                row["final_base_lr"] = statistics.fmean(r["base_lrs"][-1]["transformer"] for r in ok)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| config | diverged | collapsed | final train loss | click AUC | long_view AUC | like AUC | click NE | "
            "imps/s | converge share |")
    lines = [head, "|" + "---|" * 10]
    fmt = lambda r, k, d=4: f"{r[k]:.{d}f} ± {r[k + '_std']:.{d}f}" if k in r else "-"  # noqa: E731
    for r in rows:
        share = f"{100 * r['converge_share']:.2f}%" if "converge_share" in r else "-"
        speed = f"{r['impressions_per_s']:,.0f}" if "impressions_per_s" in r else "-"
        lines.append(f"| {r['config']} | {r['diverged']}/{r['runs']} | {r['collapsed']}/{r['runs']} | "
                     f"{fmt(r, 'final_loss')} | "
                     f"{fmt(r, 'click_auc')} | {fmt(r, 'long_view_auc')} | {fmt(r, 'like_auc')} | "
                     f"{fmt(r, 'click_ne')} | {speed} | {share} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    seeds = args.seeds[:1] if args.experiment == "search" else args.seeds
    results, start = [], time.perf_counter()
    configs = configurations(args)
    for seed in seeds:
        for name, overrides in configs.items():
            result = run_one(args, name, overrides, seed)
            results.append(result)
            status = "DIVERGED" if result["diverged"] else (
                f"loss {result['final_loss']:.4f}, click AUC {result['valid']['click']['auc']:.4f}")
            print(f"[hdet-experiment] {name} seed {seed}: {status} ({result['seconds']:.0f} s)", flush=True)
    rows = summarize(results, args.collapse_auc)
    print(markdown(rows))
    print(f"[hdet-experiment] {len(results)} runs, {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "summary": rows, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
