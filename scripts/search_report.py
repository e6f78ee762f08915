#!/usr/bin/env python
"""Every trial of a hyperparameter search (``hparams_search=...``) in one table.

    python scripts/search_report.py runs/search_kuairand_feedsr [--json FILE]

Per trial (``trial_<n>`` folders, in order): the values the sweeper drew (``hydra/overrides.yaml``),
the best validation step and score (``best.json``: mean AUC over ``trainer.select_tasks``), each
selection task's AUC there, and the minutes from its start to its last validation. Optuna's own
``optimization_results.yaml`` keeps only the best trial, and only when the search ran to its end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("search", type=Path, help="the search's folder (runs/<study_name>)")
    p.add_argument("--json", type=Path, help="write the trials as JSON here")
    return p.parse_args(argv)


def trial_record(trial: Path) -> dict | None:
    """A finished trial's drawn values, best step and score; None while it has no validation."""
    best = trial / "best.json"
    if not best.exists():
        return None
    record = json.loads(best.read_text())
    drawn = {}
    for line in yaml.safe_load((trial / "hydra" / "overrides.yaml").read_text()):
        key, value = line.split("=", 1)
        drawn[key] = value
    seconds = (trial / "valid_metrics.jsonl").stat().st_mtime - (trial / "hydra").stat().st_mtime
    return {"trial": trial.name, "params": drawn, "best_step": record["step"], "score": record["score"],
            "auc": {t: record["metrics"][t]["auc"] for t in record["tasks"]}, "minutes": seconds / 60}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    trials = sorted(args.search.glob("trial_*"), key=lambda p: int(p.name.split("_")[1]))
    records = [r for r in map(trial_record, trials) if r is not None]
    if not records:
        sys.exit(f"search_report: no finished trial (with a best.json) in {args.search}")
    searched = list(yaml.safe_load((trials[0] / "hydra" / "hydra.yaml").read_text())["hydra"]["sweeper"]["params"])
    tasks = list(records[0]["auc"])
    print("| trial | " + " | ".join(searched) + " | best step | score | " + " | ".join(tasks) + " | minutes |")
    print("|" + "---|" * (len(searched) + len(tasks) + 4))
    for r in records:
        values = [r["params"].get(k, "") for k in searched]
        values = [f"{float(v):.2e}" if k.endswith("lr") else v for k, v in zip(searched, values)]
        print(f"| {r['trial']} | " + " | ".join(values) + f" | {r['best_step']} | {r['score']:.4f} | "
              + " | ".join(f"{r['auc'][t]:.4f}" for t in tasks) + f" | {r['minutes']:.1f} |")
    best = max(records, key=lambda r: r["score"])
    print(f"best: {best['trial']} (score {best['score']:.4f}): "
          + " ".join(f"{k}={best['params'][k]}" for k in searched))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"search": str(args.search), "trials": records}, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
