"""Noise schedules and the forward process q(x_t | x_0).

Everything the forward process needs is precomputed once, in float64, and grouped by the
distribution it serves. The book derives each coefficient in ``theory/ddpm.md`` (forward process and
posterior) and ``theory/improved_ddpm.md`` (cosine schedule, respacing).

Index convention (as in the OpenAI code): timesteps are 0-based, ``t = 0`` is the first noising step
and ``t = T - 1`` the last. The papers' 1-based step ``t`` is the code's ``t - 1``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["linear_betas", "cosine_betas", "space_timesteps", "trailing_timesteps", "NoiseSchedule", "SCHEDULES"]

SCHEDULES = ("linear", "cosine")


def _check_T(T: int) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an integer >= 1, got {T!r}")
    return T


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas rising linearly from ``beta_start`` to ``beta_end`` (Ho et al. 2020, Sec. 4: 1e-4 to 0.02, T = 1000).

    Returns a float64 tensor of length T.
    """
    _check_T(T)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    if beta_end < beta_start:
        raise ValueError(f"beta_end must be >= beta_start, got beta_start={beta_start}, beta_end={beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_alpha_bar(t: Tensor | float, s: float = 0.008) -> Tensor:
    """f(t) = cos^2(((t + s) / (1 + s)) * pi / 2) for t in [0, 1] (Nichol & Dhariwal 2021, Eq. 17, unnormalised)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): alpha_bar_t = f(t) / f(0) with f as in ``cosine_alpha_bar``.

    beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at ``max_beta`` to avoid the singularity at t = T.
    Returns a float64 tensor of length T.
    """
    _check_T(T)
    if s < 0:
        raise ValueError(f"s must be >= 0, got {s!r}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta!r}")
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = cosine_alpha_bar(steps, s)
    alpha_bar = f / f[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def trailing_timesteps(T: int, n: int) -> list[int]:
    """N timesteps T/N apart that end at the last one: T - 1, T - 1 - T/N, ..., T/N - 1 (each rounded), ascending.

    The *trailing* spacing of Lin et al. (2024), Table 2: a sampler that walks them starts at t = T - 1, where the
    schedule has removed the most signal, and its last jump, to x_0, is as long as the others. For T = 1000 and
    N = 10: 99, 199, ..., 999. The steps are distinct because T/N >= 1.
    """
    _check_T(T)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"the number of steps must be an integer in [1, T={T}], got {n!r}")
    return sorted(round(T - 1 - k * T / n) for k in range(n))


def _named_count(text: str, prefix: str, T: int) -> int:
    """N of a section string ``"<prefix>N"`` such as ``"ddim50"``, checked to lie in [1, T]."""
    try:
        n = int(text[len(prefix):])
    except ValueError:
        raise ValueError(f"section_counts {text!r}: expected '{prefix}N' with an integer N") from None
    if not 1 <= n <= T:
        raise ValueError(f"section_counts '{prefix}{n}': N must lie in [1, T={T}]")
    return n


def space_timesteps(T: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Which of the T original timesteps to keep (Improved DDPM, Sec. 4, as in the OpenAI code).

    ``section_counts`` is either
      * ``"ddimN"``: N steps 0, k, 2k, ..., T - k with the integer stride k = T / N, as in the OpenAI DDIM code
        (the *leading* spacing: it never visits T - 1, so a sampler starts where signal is left);
      * ``"trailingN"``: N steps T - 1, T - 1 - T/N, ..., T/N - 1 (``trailing_timesteps``; Lin et al. 2024);
      * an int N: N steps spread evenly over [0, T - 1], both ends included;
      * a comma-separated string or sequence such as ``"10,15,20"``: the T steps are cut into as many
        equal sections, and the i-th section keeps that many evenly spaced steps.
    Returns the sorted list of kept 0-based timesteps.
    """
    _check_T(T)
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("trailing"):
            return trailing_timesteps(T, _named_count(text, "trailing", T))
        if text.startswith("ddim"):
            n = _named_count(text, "ddim", T)
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == n:
                    return list(range(0, T, stride))
            raise ValueError(f"section_counts 'ddim{n}': no integer stride gives exactly {n} of T={T} steps; "
                             f"use a plain count such as '{n}' or 'trailing{n}' instead")
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"section_counts {section_counts!r}: expected 'ddimN', 'trailingN', an int or "
                             "'10,15,20'") from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section_counts {section_counts!r}: every count must be >= 1")
    size_per, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"section_counts {section_counts!r}: cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated as in the OpenAI code, so that rounding agrees with it step for step
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class NoiseSchedule:
    """The forward process of a diffusion model, every coefficient precomputed in float64.

    ``betas``: 1-D tensor of length T with values in (0, 1). ``timestep_map[i]`` is the original training
    timestep of index i (the identity unless the schedule was respaced), which is what the model is given.
    All tensor arguments ``t`` are LongTensors of 0-based indices into this schedule, shape [N].
    """

    def __init__(self, betas: Tensor | Iterable[float], timestep_map: Tensor | Iterable[int] | None = None,
                 name: str = "custom"):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().clone()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a 1-D tensor with T >= 1 entries, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("betas must all lie in the open interval (0, 1)")
        self.name = name
        self.T = int(betas.numel())
        if timestep_map is None:
            timestep_map = torch.arange(self.T)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).clone()
        if self.timestep_map.shape != (self.T,):
            raise ValueError(f"timestep_map must have length T={self.T}, got {tuple(self.timestep_map.shape)}")

        # forward process q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I)
        self.betas = betas
        self.alphas = 1.0 - betas
        # closed form q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), Ho et al. Eq. 4
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.alpha_bar_next = torch.cat([self.alpha_bar[1:], torch.zeros(1, dtype=torch.float64)])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        self.log_one_minus_alpha_bar = torch.log1p(-self.alpha_bar)
        # x_0 and eps from each other: x_0 = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps
        self.sqrt_recip_alpha_bar = (1.0 / self.alpha_bar).sqrt()
        self.sqrt_recipm1_alpha_bar = (1.0 / self.alpha_bar - 1.0).sqrt()
        # posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I), Ho et al. Eq. 6-7
        self.posterior_variance = betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        # beta_tilde_0 = 0, so the log is clipped to beta_tilde_1 at t = 0 (as in the OpenAI code)
        if self.T > 1:
            clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        else:
            clipped = self.betas.clone()
        self.posterior_log_variance_clipped = clipped.log()
        self.posterior_mean_coef1 = betas * self.alpha_bar_prev.sqrt() / (1.0 - self.alpha_bar)
        self.posterior_mean_coef2 = (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / (1.0 - self.alpha_bar)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """Linear schedule of Ho et al. (2020)."""
        return cls(linear_betas(T, beta_start, beta_end), name="linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Cosine schedule of Nichol & Dhariwal (2021), Eq. 17."""
        return cls(cosine_betas(T, s, max_beta), name="cosine")

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> "NoiseSchedule":
        """``"linear"`` (betas scaled by 1000 / T so that any T spans the same noise levels, as in the
        OpenAI code) or ``"cosine"``."""
        if name == "linear":
            scale = 1000 / _check_T(T)
            if 0.02 * scale >= 1.0:
                raise ValueError(f"T must be >= 21 for the 'linear' schedule (its betas are scaled by 1000 / T), got {T}")
            return cls.linear(T, 1e-4 * scale, 0.02 * scale)
        if name == "cosine":
            return cls.cosine(T)
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")

    def respace(self, section_counts: str | int | Sequence[int]) -> "NoiseSchedule":
        """A shorter schedule over a subset of the timesteps (Nichol & Dhariwal 2021, Sec. 4).

        The new betas are recomputed from the kept alpha_bar, beta_i = 1 - alpha_bar_{k_i} / alpha_bar_{k_{i-1}},
        so that alpha_bar is unchanged at every kept step; ``timestep_map`` sends each new index to the original
        timestep the model was trained on.
        """
        return self.keep(space_timesteps(self.T, section_counts))

    def keep(self, kept: Sequence[int]) -> "NoiseSchedule":
        """The schedule over the given timesteps ``kept`` (ascending, distinct indices into this schedule), with the
        betas recomputed as in :meth:`respace` so that alpha_bar is unchanged at every kept step."""
        kept = [int(k) for k in kept]
        if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= self.T:
            raise ValueError(f"kept timesteps must be distinct, ascending and in [0, {self.T - 1}], got {kept[:5]}...")
        alpha_bar = self.alpha_bar[kept]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        betas = 1.0 - alpha_bar / prev
        return NoiseSchedule(betas, self.timestep_map[kept], name=f"{self.name}[{len(kept)} of {self.T}]")

    # ------------------------------------------------------------------ helpers
    def check_t(self, t: Tensor) -> Tensor:
        """Validate a LongTensor of 0-based indices into this schedule."""
        if not isinstance(t, Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"t must be an integer tensor of 0-based timesteps, got {type(t).__name__}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(f"t must lie in [0, T-1] = [0, {self.T - 1}], got range "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t

    def extract(self, arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """``arr[t]`` as ``x.dtype`` on ``x.device``, shaped [N, 1, ..., 1] to broadcast against ``x`` [N, ...]."""
        self.check_t(t)
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [N] = [{x.shape[0]}] to match x, got {tuple(t.shape)}")
        out = arr.to(t.device)[t].to(device=x.device, dtype=x.dtype)
        return out.reshape(-1, *([1] * (x.ndim - 1)))

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0) (Ho et al. Eq. 4)."""
        mean = self.extract(self.sqrt_alpha_bar, t, x0) * x0
        variance = self.extract(1.0 - self.alpha_bar, t, x0).expand_as(x0)
        log_variance = self.extract(self.log_one_minus_alpha_bar, t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. Eq. 4).

        x0: [N, ...] in [-1, 1]; t: LongTensor [N] of 0-based steps; noise: like x0, drawn when None.
        """
        if noise is None:
            noise = randn_like(x0, generator)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        return self.extract(self.sqrt_alpha_bar, t, x0) * x0 + self.extract(self.sqrt_one_minus_alpha_bar, t, x0) * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of the posterior q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 6-7)."""
        if x0.shape != x_t.shape:
            raise ValueError(f"x0 and x_t must have the same shape, got {tuple(x0.shape)} and {tuple(x_t.shape)}")
        mean = self.extract(self.posterior_mean_coef1, t, x_t) * x0 + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        variance = self.extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), Eq. 4 solved for x_0."""
        return self.extract(self.sqrt_recip_alpha_bar, t, x_t) * x_t - self.extract(self.sqrt_recipm1_alpha_bar, t, x_t) * eps

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t), Eq. 4 solved for eps."""
        return (self.extract(self.sqrt_recip_alpha_bar, t, x_t) * x_t - x0) / self.extract(self.sqrt_recipm1_alpha_bar, t, x_t)

    def v_from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
        return self.extract(self.sqrt_alpha_bar, t, x0) * eps - self.extract(self.sqrt_one_minus_alpha_bar, t, x0) * x0

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
        return self.extract(self.sqrt_alpha_bar, t, x_t) * x_t - self.extract(self.sqrt_one_minus_alpha_bar, t, x_t) * v

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
        return self.extract(self.sqrt_one_minus_alpha_bar, t, x_t) * x_t + self.extract(self.sqrt_alpha_bar, t, x_t) * v

    def snr(self, t: Tensor | None = None) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (float64), at ``t`` or for every step."""
        snr = self.alpha_bar / (1.0 - self.alpha_bar)
        return snr if t is None else snr[self.check_t(t).cpu()]

    def to_dict(self) -> dict:
        return {"name": self.name, "T": self.T}

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, T={self.T})"


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``; drawn on the generator's device, then moved to ``x``'s."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
