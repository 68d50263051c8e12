"""Samplers: ancestral DDPM (fixed or learned variance, full or respaced), DDIM, Heun and DPM-Solver++(2M).

Every sampler is a plain function with one signature: the model, the schedule, a shape (or x_T), the
number of steps, a ``generator``, class labels ``y``, a ``callback(t, x_t, pred_x0)`` called after each
step, a ``guidance`` hook and ``progress=False``. One reverse step is a visible function
(``p_sample_step``, ``ddim_step``); the loops are a few lines each.

* Ancestral sampling: Ho et al. 2020, Algorithm 2, with the variance choices of Nichol & Dhariwal 2021.
* Respacing: Nichol & Dhariwal 2021, Sec. 4: the schedule is cut to the kept steps
  (``NoiseSchedule.respace``) and the model is still given the original timesteps. Ancestral sampling with N
  steps keeps their even spacing, which includes T - 1 and 0.
* DDIM: Song et al. 2021, Eq. 12, with eta = 0 deterministic and eta = 1 matching the ancestral variance. With N
  steps it walks *trailing* steps by default (Lin et al. 2024, Table 2), evenly spread down from the last step
  whose noise level is at most sigma_max = 80 (T - 1 with ``sigma_max=None``), or with ``spacing="leading"`` the
  OpenAI stride 0, T/N, ..., T - T/N (``"ddimN"``); see ``ddpm.spacing``.
* Heun: Karras et al. 2022, Algorithm 1 (second order, a last Euler step to sigma = 0), in their variables
  x_hat = x / sqrt(alpha_bar) and sigma = sqrt((1 - alpha_bar) / alpha_bar), where eta = 0 DDIM is Euler.
* DPM-Solver++(2M): Lu et al. 2022b, Algorithm 2 (multistep, second order, data prediction).
  Both walk the model's own timesteps, chosen by ``solver_timesteps`` (uniform in t, in log-SNR or Karras); the
  log-SNR and Karras levels start at sigma_max = 80 (Karras et al. 2022) where the schedule reaches beyond it.
* Guidance: ``Guidance.cond_grad`` shifts the ancestral mean (Dhariwal & Nichol 2021, Algorithm 1) and the
  DDIM eps (their Algorithm 2); ``Guidance.model_output`` lets classifier-free guidance combine two passes.
The book explains each in ``theory/ddpm.md``, ``theory/faster_sampling.md``, ``theory/continuous_time.md`` and
``theory/guided_diffusion.md``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import math

import torch
from torch import Tensor

from .losses import p_mean_variance, split_output
from .schedule import NoiseSchedule, randn_like
from .spacing import DDIM_SPACINGS, KARRAS_RHO, SIGMA_MAX, SPACINGS, respaced, solver_timesteps

__all__ = ["Guidance", "model_output", "p_sample_step", "ddpm_sample", "ddim_step", "ddim_sample", "heun_sample",
           "dpm_solver_sample", "solver_timesteps", "nfe", "sample", "sample_in_batches", "SAMPLERS", "SPACINGS",
           "respaced", "DDIM_SPACINGS", "KARRAS_RHO", "SIGMA_MAX", "initial_noise", "with_progress", "in_batches",
           "ancestral_draw"]

SAMPLERS = ("ddpm", "ddim", "heun", "dpm++2m")
DEFAULT_STEPS = {"heun": 18, "dpm++2m": 20}  # EDM's 35 NFE; DPM-Solver++'s 20 NFE
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


def model_output(model, schedule: NoiseSchedule, x: Tensor, t: Tensor, y: Tensor | None = None,
                 guidance: Guidance | None = None) -> Tensor:
    """Call the model at the original timesteps of the (possibly respaced) indices t [N]."""
    t_model = schedule.timestep_map.to(t.device)[t]
    out = (guidance or _NO_GUIDANCE).model_output(model, x, t_model, y)
    return out.to(x.dtype)


def _batch_t(i: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


def initial_noise(model, shape, x_T, generator, device) -> Tensor:
    if x_T is not None:
        return x_T
    if shape is None:
        raise ValueError("give either shape (e.g. (16, 1, 28, 28)) or x_T")
    if device is None:
        tensors = [*model.parameters(), *model.buffers()] if hasattr(model, "parameters") else []
        device = tensors[0].device if tensors else "cpu"
    return randn_like(torch.empty(tuple(shape), device=device), generator)


def with_progress(items, progress: bool, desc: str):
    """``items``, behind a tqdm bar when ``progress``."""
    if progress:
        from tqdm.auto import tqdm
        return tqdm(items, desc=desc, leave=False)
    return items


def _steps(schedule: NoiseSchedule, progress: bool, desc: str):
    return with_progress(range(schedule.T - 1, -1, -1), progress, desc)


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
    grad = guidance.cond_grad(x_t, schedule.timestep_map.to(t.device)[t], y)
    return {"sample": ancestral_draw(out, x_t, t, grad, noise, generator), "pred_x0": out["pred_x0"]}


def ancestral_draw(out: dict[str, Tensor], x_t: Tensor, t: Tensor, grad: Tensor | None = None,
                   noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """x_{t-1} from the reverse step ``out`` of ``p_mean_variance``: its mean, shifted by variance * ``grad`` where
    given (classifier guidance), plus its noise except at t = 0."""
    mean = out["mean"] if grad is None else out["mean"] + out["variance"] * grad
    if noise is None:
        noise = randn_like(x_t, generator)
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return mean + nonzero * (0.5 * out["log_variance"]).exp() * noise


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
    x = initial_noise(model, shape, x_T, generator, device)
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
    deterministic; eta = 1 gives the ancestral posterior variance. Indices are into ``schedule``. x_t, eps (and
    noise) [N, ...]; the step is computed in float64, as the schedule's coefficients are, and returned in x_t's dtype.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    t = torch.as_tensor(t, dtype=torch.long).expand(x_t.shape[0]).to(x_t.device)
    t_prev = torch.as_tensor(t_prev, dtype=torch.long).expand(x_t.shape[0]).to(x_t.device)
    if (t_prev >= t).any() or (t_prev < -1).any():
        raise ValueError("t_prev must satisfy -1 <= t_prev < t")
    if eta > 0 and noise is None:
        noise = randn_like(x_t, generator)
    dtype, x_t, eps = x_t.dtype, x_t.double(), eps.double()
    ab_t = schedule.extract(schedule.alpha_bar, t, x_t)
    ab_all = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alpha_bar])  # index 0 = "before t = 0"
    ab_prev = ab_all.to(x_t.device)[t_prev + 1].reshape(ab_t.shape)
    x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
    sigma = eta * ((1 - ab_prev) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_prev).sqrt()
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * noise.double()
    return x_prev.to(dtype)


@torch.no_grad()
def ddim_sample(model, schedule: NoiseSchedule, shape: Sequence[int] | None = None, *, x_T: Tensor | None = None,
                steps: int | str | None = None, eta: float = 0.0, spacing: str = "trailing",
                sigma_max: float | None = SIGMA_MAX, y: Tensor | None = None,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                guidance: Guidance | None = None, clip_denoised: bool = True, progress: bool = False, device=None,
                var_type: str | None = None) -> Tensor:
    """DDIM sampling (Song et al. 2021) over all T steps or a respaced subset (``steps``).

    An int ``steps`` = N walks trailing steps (``spacing="trailing"``, the default, as Lin et al. 2024 recommend in
    their Table 2): evenly spaced down from the last step whose noise level is at most ``sigma_max`` (80, EDM's; T - 1
    with ``sigma_max=None``), so that 50 and 51 steps start at the same level and the last jump is as long as the
    others (``ddpm.spacing.respaced``); ``spacing="leading"`` walks the OpenAI code's 0, T/N, ..., T - T/N
    (``"ddimN"``). A string is a section
    string of ``NoiseSchedule.respace`` and ignores ``spacing``. Classifier guidance shifts eps by
    -sqrt(1 - alpha_bar_t) s grad log p(y | x_t) (Dhariwal & Nichol Algorithm 2). ``var_type`` is accepted for a
    uniform signature and ignored: DDIM sets its own variance. Returns x_0 [N, ...].
    """
    guidance = guidance or _NO_GUIDANCE
    sched = respaced(schedule, steps, "ddim", spacing, sigma_max)
    x = initial_noise(model, shape, x_T, generator, device)
    for i in _steps(sched, progress, "DDIM"):
        eps, pred_x0 = _eps_and_x0(model, sched, x, i, y, guidance, clip_denoised)
        x_next = ddim_step(sched, eps, x, i, i - 1, eta=eta, generator=generator)
        if callback is not None:
            callback(int(sched.timestep_map[i]), x, pred_x0)
        x = x_next
    return x


def nfe(sampler: str, steps: int | None, T: int = 1000) -> int:
    """Network evaluations of one sample (without guidance, which doubles the batch, not the count).

    Ancestral, DDIM and DPM-Solver++(2M): one per step. Heun: two per noise level but the last, 2N - 1.
    ``steps=None`` is the sampler's default: T for ancestral and DDIM.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    n = steps if steps is not None else DEFAULT_STEPS.get(sampler, T)
    return 2 * n - 1 if sampler == "heun" else n


def _eps_and_x0(model, schedule: NoiseSchedule, x: Tensor, i: int, y, guidance: Guidance,
                clip_denoised: bool) -> tuple[Tensor, Tensor]:
    """The (guided) eps and x_0 prediction at step index i, x_0 clipped to [-1, 1] and eps made consistent; the
    evaluation that DDIM, Heun and DPM-Solver++ share."""
    t = _batch_t(i, x)
    eps, _ = split_output(model_output(model, schedule, x, t, y, guidance), x)
    grad = guidance.cond_grad(x, schedule.timestep_map.to(x.device)[t], y)
    if grad is not None:  # Dhariwal & Nichol Algorithm 2: the classifier shifts eps
        eps = eps - schedule.extract(schedule.sqrt_one_minus_alpha_bar, t, x) * grad
    x0 = schedule.predict_x0_from_eps(x, t, eps)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = schedule.predict_eps_from_x0(x, t, x0)
    return eps, x0


def _solver_steps(schedule: NoiseSchedule, steps: int, spacing: str, sigma_max: float | None, progress: bool,
                  desc: str):
    """Pairs (i, j) of consecutive step indices, the last pair ending at j = -1 (sigma = 0, x_0)."""
    idx = solver_timesteps(schedule, steps, spacing, sigma_max).tolist()
    return with_progress(list(zip(idx, idx[1:] + [-1])), progress, desc)


@torch.no_grad()
def heun_sample(model, schedule: NoiseSchedule, shape: Sequence[int] | None = None, *, x_T: Tensor | None = None,
                steps: int | None = None, spacing: str = "karras", sigma_max: float | None = SIGMA_MAX,
                y: Tensor | None = None, generator: torch.Generator | None = None,
                callback: Callback | None = None, guidance: Guidance | None = None, clip_denoised: bool = True,
                progress: bool = False, device=None, var_type: str | None = None) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1, S_churn = 0).

    In x_hat = x / sqrt(alpha_bar) and sigma = sqrt((1 - alpha_bar) / alpha_bar) the ODE reads
    d x_hat / d sigma = eps(x, t). Each of the ``steps`` noise levels (default 18) takes an Euler step (which is
    exactly a DDIM step) and corrects it with the slope at its end; the last step, to sigma = 0, stays Euler.
    NFE = 2 steps - 1. The levels come from ``solver_timesteps(schedule, steps, spacing, sigma_max)``: with the
    Karras and log-SNR spacings they start at the last step with sigma <= ``sigma_max`` (80, as in EDM), or at
    T - 1 with ``sigma_max=None``. x_T ~ N(0, I) is given to that first step as it is, just as EDM starts from pure
    noise of standard deviation sigma_max in x_hat (at sigma = 80 the signal is 1/80 of x_hat).
    ``generator`` only draws x_T. ``var_type`` is ignored. Returns x_0 [N, ...].
    """
    guidance = guidance or _NO_GUIDANCE
    steps = DEFAULT_STEPS["heun"] if steps is None else steps
    x = initial_noise(model, shape, x_T, generator, device)
    ab = schedule.alpha_bar.tolist()
    for i, j in _solver_steps(schedule, steps, spacing, sigma_max, progress, "Heun"):
        eps, x0 = _eps_and_x0(model, schedule, x, i, y, guidance, clip_denoised)
        if callback is not None:
            callback(int(schedule.timestep_map[i]), x, x0)
        ab_j = ab[j] if j >= 0 else 1.0
        sigma_i, sigma_j = math.sqrt((1 - ab[i]) / ab[i]), math.sqrt((1 - ab_j) / ab_j)
        x_hat = x / math.sqrt(ab[i])
        x_next = math.sqrt(ab_j) * (x_hat + (sigma_j - sigma_i) * eps)  # Euler
        if j >= 0:
            eps_next, _ = _eps_and_x0(model, schedule, x_next, j, y, guidance, clip_denoised)
            x_next = math.sqrt(ab_j) * (x_hat + (sigma_j - sigma_i) * 0.5 * (eps + eps_next))  # trapezoid
        x = x_next
    return x


@torch.no_grad()
def dpm_solver_sample(model, schedule: NoiseSchedule, shape: Sequence[int] | None = None, *,
                      x_T: Tensor | None = None, steps: int | None = None, spacing: str = "logsnr",
                      sigma_max: float | None = SIGMA_MAX, order: int = 2, y: Tensor | None = None,
                      generator: torch.Generator | None = None,
                      callback: Callback | None = None, guidance: Guidance | None = None,
                      clip_denoised: bool = True, progress: bool = False, device=None,
                      var_type: str | None = None) -> Tensor:
    """DPM-Solver++ (Lu et al. 2022b, Algorithm 2): multistep, data prediction, ``order`` 2 (2M) or 1 (= DDIM).

    With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma), h = lambda_j -
    lambda_i, one step is x_j = (sigma_j / sigma_i) x_i - alpha_j (e^{-h} - 1) D, where D is the x_0
    prediction (order 1, and the first step) or (1 + 1/(2r)) x0_i - 1/(2r) x0_prev with r = h_prev / h.
    The last step, to sigma = 0, returns the x_0 prediction. NFE = steps (default 20). The steps, and where they
    start (``sigma_max``, x_T ~ N(0, I) as it is), are Heun's: see :func:`heun_sample`. ``generator`` only
    draws x_T; ``var_type`` is ignored. Returns x_0 [N, ...].
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    guidance = guidance or _NO_GUIDANCE
    steps = DEFAULT_STEPS["dpm++2m"] if steps is None else steps
    x = initial_noise(model, shape, x_T, generator, device)
    ab = schedule.alpha_bar.tolist()
    x0_prev, h_prev = None, None
    for i, j in _solver_steps(schedule, steps, spacing, sigma_max, progress, "DPM-Solver++"):
        _, x0 = _eps_and_x0(model, schedule, x, i, y, guidance, clip_denoised)
        if callback is not None:
            callback(int(schedule.timestep_map[i]), x, x0)
        if j < 0:
            x = x0
            break
        h = 0.5 * math.log(ab[j] / (1 - ab[j])) - 0.5 * math.log(ab[i] / (1 - ab[i]))
        d = x0
        if order == 2 and x0_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = math.sqrt((1 - ab[j]) / (1 - ab[i])) * x - math.sqrt(ab[j]) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def sample(model, schedule: NoiseSchedule, shape: Sequence[int] | None = None, *, sampler: str = "ddpm",
           **kwargs) -> Tensor:
    """Dispatch by name to ``ddpm_sample``, ``ddim_sample``, ``heun_sample`` or ``dpm_solver_sample``.

    The keyword arguments are theirs; ``eta`` is dropped for the samplers that have none, and ``steps=None``
    means each sampler's default.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler != "ddim":
        kwargs.pop("eta", None)
    fn = {"ddpm": ddpm_sample, "ddim": ddim_sample, "heun": heun_sample, "dpm++2m": dpm_solver_sample}[sampler]
    return fn(model, schedule, shape, **kwargs)


def sample_in_batches(model, schedule: NoiseSchedule, shape: Sequence[int], n: int, *, batch_size: int,
                      y: Tensor | None = None, x_T: Tensor | None = None, **kwargs) -> Tensor:
    """``n`` samples of ``shape`` (one image, e.g. (1, 28, 28)) drawn ``batch_size`` at a time with :func:`sample`.

    ``y``: labels ``[n]`` or None, and ``x_T``: starting noise ``[n, *shape]`` or None, cut into the same batches.
    The keyword arguments (``sampler``, ``steps``, ``generator``, ``guidance``, ...) go to every call; one
    generator is used by the batches in turn. Returns ``[n, *shape]`` on the CPU.
    """
    def draw(b, y_b, x_b):
        return sample(model, schedule, (b, *shape), y=y_b, x_T=x_b, **kwargs)
    return in_batches(draw, n, batch_size, y, x_T, "x_T")


def in_batches(draw, n: int, batch_size: int, y: Tensor | None, x_start: Tensor | None, start_name: str) -> Tensor:
    """``draw(b, y_b, x_b)`` called on consecutive batches of at most ``batch_size`` of ``n`` samples, with the
    matching rows of ``y`` and of the starting noise ``x_start`` (each ``[n, ...]`` or None, named ``"y"`` and
    ``start_name`` in errors); the results concatenated on the CPU."""
    for name, given in (("y", y), (start_name, x_start)):
        if given is not None and len(given) != n:
            raise ValueError(f"{name} must hold n={n} rows, got {len(given)}")
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        out.append(draw(b, None if y is None else y[i: i + b], None if x_start is None else x_start[i: i + b]).cpu())
    return torch.cat(out)
