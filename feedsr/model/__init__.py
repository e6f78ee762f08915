"""Models: architecture only. ``build_model`` makes one from the model config and the batch spec."""

from __future__ import annotations

from torch import nn

from feedsr.data.batch import BatchSpec
from feedsr.data.tasks import task_groups
from feedsr.model.config import ModelConfig
from feedsr.model.dcnv2 import DCNv2Ranker
from feedsr.model.feedsr import FeedSR


def build_model(cfg: ModelConfig, spec: BatchSpec, max_seq_len: int, device=None) -> nn.Module:
    groups = task_groups(list(spec.tasks))
    group_index = [groups.index(t.group) for t in spec.tasks]
    cls = FeedSR if cfg.name == "feedsr" else DCNv2Ranker
    return cls(cfg, dict(spec.id_table_sizes), len(spec.read.action_names), len(spec.read.context),
               group_index, max_seq_len, device, dense_dim=len(spec.read.dense))
