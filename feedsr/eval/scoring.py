"""Score a split with a trained checkpoint (feedsr/eval/trained.py loads it)."""

from __future__ import annotations

from pathlib import Path

from feedsr.data.config import build_loader, ensure_dataset, tasks_of
from feedsr.eval.evaluate import predict
from feedsr.eval.metrics import MetricAccumulator, TaskMetrics
from feedsr.eval.trained import load_trained
from feedsr.runtime.config import Config
from feedsr.runtime.distributed import distributed


def predict_checkpoint(config: Config, checkpoint: Path, split: str,
                       max_rows: int | None = None) -> MetricAccumulator:
    """Predictions and labels of ``checkpoint`` for every target impression of ``split`` of
    ``config.data.path`` (one process, any device), over every row or the split's first
    ``max_rows`` rows in file order."""
    import torch

    with distributed(config.trainer.device) as ctx:
        trained = load_trained(checkpoint, ctx.device, ensure_dataset(config.data), config)
        loader = build_loader(config.data, trained.spec, split, train=False, head_rows=max_rows or 0,
                              only_head=max_rows is not None)
        autocast = torch.bfloat16 if config.trainer.precision == "bf16" else None
        return predict(trained.model, loader, [t.name for t in tasks_of(config.data)], ctx.device,
                       autocast_dtype=autocast)


def evaluate_checkpoint(config: Config, checkpoint: Path, split: str,
                        max_rows: int | None = None) -> dict[str, TaskMetrics]:
    """Metrics of ``checkpoint`` on ``split`` (see ``predict_checkpoint``)."""
    return predict_checkpoint(config, checkpoint, split, max_rows).compute()
