"""ddpm: a small, tested PyTorch implementation of denoising diffusion probabilistic models.

DDPM (Ho et al. 2020), Improved DDPM (Nichol & Dhariwal 2021) and guided diffusion (Dhariwal & Nichol
2021), written to be read beside the book that derives each piece. Modules, one idea each:
``schedule`` (forward process), ``unet`` (the network), ``losses`` (objectives and the bound's terms),
``samplers`` (ancestral, respaced, DDIM), ``likelihood`` (bits/dim), ``guidance``, ``metrics``, ``data``,
``train``, ``checkpoint``, ``presets``, ``plotting``.
"""

__version__ = "0.2.0"

from .checkpoint import TrainedModel, load_or_train  # noqa: E402
from .data import load_dataset  # noqa: E402
from .presets import get_preset, mnist_preset, profile  # noqa: E402
from .schedule import NoiseSchedule  # noqa: E402
from .train import TrainConfig  # noqa: E402
from .unet import UNet, UNetConfig  # noqa: E402

__all__ = ["NoiseSchedule", "UNet", "UNetConfig", "TrainConfig", "TrainedModel", "load_or_train", "load_dataset",
           "get_preset", "mnist_preset", "profile", "__version__"]
