#!/usr/bin/env python
"""Gradient-boosted trees (LightGBM, one model per task) on each impression's own features.

    python scripts/baseline_trees.py data=kuairand_prepared [data.path=DIR] [--ids] [--seeds 0 1 2] \
        [--tasks click long_view like] [--json FILE]

The dataset and its features are the neural models' (``data=...`` and further Hydra overrides of
the data group, as for ``python -m feedsr.train``): every ``ctx_*`` column, every ``cat_*`` column as
a categorical (as its code beyond ``--max-categories`` levels), with ``--ids`` the item and author
ids too; the impressions are the target
impressions of the data config's train and validation splits (rows cut to ``data.max_seq_len``).
Early stopping on validation, so the figures are validation figures of a model stopped on that
same split, as the neural models' checkpoints are chosen (``feedsr/eval/trees.py``); with
``--report-split test`` they are the test split's, of models stopped on validation. Prints the
metrics table per seed, AUC by history length, and, with several seeds, the mean and sample std of each task's AUC.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from feedsr.quiet import quiet_libraries


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=kuairand_prepared data.path=DIR")
    p.add_argument("--ids", action="store_true", help="give the trees the item and author ids as categoricals")
    p.add_argument("--max-categories", type=int, default=64,
                   help="categoricals with more levels are given as their codes (numbers)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tasks", nargs="+", help="tasks to fit (default: every task of the data config)")
    p.add_argument("--threads", type=int, default=0, help="LightGBM threads (0: every core)")
    p.add_argument("--max-rounds", type=int, default=2000)
    p.add_argument("--history-buckets", type=int, nargs="+", default=[0, 10, 50, 100, 160],
                   help="AUC by history length (impressions before the target in its row, pre-window "
                        "ones included): bucket edges, the last bucket open")
    p.add_argument("--report-split", help="score this split (e.g. test) instead of the validation split "
                   "the trees are early stopped on")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    quiet_libraries()
    args = parse_args(argv)
    from feedsr.data.config import batch_spec, ensure_dataset
    from feedsr.eval.metrics import format_buckets, format_table, metrics_by_bucket
    from feedsr.eval.trees import TreeConfig, fit_and_score, read_impressions
    from feedsr.runtime.config import compose_config, to_config

    data = to_config(compose_config(args.overrides)).data
    meta = ensure_dataset(dataclasses.replace(data, generate=None))
    spec = batch_spec(data, meta)
    names = [t.name for t in spec.tasks]
    tasks = args.tasks or names
    unknown = sorted(set(tasks) - set(names))
    if unknown:
        raise SystemExit(f"baseline_trees: unknown task(s) {unknown}; the data config has {names}")
    keep = [names.index(t) for t in tasks]
    start = time.perf_counter()
    train = read_impressions(data.path, data.train_split, spec, data.max_seq_len, args.ids, args.max_categories)
    valid = read_impressions(data.path, data.valid_split, spec, data.max_seq_len, args.ids, args.max_categories)
    split = args.report_split or data.valid_split
    report = valid if split == data.valid_split else read_impressions(
        data.path, split, spec, data.max_seq_len, args.ids, args.max_categories)
    for part in {id(x): x for x in (train, valid, report)}.values():
        part.labels, part.true_probs = part.labels[:, keep], part.true_probs[:, keep]
    print(f"trees: {data.path}: {len(train):,} train, {len(valid):,} {data.valid_split} and {len(report):,} "
          f"{split} impressions, "
          f"{len(train.columns)} features ({len(train.categorical)} categorical), read in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    runs = []
    for seed in args.seeds:
        config = TreeConfig(threads=args.threads, seed=seed, max_rounds=args.max_rounds)
        result = fit_and_score(train, valid, tasks, config, lambda line: print(line, flush=True), report)
        print(f"\nseed {seed}, {split}:\n{format_table(result.metrics)}\n", flush=True)
        buckets = metrics_by_bucket(tasks, result.preds, report.labels, report.true_probs, report.history,
                                    args.history_buckets + [None])
        print(format_buckets(buckets) + "\n", flush=True)
        runs.append({"seed": seed, "metrics": {t: m.to_dict() for t, m in result.metrics.items()},
                     "by_history": {b: {t: x.to_dict() for t, x in m.items()} for b, m in buckets.items()},
                     "rounds": result.rounds, "seconds": result.seconds, "importance": result.importance})
    if len(runs) > 1:
        for task in tasks:
            aucs = [r["metrics"][task]["auc"] for r in runs]
            print(f"{task:14s} AUC {statistics.mean(aucs):.4f} ± {statistics.stdev(aucs):.4f} over seeds {args.seeds}")
    result = {"data": data.path, "split": split, "features": train.columns,
              "categorical": train.categorical, "train_impressions": len(train), "valid_impressions": len(valid),
              "report_impressions": len(report),
              "config": dataclasses.asdict(TreeConfig(threads=args.threads, max_rounds=args.max_rounds))
              | {"ids": args.ids, "max_categories": args.max_categories},
              "runs": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
