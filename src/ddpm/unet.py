"""The noise-prediction U-Net (the small MLP for 2-D toy data is in ``ddpm.mlp``).

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

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .blocks import (AttentionBlock, DictConfig, Downsample, EmbedSequential, ResBlock, Upsample, _frequencies, _is_int,
                     _require_int, conditioning, count_parameters, timestep_embedding, zero_module)
# re-exported for the tests and benchmarks that look them up here
from .blocks import _num_groups, group_norm  # noqa: F401

__all__ = [
    "UNetConfig",
    "UNet",
    "count_parameters",
    "timestep_embedding",
]


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class UNetConfig(DictConfig):
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
        # The embedding is computed once per call and shared by every residual block.
        emb = conditioning(self, x, t, y, self.config.model_channels)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
