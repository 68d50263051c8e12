"""Which timesteps a sampler visits: the respaced schedule of ancestral sampling and DDIM, and the noise levels of
the ODE solvers (Heun, DPM-Solver++).

Timesteps are 0-based as everywhere in the package (``t = T - 1`` is the noisiest step), and
sigma = sqrt((1 - alpha_bar) / alpha_bar) is the noise level of Karras et al. (2022).

* DDIM with N steps walks *trailing* steps by default: evenly spaced from the top step down, so that its last
  jump, to x_0, is as long as the others. Lin et al. (2024), Table 2, find it better than the *leading* stride
  0, T/N, ..., T - T/N of the OpenAI code (``"ddimN"``), which on the cosine schedule with N = 10 starts at
  t = 900, where 15% of the signal is still present, and whose start depends on whether N divides T.
  ``spacing="leading"`` keeps the OpenAI steps. The top step is T - 1 unless the schedule's noise level there
  exceeds sigma_max = 80, as it does for both of the book's schedules (about 150 for the linear one, 20,000 for
  the cosine one after its max_beta clipping): then it is the last step with sigma <= 80, the level at which the
  solvers below start too. Starting higher does not help an epsilon-predicting network: its prediction of x_0 is
  (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), so at sigma = 20,000 an error of 0.01 in eps becomes an error
  of about 200 in x_0, which clipping to the pixel range hides but nothing bounds for latents. ``sigma_max=None``
  starts at T - 1 (Lin et al.'s trailing spacing exactly; also the section string ``"trailingN"``).
* Ancestral sampling with N steps keeps the OpenAI even spacing (Nichol & Dhariwal 2021, Sec. 4), which already
  includes both T - 1 and 0.
* The solvers spread their levels uniformly in t (trailing), in log-SNR (Lu et al. 2022) or in sigma^(1/rho)
  (Karras et al. 2022, Eq. 5). The last two start at sigma_max = 80 (EDM's value, Karras et al. 2022, Table 1)
  where the schedule reaches beyond it: on the cosine schedule sigma_{T-1} is about 20,000, and spreading the
  levels from there would spend most of them at pure noise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .schedule import NoiseSchedule, trailing_timesteps

__all__ = ["DDIM_SPACINGS", "SPACINGS", "KARRAS_RHO", "SIGMA_MAX", "respaced", "solver_timesteps", "trailing_steps"]

DDIM_SPACINGS = ("trailing", "leading")
SPACINGS = ("uniform", "logsnr", "karras")
KARRAS_RHO = 7.0  # Karras et al. (2022), Eq. 5
SIGMA_MAX = 80.0  # Karras et al. (2022), Table 1: the largest noise level EDM samples from


def respaced(schedule: NoiseSchedule, steps: int | str | Sequence[int] | None, sampler: str,
             spacing: str = "trailing", sigma_max: float | None = SIGMA_MAX) -> NoiseSchedule:
    """The schedule a sampler walks: all T steps (``steps=None`` or T), or a respaced one.

    An int N for ``sampler="ddim"`` gives N trailing steps (``spacing="trailing"``, the default; Lin et al. 2024,
    Table 2): evenly spaced from the top step tau down, tau - k (tau + 1) / N for k = 0 .. N - 1 (rounded), where tau
    is the last step whose noise level does not exceed ``sigma_max`` (T - 1 with ``sigma_max=None`` or when the
    schedule stays below it; for T = 1000 and N = 10 uncapped: 999, 899, ..., 99); N >= tau + 1 keeps every step
    up to tau. With ``spacing="leading"`` it
    gives the OpenAI code's ``"ddimN"`` stride 0, T/N, ..., T - T/N when N divides T and its even spacing otherwise.
    An int N for any other sampler gives N steps spread evenly over [0, T - 1] (the OpenAI respacing, which includes
    T - 1 and 0); ``spacing`` and ``sigma_max`` then play no part. A string is passed to ``NoiseSchedule.respace``
    (``"10,15,20"``, ``"ddim50"``, ``"trailing50"``).
    """
    if spacing not in DDIM_SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(DDIM_SPACINGS)}, got {spacing!r}")
    if steps is None:
        return schedule
    if isinstance(steps, int):
        if isinstance(steps, bool) or not 1 <= steps <= schedule.T:
            raise ValueError(f"steps must lie in [1, T={schedule.T}], got {steps!r}")
        if sampler == "ddim" and spacing == "trailing":
            top = _top_step(schedule, sigma_max)
            if steps >= top + 1:  # every step up to the cap
                return schedule if top == schedule.T - 1 else schedule.keep(range(top + 1))
            return schedule.keep(trailing_steps(top, steps))
        if steps == schedule.T:
            return schedule
        if sampler == "ddim" and schedule.T % steps == 0:
            return schedule.respace(f"ddim{steps}")
    return schedule.respace(steps)


def trailing_steps(top: int, n: int) -> list[int]:
    """n steps evenly spaced down from ``top``, top - k (top + 1) / n for k = 0 .. n - 1 (rounded), ascending; every
    step 0..top when n >= top + 1."""
    if n >= top + 1:
        return list(range(top + 1))
    return sorted(round(top - k * (top + 1) / n) for k in range(n))


def _top_step(schedule: NoiseSchedule, sigma_max: float | None) -> int:
    """The last step whose sigma does not exceed ``sigma_max`` (T - 1 when ``sigma_max`` is None or above them all)."""
    if sigma_max is None:
        return schedule.T - 1
    if isinstance(sigma_max, bool) or not isinstance(sigma_max, (int, float)) or not 0 < sigma_max < math.inf:
        raise ValueError(f"sigma_max must be a positive number (EDM uses 80) or None for no cap, got {sigma_max!r}")
    ab = schedule.alpha_bar
    below = int((((1 - ab) / ab).sqrt() <= sigma_max).sum())  # sigma rises with t: these are steps 0 .. below - 1
    if below == 0:
        sigma_0 = math.sqrt((1 - float(ab[0])) / float(ab[0]))
        raise ValueError(f"sigma_max={sigma_max} lies below every noise level of the schedule (sigma at step 0 is "
                         f"{sigma_0:.3g}); raise it or pass sigma_max=None")
    return below - 1


def solver_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "logsnr",
                     sigma_max: float | None = SIGMA_MAX) -> Tensor:
    """The ``steps`` timesteps a solver visits, as descending 0-based indices into ``schedule`` ``[steps]``.

    ``"uniform"``: evenly spread in t from T - 1 down, trailing (T - 1, T - 1 - T/N, ..., T/N - 1), so the last
    jump to x_0 is as long as the others; it ignores ``sigma_max``. ``"logsnr"``: evenly spread in
    lambda = log(alpha / sigma) (Lu et al. 2022). ``"karras"``: sigma_i^(1/rho) evenly spread, rho = 7, with the
    EDM sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022, Eq. 5). Both run from the top step down to
    step 0, where the top step is the last one whose sigma does not exceed ``sigma_max`` (80 as in EDM; the step
    nearest to min(sigma_max, sigma_{T-1}) from below), or T - 1 with ``sigma_max=None``. Each value is snapped to
    the nearest step of the schedule, and collisions are pushed apart.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    T = schedule.T
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, T={T}], got {steps!r}")
    if spacing == "uniform":
        return torch.tensor(trailing_timesteps(T, steps)[::-1], dtype=torch.long)
    top = _top_step(schedule, sigma_max)
    if steps > top + 1:
        raise ValueError(f"steps={steps} exceeds the {top + 1} steps of the schedule with sigma <= "
                         f"sigma_max={sigma_max}; use fewer steps or sigma_max=None")
    ab = schedule.alpha_bar[: top + 1]
    coord = 0.5 * torch.log(ab / (1 - ab)) if spacing == "logsnr" else ((1 - ab) / ab) ** (0.5 / KARRAS_RHO)
    targets = torch.linspace(float(coord[-1]), float(coord[0]), steps, dtype=torch.float64)
    idx = (coord.unsqueeze(0) - targets.unsqueeze(1)).abs().argmin(dim=1).tolist()
    idx[0] = min(idx[0], top)
    for k in range(1, steps):  # strictly decreasing ...
        idx[k] = min(idx[k], idx[k - 1] - 1)
    for k in range(steps):  # ... and room for the steps after (the max of two decreasing sequences decreases)
        idx[k] = max(idx[k], steps - 1 - k)
    return torch.tensor(idx, dtype=torch.long)
