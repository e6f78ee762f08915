"""Process group and device: torchrun's environment, or a one-process group otherwise.

Training always runs inside a process group (world size 1 included), so one code path, TorchRec's
DistributedModelParallel with fused embedding kernels, serves one CPU process, two CPU processes
and many GPUs. gloo on CPU, NCCL on GPU, chosen from the device.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from feedsr.runtime.config import ConfigError

# Long enough for a slow data generation on rank 0; short enough that a rank that died does not
# hang the others for ever.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=15)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this machine now (for a local rendezvous: tests, experiment scripts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid config: trainer.device=cuda but CUDA is not available here")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextlib.contextmanager
def distributed(device_preference: str = "auto"):
    """Yield a DistContext; create (and later destroy) the process group if none exists."""
    owns = not dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if owns:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
            dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
        else:  # a plain `python -m feedsr.train`: a group of one, no network
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=PROCESS_GROUP_TIMEOUT)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    try:
        yield ctx
    finally:
        if owns:
            gc.collect()  # free DDP/DMP (and their communication threads) before the group
            dist.destroy_process_group()
