"""The FID error bars are calibrated: the reported std matches the spread of the FID over independent sample sets.

The book holds its reference features fixed and draws the samples; so does this test. Independent Gaussian sample
sets are drawn at two distances from the reference (a model at the data distribution, where FID sits at its
small-sample floor, and a clearly worse one), each is scored with :func:`ddpm.fid.fid_with_error`, and the mean
reported std must lie within 0.8 to 1.25 times the empirical standard deviation of the scores. The paired difference
(:func:`ddpm.fid.paired_fid_difference`) of two arms that share their noise gets the same test. With 40 sets the
empirical spread itself is known to about +-11%, so the window tests calibration, not luck; the bootstrap that the
split-half estimator replaced reported about twice the true spread near the floor and fails it.
"""

import torch

from ddpm.fid import fid_with_error, paired_fid_difference

D, N, N_REF, SETS = 32, 400, 1600, 40


def _setup():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5
    root = torch.linalg.cholesky(a @ a.T + 0.5 * torch.eye(D, dtype=torch.float64))
    return g, root


def _ratios(shift: float, scale: float) -> tuple[float, float]:
    g, root = _setup()
    reference = torch.randn(N_REF, D, generator=g, dtype=torch.float64) @ root.T
    fids, stds, diffs, diff_stds = [], [], [], []
    for _ in range(SETS):
        z = torch.randn(N, D, generator=g, dtype=torch.float64)
        a = (z @ root.T) * scale + shift
        # a second arm from the same noise: another map of z plus noise of its own
        b = (z @ root.T) * (1.05 * scale) + 0.5 * shift + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)
        r = fid_with_error(a, reference, n_draws=5)
        p = paired_fid_difference(a, b, reference, n_draws=5)
        fids.append(r["fid"]), stds.append(r["std"]), diffs.append(p["diff"]), diff_stds.append(p["std"])
    spread = torch.tensor(fids).std().item()
    diff_spread = torch.tensor(diffs).std().item()
    return sum(stds) / SETS / spread, sum(diff_stds) / SETS / diff_spread


def test_error_bars_match_the_spread_over_independent_sample_sets_near_the_floor():
    fid_ratio, diff_ratio = _ratios(shift=0.0, scale=1.0)
    assert 0.8 <= fid_ratio <= 1.25, fid_ratio
    assert 0.8 <= diff_ratio <= 1.25, diff_ratio


def test_error_bars_match_the_spread_over_independent_sample_sets_for_a_worse_model():
    fid_ratio, diff_ratio = _ratios(shift=0.25, scale=1.2)
    assert 0.8 <= fid_ratio <= 1.25, fid_ratio
    assert 0.8 <= diff_ratio <= 1.25, diff_ratio
