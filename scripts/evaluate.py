#!/usr/bin/env python
"""Offline evaluation: per-task AUC, NE, log loss, calibration (and the oracle on synthetic data).

    python scripts/evaluate.py --checkpoint runs/synthetic_main/checkpoints/step-800 \
        --data data/synthetic --split test --out test_metrics.json

Every target impression of the split is scored (no negative sampling). ``--checkpoint`` may also
be a run directory, which means its newest complete checkpoint. The model is rebuilt from the
``config.yaml`` saved in the run directory; a checkpoint from any world size loads here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="step-N folder or run directory")
    p.add_argument("--data", type=Path, help="dataset directory (default: the run's data.path)")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: the run's eval_batch_size)")
    p.add_argument("--max-rows", type=int, help="score only the split's first N rows in file order "
                   "(what trainer.val_max_rows validates on; default: every row)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from feedsr.quiet import quiet_libraries

    quiet_libraries()
    from feedsr.eval.metrics import format_table
    from feedsr.eval.scoring import evaluate_checkpoint
    from feedsr.eval.trained import resolve_checkpoint, run_config
    from feedsr.runtime.checkpoint import CheckpointError

    try:
        checkpoint, damaged = resolve_checkpoint(args.checkpoint)
        config = run_config(checkpoint)
    except CheckpointError as e:
        sys.exit(f"evaluate: {e}")
    for problem in damaged:
        print(f"evaluate: WARNING: skipped a damaged checkpoint: {problem}", file=sys.stderr)
    data = dataclasses.replace(config.data, generate=None,
                               path=str(args.data or config.data.path),
                               eval_batch_size=args.batch_size or config.data.eval_batch_size)
    config = dataclasses.replace(config, data=data)
    start = time.perf_counter()
    try:
        metrics = evaluate_checkpoint(config, checkpoint, args.split, args.max_rows)
    except CheckpointError as e:
        sys.exit(f"evaluate: {e}")
    seconds = time.perf_counter() - start
    print(f"{checkpoint} on {data.path} [{args.split}] ({seconds:.1f} s)")
    print(format_table(metrics))
    report = {"checkpoint": str(checkpoint), "data": data.path, "split": args.split,
              "seconds": seconds, "metrics": {k: m.to_dict() for k, m in metrics.items()}}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


if __name__ == "__main__":
    main()
