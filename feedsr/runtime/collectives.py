"""Every collective of the project goes through here, on the process group's device.

NCCL moves only CUDA tensors and gloo only CPU ones, so a collective called with a tensor on the
wrong device fails at run time, and only on the backend that was not tested (HDET's converge
gathered a CPU float64 tensor: fine under gloo, an error at the first converge on GPU). These
helpers copy their input to the group's device and return the result on the input's device, so
callers never think about backends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device whose tensors ``group``'s backend takes: CUDA for NCCL, CPU otherwise."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """Reduce ``tensor`` over the group; a new tensor on ``tensor``'s device (input untouched)."""
    work = tensor.detach().to(group_device(group), copy=True)
    dist.all_reduce(work, op=op, group=group)
    return work.to(tensor.device)


def broadcast(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """``src``'s ``tensor`` on every rank (same shape and dtype everywhere), on ``tensor``'s device."""
    work = tensor.detach().to(group_device(group), copy=True)
    dist.broadcast(work, src=src, group=group)
    return work.to(tensor.device)


def all_gather(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """(W, *shape): every rank's ``tensor`` (same shape on every rank), in rank order, on
    ``tensor``'s device."""
    work = tensor.detach().to(group_device(group))
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, work, group=group)
    return torch.stack(parts).to(tensor.device)


def all_gather_rows(rows: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) rows in rank order; n_r may differ between ranks
    (all_gather needs equal shapes, so rows are padded to the largest count and cut back)."""
    sizes = all_gather(torch.tensor([len(rows)], dtype=torch.int64), group).flatten().tolist()
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: len(rows)] = rows
    parts = all_gather(padded, group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def barrier(group=None) -> None:
    """A barrier that names its device under NCCL (else NCCL guesses one and may hang)."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)
