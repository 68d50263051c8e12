"""Progress bars and training callbacks.

:func:`progress_enabled` decides whether a progress bar is drawn (never inside a book build, so the rendered pages
carry no progress noise); :class:`Callback` holds the hooks the ``Trainer`` calls, so that a notebook can plot
losses or collect previews without touching the training loop (as minGPT's trainer does).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only for annotations: the trainer imports this module, not the reverse
    from .train import Trainer

__all__ = ["Callback", "PreviewPNGWriter", "as_callback", "progress_bar", "progress_enabled"]


def _batch_ancestor() -> str | None:
    """The command line of the nearest ancestor process that runs notebooks in batch (Jupyter Book, Sphinx,
    jupyter-cache, nbclient, nbconvert, papermill, pytest), or None. Reads ``/proc``, so Linux only."""
    markers = ("jupyter-book", "jupyter_book", "jb build", "sphinx-build", "sphinx.cmd", "jcache", "nbconvert",
               "nbclient", "papermill", "pytest", "py.test")
    pid = os.getppid()
    for _ in range(12):
        if pid <= 1:
            break
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if any(m in cmd for m in markers):
            return cmd
    return None


def _in_book_build() -> bool:
    """True inside a batch notebook run (see :func:`_batch_ancestor`)."""
    return _batch_ancestor() is not None


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None
    except Exception:
        ip = None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to show a progress bar. The rule, in order:

    1. an explicit ``progress=True/False`` wins;
    2. ``DDPM_PROGRESS=0`` (or ``1``) in the environment;
    3. never inside a batch notebook run: a Jupyter Book / Sphinx / nbclient / nbconvert / papermill / pytest
       process among the ancestors (found through ``/proc`` on Linux), so the book's pages carry no progress noise;
    4. in a live Jupyter kernel, or when stderr is a terminal: shown; otherwise (logs, pipes, CI): hidden.
    """
    if progress is not None:
        return bool(progress)
    env = os.environ.get("DDPM_PROGRESS")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    if _in_book_build():
        return False
    if _in_notebook():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    if _in_notebook():
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


class Callback:
    """Hooks called by :class:`Trainer`. Override any of them. Any object with some of these methods works too,
    and a plain callable ``fn(trainer, metrics)`` is treated as ``on_step_end``.

    ``on_step_end`` runs on every rank after each step with ``metrics`` = dict(step, loss, mse, vb, lr,
    grad_norm, ema_decay); ``on_preview`` and ``on_checkpoint`` run only on rank 0.
    """

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", metrics: dict) -> None: ...

    def on_preview(self, trainer: "Trainer", samples: torch.Tensor) -> None: ...

    def on_checkpoint(self, trainer: "Trainer", path: Path) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


class PreviewPNGWriter(Callback):
    """Saves each preview grid of images as ``<out>.previews/step_<k>.png``, beside the checkpoint folder ``out``
    (never inside it: the checkpoint is swapped whole at every save)."""

    def __init__(self, out: Path):
        self.folder = Path(out).with_name(Path(out).name + ".previews")

    def on_preview(self, trainer: "Trainer", samples: torch.Tensor) -> None:
        if samples.ndim == 4:
            from .plotting import save_png_grid

            self.folder.mkdir(parents=True, exist_ok=True)
            save_png_grid(samples, self.folder / f"step_{trainer.step:07d}.png")


class _FunctionCallback(Callback):
    def __init__(self, fn):
        self.fn = fn

    def on_step_end(self, trainer, metrics):
        self.fn(trainer, metrics)


_HOOKS = ("on_train_start", "on_step_end", "on_preview", "on_checkpoint", "on_train_end")


def as_callback(obj) -> Callback:
    """A :class:`Callback` for ``obj``: a Callback, any object with some of the ``on_*`` hooks, or a callable."""
    if isinstance(obj, Callback):
        return obj
    if any(hasattr(obj, hook) for hook in _HOOKS):
        adapted = Callback()
        for hook in _HOOKS:
            if hasattr(obj, hook):
                setattr(adapted, hook, getattr(obj, hook))
        return adapted
    if callable(obj):
        return _FunctionCallback(obj)
    raise ValueError(f"callbacks must be Callback objects or callables fn(trainer, metrics); got {obj!r}")
