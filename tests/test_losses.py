import math

import pytest
import torch

from ddpm.losses import (ImportanceSampler, UniformSampler, discretized_gaussian_log_likelihood, min_snr_weight,
                         model_log_variance, normal_kl, p_mean_variance, prior_bpd, training_losses,
                         vb_terms_bpd)
from ddpm.schedule import NoiseSchedule


def test_discretized_decoder_sums_to_one_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, -3.0), (0.7, -5.0), (-0.99, -1.0), (0.2, 0.5), (1.3, -6.0)]:
        logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        assert (logp <= 0).all()


def test_discretized_decoder_matches_normal_cdf_differences():
    x = torch.tensor([-1.0, 2 * 100 / 255 - 1, 1.0], dtype=torch.float64)
    mean, sd = 0.1, 0.3
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(sd)))
    cdf = lambda z: 0.5 * (1 + math.erf((z - mean) / (sd * math.sqrt(2))))  # noqa: E731
    expected = [cdf(-1 + 1 / 255), cdf(x[1].item() + 1 / 255) - cdf(x[1].item() - 1 / 255), 1 - cdf(1 - 1 / 255)]
    assert torch.allclose(logp.exp(), torch.tensor(expected, dtype=torch.float64), rtol=1e-9)


def test_discretized_decoder_agrees_with_the_clamped_formula_at_ordinary_values():
    # OpenAI's formula: log of each CDF difference clamped at 1e-12; where no clamp acts, the two must agree
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (2000,), generator=g).double() / 127.5 - 1)
    means = x + 0.05 * torch.randn(2000, generator=g, dtype=torch.float64)
    log_scales = torch.empty(2000, dtype=torch.float64).uniform_(-4, -1, generator=g)
    inv = torch.exp(-log_scales)
    cdf_plus, cdf_min = torch.special.ndtr(inv * (x - means + 1 / 255)), torch.special.ndtr(inv * (x - means - 1 / 255))
    clamped = torch.where(x < -0.999, cdf_plus.clamp(min=1e-12).log(),
                          torch.where(x > 0.999, (1 - cdf_min).clamp(min=1e-12).log(),
                                      (cdf_plus - cdf_min).clamp(min=1e-12).log()))
    ours = discretized_gaussian_log_likelihood(x, means, log_scales)
    ordinary = clamped > math.log(1e-6)
    assert ordinary.sum() > 1500
    assert torch.allclose(ours[ordinary], clamped[ordinary], rtol=1e-7, atol=1e-9)


def test_discretized_decoder_is_exact_and_consistent_in_the_tails():
    # a mean 0.5 away with sigma e^-6: z is about 200, far beyond any clamp; every bin must follow the Gaussian
    # tail, log P ~ log(phi(z) dz), edge bins and interior bins alike (a clamp would stop interior bins at -27.6)
    sd = math.exp(-6.0)
    d = 0.5
    x = torch.tensor([-1.0, -1.0 + 40 / 127.5, 0.2, 1.0], dtype=torch.float64)
    for sign in (1.0, -1.0):
        means = x + sign * d
        logp = discretized_gaussian_log_likelihood(x, means, torch.full_like(x, math.log(sd)))
        assert torch.isfinite(logp).all()
        z_near = (d - 1 / 255) / sd  # the bin edge nearest the mean
        expected = -0.5 * z_near ** 2 - math.log(z_near * math.sqrt(2 * math.pi))  # Mills' ratio tail of Phi
        # the open-ended edge bin on the mean's side holds almost all the mass
        tail = slice(0, 3) if sign > 0 else slice(1, 4)
        assert torch.allclose(logp[tail], torch.full((3,), expected, dtype=torch.float64), rtol=1e-3)
        assert abs(float(logp[3 if sign > 0 else 0])) < 1e-12
    # float32 inputs give float32 outputs, still finite
    out = discretized_gaussian_log_likelihood(x.float(), (x + d).float(), torch.full((4,), -6.0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_normal_kl_closed_form_and_zero_for_equal():
    m1, m2, s1, s2 = 0.3, -0.4, 0.5, 1.7
    closed = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert normal_kl(t(m1), t(2 * math.log(s1)), t(m2), t(2 * math.log(s2))).item() == pytest.approx(closed, rel=1e-12)
    assert normal_kl(t(m1), t(0.3), t(m1), t(0.3)).item() == 0.0
    # Monte Carlo: E_p[log p - log q]
    gen = torch.Generator().manual_seed(0)
    x = m1 + s1 * torch.randn(400_000, generator=gen, dtype=torch.float64)
    log_ratio = (-((x - m1) / s1) ** 2 / 2 - math.log(s1)) - (-((x - m2) / s2) ** 2 / 2 - math.log(s2))
    assert log_ratio.mean().item() == pytest.approx(closed, abs=4 * log_ratio.std().item() / math.sqrt(x.numel()))


def test_learned_variance_interpolates_between_beta_tilde_and_beta():
    sched = NoiseSchedule.linear(100)
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 5, 99])
    lo = model_log_variance(sched, t, x, "learned_range", torch.full_like(x, -1.0))
    hi = model_log_variance(sched, t, x, "learned_range", torch.full_like(x, 1.0))
    mid = model_log_variance(sched, t, x, "learned_range", torch.zeros_like(x))
    assert torch.allclose(lo, model_log_variance(sched, t, x, "fixed_small"))
    assert torch.allclose(hi[1:], sched.betas[t[1:]].log().reshape(-1, 1, 1, 1).expand_as(x[1:]))
    assert torch.allclose(mid, (lo + hi) / 2)  # Eq. 15 is linear in the log domain
    large = model_log_variance(sched, t, x, "fixed_large")
    assert torch.allclose(large[1:], hi[1:]) and torch.allclose(large[0], lo[0])


def test_p_mean_variance_with_true_eps_gives_posterior_mean():
    sched = NoiseSchedule.cosine(50)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 3, 3, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 20, 49])
    x_t = sched.q_sample(x0, t, eps)
    out = p_mean_variance(sched, eps, x_t, t, "fixed_small", clip_denoised=False)
    mean, var, _ = sched.q_posterior_mean_variance(x0, x_t, t)
    assert torch.allclose(out["mean"], mean, atol=1e-10) and torch.allclose(out["pred_x0"], x0, atol=1e-10)
    # ... and so every KL term is 0 for the true noise and the true variance
    vb = vb_terms_bpd(sched, eps, x0, x_t, t, "fixed_small")
    assert torch.allclose(vb[1:], torch.zeros(3, dtype=torch.float64), atol=1e-9)


def test_prior_term_closed_form():
    sched = NoiseSchedule.linear(1000)
    x0 = torch.full((2, 5), 0.5, dtype=torch.float64)
    ab = sched.alpha_bar[-1].item()
    nats = 0.5 * (-math.log(1 - ab) + (1 - ab) + ab * 0.25 - 1)
    assert torch.allclose(prior_bpd(sched, x0), torch.full((2,), nats / math.log(2), dtype=torch.float64))


class OutputModel(torch.nn.Module):
    """A 'model' whose output is a free parameter, to inspect gradients on the output itself."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, x, t, y=None):
        return self.out


def test_hybrid_bound_term_sends_no_gradient_into_the_mean():
    sched = NoiseSchedule.linear(100)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 1, 4, 4, generator=gen) * 2 - 1
    t = torch.tensor([0, 1, 10, 40, 70, 99])
    noise = torch.randn(x0.shape, generator=gen)
    x_t = sched.q_sample(x0, t, noise)
    out = torch.randn(6, 2, 4, 4, generator=gen, requires_grad=True)
    vb_terms_bpd(sched, out, x0, x_t, t, "learned_range", detach_mean=True).sum().backward()
    assert torch.count_nonzero(out.grad[:, :1]) == 0  # no gradient into eps (the mean)
    assert torch.count_nonzero(out.grad[:, 1:]) > 0  # the variance channels learn from the bound
    # without the stop-gradient the bound does move the mean
    out.grad = None
    vb_terms_bpd(sched, out, x0, x_t, t, "learned_range").sum().backward()
    assert torch.count_nonzero(out.grad[:, :1]) > 0

    # in L_hybrid the mean's gradient is that of L_simple alone
    model = OutputModel(out.detach().clone())
    hybrid = training_losses(model, sched, x0, t, noise=noise, loss_type="hybrid")
    hybrid["loss"].sum().backward()
    grad_hybrid = model.out.grad.clone()
    model.out.grad = None
    training_losses(model, sched, x0, t, noise=noise, loss_type="simple")["loss"].sum().backward()
    assert torch.allclose(grad_hybrid[:, :1], model.out.grad[:, :1])
    assert torch.allclose(hybrid["loss"], hybrid["mse"] + 1e-3 * 100 * hybrid["vb"])


def test_simple_loss_is_zero_for_the_true_noise():
    sched = NoiseSchedule.linear(100)
    x0 = torch.zeros(4, 1, 2, 2)
    noise = torch.randn(x0.shape)
    losses = training_losses(OutputModel(noise.clone()), sched, x0, torch.tensor([0, 1, 2, 3]), noise=noise)
    assert torch.equal(losses["loss"], torch.zeros(4))


def test_training_losses_bad_input():
    sched = NoiseSchedule.linear(10)
    x0, t = torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="loss_type"):
        training_losses(OutputModel(torch.zeros(2, 1, 2, 2)), sched, x0, t, loss_type="l1")
    with pytest.raises(ValueError, match="learned variance"):
        training_losses(OutputModel(torch.zeros(2, 1, 2, 2)), sched, x0, t, loss_type="hybrid")
    with pytest.raises(ValueError, match="model output must have shape"):
        training_losses(OutputModel(torch.zeros(2, 3, 2, 2)), sched, x0, t)
    with pytest.raises(ValueError, match="var_type"):
        p_mean_variance(sched, torch.zeros(2, 1, 2, 2), x0, t, "fixed_medium")


def test_uniform_sampler_weights_are_one():
    t, w = UniformSampler(10).sample(1000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 9 and torch.equal(w, torch.ones(1000))


def test_importance_sampler_switches_on_after_history_and_stays_unbiased():
    T = 5
    sampler = ImportanceSampler(T, history=10)
    losses = torch.tensor([1.0, 2.0, 4.0, 8.0, 0.5], dtype=torch.float64)
    for k in range(10):
        assert not sampler.warmed_up()
        assert torch.allclose(sampler.weights(), torch.ones(T, dtype=torch.float64))
        sampler.update(torch.arange(T), losses)
    assert sampler.warmed_up()
    p = sampler.weights() / sampler.weights().sum()
    expected = losses / losses.sum() * (1 - 1e-3) + 1e-3 / T  # sqrt(E[L^2]) = L for constant losses
    assert torch.allclose(p, expected)
    # E_p[w(t) L_t] with w = 1 / (T p_t) equals the uniform mean of L_t
    assert torch.sum(p * losses / (T * p)).item() == pytest.approx(losses.mean().item())
    gen = torch.Generator().manual_seed(0)
    t, w = sampler.sample(200_000, generator=gen)
    freq = torch.bincount(t, minlength=T).double() / t.numel()
    assert torch.allclose(freq, p, atol=5e-3)
    assert (w.double() * losses[t]).mean().item() == pytest.approx(losses.mean().item(), rel=1e-2)
    # the ring keeps only the last `history` losses
    for _ in range(10):
        sampler.update(torch.tensor([0]), torch.tensor([3.0]))
    assert torch.equal(sampler.loss_history[0], torch.full((10,), 3.0, dtype=torch.float64))


def test_min_snr_weight_is_one_on_noisy_steps_and_gamma_over_snr_on_clean_ones():
    s = NoiseSchedule.linear(T=1000)
    t = torch.arange(1000)
    w = min_snr_weight(s, t, 5.0).double()
    snr = s.alpha_bar / (1 - s.alpha_bar)
    assert torch.allclose(w, torch.where(snr <= 5.0, torch.ones_like(snr), 5.0 / snr), rtol=1e-6)
    assert w[-1] == 1.0 and w[0] < 1e-3  # t = 0 is almost clean: SNR about 1e4
    # the x_0-space weight SNR * w is min(SNR, gamma): the clamp of Hang et al. (2023)
    assert torch.allclose(snr * w, snr.clamp(max=5.0), rtol=1e-6)
    with pytest.raises(ValueError, match="gamma must be a positive number"):
        min_snr_weight(s, t, 0.0)


@pytest.mark.parametrize("loss_type", ["simple", "hybrid"])
def test_min_snr_weights_only_the_eps_mse(loss_type):
    s = NoiseSchedule.cosine(T=50)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 2 if loss_type == "hybrid" else 1, 3, padding=1)
    model = lambda x, t, y=None: conv(x)  # noqa: E731
    x0, t, noise = torch.rand(6, 1, 4, 4) * 2 - 1, torch.tensor([0, 5, 10, 25, 40, 49]), torch.randn(6, 1, 4, 4)
    plain = training_losses(model, s, x0, t, noise=noise, loss_type=loss_type)
    weighted = training_losses(model, s, x0, t, noise=noise, loss_type=loss_type, snr_gamma=5.0)
    w = min_snr_weight(s, t, 5.0)
    assert torch.allclose(weighted["mse"], plain["mse"])  # the logged MSE stays the plain one
    bound = plain["loss"] - plain["mse"]  # zero for simple, lambda T L_t for hybrid
    assert torch.allclose(weighted["loss"], w * plain["mse"] + bound, atol=1e-6)
    assert not torch.allclose(weighted["loss"], plain["loss"])
