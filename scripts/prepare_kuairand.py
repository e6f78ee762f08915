"""Convert the KuaiRand log into feedsr Parquet sequences with a temporal split by date.

    python scripts/prepare_kuairand.py --src ../shared/data/kuairand --out data/kuairand \
        --train-end 20220502 --valid-end 20220505 --pre-history

Dates are YYYYMMDD, inclusive, in China Standard Time (UTC+8); see feedsr/data/kuairand.py for the
features and the choices behind them. The output is derived from KuaiRand (Gao et al., CIKM 2022)
and stays under CC BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from feedsr.data.kuairand import convert
from feedsr.data.schema import DataError
from feedsr.data.vocab import VOCAB_SIZES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", type=Path, required=True, help="folder holding the KuaiRand files")
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")
    p.add_argument("--train-end", type=int, required=True, help="last train day, YYYYMMDD")
    p.add_argument("--valid-end", type=int, required=True, help="last valid day, YYYYMMDD")
    p.add_argument("--test-end", type=int, help="last test day, YYYYMMDD (no test split if unset)")
    p.add_argument("--log", type=Path, action="append", default=[], dest="logs",
                   help="another log file in the same format (Parquet or CSV); repeatable")
    p.add_argument("--max-seq-len", type=int, default=256, help="impressions per row at most")
    p.add_argument("--pre-history", action="store_true",
                   help="prepend each member's pre-window watch history (user_history_until_20220424_last50)")
    p.add_argument("--members", type=int, help="keep only the first N user ids (quick runs, tests)")
    return p.parse_args(argv)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet"))


def print_summary(meta: dict, out: Path, seconds: float) -> None:
    """One line per split with its sizes, then the totals."""
    print(f"{'split':<6} {'rows':>8} {'members':>8} {'targets':>9} {'impressions':>12} {'MB':>8}")
    for name, c in meta["splits"].items():
        mb = folder_bytes(out / name) / 1e6
        print(f"{name:<6} {c['rows']:>8,} {c['members']:>8,} {c['targets']:>9,} "
              f"{c['impressions']:>12,} {mb:>8.2f}")
    print(f"duplicates dropped: {meta['duplicates_dropped']:,}")
    print(f"pre-window history impressions prepended: {meta['pre_history_impressions']:,}")
    sizes = ", ".join(f"{name} {size:,}" for name, size in sorted(meta[VOCAB_SIZES].items()))
    print(f"vocabulary sizes (table rows, unknown row included): {sizes}")
    print(f"on disk: {folder_bytes(out) / 1e6:.2f} MB in {out}")
    print(f"wall time: {seconds:.1f} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    try:
        meta = convert(args.src, args.out, args.train_end, args.valid_end, args.test_end,
                       extra_logs=args.logs, max_seq_len=args.max_seq_len, members=args.members,
                       pre_history=args.pre_history)
    except DataError as e:  # a refused output directory, a bad input: one line naming it
        sys.exit(f"prepare_kuairand: {e}")
    print_summary(meta, args.out, time.perf_counter() - start)


if __name__ == "__main__":
    main()
