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
           "inception_fid", "paired_fid_difference", "precision_recall", "sliced_wasserstein", "split_half_std"]


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


class _ReferenceDraws:
    """``n_draws`` subsets of ``m`` reference features, fitted once; scores a sample set against each of them.

    Holding the subsets fixed is what "the reference held fixed" means for every estimate below: the samples vary,
    the real digits they are scored against do not.
    """

    def __init__(self, reference: torch.Tensor, m: int, n_draws: int, generator: torch.Generator) -> None:
        self.stats = [gaussian_stats(reference[torch.randperm(len(reference), generator=generator)[:m]])
                      for _ in range(n_draws)]

    def mean_fid(self, features: torch.Tensor) -> float:
        """The mean over the reference subsets of FID(features, subset), with the samples' square root taken once."""
        mu, sigma = gaussian_stats(features)
        root = _sqrtm_psd(sigma)
        total = 0.0
        for mu_r, sigma_r in self.stats:
            m = root @ sigma_r @ root
            tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
            diff = mu - mu_r
            total += float((diff @ diff + torch.trace(sigma) + torch.trace(sigma_r) - 2 * tr_covmean).clamp_min(0))
        return total / len(self.stats)


def split_half_std(statistic, n: int, *, n_splits: int = 50, generator: torch.Generator | None = None) -> float:
    """The standard deviation of ``statistic(range(n))`` over independent sample sets, from random half splits.

    ``statistic(idx)`` evaluates the statistic on the samples ``idx`` (a LongTensor of indices). Each of
    ``n_splits`` random splits cuts the ``n`` samples into halves A and B of ``n // 2``; the variance of the
    full-sample statistic is estimated by ``-Cov(theta_A, theta_B)`` over the splits (Eq. evaluation-split-variance
    of the book). For the linear part of a statistic's noise the two halves are exactly anti-correlated across
    splits, and their covariance is minus the variance of the full-sample statistic; for a pairwise (degree-2) part,
    such as the squared distance of a sample mean from a fixed point, it is again minus that variance, where a
    bootstrap or a half-sample spread counts it two or three times. A negative variance estimate (possible by
    chance when the statistic barely moves) is reported as 0.
    """
    if n_splits < 2:
        raise ValueError(f"n_splits: need at least 2 splits for an error bar, got {n_splits}")
    if n < 4:
        raise ValueError(f"need at least 4 samples to split in halves, got {n}")
    gen = generator or torch.Generator().manual_seed(0)
    half = n // 2
    a, b = [], []
    for _ in range(n_splits):
        perm = torch.randperm(n, generator=gen)
        a.append(statistic(perm[:half]))
        b.append(statistic(perm[half: 2 * half]))
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    cov = float(((ta - ta.mean()) * (tb - tb.mean())).sum() / (n_splits - 1))
    return max(-cov, 0.0) ** 0.5


def fid_with_error(features, reference, *, n_draws: int = 10, n_splits: int = 50,
                   generator: torch.Generator | None = None) -> dict:
    """FID of ``features`` ``[N, D]`` against ``N`` real ``reference`` features, with its sample-noise error bar.

    ``n_draws`` reference subsets of ``m = min(N, len(reference))`` features are drawn without replacement and held
    fixed; ``fid`` is the mean over them of FID(all N samples, subset): both sides hold N distinct items, as in
    :func:`fid_floor`, so the two are comparable at the same N. ``std`` is the spread that ``fid`` would show over
    independent sets of N samples from the same model, scored against the same reference, estimated from
    ``n_splits`` random half splits of the samples (:func:`split_half_std`). Measured on Gaussian features (64
    dimensions, N = 1,000, 4,000 reference features), it is within about 10% of the true spread both near the floor
    and far from it, where a bootstrap with replacement against fresh reference subsets overstated it about twofold
    near the floor. Returns ``{"fid", "std", "fid_point" (all samples against the whole reference), "n": N,
    "n_reference": m}``.
    """
    f, r = torch.as_tensor(features).double(), torch.as_tensor(reference).double()
    if n_draws < 1:
        raise ValueError(f"n_draws: need at least one reference draw, got {n_draws}")
    gen = generator or torch.Generator().manual_seed(0)
    n, m = len(f), min(len(f), len(r))
    refs = _ReferenceDraws(r, m, n_draws, gen)
    std = split_half_std(lambda idx: refs.mean_fid(f[idx]), n, n_splits=n_splits, generator=gen)
    return {"fid": refs.mean_fid(f), "std": std, "fid_point": fid_from_features(f, r), "n": n, "n_reference": m}


def paired_fid_difference(features_a, features_b, reference, *, n_draws: int = 10, n_splits: int = 50,
                          generator: torch.Generator | None = None) -> dict:
    """FID(a) - FID(b) for two sample sets that share their noise, with the error bar of the difference.

    Sample ``i`` of ``a`` and sample ``i`` of ``b`` must come from the same starting noise (two samplers, or two
    sets of weights, run from one ``x_T``). Both arms are scored against the same fixed reference subsets, and every
    half split takes the same indices from both arms, so what the two arms share (the noise, the reference digits)
    cancels in the difference instead of adding to its error as it would for two independent error bars.
    ``diff`` is the mean over the reference subsets of FID(a, subset) - FID(b, subset); ``std`` its spread over
    independent sets of starting noise (:func:`split_half_std` of the difference). Returns ``{"diff", "std",
    "fid_a", "fid_b", "n", "n_reference"}``.
    """
    a, b, r = (torch.as_tensor(x).double() for x in (features_a, features_b, reference))
    if a.shape != b.shape:
        raise ValueError(f"paired arms must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if n_draws < 1:
        raise ValueError(f"n_draws: need at least one reference draw, got {n_draws}")
    gen = generator or torch.Generator().manual_seed(0)
    n, m = len(a), min(len(a), len(r))
    refs = _ReferenceDraws(r, m, n_draws, gen)
    std = split_half_std(lambda idx: refs.mean_fid(a[idx]) - refs.mean_fid(b[idx]), n, n_splits=n_splits,
                         generator=gen)
    fid_a, fid_b = refs.mean_fid(a), refs.mean_fid(b)
    return {"diff": fid_a - fid_b, "std": std, "fid_a": fid_a, "fid_b": fid_b, "n": n, "n_reference": m}


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


def heldout_floor(heldout, reference, n: int, *, n_draws: int = 10, n_splits: int = 50,
                  generator: torch.Generator | None = None) -> dict:
    """The real-data floor of :func:`fid_with_error`: ``n`` held-out real features scored exactly as ``n`` samples are.

    The ``n`` held-out features are a random subset (drawn with a generator of its own, seed 2); they are scored
    against the same reference subsets as samples scored with the same ``generator`` (default: seed 0). Held-out
    digits are new to the diffusion model and to the metric classifier alike, as a perfect model's samples would
    be; two draws of the classifier's own training digits (:func:`fid_floor` on the reference) sit closer together
    than that. The floor is a yardstick, not a bound: a model that reproduces its training digits (the reference)
    closely, or whose labels match the reference's class mix better than a random draw of ``n`` digits does, can
    score below it. ``n`` larger than ``len(heldout)`` is refused: a floor must be taken at the n of the FID it is
    compared with, so score the samples at a smaller n instead. Returns the dict of :func:`fid_with_error`.
    """
    h = torch.as_tensor(heldout).double()
    n = int(n)
    if not 2 <= n <= len(h):
        raise ValueError(f"heldout_floor: n = {n} but only {len(h)} held-out features are available; a floor must "
                         "be taken at the same n as the FID it is compared with, so score the samples at n <= "
                         f"{len(h)} (subsample them)")
    subset = h[torch.randperm(len(h), generator=torch.Generator().manual_seed(2))[:n]]
    return fid_with_error(subset, reference, n_draws=n_draws, n_splits=n_splits, generator=generator)


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

