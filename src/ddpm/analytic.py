"""Exact denoisers for Gaussian-mixture data: the noise predictor a perfect network would learn.

For data drawn from an isotropic Gaussian mixture, every marginal of the forward process is again a mixture,

    q(x_t) = sum_k w_k N(x_t; sqrt(ab_t) m_k, (ab_t s_k^2 + 1 - ab_t) I),

so the score, the optimal noise prediction E[eps | x_t] = -sqrt(1 - ab_t) grad log q(x_t) and the optimal
x_0 prediction are known in closed form. :class:`GaussianMixtureEps` is that optimal predictor with the call
signature of the networks, ``model(x, t, y)``, so that every sampler, guidance and the likelihood code run on
it unchanged. The label ``y = k`` selects component k (the class-conditional model); ``y = K`` (the null
label, ``config.num_classes``) or ``y = None`` is the whole mixture, which is what classifier-free guidance
needs. Labels are integers ``[N]``, one per point; any other label is refused with a ``ValueError``. The book uses it for figures that need a perfect model and the tests use it to pin samplers to the
exact probability-flow ODE (:func:`gaussian_ode_solution`).

:class:`GaussianMixtureVelocity` is the same for flow matching: the exact marginal velocity E[eps - x_0 | x_t] of
the linear path x_t = (1 - t) x_0 + t eps (``ddpm.flow``), on which x_t given component k is
N((1 - t) m_k, ((1 - t)^2 s_k^2 + t^2) I); :func:`linear_ode_solution` carries that path's ODE exactly for
Gaussian data.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from .schedule import NoiseSchedule

__all__ = ["GaussianMixtureEps", "GaussianMixtureVelocity", "gaussian_ode_solution", "linear_ode_solution", "edm_sigma"]


def edm_sigma(alpha_bar: Tensor) -> Tensor:
    """The noise level of Karras et al. (2022), sigma = sqrt((1 - ab) / ab): x_t / sqrt(ab) = x_0 + sigma eps."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


class GaussianMixtureEps(nn.Module):
    """The exact eps-prediction E[eps | x_t, y] for data from an isotropic Gaussian mixture in d dimensions.

    means ``[K, d]``, stds ``[K]`` (or a float for all), weights ``[K]`` (uniform when None). Timesteps are
    0-based indices into ``schedule`` (the original, unrespaced one: samplers give the model original
    timesteps). Computations run in float64 and return the input's dtype.
    """

    def __init__(self, schedule: NoiseSchedule, means, stds=1.0, weights=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if (stds < 0).any() or (weights <= 0).any() or weights.shape != (k,):
            raise ValueError("stds must be >= 0 and weights > 0, one per component")
        self.schedule = schedule
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.config = SimpleNamespace(num_classes=k, learn_sigma=False)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def _labels(self, y, n: int, null: bool) -> Tensor:
        """``y`` as int64 ``[n]`` after checking it: one integer label per point, each a component 0..K-1, or K
        (the null label: the whole mixture) where ``null``; anything else raises a one-line ValueError."""
        k = self.num_components
        top, what = (k, f"components 0..{k - 1} or the null label {k}") if null else (k - 1, f"components 0..{k - 1}")
        y = torch.as_tensor(y)
        if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            raise ValueError(f"y must hold integer class labels ({what}), got dtype {y.dtype}")
        if y.shape != (n,):
            raise ValueError(f"y must hold one label per point, shape [{n}], got shape {tuple(y.shape)}")
        if n and (int(y.min()) < 0 or int(y.max()) > top):
            raise ValueError(f"y must hold {what} of this {k}-component mixture, got labels from {int(y.min())} "
                             f"to {int(y.max())}")
        return y.long()

    def _log_resp_and_terms(self, x: Tensor, t: Tensor, y: Tensor | None):
        """Per-component log weight x density [N, K], means [N, K, d] and variances [N, K] of q(x_t | k)."""
        xd = x.reshape(x.shape[0], -1).to(torch.float64)
        scale, noise_var = self._coefficients(t, x.device)  # x_t = scale x_0 + noise, each [N, 1]
        mean = scale.unsqueeze(-1) * self.means.to(x.device)  # [N, K, d]
        var = scale ** 2 * self.stds.to(x.device) ** 2 + noise_var  # [N, K]
        d = xd.shape[1]
        sq = ((xd.unsqueeze(1) - mean) ** 2).sum(-1)
        logp = self.weights.to(x.device).log() - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
        if y is not None:
            y = self._labels(y, x.shape[0], null=True).to(x.device)
            k = self.num_components
            pick = torch.nn.functional.one_hot(y.clamp(max=k - 1), k).bool() | (y == k).unsqueeze(1)
            logp = logp.masked_fill(~pick, -math.inf)
        return xd, logp, mean, var

    def _coefficients(self, t: Tensor, device) -> tuple[Tensor, Tensor]:
        """The signal scale ``sqrt(ab_t)`` and noise variance ``1 - ab_t`` of x_t at 0-based steps t, each
        ``[N, 1]``."""
        ab = self.schedule.alpha_bar.to(device)[t.long()].reshape(-1, 1)
        return ab.sqrt(), 1 - ab

    def score(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """grad_x log q(x_t | y) at x ``[N, ...]`` and 0-based steps t ``[N]``."""
        xd, logp, mean, var = self._log_resp_and_terms(x, t, y)
        resp = torch.softmax(logp, dim=1)  # p(k | x_t)
        s = (resp.unsqueeze(-1) * (mean - xd.unsqueeze(1)) / var.unsqueeze(-1)).sum(1)
        return s.reshape(x.shape).to(x.dtype)

    def log_density(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """log q(x_t) ``[N]`` for y None or the null label; for a label y = k the joint log q(x_t, k) =
        log w_k + log N(x_t; component k), whose gradient in x is that of log q(x_t | k)."""
        _, logp, _, _ = self._log_resp_and_terms(x, t, y)
        return torch.logsumexp(logp, dim=1).to(x.dtype)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        ab = self.schedule.alpha_bar.to(x.device)[t.long()]
        scale = (1 - ab).sqrt().reshape(-1, *([1] * (x.ndim - 1)))
        return (-scale * self.score(x, t, y).to(torch.float64)).to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None, y: Tensor | None = None) -> Tensor:
        """n draws of x_0 ``[n, d]``, from component y[i] where given (``[n]`` in 0..K-1), else from the mixture."""
        if y is None:
            y = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            y = self._labels(y, n, null=False).to(self.means.device)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[y] + self.stds[y].unsqueeze(1) * z).float()


def gaussian_ode_solution(x: Tensor, ab_from: float, ab_to: float, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """The probability-flow ODE carried exactly from x at alpha_bar ``ab_from`` to ``ab_to``, data N(mean, std^2).

    In the variables of Karras et al. (2022), x_hat = x / sqrt(ab) and sigma = sqrt((1 - ab) / ab), the ODE
    is d x_hat / d sigma = (x_hat - D(x_hat)) / sigma, and for Gaussian data (x_hat - mean) / sqrt(std^2 +
    sigma^2) stays constant along it. ``ab_to = 1`` gives the x_0 that the ODE reaches.
    """
    ab_from, ab_to = torch.as_tensor(ab_from, dtype=torch.float64), torch.as_tensor(ab_to, dtype=torch.float64)
    s_from, s_to = edm_sigma(ab_from), edm_sigma(ab_to)
    x_hat = x.to(torch.float64) / ab_from.sqrt()
    x_hat_to = mean + (x_hat - mean) * ((std ** 2 + s_to ** 2) / (std ** 2 + s_from ** 2)).sqrt()
    return (x_hat_to * ab_to.sqrt()).to(x.dtype)


class GaussianMixtureVelocity(GaussianMixtureEps):
    """The exact marginal velocity ``E[eps - x_0 | x_t, y]`` of the linear path for isotropic Gaussian-mixture data,
    called like a flow network: ``model(x [N, d], t_net [N], y)`` with flow time ``t = t_net / FLOW_TIME_SCALE``.

    Given component k, x_t and (x_0, eps) are jointly Gaussian, so with ``c_k = (1 - t)^2 s_k^2 + t^2`` and
    ``r = x_t - (1 - t) m_k``: ``E[eps | x_t, k] = t r / c_k`` and ``E[x_0 | x_t, k] = m_k + (1 - t) s_k^2 r / c_k``;
    the marginal velocity averages ``t r / c_k - m_k - (1 - t) s_k^2 r / c_k`` over ``p(k | x_t)``. Labels as in
    :class:`GaussianMixtureEps` (no schedule: the path is the flow's).
    """

    def __init__(self, means, stds=1.0, weights=None):
        super().__init__(None, means, stds, weights)

    def _coefficients(self, t: Tensor, device) -> tuple[Tensor, Tensor]:
        """The signal scale ``1 - r`` and noise variance ``r^2`` of the linear path at flow time r = t / scale."""
        from .flow import FLOW_TIME_SCALE

        r = (t.to(device, torch.float64) / FLOW_TIME_SCALE).reshape(-1, 1)
        return 1 - r, r ** 2

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        from .flow import FLOW_TIME_SCALE

        xd, logp, mean, var = self._log_resp_and_terms(x, t, y)
        resp = torch.softmax(logp, dim=1).unsqueeze(-1)  # p(k | x_t) [N, K, 1]
        tf = (t.to(torch.float64) / FLOW_TIME_SCALE).reshape(-1, 1, 1)
        r = xd.unsqueeze(1) - mean  # [N, K, d]
        s2 = (self.stds.to(x.device) ** 2).reshape(1, -1, 1)
        u = (tf * r - (1 - tf) * s2 * r) / var.unsqueeze(-1) - self.means.to(x.device)
        return (resp * u).sum(1).reshape(x.shape).to(x.dtype)


def linear_ode_solution(x: Tensor, t_from: float, t_to: float, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """The linear path's ODE (``ddpm.flow``) carried exactly from x at flow time ``t_from`` to ``t_to``, data
    N(mean, std^2): the marginal at t is N((1 - t) mean, (1 - t)^2 std^2 + t^2), and the ODE keeps
    (x - (1 - t) mean) / sqrt((1 - t)^2 std^2 + t^2) constant. ``t_to = 0`` gives the sample the ODE reaches."""
    def scale(t):
        return math.sqrt((1 - t) ** 2 * std ** 2 + t ** 2)
    x64 = x.to(torch.float64)
    out = (1 - t_to) * mean + (x64 - (1 - t_from) * mean) * (scale(t_to) / scale(t_from))
    return out.to(x.dtype)
