"""The optimiser's helpers: the learning-rate schedule and the exponential moving average of the weights."""

from __future__ import annotations

import math

import torch

from .trainconfig import FINAL_LR_FRACTION, TrainConfig

__all__ = ["ema_decay_at", "ema_warmup_end", "learning_rate", "update_ema"]


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate at 0-based ``step``: a linear warm-up over ``warmup_steps``, then constant, or with
    ``lr_decay="cosine"`` half a cosine from ``lr`` down to ``FINAL_LR_FRACTION * lr`` at the last step."""
    c = config
    if c.warmup_steps > 0 and step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    if c.lr_decay == "cosine":
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.steps - 1 - c.warmup_steps))
        return c.lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))
    return c.lr


def ema_decay_at(update: int, decay: float, warmup: bool = True) -> float:
    """EMA decay used at 0-based update ``update``: ``min(decay, (1 + n) / (10 + n))`` with warm-up.

    The warm-up (as in TensorFlow's ``ExponentialMovingAverage(num_updates=...)``) lets the average follow
    the fast early changes of the weights instead of remembering the random initialisation.
    """
    return min(decay, (1.0 + update) / (10.0 + update)) if warmup else decay


def ema_warmup_end(decay: float) -> int:
    """The first 0-based update at which the warm-up reaches ``decay``: (1 + n) / (10 + n) >= decay holds from
    n = (10 decay - 1) / (1 - decay) on (8,990 for 0.999, 89,990 for 0.9999). A run that stops earlier never uses
    ``decay``: its average follows the warm-up alone, whose horizon 1 / (1 - decay_n) = (10 + n) / 9 is about a
    ninth of the steps so far, so any two caps above the warm-up's last value give the same weights."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must lie in (0, 1); got {decay}")
    n = max(0, math.floor((10.0 * decay - 1.0) / (1.0 - decay)) - 1)  # just below the bound, whatever its rounding
    while ema_decay_at(n, decay) < decay:
        n += 1
    return n


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for parameters; buffers are copied, never averaged."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
