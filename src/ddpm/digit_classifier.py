"""The project's own MNIST classifier: the feature extractor of the book's FID and the judge of conditional samples.

Inception-v3 weights cannot be fetched offline, so the project trains a small convolutional network on the
``mnist5k`` training digits (as TF-GAN's MNIST "classifier score" does) and caches it beside the models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .data import load_dataset
from .paths import cache_dir
from .samplefiles import as_model_images
from .blocks import _config_to_dict

__all__ = ["IMAGE_SHAPE", "MNISTClassifier", "MNISTClassifierConfig", "classifier_accuracy", "classifier_outputs",
           "load_or_train_mnist_classifier", "real_digits", "train_mnist_classifier"]

#: the one image shape the classifier (and so the metric) takes: [C, H, W] of a grey 28x28 digit
IMAGE_SHAPE = (1, 28, 28)


def real_digits(split: str = "train", dataset: str = "mnist5k") -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits as (images ``[N, 1, 28, 28]`` in [-1, 1], labels ``[N]``) via ``ddpm.data.load_dataset``.

    For ``mnist5k``: ``"train"`` is 4,000 digits, ``"test"`` the 1,000 held out (the last 100 of each class).
    """
    return load_dataset(dataset, split=split)


@dataclass
class MNISTClassifierConfig:
    """Configuration of :class:`MNISTClassifier` and of its training on the mnist5k training digits."""

    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 128  # size of the penultimate layer, the feature space of FID
    num_classes: int = 10
    dropout: float = 0.3
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 2  # random translation augmentation in pixels
    seed: int = 0
    dataset: str = "mnist5k"

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 2 or min(self.channels) < 1:
            raise ValueError(f"channels: two positive widths expected, got {self.channels}")
        if self.feature_dim < 2:
            raise ValueError(f"feature_dim: must be >= 2, got {self.feature_dim}")


class MNISTClassifier(nn.Module):
    """Two conv-pool stages, a ``feature_dim`` hidden layer (the FID features), and class logits.

    ``forward(x)``: x ``[N, 1, 28, 28]`` in [-1, 1] -> logits ``[N, num_classes]``;
    ``features(x)`` -> ``[N, feature_dim]`` (post-ReLU penultimate activations).
    """

    def __init__(self, config: MNISTClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or MNISTClassifierConfig()
        c1, c2 = config.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 7 * 7, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"x: the MNIST classifier takes [N, 1, 28, 28] images, got {tuple(x.shape)}")
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (padding with -1, the background value)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(n)])


def train_mnist_classifier(
    config: MNISTClassifierConfig | None = None,
    *,
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    device=None,
) -> tuple[MNISTClassifier, dict]:
    """Train :class:`MNISTClassifier` with AdamW on the training digits; returns (model in eval mode, info).

    ``info`` holds ``test_accuracy`` on the held-out digits (the last 100 per class of mnist5k unless ``test_data`` is
    given), ``train_accuracy``, ``epochs`` and ``seconds``. Data default to ``mnist5k`` train/test.
    """
    config = config or MNISTClassifierConfig()
    device = torch.device(device or "cpu")
    x_train, y_train = train_data if train_data is not None else real_digits("train", config.dataset)
    x_test, y_test = test_data if test_data is not None else real_digits("test", config.dataset)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = MNISTClassifier(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
    start = time.perf_counter()
    model.train()
    for _ in range(config.epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), config.batch_size):
            idx = perm[i: i + config.batch_size]
            xb = _random_shift(x_train[idx], config.max_shift, gen).to(device)
            loss = F.cross_entropy(model(xb), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    info = {
        "test_accuracy": classifier_accuracy(model, x_test, y_test),
        "train_accuracy": classifier_accuracy(model, x_train, y_train),
        "epochs": config.epochs,
        "seconds": time.perf_counter() - start,
        "n_train": len(x_train),
        "n_test": len(x_test),
    }
    return model, info


@torch.no_grad()
def classifier_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of images ``x`` ``[N, 1, 28, 28]`` whose arg-max class equals ``y`` ``[N]``."""
    probs = classifier_outputs(model, x, batch_size=batch_size)["probs"]
    return float((probs.argmax(1) == y.to(probs.device)).double().mean())


def load_or_train_mnist_classifier(
    config: MNISTClassifierConfig | None = None, *, cache: bool = True, device=None, verbose: bool = False
) -> tuple[MNISTClassifier, dict]:
    """The metric classifier, loaded from the model cache (``ddpm.paths.cache_dir()``) or trained and cached.

    The file is ``mnist-classifier-<config_hash>.safetensors``; its metadata hold the configuration and the
    training ``info`` (held-out test accuracy, epochs, seconds). Returns (model in eval mode on ``device``, info).
    """
    config = config or MNISTClassifierConfig()
    cfg = _config_to_dict(config)
    path = cache_dir() / f"mnist-classifier-{checkpoint.config_hash(cfg)}.safetensors"
    if cache and path.is_file():
        model = MNISTClassifier(config)
        tensors, meta = checkpoint.load_weights(path)
        if meta.get("config") != cfg:
            raise ValueError(f"{path}: stored classifier configuration differs; delete the file to retrain")
        model.load_state_dict(tensors)
        info = dict(meta["info"])
        if verbose:
            print(f"loaded the metric classifier from {path}")
    else:
        if verbose:
            print("training the metric classifier on the mnist5k training digits ...")
        model, info = train_mnist_classifier(config, device=device)
        if cache:
            checkpoint.save_weights(path, model.state_dict(), {"model": "MNISTClassifier", "config": cfg, "info": info})
    info = {**info, "path": str(path) if cache else None}
    return model.to(torch.device(device or "cpu")).eval(), info


@torch.no_grad()
def classifier_outputs(model: nn.Module, images, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Run the metric classifier on images (uint8 ``[N,H,W,C]`` or float ``[N,C,H,W]`` in [-1, 1]).

    Returns float64 CPU tensors ``features`` ``[N, D]`` (penultimate layer) and ``probs`` ``[N, K]``.
    """
    x = as_model_images(images)
    model.eval()
    device = next(model.parameters()).device
    feats, probs = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i: i + batch_size].to(device))
        feats.append(f.double().cpu())
        probs.append(F.softmax(model.head(f).double(), dim=1).cpu())
    return {"features": torch.cat(feats), "probs": torch.cat(probs)}
