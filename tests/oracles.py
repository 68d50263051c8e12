"""Models whose optimal output is known in closed form, for tests that pin the mathematics."""

import torch


class GaussianOracle(torch.nn.Module):
    """The Bayes-optimal noise predictor for data x_0 ~ N(mu, s^2 I).

    With x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps, (x_t, eps) are jointly Gaussian and
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab).
    ``schedule`` is the training schedule: the oracle is called with original timesteps, as a model is.
    ``log_variance``, when given as a function of t, is appended as "learned variance" channels v in [-1, 1].
    """

    def __init__(self, schedule, mu: float, s: float, v=None):
        super().__init__()
        self.schedule, self.mu, self.s, self.v = schedule, mu, s, v
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # so that .parameters() gives a device

    def posterior_x0_variance(self, t):
        ab = self.schedule.alpha_bar[t]
        return self.s ** 2 * (1 - ab) / (ab * self.s ** 2 + 1 - ab)

    def forward(self, x, t, y=None):
        ab = self.schedule.alpha_bar.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s ** 2 + 1 - ab)
        if self.v is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, float(self.v))], dim=1)
