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


class CorrelatedGaussianOracle(torch.nn.Module):
    """The Bayes-optimal noise predictor for data x_0 ~ N(0, C) in d dimensions ([N, d] tensors).

    q(x_t) = N(0, ab C + (1 - ab) I), so E[eps | x_t] = -sqrt(1 - ab) grad log q(x_t)
    = sqrt(1 - ab) (ab C + (1 - ab) I)^-1 x_t. ``conditional(known_index, value)`` is the closed-form
    conditional of the other coordinates: its mean [d - k] and covariance.
    """

    def __init__(self, schedule, cov):
        super().__init__()
        self.schedule = schedule
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        ab = self.schedule.alpha_bar.to(x.device)[t].double().reshape(-1, 1, 1)
        eye = torch.eye(self.cov.shape[0], dtype=torch.float64)
        prec = torch.linalg.inv(ab * self.cov + (1 - ab) * eye)
        eps = (1 - ab.reshape(-1, 1)).sqrt() * (prec @ x.double().unsqueeze(-1)).squeeze(-1)
        return eps.to(x.dtype)

    def sample(self, n, generator=None):
        z = torch.randn(n, self.cov.shape[0], generator=generator, dtype=torch.float64)
        return (z @ torch.linalg.cholesky(self.cov).T).float()

    def conditional(self, known: list[int], value):
        d = self.cov.shape[0]
        free = [i for i in range(d) if i not in known]
        c = self.cov
        gain = c[free][:, known] @ torch.linalg.inv(c[known][:, known])
        mean = gain @ torch.as_tensor(value, dtype=torch.float64)
        cov = c[free][:, free] - gain @ c[known][:, free]
        return mean, cov
