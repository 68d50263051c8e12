"""Sample files in the layout of OpenAI's evaluation suite, and the conversion of images to model tensors.

An ``.npz`` with ``arr_0`` = uint8 ``[N, H, W, C]`` and optionally ``arr_1`` = int64 labels ``[N]``;
:func:`as_model_images` turns either that layout or a float tensor into ``[N, C, H, W]`` floats in ``[-1, 1]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import _to_unit_range

__all__ = ["as_model_images", "load_samples"]


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
