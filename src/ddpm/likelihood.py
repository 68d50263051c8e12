"""Negative log-likelihood in bits per dimension from the variational bound.

For data quantised to 8 bits and scaled to [-1, 1], the bound
    L = L_T + sum_{t=1}^{T-1} L_{t-1} + L_0        (Ho et al. 2020, Eq. 5)
upper-bounds -log p(x_0) of the discrete data. Dividing by the number of dimensions and by log 2 gives
bits/dim, the unit of Nichol & Dhariwal (2021, Table 1-2). ``nll_bits_per_dim`` sums all T terms exactly;
``nll_estimate`` samples K timesteps per example, an unbiased estimate of the same sum with its standard
error. The book explains both in ``theory/improved_ddpm.md`` and ``theory/evaluation.md``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .losses import prior_bpd, vb_terms_bpd
from .samplers import model_output
from .schedule import NoiseSchedule, randn_like

__all__ = ["bpd_terms", "nll_bits_per_dim", "nll_estimate"]


def _check_data(x0: Tensor) -> None:
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must have shape [N, ...] with N >= 1, got {tuple(x0.shape)}")


def _term(model, schedule, x0, t, y, var_type, clip_denoised, generator) -> Tensor:
    x_t = schedule.q_sample(x0, t, randn_like(x0, generator))
    out = model_output(model, schedule, x_t, t, y)
    return vb_terms_bpd(schedule, out, x0, x_t, t, var_type, clip_denoised)


@torch.no_grad()
def bpd_terms(model, schedule: NoiseSchedule, x0: Tensor, y: Tensor | None = None, var_type: str | None = None,
              clip_denoised: bool = True, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Every term of the bound for a batch x0 [N, ...] in [-1, 1].

    Returns ``vb`` [N, T] (column t is L_t in bits/dim: the decoder NLL at t = 0, the KL terms after),
    ``prior`` [N] (L_T) and ``total`` [N] = prior + sum over t. One model call per t, each with its own
    draw of x_t ~ q(x_t | x_0).
    """
    _check_data(x0)
    vb = torch.empty(x0.shape[0], schedule.T, dtype=torch.float64, device=x0.device)
    for i in range(schedule.T):
        t = torch.full((x0.shape[0],), i, dtype=torch.long, device=x0.device)
        vb[:, i] = _term(model, schedule, x0, t, y, var_type, clip_denoised, generator).double()
    prior = prior_bpd(schedule, x0).double()
    return {"vb": vb, "prior": prior, "total": vb.sum(dim=1) + prior}


def nll_bits_per_dim(model, schedule: NoiseSchedule, x0: Tensor, y: Tensor | None = None,
                     var_type: str | None = None, clip_denoised: bool = True,
                     generator: torch.Generator | None = None) -> Tensor:
    """The bound in bits/dim per example [N]: the exact sum of all T terms plus the prior term."""
    return bpd_terms(model, schedule, x0, y, var_type, clip_denoised, generator)["total"]


@torch.no_grad()
def nll_estimate(model, schedule: NoiseSchedule, x0: Tensor, K: int, y: Tensor | None = None,
                 var_type: str | None = None, clip_denoised: bool = True,
                 generator: torch.Generator | None = None) -> tuple[float, float]:
    """Unbiased estimate of the mean bound in bits/dim over the batch, from K uniform timesteps per example.

    For each example, prior + T * mean_k L_{t_k} with t_k ~ Uniform{0..T-1} has the exact sum as its
    expectation. Returns (mean over the batch, standard error of that mean); the error covers both the
    sampling of t and the spread across examples.
    """
    _check_data(x0)
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K (the number of sampled timesteps) must be an integer >= 1, got {K!r}")
    n = x0.shape[0]
    per_example = torch.zeros(n, dtype=torch.float64, device=x0.device)
    for _ in range(K):
        t = torch.randint(0, schedule.T, (n,), generator=generator,
                          device="cpu" if generator is None else generator.device).to(x0.device)
        per_example += _term(model, schedule, x0, t, y, var_type, clip_denoised, generator).double()
    per_example = prior_bpd(schedule, x0).double() + schedule.T * per_example / K
    mean = per_example.mean().item()
    stderr = per_example.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return mean, stderr
