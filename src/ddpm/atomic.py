"""Atomic and durable writes: a file written beside its place and renamed over it, a folder swapped in whole.

A crash or a power cut at any instant leaves the old version or the new one on disk, never a mixture or neither:

* a file (:func:`atomic_write`) is written to a temporary sibling, synced, renamed onto its place with
  ``os.replace``, and the folder is synced so that the rename itself is durable;
* a folder (:func:`swap_folder`, e.g. a training checkpoint) is written complete as a temporary sibling; the old
  folder is renamed aside to ``.<name>.old-<microseconds>``, the new one renamed onto ``<name>``, and only then is the
  old one deleted, each rename synced before the next step. A crash between the two renames leaves only the aside
  copy, which :func:`recover_swap` renames back.

Writers of a folder hold its lock (``ddpm.locking``) around the swap and the recovery. Readers take no lock:
:func:`read_consistently` waits out the instant between the two renames and reads again when the folder was replaced
while it read (its inode or modification time changed), so a reader gets all of the old folder or all of the new.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

from .locking import Timeout, holding_lock

__all__ = ["SWAP_WAIT_S", "aside_copies", "atomic_write", "fsync_path", "read_consistently", "recover_swap",
           "swap_folder", "tmp_sibling"]

#: Seconds a reader waits for a folder that is being swapped to reappear.
SWAP_WAIT_S = 30.0

T = TypeVar("T")


def tmp_sibling(path: Path, keep_suffix: bool = False) -> Path:
    """A fresh hidden name beside ``path``: ``.<name>.tmp-<pid>-<random>`` (ending in ``path``'s suffix if asked,
    for writers that choose the format by the suffix)."""
    tail = path.suffix if keep_suffix else ""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{tail}")


def fsync_path(path: Path) -> None:
    """Flush a file or a folder to disk (a folder: its entries, i.e. the renames inside it); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None], keep_suffix: bool = False) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it onto ``path``.

    The temporary file is removed when ``write`` or the rename fails, so a failure leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path, keep_suffix)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself is durable only once the folder is synced
    finally:
        if tmp.exists():
            tmp.unlink()


def aside_copies(directory: Path) -> list[Path]:
    """The copies of ``directory`` set aside by unfinished swaps, oldest first."""
    if not directory.parent.is_dir():
        return []
    return sorted(directory.parent.glob(f".{directory.name}.old-*"))


def swap_folder(tmp: Path, directory: Path) -> None:
    """Move the complete folder ``tmp`` onto ``directory``; the caller holds the lock of ``directory`` and has
    checked that whatever is there may be replaced.

    An existing folder with content is renamed aside, then ``tmp`` is renamed in, then the aside copy is deleted;
    an empty folder is simply removed. If the second rename fails, the old folder is put back and the ``OSError``
    raised; ``tmp`` is left alone either way.
    """
    old = None
    if directory.is_dir() and any(directory.iterdir()):
        old = directory.with_name(f".{directory.name}.old-{int(time.time() * 1e6):020d}")
        os.replace(directory, old)
        fsync_path(directory.parent)
    elif directory.is_dir():
        os.rmdir(directory)  # fails rather than delete anything if a file appeared meanwhile
    try:
        os.replace(tmp, directory)
    except OSError:
        if old is not None:
            try:
                os.replace(old, directory)
                fsync_path(directory.parent)
            except OSError:
                pass  # recover_swap puts it back later
        raise
    fsync_path(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_swap(directory: Path) -> None:
    """Finish swaps that a crash interrupted; the caller holds the lock of ``directory``.

    A missing ``directory`` gets its newest aside copy back; aside copies left beside an existing ``directory``
    (a crash before the old folder was deleted) are deleted.
    """
    olds = aside_copies(directory)
    if olds and not directory.exists():
        os.replace(olds.pop(), directory)
        fsync_path(directory.parent)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _await_swap(directory: Path, wait_s: float) -> None:
    """Return once ``directory`` exists or no swap of it is under way, waiting at most ``wait_s`` seconds.

    A missing folder with an aside copy is either in the instant between a writer's two renames (the writer holds
    the lock: wait for it) or the trace of a crash (nobody holds the lock: recover it under the lock).
    """
    deadline = time.monotonic() + wait_s
    while not directory.exists() and aside_copies(directory):
        try:
            with holding_lock(directory, timeout=0.05):
                recover_swap(directory)
            return
        except Timeout:
            if time.monotonic() > deadline:
                return
        except OSError:  # no lock file can be made here (a read-only place): nothing to recover with
            return


def _identity(directory: Path):
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def read_consistently(directory: Path, read: Callable[[], T], error: type[Exception] = RuntimeError,
                      attempts: int = 5, wait_s: float = SWAP_WAIT_S) -> T:
    """``read()`` of the files in ``directory``, all from one version of the folder.

    Waits while a swap of the folder is under way, and reads again (up to ``attempts`` times) when the folder was
    replaced during the read; an exception raised by ``read`` while the folder stayed the same is raised as is.
    """
    directory = Path(directory)
    for attempt in range(attempts):
        _await_swap(directory, wait_s)
        before = _identity(directory)
        try:
            result = read()
        except Exception:
            if attempt + 1 < attempts and _identity(directory) != before:
                continue  # the folder was swapped under the reader: read the new one
            raise
        if before is not None and _identity(directory) == before:
            return result
    raise error(f"{directory} was replaced {attempts} times while it was read; try again once its writer is done")
