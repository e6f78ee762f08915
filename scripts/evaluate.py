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
    p.add_argument("--calibration", type=Path, help="also report the metrics after this calibration "
                   "(python -m feedsr.serve calibrate)")
    p.add_argument("--history-buckets", type=int, nargs="+", metavar="EDGE",
                   help="also report the metrics by history length (impressions before the target in "
                        "its row, as scripts/baseline_trees.py buckets them): bucket edges, the last "
                        "bucket open, e.g. 0 10 50 100 160")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from feedsr.quiet import quiet_libraries

    quiet_libraries()
    from feedsr.eval.calibration import Calibration, calibrated_metrics
    from feedsr.eval.metrics import format_buckets, format_table
    from feedsr.eval.scoring import predict_checkpoint
    from feedsr.eval.trained import resolve_checkpoint, run_config
    from feedsr.runtime.checkpoint import CheckpointError

    try:
        checkpoint, damaged = resolve_checkpoint(args.checkpoint)
        config = run_config(checkpoint, args.data, args.batch_size)
        calibration = Calibration.load(args.calibration) if args.calibration else None
    except (CheckpointError, ValueError) as e:
        sys.exit(f"evaluate: {e}")
    for problem in damaged:
        print(f"evaluate: WARNING: skipped a damaged checkpoint: {problem}", file=sys.stderr)
    start = time.perf_counter()
    try:
        predicted = predict_checkpoint(config, checkpoint, args.split, args.max_rows)
    except CheckpointError as e:
        sys.exit(f"evaluate: {e}")
    metrics = predicted.compute()
    seconds = time.perf_counter() - start
    print(f"{checkpoint} on {config.data.path} [{args.split}] ({seconds:.1f} s)")
    print(format_table(metrics))
    report = {"checkpoint": str(checkpoint), "data": config.data.path, "split": args.split,
              "seconds": seconds, "metrics": {k: m.to_dict() for k, m in metrics.items()}}
    if args.history_buckets:
        try:
            buckets = predicted.by_history(args.history_buckets + [None])
        except ValueError as e:
            sys.exit(f"evaluate: --history-buckets: {e}")
        print(format_buckets(buckets))
        report["by_history"] = {b: {t: x.to_dict() for t, x in m.items()} for b, m in buckets.items()}
    if calibration is not None:
        try:
            after = calibrated_metrics(calibration, predicted)
        except ValueError as e:
            sys.exit(f"evaluate: {args.calibration}: {e}")
        print(f"after the calibration {args.calibration} (fitted on {calibration.fitted_on}):")
        print(format_table(after))
        report["calibrated"] = {k: m.to_dict() for k, m in after.items()}
        report["calibration"] = str(args.calibration)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


if __name__ == "__main__":
    main()
