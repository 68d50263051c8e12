import math

import pytest
import torch

from ddpm.guidance import ClassifierGuidance
from ddpm.samplers import (Guidance, ddim_sample, ddim_step, ddpm_sample, p_sample_step, respaced, sample,
                           sample_in_batches)
from ddpm.schedule import NoiseSchedule, space_timesteps
from oracles import GaussianOracle

MU, S = 0.3, 0.2  # data x_0 ~ N(0.3, 0.2^2) in every dimension
N = 8_000


@pytest.fixture(scope="module")
def setup():
    sched = NoiseSchedule.linear(1000)
    return sched, GaussianOracle(sched, MU, S).double()


@pytest.fixture(scope="module", params=["linear", "cosine"])
def both(request):
    """The Gaussian oracle on each schedule of the book (T = 1000)."""
    sched = NoiseSchedule.from_name(request.param, 1000)
    return sched, GaussianOracle(sched, MU, S).double()


def _x_T(seed=0, n=N):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def propagate(sched, sampler, var_type="fixed_small", eta=0.0):
    """Exact mean and variance of x_0 produced from x_T ~ N(0, 1) by a sampler driven by the Gaussian oracle.

    For Gaussian data every reverse step is affine in x_t (plus independent noise), x_prev = a x_t + b + sigma z,
    so the moments follow m' = a m + b, v' = a^2 v + sigma^2, derived here independently of the sampler code.
    """
    ab = sched.alpha_bar.tolist()
    m, v = 0.0, 1.0
    for i in range(sched.T - 1, -1, -1):
        a_t, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)
        c = (1 - a_t) ** 0.5 / (a_t * S ** 2 + 1 - a_t)               # eps_hat = c (x - sqrt(a_t) mu)
        def x0_hat(x):
            return (x - (1 - a_t) ** 0.5 * c * (x - a_t ** 0.5 * MU)) / a_t ** 0.5
        if sampler == "ddim":
            sigma2 = eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            def step(x):
                return a_prev ** 0.5 * x0_hat(x) + (1 - a_prev - sigma2) ** 0.5 * c * (x - a_t ** 0.5 * MU)
        else:
            beta = 1 - a_t / a_prev
            coef1, coef2 = beta * a_prev ** 0.5 / (1 - a_t), (1 - a_prev) * (1 - beta) ** 0.5 / (1 - a_t)
            tilde = beta * (1 - a_prev) / (1 - a_t)
            sigma2 = 0.0 if i == 0 else (tilde if var_type == "fixed_small" else beta)
            def step(x):
                return coef1 * x0_hat(x) + coef2 * x
        b = step(0.0)
        a = step(1.0) - b
        m, v = a * m + b, a * a * v + sigma2
    return m, v ** 0.5


def _check(x0, mean, std):
    assert x0.mean().item() == pytest.approx(mean, abs=4 * std / N ** 0.5)
    assert x0.std().item() == pytest.approx(std, rel=0.03)


def test_full_chain_reproduces_the_data_distribution_in_moments(both):
    """The exact moments of the full ancestral chain bracket the data's spread, and the sampler draws them."""
    sched, oracle = both
    exact = {var_type: propagate(sched, "ddpm", var_type) for var_type in ("fixed_small", "fixed_large")}
    for mean, _ in exact.values():
        assert mean == pytest.approx(MU, abs=1e-3)
    # the two fixed variances are the two extremes of Ho et al. (Sec. 3.2): they bracket the data's spread
    (_, std_small), (_, std_large) = exact["fixed_small"], exact["fixed_large"]
    assert std_small < S < std_large
    assert std_small == pytest.approx(S, rel=0.025) and std_large == pytest.approx(S, rel=0.01)
    drawn = {}
    for var_type in exact:  # the same x_T and the same noise for both: the comparison is paired
        drawn[var_type] = ddpm_sample(oracle, sched, x_T=_x_T(), var_type=var_type, clip_denoised=False,
                                      generator=torch.Generator().manual_seed(1))
        _check(drawn[var_type], *exact[var_type])
    assert drawn["fixed_small"].std() < drawn["fixed_large"].std()


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_respaced_ancestral_sampling_matches_its_moments(both, var_type):
    sched, oracle = both
    x0 = ddpm_sample(oracle, sched, x_T=_x_T(), steps=50, var_type=var_type, clip_denoised=False,
                     generator=torch.Generator().manual_seed(2))
    _check(x0, *propagate(sched.respace("50"), "ddpm", var_type))


def test_ddim_is_deterministic_and_reproduces_the_data_distribution(both):
    sched, oracle = both
    a = ddim_sample(oracle, sched, x_T=_x_T(), clip_denoised=False, generator=torch.Generator().manual_seed(3))
    b = ddim_sample(oracle, sched, x_T=_x_T(), clip_denoised=False, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)  # eta = 0: no noise is drawn, x_T fixes x_0
    _check(a, MU, S)


@pytest.mark.parametrize("spacing, section", [("trailing", "trailing50"), ("leading", "ddim50")])
def test_ddim_few_steps_match_their_moments_and_improve_with_steps(both, spacing, section):
    sched, oracle = both
    x0 = ddim_sample(oracle, sched, x_T=_x_T(), steps=50, spacing=spacing, clip_denoised=False)
    _check(x0, *propagate(sched.respace(section), "ddim"))
    prefix = section[:-2]
    errors = [abs(propagate(sched.respace(f"{prefix}{k}"), "ddim")[1] - S) for k in (10, 50, 250, 1000)]
    assert errors == sorted(errors, reverse=True)  # the discretisation error shrinks with more steps


def test_leading_ddim_misses_the_signal_left_at_its_first_step():
    """On the cosine schedule the leading 10 steps start at t = 900, where sqrt(alpha_bar) = 15% of x_0 is left, from
    x_T ~ N(0, I): the mean of their x_0 falls short of the data's. The trailing steps start at T - 1 and do not."""
    sched = NoiseSchedule.cosine(1000)
    assert sched.sqrt_alpha_bar[900].item() > 0.15 > 1e-4 > sched.sqrt_alpha_bar[999].item()
    for k in (5, 10, 20):
        lead, trail = (propagate(sched.respace(f"{name}{k}"), "ddim")[0] for name in ("ddim", "trailing"))
        assert abs(trail - MU) < abs(lead - MU) / 20


def test_ddim_with_eta_one_is_stochastic_and_matches_its_moments(both):
    sched, oracle = both
    a = ddim_sample(oracle, sched, x_T=_x_T(), steps=50, eta=1.0, clip_denoised=False,
                    generator=torch.Generator().manual_seed(5))
    b = ddim_sample(oracle, sched, x_T=_x_T(), steps=50, eta=1.0, clip_denoised=False,
                    generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a, b)
    _check(a, *propagate(sched.respace("trailing50"), "ddim", eta=1.0))


def test_ddim_step_eta_one_equals_the_posterior_variance():
    """With eta = 1 and unit noise, DDIM's sigma_t^2 is beta-tilde_t (Song et al. 2021, Eq. 16)."""
    sched = NoiseSchedule.cosine(100)
    x_t, eps = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    for t in [1, 10, 60, 99]:
        noise = torch.ones(1, 1, dtype=torch.float64)
        out = ddim_step(sched, eps, x_t, t, t - 1, eta=1.0, noise=noise)
        assert out.item() == pytest.approx(sched.posterior_variance[t].sqrt().item(), rel=1e-10)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_step_to_x0_and_closed_form(name):
    sched = NoiseSchedule.from_name(name, 1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([999, 500, 20])
    x_t = sched.q_sample(x0, t, eps)
    assert torch.allclose(ddim_step(sched, eps, x_t, t, -1), x0, atol=1e-9)
    # with the true eps, a deterministic step lands exactly on q's mean path at t_prev with the same eps
    x_prev = ddim_step(sched, eps, x_t, t, t - 20)
    assert torch.allclose(x_prev, sched.q_sample(x0, t - 20, eps), atol=1e-9)
    with pytest.raises(ValueError, match="t_prev"):
        ddim_step(sched, eps, x_t, t, t)


@pytest.mark.parametrize("eta, clip", [(0.0, False), (1.0, False), (0.5, True)])
def test_ddim_step_computes_in_float64_and_returns_the_input_dtype(eta, clip):
    """A float32 step is the float64 step of the same float32 inputs, rounded once at the end."""
    sched = NoiseSchedule.cosine(1000)
    gen = torch.Generator().manual_seed(0)
    x_t, eps, noise = (torch.randn(64, 1, 4, 4, generator=gen) for _ in range(3))
    t = torch.randint(1, 1000, (64,), generator=gen)
    t_prev = t - torch.randint(1, 50, (64,), generator=gen).clamp(max=t + 1)  # -1 is "to x_0"
    got = ddim_step(sched, eps, x_t, t, t_prev, eta=eta, noise=noise, clip_denoised=clip)
    want = ddim_step(sched, eps.double(), x_t.double(), t, t_prev, eta=eta, noise=noise.double(), clip_denoised=clip)
    assert got.dtype == torch.float32 and torch.equal(got, want.float())


def test_trailing_spacing_starts_at_the_last_step_or_at_sigma_max():
    """Lin et al. (2024), Table 2: N steps T - 1, T - 1 - T/N, ..., T/N - 1, whether or not N divides T, with
    ``sigma_max=None``; by default the top step is the last one whose sigma is at most 80 (EDM's cap)."""
    for sched in (NoiseSchedule.cosine(1000), NoiseSchedule.linear(1000)):
        assert respaced(sched, 10, "ddim", sigma_max=None).timestep_map.tolist() == list(range(99, 1000, 100))
        assert torch.equal(respaced(sched, "trailing10", "ddpm").timestep_map,
                           respaced(sched, 10, "ddim", sigma_max=None).timestep_map)
        sigma = ((1 - sched.alpha_bar) / sched.alpha_bar).sqrt()
        top = int((sigma <= 80).sum()) - 1
        assert sigma[-1] > 80 and sigma[top] <= 80 < sigma[top + 1]  # both schedules reach beyond the cap
        for n in (10, 50, 51):
            kept = respaced(sched, n, "ddim").timestep_map
            assert len(kept) == n and kept[-1] == top  # 50 and 51 steps start at the same level
            gaps = set(kept.diff().tolist()) | {int(kept[0]) + 1}  # the last jump, to x_0, is as long as the others
            assert gaps <= {math.floor((top + 1) / n), math.ceil((top + 1) / n)}, (n, gaps)
    every = respaced(NoiseSchedule.cosine(1000), 1000, "ddim").timestep_map  # all the steps below the cap
    assert every.tolist() == list(range(len(every))) and len(every) < 1000


def test_capped_trailing_ddim_survives_an_imperfect_network_on_the_cosine_schedule():
    """Starting at T - 1 of the cosine schedule (sigma about 20,000) turns a small error of an epsilon prediction
    into a huge error of x_0, which nothing clips for latents; starting at sigma <= 80 keeps the samples bounded."""
    sched = NoiseSchedule.cosine(1000)
    oracle = GaussianOracle(sched, MU, S).double()

    def imperfect(x, t, y=None):  # the exact prediction, off by 1% of its own size
        return oracle(x, t, y) * 1.01

    x_T = _x_T(1, n=2000)
    capped = ddim_sample(imperfect, sched, x_T=x_T, steps=50, clip_denoised=False)
    uncapped = ddim_sample(imperfect, sched, x_T=x_T, steps=50, clip_denoised=False, sigma_max=None)
    assert abs(capped.mean().item() - MU) < 0.02 and abs(capped.std().item() - S) < 0.05  # data: 0.3 +- 0.2
    assert uncapped.std().item() > 3 * S  # the error made at sigma = 20,000 is not undone


def test_leading_spacing_keeps_the_openai_steps():
    """``spacing="leading"`` is the OpenAI code's ``"ddimN"`` stride (0, T/N, ..., T - T/N) where N divides T and its
    even spacing otherwise; ancestral sampling keeps that even spacing, which includes T - 1 and 0, either way."""
    sched = NoiseSchedule.cosine(1000)
    assert respaced(sched, 10, "ddim", "leading").timestep_map.tolist() == list(range(0, 1000, 100))
    assert respaced(sched, 50, "ddim", "leading").timestep_map.tolist() == space_timesteps(1000, "ddim50")
    assert respaced(sched, 51, "ddim", "leading").timestep_map.tolist() == space_timesteps(1000, 51)
    for spacing in ("trailing", "leading"):
        kept = respaced(sched, 10, "ddpm", spacing).timestep_map.tolist()
        assert kept == space_timesteps(1000, 10) and kept[0] == 0 and kept[-1] == 999
    assert respaced(sched, None, "ddim") is sched and respaced(sched, 1000, "ddim", "leading") is sched
    with pytest.raises(ValueError, match="spacing must be one of trailing, leading"):
        respaced(sched, 10, "ddim", "linspace")


def test_respaced_sampler_calls_the_model_with_original_timesteps(setup):
    sched, _ = setup
    seen = []

    def model(x, t, y=None):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    ddim_sample(model, sched, (2, 1), steps=50, device="cpu", sigma_max=None)
    assert seen == list(range(999, -1, -20))
    seen.clear()
    ddim_sample(model, sched, (2, 1), steps=50, device="cpu")  # capped at sigma 80: the same stride, lower
    assert seen == respaced(sched, 50, "ddim").timestep_map.flip(0).tolist() and seen[0] < 999
    seen.clear()
    ddim_sample(model, sched, (2, 1), steps=50, spacing="leading", device="cpu")
    assert seen == list(range(980, -1, -20))
    seen.clear()
    ddpm_sample(model, sched, (2, 1), steps="10", device="cpu")
    assert seen == sched.respace("10").timestep_map.flip(0).tolist() and len(seen) == 10


def test_callback_sees_every_step_with_predicted_x0(setup):
    sched, oracle = setup
    record = []
    sample(oracle, sched, x_T=_x_T(n=4), sampler="ddim", steps=25, clip_denoised=False, sigma_max=None,
           callback=lambda t, x_t, x0: record.append((t, x_t.shape, x0.shape)))
    assert [r[0] for r in record] == list(range(999, -1, -40))
    assert all(r[1] == (4, 1) and r[2] == (4, 1) for r in record)


class Logistic(torch.nn.Module):
    """A toy noise-aware classifier of two classes: logits (w_t x, 0) with w_t = 2 sqrt(alpha_bar_t), x [N, 1].

    log p(0 | x_t) = -softplus(-w x) and log p(1 | x_t) = -softplus(w x), so
    grad_x log p(y | x_t) = w sigmoid(-w x) for y = 0 and -w sigmoid(w x) for y = 1.
    """

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def weight(self, t):
        return 2 * self.schedule.sqrt_alpha_bar[t].reshape(-1, 1)

    def forward(self, x, t):
        return torch.cat([self.weight(t) * x, torch.zeros_like(x)], dim=1)

    def grad(self, x, t, y):
        w = self.weight(t)
        return torch.where(y.reshape(-1, 1) == 0, w * torch.sigmoid(-w * x), -w * torch.sigmoid(w * x))


def test_classifier_guidance_shifts_one_ancestral_step_by_sigma_times_the_gradient(setup):
    """Dhariwal & Nichol (2021), Algorithm 1: x_{t-1} ~ N(mu + s Sigma grad log p(y | x_t), Sigma). One respaced step
    of the sampler with the same noise, guided and not: the difference is s * beta-tilde * the closed-form gradient,
    with the classifier asked at the original timestep."""
    sched, oracle = setup
    clf, s = Logistic(sched), 3.0
    x_T, y = _x_T(n=64), torch.arange(64) % 2
    first = {}
    for name, guidance in (("plain", None), ("guided", ClassifierGuidance(clf, s))):
        seen = []
        ddpm_sample(oracle, sched, x_T=x_T, y=y, steps=20, var_type="fixed_small", clip_denoised=False,
                    guidance=guidance, generator=torch.Generator().manual_seed(7),
                    callback=lambda t, x, x0: seen.append((t, x.clone())))
        first[name] = seen[1][1]  # the state after one step from x_T
        t_start = seen[0][0]
    short = sched.respace("20")
    assert t_start == 999 and short.timestep_map[-1] == 999
    variance = short.posterior_variance[-1].item()  # beta-tilde of the respaced step from index 19 to 18
    want = s * variance * clf.grad(x_T, torch.full((64,), 999), y)
    assert torch.allclose(first["guided"] - first["plain"], want, rtol=1e-10, atol=1e-14)
    # the same shift from the visible one-step function, at a step whose variance is not tiny
    t = torch.full((64,), 10)
    noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    plain, guided = (p_sample_step(oracle, short, x_T, t, y=y, guidance=g, noise=noise, clip_denoised=False,
                                   var_type="fixed_small")["sample"] for g in (None, ClassifierGuidance(clf, s)))
    want = s * short.posterior_variance[10].item() * clf.grad(x_T, short.timestep_map[t], y)
    assert torch.allclose(guided - plain, want, rtol=1e-10, atol=1e-14) and want.abs().max() > 1e-3


def test_classifier_guidance_shifts_ddim_eps_by_its_closed_form(setup):
    """Dhariwal & Nichol (2021), Algorithm 2: eps_hat = eps - sqrt(1 - alpha_bar_t) s grad log p(y | x_t). One DDIM
    step with the oracle's eps, written out: x_prev = sqrt(ab_prev) (x - sqrt(1 - ab) eps_hat) / sqrt(ab)
    + sqrt(1 - ab_prev) eps_hat."""
    sched, oracle = setup
    clf, s = Logistic(sched), 2.0
    x, y = _x_T(n=64), torch.arange(64) % 2
    seen = []
    ddim_sample(oracle, sched, x_T=x, y=y, steps=10, clip_denoised=False, guidance=ClassifierGuidance(clf, s),
                callback=lambda t, x_t, x0: seen.append((t, x_t.clone())))
    for (t, x_t), (t_prev, x_prev) in zip(seen, seen[1:]):
        ab, ab_prev = sched.alpha_bar[t].item(), sched.alpha_bar[t_prev].item()
        eps = math.sqrt(1 - ab) * (x_t - math.sqrt(ab) * MU) / (ab * S ** 2 + 1 - ab)  # E[eps | x_t], Gaussian data
        eps_hat = eps - math.sqrt(1 - ab) * s * clf.grad(x_t, torch.full((64,), t), y)
        x0_hat = (x_t - math.sqrt(1 - ab) * eps_hat) / math.sqrt(ab)
        want = math.sqrt(ab_prev) * x0_hat + math.sqrt(1 - ab_prev) * eps_hat
        assert torch.allclose(x_prev, want, rtol=1e-10, atol=1e-12), t
    assert [t for t, _ in seen] == respaced(sched, 10, "ddim").timestep_map.flip(0).tolist()


def test_sampler_bad_input(setup):
    sched, oracle = setup
    with pytest.raises(ValueError, match="sampler"):
        sample(oracle, sched, (2, 2), sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        respaced(sched, 0, "ddim")
    with pytest.raises(ValueError, match="shape"):
        ddpm_sample(oracle, sched)


def test_sample_in_batches_is_the_batches_drawn_in_turn():
    sched = NoiseSchedule.linear(50)
    seen = []

    def model(x, t, y=None):
        seen.append(None if y is None else y.tolist())
        return 0.1 * x

    y = torch.arange(5)
    out = sample_in_batches(model, sched, (1, 2, 2), 5, batch_size=2, y=y, sampler="ddpm", steps=5,
                            generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    parts = [sample(model, sched, (b, 1, 2, 2), y=y[i: i + b], sampler="ddpm", steps=5, generator=gen)
             for i, b in ((0, 2), (2, 2), (4, 1))]
    assert out.shape == (5, 1, 2, 2) and torch.equal(out, torch.cat(parts))
    assert seen[0] == [0, 1] and seen[5] == [2, 3] and seen[10] == [4]  # each batch gets its own labels


def test_sample_in_batches_cuts_the_starting_noise_with_the_labels():
    """Batches of a given x_T give the run of the whole x_T (a deterministic sampler), and a wrong size is refused."""
    sched = NoiseSchedule.linear(50)
    x_T = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    model = lambda x, t, y=None: 0.1 * x + (0.0 if y is None else 0.01 * y.reshape(-1, 1, 1, 1))  # noqa: E731
    y = torch.arange(5)
    whole = sample(model, sched, x_T=x_T, y=y, sampler="dpm++2m", steps=4)
    parts = sample_in_batches(model, sched, (1, 2, 2), 5, batch_size=2, x_T=x_T, y=y, sampler="dpm++2m", steps=4)
    assert torch.allclose(parts, whole, atol=1e-6)
    with pytest.raises(ValueError, match="x_T must hold n=5"):
        sample_in_batches(model, sched, (1, 2, 2), 5, batch_size=2, x_T=x_T[:4], sampler="ddim", steps=4)
