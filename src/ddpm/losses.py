"""Training objectives and the terms of the variational bound.

* ``L_simple`` (Ho et al. 2020, Eq. 14): the mean squared error of the predicted noise.
* The bound's terms in bits per dimension: the prior term L_T, the Gaussian KL terms L_{t-1} and the
  discretised Gaussian decoder L_0 (Ho et al. Eq. 5 and 13).
* The reverse-process variance: fixed (beta_t or beta-tilde_t) or learned by interpolation in the log
  domain (Nichol & Dhariwal 2021, Eq. 15), and ``L_hybrid = L_simple + lambda L_vlb`` with a stop-gradient
  on the mean inside the bound term (their Sec. 3.1).
* Min-SNR-gamma weighting of the noise MSE (Hang et al. 2023): ``min(SNR(t), gamma) / SNR(t)``, which
  stops the many low-noise steps, easy and nearly useless for sampling, from dominating the gradient.
* Importance sampling of t for ``L_vlb`` (their Sec. 3.3).

The derivations are in the book: ``theory/ddpm.md`` and ``theory/improved_ddpm.md``.
Model outputs are ``[N, C, ...]`` (eps) or ``[N, 2C, ...]`` (eps and the variance interpolation v in [-1, 1]).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedule import NoiseSchedule, randn_like

__all__ = [
    "VAR_TYPES", "LOSS_TYPES", "mean_flat", "normal_kl", "discretized_gaussian_log_likelihood",
    "resolve_var_type", "split_output", "model_log_variance", "p_mean_variance", "prior_bpd", "vb_terms_bpd",
    "training_losses", "min_snr_weight", "UniformSampler", "ImportanceSampler",
]

VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("simple", "hybrid", "vlb")
LOG2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_normal_interval(lower: Tensor, upper: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for standardised edges lower < upper, accurate deep in either tail.

    The interval is reflected, when its middle is positive, into the left tail, where ``log_ndtr`` keeps full
    relative precision; the difference is then ``a + log(1 - exp(b - a))`` with ``a >= b`` the two log-CDFs.
    """
    flip = (lower + upper) > 0
    lo, hi = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    a, b = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return a + torch.log(-torch.expm1(b - a))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) under a Gaussian discretised to 256 bins on [-1, 1] (Ho et al. 2020, Eq. 13).

    x: data scaled from uint8 {0, ..., 255} to [-1, 1], so bins have width 2/255 and edges at x +- 1/255;
    the first and last bins extend to -inf and +inf. log_scales is log sigma. Returns elementwise log
    probabilities in nats, shaped like x (float64 inside).

    Every bin is computed the same way, without clamping: the edge bins by ``log_ndtr`` and the interior bins by
    :func:`_log_normal_interval`, both exact far into the tails. (OpenAI's code clamps each probability at 1e-12,
    which caps the loss of a badly placed mean at 27.6 nats; at ordinary values the two agree.)
    """
    x64, m64, s64 = x.double(), means.double(), log_scales.double()
    centered = x64 - m64
    inv_std = torch.exp(-s64)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)            # log P(X <= upper edge), for the first bin
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower edge), for the last bin
    log_delta = _log_normal_interval(lower, upper)
    out = torch.where(x64 < -0.999, log_cdf_upper, torch.where(x64 > 0.999, log_one_minus_cdf_lower, log_delta))
    return out.to(torch.promote_types(x.dtype, means.dtype))


def resolve_var_type(var_type: str | None, model_output: Tensor, x_t: Tensor) -> str:
    """``None`` means: learned when the model outputs twice the channels of x_t, else fixed_small."""
    if var_type is None:
        return "learned_range" if model_output.shape[1] == 2 * x_t.shape[1] else "fixed_small"
    if var_type not in VAR_TYPES:
        raise ValueError(f"var_type must be one of {', '.join(VAR_TYPES)} (or None), got {var_type!r}")
    return var_type


def split_output(model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
    """Split a model output into (eps, v); v is None when the model has no variance channels."""
    c = x_t.shape[1]
    if model_output.shape[0] != x_t.shape[0] or model_output.shape[2:] != x_t.shape[2:] \
            or model_output.shape[1] not in (c, 2 * c):
        raise ValueError(f"model output must have shape [N, C or 2C, ...] for x_t {tuple(x_t.shape)}, "
                         f"got {tuple(model_output.shape)}")
    if model_output.shape[1] == c:
        return model_output, None
    return model_output[:, :c], model_output[:, c:]


def model_log_variance(schedule: NoiseSchedule, t: Tensor, x_t: Tensor, var_type: str,
                       v: Tensor | None = None) -> Tensor:
    """log Sigma_theta(x_t, t) for each variance type.

    fixed_small: beta-tilde_t, the posterior variance (clipped at t = 0);
    fixed_large: beta_t, with beta-tilde_1 at t = 0 as in the OpenAI code (a better decoder likelihood);
    learned_range: exp(v' log beta_t + (1 - v') log beta-tilde_t) with v' = (v + 1) / 2 (Nichol & Dhariwal Eq. 15).
    """
    if var_type == "fixed_small":
        return schedule.extract(schedule.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
    if var_type == "fixed_large":
        large = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]) if schedule.T > 1 else schedule.betas
        return schedule.extract(large.log(), t, x_t).expand_as(x_t)
    if var_type == "learned_range":
        if v is None:
            raise ValueError("var_type 'learned_range' needs a model with learned variance (2C output channels)")
        min_log = schedule.extract(schedule.posterior_log_variance_clipped, t, x_t)
        max_log = schedule.extract(schedule.betas.log(), t, x_t)
        frac = (v + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log
    raise ValueError(f"var_type must be one of {', '.join(VAR_TYPES)}, got {var_type!r}")


def p_mean_variance(schedule: NoiseSchedule, model_output: Tensor, x_t: Tensor, t: Tensor,
                    var_type: str | None = None, clip_denoised: bool = True) -> dict[str, Tensor]:
    """The reverse step p_theta(x_{t-1} | x_t) = N(mean, variance) from an eps-prediction model output.

    The mean is the posterior mean at the predicted x_0 (Ho et al. Eq. 7 with x_0 from Eq. 4; equal to
    their Eq. 11). ``clip_denoised`` clamps the predicted x_0 to [-1, 1]. Returns a dict with ``mean``,
    ``variance``, ``log_variance``, ``pred_x0`` and ``eps``, each shaped like x_t.
    """
    var_type = resolve_var_type(var_type, model_output, x_t)
    eps, v = split_output(model_output, x_t)
    log_variance = model_log_variance(schedule, t, x_t, var_type, v)
    pred_x0 = schedule.predict_x0_from_eps(x_t, t, eps)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    mean, _, _ = schedule.q_posterior_mean_variance(pred_x0, x_t, t)
    return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance,
            "pred_x0": pred_x0, "eps": eps}


def prior_bpd(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per example [N]. No parameters: the
    bound's constant term, small when alpha_bar_T is close to 0."""
    t = torch.full((x0.shape[0],), schedule.T - 1, dtype=torch.long, device=x0.device)
    mean, _, log_variance = schedule.q_mean_variance(x0, t)
    return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))) / LOG2


def vb_terms_bpd(schedule: NoiseSchedule, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
                 var_type: str | None = None, clip_denoised: bool = False,
                 detach_mean: bool = False) -> Tensor:
    """One term of the bound per example, in bits per dimension: [N].

    For t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) (Ho et al. Eq. 5).
    For t = 0: L_0 = -log p_theta(x_0 | x_1) under the discretised Gaussian decoder (Ho et al. Eq. 13).
    ``detach_mean`` stops the gradient into the predicted mean, so the term trains only the variance
    (the stop-gradient of L_hybrid, Nichol & Dhariwal 2021, Sec. 3.1).
    """
    if detach_mean:
        eps, v = split_output(model_output, x_t)
        model_output = eps.detach() if v is None else torch.cat([eps.detach(), v], dim=1)
    true_mean, _, true_log_variance = schedule.q_posterior_mean_variance(x0, x_t, t)
    out = p_mean_variance(schedule, model_output, x_t, t, var_type, clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / LOG2
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / LOG2
    return torch.where(t == 0, decoder_nll, kl)


def min_snr_weight(schedule: NoiseSchedule, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma weights ``min(SNR(t), gamma) / SNR(t)`` [N] for the eps MSE (Hang et al. 2023, Sec. 3.4).

    For eps-prediction the MSE in x_0 equals the eps MSE divided by SNR(t); clamping the x_0 weight SNR(t) at
    gamma and dividing by SNR(t) gives this factor: 1 where SNR(t) <= gamma (the noisy steps), gamma / SNR(t)
    below 1 where the image is almost clean.
    """
    if not (isinstance(gamma, (int, float)) and gamma > 0):
        raise ValueError(f"gamma must be a positive number, got {gamma!r}")
    snr = schedule.snr(t).to(t.device)
    return (snr.clamp(max=gamma) / snr).float()


def training_losses(model, schedule: NoiseSchedule, x0: Tensor, t: Tensor, *, y: Tensor | None = None,
                    noise: Tensor | None = None, loss_type: str = "simple", var_type: str | None = None,
                    lambda_vlb: float = 1e-3, snr_gamma: float | None = None,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Per-example losses [N] for a batch x0 [N, ...] at 0-based steps t [N].

    * ``"simple"``: L_simple = ||eps - eps_theta(x_t, t)||^2, averaged over dimensions (Ho et al. Eq. 14,
      Algorithm 1).
    * ``"hybrid"``: L_simple + lambda * L_vlb with lambda = 0.001 (Nichol & Dhariwal Eq. 16). L_vlb is the sum of
      T terms, so its one-sample estimate at a uniform t is T * L_t; the bound term sees a detached mean.
      Needs a learned variance.
    * ``"vlb"``: T * L_t, the one-sample estimate of the whole bound (minus the constant prior term).
    ``snr_gamma``: weight the eps MSE by :func:`min_snr_weight` (``mse`` stays unweighted, the bound term of
    ``"hybrid"`` is untouched, so the variance is still learned from the bound). The model is called as model(x_t, timestep_map[t], y). Returns ``loss``, ``mse`` and, for the bound, ``vb``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if noise is None:
        noise = randn_like(x0, generator)
    x_t = schedule.q_sample(x0, t, noise)
    model_output = model(x_t, schedule.timestep_map.to(t.device)[t], y)
    eps, v = split_output(model_output, x_t)
    terms = {"mse": mean_flat((noise - eps.float()) ** 2)}
    mse = terms["mse"] if snr_gamma is None else terms["mse"] * min_snr_weight(schedule, t, snr_gamma)
    if loss_type == "simple":
        terms["loss"] = mse
        return terms
    var_type = resolve_var_type(var_type, model_output, x_t)
    if loss_type == "hybrid" and (v is None or var_type != "learned_range"):
        raise ValueError("loss_type 'hybrid' needs a model with learned variance (learn_sigma=True) "
                         "and var_type 'learned_range'; use loss_type 'simple' for a fixed variance")
    terms["vb"] = vb_terms_bpd(schedule, model_output.float(), x0, x_t, t, var_type,
                               detach_mean=(loss_type == "hybrid"))
    if loss_type == "hybrid":
        terms["loss"] = mse + lambda_vlb * schedule.T * terms["vb"]
    else:
        terms["loss"] = schedule.T * terms["vb"]
    return terms


class UniformSampler:
    """t ~ Uniform{0, ..., T-1}; the importance weights are all 1."""

    def __init__(self, T: int):
        self.T = T
        self._weights = torch.ones(T, dtype=torch.float64)

    def weights(self) -> Tensor:
        return self._weights

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw a batch of timesteps and the weights 1 / (T p_t) that keep the loss estimate unbiased."""
        p = self.weights() / self.weights().sum()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.T * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:  # the uniform sampler learns nothing
        pass


class ImportanceSampler(UniformSampler):
    """Importance sampling of t for L_vlb (Nichol & Dhariwal 2021, Sec. 3.3).

    p_t is proportional to sqrt(E[L_t^2]), estimated from the last ``history`` losses of each t; until
    every t has ``history`` losses stored, t is uniform. A small uniform part (``uniform_prob``) keeps
    every p_t positive, as in the OpenAI code.
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 1e-3):
        super().__init__(T)
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(T, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(T, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def weights(self) -> Tensor:
        if not self.warmed_up():
            return torch.ones(self.T, dtype=torch.float64)
        w = (self.loss_history ** 2).mean(dim=-1).sqrt()
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.T

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Store the per-example losses of a batch (a ring of the last ``history`` values per t)."""
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.loss_counts[step] == self.history:
                self.loss_history[step, :-1] = self.loss_history[step, 1:].clone()
                self.loss_history[step, -1] = loss
            else:
                self.loss_history[step, self.loss_counts[step]] = loss
                self.loss_counts[step] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.loss_history.copy_(state["loss_history"])
        self.loss_counts.copy_(state["loss_counts"])
