"""Advisory locks beside checkpoint folders: one writer at a time for each checkpoint.

The lock of a checkpoint folder ``<dir>`` is the file ``<dir>.lock`` beside it (never inside it: the folder itself
is swapped whole when a new checkpoint is written). It is taken

* by :func:`ddpm.checkpoint.save_training_state` around the swap of the old checkpoint for the new one, and around
  the recovery of a swap that a crash interrupted;
* by :func:`ddpm.cache.load_or_train` for the whole look-up-or-train of a cache entry, so that a second process
  that asks for the same model waits for the first and then loads its result instead of training it again.

Readers take no lock: they wait out the instant of a swap and read again when the folder changed under them (see
``ddpm.checkpoint.read_consistently``).

The locks are ``filelock.FileLock``: ``fcntl.flock`` on POSIX and ``msvcrt.locking`` on Windows, released by the
operating system when a process dies, so a crash never leaves a stale lock behind. The lock file itself stays (it
is empty; deleting a lock file while another process waits on it would break the lock). One lock object per path
and process makes the lock re-entrant within a thread (``load_or_train`` holds it while the trainer's saves take
it again); two threads of one process exclude each other like two processes.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

__all__ = ["Timeout", "checkpoint_lock", "holding_lock", "lock_path"]

_LOCKS: dict[str, FileLock] = {}
_GUARD = threading.Lock()


def lock_path(directory: str | os.PathLike) -> Path:
    """The lock file of the checkpoint folder ``directory``: ``<directory>.lock`` beside it."""
    directory = Path(directory)
    return directory.with_name(directory.name + ".lock")


def checkpoint_lock(directory: str | os.PathLike) -> FileLock:
    """This process's one lock object for ``directory`` (re-entrant within a thread). Creates the parent folder."""
    path = Path(os.path.abspath(lock_path(directory)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _GUARD:
        lock = _LOCKS.get(str(path))
        if lock is None:
            lock = _LOCKS[str(path)] = FileLock(str(path))
    return lock


@contextmanager
def holding_lock(directory: str | os.PathLike, waiting: str | None = None,
                 timeout: float = -1) -> Iterator[FileLock]:
    """Hold the lock of ``directory`` for the ``with`` block.

    When another process holds it, ``waiting`` (if given) is printed once on stderr before waiting, so that a
    notebook's pause has a reason; ``timeout`` seconds (-1: no limit) then raise ``filelock.Timeout``.
    """
    lock = checkpoint_lock(directory)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            print(waiting, file=sys.stderr, flush=True)
        lock.acquire(timeout=timeout)
    try:
        yield lock
    finally:
        lock.release()
