"""Editing with a trained model, without retraining it: inpainting, SDEdit and DDIM inversion.

Every function takes any trained eps-prediction model with the networks' call ``model(x, t, y)`` (a U-Net, a DiT,
the exact :class:`ddpm.analytic.GaussianMixtureEps`) and the samplers' conventions: a ``generator``, class labels
``y``, a ``guidance`` hook (classifier-free guidance; classifier guidance where the step is ancestral), a
``callback(t, x_t, pred_x0)`` after each step and ``progress=False``.

* :func:`inpaint` fills the pixels where ``mask`` is 1 (the region to *generate*) so that they agree with the
  ``known`` pixels, by one of three rules on the ancestral sampler of a respaced schedule:
  ``"replace"``: after each step the known region is replaced by a fresh draw of q(x_t | known) (Song et al.
  2021's imputation; the 2015 paper's r(x_0) in its simplest form); ``"repaint"``: the same with RePaint's
  resampling (Lugmayr et al. 2022): after a stretch of ``jump_length`` steps down, the state is noised back up
  by the forward kernel and the stretch is walked again, ``resample`` times in all; ``"dps"``: diffusion
  posterior sampling (Chung et al. 2023, Algorithm 1): each ancestral step is followed by a gradient step on
  ||(1 - mask) (known - x0_hat(x_t))||^2 with the step size ``dps_scale`` / ||...||. The known pixels are
  returned exactly.
* :func:`sdedit` (Meng et al. 2022) noises an image to the step t_0 of ``strength`` and denoises it.
* :func:`ddim_invert` runs deterministic DDIM toward noise (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021's
  ``ddim_reverse_sample``): the inverse of ``ddim_sample(..., clip_denoised=False)`` over the same steps, exact
  in the limit of small steps.

The book derives each in ``theory/editing.md`` and measures them in ``notebooks/editing.ipynb``.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

from .losses import p_mean_variance
from .samplers import (Callback, Guidance, _eps_and_x0, _NO_GUIDANCE, ancestral_draw, ddim_sample, ddpm_sample,
                       model_output, p_sample_step, with_progress)
from .schedule import NoiseSchedule, randn_like
from .spacing import SIGMA_MAX, respaced, trailing_steps

__all__ = ["INPAINT_METHODS", "inpaint", "inpaint_nfe", "repaint_schedule", "region_mask", "MASKS", "sdedit",
           "sdedit_start", "ddim_invert", "slerp"]

INPAINT_METHODS = ("replace", "repaint", "dps")
MASKS = ("top", "bottom", "left", "right", "center")


def region_mask(name: str, height: int, width: int) -> Tensor:
    """A named mask [1, height, width] of ones on the region to generate: half the image (``top``, ``bottom``,
    ``left``, ``right``) or its central square of half the side (``center``)."""
    if name not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {name!r}")
    m = torch.zeros(1, height, width)
    h, w = height // 2, width // 2
    if name == "top":
        m[:, :h] = 1
    elif name == "bottom":
        m[:, h:] = 1
    elif name == "left":
        m[:, :, :w] = 1
    elif name == "right":
        m[:, :, w:] = 1
    else:
        m[:, height // 4:height // 4 + h, width // 4:width // 4 + w] = 1
    return m


def _check_mask(known: Tensor, mask: Tensor) -> Tensor:
    """``mask`` as a float tensor of known's shape, 1 where to generate; refuses a mask that is not 0/1, does not
    broadcast, or leaves nothing to generate or nothing known in some image."""
    mask = torch.as_tensor(mask, device=known.device)
    try:
        mask = torch.broadcast_to(mask, known.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the images' "
                         f"{tuple(known.shape)}") from None
    mask = mask.to(known.dtype)
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold 0 (known) and 1 (generate) only")
    per_image = mask.reshape(mask.shape[0], -1).mean(1)
    if (per_image == 0).any() or (per_image == 1).any():
        raise ValueError("mask must leave some pixels to generate and some known in every image "
                         "(an empty mask is the input, a full one is plain sampling)")
    return mask


def repaint_schedule(steps: int, jump_length: int = 5, resample: int = 2) -> list[int]:
    """The respaced indices RePaint visits (Lugmayr et al. 2022, their ``get_schedule_jump``): from ``steps - 1``
    down to -1 (x_0), where every ``jump_length`` steps below the top the walk goes back up ``jump_length`` steps
    and repeats the stretch, until it has been walked ``resample`` times. ``resample=1`` is the plain walk."""
    for name, v in (("steps", steps), ("jump_length", jump_length), ("resample", resample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    left = {j: resample - 1 for j in range(0, steps - jump_length, jump_length)}
    t, visited = steps, []
    while t >= 1:
        t -= 1
        visited.append(t)
        if left.get(t, 0) > 0:
            left[t] -= 1
            for _ in range(jump_length):
                t += 1
                visited.append(t)
    return visited + [-1]


def inpaint_nfe(method: str, steps: int, jump_length: int = 5, resample: int = 2) -> int:
    """Network evaluations per image: one per step down (``dps`` adds a backward pass to each)."""
    if method not in INPAINT_METHODS:
        raise ValueError(f"method must be one of {', '.join(INPAINT_METHODS)}, got {method!r}")
    if method != "repaint":
        return steps
    path = repaint_schedule(steps, jump_length, resample)
    return sum(b < a for a, b in zip(path, path[1:]))


def _noised(schedule: NoiseSchedule, known: Tensor, i: int, generator) -> Tensor:
    """A draw of q(x_i | known) on the respaced ``schedule`` (i = -1: the known pixels themselves)."""
    if i < 0:
        return known
    t = torch.full((known.shape[0],), i, dtype=torch.long, device=known.device)
    return schedule.q_sample(known, t, generator=generator)


def _renoise(schedule: NoiseSchedule, x: Tensor, i: int, j: int, generator) -> Tensor:
    """A draw of q(x_j | x_i) for j > i on the respaced schedule: sqrt(ab_j / ab_i) x_i + sqrt(1 - ab_j / ab_i) z
    (ab_{-1} = 1)."""
    ab = schedule.alpha_bar
    ratio = float(ab[j] / (ab[i] if i >= 0 else 1.0))
    return math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * randn_like(x, generator)


def _dps_step(model, sched: NoiseSchedule, x: Tensor, t: Tensor, known: Tensor, keep: Tensor, y, guidance,
              var_type, clip_denoised: bool, scale: float, generator) -> dict[str, Tensor]:
    """One ancestral step followed by Chung et al.'s gradient step, from one network evaluation with its backward
    pass."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        out = p_mean_variance(sched, model_output(model, sched, x_in, t, y, guidance), x_in, t, var_type,
                              clip_denoised)
        residual = ((known - out["pred_x0"]) * keep).flatten(1).pow(2).sum(1)  # ||y - A x0_hat||^2 [N]
        grad = torch.autograd.grad(residual.sum(), x_in)[0]
    norm = residual.detach().sqrt().clamp(min=1e-12).reshape(-1, *([1] * (x.ndim - 1)))
    out = {k: v.detach() for k, v in out.items()}
    cond = guidance.cond_grad(x, sched.timestep_map.to(t.device)[t], y)
    sample = ancestral_draw(out, x, t, cond, generator=generator)
    return {"sample": sample - scale / norm * grad, "pred_x0": out["pred_x0"]}


@torch.no_grad()
def inpaint(model, schedule: NoiseSchedule, known: Tensor, mask: Tensor, *, method: str = "replace",
            steps: int | None = 50, y: Tensor | None = None, guidance: Guidance | None = None,
            jump_length: int = 5, resample: int = 2, dps_scale: float = 1.0, var_type: str | None = None,
            clip_denoised: bool = True, generator: torch.Generator | None = None,
            callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Fill the pixels of ``known`` [N, ...] where ``mask`` is 1 so that they agree with the rest.

    ``mask``: broadcastable to ``known``, 1 (or True) on the pixels to generate, 0 on the known ones. ``steps``:
    noise levels of the respaced ancestral sampler (None: all T). ``method``: ``"replace"``, ``"repaint"``
    (``jump_length``, ``resample``: RePaint's j and r; about ``resample`` times the evaluations,
    :func:`inpaint_nfe`) or ``"dps"`` (step size ``dps_scale``, Chung et al.'s zeta'; one backward pass per step).
    Returns x_0 [N, ...] with the known pixels equal to ``known``.
    """
    if method not in INPAINT_METHODS:
        raise ValueError(f"method must be one of {', '.join(INPAINT_METHODS)}, got {method!r}")
    if method == "dps" and not dps_scale >= 0:
        raise ValueError(f"dps_scale must be >= 0, got {dps_scale!r}")
    guidance = guidance or _NO_GUIDANCE
    mask = _check_mask(known, mask)
    keep = 1 - mask
    sched = respaced(schedule, steps, "ddpm")
    path = repaint_schedule(sched.T, jump_length, resample) if method == "repaint" else \
        list(range(sched.T - 1, -2, -1))
    paste = method != "dps"  # DPS lets the gradient pull every pixel; the others hold the known ones on their path
    x = randn_like(known, generator)
    if paste:
        x = mask * x + keep * _noised(sched, known, sched.T - 1, generator)
    for i, j in with_progress(list(zip(path, path[1:])), progress, f"inpaint ({method})"):
        if j > i:  # RePaint: back up from level i to level j with the forward kernel
            x = _renoise(sched, x, i, j, generator)
            continue
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        if method == "dps":
            out = _dps_step(model, sched, x, t, known, keep, y, guidance, var_type, clip_denoised, dps_scale,
                            generator)
        else:
            out = p_sample_step(model, sched, x, t, y=y, guidance=guidance, var_type=var_type,
                                clip_denoised=clip_denoised, generator=generator)
        if callback is not None:
            callback(int(sched.timestep_map[i]), x, out["pred_x0"])
        x = mask * out["sample"] + keep * _noised(sched, known, j, generator) if paste else out["sample"]
    return mask * x + keep * known


def sdedit_start(schedule: NoiseSchedule, strength: float) -> int:
    """The step t_0 = ceil(strength T) - 1 at which SDEdit starts: strength 1 is pure sampling from step T - 1."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength!r}")
    return max(math.ceil(strength * schedule.T - 1e-9) - 1, 0)


@torch.no_grad()
def sdedit(model, schedule: NoiseSchedule, x: Tensor, strength: float, *, steps: int | None = None,
           sampler: str = "ddpm", eta: float = 0.0, y: Tensor | None = None, guidance: Guidance | None = None,
           var_type: str | None = None, clip_denoised: bool = True, generator: torch.Generator | None = None,
           callback: Callback | None = None, progress: bool = False) -> Tensor:
    """SDEdit (Meng et al. 2022): x [N, ...] noised by q(x_{t_0} | x) to t_0 = :func:`sdedit_start` and denoised.

    ``steps``: how many of the steps 0..t_0 the reverse walk visits (evenly spread, t_0 included; None: all);
    ``sampler``: ``"ddpm"`` (ancestral, the paper's stochastic reverse process) or ``"ddim"`` (with ``eta``).
    Returns x_0 [N, ...].
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be ddpm or ddim, got {sampler!r}")
    t0 = sdedit_start(schedule, strength)
    n = t0 + 1 if steps is None else steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    sched = schedule.keep(trailing_steps(t0, n))
    x_t = schedule.q_sample(x, torch.full((x.shape[0],), t0, dtype=torch.long, device=x.device),
                            generator=generator)
    common = dict(x_T=x_t, y=y, generator=generator, callback=callback, guidance=guidance,
                  clip_denoised=clip_denoised, progress=progress, var_type=var_type)
    if sampler == "ddpm":  # the kept steps are the whole schedule the samplers walk
        return ddpm_sample(model, sched, **common)
    return ddim_sample(model, sched, eta=eta, **common)


@torch.no_grad()
def ddim_invert(model, schedule: NoiseSchedule, x0: Tensor, steps: int | str | None = None, *,
                y: Tensor | None = None, guidance: Guidance | None = None, spacing: str = "trailing",
                sigma_max: float | None = SIGMA_MAX, callback: Callback | None = None,
                progress: bool = False) -> Tensor:
    """Deterministic DDIM run from x0 [N, ...] toward noise over the steps that ``ddim_sample`` walks with the same
    ``steps``, ``spacing`` and ``sigma_max``; returns the state at the top level (what to pass as ``x_T``).

    Each step evaluates the network at the lower end of the interval and moves to the upper one,
    x_next = sqrt(ab_next) x0_hat(x) + sqrt(1 - ab_next) eps(x); at the clean end x0_hat is x0 itself and the
    network is asked at the lowest kept step. The sampler evaluates at the upper end, so the pair is exact only as
    the steps shrink. Nothing is clipped: use ``ddim_sample(..., clip_denoised=False)`` to reconstruct.
    """
    guidance = guidance or _NO_GUIDANCE
    sched = respaced(schedule, steps, "ddim", spacing, sigma_max)
    x = x0
    for i in with_progress(range(sched.T), progress, "DDIM inversion"):
        src = max(i - 1, 0)
        eps, pred_x0 = _eps_and_x0(model, sched, x, src, y, guidance, clip_denoised=False)
        if i == 0:
            pred_x0 = x0
        ab_next = sched.alpha_bar[i].item()
        x_next = (math.sqrt(ab_next) * pred_x0.double() + math.sqrt(1 - ab_next) * eps.double()).to(x.dtype)
        if callback is not None:
            callback(int(sched.timestep_map[i]), x, pred_x0)
        x = x_next
    return x


def slerp(a: Tensor, b: Tensor, w: float | Tensor) -> Tensor:
    """Spherical interpolation between a and b [N, ...] per image, w in [0, 1] (Shoemake 1985): the path along which
    the norm of a Gaussian vector stays near sqrt(d), where a straight line would shrink it."""
    w = torch.as_tensor(w, dtype=torch.float64)
    af, bf = a.flatten(1).double(), b.flatten(1).double()
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp(min=1e-12)
    theta = cos.clamp(-1.0, 1.0).acos().reshape(-1, 1)
    small = theta < 1e-6
    s = theta.sin().clamp(min=1e-12)
    out = torch.where(small, (1 - w) * af + w * bf,
                      ((1 - w) * theta).sin() / s * af + (w * theta).sin() / s * bf)
    return out.reshape(a.shape).to(a.dtype)
