"""Offline sample-quality metrics for MNIST-like samples.

Inception-v3 weights cannot be fetched offline, so the project trains its own small MNIST classifier
(:class:`MNISTClassifier`) and measures samples in that classifier's space, as TF-GAN's MNIST
"classifier score" and "frechet classifier distance" do:

* FID in the penultimate feature space (:func:`frechet_distance`, computed in float64), with an error bar
  from repeated draws and, as the floor, the same statistic between two disjoint real subsets of equal size;
* mean classifier confidence, the entropy of the histogram of predicted classes (diversity), the accuracy
  of class-conditional samples against the requested labels, and an Inception-Score analogue;
* a memorisation check: the nearest training image of every sample in pixel space.

**These numbers are not comparable with published FIDs or Inception Scores**, which use Inception-v3
features of natural images; they only compare models measured here with the same classifier and the same
number of samples (FID is biased upwards at small sample sizes, hence the floor).

Image conventions: tensors are ``[N, C, H, W]`` float in ``[-1, 1]``; sample files follow OpenAI's
evaluation suite, an ``.npz`` with ``arr_0`` = uint8 ``[N, H, W, C]`` and optionally ``arr_1`` = int64
labels ``[N]``. :func:`as_model_images` converts either to the former. The book's evaluation chapter
(``theory/evaluation.md``) explains each number and its caveats.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import _to_unit_range
from .plotting import to_uint8  # noqa: F401  (re-exported: samples as the OpenAI .npz layout)
from .unet import _config_to_dict

NOT_COMPARABLE = (
    "FID and the Inception-Score analogue are measured in the feature space of the project's own MNIST "
    "classifier; they are not comparable with published Inception-v3 FIDs or Inception Scores."
)


# ----------------------------------------------------------------------------------------------------------
# Image conversions
# ----------------------------------------------------------------------------------------------------------


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


def real_digits(split: str = "train", dataset: str = "mnist5k") -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits as (images ``[N, 1, 28, 28]`` in [-1, 1], labels ``[N]``) via ``ddpm.data.load_dataset``.

    For ``mnist5k``: ``"train"`` is 4,000 digits, ``"test"`` the 1,000 held out (the last 100 of each class).
    """
    from ddpm.data import load_dataset

    return load_dataset(dataset, split=split)


# ----------------------------------------------------------------------------------------------------------
# The project's MNIST classifier (feature extractor)
# ----------------------------------------------------------------------------------------------------------


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
        if x.shape[1:] != (1, 28, 28):
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
    """The metric classifier, loaded from the model cache (``ddpm.checkpoint.cache_dir()``) or trained and cached.

    The file is ``mnist-classifier-<config_hash>.safetensors``; its metadata hold the configuration and the
    training ``info`` (held-out test accuracy, epochs, seconds). Returns (model in eval mode on ``device``, info).
    """
    from ddpm import checkpoint

    config = config or MNISTClassifierConfig()
    cfg = _config_to_dict(config)
    path = checkpoint.cache_dir() / f"mnist-classifier-{checkpoint.config_hash(cfg)}.safetensors"
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


# ----------------------------------------------------------------------------------------------------------
# Frechet distance (FID) in float64
# ----------------------------------------------------------------------------------------------------------


def gaussian_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``features`` ``[N, D]``, in float64."""
    f = torch.as_tensor(features).double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected [N, D] with N >= 2, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigendecomposition, float64)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017; Dowson & Landau 1982):

        d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}).

    All arithmetic in float64. ``tr((sigma1 sigma2)^{1/2})`` is computed as the sum of the square roots of the
    eigenvalues of the symmetric PSD matrix ``sigma1^{1/2} sigma2 sigma1^{1/2}``, which has the same spectrum
    as ``sigma1 sigma2``; no scipy ``sqrtm`` and no complex parts to discard.
    """
    mu1, mu2 = torch.as_tensor(mu1).double(), torch.as_tensor(mu2).double()
    s1, s2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    if mu1.shape != mu2.shape or mu1.ndim != 1 or s1.shape != (len(mu1),) * 2 or s2.shape != s1.shape:
        raise ValueError(f"frechet_distance: shapes must be mu [D], sigma [D, D]; got {tuple(mu1.shape)}, "
                         f"{tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")
    root1 = _sqrtm_psd(s1)
    m = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    d2 = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return float(d2.clamp_min(0))


def fid_from_features(features_a, features_b) -> float:
    """FID between two feature sets ``[N_a, D]`` and ``[N_b, D]`` (Gaussian fit to each, float64)."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def fid_with_error(features, reference, *, n_draws: int = 10, generator: torch.Generator | None = None) -> dict:
    """FID of ``features`` ``[N, D]`` against ``N`` real ``reference`` features, with a repeated-draw error bar.

    Each of ``n_draws`` draws takes a fresh reference subset of ``m = min(N, len(reference))`` features without
    replacement. ``fid`` is the mean over draws of FID(all N samples, subset): both sides hold N distinct items,
    as in :func:`fid_floor`, so the two are comparable at the same N. ``std`` is the standard deviation over the
    draws of FID(bootstrap resample of the N samples, subset), which covers both the finite sample set and the
    choice of real images. Returns ``{"fid", "std", "fid_point" (all samples against the whole reference),
    "n": N, "n_reference": m}``.
    """
    f, r = torch.as_tensor(features).double(), torch.as_tensor(reference).double()
    if n_draws < 2:
        raise ValueError(f"n_draws: need at least 2 draws for an error bar, got {n_draws}")
    gen = generator or torch.Generator().manual_seed(0)
    n, m = len(f), min(len(f), len(r))
    stats_f = gaussian_stats(f)
    values, boot = [], []
    for _ in range(n_draws):
        stats_r = gaussian_stats(r[torch.randperm(len(r), generator=gen)[:m]])
        values.append(frechet_distance(*stats_f, *stats_r))
        boot.append(frechet_distance(*gaussian_stats(f[torch.randint(0, n, (n,), generator=gen)]), *stats_r))
    v, bv = torch.tensor(values, dtype=torch.float64), torch.tensor(boot, dtype=torch.float64)
    return {"fid": float(v.mean()), "std": float(bv.std()), "fid_point": frechet_distance(*stats_f, *gaussian_stats(r)), "n": n,
            "n_reference": m}


def fid_floor(reference, n: int, *, n_draws: int = 10, generator: torch.Generator | None = None) -> dict:
    """FID between two disjoint random subsets of ``n`` real features each: what a perfect model would score.

    ``n`` is capped at half of ``len(reference)``. Returns ``{"fid": mean, "std": std over draws, "n": n}``.
    """
    r = torch.as_tensor(reference).double()
    n = min(int(n), len(r) // 2)
    if n < 2:
        raise ValueError(f"n: need at least 2 real features per subset, got {n} (reference has {len(r)})")
    gen = generator or torch.Generator().manual_seed(1)
    values = []
    for _ in range(max(n_draws, 2)):
        perm = torch.randperm(len(r), generator=gen)
        values.append(fid_from_features(r[perm[:n]], r[perm[n: 2 * n]]))
    v = torch.tensor(values, dtype=torch.float64)
    return {"fid": float(v.mean()), "std": float(v.std()), "n": n}


def heldout_floor(heldout, reference, n: int, *, n_draws: int = 10, generator: torch.Generator | None = None) -> dict:
    """The real-data floor of :func:`fid_with_error`: ``n`` held-out real features scored exactly as ``n`` samples are.

    Held-out digits are new to the diffusion model and to the metric classifier alike, as a perfect model's
    samples would be; two draws of the classifier's own training digits (:func:`fid_floor` on the reference)
    sit closer together than that and would flatter every model. ``n`` is capped at ``len(heldout)``; the subset
    is drawn at random. Returns the dict of :func:`fid_with_error`.
    """
    h = torch.as_tensor(heldout).double()
    n = min(int(n), len(h))
    gen = generator or torch.Generator().manual_seed(2)
    return fid_with_error(h[torch.randperm(len(h), generator=gen)[:n]], reference, n_draws=n_draws, generator=gen)


# ----------------------------------------------------------------------------------------------------------
# Classifier-based scores
# ----------------------------------------------------------------------------------------------------------


def _check_probs(probs) -> torch.Tensor:
    p = torch.as_tensor(probs).double()
    if p.ndim != 2:
        raise ValueError(f"probs: expected [N, K] class probabilities, got shape {tuple(p.shape)}")
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-6):
        raise ValueError("probs: every row must be a probability vector (non-negative, summing to 1)")
    return p


def mean_confidence(probs) -> float:
    """Mean over samples of the largest class probability, ``mean_i max_k p(k | x_i)`` (fidelity)."""
    return float(_check_probs(probs).max(1).values.mean())


def class_histogram_entropy(probs_or_labels, num_classes: int | None = None) -> float:
    """Entropy in nats of the histogram of predicted classes (diversity); ``ln K`` when all K classes are equal.

    Accepts probabilities ``[N, K]`` (arg-max is the prediction) or integer predictions ``[N]``
    (then ``num_classes`` is required).
    """
    x = torch.as_tensor(probs_or_labels)
    if x.ndim == 2:
        num_classes = x.shape[1]
        pred = _check_probs(x).argmax(1)
    else:
        if num_classes is None:
            raise ValueError("num_classes: required when class predictions [N] are given instead of probabilities")
        pred = x.long()
    h = torch.bincount(pred, minlength=num_classes).double()
    q = h / h.sum()
    return float(-torch.xlogy(q, q).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def classifier_score(probs, splits: int = 1) -> tuple[float, float]:
    """Inception-Score analogue (Salimans et al. 2016) with the metric classifier: ``exp(E_x KL(p(y|x) || p(y)))``.

    ``p(y)`` is the mean of ``p(y|x)`` over the (split of the) samples. Ranges from 1 (every sample gets the
    same prediction) to K (confident predictions, all K classes equally often). With ``splits > 1`` the
    samples are cut into equal parts as in the original code; returns (mean, std over splits).
    """
    p = _check_probs(probs)
    if splits < 1 or splits > len(p):
        raise ValueError(f"splits: must be in [1, N={len(p)}], got {splits}")
    scores = []
    for part in torch.chunk(p, splits):
        marginal = part.mean(0, keepdim=True)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, marginal.expand_as(part))).sum(1)
        scores.append(math.exp(float(kl.mean())))
    s = torch.tensor(scores, dtype=torch.float64)
    return float(s.mean()), float(s.std()) if splits > 1 else 0.0


def within_class_spread(features, labels) -> float:
    """Diversity within classes: the mean over classes k of the root-mean-square distance of the features
    ``[N, D]`` labelled k (``labels`` ``[N]``) to their class centroid. Falls as guidance collapses each class
    onto its most typical examples, which the class histogram cannot see when the requested labels are balanced.
    """
    f, y = torch.as_tensor(features).double(), torch.as_tensor(labels).long()
    if f.ndim != 2 or y.shape != (len(f),):
        raise ValueError(f"features [N, D] and labels [N] expected, got {tuple(f.shape)} and {tuple(y.shape)}")
    spreads = []
    for k in torch.unique(y):
        fk = f[y == k]
        spreads.append(float((fk - fk.mean(0)).pow(2).sum(1).mean().sqrt()))
    return sum(spreads) / len(spreads)


def conditional_accuracy(probs, labels) -> float:
    """Fraction of class-conditional samples whose predicted class equals the requested label ``[N]``."""
    p = _check_probs(probs)
    y = torch.as_tensor(labels).long()
    if y.shape != (len(p),):
        raise ValueError(f"labels: expected shape [{len(p)}], got {tuple(y.shape)}")
    return float((p.argmax(1) == y).double().mean())


# ----------------------------------------------------------------------------------------------------------
# Memorisation: nearest training image in pixel space
# ----------------------------------------------------------------------------------------------------------


def nearest_neighbours(samples, train, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the Euclidean distance to and index of its nearest training image in pixel space.

    ``samples`` ``[N, ...]`` and ``train`` ``[M, ...]`` (uint8 ``[N,H,W,C]`` or float ``[N,C,H,W]`` in [-1, 1]) are
    compared on the [0, 1] pixel scale. Returns (distances float64 ``[N]``, indices long ``[N]`` into ``train``).
    """
    a = (as_model_images(samples).double().flatten(1) + 1) / 2
    b = (as_model_images(train).double().flatten(1) + 1) / 2
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"samples and train differ in image size: {a.shape[1]} vs {b.shape[1]} pixels")
    b2 = (b * b).sum(1)
    dists, idx = [], []
    for i in range(0, len(a), batch_size):
        ai = a[i: i + batch_size]
        d2 = ((ai * ai).sum(1, keepdim=True) - 2 * ai @ b.T + b2[None]).clamp_min(0)
        j = d2.argmin(1)
        dists.append((ai - b[j]).norm(dim=1))  # exact distance of the winner (no cancellation)
        idx.append(j)
    return torch.cat(dists), torch.cat(idx)


def closest_pairs(samples, train, k: int = 8) -> dict:
    """The ``k`` samples closest to a training image, for a figure of candidate memorised digits.

    Returns ``{"sample_index": [k], "train_index": [k], "distance": [k], "samples": images [k, C, H, W],
    "train": their nearest training images [k, C, H, W]}`` (images in [-1, 1]), ordered by increasing distance.
    """
    samples, train = as_model_images(samples), as_model_images(train)  # converted once, used twice
    d, j = nearest_neighbours(samples, train)
    order = torch.argsort(d)[:k]
    return {
        "sample_index": order,
        "train_index": j[order],
        "distance": d[order],
        "samples": samples[order],
        "train": train[j[order]],
    }


def memorisation_summary(sample_distances, real_distances) -> dict:
    """Compare sample-to-train nearest-neighbour distances with those of held-out real digits.

    A model that copies its training data has samples much closer to the training set than new real digits
    are. Returns quantiles of both distributions and the fraction of samples closer than the 1st percentile
    of the real distances.
    """
    s, r = torch.as_tensor(sample_distances).double(), torch.as_tensor(real_distances).double()
    q = torch.tensor([0.0, 0.05, 0.5], dtype=torch.float64)
    qs, qr = torch.quantile(s, q), torch.quantile(r, q)
    threshold = float(torch.quantile(r, 0.01))
    return {
        "nn_min": float(qs[0]), "nn_p05": float(qs[1]), "nn_median": float(qs[2]),
        "real_nn_min": float(qr[0]), "real_nn_p05": float(qr[1]), "real_nn_median": float(qr[2]),
        "frac_below_real_p01": float((s < threshold).double().mean()),
        "n_exact_copies": int((s < 1e-6).sum()),
    }


# ----------------------------------------------------------------------------------------------------------
# Optional: FID in Inception space, only where pytorch-fid and its weights are already on disk
# ----------------------------------------------------------------------------------------------------------

_INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def inception_fid(samples, reference, batch_size: int = 100, device=None) -> float | None:
    """FID in Inception-v3 pool features with ``pytorch_fid``, or None when the package or its weights are absent.

    Never downloads: the weights must already sit in ``torch.hub.get_dir()/checkpoints``. Grey images are
    repeated to three channels and resized to 299x299 by the network. Even this number is not comparable with
    published values, which use 50,000 samples of other datasets.
    """
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        return None
    if not (Path(torch.hub.get_dir()) / "checkpoints" / _INCEPTION_WEIGHTS).is_file():
        return None
    device = torch.device(device or "cpu")
    net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()

    @torch.no_grad()
    def feats(images):
        x = (as_model_images(images) + 1) / 2  # pytorch_fid expects [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return torch.cat([net(x[i: i + batch_size].to(device))[0].flatten(1).double().cpu()
                          for i in range(0, len(x), batch_size)])

    return fid_from_features(feats(samples), feats(reference))


# ----------------------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------------------


def evaluate_images(
    images,
    labels=None,
    *,
    classifier: MNISTClassifier | None = None,
    classifier_info: dict | None = None,
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    n_draws: int = 10,
    seed: int = 0,
    memorisation: bool = True,
    inception: bool = True,
    device=None,
) -> dict:
    """All metrics of samples (uint8 ``[N,H,W,C]`` or float ``[N,C,H,W]`` in [-1, 1]), optional requested labels ``[N]``.

    Reference data default to the mnist5k training digits (FID reference, nearest neighbours) and the 1,000
    held-out digits (classifier accuracy, real-data reference values); the classifier defaults to
    :func:`load_or_train_mnist_classifier`. Keys: ``n_samples``, ``classifier_test_accuracy``, ``fid``,
    ``fid_std``, ``fid_n``, ``fid_floor``, ``fid_floor_std``, ``fid_floor_n`` (:func:`heldout_floor`: as many
    held-out digits as samples, at most all of them, scored like the samples), ``fid_heldout``, ``fid_heldout_std``, ``fid_heldout_n`` (the held-out digits, which neither the
    metric classifier nor the generator saw, against training digits), ``confidence``, ``class_entropy``
    (nats), ``class_entropy_max`` (ln K), ``classifier_score``, the same three scores of held-out real digits
    (``real_*``), ``conditional_accuracy`` (None without labels), memorisation quantiles (``nn_*``,
    ``real_nn_*``, ``frac_below_real_p01``, ``n_exact_copies``), ``inception_fid`` (None unless available)
    and ``note``. The numbers are not comparable with published Inception FIDs (see ``note``).
    """
    x = as_model_images(images)
    if x.shape[1:] != (1, 28, 28):
        raise ValueError(f"images: the metric classifier takes 28x28 grey digits, got [N,C,H,W]={list(x.shape)}")
    if len(x) < 2:
        raise ValueError(f"images: need at least 2 samples, got {len(x)}")
    if classifier is None:
        classifier, classifier_info = load_or_train_mnist_classifier(device=device)
    x_train, _ = train_data if train_data is not None else real_digits("train")
    x_test, y_test = test_data if test_data is not None else real_digits("test")
    gen = torch.Generator().manual_seed(seed)

    out = classifier_outputs(classifier, x)
    ref = classifier_outputs(classifier, x_train)["features"]
    real = classifier_outputs(classifier, x_test)
    fid = fid_with_error(out["features"], ref, n_draws=n_draws, generator=gen)
    floor = heldout_floor(real["features"], ref, len(x), n_draws=n_draws, generator=gen)
    heldout = fid_with_error(real["features"], ref, n_draws=n_draws, generator=gen)
    probs, num_classes = out["probs"], out["probs"].shape[1]
    test_acc = (classifier_info or {}).get("test_accuracy")
    result = {
        "n_samples": len(x),
        "classifier_test_accuracy": (float(test_acc) if test_acc is not None
                                     else conditional_accuracy(real["probs"], y_test)),
        "fid": fid["fid"], "fid_std": fid["std"], "fid_n": fid["n_reference"],
        "fid_floor": floor["fid"], "fid_floor_std": floor["std"], "fid_floor_n": floor["n"],
        "fid_heldout": heldout["fid"], "fid_heldout_std": heldout["std"], "fid_heldout_n": heldout["n_reference"],
        "confidence": mean_confidence(probs),
        "class_entropy": class_histogram_entropy(probs),
        "class_entropy_max": math.log(num_classes),
        "classifier_score": classifier_score(probs)[0],
        "real_confidence": mean_confidence(real["probs"]),
        "real_class_entropy": class_histogram_entropy(real["probs"]),
        "real_classifier_score": classifier_score(real["probs"])[0],
        "conditional_accuracy": None if labels is None else conditional_accuracy(probs, labels),
    }
    if memorisation:
        d_samples, _ = nearest_neighbours(x, x_train)
        d_real, _ = nearest_neighbours(x_test, x_train)
        result.update(memorisation_summary(d_samples, d_real))
    result["inception_fid"] = inception_fid(x, x_train, device=device) if inception else None
    result["note"] = NOT_COMPARABLE
    return result


def evaluate_samples(npz_path, **kwargs) -> dict:
    """:func:`evaluate_images` on an OpenAI-style ``.npz`` (``arr_0`` uint8 ``[N,H,W,C]``, optional ``arr_1`` labels).

    The labels in ``arr_1`` are taken as the requested classes of conditional samples.
    """
    images, labels = load_samples(npz_path)
    return evaluate_images(images, labels, **kwargs)


def format_report(metrics: dict) -> str:
    """A plain-text table of :func:`evaluate_images` results, ending with the comparability caveat."""
    m = metrics

    def num(key, fmt="{:.3f}"):
        return "n/a" if m.get(key) is None else fmt.format(m[key])

    lines = [
        f"samples                      {m['n_samples']}",
        f"metric classifier test acc.  {num('classifier_test_accuracy', '{:.4f}')} (held-out mnist5k digits)",
        f"FID (classifier features)    {num('fid', '{:.2f}')} +- {num('fid_std', '{:.2f}')} "
        f"(against {m.get('fid_n')} real digits)",
        f"FID floor, held-out digits   {num('fid_floor', '{:.2f}')} +- {num('fid_floor_std', '{:.2f}')} "
        f"({m.get('fid_floor_n')} held-out digits scored like the samples)",
        f"FID held-out real digits     {num('fid_heldout', '{:.2f}')} +- {num('fid_heldout_std', '{:.2f}')} "
        f"({m.get('fid_heldout_n')} unseen digits against as many training digits)",
        f"mean confidence              {num('confidence')} (real digits: {num('real_confidence')})",
        f"class-histogram entropy      {num('class_entropy')} nats of max {num('class_entropy_max')} "
        f"(real digits: {num('real_class_entropy')})",
        f"Inception-Score analogue     {num('classifier_score', '{:.2f}')} (real digits: "
        f"{num('real_classifier_score', '{:.2f}')})",
        f"conditional accuracy         {num('conditional_accuracy')}",
    ]
    if "nn_median" in m:
        lines += [
            f"nearest training image (L2)  min {num('nn_min')}, 5% {num('nn_p05')}, median {num('nn_median')} "
            f"(held-out real digits: min {num('real_nn_min')}, 5% {num('real_nn_p05')}, "
            f"median {num('real_nn_median')})",
            f"closer than 1% of real       {num('frac_below_real_p01')}; exact copies {m.get('n_exact_copies')}",
        ]
    if m.get("inception_fid") is not None:
        lines.append(f"FID (Inception-v3, optional) {m['inception_fid']:.2f}")
    lines.append("note: " + m.get("note", NOT_COMPARABLE))
    return "\n".join(lines)


def sliced_wasserstein(a, b, n_projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-1 distance between two point clouds ``a`` [N, D] and ``b`` [M, D] (float64).

    Both sets are projected on ``n_projections`` random unit directions; on each line the 1-D Wasserstein
    distance is the mean gap between matched quantiles. Used for the 2-D toy models, where FID has no meaning.
    """
    a = torch.as_tensor(a, dtype=torch.float64).reshape(len(a), -1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(len(b), -1)
    if a.shape[1] != b.shape[1] or len(a) < 1 or len(b) < 1:
        raise ValueError(f"a and b must be non-empty point sets of equal dimension, got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(a.shape[1], n_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    q = torch.linspace(0, 1, max(len(a), len(b)), dtype=torch.float64)
    pa = torch.quantile((a @ directions), q, dim=0)
    pb = torch.quantile((b @ directions), q, dim=0)
    return float((pa - pb).abs().mean())
