"""A trained model outside the trainer: a checkpoint's weights in a plain, unsharded model.

Evaluation (``feedsr.eval.scoring``, ``scripts/evaluate.py``) and serving (``feedsr.serve``) load
checkpoints here, and nowhere else:

- a path is a ``step-N`` checkpoint folder whose files verify, or a run directory, meaning its
  newest such checkpoint (damaged newer ones are skipped, and reported);
- the model is rebuilt from the run's ``config.yaml`` and its embedding tables sized from the run's
  ``table_sizes.json``, so a model is scored without its training data;
- the weights load from any world size: torch.distributed.checkpoint reassembles the row-wise
  sharded tables into whole ones, on the CPU or a GPU, with or without a process group.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from feedsr.data.batch import BatchSpec
from feedsr.data.config import batch_spec
from feedsr.data.vocab import VOCAB_SIZES
from feedsr.model import build_model
from feedsr.runtime.checkpoint import (
    TABLE_SIZES,
    CheckpointError,
    check_complete,
    is_complete,
    latest_valid_checkpoint,
    load_sharded,
)
from feedsr.runtime.config import Config, to_config

CONFIG_FILE = "config.yaml"  # in the run directory, written by the trainer


@dataclass
class Trained:
    """A checkpoint's model in eval mode, and what it was trained with.

    Args:
        model: the unsharded model (plain TorchRec EmbeddingCollection), on the requested device.
        spec: the BatchSpec of its inputs (id features and table sizes, context, tasks).
        config: the run's config.
        checkpoint: the step-N folder the weights came from.
        skipped: problems of newer checkpoints of the run that were passed over (damaged files).
    """

    model: nn.Module
    spec: BatchSpec
    config: Config
    checkpoint: Path
    skipped: list[str]


def resolve_checkpoint(path: Path) -> tuple[Path, list[str]]:
    """(step-N folder, damaged newer ones): ``path`` itself if it is a complete checkpoint whose
    files verify, else the newest such checkpoint of the run directory ``path``. Raises
    CheckpointError naming the path when there is none."""
    path = Path(path)
    if is_complete(path):
        check_complete(path)
        return path, []
    latest, damaged = latest_valid_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} is neither a complete checkpoint nor a run directory with one "
                              f"whose files verify" + (f" ({'; '.join(damaged)})" if damaged else ""))
    return latest, damaged


def run_dir_of(checkpoint: Path) -> Path:
    return Path(checkpoint).parent.parent  # <run>/checkpoints/step-N


def run_config(checkpoint: Path, data_path: str | Path | None = None, eval_batch_size: int | None = None) -> Config:
    """The config the checkpoint's run was trained with; to score other data, with
    ``data_path`` (a prepared dataset: never generated here) and ``eval_batch_size`` changed."""
    path = run_dir_of(checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} missing: cannot rebuild the model of {checkpoint}")
    saved = OmegaConf.load(path)
    config = to_config(saved)
    if "context_norm" not in saved.get("model", {}):  # trained before the option: raw context
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, context_norm=False))
    data = dataclasses.replace(config.data, generate=None, path=str(data_path or config.data.path),
                               eval_batch_size=eval_batch_size or config.data.eval_batch_size)
    return dataclasses.replace(config, data=data)


def run_spec(config: Config, checkpoint: Path, meta: dict | None = None) -> BatchSpec:
    """The run's BatchSpec, tables sized as recorded at training. With the dataset's ``meta``
    (evaluation) the sizes it gives must be the recorded ones: else the ids of that dataset are
    not the ids the tables were trained on."""
    path = run_dir_of(checkpoint) / TABLE_SIZES
    if not path.is_file():
        raise CheckpointError(f"{path} missing: cannot size the embedding tables of {checkpoint}")
    recorded = json.loads(path.read_text())
    spec = batch_spec(config.data, meta or {VOCAB_SIZES: recorded})
    if dict(spec.id_table_sizes) != recorded:
        raise CheckpointError(f"{config.data.path}: its tables would have {dict(spec.id_table_sizes)} rows, "
                              f"the model of {checkpoint} was trained with {recorded} ({path}): "
                              "was the dataset re-made?")
    return spec


def load_trained(path: Path, device: str | torch.device = "cpu", meta: dict | None = None,
                 config: Config | None = None) -> Trained:
    """The model of a checkpoint (or of a run directory's newest checkpoint), unsharded, in eval
    mode on ``device``. ``meta``: the dataset.json of the data it will score (checked against the
    run's table sizes); ``config``: the run's config with changes (data path, batch size), else
    the saved one."""
    checkpoint, skipped = resolve_checkpoint(path)
    config = config or run_config(checkpoint)
    spec = run_spec(config, checkpoint, meta)
    model = build_model(config.model, spec, config.data.max_seq_len, device=torch.device(device))
    load_sharded(checkpoint, model, None)
    return Trained(model.eval(), spec, config, checkpoint, skipped)
