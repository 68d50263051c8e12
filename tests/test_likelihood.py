import math

import pytest
import torch

from ddpm.likelihood import bpd_terms, nll_bits_per_dim, nll_estimate
from ddpm.schedule import NoiseSchedule
from oracles import GaussianOracle

MU, S = 0.1, 0.3
LOG2 = math.log(2)


def expected_terms(sched, var_type="fixed_small", v=None):
    """E[L_t] in bits/dim for t = 1..T-1 and E[L_T] under the Gaussian oracle, in closed form.

    The oracle's mean differs from the posterior mean by coef1 (x_0 - E[x_0 | x_t]), whose second moment is
    coef1^2 Var(x_0 | x_t); the KL of two Gaussians then has a closed form.
    """
    ab, btilde, beta = sched.alpha_bar, sched.posterior_variance, sched.betas
    post_var_x0 = S ** 2 * (1 - ab) / (ab * S ** 2 + 1 - ab)
    mean_sq = sched.posterior_mean_coef1 ** 2 * post_var_x0
    if var_type == "fixed_small":
        log_sigma2 = sched.posterior_log_variance_clipped
    else:
        frac = (v + 1) / 2
        log_sigma2 = frac * beta.log() + (1 - frac) * sched.posterior_log_variance_clipped
    kl = 0.5 * (log_sigma2 - btilde.log() + (btilde + mean_sq) / log_sigma2.exp() - 1)
    a_T = ab[-1]
    prior = 0.5 * (-torch.log1p(-a_T) + (1 - a_T) + a_T * (MU ** 2 + S ** 2) - 1)
    return kl[1:] / LOG2, prior / LOG2


def data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return MU + S * torch.randn(n, 1, 2, 2, generator=gen, dtype=torch.float64), gen


@pytest.mark.parametrize("v", [None, 0.4])
def test_bound_terms_agree_with_the_analytic_value(v):
    sched = NoiseSchedule.from_name("linear", 100)
    oracle = GaussianOracle(sched, MU, S, v=v)
    x0, gen = data(3000)
    terms = bpd_terms(oracle, sched, x0, clip_denoised=False, generator=gen)
    kl, prior = expected_terms(sched, "fixed_small" if v is None else "learned_range", v)
    measured = terms["vb"][:, 1:]
    stderr = measured.std(dim=0) / math.sqrt(x0.shape[0])
    assert (measured.mean(dim=0) - kl).abs().le(5 * stderr + 1e-12).all()
    total, total_err = measured.sum(dim=1), measured.sum(dim=1).std() / math.sqrt(x0.shape[0])
    assert total.mean().item() == pytest.approx(kl.sum().item(), abs=5 * total_err.item())
    assert terms["prior"].mean().item() == pytest.approx(prior.item(), rel=0.05)
    assert torch.allclose(terms["total"], terms["vb"].sum(dim=1) + terms["prior"])


def test_sampled_timestep_estimate_agrees_with_the_exact_sum():
    sched = NoiseSchedule.from_name("linear", 100)
    oracle = GaussianOracle(sched, MU, S)
    x0, gen = data(400, seed=1)
    exact = nll_bits_per_dim(oracle, sched, x0, clip_denoised=False, generator=gen)
    mean, stderr = nll_estimate(oracle, sched, x0, K=8, clip_denoised=False, generator=gen)
    assert stderr > 0
    assert mean == pytest.approx(exact.mean().item(), abs=4 * stderr)
    # more timesteps per example shrink the error
    _, stderr_more = nll_estimate(oracle, sched, x0, K=64, clip_denoised=False, generator=gen)
    assert stderr_more < stderr


def test_likelihood_bad_input():
    sched = NoiseSchedule.from_name("linear", 50)
    oracle = GaussianOracle(sched, MU, S)
    with pytest.raises(ValueError, match="K"):
        nll_estimate(oracle, sched, torch.zeros(2, 1, 2, 2), K=0)
    with pytest.raises(ValueError, match="x0"):
        nll_bits_per_dim(oracle, sched, torch.zeros(3))
    with pytest.raises(ValueError, match="T must be >= 21"):
        NoiseSchedule.from_name("linear", 10)
