"""A small KL-regularised convolutional autoencoder: the first stage of a latent diffusion model.

Following Rombach et al. (2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.1), the
encoder maps an image x [N, 1, 28, 28] to the mean and log-variance of a diagonal Gaussian over a latent
z [N, 4, 7, 7] (a factor 4 of downsampling per side), and the decoder maps z back to an image. Training minimises

    ||x - D(z)||^2 (mean over pixels) + kl_weight * KL(N(mu, sigma^2) || N(0, I)) (mean over latent entries),

with z = mu + sigma * eps drawn by the reparameterisation trick (Kingma & Welling 2014). A small ``kl_weight``
gives a *lightly* regularised latent: it stays close to the data (good reconstructions) while its scale stays
bounded, which is what the diffusion model trained on it needs. The latent's overall scale is then normalised
by the ``scale_factor`` of Rombach et al. (one over the standard deviation of the latent means on the training
data), so that the diffusion model sees latents of unit variance, as its noise schedule assumes.

``encode`` gives the scaled latent mean (deterministic), ``decode`` the image of a scaled latent.
:func:`load_or_train_autoencoder` trains one on ``mnist5k`` (or loads it from the model cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DictConfig, _require_int, group_norm

__all__ = ["TRAINING_KEYS", "Autoencoder", "AutoencoderConfig", "autoencoder_from_settings", "decode_in_batches",
           "encode_in_batches", "first_stage", "gaussian_kl", "load_or_train_autoencoder", "train_autoencoder"]

#: Keys of a latent model's ``TrainConfig.autoencoder`` dict that set the autoencoder's training (the other keys
#: are fields of :class:`AutoencoderConfig`), with their defaults.
TRAINING_KEYS = {"steps": 1200, "batch_size": 64, "lr": 2e-3}


@dataclass
class AutoencoderConfig(DictConfig):
    """Hyper-parameters of :class:`Autoencoder`.

    image_size: side of the square images (divisible by 4). in_channels: image channels. channels: width of the
    full-resolution and the half-resolution stage (the quarter-resolution stage has the second width too).
    latent_channels: channels of the latent at a quarter of the resolution. kl_weight: weight of the KL term.
    """

    image_size: int = 28
    in_channels: int = 1
    channels: tuple = (16, 32)
    latent_channels: int = 4
    kl_weight: float = 1e-3

    def validate(self) -> None:
        _require_int("image_size", self.image_size, 4)
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two halvings), got {self.image_size}")
        _require_int("in_channels", self.in_channels, 1)
        _require_int("latent_channels", self.latent_channels, 1)
        if len(self.channels) != 2:
            raise ValueError(f"channels must give two widths, got {list(self.channels)}")
        for c in self.channels:
            _require_int("channels", c, 1)
        if not (isinstance(self.kl_weight, (int, float)) and self.kl_weight >= 0):
            raise ValueError(f"kl_weight must be a number >= 0, got {self.kl_weight!r}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.image_size // 4, self.image_size // 4)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per entry: (mean^2 + var - 1 - logvar) / 2."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


class _Res(nn.Module):
    """GroupNorm, SiLU, 3x3 convolution, twice, around a skip connection. [N, C, H, W] -> same."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                  group_norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Autoencoder(nn.Module):
    """Encoder to a diagonal Gaussian latent and decoder back; ``scale_factor`` (a buffer) scales the latent."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c1, c2 = config.channels
        c, z = config.in_channels, config.latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), _Res(c1),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), _Res(c2),  # 28 -> 14
            nn.Conv2d(c2, c2, 3, stride=2, padding=1), _Res(c2),  # 14 -> 7
            group_norm(c2), nn.SiLU(), nn.Conv2d(c2, 2 * z, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(z, c2, 3, padding=1), _Res(c2),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c2, c2, 3, padding=1), _Res(c2),  # 7 -> 14
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c2, c1, 3, padding=1), _Res(c1),  # 14 -> 28
            group_norm(c1), nn.SiLU(), nn.Conv2d(c1, c, 3, padding=1),
        )
        self.register_buffer("scale_factor", torch.tensor(1.0))

    def _check(self, x: torch.Tensor, shape: tuple, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{what} must have shape [N, {', '.join(map(str, shape))}], got {got}")

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x), unscaled. [N, C, H, W] -> two [N, z, H/4, W/4]."""
        c, s = self.config.in_channels, self.config.image_size
        self._check(x, (c, s, s), "x")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """The scaled latent of x: its mean (deterministic) or, with ``sample``, a draw of q(z | x)."""
        mean, logvar = self.moments(x)
        if sample:
            mean = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator).to(mean)
        return mean * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The image of a scaled latent z [N, z, H/4, W/4] -> [N, C, H, W] (not clamped)."""
        self._check(z, self.config.latent_shape, "z")
        return self.decoder(z / self.scale_factor)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction (mean squared error per pixel), KL (mean per latent entry) and their weighted sum."""
        mean, logvar = self.moments(x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator).to(mean)
        rec = F.mse_loss(self.decoder(z), x)
        kl = gaussian_kl(mean, logvar).mean()
        return {"loss": rec + self.config.kl_weight * kl, "reconstruction": rec, "kl": kl}


def train_autoencoder(model: Autoencoder, x: torch.Tensor, *, steps: int, batch_size: int = 64, lr: float = 2e-3,
                      generator: torch.Generator | None = None) -> dict:
    """Train with AdamW and a cosine decay of the learning rate, then set ``scale_factor`` to one over the standard
    deviation of the latent means of ``x``. Returns the history (``loss``, ``reconstruction``, ``kl``) and seconds."""
    generator = generator or torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 10)
    history = {"loss": [], "reconstruction": [], "kl": []}
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(x), generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(x):
            order, pos = torch.randperm(len(x), generator=generator), 0
        batch = x[order[pos: pos + batch_size]]
        pos += batch_size
        out = model.loss(batch, generator)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
        for k in history:
            history[k].append(float(out[k].detach()))
    model.eval()
    with torch.no_grad():
        means = torch.cat([model.moments(x[i: i + 500])[0] for i in range(0, len(x), 500)])
        model.scale_factor.fill_(1.0 / float(means.std()))
    return {"history": history, "seconds": time.perf_counter() - start}


def autoencoder_from_settings(settings, image_shape) -> tuple[AutoencoderConfig, dict]:
    """Split a latent model's ``TrainConfig.autoencoder`` dict into the :class:`AutoencoderConfig` for images of
    ``image_shape`` (C, H, W) and the training settings (``TRAINING_KEYS``, defaults filled in). Raises ValueError
    naming an unknown key or a bad value."""
    if not isinstance(settings, dict):
        raise ValueError(f"autoencoder must be a dict of AutoencoderConfig fields and {', '.join(TRAINING_KEYS)}; "
                         f"got {type(settings).__name__}")
    fields = [f for f in AutoencoderConfig.__dataclass_fields__ if f not in ("image_size", "in_channels")]
    unknown = sorted(set(settings) - set(fields) - set(TRAINING_KEYS))
    if unknown:
        raise ValueError(f"unknown autoencoder keys {unknown}; allowed keys are {fields + list(TRAINING_KEYS)}")
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"the autoencoder needs square images, got {h}x{w}")
    config = AutoencoderConfig.from_dict({"image_size": h, "in_channels": c,
                                         **{k: v for k, v in settings.items() if k in fields}})
    training = {k: settings.get(k, default) for k, default in TRAINING_KEYS.items()}
    _require_int("autoencoder steps", training["steps"], 1)
    _require_int("autoencoder batch_size", training["batch_size"], 1)
    if not (isinstance(training["lr"], (int, float)) and not isinstance(training["lr"], bool) and training["lr"] > 0):
        raise ValueError(f"autoencoder lr must be a positive number, got {training['lr']!r}")
    return config, training


@torch.no_grad()
def encode_in_batches(model: Autoencoder, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The scaled latent means of the images ``x``, ``batch_size`` at a time, on ``x``'s device."""
    model.eval()
    return torch.cat([model.encode(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def decode_in_batches(model: Autoencoder, z: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Images in [-1, 1] of the scaled latents ``z``, ``batch_size`` at a time on the model's device, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.decode(z[i: i + batch_size].to(device)).clamp(-1, 1).cpu()
                      for i in range(0, len(z), batch_size)])


def load_or_train_autoencoder(config: AutoencoderConfig | None = None, *, dataset: str = "mnist5k",
                              steps: int = 1200, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                              cache: bool = True, root=None) -> Autoencoder:
    """An autoencoder trained on ``dataset`` (train split), cached in ``ddpm.paths.cache_dir()`` by the hash of
    its configuration and training settings. ``model.info`` holds the training seconds, the final losses and the
    held-out reconstruction error. With the defaults (widths 16 and 32, 1,200 steps of 64) it trains in about two
    minutes on two CPU cores, and the project's FID of its reconstructions of 1,000 held-out digits lies within the
    error of the real-data floor at the same n."""
    from .checkpoint import config_hash, load_weights, save_weights
    from .data import load_dataset
    from .paths import cache_dir

    config = config or AutoencoderConfig()
    key = {"autoencoder": config.to_dict(), "dataset": dataset, "steps": steps, "batch_size": batch_size, "lr": lr,
           "seed": seed}
    path = cache_dir() / f"autoencoder-{config_hash(key)}.safetensors"
    if cache and path.is_file():
        tensors, meta = load_weights(path)
        if meta.get("model") != "Autoencoder":
            raise ValueError(f"{path} is not an autoencoder checkpoint (holds {meta.get('model')!r}); delete it")
        model = Autoencoder(AutoencoderConfig.from_dict(meta["config"]))
        model.load_state_dict(tensors)
        model.info = meta.get("info", {})
        return model.eval()
    torch.manual_seed(seed)
    model = Autoencoder(config)
    x, _ = load_dataset(dataset, split="train", root=root)
    result = train_autoencoder(model, x, steps=steps, batch_size=batch_size, lr=lr,
                               generator=torch.Generator().manual_seed(seed))
    xt, _ = load_dataset(dataset, split="test", root=root)
    with torch.no_grad():
        heldout = float(F.mse_loss(model.decode(model.encode(xt)), xt))
    tail = {k: sum(v[-50:]) / len(v[-50:]) for k, v in result["history"].items()}
    model.info = {"seconds": result["seconds"], "steps": steps, "dataset": dataset, "final": tail,
                  "heldout_mse": heldout, "scale_factor": float(model.scale_factor)}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(path, model.state_dict(), {"model": "Autoencoder", "config": config.to_dict(), "info": model.info})
    return model


def first_stage(config, images: torch.Tensor | None = None, data_root=None) -> Autoencoder:
    """The autoencoder of a latent ``TrainConfig``: trained on ``images`` when given (not cached), else trained on the
    train split of ``config.dataset`` or loaded from the cache (``ddpm.autoencoder.load_or_train_autoencoder``)."""
    ae_config, training = config.autoencoder_config()
    if images is None:
        return load_or_train_autoencoder(ae_config, dataset=config.dataset, seed=config.seed, root=data_root,
                                         **training)
    torch.manual_seed(config.seed)
    model = Autoencoder(ae_config)
    result = train_autoencoder(model, images.cpu(), generator=torch.Generator().manual_seed(config.seed), **training)
    model.info = {"seconds": result["seconds"], "steps": training["steps"], "dataset": "given images"}
    return model
