"""ddpm: a small, tested PyTorch implementation of denoising diffusion probabilistic models.

DDPM (Ho et al. 2020), Improved DDPM (Nichol & Dhariwal 2021) and guided diffusion (Dhariwal & Nichol
2021), written to be read beside the book that derives each piece. Modules, one idea each:
``schedule`` (forward process), ``blocks``, ``unet`` and ``mlp`` (the networks), ``losses`` (objectives and the
bound's terms), ``samplers`` (ancestral, respaced, DDIM, Heun, DPM-Solver++) and ``spacing`` (the steps they visit),
``likelihood`` (bits/dim), ``flow`` (flow matching and rectified flow), ``guidance``, ``digit_classifier``,
``fid``, ``memorisation`` and ``metrics`` (evaluation), ``samplefiles``, ``data``, ``paths``, ``rng``,
``distributed``, ``trainconfig``, ``optim``, ``callbacks``, ``train`` and ``resume`` (training), ``atomic``,
``locking`` and ``checkpoint`` (files), ``cache`` (trained models, above the trainer), ``presets``, ``plotting``
and ``book`` (what the book's notebooks share: glue, verdicts, tables).
"""

__version__ = "0.4.0"

from .cache import TrainedModel, load_or_train  # noqa: E402
from .data import load_dataset  # noqa: E402
from .presets import get_preset, mnist_preset, profile  # noqa: E402
from .schedule import NoiseSchedule  # noqa: E402
from .train import TrainConfig  # noqa: E402
from .unet import UNet, UNetConfig  # noqa: E402

__all__ = ["NoiseSchedule", "UNet", "UNetConfig", "TrainConfig", "TrainedModel", "load_or_train", "load_dataset",
           "get_preset", "mnist_preset", "profile", "__version__"]
