"""Parameter groups and the OneCycle schedule."""

from __future__ import annotations

import pytest
import torch

from conftest import MODEL_SPEC
from feedsr.model import build_model
from feedsr.model.config import ModelConfig
from feedsr.runtime.config import OptimizerConfig
from feedsr.train.optim import OneCycle, build_dense_optimizer, dense_parameters


@pytest.mark.parametrize("steps,warmup", [(100, 0.1), (37, 0.3), (10, 0.0)])
def test_onecycle_matches_torch(steps, warmup):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    ref = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.01, total_steps=steps, pct_start=warmup, div_factor=25, final_div_factor=1e3,
        cycle_momentum=False,
    ) if warmup > 0 else None
    ours = OneCycle(0.01, steps, warmup, 25, 1e3)
    if ref is None:
        assert ours(0) == pytest.approx(0.01) and ours(steps - 1) == pytest.approx(0.01 / 25e3)
        return
    for step in range(steps):
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), step
        opt.step()
        ref.step()


def test_groups_split_decay_and_exclude_tables():
    model = build_model(ModelConfig(embedding_dim=8, ffn_dim=16), MODEL_SPEC, max_seq_len=16)
    groups = dense_parameters(model)
    names = {g: [n for n, _ in ps] for g, ps in groups.items()}
    assert set(groups) == {"transformer", "dense", "no_decay"}
    assert all(".ec." not in n for ns in names.values() for n in ns)
    assert "transformer.blocks.0.attn.qkv.weight" in names["transformer"]
    assert "transformer.blocks.0.alpha_attn" in names["no_decay"]
    assert "transformer.blocks.0.ln_attn.weight" in names["no_decay"]
    assert "position_bias.offsets.weight" in names["no_decay"]
    assert "action_proj.weight" in names["dense"] and "action_proj.bias" in names["no_decay"]
    opt = build_dense_optimizer(model, OptimizerConfig(weight_decay=0.1))
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"transformer": 0.1, "dense": 0.1, "no_decay": 0.0}
    n_tables = sum(p.numel() for n, p in model.named_parameters() if ".ec." in n)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) + n_tables == \
        sum(p.numel() for p in model.parameters())
