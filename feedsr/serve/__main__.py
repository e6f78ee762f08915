"""Score candidates with a trained model from the command line.

    python -m feedsr.serve score --checkpoint runs/synthetic_main --requests requests.parquet \
        --out scores.parquet [--calibration calibration.json] [--method kv] [--batch-requests 64] \
        [--device cpu] [--threads N]
    python -m feedsr.serve calibrate --checkpoint runs/synthetic_main --out calibration.json \
        [--split valid] [--data DIR] [--max-rows N]
    python -m feedsr.serve export --checkpoint runs/synthetic_main --out exported/ \
        [--calibration calibration.json] [--device cpu] [--max-history N]
    python -m feedsr.serve score --exported exported/ --requests requests.parquet --out scores.parquet

``--checkpoint``: a step-N folder or a run directory (its newest checkpoint that verifies), from
any world size. The request and score files are described in ``feedsr/serve/requests.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from feedsr.data.schema import DataError
from feedsr.runtime.checkpoint import CheckpointError


MAX_HISTORY_HELP = ("longest history served, newest impressions kept (default: the training windows', "
                    "max_seq_len - 1; longer only with RoPE: positions the model was not trained on)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m feedsr.serve", description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score the candidates of a request file")
    model = score.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="step-N folder or run directory")
    model.add_argument("--exported", type=Path, help="a folder written by `export` (compiled programs)")
    score.add_argument("--requests", required=True, type=Path, help="request Parquet file")
    score.add_argument("--out", required=True, type=Path, help="scores Parquet file to write")
    score.add_argument("--method", default="kv", choices=["kv", "masked", "one_by_one"],
                       help="kv (default), masked or one_by_one: equal scores, different speed")
    score.add_argument("--batch-requests", type=int, default=64, help="requests scored together")
    score.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    score.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    score.add_argument("--calibration", type=Path, help="apply this calibration (python -m feedsr.serve calibrate)")
    score.add_argument("--max-history", type=int, help=MAX_HISTORY_HELP + " (with --exported: set at export)")
    export = commands.add_parser("export", help="compile the KV scoring path ahead of time (AOTInductor)")
    export.add_argument("--checkpoint", required=True, type=Path, help="step-N folder or run directory")
    export.add_argument("--out", required=True, type=Path, help="folder for the programs and export.json")
    export.add_argument("--calibration", type=Path, help="a calibration to apply in the exported scorer")
    export.add_argument("--device", default="cpu", help="cpu, cuda, ... (the programs run there)")
    export.add_argument("--max-history", type=int, help=MAX_HISTORY_HELP)
    fit = commands.add_parser("calibrate", help="fit a per-task isotonic calibration on a split")
    fit.add_argument("--checkpoint", required=True, type=Path, help="step-N folder or run directory")
    fit.add_argument("--out", required=True, type=Path, help="calibration JSON file to write")
    fit.add_argument("--split", default="valid", help="split to fit on (default: valid)")
    fit.add_argument("--data", type=Path, help="dataset directory (default: the run's data.path)")
    fit.add_argument("--batch-size", type=int, help="rows per batch (default: the run's eval_batch_size)")
    fit.add_argument("--max-rows", type=int, help="fit on the split's first N rows (default: every row)")
    return p.parse_args(argv)


def score(args: argparse.Namespace) -> int:
    """Write the scores file; returns the number of (request, candidate) rows."""
    import torch

    if args.batch_requests < 1:
        raise DataError(f"--batch-requests must be >= 1, got {args.batch_requests}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.exported:
        return score_exported(args)  # imports no model code
    from feedsr.eval.calibration import Calibration
    from feedsr.eval.trained import load_trained
    from feedsr.serve.requests import read_requests
    from feedsr.serve.scorer import CandidateScorer, max_history

    calibration = None
    if args.calibration:
        try:
            calibration = Calibration.load(args.calibration)
        except ValueError as e:
            raise DataError(str(e)) from None
    trained = load_trained(args.checkpoint, args.device)
    for problem in trained.skipped:
        print(f"serve: WARNING: skipped a damaged checkpoint: {problem}", file=sys.stderr)
    scorer = CandidateScorer(trained.model, trained.spec)
    tasks = [t.name for t in trained.spec.tasks]
    if calibration is not None:
        try:
            calibration.check_tasks(tasks)
        except ValueError as e:
            raise DataError(f"{args.calibration}: {e}") from None
    try:
        longest = max_history(trained.model, trained.config.data.max_seq_len - 1, args.max_history)
    except ValueError as e:
        raise DataError(f"--max-history: {e}") from None

    def score_part(part):
        probs = scorer.score(part.history, part.candidates, args.method).double().cpu().numpy()
        return probs if calibration is None else calibration.apply(probs, tasks)

    return write_scores(args, read_requests(args.requests, trained.spec, longest), args.batch_requests,
                        score_part, tasks, f"{trained.checkpoint} ({args.method})")


def score_exported(args: argparse.Namespace) -> int:
    """``score --exported``: the compiled programs, one request at a time, no model code."""
    from feedsr.serve.exported import ExportedScorer
    from feedsr.serve.requests import read_requests

    if args.calibration:
        raise DataError("--calibration goes to `export` (the export folder holds it), not to score --exported")
    if args.max_history is not None:
        raise DataError("--max-history goes to `export` (the programs are compiled for it), not to score --exported")
    try:
        scorer = ExportedScorer(args.exported, args.device)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None

    def score_part(part):  # one request
        cache = scorer.encode(part.history.values)
        return scorer.score(cache, part.candidates.values, int(part.candidates.request_times[0]))

    return write_scores(args, read_requests(args.requests, scorer.spec, scorer.meta["max_history"]), 1,
                        score_part, scorer.tasks, f"the exported {args.exported}")


def write_scores(args: argparse.Namespace, requests, group: int, score_part, tasks: list[str], what: str) -> int:
    """Score ``requests`` (row groups of a request file) ``group`` requests at a time with
    ``score_part`` (Requests -> (n, K) probabilities); write ``args.out``; return the rows written."""
    import pyarrow.parquet as pq

    from feedsr.serve.requests import scores_table

    args.out.parent.mkdir(parents=True, exist_ok=True)
    written, start, writer = 0, time.perf_counter(), None
    try:
        for row_group in requests:
            for lo in range(0, len(row_group.history), group):
                part = sliced(row_group, lo, min(lo + group, len(row_group.history)))
                if part is None:
                    continue
                table = scores_table(part, score_part(part), tasks)
                writer = writer or pq.ParquetWriter(args.out, table.schema)
                writer.write_table(table)
                written += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    print(f"serve: scored {written} candidates with {what} in {time.perf_counter() - start:.1f} s -> {args.out}")
    return written


def export_command(args: argparse.Namespace) -> dict:
    from feedsr.eval.calibration import Calibration
    from feedsr.eval.trained import load_trained
    from feedsr.serve.export import ExportError, export

    try:
        calibration = Calibration.load(args.calibration) if args.calibration else None
    except ValueError as e:
        raise DataError(str(e)) from None
    trained = load_trained(args.checkpoint, args.device)
    try:
        meta = export(trained, args.out, calibration, lambda line: print(f"serve: {line}", flush=True),
                      args.max_history)
    except ExportError as e:
        raise DataError(str(e)) from None
    print(f"serve: exported {trained.checkpoint} -> {args.out}")
    return meta


def calibrate(args: argparse.Namespace) -> dict:
    """Fit and write the calibration; returns the metrics before and after on the fitted split."""
    from feedsr.eval.calibration import Calibration, calibrated_metrics
    from feedsr.eval.metrics import format_table
    from feedsr.eval.scoring import predict_checkpoint
    from feedsr.eval.trained import resolve_checkpoint, run_config

    checkpoint, _ = resolve_checkpoint(args.checkpoint)
    config = run_config(checkpoint, args.data, args.batch_size)
    predicted = predict_checkpoint(config, checkpoint, args.split, args.max_rows)
    preds, labels, _ = predicted.arrays()
    fitted_on = {"checkpoint": str(checkpoint), "data": config.data.path, "split": args.split,
                 "impressions": len(preds)}
    calibration = Calibration.fit(preds, labels, predicted.task_names, fitted_on)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(args.out)
    before, fitted = predicted.compute(), calibrated_metrics(calibration, predicted)
    print(f"serve: calibration of {checkpoint} fitted on {config.data.path} [{args.split}] "
          f"({len(preds)} impressions) -> {args.out}")
    print("before:\n" + format_table(before) + "\nafter (on the same rows: in-sample):\n" + format_table(fitted))
    return {"before": before, "after": fitted}


def sliced(requests, lo: int, hi: int):
    """Requests [lo, hi) of a row group with their candidates; None if they have none."""
    from feedsr.serve.candidates import Candidates
    from feedsr.serve.requests import Requests

    cands = requests.candidates
    if cands.counts[lo:hi].sum() == 0:
        return None
    a, b = cands.offsets[lo], cands.offsets[hi]
    part = Candidates(cands.counts[lo:hi], cands.request_times[lo:hi], {k: v[a:b] for k, v in cands.values.items()})
    return Requests(requests.history.slice(lo, hi), part, requests.first_row + lo)


def main(argv=None) -> None:
    args = parse_args(argv)
    from feedsr.quiet import quiet_libraries

    quiet_libraries()
    try:
        {"calibrate": calibrate, "export": export_command, "score": score}[args.command](args)
    except (DataError, CheckpointError) as e:
        sys.exit(f"serve: {e}")


if __name__ == "__main__":
    main()
