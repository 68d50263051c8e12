"""Several processes under ``torchrun``: the process group, and which process this is."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["distributed_rank", "setup_distributed"]


def setup_distributed() -> bool:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on CUDA,
    gloo on the CPU. Returns True when training is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return True


def distributed_rank() -> int | None:
    """This process's rank under ``torchrun`` (an initialised process group of several), else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None
