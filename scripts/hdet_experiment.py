#!/usr/bin/env python
"""HDET's central claim at small scale: stable training at a learning rate where plain DDP fails.

    python scripts/hdet_experiment.py --nproc 4 --seeds 0 1 --steps 300 --out docs/hdet_experiment.json

Runs, with the same data, model, budget and seeds, on ``--nproc`` CPU processes (torchrun, gloo):

    ddp_safe          plain DDP at the safe peak learning rate
    ddp_high          plain DDP at ``--high-factor`` x that rate
    hdet_high         HDET (spread + converges + auto-LR) at the high rate
    hdet_high_noauto  HDET without auto-LR (spread + converges only) at the high rate

and reports per configuration (mean and std over seeds): final training loss (mean of the last 10%
of steps), validation AUC and NE per task, whether any run diverged, and the converges' share of
wall time (the communication overhead). Prints a Markdown table and writes JSON.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--safe-lr", type=float, default=0.002)
    p.add_argument("--high-factor", type=float, default=8.0)
    p.add_argument("--converge-every", type=int, default=25)
    p.add_argument("--data", type=Path, default=REPO / "data/synthetic_hdet")
    p.add_argument("--members", type=int, default=6000)
    p.add_argument("--runs", type=Path, default=REPO / "runs/hdet_experiment")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def configurations(args) -> dict[str, list[str]]:
    high = args.safe_lr * args.high_factor
    hdet = ["trainer=hdet", f"trainer.hdet.converge_every={args.converge_every}",
            f"trainer.hdet.warm_steps={2 * args.converge_every}"]
    return {
        "ddp_safe": [f"optimizer.lr={args.safe_lr}"],
        "ddp_high": [f"optimizer.lr={high}"],
        "hdet_high": [f"optimizer.lr={high}", *hdet],
        "hdet_high_noauto": [f"optimizer.lr={high}", *hdet, "trainer.hdet.auto_lr=false"],
    }


def run_one(args, name: str, overrides: list[str], seed: int) -> dict:
    run_id = f"{name}_seed{seed}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--master-port", str(free_port()), "-m", "feedsr.train",
           f"run_id={run_id}", f"output_root={args.runs}", f"seed={seed}",
           f"data.path={args.data}", f"data.generate.num_members={args.members}",
           "data.batch_size=32", "data.num_workers=0", "data.max_seq_len=128",
           "model.num_layers=2", "model.ffn_dim=128",
           f"trainer.max_steps={args.steps}", "trainer.checkpoint_every=0", "trainer.progress=false",
           "trainer.val_max_rows=40960", "trainer.num_threads=1", "optimizer.grad_clip=0", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    run_dir = args.runs / run_id
    result = {"config": name, "seed": seed, "seconds": seconds, "diverged": proc.returncode != 0}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        result["error"] = " | ".join(tail)
        if "non-finite loss" not in result["error"]:
            raise RuntimeError(f"{run_id} failed: {result['error']}")
        return result
    losses = [json.loads(x)["loss"] for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    tail = max(1, len(losses) // 10)
    result["final_loss"] = statistics.fmean(losses[-tail:])
    valid = json.loads((run_dir / "valid_metrics.jsonl").read_text().splitlines()[-1])["metrics"]
    result["valid"] = {t: {"auc": m["auc"], "ne": m["ne"]} for t, m in valid.items()}
    converges = run_dir / "hdet_converges.jsonl"
    if converges.exists():
        records = [json.loads(x) for x in converges.read_text().splitlines()]
        result["converge_seconds"] = sum(r["seconds"] for r in records)
        result["final_base_lrs"] = records[-1]["base_lrs"]
    return result


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["config"] for r in results):
        runs = [r for r in results if r["config"] == name]
        ok = [r for r in runs if not r["diverged"]]
        row = {"config": name, "runs": len(runs), "diverged": len(runs) - len(ok)}
        if ok:
            for key, values in {
                "final_loss": [r["final_loss"] for r in ok],
                "click_auc": [r["valid"]["click"]["auc"] for r in ok],
                "long_view_auc": [r["valid"]["long_view"]["auc"] for r in ok],
                "like_auc": [r["valid"]["like"]["auc"] for r in ok],
                "click_ne": [r["valid"]["click"]["ne"] for r in ok],
            }.items():
                row[key] = statistics.fmean(values)
                row[key + "_std"] = statistics.pstdev(values)
            if "converge_seconds" in ok[0]:
                row["converge_share"] = statistics.fmean(r["converge_seconds"] / r["seconds"] for r in ok)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| config | diverged | final train loss | click AUC | long_view AUC | like AUC | click NE | converge share |"
    lines = [head, "|" + "---|" * 8]
    fmt = lambda r, k: f"{r[k]:.4f} ± {r[k + '_std']:.4f}" if k in r else "-"  # noqa: E731
    for r in rows:
        share = f"{100 * r['converge_share']:.2f}%" if "converge_share" in r else "-"
        lines.append(f"| {r['config']} | {r['diverged']}/{r['runs']} | {fmt(r, 'final_loss')} | "
                     f"{fmt(r, 'click_auc')} | {fmt(r, 'long_view_auc')} | {fmt(r, 'like_auc')} | "
                     f"{fmt(r, 'click_ne')} | {share} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    results = []
    for seed in args.seeds:
        for name, overrides in configurations(args).items():
            result = run_one(args, name, overrides, seed)
            results.append(result)
            status = "DIVERGED" if result["diverged"] else f"loss {result['final_loss']:.4f}"
            print(f"[hdet-experiment] {name} seed {seed}: {status} ({result['seconds']:.0f} s)", flush=True)
    rows = summarize(results)
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "summary": rows, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
