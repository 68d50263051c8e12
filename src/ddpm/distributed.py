"""Several processes under ``torchrun``: the process group, which process this is, and stopping together.

:class:`StopRequest` turns a Ctrl-C during training into a stop after a step that every process agrees on, so
that all ranks write (rank 0) or skip the checkpoint of the same step and none is left waiting in an all-reduce.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

__all__ = ["StopRequest", "distributed_rank", "setup_distributed"]


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


class StopRequest:
    """A Ctrl-C (SIGINT) during training, acted on after a step that all processes agree on.

    The signal handler only sets ``requested``. Every training step all-reduces (sums) the 0/1 flags
    :meth:`flag` of all ranks with its statistics and hands the sum to :meth:`agree`: it is positive on every rank
    as soon as one rank was asked to stop (the maximum of the flags), so :meth:`stop_now` turns true on all ranks
    after the same step. A single process acts on its own request at once, and a second Ctrl-C stops it at once.
    Under ``torchrun`` a second Ctrl-C is only another request: a rank that left alone would leave the others
    waiting in the next all-reduce, and each worker gets Ctrl-C twice anyway (from the terminal, and passed on by
    ``torchrun``), which then stops them all after the same step.
    """

    def __init__(self, distributed: bool = False):
        self.distributed = distributed
        self.requested = False  # this process was asked to stop
        self.agreed = False  # the last all-reduce found a request on some rank
        self._previous = None

    def flag(self, device) -> torch.Tensor:
        """This process's request as a 0/1 float scalar on ``device``, to be summed over the ranks."""
        return torch.tensor(float(self.requested), device=device)

    def agree(self, total: float) -> None:
        """Record the all-reduced sum of the flags of all ranks (this rank's flag alone for one process)."""
        self.agreed = total > 0

    def stop_now(self) -> bool:
        """Whether to stop after this step: the agreed request (several processes) or this one's (one process)."""
        return self.agreed if self.distributed else self.requested

    def _handler(self, signum, frame):
        if self.requested and not self.distributed:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> None:
        """Clear earlier requests and catch SIGINT (main thread only; elsewhere Ctrl-C keeps its default)."""
        self.requested = self.agreed = False
        self._previous = None
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except (ValueError, OSError):
            self._previous = None

    def uninstall(self) -> None:
        """Put back the SIGINT handler found by :meth:`install`."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
