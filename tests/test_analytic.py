"""The exact Gaussian-mixture denoiser of ``ddpm.analytic`` against independent closed forms."""

import pytest
import torch

from ddpm.analytic import GaussianMixtureEps, edm_sigma, gaussian_ode_solution
from ddpm.schedule import NoiseSchedule
from oracles import GaussianOracle

SCHED = NoiseSchedule.cosine(200)


def test_one_component_is_the_gaussian_oracle():
    mix = GaussianMixtureEps(SCHED, [[0.3, 0.3]], 0.4)
    oracle = GaussianOracle(SCHED, 0.3, 0.4).double()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.randint(0, 200, (50,), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mix(x, t), oracle(x, t), atol=1e-12)


def test_score_is_the_gradient_of_the_log_density():
    mix = GaussianMixtureEps(SCHED, [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]], [0.1, 0.3, 0.2], [0.2, 0.3, 0.5])
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    t = torch.randint(0, 200, (40,), generator=torch.Generator().manual_seed(1))
    for y in (None, torch.full((40,), 1), torch.full((40,), 3)):
        (grad,) = torch.autograd.grad(mix.log_density(x, t, y).sum(), x)
        assert torch.allclose(mix.score(x, t, y), grad, atol=1e-10)
    # the null label is the whole mixture, and eps = -sqrt(1 - ab) score
    assert torch.allclose(mix(x, t, torch.full((40,), 3)), mix(x, t), atol=0)
    ab = SCHED.alpha_bar[t].unsqueeze(1)
    assert torch.allclose(mix(x, t), -(1 - ab).sqrt() * mix.score(x, t), atol=1e-12)


def test_density_at_t0_integrates_to_one_and_data_have_the_mixture_moments():
    mix = GaussianMixtureEps(NoiseSchedule.linear(1000), [[-1.0], [2.0]], [0.3, 0.5], [0.25, 0.75])
    grid = torch.linspace(-6, 8, 4001, dtype=torch.float64).unsqueeze(1)
    for t in (0, 300, 999):
        p = mix.log_density(grid, torch.full((4001,), t)).exp()
        assert torch.trapezoid(p, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-6)
    x = mix.sample_data(40_000, torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(0.25 * -1 + 0.75 * 2, abs=0.03)


def test_gaussian_ode_solution_composes_and_ends_on_the_data_distribution():
    ab = NoiseSchedule.linear(1000).alpha_bar
    x = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = x * (1 - ab[-1] + ab[-1] * 0.5 ** 2).sqrt() + ab[-1].sqrt() * 0.3  # a draw of q(x_T)
    mid = gaussian_ode_solution(x_T, ab[-1], ab[400], 0.3, 0.5)
    assert torch.allclose(gaussian_ode_solution(mid, ab[400], 1.0, 0.3, 0.5),
                          gaussian_ode_solution(x_T, ab[-1], 1.0, 0.3, 0.5), atol=1e-12)
    x0 = gaussian_ode_solution(x_T, ab[-1], 1.0, 0.3, 0.5)
    assert x0.mean().item() == pytest.approx(0.3, abs=0.01) and x0.std().item() == pytest.approx(0.5, rel=0.02)
    assert edm_sigma(ab[0]).item() == pytest.approx(((1 - ab[0]) / ab[0]).sqrt().item())


def test_bad_mixtures_are_refused():
    with pytest.raises(ValueError, match="means"):
        GaussianMixtureEps(SCHED, [0.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureEps(SCHED, [[0.0], [1.0]], 0.1, [1.0, -1.0])


def test_labels_outside_the_mixture_are_refused_in_one_line():
    mix = GaussianMixtureEps(SCHED, [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], 0.2)  # K = 3, null label 3
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 50)
    bad = [
        (torch.tensor([0, 1, 4, 2]), "components 0..2 or the null label 3 of this 3-component mixture"),
        (torch.tensor([0, -1, 1, 2]), "got labels from -1 to 2"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer class labels"),
        (torch.tensor([True, False, True, False]), "integer class labels"),
        (torch.tensor([[0], [1], [2], [3]]), "shape [4], got shape (4, 1)"),
        (torch.tensor([0, 1]), "shape [4], got shape (2,)"),
    ]
    for y, message in bad:
        for call in (mix, mix.score, mix.log_density):
            with pytest.raises(ValueError) as err:
                call(x, t, y)
            assert message in str(err.value) and "\n" not in str(err.value), (y, str(err.value))
    with pytest.raises(ValueError, match=r"components 0..2 of this 3-component mixture, got labels from 0 to 3"):
        mix.sample_data(4, y=torch.tensor([0, 1, 2, 3]))  # data have no null label
    with pytest.raises(ValueError, match=r"shape \[4\], got shape \(3,\)"):
        mix.sample_data(4, y=torch.tensor([0, 1, 2]))

    # every valid label, the null one included, and the int32 of a caller: the null label is the whole mixture
    y = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    assert torch.equal(mix(x, t, y)[3], mix(x[3:], t[3:])[0])
    y0 = torch.tensor([0, 1, 2, 0], dtype=torch.int32)
    x0 = mix.sample_data(4, torch.Generator().manual_seed(0), y=y0)
    assert (x0 - mix.means[y0.long()]).abs().max() < 1.0  # each point from its own component (std 0.2)
