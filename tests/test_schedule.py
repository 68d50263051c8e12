import itertools
import math
import operator

import pytest
import torch

from ddpm.schedule import NoiseSchedule, cosine_betas, linear_betas, space_timesteps, trailing_timesteps


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.linear(T=1000)


def test_coefficients_are_float64_and_length_T(linear):
    for name in ["betas", "alphas", "alpha_bar", "alpha_bar_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]:
        arr = getattr(linear, name)
        assert arr.dtype == torch.float64 and arr.shape == (1000,), name


def test_linear_endpoints_and_monotone_alpha_bar(linear):
    assert linear.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert linear.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert (linear.alpha_bar[1:] < linear.alpha_bar[:-1]).all()
    # alpha_bar is the running product of the alphas
    assert linear.alpha_bar[9].item() == pytest.approx(math.prod(1 - b for b in linear.betas[:10].tolist()), rel=1e-12)
    assert linear.alpha_bar_prev[0] == 1.0 and torch.equal(linear.alpha_bar_prev[1:], linear.alpha_bar[:-1])


@pytest.mark.parametrize("T, s, max_beta", [(1000, 0.008, 0.999), (50, 0.008, 0.2), (200, 0.02, 0.999)])
def test_cosine_schedule_is_its_closed_form(T, s, max_beta):
    """Nichol & Dhariwal (2021), Eq. 17, with this package's 0-based index: step t runs from time t/T to (t + 1)/T, so
    beta_t = min(1 - f(t + 1) / f(t), max_beta) and alpha_bar_t = prod_{k <= t} (1 - beta_k), which is f(t + 1) / f(0)
    for as long as no beta has been clipped; f(u) = cos^2((u / T + s) / (1 + s) * pi / 2)."""
    sched = NoiseSchedule.cosine(T, s=s, max_beta=max_beta)
    f = [math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2 for u in range(T + 1)]
    betas = [min(1 - f[t + 1] / f[t], max_beta) for t in range(T)]
    assert sched.betas.tolist() == pytest.approx(betas, rel=1e-12, abs=1e-15)
    assert sched.alpha_bar.tolist() == pytest.approx(list(itertools.accumulate((1 - b for b in betas), operator.mul)),
                                                    rel=1e-12, abs=1e-300)
    clipped = [t for t in range(T) if 1 - f[t + 1] / f[t] > max_beta]
    assert clipped and clipped[-1] == T - 1 and sched.betas[-1].item() == max_beta  # f(T) = 0: the last beta is 1
    for t in range(clipped[0]):
        assert sched.alpha_bar[t].item() == pytest.approx(f[t + 1] / f[0], rel=1e-12)
    assert sched.alpha_bar[clipped[0]].item() > f[clipped[0] + 1] / f[0]  # clipping keeps some signal


def test_cosine_keeps_more_signal_than_linear_at_mid_t(linear):
    cos = NoiseSchedule.cosine(1000)
    assert (cos.snr()[300:900] > linear.snr()[300:900]).all()


def test_closed_form_equals_iterated_chain_exactly():
    """Mean and variance of q(x_t | x_0) by iterating x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps."""
    sched = NoiseSchedule.cosine(200)
    mean_coef, var = 1.0, 0.0
    for t in range(sched.T):
        a, b = sched.alphas[t].item(), sched.betas[t].item()
        mean_coef, var = math.sqrt(a) * mean_coef, a * var + b
        assert mean_coef == pytest.approx(sched.sqrt_alpha_bar[t].item(), rel=1e-10)
        assert var == pytest.approx(1 - sched.alpha_bar[t].item(), rel=1e-10)


def test_closed_form_equals_iterated_chain_statistically():
    sched = NoiseSchedule.from_name("linear", 100)
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(sched.T):
        x = sched.alphas[t].sqrt() * x + sched.betas[t].sqrt() * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        if t in (0, 9, 49, 99):
            tt = torch.full((n,), t, dtype=torch.long)
            closed = sched.q_sample(x0, tt, generator=gen)
            for sample in (x, closed):
                assert sample.mean().item() == pytest.approx(0.7 * sched.sqrt_alpha_bar[t].item(), abs=5e-3)
                assert sample.var().item() == pytest.approx(1 - sched.alpha_bar[t].item(), rel=2e-2, abs=1e-5)


def test_posterior_equals_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from the product of the two Gaussians, once in closed form, once on a grid."""
    sched = NoiseSchedule.linear(1000)
    x0, x_t = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.5]], dtype=torch.float64)
    for t in [1, 10, 500, 999]:
        ab_prev, a, b = sched.alpha_bar[t - 1].item(), sched.alphas[t].item(), sched.betas[t].item()
        # prior x_{t-1} | x_0 ~ N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood x_t | x_{t-1} ~ N(sqrt(a) x_{t-1}, b)
        precision = 1 / (1 - ab_prev) + a / b
        mean = (math.sqrt(ab_prev) * 0.3 / (1 - ab_prev) + math.sqrt(a) * -0.5 / b) / precision
        tt = torch.tensor([t])
        m, v, logv = sched.q_posterior_mean_variance(x0, x_t, tt)
        assert m.item() == pytest.approx(mean, rel=1e-9)
        assert v.item() == pytest.approx(1 / precision, rel=1e-9)
        assert logv.item() == pytest.approx(math.log(1 / precision), rel=1e-9)
        # the same moments from the unnormalised density on a grid
        sd = math.sqrt(1 / precision)
        grid = torch.linspace(mean - 12 * sd, mean + 12 * sd, 200_001, dtype=torch.float64)
        logp = (-(grid - math.sqrt(ab_prev) * 0.3) ** 2 / (2 * (1 - ab_prev))
                - (-0.5 - math.sqrt(a) * grid) ** 2 / (2 * b))
        w = torch.exp(logp - logp.max())
        w = w / w.sum()
        grid_mean = (w * grid).sum().item()
        assert grid_mean == pytest.approx(m.item(), abs=1e-6 * max(1.0, abs(mean)))
        assert (w * (grid - grid_mean) ** 2).sum().item() == pytest.approx(v.item(), rel=1e-5)


def test_posterior_variance_clipped_at_zero():
    sched = NoiseSchedule.linear(1000)
    assert sched.posterior_variance[0].item() == 0.0
    assert sched.posterior_log_variance_clipped[0] == sched.posterior_log_variance_clipped[1]


def test_x0_eps_round_trip_and_snr(linear):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 5, 100, 400, 700, 998, 999])
    x_t = linear.q_sample(x0, t, eps)
    assert torch.allclose(linear.predict_x0_from_eps(x_t, t, eps), x0, atol=1e-8)
    assert torch.allclose(linear.predict_eps_from_x0(x_t, t, x0), eps, atol=1e-8)
    snr = linear.snr()
    assert torch.allclose(snr, linear.alpha_bar / (1 - linear.alpha_bar)) and (snr[1:] < snr[:-1]).all()


def test_space_timesteps_matches_openai_semantics():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    first, second, third = kept[:10], kept[10:25], kept[25:]
    assert first[0] == 0 and first[-1] == 99 and max(first) < 100
    assert second[0] == 100 and second[-1] == 199
    assert third[0] == 200 and third[-1] == 299
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, "1") == [0]


def test_trailing_timesteps_end_at_the_last_step():
    """Lin et al. (2024): T - 1, T - 1 - T/N, ..., T/N - 1, rounded; evenly spread whether or not N divides T."""
    assert space_timesteps(1000, "trailing10") == trailing_timesteps(1000, 10) == list(range(99, 1000, 100))
    assert space_timesteps(1000, "trailing1000") == list(range(1000))
    assert space_timesteps(1000, "trailing1") == [999]
    for T, n in ((1000, 51), (1000, 3), (37, 5), (10, 10)):
        kept = trailing_timesteps(T, n)
        assert len(kept) == n and kept[-1] == T - 1 and kept == sorted(set(kept))
        exact = [T - 1 - k * T / n for k in range(n)][::-1]
        assert all(abs(a - b) <= 0.5 for a, b in zip(kept, exact))


@pytest.mark.parametrize("counts", ["ddim50", "ddim25", "trailing50", "trailing51", "10", "50", "100", "5,10,20"])
def test_respacing_keeps_alpha_bar(counts):
    for base in (NoiseSchedule.linear(1000), NoiseSchedule.cosine(1000)):
        r = base.respace(counts)
        kept = r.timestep_map
        # float64 round-off only: 1 - beta loses digits where beta is close to 1 (the end of the cosine schedule)
        assert torch.allclose(r.alpha_bar, base.alpha_bar[kept], rtol=1e-8, atol=0)
        assert ((r.betas > 0) & (r.betas < 1)).all()
        # respacing a respaced schedule by "all of it" changes nothing
        assert torch.equal(r.respace(str(r.T)).timestep_map, kept)


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="T must"):
        NoiseSchedule.linear(T=0)
    with pytest.raises(ValueError, match="beta_end"):
        linear_betas(10, 1e-4, 1.5)
    with pytest.raises(ValueError, match="beta_start"):
        linear_betas(10, 0.0, 0.02)
    with pytest.raises(ValueError, match="s must"):
        cosine_betas(10, s=-0.1)
    with pytest.raises(ValueError, match="max_beta"):
        cosine_betas(10, max_beta=1.0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule(torch.tensor([0.1, 1.2]))
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule.from_name("quadratic", 10)
    sched = NoiseSchedule.linear(10)
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T-1\] = \[0, 9\]"):
        sched.q_sample(x, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="t must have shape"):
        sched.q_sample(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        sched.q_sample(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="noise must"):
        sched.q_sample(x, torch.tensor([0, 1]), torch.zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match="section_counts"):
        sched.respace("ddim11")
    with pytest.raises(ValueError, match="section_counts"):
        sched.respace("0")
    with pytest.raises(ValueError, match=r"'trailing11': N must lie in \[1, T=10\]"):
        sched.respace("trailing11")
    with pytest.raises(ValueError, match="expected 'trailingN' with an integer N"):
        sched.respace("trailingx")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_v_parameterisation_converts_to_x0_and_eps_and_back(name):
    """v = sqrt(ab) eps - sqrt(1 - ab) x_0 (Salimans & Ho 2022); with x_t it gives back x_0 and eps."""
    sched = NoiseSchedule.from_name(name, 1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    x_t = sched.q_sample(x0, t, eps)
    v = sched.v_from_x0_eps(x0, eps, t)
    assert torch.allclose(sched.predict_x0_from_v(x_t, t, v), x0, atol=1e-9)
    assert torch.allclose(sched.predict_eps_from_v(x_t, t, v), eps, atol=1e-9)
    # x_t and v are a rotation of (x_0, eps) by the angle phi with cos phi = sqrt(ab)
    assert torch.allclose(x_t ** 2 + v ** 2, x0 ** 2 + eps ** 2, atol=1e-9)
    assert torch.allclose(sched.predict_x0_from_eps(x_t, t, sched.predict_eps_from_v(x_t, t, v)), x0, atol=1e-9)
