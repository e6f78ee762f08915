"""Rebuild a trained model from its config and checkpoint, and score a split with it."""

from __future__ import annotations

from pathlib import Path

import torch

from feedsr.data.config import batch_spec, build_loader, ensure_dataset, tasks_of
from feedsr.eval.evaluate import evaluate
from feedsr.eval.metrics import TaskMetrics
from feedsr.model import build_model
from feedsr.runtime.checkpoint import load_sharded
from feedsr.runtime.config import Config
from feedsr.runtime.distributed import distributed
from feedsr.runtime.sharding import shard_model


def evaluate_checkpoint(config: Config, checkpoint: Path, split: str,
                        max_rows: int | None = None) -> dict[str, TaskMetrics]:
    """Metrics of ``checkpoint`` on ``split`` of ``config.data.path`` (one process, any device),
    over every row or the split's first ``max_rows`` rows in file order."""
    with distributed(config.trainer.device) as ctx:
        spec = batch_spec(config.data, ensure_dataset(config.data))
        model = build_model(config.model, spec, config.data.max_seq_len, device=torch.device("meta"))
        model = shard_model(model, ctx, config.optimizer.sparse, config.optimizer.sparse_lr)
        load_sharded(checkpoint, model, None)
        loader = build_loader(config.data, spec, split, train=False, head_rows=max_rows or 0,
                              only_head=max_rows is not None)
        autocast = torch.bfloat16 if config.trainer.precision == "bf16" else None
        return evaluate(model, loader, [t.name for t in tasks_of(config.data)], ctx.device,
                        autocast_dtype=autocast)
