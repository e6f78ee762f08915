#!/usr/bin/env python
"""Parameter counts and forward+backward time per batch of the default models.

    python scripts/model_stats.py [--models feedsr dcnv2] [--data data/synthetic] [--batches 20] [--json out.json]

Each model is built from the Hydra config (``model=<name>`` with the synthetic data config),
sharded the way training shards it (DMP, one process), and timed over real training batches
(bucketed, as the trainer sees them): forward + loss + backward (fused sparse update included) +
dense optimizer step, after 3 warm-up batches, on all of this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["feedsr", "dcnv2"])
    p.add_argument("--data", type=Path, default=REPO / "data/synthetic")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def count(model) -> dict:
    tables = sum(p.numel() for n, p in model.named_parameters() if ".ec." in n)
    total = sum(p.numel() for p in model.parameters())
    return {"dense_params": total - tables, "embedding_params": tables, "total_params": total}


def measure(name: str, args) -> dict:
    from feedsr.train.trainer import sampled_trainer

    overrides = [f"model={name}", f"data.path={args.data}", "data.num_workers=0", "run_id=model_stats",
                 "output_root=/tmp/feedsr_model_stats", "trainer.tensorboard=false", *args.overrides]
    with sampled_trainer(overrides, args.batches + 3) as (trainer, sample):
        for batch in sample[:3]:
            trainer.train_step(batch)
        times = []
        for batch in sample[3:]:
            start = time.perf_counter()
            trainer.train_step(batch)
            times.append(time.perf_counter() - start)
        rows = [len(b.lengths) for b in sample[3:]]
        imps = [int(b.lengths.sum()) for b in sample[3:]]
        return {"model": name, **count(trainer.model),
                "ms_per_batch_median": 1000 * statistics.median(times),
                "rows_per_batch": statistics.fmean(rows), "impressions_per_batch": statistics.fmean(imps),
                "impressions_per_s": sum(imps) / sum(times), "threads": torch.get_num_threads()}


def main(argv=None):
    from feedsr.quiet import quiet_libraries

    quiet_libraries()
    args = parse_args(argv)
    results = [measure(name, args) for name in args.models]
    print(f"{'model':8s} {'dense params':>13s} {'table params':>13s} {'fwd+bwd+step ms':>16s} "
          f"{'imps/batch':>11s} {'imps/s':>9s}")
    for r in results:
        print(f"{r['model']:8s} {r['dense_params']:13,d} {r['embedding_params']:13,d} "
              f"{r['ms_per_batch_median']:16.1f} {r['impressions_per_batch']:11,.0f} {r['impressions_per_s']:9,.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
