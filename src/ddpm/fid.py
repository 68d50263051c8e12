"""Fréchet distances between feature sets: FID with an error bar, its real-data floors, and two relatives.

FID is the squared Fréchet (2-Wasserstein) distance between Gaussians fitted to two feature sets, computed in
float64. It is biased upwards at small sample sizes, so every FID in the book is quoted beside a floor measured
at the same n (:func:`heldout_floor`). ``inception_fid`` uses Inception-v3 features only where ``pytorch_fid`` and
its weights are already on disk; ``sliced_wasserstein`` serves the 2-D toy models, where FID has no meaning.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .samplefiles import as_model_images

__all__ = ["fid_floor", "fid_from_features", "fid_with_error", "frechet_distance", "gaussian_stats", "heldout_floor",
           "inception_fid", "paired_fid_difference", "precision_recall", "sliced_wasserstein"]


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


def paired_fid_difference(features_a, features_b, reference, *, n_draws: int = 20,
                          generator: torch.Generator | None = None) -> dict:
    """FID(a) - FID(b) for two sample sets that share their noise, with the error bar of the difference.

    Sample ``i`` of ``a`` and sample ``i`` of ``b`` must come from the same starting noise (two samplers, or two
    sets of weights, run from one ``x_T``). Both arms are then scored against the same reference subset in every
    draw, and resampled with the same bootstrap indices, so what the two arms share (the noise, the reference
    digits) cancels in the difference instead of adding to its error as it would for two independent error bars.
    ``diff`` is the mean over draws of FID(a, subset) - FID(b, subset); ``std`` the standard deviation over draws
    of the bootstrap differences. Returns ``{"diff", "std", "fid_a", "fid_b", "n", "n_reference"}``.
    """
    a, b, r = (torch.as_tensor(x).double() for x in (features_a, features_b, reference))
    if a.shape != b.shape:
        raise ValueError(f"paired arms must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if n_draws < 2:
        raise ValueError(f"n_draws: need at least 2 draws for an error bar, got {n_draws}")
    gen = generator or torch.Generator().manual_seed(0)
    n, m = len(a), min(len(a), len(r))
    stats_a, stats_b = gaussian_stats(a), gaussian_stats(b)
    fa, fb, boot = [], [], []
    for _ in range(n_draws):
        stats_r = gaussian_stats(r[torch.randperm(len(r), generator=gen)[:m]])
        fa.append(frechet_distance(*stats_a, *stats_r))
        fb.append(frechet_distance(*stats_b, *stats_r))
        idx = torch.randint(0, n, (n,), generator=gen)
        boot.append(frechet_distance(*gaussian_stats(a[idx]), *stats_r)
                    - frechet_distance(*gaussian_stats(b[idx]), *stats_r))
    fa_t, fb_t = torch.tensor(fa, dtype=torch.float64), torch.tensor(fb, dtype=torch.float64)
    return {"diff": float((fa_t - fb_t).mean()), "std": float(torch.tensor(boot, dtype=torch.float64).std()),
            "fid_a": float(fa_t.mean()), "fid_b": float(fb_t.mean()), "n": n, "n_reference": m}


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


def precision_recall(samples, data, k: int = 5) -> dict:
    """k-nearest-neighbour precision and recall of ``samples`` against ``data`` (Kynkaanniemi et al. 2019).

    Each point of a set gets a ball reaching its k-th nearest neighbour within that set; the union of the balls
    estimates the set's support. Precision is the share of samples inside the data's support (are the samples
    plausible?), recall the share of data points inside the samples' support (is every part of the data
    reached?). For point clouds ``[N, D]`` (the 2-D toy models, or features); float64. A blurred cloud has high
    recall and low precision; a model that misses one arm of a spiral has low recall. Two independent draws of
    the data give the floor. Returns ``{"precision", "recall"}``.
    """
    a = torch.as_tensor(samples, dtype=torch.float64).reshape(len(samples), -1)
    b = torch.as_tensor(data, dtype=torch.float64).reshape(len(data), -1)
    if a.shape[1] != b.shape[1] or min(len(a), len(b)) <= k:
        raise ValueError(f"samples and data need equal dimension and more than k = {k} points each, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")

    def radii(x: torch.Tensor) -> torch.Tensor:  # distance to the k-th neighbour, the point itself excluded
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    def inside(points: torch.Tensor, support: torch.Tensor, r: torch.Tensor) -> float:
        return float((torch.cdist(points, support) <= r[None, :]).any(dim=1).double().mean())

    return {"precision": inside(a, b, radii(b)), "recall": inside(b, a, radii(a))}

