"""Memorisation: the nearest training image of every sample, against the same distances for held-out real images."""

from __future__ import annotations

import torch

from .samplefiles import as_model_images

__all__ = ["closest_pairs", "memorisation_summary", "nearest_neighbours"]


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
