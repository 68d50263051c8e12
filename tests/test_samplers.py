import pytest
import torch

from ddpm.samplers import Guidance, ddim_sample, ddim_step, ddpm_sample, respaced, sample, sample_in_batches
from ddpm.schedule import NoiseSchedule
from oracles import GaussianOracle

MU, S = 0.3, 0.2  # data x_0 ~ N(0.3, 0.2^2) in every dimension
N = 8_000


@pytest.fixture(scope="module")
def setup():
    sched = NoiseSchedule.linear(1000)
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


def test_full_chain_reproduces_the_data_distribution_in_moments(setup):
    sched, _ = setup
    mean_small, std_small = propagate(sched, "ddpm", "fixed_small")
    mean_large, std_large = propagate(sched, "ddpm", "fixed_large")
    mean_ddim, std_ddim = propagate(sched, "ddim")
    for mean in (mean_small, mean_large, mean_ddim):
        assert mean == pytest.approx(MU, abs=1e-3)
    # the two fixed variances are the two extremes of Ho et al. (Sec. 3.2): they bracket the data's spread
    assert std_small < S < std_large
    assert std_small == pytest.approx(S, rel=0.025) and std_large == pytest.approx(S, rel=0.01)
    assert std_ddim == pytest.approx(S, rel=0.01)


def test_ancestral_sampling_reproduces_the_data_distribution(setup):
    sched, oracle = setup
    x0 = ddpm_sample(oracle, sched, x_T=_x_T(), clip_denoised=False, generator=torch.Generator().manual_seed(1))
    _check(x0, MU, S)


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_respaced_ancestral_sampling_matches_its_moments(setup, var_type):
    sched, oracle = setup
    x0 = ddpm_sample(oracle, sched, x_T=_x_T(), steps=50, var_type=var_type, clip_denoised=False,
                     generator=torch.Generator().manual_seed(2))
    _check(x0, *propagate(sched.respace("50"), "ddpm", var_type))


def test_ddim_is_deterministic_and_reproduces_the_data_distribution(setup):
    sched, oracle = setup
    a = ddim_sample(oracle, sched, x_T=_x_T(), clip_denoised=False, generator=torch.Generator().manual_seed(3))
    b = ddim_sample(oracle, sched, x_T=_x_T(), clip_denoised=False, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)  # eta = 0: no noise is drawn, x_T fixes x_0
    _check(a, MU, S)


def test_ddim_few_steps_match_their_moments_and_improve_with_steps(setup):
    sched, oracle = setup
    x0 = ddim_sample(oracle, sched, x_T=_x_T(), steps=50, clip_denoised=False)
    _check(x0, *propagate(sched.respace("ddim50"), "ddim"))
    errors = [abs(propagate(sched.respace(f"ddim{k}"), "ddim")[1] - S) for k in (10, 50, 250, 1000)]
    assert errors == sorted(errors, reverse=True)  # the discretisation error shrinks with more steps


def test_ddim_with_eta_one_is_stochastic_and_matches_its_moments(setup):
    sched, oracle = setup
    a = ddim_sample(oracle, sched, x_T=_x_T(), steps=50, eta=1.0, clip_denoised=False,
                    generator=torch.Generator().manual_seed(5))
    b = ddim_sample(oracle, sched, x_T=_x_T(), steps=50, eta=1.0, clip_denoised=False,
                    generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a, b)
    _check(a, *propagate(sched.respace("ddim50"), "ddim", eta=1.0))


def test_ddim_step_eta_one_equals_the_posterior_variance():
    """With eta = 1 and unit noise, DDIM's sigma_t^2 is beta-tilde_t (Song et al. 2021, Eq. 16)."""
    sched = NoiseSchedule.cosine(100)
    x_t, eps = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    for t in [1, 10, 60, 99]:
        noise = torch.ones(1, 1, dtype=torch.float64)
        out = ddim_step(sched, eps, x_t, t, t - 1, eta=1.0, noise=noise)
        assert out.item() == pytest.approx(sched.posterior_variance[t].sqrt().item(), rel=1e-10)


def test_ddim_step_to_x0_and_closed_form():
    sched = NoiseSchedule.linear(1000)
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


def test_respaced_sampler_calls_the_model_with_original_timesteps(setup):
    sched, _ = setup
    seen = []

    def model(x, t, y=None):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    ddim_sample(model, sched, (2, 1), steps=50, device="cpu")
    assert seen == list(range(980, -1, -20))
    seen.clear()
    ddpm_sample(model, sched, (2, 1), steps="10", device="cpu")
    assert seen == sched.respace("10").timestep_map.flip(0).tolist() and len(seen) == 10


def test_callback_sees_every_step_with_predicted_x0(setup):
    sched, oracle = setup
    record = []
    sample(oracle, sched, x_T=_x_T(n=4), sampler="ddim", steps=25, clip_denoised=False,
           callback=lambda t, x_t, x0: record.append((t, x_t.shape, x0.shape)))
    assert [r[0] for r in record] == list(range(960, -1, -40))
    assert all(r[1] == (4, 1) and r[2] == (4, 1) for r in record)


def test_guidance_hook_shifts_the_mean_and_eps(setup):
    """A constant cond_grad g shifts the ancestral mean by Sigma g and DDIM's eps by -sqrt(1 - ab) g."""
    sched, oracle = setup

    class Constant(Guidance):
        def cond_grad(self, x, t, y):
            return torch.full_like(x, 0.5)

    x_T = _x_T(n=256)
    plain = ddim_sample(oracle, sched, x_T=x_T, steps=20, clip_denoised=False)
    guided = ddim_sample(oracle, sched, x_T=x_T, steps=20, clip_denoised=False, guidance=Constant())
    assert guided.mean() > plain.mean() + 0.05
    g = torch.Generator().manual_seed(0)
    plain = ddpm_sample(oracle, sched, x_T=x_T, steps=20, clip_denoised=False, generator=g)
    g = torch.Generator().manual_seed(0)
    guided = ddpm_sample(oracle, sched, x_T=x_T, steps=20, clip_denoised=False, generator=g, guidance=Constant())
    assert guided.mean() > plain.mean() + 0.05


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
