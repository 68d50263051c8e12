"""Samplers: ancestral DDPM (fixed or learned variance, full or respaced) and DDIM.

Every sampler is a plain function with one signature: the model, the schedule, a shape (or x_T), the
number of steps, a ``generator``, class labels ``y``, a ``callback(t, x_t, pred_x0)`` called after each
step, a ``guidance`` hook and ``progress=False``. One reverse step is a visible function
(``p_sample_step``, ``ddim_step``); the loops are a few lines each.

* Ancestral sampling: Ho et al. 2020, Algorithm 2, with the variance choices of Nichol & Dhariwal 2021.
* Respacing: Nichol & Dhariwal 2021, Sec. 4: the schedule is cut to the kept steps
  (``NoiseSchedule.respace``) and the model is still given the original timesteps.
* DDIM: Song et al. 2021, Eq. 12, with eta = 0 deterministic and eta = 1 matching the ancestral variance.
* Guidance: ``Guidance.cond_grad`` shifts the ancestral mean (Dhariwal & Nichol 2021, Algorithm 1) and the
  DDIM eps (their Algorithm 2); ``Guidance.model_output`` lets classifier-free guidance combine two passes.
The book explains each in ``theory/ddpm.md``, ``theory/faster_sampling.md`` and ``theory/guided_diffusion.md``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .losses import p_mean_variance, split_output
from .schedule import NoiseSchedule, randn_like

__all__ = ["Guidance", "model_output", "p_sample_step", "ddpm_sample", "ddim_step", "ddim_sample", "sample",
           "sample_in_batches", "SAMPLERS", "respaced"]

SAMPLERS = ("ddpm", "ddim")
Callback = Callable[[int, Tensor, Tensor], None]


class Guidance:
    """The hook through which guidance enters every sampler. This base class guides nothing.

    ``t`` given to both methods holds original training timesteps (what the model and a noise-aware
    classifier were trained on), even when sampling with a respaced schedule.
    """

    def model_output(self, model, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The model output used by the sampler; classifier-free guidance combines two passes here."""
        return model(x, t, y)

    def cond_grad(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor | None:
        """scale * grad_x log p(y | x_t) for classifier guidance, or None for no shift."""
        return None


_NO_GUIDANCE = Guidance()


def respaced(schedule: NoiseSchedule, steps: int | str | Sequence[int] | None, sampler: str) -> NoiseSchedule:
    """The schedule a sampler walks: all T steps (``steps=None`` or T), or a respaced one.

    An int N gives N evenly spread steps (``"ddimN"`` striding for DDIM when T is a multiple of N, as in the
    OpenAI code); a string is passed to ``NoiseSchedule.respace`` (``"10,15,20"``, ``"ddim50"``).
    """
    if steps is None:
        return schedule
    if isinstance(steps, int):
        if isinstance(steps, bool) or not 1 <= steps <= schedule.T:
            raise ValueError(f"steps must lie in [1, T={schedule.T}], got {steps!r}")
        if steps == schedule.T:
            return schedule
        if sampler == "ddim" and schedule.T % steps == 0:
            return schedule.respace(f"ddim{steps}")
    return schedule.respace(steps)


def model_output(model, schedule: NoiseSchedule, x: Tensor, t: Tensor, y: Tensor | None = None,
                 guidance: Guidance | None = None) -> Tensor:
    """Call the model at the original timesteps of the (possibly respaced) indices t [N]."""
    t_model = schedule.timestep_map.to(t.device)[t]
    out = (guidance or _NO_GUIDANCE).model_output(model, x, t_model, y)
    return out.to(x.dtype)


def _batch_t(i: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


def _initial_noise(model, schedule, shape, x_T, generator, device) -> Tensor:
    if x_T is not None:
        return x_T
    if shape is None:
        raise ValueError("give either shape (e.g. (16, 1, 28, 28)) or x_T")
    if device is None:
        device = next(iter(model.parameters())).device if hasattr(model, "parameters") else "cpu"
    return randn_like(torch.empty(tuple(shape), device=device), generator)


def _steps(schedule: NoiseSchedule, progress: bool, desc: str):
    indices = range(schedule.T - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        return tqdm(indices, desc=desc, leave=False)
    return indices


def p_sample_step(model, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, *, y: Tensor | None = None,
                  guidance: Guidance | None = None, var_type: str | None = None, clip_denoised: bool = True,
                  generator: torch.Generator | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
    """One ancestral step x_t -> x_{t-1} ~ N(mean, Sigma) (Ho et al. Algorithm 2, line 4).

    With classifier guidance the mean is shifted by Sigma * s grad log p(y | x_t) (Dhariwal & Nichol
    Algorithm 1). No noise is added at t = 0. Returns ``sample`` and ``pred_x0``.
    """
    guidance = guidance or _NO_GUIDANCE
    out = p_mean_variance(schedule, model_output(model, schedule, x_t, t, y, guidance), x_t, t,
                          var_type, clip_denoised)
    mean = out["mean"]
    grad = guidance.cond_grad(x_t, schedule.timestep_map.to(t.device)[t], y)
    if grad is not None:
        mean = mean + out["variance"] * grad
    if noise is None:
        noise = randn_like(x_t, generator)
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return {"sample": mean + nonzero * (0.5 * out["log_variance"]).exp() * noise, "pred_x0": out["pred_x0"]}


@torch.no_grad()
def ddpm_sample(model, schedule: NoiseSchedule, shape: Sequence[int] | None = None, *, x_T: Tensor | None = None,
                steps: int | str | None = None, y: Tensor | None = None, generator: torch.Generator | None = None,
                callback: Callback | None = None, guidance: Guidance | None = None, var_type: str | None = None,
                clip_denoised: bool = True, progress: bool = False, device=None) -> Tensor:
    """Ancestral sampling (Ho et al. Algorithm 2), over all T steps or a respaced subset.

    shape: e.g. (N, C, H, W); or x_T [N, ...]. steps: None for all T, an int or a section string for
    respacing. var_type: ``"fixed_small"`` (beta-tilde), ``"fixed_large"`` (beta), ``"learned_range"``, or
    None (learned when the model has variance channels). Returns x_0 [N, ...] (clamped to [-1, 1] when
    ``clip_denoised``).
    """
    sched = respaced(schedule, steps, "ddpm")
    x = _initial_noise(model, sched, shape, x_T, generator, device)
    for i in _steps(sched, progress, "DDPM"):
        t = _batch_t(i, x)
        out = p_sample_step(model, sched, x, t, y=y, guidance=guidance, var_type=var_type,
                            clip_denoised=clip_denoised, generator=generator)
        if callback is not None:
            callback(int(sched.timestep_map[i]), x, out["pred_x0"])
        x = out["sample"]
    return x


def ddim_step(schedule: NoiseSchedule, eps: Tensor, x_t: Tensor, t: int | Tensor, t_prev: int | Tensor,
              eta: float = 0.0, noise: Tensor | None = None, generator: torch.Generator | None = None,
              clip_denoised: bool = False) -> Tensor:
    """One DDIM step from index t to t_prev (Song et al. 2021, Eq. 12); t_prev = -1 means "to x_0".

    x_{t_prev} = sqrt(ab_prev) x0_pred + sqrt(1 - ab_prev - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev) (their Eq. 16). eta = 0 is
    deterministic; eta = 1 gives the ancestral posterior variance. Indices are into ``schedule``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    t = torch.as_tensor(t, dtype=torch.long).expand(x_t.shape[0]).to(x_t.device)
    t_prev = torch.as_tensor(t_prev, dtype=torch.long).expand(x_t.shape[0]).to(x_t.device)
    if (t_prev >= t).any() or (t_prev < -1).any():
        raise ValueError("t_prev must satisfy -1 <= t_prev < t")
    ab_t = schedule.extract(schedule.alpha_bar, t, x_t)
    ab_all = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alpha_bar])  # index 0 = "before t = 0"
    ab_prev = ab_all.to(x_t.device)[t_prev + 1].to(x_t.dtype).reshape(ab_t.shape)
    x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
    sigma = eta * ((1 - ab_prev) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_prev).sqrt()
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            noise = randn_like(x_t, generator)
        x_prev = x_prev + sigma * noise
    return x_prev


@torch.no_grad()
def ddim_sample(model, schedule: NoiseSchedule, shape: Sequence[int] | None = None, *, x_T: Tensor | None = None,
                steps: int | str | None = None, eta: float = 0.0, y: Tensor | None = None,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                guidance: Guidance | None = None, clip_denoised: bool = True, progress: bool = False,
                device=None, var_type: str | None = None) -> Tensor:
    """DDIM sampling (Song et al. 2021) over all T steps or a respaced subset (``steps``).

    Classifier guidance shifts eps by -sqrt(1 - alpha_bar_t) s grad log p(y | x_t) (Dhariwal & Nichol
    Algorithm 2). ``var_type`` is accepted for a uniform signature and ignored: DDIM sets its own variance.
    Returns x_0 [N, ...].
    """
    guidance = guidance or _NO_GUIDANCE
    sched = respaced(schedule, steps, "ddim")
    x = _initial_noise(model, sched, shape, x_T, generator, device)
    for i in _steps(sched, progress, "DDIM"):
        t = _batch_t(i, x)
        eps, _ = split_output(model_output(model, sched, x, t, y, guidance), x)
        grad = guidance.cond_grad(x, sched.timestep_map.to(x.device)[t], y)
        if grad is not None:
            eps = eps - sched.extract(sched.sqrt_one_minus_alpha_bar, t, x) * grad
        pred_x0 = sched.predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            eps = sched.predict_eps_from_x0(x, t, pred_x0)
        x_next = ddim_step(sched, eps, x, i, i - 1, eta=eta, generator=generator)
        if callback is not None:
            callback(int(sched.timestep_map[i]), x, pred_x0)
        x = x_next
    return x


def sample(model, schedule: NoiseSchedule, shape: Sequence[int] | None = None, *, sampler: str = "ddpm",
           **kwargs) -> Tensor:
    """Dispatch to ``ddpm_sample`` or ``ddim_sample`` by name; the keyword arguments are theirs."""
    if sampler == "ddpm":
        kwargs.pop("eta", None)
        return ddpm_sample(model, schedule, shape, **kwargs)
    if sampler == "ddim":
        return ddim_sample(model, schedule, shape, **kwargs)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def sample_in_batches(model, schedule: NoiseSchedule, shape: Sequence[int], n: int, *, batch_size: int,
                      y: Tensor | None = None, **kwargs) -> Tensor:
    """``n`` samples of ``shape`` (one image, e.g. (1, 28, 28)) drawn ``batch_size`` at a time with :func:`sample`.

    ``y``: labels ``[n]`` or None, cut into the same batches. The keyword arguments (``sampler``, ``steps``,
    ``generator``, ``guidance``, ...) go to every call; one generator is used by the batches in turn. Returns
    ``[n, *shape]`` on the CPU.
    """
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        out.append(sample(model, schedule, (b, *shape), y=None if y is None else y[i: i + b], **kwargs).cpu())
    return torch.cat(out)

