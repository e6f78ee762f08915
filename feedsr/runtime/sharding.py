"""Sharding the embedding tables with TorchRec's DistributedModelParallel.

Tables are planned by TorchRec's planner on every rank independently (the plan is deterministic),
rather than on rank 0 and broadcast: a failure on rank 0 then cannot leave the others hanging in
the planner's collective. On CPU the plan is restricted to table-, row- and column-wise sharding:
data-parallel sharding of an EmbeddingCollection is broken on CPU (the CPU lookup pools its
output). Dense parameters are replicated and data-parallel (DDP, inside DMP).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.modules.embedding_modules import EmbeddingCollection

from feedsr.runtime.distributed import DistContext

CPU_SHARDING_TYPES = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value,
                      ShardingType.COLUMN_WISE.value]
SPARSE_OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad,
                     "sgd": torch.optim.SGD}


def embedding_collections(model: nn.Module) -> list[EmbeddingCollection]:
    return [m for m in model.modules() if isinstance(m, EmbeddingCollection)]


def shard_model(model: nn.Module, ctx: DistContext, sparse: str, sparse_lr: float,
                sparse_eps: float = 1e-8, data_parallel: bool = True) -> DistributedModelParallel:
    """Wrap ``model`` (tables on the meta device) in DMP, tables updated by a fused optimizer.

    The sparse optimizer runs inside backward (FBGEMM fuses the update into the embedding
    kernel), which is why non-finite losses must be caught before ``backward``. With
    ``data_parallel=False`` dense parameters are not wrapped in DDP: their gradients are never
    synchronized (HDET's independent replicas).
    """
    kwargs = {"lr": sparse_lr}
    if sparse != "sgd":
        kwargs["eps"] = sparse_eps
    tables = [t for ec in embedding_collections(model) for t in ec.embedding_configs()]
    for ec in embedding_collections(model):
        apply_optimizer_in_backward(SPARSE_OPTIMIZERS[sparse], ec.parameters(), kwargs)
    constraints = None
    if ctx.device.type == "cpu":
        constraints = {t.name: ParameterConstraints(sharding_types=CPU_SHARDING_TYPES) for t in tables}
    topology = Topology(world_size=ctx.world_size, compute_device=ctx.device.type)
    sharders = [EmbeddingCollectionSharder()]
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(model, sharders)
    return DistributedModelParallel(model, device=ctx.device, plan=plan, sharders=sharders,
                                    init_data_parallel=data_parallel)


def is_sharded_param(name: str) -> bool:
    """Names of embedding-table parameters (updated by the fused optimizer, never by dense ones)."""
    return ".ec.embeddings." in f".{name}"


def unwrap(model: nn.Module) -> nn.Module:
    """The user model inside DMP (and the DDP that DMP puts around dense parameters)."""
    while hasattr(model, "_dmp_wrapped_module") or isinstance(model, nn.parallel.DistributedDataParallel):
        model = getattr(model, "_dmp_wrapped_module", None) or model.module
    return model


def compile_dense(model: nn.Module) -> list[str]:
    """``torch.compile`` the dense blocks in place (``nn.Module.compile``: parameter names and
    checkpoints stay the same), with dynamic shapes since batch and sequence lengths vary.
    The embedding lookups stay eager (TorchRec's sharded modules). Returns what was compiled."""
    inner = unwrap(model)
    compiled = []
    for name in ("transformer", "cross", "deep", "head"):
        module = getattr(inner, name, None)
        if isinstance(module, nn.Module):
            module.compile(dynamic=True)
            compiled.append(name)
    return compiled
