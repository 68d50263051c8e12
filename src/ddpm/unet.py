"""Noise-prediction networks: the diffusion U-Net and a small MLP for 2-D toy data.

The U-Net is the architecture of Ho et al. (2020, "Denoising Diffusion Probabilistic Models",
Appendix B) as refined by Nichol & Dhariwal (2021, "Improved Denoising Diffusion Probabilistic
Models") and Dhariwal & Nichol (2021, "Diffusion Models Beat GANs on Image Synthesis", Sec. 3):

* a sinusoidal timestep embedding (Vaswani et al. 2017, as used by Ho et al. 2020) followed by an
  MLP to ``4 * model_channels`` features, to which an optional class embedding is added;
* residual blocks (GroupNorm, SiLU, 3x3 convolution, dropout) conditioned on that embedding,
  either additively (Ho et al.) or by adaptive group normalisation
  ``AdaGN(h, e) = GroupNorm(h) * (1 + e_s) + e_b`` (Dhariwal & Nichol 2021, Sec. 3);
* multi-head self-attention at chosen resolutions, with a fixed width per head when asked
  (Dhariwal & Nichol 2021, Sec. 3);
* strided-convolution downsampling or BigGAN-style residual up/downsampling (``resblock_updown``),
  nearest-neighbour upsampling followed by a convolution, skip connections between the two
  halves, and a middle block (residual, attention, residual);
* ``2 * in_channels`` outputs when the variances are learned (Nichol & Dhariwal 2021, Sec. 3.1):
  channels ``[:C]`` are the predicted noise eps, channels ``[C:]`` the interpolation weight v of
  Eq. 15 (turned into a variance by ``ddpm.losses.p_mean_variance``);
* the last convolution of every residual block, every attention output projection and the final
  convolution start at zero, so that each block starts as the identity and the untrained network
  predicts exactly zero (as OpenAI's improved-diffusion/guided-diffusion code does).

Label ``num_classes`` is the null label of classifier-free guidance (Ho & Salimans 2021): the class
embedding has ``num_classes + 1`` rows, and ``y=None`` means "no label" for every example.

Timesteps ``t`` are the original 0-based training timesteps (``t = 0`` is the first noising step).

The book derives what these networks are trained to predict in ``theory/ddpm.md`` (eps-prediction),
``theory/improved_ddpm.md`` (learned variances) and ``theory/guided_diffusion.md`` (AdaGN, class
conditioning, the null label).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNetConfig",
    "UNet",
    "MLPConfig",
    "MLP",
    "count_parameters",
    "timestep_embedding",
]

MAX_PERIOD = 10_000.0


# ----------------------------------------------------------------------------------------------
# configuration
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


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNet` (names as in OpenAI's improved/guided-diffusion).

    image_size: height = width of the images, in pixels; it must be divisible by
        ``2 ** (len(channel_mult) - 1)`` since each level but the last halves it.
    in_channels: image channels C (1 for MNIST, 3 for CIFAR-10).
    model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels and
        the timestep embedding has ``4 * model_channels`` features.
    channel_mult: one width multiplier per resolution level (the first level is full resolution).
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attention_resolutions: resolutions in pixels (e.g. ``(14, 7)``) at which self-attention follows
        each residual block; the middle block always has attention.
    num_heads: attention heads, used when ``num_head_channels == -1``.
    num_head_channels: channels per head (heads = channels // num_head_channels); -1 to use
        ``num_heads`` instead.
    dropout: dropout probability inside the residual blocks, in [0, 1).
    num_classes: number of classes for a class-conditional model, or None; label ``num_classes``
        is the null label of classifier-free guidance.
    learn_sigma: output ``2 * in_channels`` channels (eps and the variance interpolation v).
    use_scale_shift_norm: condition by AdaGN (scale and shift) instead of adding the embedding.
    resblock_updown: resample with residual blocks (BigGAN style) instead of conv / nearest+conv.
    """

    image_size: int = 28
    in_channels: int = 1
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.1
    num_classes: int | None = None
    learn_sigma: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False

    def __post_init__(self) -> None:
        # Lists (e.g. from JSON) become tuples, so that a config read back compares equal.
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    @property
    def out_channels(self) -> int:
        """Output channels: ``in_channels``, or ``2 * in_channels`` when ``learn_sigma``."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Side length in pixels at each level, e.g. ``(28, 14, 7)``."""
        return tuple(self.image_size // 2**level for level in range(len(self.channel_mult)))

    def heads(self, channels: int) -> int:
        """Number of attention heads for a block with ``channels`` channels."""
        if self.num_head_channels == -1:
            return self.num_heads
        return channels // self.num_head_channels

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; tuples become lists and :meth:`from_dict` turns them back."""
        return _config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError, missing keys take defaults."""
        return _config_from_dict(cls, data)

    def validate(self) -> None:
        """Raise ValueError, naming the parameter and its allowed values, if the config is unusable."""
        for name in ("image_size", "in_channels", "model_channels", "num_res_blocks"):
            _require_int(name, getattr(self, name), 1)
        mults = self.channel_mult
        if not isinstance(mults, tuple) or not mults or not all(_is_int(m) and m >= 1 for m in mults):
            raise ValueError(f"channel_mult must be a non-empty tuple of integers >= 1, got {mults!r}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} cannot be halved {len(self.channel_mult) - 1} times "
                f"(one per level of channel_mult={self.channel_mult}): it must be a multiple of {factor}; "
                "use fewer levels or another image size"
            )
        if not isinstance(self.attention_resolutions, tuple):
            raise ValueError(
                f"attention_resolutions must be a tuple of resolutions in pixels, got {self.attention_resolutions!r}"
            )
        allowed = self.resolutions
        for res in self.attention_resolutions:
            if res not in allowed:
                raise ValueError(
                    f"attention_resolutions contains {res!r}, which never occurs for image_size={self.image_size} "
                    f"and channel_mult={self.channel_mult}; allowed resolutions are {list(allowed)}"
                )
        is_number = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not (is_number and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.num_classes is not None:
            _require_int("num_classes", self.num_classes, 1)
        for name in ("learn_sigma", "use_scale_shift_norm", "resblock_updown"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        # Attention heads: checked for every width that has an attention block (the middle block
        # sits at the last level, so its width is always checked).
        if self.num_head_channels == -1:
            _require_int("num_heads", self.num_heads, 1)
        else:
            _require_int("num_head_channels (or -1 to use num_heads)", self.num_head_channels, 1)
        levels = {len(allowed) - 1} | {i for i, r in enumerate(allowed) if r in self.attention_resolutions}
        for level in sorted(levels):
            channels = self.model_channels * self.channel_mult[level]
            if self.num_head_channels == -1 and channels % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} must divide the {channels} channels of the attention block "
                    f"at resolution {allowed[level]}"
                )
            if self.num_head_channels != -1 and channels % self.num_head_channels:
                raise ValueError(
                    f"num_head_channels={self.num_head_channels} must divide the {channels} channels of the "
                    f"attention block at resolution {allowed[level]}"
                )


@dataclass
class MLPConfig:
    """Hyper-parameters of :class:`MLP`, the noise-prediction network for 2-D toy data.

    dim: data dimension D. hidden: width of the residual blocks (and of the time embedding).
    num_layers: number of residual blocks. num_classes: classes for a conditional model, or None
    (label ``num_classes`` is the null label). learn_sigma: output ``2 * dim`` values.
    """

    dim: int = 2
    hidden: int = 128
    num_layers: int = 3
    num_classes: int | None = None
    learn_sigma: bool = False

    @property
    def out_dim(self) -> int:
        """Output size: ``dim``, or ``2 * dim`` when ``learn_sigma``."""
        return self.dim * (2 if self.learn_sigma else 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        return _config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MLPConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        return _config_from_dict(cls, data)

    def validate(self) -> None:
        """Raise ValueError, naming the parameter and its allowed values, if the config is unusable."""
        for name in ("dim", "hidden", "num_layers"):
            _require_int(name, getattr(self, name), 1)
        if self.num_classes is not None:
            _require_int("num_classes", self.num_classes, 1)
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"learn_sigma must be True or False, got {self.learn_sigma!r}")


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


# ----------------------------------------------------------------------------------------------
# the networks
# ----------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """The diffusion U-Net eps_theta(x_t, t[, y]) (see the module docstring for the references).

    ``forward(x, t, y=None)``: ``x`` [N, C, H, W] (noisy images, data scaled to [-1, 1]);
    ``t`` [N] original 0-based timesteps; ``y`` [N] integer labels in [0, num_classes] or None
    (``num_classes`` and None both mean "no label"). Returns [N, out_channels, H, W]: eps, then,
    with ``learn_sigma``, the variance interpolation v (Nichol & Dhariwal 2021, Eq. 15).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        mc, nrb = config.model_channels, config.num_res_blocks
        emb_dim = 4 * mc
        attn_at = set(config.attention_resolutions)

        def res_block(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, config.dropout, config.use_scale_shift_norm, **kw)

        def attention(ch: int, res: int) -> AttentionBlock:
            return AttentionBlock(ch, config.heads(ch), res)

        self.register_buffer("freqs", _frequencies(mc), persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes is not None else None

        # Encoder: each block's output is kept for the skip connection of its mirror image.
        ch = mc * config.channel_mult[0]
        res = config.image_size
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, mult in enumerate(config.channel_mult):
            for _ in range(nrb):
                layers: list[nn.Module] = [res_block(ch, mc * mult)]
                ch = mc * mult
                if res in attn_at:
                    layers.append(attention(ch, res))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                down = res_block(ch, ch, down=True) if config.resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)
                res //= 2

        self.middle_block = EmbedSequential(res_block(ch, ch), attention(ch, res), res_block(ch, ch))

        # Decoder: num_res_blocks + 1 blocks per level, each fed the concatenated skip features.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(nrb + 1):
                layers = [res_block(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if res in attn_at:
                    layers.append(attention(ch, res))
                if level > 0 and i == nrb:
                    layers.append(res_block(ch, ch, up=True) if config.resblock_updown else Upsample(ch))
                    res *= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(inplace=True), zero_module(nn.Conv2d(ch, config.out_channels, 3, padding=1))
        )

    def _check_x(self, x: Any) -> None:
        cfg = self.config
        expected = [cfg.in_channels, cfg.image_size, cfg.image_size]
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or list(x.shape[1:]) != expected:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [N, C, H, W] = [N, {', '.join(map(str, expected))}], got {got}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t, y): [N, C, H, W], [N], [N] or None -> [N, out_channels, H, W]."""
        self._check_x(x)
        n = x.shape[0]
        t = _check_t(t, n, x.device)
        y = _label_ids(y, n, self.config.num_classes, x.device)

        # The embedding is computed once per call and shared by every residual block.
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels, self.freqs).to(x.dtype))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        emb = F.silu(emb)  # every block's embedding projection starts with SiLU

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class MLPBlock(nn.Module):
    """Pre-norm residual MLP block: h + W2 SiLU(W1 SiLU(LN(h)) + W_e emb). [N, F], [N, F] -> [N, F]."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.silu(self.fc1(F.silu(self.norm(h))) + self.emb_proj(emb)))


class MLP(nn.Module):
    """Noise-prediction network for low-dimensional (2-D toy) data.

    ``forward(x, t, y=None)``: ``x`` [N, dim], ``t`` [N] 0-based timesteps, ``y`` [N] labels in
    [0, num_classes] or None. Returns [N, dim] (eps) or [N, 2 * dim] with ``learn_sigma``. The
    timestep enters through the same sinusoidal embedding and MLP as in :class:`UNet`; the output
    layer starts at zero.
    """

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        hid = config.hidden
        self.register_buffer("freqs", _frequencies(hid), persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(hid, hid), nn.SiLU(), nn.Linear(hid, hid))
        self.label_embed = nn.Embedding(config.num_classes + 1, hid) if config.num_classes is not None else None
        self.in_proj = nn.Linear(config.dim, hid)
        self.blocks = nn.ModuleList(MLPBlock(hid) for _ in range(config.num_layers))
        self.out = nn.Sequential(nn.LayerNorm(hid), nn.SiLU(), zero_module(nn.Linear(hid, config.out_dim)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t, y): [N, dim], [N], [N] or None -> [N, out_dim]."""
        dim = self.config.dim
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != dim or not x.is_floating_point():
            got = f"{list(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating-point tensor of shape [N, dim] = [N, {dim}], got {got}")
        n = x.shape[0]
        t = _check_t(t, n, x.device)
        y = _label_ids(y, n, self.config.num_classes, x.device)

        emb = self.time_embed(timestep_embedding(t, self.config.hidden, self.freqs).to(x.dtype))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        emb = F.silu(emb)
        h = self.in_proj(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
