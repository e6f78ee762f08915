#!/usr/bin/env python
"""Reader throughput on one core: sequences/s and impressions/s, with and without collation.

    python scripts/bench_reader.py [--data data/synthetic] [--split train] [--json out.json]

Reads one epoch of the split in the main process (no loader workers, one torch thread): the
streaming reader (row groups -> validated blocks), then shuffle buffer + length bucketing, then
collation into Batches (KeyedJaggedTensor etc.), each timed separately. Generates the synthetic
dataset first if the directory holds none.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from feedsr.quiet import quiet_libraries


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/synthetic"))
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args(argv)


def timed_epoch(reader) -> tuple[float, int, int]:
    start = time.perf_counter()
    sequences = impressions = 0
    for item in reader:
        lengths = item.lengths
        sequences += len(lengths)
        impressions += int(lengths.sum())
    return time.perf_counter() - start, sequences, impressions


def main(argv=None) -> list[dict]:
    quiet_libraries()
    args = parse_args(argv)
    torch.set_num_threads(1)
    from feedsr.data.batch import Collator
    from feedsr.data.config import DataConfig, batch_spec
    from feedsr.data.reader import ReaderConfig, SequenceReader, open_files, split_files
    from feedsr.prepare.synthetic import generate
    from feedsr.data.sequences import read_dataset_meta
    from feedsr.runtime.config import to_config
    from omegaconf import OmegaConf

    if read_dataset_meta(args.data) is None:
        generate(args.data, num_members=20000, seed=0)
    data_cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/data/synthetic.yaml")
    data: DataConfig = to_config({"data": data_cfg}).data
    spec = batch_spec(data, read_dataset_meta(args.data))
    files = open_files(split_files(args.data, args.split), spec.read)
    plain = ReaderConfig(batch_size=args.batch_size, max_seq_len=data.max_seq_len)
    train = ReaderConfig(batch_size=args.batch_size, max_seq_len=data.max_seq_len, shuffle=True,
                         shuffle_buffer=data.shuffle_buffer, length_bucketing=True, session_shuffle=True)
    cases = [
        ("read + validate", SequenceReader(files, spec.read, plain)),
        ("+ shuffle, bucketing, session shuffle", SequenceReader(files, spec.read, train)),
        ("+ collate to Batch (full training path)",
         SequenceReader(files, spec.read, train, collate=Collator(spec))),
    ]
    rows = []
    print(f"{args.data} [{args.split}], batch {args.batch_size}, 1 thread, no loader workers")
    print(f"{'stage':42s} {'seconds':>8s} {'sequences/s':>12s} {'impressions/s':>14s}")
    for name, reader in cases:
        seconds, sequences, impressions = timed_epoch(reader)
        rows.append({"stage": name, "seconds": seconds, "sequences": sequences,
                     "impressions": impressions, "sequences_per_s": sequences / seconds,
                     "impressions_per_s": impressions / seconds})
        print(f"{name:42s} {seconds:8.2f} {sequences / seconds:12,.0f} {impressions / seconds:14,.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
