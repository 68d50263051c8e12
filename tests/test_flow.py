"""Flow matching (``ddpm.flow``): the conditional target against the exact marginal velocity, the samplers against
the exact ODE map at their orders, the conversions, DDIM as the linear path's Euler step, guidance, straightness,
reflow, the configuration and the command line."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import ddpm.__main__ as cli
from ddpm import NoiseSchedule, get_preset
from ddpm.analytic import GaussianMixtureEps, GaussianMixtureVelocity, edm_sigma, linear_ode_solution
from ddpm.flow import (FLOW_METHODS, FLOW_TIME_SCALE, eps_from_velocity, flow_losses, flow_nfe, flow_sample,
                       flow_sigma, flow_time, flow_trajectory, interpolate, reflow_pairs, sample_flow_times,
                       straightness, v_from_velocity, velocity, velocity_from_eps, velocity_from_v, velocity_from_x0,
                       x0_from_velocity)
from ddpm.guidance import ClassifierFreeGuidance
from ddpm.samplers import ddim_step
from ddpm.train import TrainConfig, Trainer

torch.set_num_threads(1)

MEANS = [[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]]
STDS = [0.3, 0.5, 0.2]
WEIGHTS = [0.2, 0.5, 0.3]


def _net_time(t: float, n: int) -> torch.Tensor:
    return torch.full((n,), t * FLOW_TIME_SCALE, dtype=torch.float64)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.85])
def test_the_conditional_target_averages_to_the_exact_marginal_velocity(t):
    """E[(eps - x_0) - u(x_t) | x_t] = 0 is equivalent to E[((eps - x_0) - u(x_t)) phi(x_t)] = 0 for every test
    function phi: checked for eight of them within 4.5 standard errors, and a velocity of the wrong mixture fails."""
    g = torch.Generator().manual_seed(0)
    model = GaussianMixtureVelocity(MEANS, STDS, WEIGHTS)
    wrong = GaussianMixtureVelocity(MEANS, [1.5 * s for s in STDS], WEIGHTS)  # the wrong widths
    n = 400_000
    x0 = model.sample_data(n, g).double()
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x_t = interpolate(x0, eps, t)
    phis = torch.stack([torch.ones(n), x_t[:, 0], x_t[:, 1], x_t[:, 0] * x_t[:, 1], torch.sin(2 * x_t[:, 0]),
                        torch.cos(2 * x_t[:, 1]), torch.tanh(x_t.sum(1)), (-(x_t ** 2).sum(1) / 4).exp()], 1)

    def worst_z(m):
        residual = (eps - x0) - m(x_t, _net_time(t, n))
        prod = (residual.unsqueeze(1) * phis.unsqueeze(2)).reshape(n, -1)  # [n, 8 phi x 2 dims]
        return (prod.mean(0) / (prod.std(0) / math.sqrt(n))).abs().max().item()

    assert worst_z(model) < 4.5
    assert worst_z(wrong) > 10


def test_the_flow_loss_is_lowest_at_the_exact_velocity():
    """The conditional flow matching loss differs from the marginal one by a constant (Lipman et al. 2023), so the
    exact marginal velocity beats any other field, here a slightly perturbed one."""
    g = torch.Generator().manual_seed(1)
    model = GaussianMixtureVelocity(MEANS, STDS, WEIGHTS)

    class Shifted(torch.nn.Module):
        def forward(self, x, t, y=None):
            return model(x, t, y) + 0.05 * torch.sin(x)

    x0 = model.sample_data(200_000, g).double()
    eps = torch.randn_like(x0)
    t = sample_flow_times(len(x0), generator=g).double()
    exact = flow_losses(model, x0, t, noise=eps)["loss"]
    shifted = flow_losses(Shifted(), x0, t, noise=eps)["loss"]
    diff = shifted - exact
    assert diff.mean() > 5 * diff.std() / math.sqrt(len(diff))


def test_time_distributions():
    g = torch.Generator().manual_seed(2)
    u = sample_flow_times(100_000, "uniform", generator=g)
    ln = sample_flow_times(100_000, "logit-normal", generator=g)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1) < 0.02
    with pytest.raises(ValueError, match="distribution must be one of"):
        sample_flow_times(3, "beta")


def test_conversions_between_velocity_eps_x0_and_v():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    x_t = interpolate(x0, eps, t)
    u = eps - x0
    torch.testing.assert_close(x0_from_velocity(x_t, u, t), x0)
    torch.testing.assert_close(eps_from_velocity(x_t, u, t), eps)
    torch.testing.assert_close(velocity_from_eps(x_t, eps, t), u)
    torch.testing.assert_close(velocity_from_x0(x_t, x0, t), u)
    # the VP point with the same SNR: z = x_t / r = cos(phi) x_0 + sin(phi) eps, v = cos(phi) eps - sin(phi) x_0
    r = ((1 - t) ** 2 + t ** 2).sqrt().unsqueeze(1)
    cos, sin = ((1 - t) / r.squeeze(1)).unsqueeze(1), (t / r.squeeze(1)).unsqueeze(1)
    torch.testing.assert_close(x_t / r, cos * x0 + sin * eps)
    torch.testing.assert_close(v_from_velocity(x_t, u, t), cos * eps - sin * x0)
    torch.testing.assert_close(velocity_from_v(x_t, cos * eps - sin * x0, t), u)
    # flow time of a VP alpha_bar: the same EDM sigma, and x_t / (1 - t) = x_0 + sigma eps
    ab = NoiseSchedule.linear(T=1000).alpha_bar
    torch.testing.assert_close(flow_sigma(flow_time(ab)), edm_sigma(ab))
    torch.testing.assert_close(x_t / (1 - t).unsqueeze(1), x0 + flow_sigma(t).unsqueeze(1) * eps)


def test_an_euler_step_of_the_linear_path_is_a_ddim_step():
    """With the same eps prediction, one Euler step of the linear path's ODE between the flow times of two VP steps
    is DDIM's step (eta = 0) between them, after the change of scale x_flow = x_vp (1 - t) / sqrt(alpha_bar)."""
    s = NoiseSchedule.linear(T=1000)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 2, generator=g, dtype=torch.float64)
    ab = s.alpha_bar
    for i, j in ((999, 700), (500, 480), (120, 3)):
        t_i, t_j = float(flow_time(ab[i])), float(flow_time(ab[j]))
        x_flow = x * (1 - t_i) / ab[i].sqrt()
        x_flow_next = x_flow + (t_j - t_i) * velocity_from_eps(x_flow, eps, t_i)
        ddim = ddim_step(s, eps, x, i, j)
        torch.testing.assert_close(x_flow_next * ab[j].sqrt() / (1 - t_j), ddim, rtol=1e-10, atol=1e-10)


def _orders(method, x1, exact, model, steps):
    errors = [(flow_sample(model, x_1=x1, steps=k, method=method) - exact).pow(2).mean().sqrt().item() for k in steps]
    return np.polyfit(np.log([flow_nfe(method, k) for k in steps]), np.log(errors), 1)[0], errors


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_samplers_converge_to_the_exact_ode_map_at_their_order(method, order):
    """Gaussian data N(0.5, 0.7^2): the exact ODE map is known in closed form (``linear_ode_solution``)."""
    model = GaussianMixtureVelocity([[0.5]], stds=0.7)
    x1 = torch.randn(500, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = linear_ode_solution(x1, 1.0, 0.0, 0.5, 0.7)
    slope, errors = _orders(method, x1, exact, model, (16, 32, 64, 128))
    assert -slope > order - 0.15, (slope, errors)
    assert errors[-1] < (2e-2 if order == 1 else 1e-4)


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_samplers_converge_on_a_mixture_at_their_order(method, order):
    """A three-component mixture (a curved ODE): errors against 4,096 midpoint steps fall at the method's order."""
    model = GaussianMixtureVelocity(MEANS, 0.5, WEIGHTS)
    x1 = torch.randn(300, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    reference = flow_sample(model, x_1=x1, steps=4096, method="midpoint")
    slope, errors = _orders(method, x1, reference, model, (32, 64, 128, 256))
    assert abs(-slope - order) < 0.3, (slope, errors)


def test_classifier_free_guidance_through_the_flow_samplers_samples_the_combined_velocity():
    model = GaussianMixtureVelocity(MEANS, STDS, WEIGHTS)
    w = 1.5

    class Combined(torch.nn.Module):
        def forward(self, x, t, y=None):
            return (1 + w) * model(x, t, y) - w * model(x, t, torch.full_like(y, 3))

    x1 = torch.randn(40, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = torch.arange(40) % 3
    for method in FLOW_METHODS:
        guided = flow_sample(model, x_1=x1, y=y, steps=6, method=method, guidance=ClassifierFreeGuidance(w))
        torch.testing.assert_close(guided, flow_sample(Combined(), x_1=x1, y=y, steps=6, method=method))
        # guidance changes the samples: the test would fail on a hook that ignored w
        assert (guided - flow_sample(model, x_1=x1, y=y, steps=6, method=method)).abs().max() > 0.05


def test_flow_samplers_refuse_classifier_guidance_and_bad_arguments():
    from ddpm.guidance import ClassifierGuidance

    model = GaussianMixtureVelocity(MEANS)

    class Classifier(torch.nn.Module):
        config = None

        def forward(self, x, t):
            return torch.zeros(x.shape[0], 3, dtype=x.dtype) + x.sum(1, keepdim=True)

    with pytest.raises(ValueError, match="classifier-free guidance"):
        flow_sample(model, (2, 2), steps=2, y=torch.zeros(2, dtype=torch.long),
                    guidance=ClassifierGuidance(Classifier(), 1.0))
    with pytest.raises(ValueError, match="method must be one of"):
        flow_sample(model, (2, 2), steps=2, method="rk4")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        flow_sample(model, (2, 2), steps=0)
    assert [flow_nfe(m, 5) for m in FLOW_METHODS] == [5, 10, 10]


def test_callback_and_trajectory():
    model = GaussianMixtureVelocity(MEANS, STDS, WEIGHTS)
    x1 = torch.randn(10, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    seen = []
    out = flow_sample(model, x_1=x1, steps=4, callback=lambda t, x, x0: seen.append((t, x.clone(), x0)))
    assert [t for t, _, _ in seen] == [1.0, 0.75, 0.5, 0.25]
    torch.testing.assert_close(seen[0][1], x1)
    torch.testing.assert_close(seen[0][2], x0_from_velocity(x1, velocity(model, x1, 1.0), 1.0))
    times, states = flow_trajectory(model, x1, 4)
    assert times.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and states.shape == (5, 10, 2)
    torch.testing.assert_close(states[-1], out)


def test_straightness_of_a_line_and_of_a_quarter_circle():
    times = torch.linspace(1, 0, 2001, dtype=torch.float64)
    line = (0.3 + 2 * times).reshape(-1, 1, 1) * torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert straightness(times, line).abs().max() < 1e-20
    angle = (1 - times) * math.pi / 2  # from (1, 0) at t = 1 to (0, 1) at t = 0 at constant speed pi / 2
    circle = torch.stack([angle.cos(), angle.sin()], -1).unsqueeze(1)
    # int_0^1 ||x' - (x_end - x_start)||^2 dt = pi^2 / 4 - 2, averaged over the 2 dimensions
    torch.testing.assert_close(straightness(times, circle), torch.tensor([(math.pi ** 2 / 4 - 2) / 2],
                                                                         dtype=torch.float64), rtol=1e-5, atol=0)
    # a straight path at varying speed is not straight in Liu et al.'s sense
    assert straightness(times, (times ** 3).reshape(-1, 1, 1) * torch.ones(1, 1, 2)).item() > 0.1
    with pytest.raises(ValueError, match="must match"):
        straightness(times[:3], circle)


def test_a_flow_trained_on_a_deterministic_coupling_is_straight():
    """Reflow's principle end to end: a network trained on pairs x_1 = 2 x_0 + 1 learns the constant-along-lines
    velocity x_1 - x_0, so its ODE maps x_1 to (x_1 - 1) / 2 along nearly straight paths."""
    from ddpm.data import load_dataset

    config = dataclasses.replace(get_preset("toy2d"), objective="flow", steps=600, warmup_steps=20, ema_decay=0.99,
                                 reflow=None)
    x0, _ = load_dataset("swiss_roll", split="train", seed=0)
    x0 = x0[:4000]
    pairs = TrainConfig.from_dict({**config.to_dict(), "name": "coupled", "reflow": {
        "parent": config.to_dict(), "pairs": 4000, "steps": 1, "method": "euler", "seed": 0}})
    trainer = Trainer(pairs, data=(x0, None, 2 * x0 + 1), progress=False).fit()
    x1 = 2 * x0[:500] + 1
    times, states = flow_trajectory(trainer.ema, x1, 20)
    assert (states[-1] - x0[:500]).pow(2).mean().sqrt() < 0.15
    # the independent coupling's velocity field is far from straight; this one's trajectories nearly are
    assert straightness(times, states).mean() < 0.01


def test_a_flow_is_refused_by_the_shared_ddim_sets(flow_ckpt):
    from ddpm.cache import cached_ddim_samples, load_model, trained_model

    _, config, _ = load_model(flow_ckpt)
    trainer = Trainer(config, data=(torch.zeros(16, 1, 28, 28), torch.zeros(16, dtype=torch.long)), progress=False)
    with pytest.raises(ValueError, match="is a flow"):
        cached_ddim_samples(trained_model(trainer, "x"), 4, 2, 0)


def test_reflow_pairs_are_the_parents_ode_map():
    model = GaussianMixtureVelocity([[0.5, -0.5]], stds=0.7)
    x1, x0 = reflow_pairs(model, (2,), 50, steps=200, method="midpoint", seed=3, batch_size=16)
    torch.testing.assert_close(x1, torch.randn((50, 2), generator=torch.Generator().manual_seed(3)))
    exact = torch.stack([linear_ode_solution(x1[:, i].double(), 1.0, 0.0, m, 0.7) for i, m in enumerate((0.5, -0.5))],
                        1).float()
    torch.testing.assert_close(x0, exact, rtol=0, atol=1e-5)


def test_the_trainer_regresses_the_velocity_on_the_given_pairs():
    """One step of a reflow trainer: its loss is the flow loss of the network on (x_0, x_1) of the batch."""
    from ddpm.data import load_dataset

    base = dataclasses.replace(get_preset("toy2d"), objective="flow", steps=1, ema_decay=0.0)
    x0, _ = load_dataset("swiss_roll", split="train", seed=0)
    x1 = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    config = TrainConfig.from_dict({**base.to_dict(), "reflow": {"parent": base.to_dict(), "pairs": len(x0),
                                                                  "steps": 1, "method": "euler", "seed": 0}})
    trainer = Trainer(config, data=(x0, None, x1), progress=False)
    import copy
    before = copy.deepcopy(trainer.model)
    seen = {}
    real = trainer.t_sampler.sample

    def spy(*args, **kwargs):
        seen["t"] = real(*args, **kwargs)
        return seen["t"]

    trainer.t_sampler.sample = spy
    metrics = trainer.train_step()
    idx = trainer.last_batch_indices
    expected = flow_losses(before, x0[idx], seen["t"][0], noise=x1[idx])["loss"].mean().item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="reflow"):
        Trainer(config, data=(x0, None), progress=False)


def test_flow_configuration_is_checked():
    base = get_preset("mnist-flow")
    assert base.objective == "flow" and base.loss_type == "simple" and not base.model_config().learn_sigma
    cpu = get_preset("mnist-cpu")
    # equal compute: mnist-cpu's data, batch, steps, optimiser and EMA
    for key in ("dataset", "batch_size", "steps", "lr", "lr_decay", "warmup_steps", "ema_decay", "label_dropout",
                "cpu_bf16", "seed"):
        assert getattr(base, key) == getattr(cpu, key), key
    # the preset is the variant of mnist-cpu; the gpu profile's notebooks train the variant of mnist-gpu
    from ddpm.presets import flow_variant

    assert flow_variant(cpu).to_dict() == base.to_dict()
    gpu = flow_variant(get_preset("mnist-gpu"))
    gpu.validate()
    assert gpu.name == "mnist-gpu-flow" and gpu.objective == "flow" and gpu.steps == get_preset("mnist-gpu").steps
    # the new keys leave the configurations that do not use them (and their cache hashes) as they were
    assert not {"objective", "flow_time", "reflow"} & set(cpu.to_dict())
    with pytest.raises(ValueError, match="objective must be one of"):
        dataclasses.replace(base, objective="score").validate()
    with pytest.raises(ValueError, match="regresses the velocity"):
        dataclasses.replace(base, snr_gamma=5.0).validate()
    with pytest.raises(ValueError, match="belong to objective 'flow'"):
        dataclasses.replace(cpu, flow_time="logit-normal").validate()
    with pytest.raises(ValueError, match="keys"):
        dataclasses.replace(base, reflow={"parent": base.to_dict()}).validate()
    with pytest.raises(ValueError, match="same dataset"):
        dataclasses.replace(base, reflow={"parent": get_preset("toy2d", objective="flow").to_dict(), "pairs": 10,
                                          "steps": 2, "method": "euler", "seed": 0}).validate()
    with pytest.raises(ValueError, match="method"):
        dataclasses.replace(base, reflow={"parent": base.to_dict(), "pairs": 10, "steps": 2, "method": "rk4",
                                          "seed": 0}).validate()


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory):
    """A tiny class-conditional flow checkpoint (2 steps of training)."""
    from ddpm.data import load_dataset

    x, y = load_dataset("mnist5k", split="test")
    tiny = dict(image_size=28, in_channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                attention_resolutions=[], num_heads=1, dropout=0.0, num_classes=10, learn_sigma=False)
    config = TrainConfig(name="cli-flow", model=tiny, objective="flow", batch_size=8, steps=2, label_dropout=0.1)
    out = tmp_path_factory.mktemp("flow") / "run"
    Trainer(config, out_dir=out, data=(x, y), progress=False).fit()
    return out


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("sampler, steps, evaluations", [("euler", 3, 3), ("midpoint", 3, 6), ("heun", 2, 4),
                                                          (None, None, 16)])
def test_command_line_samples_a_flow(tmp_path, capsys, flow_ckpt, sampler, steps, evaluations):
    out = tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", flow_ckpt, "--n", 5, "--class", 3, "--guidance-scale", 1, "--out", out]
    argv += ["--sampler", sampler] if sampler else []
    argv += ["--steps", steps] if steps else []
    code, text, err = _run(capsys, *argv)
    assert code == 0, err
    assert f"{evaluations} network evaluations" in text and (sampler or "euler") in text
    with np.load(out) as f:
        assert f["arr_0"].shape == (5, 28, 28, 1) and f["arr_0"].dtype == np.uint8 and (f["arr_1"] == 3).all()


def test_command_line_refuses_the_other_kind_of_sampler_in_one_line(tmp_path, capsys, flow_ckpt):
    from ddpm.data import load_dataset

    x, y = load_dataset("mnist5k", split="test")
    diffusion = TrainConfig.from_dict({**TrainConfig.from_dict(
        {**_tiny_config_dict(flow_ckpt), "objective": "diffusion"}).to_dict(), "name": "cli-diffusion"})
    ckpt = tmp_path / "diffusion"
    Trainer(diffusion, out_dir=ckpt, data=(x, y), progress=False).fit()
    cases = [(flow_ckpt, ["--sampler", "ddim"], "is a flow (objective 'flow'); use one of euler, midpoint, heun"),
             (ckpt, ["--sampler", "midpoint"], "is a diffusion model; use one of ddpm, ddim, heun, dpm++2m"),
             (flow_ckpt, ["--classifier", tmp_path / "c"], "guide a flow with --guidance-scale")]
    for checkpoint, extra, match in cases:
        code, out, err = _run(capsys, "sample", "--checkpoint", checkpoint, "--out", tmp_path / "x.png", *extra)
        assert code == 2 and err.count("\n") == 1 and match in err and "Traceback" not in err, err
        assert not (tmp_path / "x.png").exists()
    code, out, err = _run(capsys, "nll", "--checkpoint", flow_ckpt, "--n", 2)
    assert code == 2 and err.count("\n") == 1 and "is a flow" in err, err


def _tiny_config_dict(checkpoint):
    import json

    return json.loads((checkpoint / "config.json").read_text())["config"]
