"""ddpm: a small, tested PyTorch implementation of denoising diffusion probabilistic models.

DDPM (Ho et al. 2020), Improved DDPM (Nichol & Dhariwal 2021) and guided diffusion (Dhariwal & Nichol
2021), written to be read beside the book that derives each piece. Modules, one idea each:
``schedule`` (forward process), ``unet`` (the network), ``losses`` (objectives and the bound's terms),
``samplers`` (ancestral, respaced, DDIM), ``likelihood`` (bits/dim), ``guidance``, ``metrics``, ``data``,
``train``, ``checkpoint``, ``presets``.
"""

__version__ = "0.1.0"

from .schedule import NoiseSchedule  # noqa: E402
from .unet import UNet, UNetConfig  # noqa: E402

__all__ = ["NoiseSchedule", "UNet", "UNetConfig", "__version__"]
