"""Guidance: a noise-aware classifier, classifier guidance and classifier-free guidance.

Both kinds of guidance are :class:`ddpm.samplers.Guidance` hooks, so they work with every sampler
(ancestral, respaced, DDIM) through the sampler's ``guidance=`` argument:

* :class:`ClassifierGuidance` (Dhariwal & Nichol 2021, Algorithms 1 and 2) returns
  ``s * grad_x log p_phi(y | x_t, t)`` from :meth:`~ClassifierGuidance.cond_grad`; the ancestral sampler adds
  ``Sigma * grad`` to the mean (Algorithm 1), DDIM subtracts ``sqrt(1 - alpha_bar_t) * grad`` from eps
  (Algorithm 2). The classifier always sees the original training timestep, also when sampling is respaced.
* :class:`ClassifierFreeGuidance` (Ho & Salimans 2022, Eq. 6) combines a conditional and an unconditional
  pass of one model: ``eps = (1 + w) eps(x_t, y) - w eps(x_t, null)``. **Convention**: ``w = 0`` is the plain
  conditional model (no guidance); diffusers' ``guidance_scale`` equals ``1 + w``.

The classifier p_phi(y | x_t, t) is :class:`NoiseAwareClassifier`, trained on noised images at random t by
:func:`train_noise_aware_classifier`. The book derives all of this in ``theory/guided_diffusion.md``.
Timesteps are 0-based original training timesteps (t = 0 is the first noising step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .samplers import Guidance
from .blocks import _check_t, _config_to_dict, _frequencies, group_norm, timestep_embedding

__all__ = [
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "NoiseAwareClassifierConfig",
    "NoiseAwareClassifier",
    "train_noise_aware_classifier",
    "accuracy_by_quartile",
    "save_classifier",
    "load_classifier",
    "load_or_train_classifier",
]


# ----------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------


class ClassifierFreeGuidance(Guidance):
    """Classifier-free guidance, Ho & Salimans (2022) Eq. 6: ``eps = (1 + w) eps(x_t, y) - w eps(x_t, null)``.

    ``scale`` is w >= 0: ``w = 0`` returns the conditional model's output unchanged (no guidance), larger w
    trades diversity for fidelity. diffusers' ``guidance_scale`` is ``1 + w``. The model must be trained with
    label dropout so that the null label (``num_classes``, read from ``model.config.num_classes`` unless
    ``null_label`` is given) means "unconditional". With learned variances (2C output channels) only the
    eps channels are combined; the variance channels are the conditional pass's. The two passes run as one
    batched model call of size 2N. Unconditional sampling (``y=None``) is left unguided.
    """

    def __init__(self, scale: float, null_label: int | None = None):
        scale = float(scale)
        if not scale >= 0:
            raise ValueError(f"scale: the classifier-free guidance weight w must be >= 0 (0 = no guidance), "
                             f"got {scale}")
        self.scale = scale
        self.null_label = null_label

    def _null(self, model) -> int:
        if self.null_label is not None:
            return int(self.null_label)
        num_classes = getattr(getattr(model, "config", None), "num_classes", None)
        if num_classes is None:
            raise ValueError("null_label: the model has no config.num_classes; pass null_label= "
                             "(the label the model was trained to read as 'no class')")
        return int(num_classes)

    def model_output(self, model, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """x ``[N, C, ...]``, t ``[N]`` original timesteps, y ``[N]`` -> guided output ``[N, C or 2C, ...]``."""
        if y is None or self.scale == 0:
            return model(x, t, y)
        y_null = torch.full_like(y, self._null(model))
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        cond, uncond = out.chunk(2)
        c = x.shape[1]
        w = self.scale
        eps = (1 + w) * cond[:, :c] - w * uncond[:, :c]  # Ho & Salimans (2022), Eq. 6
        return torch.cat([eps, cond[:, c:]], dim=1) if cond.shape[1] == 2 * c else eps

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(scale={self.scale})"


# ----------------------------------------------------------------------------------------------------------
# Classifier guidance
# ----------------------------------------------------------------------------------------------------------


class ClassifierGuidance(Guidance):
    """Classifier guidance, Dhariwal & Nichol (2021) Algorithms 1 and 2.

    ``classifier(x_t, t) -> logits [N, K]`` is a noise-aware classifier, ``scale`` the gradient scale s >= 0.
    :meth:`cond_grad` returns ``s * grad_{x_t} log p_phi(y | x_t, t)``; the samplers apply it (Algorithm 1:
    mean + Sigma * grad; Algorithm 2: eps - sqrt(1 - alpha_bar_t) * grad). The gradient is taken with autograd
    switched on even inside ``torch.no_grad()`` or ``torch.inference_mode()``.

    ``condition_model``: whether the diffusion model also receives the labels. The default False queries it
    without labels (``model(x, t, None)``, the null label of a class-conditional network), so that the classifier
    alone steers the samples, as in Dhariwal & Nichol's guidance of an unconditional model; True guides a
    conditional model further.
    """

    def __init__(self, classifier: nn.Module, scale: float, condition_model: bool = False):
        scale = float(scale)
        if not scale >= 0:
            raise ValueError(f"scale: the classifier guidance scale s must be >= 0 (0 = no guidance), got {scale}")
        self.classifier = classifier
        self.scale = scale
        self.condition_model = bool(condition_model)

    def model_output(self, model, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The diffusion model's output, with the labels only when ``condition_model``."""
        return model(x, t, y if self.condition_model else None)

    def log_prob(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """log p_phi(y | x_t, t) per example ``[N]``."""
        logits = self.classifier(x, t)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32, keep fp64
        return logits.log_softmax(dim=1).gather(1, y.long().view(-1, 1)).squeeze(1)

    def cond_grad(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor | None:
        """``s * grad_x log p_phi(y | x_t, t)`` with the shape and dtype of x; None when s = 0."""
        if y is None:
            raise ValueError("y: classifier guidance needs the requested class labels [N]; pass y= to the sampler")
        if self.scale == 0:
            return None
        with torch.inference_mode(False), torch.enable_grad():
            # clone: tensors made under inference_mode cannot enter autograd directly
            x_in = x.detach().clone().requires_grad_(True)
            selected = self.log_prob(x_in, t.clone(), y.clone()).sum()
            (grad,) = torch.autograd.grad(selected, x_in)
        return (self.scale * grad).to(x.dtype)

    def __repr__(self) -> str:
        return f"ClassifierGuidance(scale={self.scale}, condition_model={self.condition_model})"


# ----------------------------------------------------------------------------------------------------------
# The noise-aware classifier p_phi(y | x_t, t)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class NoiseAwareClassifierConfig:
    """A compact time-conditioned CNN. ``channels``: width per resolution level (the image is halved between
    levels: 28 -> 14 -> 7 for three levels); ``time_embed_dim``: width of the timestep embedding MLP."""

    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    channels: tuple[int, ...] = (16, 32, 32)
    time_embed_dim: int = 64
    dropout: float = 0.0

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels: one or more positive widths expected, got {self.channels}")
        for name in ("image_size", "in_channels", "time_embed_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: need at least 2 classes, got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return _config_to_dict(self)


class _TimeBlock(nn.Module):
    """Residual block: GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-dropout-conv."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class NoiseAwareClassifier(nn.Module):
    """p_phi(y | x_t, t): ``forward(x_t, t) -> logits [N, num_classes]``.

    x_t ``[N, C, H, W]`` (noised images in the scale of the diffusion model), t ``[N]`` 0-based original
    training timesteps (a number is broadcast). The timestep enters every block through the sinusoidal
    embedding of the U-Net (:func:`ddpm.unet.timestep_embedding`) and an MLP; the last feature map is
    average-pooled into a linear head. A compact stand-in for the U-Net encoder that Dhariwal & Nichol (2021)
    use as their classifier.
    """

    def __init__(self, config: NoiseAwareClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or NoiseAwareClassifierConfig()
        c0, e = config.channels[0], config.time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(c0, e), nn.SiLU(), nn.Linear(e, e))
        self.register_buffer("freqs", _frequencies(c0), persistent=False)  # built once, not per call
        self.stem = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        blocks, c_prev = [], c0
        for c in config.channels:
            blocks.append(_TimeBlock(c_prev, c, e, config.dropout))
            c_prev = c
        self.blocks = nn.ModuleList(blocks)
        self.norm = group_norm(c_prev)
        self.head = nn.Linear(c_prev, config.num_classes)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, x: Tensor, t) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected [N, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        t = _check_t(t, x.shape[0], x.device)
        emb = self.time_mlp(timestep_embedding(t, cfg.channels[0], self.freqs).to(x.dtype))
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if i < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2)
        return self.head(F.silu(self.norm(h)).mean(dim=(2, 3)))


def _quartile_t(q: int, n: int, T: int, generator: torch.Generator | None) -> Tensor:
    """n timesteps drawn uniformly from quartile q (0..3) of [0, T): [q T / 4, (q + 1) T / 4)."""
    lo, hi = q * T // 4, max((q + 1) * T // 4, q * T // 4 + 1)
    return torch.randint(lo, hi, (n,), generator=generator)


@torch.no_grad()
def accuracy_by_quartile(classifier: nn.Module, schedule, x0: Tensor, y: Tensor, *, batch_size: int = 500,
                         generator: torch.Generator | None = None) -> list[float]:
    """Accuracy of the classifier on ``q_sample(x0, t)`` with t uniform in each quartile of [0, T).

    x0 ``[N, ...]``, y ``[N]``. Returns four accuracies, from the least noisy quartile (t < T/4) to the most
    noisy; each image is noised once per quartile.
    """
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    gen = generator or torch.Generator().manual_seed(0)
    result = []
    for q in range(4):
        correct = 0
        for i in range(0, len(x0), batch_size):
            xb, yb = x0[i: i + batch_size], y[i: i + batch_size]
            t = _quartile_t(q, len(xb), schedule.T, gen)
            x_t = schedule.q_sample(xb, t, generator=gen).to(device)
            correct += int((classifier(x_t, t.to(device)).argmax(1).cpu() == yb).sum())
        result.append(correct / len(x0))
    classifier.train(was_training)
    return result


def train_noise_aware_classifier(
    classifier: NoiseAwareClassifier,
    schedule,
    x0: Tensor,
    y: Tensor,
    *,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    eval_data: tuple[Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
    callback=None,
) -> dict:
    """Train p_phi(y | x_t, t) with cross-entropy on ``x_t = q_sample(x0, t)``, t uniform in [0, T).

    x0 ``[N, C, H, W]`` in [-1, 1] and labels y ``[N]`` stay on the CPU; batches move to the classifier's
    device. ``callback(step, loss)`` is called after every step. Returns ``{"loss": [steps] floats,
    "accuracy_by_quartile": 4 accuracies on eval_data (else on the training data), "seconds": ...}``.
    The classifier is left in eval mode.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size: must be positive, got steps={steps}, batch_size={batch_size}")
    if len(x0) != len(y):
        raise ValueError(f"x0 and y: need one label per image, got {len(x0)} images and {len(y)} labels")
    device = next(classifier.parameters()).device
    gen = generator or torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    classifier.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x0), (batch_size,), generator=gen)
        t = torch.randint(0, schedule.T, (batch_size,), generator=gen)
        x_t = schedule.q_sample(x0[idx], t, generator=gen)
        loss = F.cross_entropy(classifier(x_t.to(device), t.to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
    classifier.eval()
    ex, ey = eval_data if eval_data is not None else (x0, y)
    acc = accuracy_by_quartile(classifier, schedule, ex, ey, generator=gen)
    return {"loss": losses, "accuracy_by_quartile": acc, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------------------
# Saving, loading, caching
# ----------------------------------------------------------------------------------------------------------


def schedule_record(schedule) -> dict:
    """What identifies the noise schedule a classifier was trained for: its name, T and a fingerprint of its betas."""
    return {"name": getattr(schedule, "name", None), "T": int(schedule.T),
            "betas_sum": round(float(schedule.betas.sum()), 12), "betas_last": round(float(schedule.betas[-1]), 12)}


def save_classifier(classifier: NoiseAwareClassifier, path, info: dict | None = None, *, schedule) -> Path:
    """Write the classifier's weights and configuration, the schedule it was trained for (:func:`schedule_record`)
    and a JSON-ready ``info`` to one safetensors file."""
    from .checkpoint import save_weights

    meta = {"model": "NoiseAwareClassifier", "config": classifier.config.to_dict(), "info": info or {},
            "schedule": schedule_record(schedule)}
    return save_weights(path, classifier.state_dict(), meta)


def load_classifier(path, device=None, *, schedule=None) -> NoiseAwareClassifier:
    """Read a file written by :func:`save_classifier`; returns the classifier in eval mode with ``.info`` and
    ``.schedule_record`` set. With ``schedule``, a classifier trained for another schedule or T is refused: its
    notion of how noisy x_t is at step t would be wrong, and its gradients with it."""
    from .checkpoint import load_weights

    tensors, meta = load_weights(path)
    if meta.get("model") != "NoiseAwareClassifier":
        raise ValueError(f"path: {path} is not a noise-aware classifier checkpoint (holds {meta.get('model')!r})")
    record = meta.get("schedule")
    if schedule is not None:
        wanted = schedule_record(schedule)
        if record is None:
            raise ValueError(f"{path} does not record the noise schedule it was trained for; retrain it with "
                             "ddpm.guidance.load_or_train_classifier for this model's schedule")
        if record != wanted:
            raise ValueError(f"{path} was trained for the {record['name']} schedule with T={record['T']}, but the "
                             f"model uses {wanted['name']} with T={wanted['T']}; train a classifier for this "
                             "schedule (ddpm.guidance.load_or_train_classifier)")
    classifier = NoiseAwareClassifier(NoiseAwareClassifierConfig(**meta["config"]))
    classifier.load_state_dict(tensors)
    classifier.info = meta.get("info", {})
    classifier.schedule_record = record
    return classifier.to(device or "cpu").eval()


def load_or_train_classifier(
    schedule,
    config: NoiseAwareClassifierConfig | None = None,
    *,
    dataset: str = "mnist5k",
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device=None,
    cache: bool = True,
) -> NoiseAwareClassifier:
    """A noise-aware classifier for ``schedule`` trained on ``dataset`` (train split), cached by config hash.

    The cache file is ``noise-aware-classifier-<hash>.safetensors`` in ``ddpm.paths.cache_dir()``; the
    hash covers the network configuration, the schedule's betas, the data set and the training settings.
    ``classifier.info`` holds ``accuracy_by_quartile`` on the held-out split, ``steps`` and ``seconds``.
    """
    from .checkpoint import config_hash
    from .paths import cache_dir
    from .data import load_dataset

    config = config or NoiseAwareClassifierConfig()
    key = {
        "classifier": config.to_dict(), "dataset": dataset, "steps": steps, "batch_size": batch_size, "lr": lr,
        "seed": seed, "schedule": schedule_record(schedule),
    }
    path = cache_dir() / f"noise-aware-classifier-{config_hash(key)}.safetensors"
    if cache and path.is_file():
        return load_classifier(path, device, schedule=schedule)
    torch.manual_seed(seed)
    classifier = NoiseAwareClassifier(config).to(device or "cpu")
    x, y = load_dataset(dataset, split="train")
    xt, yt = load_dataset(dataset, split="test")
    result = train_noise_aware_classifier(classifier, schedule, x, y, steps=steps, batch_size=batch_size, lr=lr,
                                          eval_data=(xt, yt), generator=torch.Generator().manual_seed(seed))
    info = {"accuracy_by_quartile": result["accuracy_by_quartile"], "steps": steps, "seconds": result["seconds"],
            "final_loss": sum(result["loss"][-50:]) / len(result["loss"][-50:]), "dataset": dataset}
    if cache:
        save_classifier(classifier, path, info, schedule=schedule)
    classifier.info = info
    classifier.schedule_record = schedule_record(schedule)
    return classifier.eval()
