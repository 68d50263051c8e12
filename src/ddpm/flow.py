"""Flow matching and rectified flow: the objective, the ODE samplers, straightness and reflow.

The book's conventions (``theory/flow_matching.md``): flow time ``t`` in [0, 1] with ``t = 0`` the data and ``t = 1``
the noise, the linear path ``x_t = (1 - t) x_0 + t eps`` of rectified flow (Liu et al. 2023) and of stochastic
interpolants (Albergo & Vanden-Eijnden 2023), and its conditional velocity ``u = d x_t / dt = eps - x_0``. A
network learns the marginal velocity ``E[eps - x_0 | x_t]`` by regressing on ``u`` (conditional flow matching,
Lipman et al. 2023). Any network of the package serves: it is called as ``model(x_t, t * FLOW_TIME_SCALE, y)``, so
that its timestep embedding sees the range of the diffusion models' 0-based steps.

* Time distributions of training: uniform, or logit-normal (Esser et al. 2024: ``t = sigmoid(n)``, ``n ~ N(0, 1)``).
* Samplers: Euler, midpoint and Heun on ``K`` uniform steps from ``t = 1`` to ``0`` (NFE ``K``, ``2K`` and ``2K``),
  with the samplers' ``y``, ``generator``, ``callback(t, x_t, pred_x0)`` and ``guidance`` hook; classifier-free
  guidance combines the two velocities through ``ddpm.guidance.ClassifierFreeGuidance`` as it combines eps.
* Straightness (Liu et al. 2023, Eq. 7) of a trajectory, and reflow: pairs ``(x_1, x_0)`` of noise and the sample
  the ODE maps it to, on which the next rectified flow is trained (``TrainConfig.reflow``).
* Conversions to the book's other quantities: ``x_0``, ``eps``, the velocity ``v`` of Salimans & Ho, EDM's
  ``sigma = t / (1 - t)`` and the ``t`` of a VP schedule's ``alpha_bar``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .losses import mean_flat
from .samplers import Guidance, in_batches, initial_noise, with_progress

__all__ = ["FLOW_TIME_SCALE", "FLOW_METHODS", "DEFAULT_FLOW_STEPS", "TIME_DISTRIBUTIONS", "interpolate",
           "x0_from_velocity", "eps_from_velocity", "velocity_from_eps", "velocity_from_x0", "velocity_from_v",
           "v_from_velocity", "flow_time", "flow_sigma", "sample_flow_times", "FlowTimeSampler", "flow_losses",
           "velocity", "flow_nfe", "flow_sample", "flow_sample_in_batches", "flow_trajectory", "straightness",
           "reflow_pairs"]

#: The network's time input is ``t * FLOW_TIME_SCALE``: the range of the diffusion models' 0-based steps.
FLOW_TIME_SCALE = 1000.0
FLOW_METHODS = ("euler", "midpoint", "heun")
#: Steps of the command line's flow sampling when ``--steps`` is not given.
DEFAULT_FLOW_STEPS = 16
TIME_DISTRIBUTIONS = ("uniform", "logit-normal")
Callback = Callable[[float, Tensor, Tensor], None]
_NO_GUIDANCE = Guidance()


def _as_time(t, x: Tensor) -> Tensor:
    """t (a number or ``[N]``) broadcast against ``x`` ``[N, ...]``, in x's dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim == 1 else t


# ---------------------------------------------------------------------------------------------------------
# The path and its conversions
# ---------------------------------------------------------------------------------------------------------


def interpolate(x0: Tensor, noise: Tensor, t) -> Tensor:
    """The linear path ``x_t = (1 - t) x_0 + t eps``, t a number or ``[N]``."""
    t = _as_time(t, x0)
    return (1 - t) * x0 + t * noise


def x0_from_velocity(x_t: Tensor, u: Tensor, t) -> Tensor:
    """``x_0 = x_t - t u``: the data prediction of a velocity prediction."""
    return x_t - _as_time(t, x_t) * u


def eps_from_velocity(x_t: Tensor, u: Tensor, t) -> Tensor:
    """``eps = x_t + (1 - t) u``: the noise prediction of a velocity prediction."""
    return x_t + (1 - _as_time(t, x_t)) * u


def velocity_from_eps(x_t: Tensor, eps: Tensor, t) -> Tensor:
    """``u = (eps - x_t) / (1 - t)`` (t < 1): the velocity of a noise prediction."""
    return (eps - x_t) / (1 - _as_time(t, x_t))


def velocity_from_x0(x_t: Tensor, x0: Tensor, t) -> Tensor:
    """``u = (x_t - x_0) / t`` (t > 0): the velocity of a data prediction."""
    return (x_t - x0) / _as_time(t, x_t)


def _vp_angle(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos phi, sin phi)`` of the VP point with the same signal-to-noise ratio as flow time t: ``((1 - t) / r,
    t / r)`` with ``r = sqrt((1 - t)^2 + t^2)``; the VP state is ``x_t / r``."""
    r = ((1 - t) ** 2 + t ** 2).sqrt()
    return (1 - t) / r, t / r


def v_from_velocity(x_t: Tensor, u: Tensor, t) -> Tensor:
    """Salimans & Ho's ``v = cos(phi) eps - sin(phi) x_0`` of the VP point ``x_t / r`` that has the same SNR."""
    t_ = _as_time(t, x_t)
    cos, sin = _vp_angle(t_)
    return cos * eps_from_velocity(x_t, u, t) - sin * x0_from_velocity(x_t, u, t)


def velocity_from_v(x_t: Tensor, v: Tensor, t) -> Tensor:
    """Inverse of :func:`v_from_velocity`: with ``z = x_t / r``, ``x_0 = cos z - sin v`` and ``eps = sin z + cos v``,
    so ``u = eps - x_0``."""
    t_ = _as_time(t, x_t)
    cos, sin = _vp_angle(t_)
    z = x_t / ((1 - t_) ** 2 + t_ ** 2).sqrt()
    return (sin * z + cos * v) - (cos * z - sin * v)


def flow_time(alpha_bar) -> Tensor:
    """The flow time with the SNR of a VP ``alpha_bar``: ``t / (1 - t) = sqrt((1 - ab) / ab)`` (EDM's sigma)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return (1 - ab).sqrt() / (ab.sqrt() + (1 - ab).sqrt())


def flow_sigma(t) -> Tensor:
    """EDM's noise level of flow time t: ``sigma = t / (1 - t)``, with ``x_t / (1 - t) = x_0 + sigma eps``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return t / (1 - t)


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def sample_flow_times(n: int, distribution: str = "uniform", *, generator: torch.Generator | None = None,
                      device=None) -> Tensor:
    """``n`` training times in (0, 1): uniform, or logit-normal ``sigmoid(N(0, 1))`` (Esser et al. 2024, Sec. 3.1)."""
    if distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {', '.join(TIME_DISTRIBUTIONS)}, got {distribution!r}")
    if distribution == "uniform":
        t = torch.rand(n, generator=generator, dtype=torch.float64)
    else:
        t = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
    return t.float().to(device)


class FlowTimeSampler:
    """The trainer's time sampler for flow matching: ``sample(n, device, generator) -> (t [n], weights [n])`` like
    ``ddpm.losses.UniformSampler``, with float times in (0, 1) and unit weights."""

    def __init__(self, distribution: str = "uniform"):
        if distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(TIME_DISTRIBUTIONS)}, got {distribution!r}")
        self.distribution = distribution

    def sample(self, n: int, device=None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        t = sample_flow_times(n, self.distribution, generator=generator, device=device)
        return t, torch.ones(n, device=device)


def flow_losses(model, x0: Tensor, t: Tensor, *, y: Tensor | None = None, noise: Tensor) -> dict[str, Tensor]:
    """Conditional flow matching (Lipman et al. 2023, Eq. 9 on the linear path): per-example
    ``||(eps - x_0) - u_theta(x_t, t)||^2`` averaged over dimensions ``[N]``, as ``loss`` and ``mse``. ``noise`` is
    eps, or for reflow the paired ``x_1`` of each ``x_0``."""
    x_t = interpolate(x0, noise, t)
    pred = model(x_t, t * FLOW_TIME_SCALE, y)
    mse = mean_flat((noise - x0 - pred.float()) ** 2)
    return {"loss": mse, "mse": mse}


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------


def velocity(model, x: Tensor, t: float, y: Tensor | None = None, guidance: Guidance | None = None) -> Tensor:
    """The (guided) velocity at flow time t for the batch x: the network called at ``t * FLOW_TIME_SCALE``.
    Classifier-free guidance combines the conditional and null velocities; classifier guidance is refused."""
    guidance = _flow_guidance(guidance)
    t_net = torch.full((x.shape[0],), t * FLOW_TIME_SCALE, dtype=x.dtype, device=x.device)
    return guidance.model_output(model, x, t_net, y).to(x.dtype)


def _flow_guidance(guidance: Guidance | None) -> Guidance:
    """``guidance`` (or none) after refusing a hook that shifts by a classifier's gradient (it overrides
    ``Guidance.cond_grad``): that gradient is of a noise-aware classifier of the diffusion steps. Decided from the
    hook's type, so that no classifier runs to find it out."""
    guidance = guidance or _NO_GUIDANCE
    if type(guidance).cond_grad is not Guidance.cond_grad:
        raise ValueError("classifier guidance needs a noise-aware classifier of the diffusion steps; a flow model "
                         "takes classifier-free guidance (ddpm.guidance.ClassifierFreeGuidance)")
    return guidance


def flow_nfe(method: str, steps: int) -> int:
    """Network evaluations of one sample: Euler one per step, midpoint and Heun two."""
    if method not in FLOW_METHODS:
        raise ValueError(f"method must be one of {', '.join(FLOW_METHODS)}, got {method!r}")
    return steps if method == "euler" else 2 * steps


def _check_steps(steps) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


@torch.no_grad()
def flow_sample(model, shape: Sequence[int] | None = None, *, x_1: Tensor | None = None, steps: int = 8,
                method: str = "euler", y: Tensor | None = None, generator: torch.Generator | None = None,
                callback: Callback | None = None, guidance: Guidance | None = None, progress: bool = False,
                device=None) -> Tensor:
    """Solve ``dx/dt = u(x, t)`` from ``x_1 ~ N(0, I)`` at t = 1 to t = 0 in ``steps`` uniform steps of h = -1/steps.

    * ``"euler"``: ``x += h u(x, t)`` (first order, NFE = steps);
    * ``"midpoint"``: ``x += h u(x + h/2 u(x, t), t + h/2)`` (second order, NFE = 2 steps);
    * ``"heun"``: ``x += h/2 (u(x, t) + u(x + h u(x, t), t + h))`` (second order, NFE = 2 steps).
    ``callback(t, x_t, pred_x0)`` is called at the start of each step with ``pred_x0 = x_t - t u``. ``generator``
    only draws x_1. Returns x_0 ``[N, ...]``.
    """
    if method not in FLOW_METHODS:
        raise ValueError(f"method must be one of {', '.join(FLOW_METHODS)}, got {method!r}")
    steps = _check_steps(steps)
    guidance = _flow_guidance(guidance)  # refused before any network evaluation
    x = initial_noise(model, shape, x_1, generator, device)
    times = [1.0 - k / steps for k in range(steps)] + [0.0]
    for t, t_next in with_progress(list(zip(times, times[1:])), progress, f"flow ({method})"):
        h = t_next - t
        u = velocity(model, x, t, y, guidance)
        if callback is not None:
            callback(t, x, x - t * u)
        if method == "euler":
            x = x + h * u
        elif method == "midpoint":
            x = x + h * velocity(model, x + 0.5 * h * u, t + 0.5 * h, y, guidance)
        else:
            x = x + 0.5 * h * (u + velocity(model, x + h * u, t_next, y, guidance))
    return x


def flow_sample_in_batches(model, shape: Sequence[int], n: int, *, batch_size: int, y: Tensor | None = None,
                           x_1: Tensor | None = None, **kwargs) -> Tensor:
    """``n`` samples of ``shape`` (one sample) drawn ``batch_size`` at a time with :func:`flow_sample`; ``y`` and
    ``x_1`` (``[n, ...]`` or None) are cut into the same batches, one generator serves them in turn. CPU result."""
    def draw(b, y_b, x_b):
        return flow_sample(model, (b, *shape), x_1=x_b, y=y_b, **kwargs)
    return in_batches(draw, n, batch_size, y, x_1, "x_1")


@torch.no_grad()
def flow_trajectory(model, x_1: Tensor, steps: int, method: str = "euler", y: Tensor | None = None,
                    guidance: Guidance | None = None) -> tuple[Tensor, Tensor]:
    """The states of :func:`flow_sample` from ``x_1``: ``(times [steps + 1] float64 from 1 to 0, states [steps + 1,
    N, ...])``, the last state being the sample."""
    times, states = [], []
    x0 = flow_sample(model, x_1=x_1, steps=steps, method=method, y=y, guidance=guidance,
                     callback=lambda t, x, _: (times.append(t), states.append(x)))
    times.append(0.0)
    states.append(x0)
    return torch.tensor(times, dtype=torch.float64), torch.stack(states)


def straightness(times: Tensor, states: Tensor) -> Tensor:
    """Straightness of trajectories (Liu et al. 2023, Eq. 7): per trajectory ``[N]``, the time average of the
    squared deviation of its velocity from its mean velocity, ``1/|D| int ||dx/dt - (x_end - x_start) / D||^2 |dt|``
    over the duration ``D = t_end - t_start``, with the norm averaged over dimensions. The velocity is taken piecewise
    constant between the recorded states (``times [K + 1]``, ``states [K + 1, N, ...]``), so a path sampled at any
    time parametrisation (a flow's t or a diffusion's) can be measured. 0 exactly for a straight path travelled at
    constant speed."""
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.ndim != 1 or states.shape[0] != times.shape[0] or times.shape[0] < 2:
        raise ValueError(f"times [K + 1] and states [K + 1, N, ...] must match with K >= 1; got "
                         f"{tuple(times.shape)} and {tuple(states.shape)}")
    s = states.to(torch.float64)
    dt = (times[1:] - times[:-1]).reshape(-1, *([1] * (s.ndim - 1)))
    if (dt == 0).any():
        raise ValueError("times must be distinct")
    duration = float(times[-1] - times[0])
    mean_velocity = (s[-1] - s[0]) / duration
    piece = (s[1:] - s[:-1]) / dt
    dev = ((piece - mean_velocity) ** 2).flatten(2).mean(-1)  # [K, N]
    return (dt.abs().reshape(-1, 1) * dev).sum(0) / abs(duration)


@torch.no_grad()
def reflow_pairs(model, shape: Sequence[int], n: int, *, steps: int, method: str = "euler",
                 y: Tensor | None = None, seed: int = 0, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """Reflow's coupling (Liu et al. 2023, Algorithm 1): ``n`` noises ``x_1`` from seed ``seed`` and the samples
    ``x_0`` the model's ODE maps them to (``steps`` of ``method``, labels ``y [n]`` or None). Returns
    ``(x_1, x_0)`` on the CPU; the next rectified flow trains on the pairs (``x_0``, noise ``x_1``)."""
    tensors = [*model.parameters(), *model.buffers()] if hasattr(model, "parameters") else []
    device = tensors[0].device if tensors else "cpu"
    x_1 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    x_0 = flow_sample_in_batches(model, shape, n, batch_size=batch_size, y=None if y is None else y.to(device),
                                 x_1=x_1.to(device), steps=steps, method=method)
    return x_1, x_0
