"""Sample files in the layout of OpenAI's evaluation suite, and the conversion of images to model tensors.

An ``.npz`` with ``arr_0`` = uint8 ``[N, H, W, C]`` and optionally ``arr_1`` = int64 labels ``[N]``;
:func:`as_model_images` turns either that layout or a float tensor into ``[N, C, H, W]`` floats in ``[-1, 1]``.
:func:`save_samples` writes such a file (or a ``.png`` grid) atomically, after :func:`check_output_path` has
checked the place, which a caller can do before it spends any time drawing the samples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .data import _to_unit_range

__all__ = ["SAMPLE_SUFFIXES", "as_model_images", "check_output_path", "load_samples", "save_samples"]

#: The kinds of sample file: an image grid, or OpenAI's evaluation format.
SAMPLE_SUFFIXES = (".png", ".npz")


def as_model_images(x) -> torch.Tensor:
    """Convert samples to float32 ``[N, C, H, W]`` in ``[-1, 1]``.

    Accepts a uint8 array or tensor ``[N, H, W, C]`` (OpenAI ``.npz`` layout; values 0..255, mapped by
    ``x / 127.5 - 1``) or a floating tensor/array ``[N, C, H, W]`` already in ``[-1, 1]`` (returned as float32).
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images: expected a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"images: expected 4 dimensions ([N,H,W,C] uint8 or [N,C,H,W] float), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return _to_unit_range(x.permute(0, 3, 1, 2)).contiguous()
    if not x.is_floating_point():
        raise ValueError(f"images: dtype must be uint8 [N,H,W,C] or floating [N,C,H,W], got {x.dtype}")
    return x.float()


def load_samples(npz_path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an OpenAI-style sample file: returns (images ``[N, C, H, W]`` in [-1, 1], labels ``[N]`` or None)."""
    path = Path(npz_path)
    if not path.is_file():
        raise ValueError(f"npz_path: no such file {str(path)!r}")
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"npz_path: {str(path)!r} has no 'arr_0' (found {data.files}); expected uint8 [N,H,W,C]")
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    if images.dtype != np.uint8:
        raise ValueError(f"npz_path: arr_0 must be uint8 [N,H,W,C], got {images.dtype}")
    x = as_model_images(images)
    y = None
    if labels is not None:
        y = torch.from_numpy(np.asarray(labels)).long()
        if y.shape != (x.shape[0],):
            raise ValueError(f"npz_path: arr_1 must hold one label per image ({x.shape[0]}), "
                             f"got shape {tuple(y.shape)}")
    return x, y


def check_output_path(path, *, overwrite: bool = False, name: str = "path") -> Path:
    """Check that a sample file can be written at ``path`` without losing anything; returns it as a ``Path``.

    The suffix must be ``.png`` or ``.npz``; ``path`` must not be a folder, nor an existing file unless
    ``overwrite``; its folder must exist or be creatable (the nearest existing ancestor is a writable folder).
    Nothing is created. Failures raise ``ValueError`` in one line that starts with ``name``.
    """
    path = Path(path)
    if path.suffix.lower() not in SAMPLE_SUFFIXES:
        raise ValueError(f"{name} must end in .png or .npz, got {path}")
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder; give a file name ending in {path.suffix.lower()}")
    if path.exists() and not overwrite:
        raise ValueError(f"{name} {path} already exists; choose another name or pass --overwrite to replace it")
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{name} {path}: its folder cannot be made, because {folder} is a file; choose another place")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path}: the folder {folder} is not writable; choose another place")
    return path


def save_samples(path, images: torch.Tensor, labels: torch.Tensor | None = None, *, overwrite: bool = False) -> Path:
    """Write ``images [N, C, H, W]`` in [-1, 1] to ``path``: a ``.png`` grid, or an ``.npz`` in OpenAI's layout
    (``arr_0`` uint8 ``[N, H, W, C]``, ``arr_1`` int64 ``labels [N]`` when given).

    The file is written beside its place and renamed onto it (``ddpm.atomic.atomic_write``), so a failed write
    leaves no partial file and an existing file is replaced whole or not at all. Checks :func:`check_output_path`
    first; an ``OSError`` of the write is raised as is.
    """
    from .atomic import atomic_write
    from .plotting import save_png_grid, to_uint8

    path = check_output_path(path, overwrite=overwrite)
    if path.suffix.lower() == ".png":
        def write(tmp):
            save_png_grid(images, tmp)
    else:
        arrays = {"arr_0": to_uint8(images)}
        if labels is not None:
            if labels.shape != (images.shape[0],):
                raise ValueError(f"labels must hold one label per image ({images.shape[0]}), "
                                 f"got shape {tuple(labels.shape)}")
            arrays["arr_1"] = labels.detach().cpu().numpy().astype(np.int64)

        def write(tmp):
            np.savez(tmp, **arrays)
    atomic_write(path, write, keep_suffix=True)
    return path
