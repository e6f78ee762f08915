"""Generate a synthetic feedsr dataset and print what it holds.

    python scripts/make_synthetic.py --out data/synthetic --num-members 20000 --seed 0

Prints the rows and targets of each split, the base rate of each action on each split's targets,
the wall time, and the oracle AUC (the true probability scored against the labels) per action on
the test split: the ceiling a model trained on this data can reach.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from feedsr.data.schema import TRUE_PROB_PREFIX
from feedsr.data.synthetic import ACTION_NAMES, generate, load_targets


def rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC from ranks (Mann-Whitney U), ties given their average rank; NaN for one class."""
    labels = labels.astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct score
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def _labels(action_bits: np.ndarray) -> np.ndarray:
    """(n, actions) bool from the action bitmask."""
    return ((action_bits[:, None] >> np.arange(len(ACTION_NAMES))) & 1).astype(bool)


def summarize(out_dir: str, meta: dict) -> None:
    header = "".join(f"{a:>11}" for a in ACTION_NAMES)
    print(f"{'split':<6}{'rows':>8}{'members':>9}{'targets':>10}   base rate:{header}")
    for name, counts in meta["splits"].items():
        rates = ""
        if counts["rows"]:  # a split can be empty with very few members, and then has no file
            labels = _labels(load_targets(out_dir, name, ["action_bits"])["action_bits"])
            rates = "".join(f"{r:>11.4f}" for r in labels.mean(axis=0))
        print(
            f"{name:<6}{counts['rows']:>8}{counts['members']:>9}{counts['targets']:>10}"
            f"{'':>13}{rates}"
        )
    if not meta["splits"]["test"]["rows"]:
        return
    columns = ["action_bits"] + [TRUE_PROB_PREFIX + a for a in ACTION_NAMES]
    test = load_targets(out_dir, "test", columns)
    labels = _labels(test["action_bits"])
    print(f"{'test: oracle AUC':<46}" + "".join(
        f"{rank_auc(test[TRUE_PROB_PREFIX + a], labels[:, i]):>11.4f}"
        for i, a in enumerate(ACTION_NAMES)
    ))
    print(f"{'test: mean true prob':<46}" + "".join(
        f"{test[TRUE_PROB_PREFIX + a].mean():>11.4f}" for a in ACTION_NAMES
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset directory to write")
    parser.add_argument("--num-members", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-len", type=int, default=256)
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        meta = generate(args.out, args.num_members, args.seed, args.max_seq_len)
    except ValueError as e:
        parser.error(str(e))
    elapsed = time.perf_counter() - start
    print(
        f"wrote {args.out}: {meta['num_members']} members, {meta['num_items']} posts, "
        f"{meta['num_authors']} authors in {elapsed:.1f}s"
    )
    summarize(args.out, meta)


if __name__ == "__main__":
    main()
