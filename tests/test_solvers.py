"""Heun (Karras et al. 2022) and DPM-Solver++(2M) (Lu et al. 2022b), pinned to closed forms.

For Gaussian data N(MU, S^2) the exact noise predictor is known (``oracles.GaussianOracle``) and so is the
probability-flow ODE: in x_hat = x / sqrt(ab), sigma = sqrt((1 - ab) / ab), (x_hat - MU) / sqrt(S^2 + sigma^2)
is constant along it. The solvers must converge to that solution at their stated orders.
"""

import math

import pytest
import torch

from ddpm.analytic import GaussianMixtureEps, gaussian_ode_solution
from ddpm.guidance import ClassifierFreeGuidance
from ddpm.samplers import (SAMPLERS, ddim_sample, ddim_step, dpm_solver_sample, heun_sample, nfe, sample,
                           solver_timesteps)
from ddpm.schedule import NoiseSchedule
from oracles import GaussianOracle

MU, S = 0.3, 0.5
SCHED = NoiseSchedule.linear(1000)
ORACLE = GaussianOracle(SCHED, MU, S).double()


def _x_T(n=512, seed=0):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ode_error(sampler, steps, **kwargs):
    """Largest error of the state at the last visited step against the exact ODE from the first one."""
    seen = []
    sampler(ORACLE, SCHED, x_T=_x_T(), steps=steps, clip_denoised=False,
            callback=lambda t, x, x0: seen.append((t, x.clone())), **kwargs)
    (t0, x_first), (t1, x_last) = seen[0], seen[-1]
    exact = gaussian_ode_solution(x_first, SCHED.alpha_bar[t0], SCHED.alpha_bar[t1], MU, S)
    return (x_last - exact).abs().max().item()


@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "karras"])
@pytest.mark.parametrize("schedule", [NoiseSchedule.linear(1000), NoiseSchedule.cosine(1000), NoiseSchedule.linear(20)])
def test_solver_timesteps_are_strictly_decreasing_steps_of_the_schedule(schedule, spacing):
    for steps in (1, 2, 5, 17, schedule.T):
        idx = solver_timesteps(schedule, steps, spacing)
        assert idx.dtype == torch.long and len(idx) == steps
        assert idx[0] == schedule.T - 1 and (idx.diff() < 0).all() and idx[-1] >= 0
        if spacing != "uniform" and steps > 1:
            assert idx[-1] == 0


def test_solver_timesteps_follow_their_spacing():
    n = 10
    assert solver_timesteps(SCHED, n, "uniform").tolist() == [999 - 100 * k for k in range(n)]
    ab = SCHED.alpha_bar
    lam = 0.5 * torch.log(ab / (1 - ab))
    got = lam[solver_timesteps(SCHED, n, "logsnr")]
    want = torch.linspace(float(lam[-1]), float(lam[0]), n, dtype=torch.float64)
    step_size = (lam[:-1] - lam[1:]).abs()  # snapping moves a point by at most half a step of the schedule
    assert ((got - want).abs() <= step_size.max() / 2 + 1e-12).all()
    coord = ((1 - ab) / ab) ** (0.5 / 7.0)  # sigma^(1/rho), rho = 7: Karras et al. spread it evenly
    got = coord[solver_timesteps(SCHED, n, "karras")]
    want = torch.linspace(float(coord[-1]), float(coord[0]), n, dtype=torch.float64)
    assert ((got - want).abs() <= (coord[1:] - coord[:-1]).abs().max() / 2 + 1e-12).all()


def test_solver_timesteps_bad_input():
    with pytest.raises(ValueError, match="spacing"):
        solver_timesteps(SCHED, 10, "quadratic")
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            solver_timesteps(SCHED, bad, "logsnr")
    with pytest.raises(ValueError, match="order"):
        dpm_solver_sample(ORACLE, SCHED, x_T=_x_T(4), steps=5, order=3)


def test_nfe_counts_network_evaluations():
    calls = []

    def model(x, t, y=None):
        calls.append(1)
        return ORACLE(x, t)

    for name, steps in [("ddpm", 10), ("ddim", 20), ("heun", 6), ("dpm++2m", 7), ("heun", None), ("dpm++2m", None)]:
        calls.clear()
        sample(model, SCHED, x_T=_x_T(4), sampler=name, steps=steps, eta=0.0)
        assert len(calls) == nfe(name, steps)
    assert nfe("heun", 6) == 11 and nfe("ddpm", None) == 1000
    with pytest.raises(ValueError, match="sampler"):
        nfe("euler", 10)
    assert set(SAMPLERS) == {"ddpm", "ddim", "heun", "dpm++2m"}


def test_heun_is_the_trapezoid_rule_on_the_ode_in_sigma():
    """Two noise levels: one Euler step corrected by the slope at its end, then Euler to sigma = 0, by hand."""
    x = _x_T(8)
    i, j = solver_timesteps(SCHED, 2, "karras").tolist()
    ab = SCHED.alpha_bar.tolist()
    sig = [math.sqrt((1 - a) / a) for a in ab]

    def eps(x, k):  # E[eps | x_t] for N(MU, S^2) data
        return math.sqrt(1 - ab[k]) * (x - math.sqrt(ab[k]) * MU) / (ab[k] * S ** 2 + 1 - ab[k])

    xh = x / math.sqrt(ab[i])
    euler = xh + (sig[j] - sig[i]) * eps(x, i)
    xh_j = xh + (sig[j] - sig[i]) * 0.5 * (eps(x, i) + eps(math.sqrt(ab[j]) * euler, j))
    x_j = math.sqrt(ab[j]) * xh_j
    x_0 = xh_j - sig[j] * eps(x_j, j)
    got = heun_sample(ORACLE, SCHED, x_T=x, steps=2, clip_denoised=False)
    assert torch.allclose(got, x_0, atol=1e-12, rtol=0)


def test_heun_euler_stage_and_first_order_dpm_solver_step_are_ddim_steps():
    x = _x_T(8)
    for sampler, kwargs in [(dpm_solver_sample, {"order": 1}), (dpm_solver_sample, {"order": 2})]:
        seen = []
        sampler(ORACLE, SCHED, x_T=x, steps=3, spacing="uniform", clip_denoised=False,
                callback=lambda t, x_t, x0: seen.append((t, x_t.clone())), **kwargs)
        (t0, x0), (t1, x1) = seen[0], seen[1]
        assert torch.allclose(x1, ddim_step(SCHED, ORACLE(x0, torch.full((8,), t0)), x0, t0, t1), atol=1e-12)
    # Heun with one level is a single Euler step to sigma = 0: the DDIM step to x_0
    got = heun_sample(ORACLE, SCHED, x_T=x, steps=1, clip_denoised=False)
    assert torch.allclose(got, ddim_step(SCHED, ORACLE(x, torch.full((8,), 999)), x, 999, -1), atol=1e-12)


def test_samplers_converge_to_the_exact_ode_at_their_orders():
    """Halving the step size divides the error by about 2 (DDIM, first order) or 4 (Heun, DPM-Solver++(2M))."""
    cases = {
        "ddim": (ddim_sample, [25, 50, 100], {}, 1),
        "dpm++1": (dpm_solver_sample, [20, 40, 80], {"order": 1}, 1),
        "dpm++2m": (dpm_solver_sample, [20, 40, 80], {}, 2),
        "heun": (heun_sample, [10, 20, 40], {}, 2),
    }
    for name, (fn, steps, kwargs, order) in cases.items():
        errors = [ode_error(fn, n, **kwargs) for n in steps]
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        for r in ratios:
            assert 2 ** order * 0.75 < r < 2 ** order * 1.4, f"{name}: errors {errors}, ratios {ratios}"
        assert errors[-1] < 0.06 / order, f"{name}: errors {errors}"  # in units of x, data std 0.5


@pytest.mark.parametrize("sampler, steps", [("heun", 40), ("dpm++2m", 25)])
def test_solvers_reproduce_the_data_distribution(sampler, steps):
    x0 = sample(ORACLE, SCHED, x_T=_x_T(8000, seed=3), sampler=sampler, steps=steps, clip_denoised=False)
    assert x0.mean().item() == pytest.approx(MU, abs=0.02)
    assert x0.std().item() == pytest.approx(S, rel=0.03)


@pytest.mark.parametrize("sampler", ["heun", "dpm++2m"])
def test_classifier_free_guidance_works_through_the_solvers(sampler):
    """Guided solving equals solving with the combined eps, and guidance pushes class 0 away from class 1."""
    mix = GaussianMixtureEps(SCHED, [[-1.0, 0.0], [1.0, 0.0]], 0.3)
    w = 2.0

    def combined(x, t, y):
        return (1 + w) * mix(x, t, y) - w * mix(x, t, torch.full_like(y, 2))

    x_T = torch.randn(400, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(400, dtype=torch.long)
    kw = dict(x_T=x_T, y=y, sampler=sampler, steps=12, clip_denoised=False)
    guided = sample(mix, SCHED, guidance=ClassifierFreeGuidance(w), **kw)
    assert torch.allclose(guided, sample(combined, SCHED, **kw), atol=1e-10)
    plain = sample(mix, SCHED, guidance=ClassifierFreeGuidance(0.0), **kw)
    assert torch.allclose(plain, sample(mix, SCHED, **kw), atol=0)
    assert plain[:, 0].mean() == pytest.approx(-1.0, abs=0.06)
    assert guided[:, 0].mean() < plain[:, 0].mean() - 0.05


def test_solvers_clip_their_x0_prediction_and_keep_the_input_dtype():
    wide = GaussianOracle(SCHED, 0.0, 3.0).float()
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for sampler in ("heun", "dpm++2m"):
        seen = []
        out = sample(wide, SCHED, x_T=x_T, sampler=sampler, steps=6, callback=lambda t, x, x0: seen.append(x0))
        assert out.dtype == torch.float32 and out.shape == x_T.shape
        assert all(x0.abs().max() <= 1.0 for x0 in seen)
        assert out.abs().max() <= 1.0 + 1e-5
