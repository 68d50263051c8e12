"""Editing without retraining (ddpm.editing): inpainting against closed-form conditionals, SDEdit, DDIM inversion,
and the command line's ``inpaint`` and ``edit``."""

import math

import numpy as np
import pytest
import torch

import ddpm.__main__ as cli
from ddpm import NoiseSchedule
from ddpm.analytic import GaussianMixtureEps, gaussian_ode_solution
from ddpm.editing import (INPAINT_METHODS, MASKS, ddim_invert, inpaint, inpaint_nfe, region_mask, repaint_schedule,
                          sdedit, sdedit_start, slerp)
from ddpm.samplers import ddim_sample, respaced
from ddpm.train import TrainConfig, Trainer

from oracles import CorrelatedGaussianOracle, GaussianOracle

torch.set_num_threads(1)
SCHEDULE = NoiseSchedule.linear(1000)
RHO, KNOWN = 0.95, 1.0  # x_0 ~ N(0, [[1, rho], [rho, 1]]), the first coordinate known to be 1


def _conditional_draws(method, n=20000, **kw):
    model = CorrelatedGaussianOracle(SCHEDULE, [[1.0, RHO], [RHO, 1.0]])
    known = torch.zeros(n, 2)
    known[:, 0] = KNOWN
    x = inpaint(model, SCHEDULE, known, torch.tensor([0.0, 1.0]), method=method, clip_denoised=False,
                generator=torch.Generator().manual_seed(0), **kw)
    mean, cov = model.conditional([0], [KNOWN])
    return x, float(mean[0]), float(cov[0, 0].sqrt())


def test_replacement_is_biased_on_correlated_gaussian_data():
    """The known coordinate is noised independently of the sampled one, so replacement under-uses it: with the exact
    predictor and all 1,000 steps its conditional mean falls well short of the closed form rho * x_1 = 0.95."""
    x, mean, std = _conditional_draws("replace", steps=1000)
    assert torch.equal(x[:, 0], torch.full((len(x),), KNOWN))  # the known coordinate is returned exactly
    se = float(x[:, 1].std()) / math.sqrt(len(x))
    assert mean - float(x[:, 1].mean()) > 0.15 > 20 * se, (float(x[:, 1].mean()), mean)
    assert float(x[:, 1].std()) > std + 0.05  # and too wide: part of the information never arrives


def test_repaint_resampling_approaches_the_closed_form_conditional():
    x_rep, mean, std = _conditional_draws("replace", steps=100)
    x, _, _ = _conditional_draws("repaint", steps=100, jump_length=10, resample=10)
    m, s = float(x[:, 1].mean()), float(x[:, 1].std())
    assert abs(m - mean) < 0.08 and abs(s - std) < 0.05, (m, s, mean, std)
    assert abs(m - mean) < 0.3 * abs(float(x_rep[:, 1].mean()) - mean)  # far closer than replacement


def test_posterior_sampling_finds_the_conditional_mean():
    """DPS on linear-Gaussian data: x0_hat is linear in x_t and its gradient step pulls the sample onto the
    conditional mean; its spread is only approximate (the Gaussian surrogate of p(y | x_t))."""
    x, mean, std = _conditional_draws("dps", steps=50, dps_scale=0.3)
    m, s = float(x[:, 1].mean()), float(x[:, 1].std())
    assert abs(m - mean) < 0.1, (m, mean)
    assert 0.5 * std < s < 1.5 * std, (s, std)
    x_off, _, _ = _conditional_draws("dps", steps=50, dps_scale=0.0)  # no gradient step: the unconditional prior
    assert abs(float(x_off[:, 1].mean())) < 0.05


@pytest.mark.parametrize("method", INPAINT_METHODS)
def test_known_pixels_are_returned_exactly_and_the_seed_fixes_the_result(method):
    model = GaussianOracle(SCHEDULE, mu=0.2, s=0.5)
    known = torch.rand(3, 1, 8, 8) * 2 - 1
    mask = region_mask("center", 8, 8)
    kw = dict(method=method, steps=10, jump_length=2, resample=2, generator=torch.Generator().manual_seed(4))
    seen = []
    x = inpaint(model, SCHEDULE, known, mask, callback=lambda t, x_t, x0: seen.append(t), **kw)
    keep = mask.expand(3, 1, 8, 8) == 0
    assert torch.equal(x[keep], known[keep])
    assert not torch.allclose(x, known)
    assert len(seen) == inpaint_nfe(method, 10, 2, 2) and seen[-1] == 0
    kw["generator"] = torch.Generator().manual_seed(4)
    assert torch.equal(x, inpaint(model, SCHEDULE, known, mask, **kw))


def test_repaint_schedule_walks_back_and_counts_its_evaluations():
    path = repaint_schedule(6, jump_length=2, resample=3)
    assert path == [5, 4, 3, 2, 3, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, -1]
    assert repaint_schedule(7, 3, 1) == [6, 5, 4, 3, 2, 1, 0, -1]
    assert all(abs(a - b) == 1 for a, b in zip(path, path[1:]))
    # Lugmayr et al.'s setting: 250 levels, jumps of 10, 10 passes: 250 + 24 * 9 * 10 evaluations
    assert inpaint_nfe("repaint", 250, 10, 10) == 250 + 24 * 9 * 10
    assert inpaint_nfe("replace", 50) == inpaint_nfe("dps", 50) == 50 and inpaint_nfe("repaint", 25, 5, 2) == 45


def test_inpainting_refuses_bad_masks_and_arguments():
    model = GaussianOracle(SCHEDULE, mu=0.0, s=1.0)
    known = torch.zeros(2, 1, 4, 4)
    for mask, match in [(torch.zeros(1, 4, 4), "some pixels to generate"), (torch.ones(1, 4, 4), "some known"),
                        (torch.full((1, 4, 4), 0.5), "must hold 0"), (torch.zeros(3, 3), "does not broadcast")]:
        with pytest.raises(ValueError, match=match):
            inpaint(model, SCHEDULE, known, mask, steps=2)
    half = region_mask("top", 4, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        inpaint(model, SCHEDULE, known, half, method="blend")
    with pytest.raises(ValueError, match="jump_length"):
        inpaint(model, SCHEDULE, known, half, method="repaint", jump_length=0)
    with pytest.raises(ValueError, match="mask must be one of"):
        region_mask("middle", 4, 4)
    assert [int(region_mask(m, 4, 4).sum()) for m in MASKS] == [8, 8, 8, 8, 4]
    assert region_mask("top", 4, 4)[0, :2].eq(1).all() and region_mask("top", 4, 4)[0, 2:].eq(0).all()


def test_sdedit_start_and_faithfulness_grow_with_the_strength():
    assert [sdedit_start(SCHEDULE, s) for s in (1e-4, 0.001, 0.25, 0.5, 1.0)] == [0, 0, 249, 499, 999]
    for bad in (0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="strength"):
            sdedit_start(SCHEDULE, bad)
    model = GaussianOracle(SCHEDULE, mu=0.0, s=0.5)
    x = torch.full((2000, 1, 2, 2), 0.8)  # an input far from the data's mean
    dist = []
    for strength in (0.05, 0.2, 0.35, 1.0):
        out = sdedit(model, SCHEDULE, x, strength, steps=200, clip_denoised=False,
                     generator=torch.Generator().manual_seed(1))
        dist.append(float((out - x).pow(2).mean()))
    assert all(a < b for a, b in zip(dist, dist[1:])), dist
    # at strength 1 the input is forgotten: E (x_0 - 0.8)^2 = s^2 + 0.8^2 for samples of N(0, s^2)
    assert abs(dist[-1] - (0.25 + 0.64)) < 0.06, dist


@pytest.mark.parametrize("strength", [0.05, 0.2, 0.35])
def test_sdedit_with_the_exact_model_draws_the_posterior_of_the_noised_input(strength):
    """For data N(mu, s^2) the exact reverse process from x_t0 samples p(x_0 | x_t0) = N(mu + g (x_t0 - a mu),
    s^2 (1 - ab) / (ab s^2 + 1 - ab)), g = a s^2 / (ab s^2 + 1 - ab), a = sqrt(ab); over x_t0 ~ q(x_t0 | x) the
    output has mean mu + g a (x - mu) and variance s^2 (1 - ab) / (ab s^2 + 1 - ab) + g^2 (1 - ab)."""
    mu, s, x_in = 0.1, 0.5, 0.8
    model = GaussianOracle(SCHEDULE, mu=mu, s=s)
    out = sdedit(model, SCHEDULE, torch.full((4000, 1, 2, 2), x_in), strength, clip_denoised=False,
                 generator=torch.Generator().manual_seed(1))
    ab = SCHEDULE.alpha_bar[sdedit_start(SCHEDULE, strength)].item()
    g = math.sqrt(ab) * s ** 2 / (ab * s ** 2 + 1 - ab)
    mean, var = mu + g * math.sqrt(ab) * (x_in - mu), s ** 2 * (1 - ab) / (ab * s ** 2 + 1 - ab) + g ** 2 * (1 - ab)
    assert abs(float(out.mean()) - mean) < 4 * math.sqrt(var / out.numel()) + 0.005, (float(out.mean()), mean)
    assert abs(float(out.var()) / var - 1) < 0.06, (float(out.var()), var)


def test_sdedit_with_ddim_at_full_strength_is_ddim_sampling_of_the_noised_input():
    model = GaussianOracle(SCHEDULE, mu=0.1, s=0.7)
    x = torch.randn(4, 1, 2, 2)
    out = sdedit(model, SCHEDULE, x, 1.0, steps=10, sampler="ddim", generator=torch.Generator().manual_seed(2))
    noised = SCHEDULE.q_sample(x, torch.full((4,), 999), generator=torch.Generator().manual_seed(2))
    ref = ddim_sample(model, SCHEDULE.keep(sorted({round(999 - k * 100) for k in range(10)})), x_T=noised)
    torch.testing.assert_close(out, ref)


def test_ddim_inversion_follows_the_exact_ode_and_reconstructs_better_with_more_steps():
    mu, s = 0.3, 0.5
    model = GaussianOracle(SCHEDULE, mu=mu, s=s)
    x0 = mu + s * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (5, 20, 100):
        x_top = ddim_invert(model, SCHEDULE, x0, steps)
        back = ddim_sample(model, SCHEDULE, x_T=x_top, steps=steps, clip_denoised=False)
        errors.append(float((back - x0).pow(2).mean().sqrt()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.2 * errors[0], errors
    # at 100 steps the inverted state is the exact probability-flow ODE map of x0 to within a few hundredths
    exact = gaussian_ode_solution(x0, 1.0, respaced(SCHEDULE, 100, "ddim").alpha_bar[-1].item(), mu, s)
    assert float((x_top - exact).pow(2).mean().sqrt()) < 0.05


def test_ddim_inversion_of_a_mixture_lands_on_noise_and_visits_every_level():
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])
    model = GaussianMixtureEps(SCHEDULE, means, 0.3)
    x0 = model.sample_data(4000, torch.Generator().manual_seed(1)).double()
    seen = []
    x_top = ddim_invert(model, SCHEDULE, x0, 50, callback=lambda t, x, x0_: seen.append(t))
    assert seen == respaced(SCHEDULE, 50, "ddim").timestep_map.tolist()
    # the ODE carries the data distribution to q(x_top), close to N(0, I) at the top level
    assert float(x_top.mean(0).abs().max()) < 0.05 and float((x_top.std(0) - 1).abs().max()) < 0.05


def test_slerp_keeps_gaussian_norms_and_ends_at_its_endpoints():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 1, 28, 28, generator=g), torch.randn(8, 1, 28, 28, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid_norm = slerp(a, b, 0.5).flatten(1).norm(dim=1)
    lerp_norm = (0.5 * (a + b)).flatten(1).norm(dim=1)
    assert ((mid_norm / math.sqrt(784) - 1).abs() < 0.1).all() and (lerp_norm / math.sqrt(784) < 0.8).all()
    torch.testing.assert_close(slerp(a, a, 0.3), a)


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A class-conditional, learned-variance tiny U-Net checkpoint (2 steps of training) and 5 digits in the
    OpenAI layout."""
    from ddpm.data import load_dataset

    x, y = load_dataset("mnist5k", split="test")
    model = dict(image_size=28, in_channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                 attention_resolutions=[], num_heads=1, dropout=0.0, num_classes=10, learn_sigma=True)
    config = TrainConfig(name="edit-tiny", model=model, dataset="mnist5k", schedule="cosine", T=20,
                         loss_type="hybrid", batch_size=8, steps=2, label_dropout=0.1)
    root = tmp_path_factory.mktemp("edit")
    Trainer(config, out_dir=root / "run", data=(x, y), progress=False).fit()
    images = ((x[:5] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(root / "digits.npz", images, y[:5].numpy())
    return root / "run", root / "digits.npz", images, y[:5].numpy()


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_line_inpaints_and_edits_in_the_inputs_order(tmp_path, capsys, digits_ckpt):
    ckpt, digits, images, labels = digits_ckpt
    for method in ("replace", "repaint", "dps"):
        code, out, err = _run(capsys, "inpaint", "--checkpoint", ckpt, "--images", digits, "--mask", "bottom",
                              "--method", method, "--steps", "4", "--labels", "--guidance-scale", "1",
                              "--out", tmp_path / f"{method}.npz")
        assert code == 0, err
        assert f"inpainted the bottom of 5 images ({method}, {inpaint_nfe(method, 4)}" in out
        with np.load(tmp_path / f"{method}.npz") as f:
            done, done_labels = f["arr_0"], f["arr_1"]
        assert done.shape == images.shape and done.dtype == np.uint8
        assert np.array_equal(done[:, :14], images[:, :14])  # the known top half, in the input's order
        assert np.array_equal(done_labels, labels)
    code, out, err = _run(capsys, "edit", "--checkpoint", ckpt, "--images", digits, "--strength", "0.5",
                          "--steps", "3", "--class", "3", "--out", tmp_path / "edited.png")
    assert code == 0 and "SDEdit from step 9 of 20, 3 ancestral steps" in out, err
    assert (tmp_path / "edited.png").stat().st_size > 0


def test_command_line_editing_refuses_bad_input_in_one_line(tmp_path, capsys, digits_ckpt):
    ckpt, digits, images, _ = digits_ckpt
    np.savez(tmp_path / "rgb.npz", np.zeros((2, 28, 28, 3), np.uint8))
    np.savez(tmp_path / "small.npz", np.zeros((2, 14, 14, 1), np.uint8))
    np.savez(tmp_path / "floats.npz", np.zeros((2, 28, 28, 1), np.float32))
    np.savez(tmp_path / "nolabels.npz", images)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    base = ["--checkpoint", ckpt, "--out", tmp_path / "o.npz"]
    cases = [
        (["inpaint", "--images", tmp_path / "rgb.npz", "--mask", "top"], "28x28 with 1 channel"),
        (["inpaint", "--images", tmp_path / "small.npz", "--mask", "top"], "[N, 28, 28, 1]"),
        (["inpaint", "--images", tmp_path / "floats.npz", "--mask", "top"], "arr_0 must be uint8"),
        (["inpaint", "--images", tmp_path / "broken.npz", "--mask", "top"], "not a readable .npz"),
        (["inpaint", "--images", tmp_path / "none.npz", "--mask", "top"], "not found"),
        (["inpaint", "--images", digits, "--mask", "middle"], "invalid choice"),
        (["inpaint", "--images", digits, "--mask", "top", "--method", "blend"], "invalid choice"),
        (["inpaint", "--images", digits, "--mask", "top", "--steps", "21"], "at most T = 20"),
        (["inpaint", "--images", tmp_path / "nolabels.npz", "--mask", "top", "--labels"], "no arr_1"),
        (["inpaint", "--images", digits, "--mask", "top", "--guidance-scale", "2"], "--class K or --labels"),
        (["inpaint", "--images", digits, "--mask", "top", "--class", "10"], "--class must be in 0..9"),
        (["edit", "--images", digits, "--strength", "0"], "--strength must be a number in (0, 1]"),
        (["edit", "--images", digits, "--strength", "1.5"], "--strength must be a number in (0, 1]"),
        (["edit", "--images", digits], "--strength"),
    ]
    for argv, match in cases:
        code, out, err = _run(capsys, *argv, *base)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert err.startswith(f"python -m ddpm {argv[0]}") and match in err, (argv, err)
    assert not (tmp_path / "o.npz").exists()
    (tmp_path / "keep.npz").write_bytes(b"precious")
    code, _, err = _run(capsys, "edit", "--checkpoint", ckpt, "--images", digits, "--strength", "0.3",
                        "--out", tmp_path / "keep.npz")
    assert code == 2 and "--overwrite" in err and (tmp_path / "keep.npz").read_bytes() == b"precious"


def test_names_of_the_command_line_are_the_package_names():
    from ddpm.cli_editing import INPAINT_METHOD_NAMES, MASK_NAMES

    assert INPAINT_METHOD_NAMES == INPAINT_METHODS and MASK_NAMES == MASKS
