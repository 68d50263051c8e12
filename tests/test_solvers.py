"""Heun (Karras et al. 2022) and DPM-Solver++(2M) (Lu et al. 2022b), pinned to closed forms.

For Gaussian data N(MU, S^2) the exact noise predictor is known (``oracles.GaussianOracle``) and so is the
probability-flow ODE: in x_hat = x / sqrt(ab), sigma = sqrt((1 - ab) / ab), (x_hat - MU) / sqrt(S^2 + sigma^2)
is constant along it. The solvers must converge to that solution at their stated orders, on the linear and the
cosine schedule.
"""

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
SCHEDULES = {name: NoiseSchedule.from_name(name, 1000) for name in ("linear", "cosine")}


def _x_T(n=512, seed=0):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sigmas(schedule):
    """The EDM noise level sigma = sqrt((1 - ab) / ab) of every step [T] (Karras et al. 2022)."""
    return ((1 - schedule.alpha_bar) / schedule.alpha_bar).sqrt()


def top_step(schedule, sigma_max):
    """The last step whose sigma is at most sigma_max, found by walking the steps (T - 1 without a cap)."""
    if sigma_max is None:
        return schedule.T - 1
    return max(t for t, sig in enumerate(sigmas(schedule).tolist()) if sig <= sigma_max)


def ode_error(sampler, steps, schedule=SCHED, **kwargs):
    """Largest error of the state at the last visited step against the exact ODE from the first one."""
    seen = []
    oracle = GaussianOracle(schedule, MU, S).double()
    sampler(oracle, schedule, x_T=_x_T(), steps=steps, clip_denoised=False,
            callback=lambda t, x, x0: seen.append((t, x.clone())), **kwargs)
    (t0, x_first), (t1, x_last) = seen[0], seen[-1]
    exact = gaussian_ode_solution(x_first, schedule.alpha_bar[t0], schedule.alpha_bar[t1], MU, S)
    return (x_last - exact).abs().max().item()


@pytest.mark.parametrize("sigma_max", [80.0, None])
@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "karras"])
@pytest.mark.parametrize("schedule", [NoiseSchedule.linear(1000), NoiseSchedule.cosine(1000), NoiseSchedule.linear(20)])
def test_solver_timesteps_are_strictly_decreasing_steps_of_the_schedule(schedule, spacing, sigma_max):
    top = schedule.T - 1 if spacing == "uniform" else top_step(schedule, sigma_max)
    for steps in (1, 2, 5, 17, top + 1):
        idx = solver_timesteps(schedule, steps, spacing, sigma_max)
        assert idx.dtype == torch.long and len(idx) == steps
        assert idx[0] == top and (idx.diff() < 0).all() and idx[-1] >= 0
        if spacing != "uniform" and steps > 1:
            assert idx[-1] == 0


@pytest.mark.parametrize("name, sigma_max", [("linear", 80.0), ("cosine", 80.0), ("linear", None)])
def test_solver_timesteps_follow_their_spacing(name, sigma_max):
    """Uniform in t from T - 1 (trailing); even in lambda = log(alpha / sigma) or in sigma^(1/7) from the top step
    (the last with sigma <= sigma_max) to step 0, each point snapped to the nearest step. (Without the cap the cosine
    schedule has too few steps near its top for the points crowded there, which are pushed apart instead.)"""
    sched, n = SCHEDULES[name], 10
    assert solver_timesteps(sched, n, "uniform", sigma_max).tolist() == [999 - 100 * k for k in range(n)]
    sig = sigmas(sched)[: top_step(sched, sigma_max) + 1]
    for spacing, coord in (("logsnr", -sig.log()), ("karras", sig ** (1 / 7.0))):
        got = coord[solver_timesteps(sched, n, spacing, sigma_max)]
        want = torch.linspace(float(coord[-1]), float(coord[0]), n, dtype=torch.float64)
        step_size = (coord[1:] - coord[:-1]).abs()  # snapping moves a point by at most half a step of the schedule
        assert ((got - want).abs() <= step_size.max() / 2 + 1e-12).all(), spacing


@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_solver_levels_start_at_sigma_max_80(name, spacing):
    """EDM's sigma_max = 80 (Karras et al. 2022): the first level is the step just below 80, none lies above it.
    Without the cap the cosine schedule (sigma_{T-1} about 20,000) spends many levels above it."""
    sched = SCHEDULES[name]
    sig = sigmas(sched)
    assert sig[-1] > 80
    for steps in (5, 18, 20):
        idx = solver_timesteps(sched, steps, spacing)
        first = int(idx[0])
        assert sig[first] <= 80 < sig[first + 1]  # within one step of the schedule of 80, from below
        assert (sig[idx] <= 80).all() and idx[-1] == 0
        uncapped = solver_timesteps(sched, steps, spacing, sigma_max=None)
        assert uncapped[0] == 999 and (sig[uncapped] > 80).sum() >= (1 if name == "linear" else steps // 3)
    assert (sig[solver_timesteps(sched, 18, spacing, sigma_max=10.0)] <= 10).all()


@pytest.mark.parametrize("fn", [heun_sample, dpm_solver_sample])
def test_the_solvers_pass_sigma_max_on(fn):
    """The first model call is at the top step of ``sigma_max``: 80 by default, T - 1 with None."""
    sched = SCHEDULES["cosine"]
    for sigma_max, top in ((80.0, top_step(sched, 80.0)), (None, 999), (5.0, top_step(sched, 5.0))):
        calls = []

        def model(x, t, y=None):
            calls.append(int(t[0]))
            return torch.zeros_like(x)

        kwargs = {} if sigma_max == 80.0 else {"sigma_max": sigma_max}
        fn(model, sched, x_T=_x_T(4), steps=6, **kwargs)
        assert calls[0] == top and max(calls) == top


def test_solver_timesteps_bad_input():
    with pytest.raises(ValueError, match="spacing"):
        solver_timesteps(SCHED, 10, "quadratic")
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            solver_timesteps(SCHED, bad, "logsnr")
    for bad in (0.0, -1.0, float("inf"), "80", True):
        with pytest.raises(ValueError, match="sigma_max must be a positive number"):
            solver_timesteps(SCHED, 10, "karras", sigma_max=bad)
    with pytest.raises(ValueError, match="sigma_max=0.001 lies below every noise level"):
        solver_timesteps(SCHED, 10, "karras", sigma_max=1e-3)
    with pytest.raises(ValueError, match="use fewer steps or sigma_max=None"):
        solver_timesteps(SCHED, 1000, "logsnr")
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


@pytest.mark.parametrize("spacing", ["karras", "uniform"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_heun_euler_stage_is_a_ddim_step(name, spacing):
    """Each Heun level first takes an Euler step, which is the eta = 0 DDIM step between the two levels; the sampler
    evaluates the model at that Euler point (and at the level itself), so a recording model sees every Euler stage."""
    sched = SCHEDULES[name]
    oracle = GaussianOracle(sched, MU, S).double()
    x_T = _x_T(8)
    for steps in (2, 3, 7, 18):
        calls = []

        def model(x, t, y=None):
            calls.append((int(t[0]), x.clone()))
            return oracle(x, t)

        out = heun_sample(model, sched, x_T=x_T, steps=steps, spacing=spacing, clip_denoised=False)
        assert len(calls) == 2 * steps - 1
        levels = solver_timesteps(sched, steps, spacing).tolist()
        for k, (i, j) in enumerate(zip(levels, levels[1:])):
            (t_i, x_i), (t_euler, x_euler) = calls[2 * k], calls[2 * k + 1]
            assert (t_i, t_euler) == (i, j)
            want = ddim_step(sched, oracle(x_i, torch.full((8,), i)), x_i, i, j)
            # float64 round-off only: from sigma = 20,000 (cosine, uniform) x_hat = x / sqrt(ab) cancels 1e-11 of x
            assert torch.allclose(x_euler, want, rtol=0, atol=1e-10), (steps, k)
        t_last, x_last = calls[-1]  # the last level is Euler only: one DDIM step to x_0
        assert torch.allclose(out, ddim_step(sched, oracle(x_last, torch.full((8,), t_last)), x_last, t_last, -1),
                              rtol=0, atol=1e-10)
    # one level: a single Euler step from the top level straight to x_0
    top = top_step(sched, 80.0) if spacing == "karras" else 999
    got = heun_sample(oracle, sched, x_T=x_T, steps=1, spacing=spacing, clip_denoised=False)
    assert torch.allclose(got, ddim_step(sched, oracle(x_T, torch.full((8,), top)), x_T, top, -1), rtol=0, atol=1e-10)


def test_first_order_dpm_solver_step_and_first_2m_step_are_ddim_steps():
    x = _x_T(8)
    for kwargs in ({"order": 1}, {"order": 2}):
        seen = []
        dpm_solver_sample(ORACLE, SCHED, x_T=x, steps=3, spacing="uniform", clip_denoised=False,
                          callback=lambda t, x_t, x0: seen.append((t, x_t.clone())), **kwargs)
        (t0, x0), (t1, x1) = seen[0], seen[1]
        assert torch.allclose(x1, ddim_step(SCHED, ORACLE(x0, torch.full((8,), t0)), x0, t0, t1), atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_samplers_converge_to_the_exact_ode_at_their_orders(name):
    """Halving the step size divides the error by about 2 (DDIM, first order) or 4 (Heun, DPM-Solver++(2M))."""
    cases = {
        "ddim": (ddim_sample, [25, 50, 100], {}, 1),
        "dpm++1": (dpm_solver_sample, [20, 40, 80], {"order": 1}, 1),
        "dpm++2m": (dpm_solver_sample, [20, 40, 80], {}, 2),
        "dpm++2m karras": (dpm_solver_sample, [20, 40, 80], {"spacing": "karras"}, 2),
        "heun": (heun_sample, [10, 20, 40], {}, 2),
        "heun logsnr": (heun_sample, [10, 20, 40], {"spacing": "logsnr"}, 2),
    }
    for case, (fn, steps, kwargs, order) in cases.items():
        errors = [ode_error(fn, n, SCHEDULES[name], **kwargs) for n in steps]
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        for r in ratios:
            assert 2 ** order * 0.75 < r < 2 ** order * 1.4, f"{case}: errors {errors}, ratios {ratios}"
        assert errors[-1] < 0.06 / order, f"{case}: errors {errors}"  # in units of x, data std 0.5


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("sampler, steps", [("heun", 40), ("dpm++2m", 25)])
def test_solvers_reproduce_the_data_distribution(sampler, steps, name):
    oracle = GaussianOracle(SCHEDULES[name], MU, S).double()
    x0 = sample(oracle, SCHEDULES[name], x_T=_x_T(8000, seed=3), sampler=sampler, steps=steps, clip_denoised=False)
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
