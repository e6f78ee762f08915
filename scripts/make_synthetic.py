"""Generate a synthetic feedsr dataset and print what it holds.

    python scripts/make_synthetic.py --out data/synthetic --num-members 20000 --seed 0

Prints the rows and targets of each split, the base rate of each action on each split's targets,
the wall time, and the oracle AUC (the true probability scored against the labels) per action on
the test split: the ceiling a model trained on this data can reach.
"""

from __future__ import annotations

import argparse
import time

from feedsr.data.schema import TRUE_PROB_PREFIX
from feedsr.data.synthetic import ACTION_NAMES, load_targets
from feedsr.prepare.synthetic import generate
from feedsr.data.tasks import decode_actions
from feedsr.data.vocab import VOCAB_SIZES
from feedsr.eval.metrics import roc_auc


def summarize(out_dir: str, meta: dict) -> None:
    header = "".join(f"{a:>11}" for a in ACTION_NAMES)
    print(f"{'split':<6}{'rows':>8}{'members':>9}{'targets':>10}   base rate:{header}")
    for name, counts in meta["splits"].items():
        rates = ""
        if counts["rows"]:  # a split can be empty with very few members, and then has no file
            bits = load_targets(out_dir, name, ["action_bits"])["action_bits"]
            labels = decode_actions(bits, len(ACTION_NAMES))
            rates = "".join(f"{r:>11.4f}" for r in labels.mean(axis=0))
        print(
            f"{name:<6}{counts['rows']:>8}{counts['members']:>9}{counts['targets']:>10}"
            f"{'':>13}{rates}"
        )
    if not meta["splits"]["test"]["rows"]:
        return
    columns = ["action_bits"] + [TRUE_PROB_PREFIX + a for a in ACTION_NAMES]
    test = load_targets(out_dir, "test", columns)
    labels = decode_actions(test["action_bits"], len(ACTION_NAMES))
    print(f"{'test: oracle AUC':<46}" + "".join(
        f"{roc_auc(test[TRUE_PROB_PREFIX + a], labels[:, i]):>11.4f}"
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
    sizes = meta[VOCAB_SIZES]
    print(
        f"wrote {args.out}: {meta['num_members']} members, {sizes['item_ids']} post ids and "
        f"{sizes['author_ids']} author ids (those seen in training + unknown) in {elapsed:.1f}s"
    )
    summarize(args.out, meta)


if __name__ == "__main__":
    main()
