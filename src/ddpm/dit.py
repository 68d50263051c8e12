"""A diffusion transformer (DiT, Peebles & Xie 2023) with the U-Net's call signature ``model(x, t, y)``.

The image (or latent) ``x`` [N, C, H, W] is cut into non-overlapping p x p patches, each projected to a token of
``hidden`` features, to which a fixed two-dimensional sine-cosine position embedding is added. A stack of
transformer blocks follows, each conditioned on the embedding of the timestep plus the class by *adaLN-Zero*:

    h <- h + g1 * Attention(LN(h) * (1 + s1) + b1),    h <- h + g2 * MLP(LN(h) * (1 + s2) + b2),

where LN has no parameters of its own and (b1, s1, g1, b2, s2, g2) come from one linear map of the conditioning
vector, initialised at zero, so that every block starts as the identity (the "Zero" of adaLN-Zero). A final
adaptive layer norm and a zero-initialised linear map give p * p * C outputs per token (2C with learned
variances), which are put back into an image ("unpatchify"). The untrained network therefore predicts exactly
zero, as the book's U-Net does. The timestep and class enter through ``ddpm.blocks.conditioning``, with the null
label ``num_classes`` of classifier-free guidance, so every sampler, guidance and likelihood code runs on it.

The weights start as in the reference implementation of Peebles & Xie (``initialize_weights`` of
facebookresearch/DiT): Xavier-uniform linear layers with zero biases, the label table and the timestep MLP drawn
from N(0, 0.02^2), so that the class does not drown the noise level in the conditioning vector, and the adaLN and
output layers at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DictConfig, _frequencies, _require_int, conditioning, zero_module

__all__ = ["DiT", "DiTConfig", "expected_parameters", "patchify", "sincos_position_embedding", "unpatchify"]


@dataclass
class DiTConfig(DictConfig):
    """Hyper-parameters of :class:`DiT`.

    image_size: height = width of the input, a multiple of ``patch_size``. in_channels: channels C of the input.
    patch_size: side p of a patch. hidden: token width (a multiple of ``num_heads``). depth: transformer blocks.
    num_heads: attention heads. mlp_ratio: width of each block's MLP as a multiple of ``hidden``.
    num_classes: classes of a conditional model, or None (label ``num_classes`` is the null label).
    learn_sigma: output ``2 * in_channels`` channels (eps and the variance interpolation v).
    conv_mlp: put a depthwise 3x3 convolution over the token grid between the two layers of each block's MLP,
    so that every block mixes neighbouring patches (the ConvFFN of PVT v2, Wang et al. 2022).
    """

    image_size: int = 8
    in_channels: int = 4
    patch_size: int = 2
    hidden: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    num_classes: int | None = None
    learn_sigma: bool = False
    conv_mlp: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        """Raise ValueError, naming the parameter and its allowed values, if the config is unusable."""
        for name in ("image_size", "in_channels", "patch_size", "hidden", "depth", "num_heads", "mlp_ratio"):
            _require_int(name, getattr(self, name), 1)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden % self.num_heads or self.hidden % 4:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of num_heads ({self.num_heads}) and of 4 "
                             "(the 2-D position embedding)")
        if self.num_classes is not None:
            _require_int("num_classes", self.num_classes, 1)
        for name in ("learn_sigma", "conv_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)(W/p), p*p*C]: row-major patches, each flattened as (row, column, channel)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: [N, (H/p)(W/p), p*p*C] -> [N, C, H, W]."""
    n = tokens.shape[0]
    x = tokens.reshape(n, h // p, w // p, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)


def sincos_position_embedding(hidden: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [grid * grid, hidden]: half the features encode the row, half the
    column, each with the frequencies of the timestep embedding (as in DiT and MAE)."""
    quarter = hidden // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(v):
        args = v.reshape(-1, 1) * freqs
        return torch.cat([args.sin(), args.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TokenMLP(nn.Sequential):
    """The MLP of a block, D -> ratio * D -> D, with GELU. With ``grid`` (the side of the token grid) a depthwise
    3x3 convolution over the grid of hidden features comes before the GELU, mixing each patch with its eight
    neighbours. [N, L, D] -> [N, L, D]. Its layers are numbered as a plain ``nn.Sequential`` MLP's, so that the
    weights of a DiT without the convolution keep their names."""

    def __init__(self, hidden: int, mlp_ratio: int, grid: int | None = None) -> None:
        width = mlp_ratio * hidden
        super().__init__(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))
        self.grid = grid
        self.conv = nn.Conv2d(width, width, 3, padding=1, groups=width) if grid else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self[0](h)
        if self.conv is not None:
            n, length, width = h.shape
            image = h.transpose(1, 2).reshape(n, width, self.grid, self.grid)
            h = self.conv(image).reshape(n, width, length).transpose(1, 2)
        return self[2](self[1](h))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning. [N, L, D], [N, D] -> [N, L, D]. ``grid``: see
    :class:`TokenMLP`."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: int, grid: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = TokenMLP(hidden, mlp_ratio, grid)
        self.modulation = zero_module(nn.Linear(hidden, 6 * hidden))  # adaLN-Zero: the block starts as the identity

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        n, length, d = h.shape
        q, k, v = self.qkv(h).reshape(n, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, d/heads]
        return self.proj(out.transpose(1, 2).reshape(n, length, d))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b1, s1, g1, b2, s2, g2 = self.modulation(emb).chunk(6, dim=1)
        h = h + g1.unsqueeze(1) * self.attention(_modulate(self.norm1(h), b1, s1))
        return h + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(h), b2, s2))


class DiT(nn.Module):
    """Noise-prediction transformer: ``forward(x, t, y=None)`` with x [N, C, H, W], t [N] 0-based timesteps and y [N]
    labels in [0, num_classes] or None; returns [N, C or 2C, H, W]. The output starts at exactly zero."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d, p = config.hidden, config.patch_size
        self.register_buffer("freqs", _frequencies(d), persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.label_embed = nn.Embedding(config.num_classes + 1, d) if config.num_classes is not None else None
        self.patch_embed = nn.Linear(p * p * config.in_channels, d)
        grid = config.image_size // p
        self.register_buffer("pos_embed", sincos_position_embedding(d, grid), persistent=False)
        conv_grid = grid if config.conv_mlp else None
        self.blocks = nn.ModuleList(DiTBlock(d, config.num_heads, config.mlp_ratio, conv_grid)
                                    for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = zero_module(nn.Linear(d, 2 * d))
        self.out = zero_module(nn.Linear(d, p * p * config.out_channels))
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialise as the DiT of Peebles & Xie (2023) does (``initialize_weights`` in facebookresearch/DiT).

        Every linear layer: Xavier-uniform weights, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio
        2010), and zero biases; the patch embedding is a linear layer here, which is how DiT treats its patch
        convolution. The label table and both layers of the timestep MLP: N(0, 0.02^2) weights. The adaLN
        modulation of every block and of the final layer, and the output layer: zero (adaLN-Zero). The depthwise
        convolution of ``conv_mlp``, which DiT does not have, keeps PyTorch's default initialisation. The DiT's
        own ``time_embed`` and ``label_embed`` are re-drawn here; ``ddpm.blocks.conditioning`` and the U-Net are
        untouched.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        for layer in [block.modulation for block in self.blocks] + [self.final_modulation, self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c, size = self.config.in_channels, self.config.image_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (c, size, size):
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [N, {c}, {size}, {size}], got {got}")
        emb = conditioning(self, x, t, y, self.config.hidden)
        h = self.patch_embed(patchify(x, self.config.patch_size)) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.final_modulation(emb).chunk(2, dim=1)
        tokens = self.out(_modulate(self.final_norm(h), shift, scale))
        return unpatchify(tokens, self.config.patch_size, self.config.out_channels, size, size)


def expected_parameters(config: DiTConfig) -> int:
    """The parameter count of :class:`DiT` from its configuration, term by term (for tests and the book)."""
    d, p, c = config.hidden, config.patch_size, config.in_channels
    time = 2 * (d * d + d)
    labels = 0 if config.num_classes is None else (config.num_classes + 1) * d
    patch = p * p * c * d + d
    width = config.mlp_ratio * d
    block = (3 * d * d + 3 * d) + (d * d + d) + 2 * (width * d) + width + d + (6 * d * d + 6 * d)
    if config.conv_mlp:
        block += width * 9 + width  # a 3x3 kernel and a bias per hidden feature of the MLP
    final = (2 * d * d + 2 * d) + (d * p * p * config.out_channels + p * p * config.out_channels)
    return time + labels + patch + config.depth * block + final

