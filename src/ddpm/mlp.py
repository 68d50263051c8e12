"""A small noise-prediction network for low-dimensional data: the 2-D toy models of the book.

The same interface as the U-Net, ``model(x, t, y=None)``, so every sampler, loss and guidance works on it unchanged;
the timestep enters through the U-Net's sinusoidal embedding (``ddpm.blocks.timestep_embedding``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DictConfig, _frequencies, _require_int, conditioning, zero_module

__all__ = ["MLP", "MLPConfig"]


@dataclass
class MLPConfig(DictConfig):
    """Hyper-parameters of :class:`MLP`, the noise-prediction network for 2-D toy data.

    dim: data dimension D. hidden: width of the residual blocks (and of the time embedding).
    num_layers: number of residual blocks. num_classes: classes for a conditional model, or None
    (label ``num_classes`` is the null label). learn_sigma: output ``2 * dim`` values.
    fourier_levels: L > 0 feeds the network ``sin(2^l pi x)`` and ``cos(2^l pi x)`` of every coordinate for
    l = 0 .. L-1 next to x itself (the positional encoding of Mildenhall et al. 2020): a plain linear input layer
    learns fine, curved structure such as the arms of a spiral very slowly (Tancik et al. 2020).
    """

    dim: int = 2
    hidden: int = 128
    num_layers: int = 3
    num_classes: int | None = None
    learn_sigma: bool = False
    fourier_levels: int = 0

    @property
    def out_dim(self) -> int:
        """Output size: ``dim``, or ``2 * dim`` when ``learn_sigma``."""
        return self.dim * (2 if self.learn_sigma else 1)

    def validate(self) -> None:
        """Raise ValueError, naming the parameter and its allowed values, if the config is unusable."""
        for name in ("dim", "hidden", "num_layers"):
            _require_int(name, getattr(self, name), 1)
        _require_int("fourier_levels", self.fourier_levels, 0)
        if self.num_classes is not None:
            _require_int("num_classes", self.num_classes, 1)
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"learn_sigma must be True or False, got {self.learn_sigma!r}")


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
        levels = config.fourier_levels
        self.register_buffer("fourier_freqs", math.pi * 2.0 ** torch.arange(levels, dtype=torch.float32),
                             persistent=False)
        self.in_proj = nn.Linear(config.dim * (1 + 2 * levels), hid)
        self.blocks = nn.ModuleList(MLPBlock(hid) for _ in range(config.num_layers))
        self.out = nn.Sequential(nn.LayerNorm(hid), nn.SiLU(), zero_module(nn.Linear(hid, config.out_dim)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input features: x, then sin and cos of every coordinate at each Fourier level. [N, dim] ->
        [N, dim * (1 + 2 L)]."""
        if self.config.fourier_levels == 0:
            return x
        args = (x[:, :, None] * self.fourier_freqs.to(x.dtype)).flatten(1)  # [N, dim * L]
        return torch.cat([x, torch.sin(args), torch.cos(args)], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t, y): [N, dim], [N], [N] or None -> [N, out_dim]."""
        dim = self.config.dim
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != dim or not x.is_floating_point():
            got = f"{list(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating-point tensor of shape [N, dim] = [N, {dim}], got {got}")
        emb = conditioning(self, x, t, y, self.config.hidden)
        h = self.in_proj(self.encode(x))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
