"""The pieces the networks are built from: config helpers, the timestep embedding, normalisation, and the U-Net's
residual, attention and resampling blocks (Ho et al. 2020, App. B; Dhariwal & Nichol 2021, Sec. 3).

``ddpm.unet`` assembles them into the U-Net and re-exports the public ones; ``ddpm.mlp`` uses the embedding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_PERIOD = 10_000.0


# ----------------------------------------------------------------------------------------------
# configuration helpers
# ----------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON-ready dict of a config dataclass (tuples become lists)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def _config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed keys are {sorted(names)}")
    config = cls(**data)
    config.validate()
    return config


class DictConfig:
    """``to_dict`` / ``from_dict`` for a config dataclass that has a ``validate`` method."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields; tuples become lists and :meth:`from_dict` turns them back."""
        return _config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of :meth:`to_dict`: unknown keys raise ValueError, missing keys take defaults, then validate."""
        return _config_from_dict(cls, data)


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Total number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _frequencies(dim: int) -> torch.Tensor:
    """Angular frequencies ``10000^(-i / (dim // 2))``, i = 0 .. dim//2 - 1 (float32 [dim // 2])."""
    half = dim // 2
    return torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)


def timestep_embedding(t: torch.Tensor, dim: int, freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, Vaswani et al. (2017) Sec. 3.5.

    Returns float32 ``[N, dim]``: ``sin(t * w_i)`` in the first half and ``cos(t * w_i)`` in the
    second, with ``w_i = 10000^(-i / (dim // 2))`` (periods from 2*pi to about 10000 * 2*pi); a
    zero column is appended when ``dim`` is odd. ``t``: ``[N]``. ``freqs``: precomputed
    ``_frequencies(dim)`` on ``t``'s device, to avoid rebuilding it on every call.
    """
    if freqs is None:
        freqs = _frequencies(dim).to(t.device)
    args = t.float()[:, None] * freqs.float()[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _num_groups(channels: int, max_groups: int = 32, min_group_size: int = 2) -> int:
    """Largest number of GroupNorm groups <= max_groups that divides ``channels`` and leaves at least
    ``min_group_size`` channels in every group (one group when ``channels`` < ``min_group_size``).

    The OpenAI code always uses 32 groups, which its widths (64 channels or more) allow; this rule gives the
    same 32 there. Narrow networks need the lower bound on the group size: a group of one channel is instance
    normalisation, which removes every channel's spatial mean, so the mean of the input cannot reach the
    output. At high noise the mean of x_t is mostly the mean of the noise, which eps must reproduce; a network
    that cannot pass it on leaves it in the predicted image, whose brightness then follows the mean of x_T.
    """
    cap = max(1, min(max_groups, channels // min_group_size))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


def conditioning(net: nn.Module, x: torch.Tensor, t: Any, y: torch.Tensor | None, dim: int) -> torch.Tensor:
    """The embedding every block of ``net`` is conditioned on: ``SiLU(MLP(embed(t)) + label_embed(y))``.

    ``net`` has ``time_embed``, ``label_embed`` (or None), ``freqs`` and ``config.num_classes``; ``t`` and ``y`` are
    checked against the batch of ``x``, and the sinusoidal embedding of width ``dim`` takes ``x``'s dtype.
    """
    n = x.shape[0]
    t = _check_t(t, n, x.device)
    y = _label_ids(y, n, net.config.num_classes, x.device)
    emb = net.time_embed(timestep_embedding(t, dim, net.freqs).to(x.dtype))
    if net.label_embed is not None:
        emb = emb + net.label_embed(y)
    return F.silu(emb)  # every embedding projection starts with SiLU


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows, else the largest divisor of ``channels`` that leaves
    at least two channels per group (see :func:`_num_groups`)."""
    return nn.GroupNorm(_num_groups(channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _check_t(t: Any, n: int, device: torch.device) -> torch.Tensor:
    """Timesteps as a tensor ``[N]`` on ``device``; a Python number or 0-d tensor is broadcast."""
    if not isinstance(t, torch.Tensor):
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise ValueError(f"t must be a tensor of shape [N]=[{n}] or a number, got {type(t).__name__}")
        t = torch.tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t must have shape [N]=[{n}] (one timestep per example), got {list(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"t must hold real timesteps, got dtype {t.dtype}")
    return t.to(device)


def _label_ids(y: torch.Tensor | None, n: int, num_classes: int | None, device: torch.device) -> torch.Tensor | None:
    """Check the labels ``y`` ([N] integers in [0, num_classes]) and fill in the null label for None."""
    if num_classes is None:
        if y is not None:
            raise ValueError("y must be None: this model is unconditional (num_classes=None)")
        return None
    if y is None:
        return torch.full((n,), num_classes, dtype=torch.long, device=device)
    is_int = isinstance(y, torch.Tensor) and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
    if not is_int or y.shape != (n,):
        shape = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be an integer tensor of shape [N]=[{n}], got {shape}")
    if bool(((y < 0) | (y > num_classes)).any()):
        raise ValueError(
            f"y must hold labels in [0, num_classes]=[0, {num_classes}] ({num_classes} is the null label), "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )
    return y.to(device)


# ----------------------------------------------------------------------------------------------
# U-Net blocks
# ----------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding, optionally resampling (BigGAN style).

    ``x``: [N, channels, H, W]; ``emb``: [N, emb_channels], already passed through SiLU.
    Returns [N, out_channels, H', W'] with H' = 2H (``up``), H/2 (``down``) or H.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = group_norm(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        if up:
            self.resample: nn.Module | None = nn.Upsample(scale_factor=2, mode="nearest")
        elif down:
            self.resample = nn.AvgPool2d(2)
        else:
            self.resample = None
        # AdaGN needs a scale and a shift per channel; the additive form needs one vector.
        self.emb_proj = nn.Linear(emb_channels, out_channels * (2 if use_scale_shift_norm else 1))
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # SiLU in place: GroupNorm and addcmul keep their inputs, not their outputs, for the backward pass, so
        # overwriting the outputs is safe, and it saves a full-size allocation per call (a few percent of an
        # evaluation on a CPU, measured against the copying version).
        h = F.silu(self.in_norm(x), inplace=True)
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_conv(h)
        e = self.emb_proj(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            # AdaGN(h, e) = GroupNorm(h) * (1 + e_s) + e_b, Dhariwal & Nichol (2021) Sec. 3.
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_norm(h), 1 + scale)
        else:
            # Additive conditioning, Ho et al. (2020) Appendix B.
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h, inplace=True)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    ``x``: [N, C, H, W] -> [N, C, H, W]. ``resolution`` records H for inspection.
    """

    def __init__(self, channels: int, num_heads: int, resolution: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.resolution = resolution
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        length, head_dim = height * width, c // self.num_heads
        qkv = self.qkv(self.norm(x))  # [N, 3C, H, W], channels ordered (q|k|v, head, head_dim)
        # Positions first, [N, H*W, 3, heads, head_dim] (one copy), so that q, k and v are
        # [N, heads, H*W, head_dim] views with unit stride along head_dim, as SDPA kernels prefer.
        qkv = qkv.permute(0, 2, 3, 1).reshape(n, length, 3, self.num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v: [N, heads, H*W, head_dim]
        a = a.transpose(2, 3).reshape(n, c, height, width)  # channels ordered (head, head_dim)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """3x3 convolution with stride 2: [N, C, H, W] -> [N, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 convolution: [N, C, H, W] -> [N, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Sequential container that hands the embedding to the residual blocks it holds."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
