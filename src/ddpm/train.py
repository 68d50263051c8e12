"""Training: the ``TrainConfig`` dataclass and a small ``Trainer`` with callbacks.

One training step (Ho et al. 2020, Algorithm 1; Nichol & Dhariwal 2021 for L_hybrid and L_vlb):

1. take the next batch ``x_0 [B, C, H, W]`` of a per-epoch shuffle (sharded across ranks under ``torchrun``),
   flip it at random for CIFAR-10, replace labels by the null label with probability ``label_dropout``
   (classifier-free guidance, Ho & Salimans 2022);
2. draw ``t`` (0-based, uniform or importance-sampled) and ``eps ~ N(0, I)``;
3. minimise ``losses.training_losses`` (``simple``, ``hybrid`` or ``vlb``) weighted by the sampler's
   importance weights, with AdamW, learning-rate warm-up and gradient clipping;
4. update the exponential moving average (EMA) of the weights.

Randomness is a function of ``(seed, rank, step)`` except the global torch generator (dropout), whose state
is saved in every checkpoint; a run stopped at step k and resumed therefore reaches step n with bitwise the
same weights as an uninterrupted run on the CPU (single process).

On CUDA the step runs under bf16 autocast with channels-last tensors and fused AdamW, optionally through
``torch.compile``. Under ``torchrun --nproc_per_node=N`` the model is wrapped in PyTorch's
``DistributedDataParallel``; ``batch_size`` is the global batch (``batch_size / N`` per rank) and only rank 0
writes checkpoints.

Progress bars follow :func:`progress_enabled`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint
from .data import augment, dataset_info, load_dataset
from .losses import LOSS_TYPES, VAR_TYPES, ImportanceSampler, UniformSampler, training_losses
from .schedule import SCHEDULES, NoiseSchedule, randn_like

__all__ = [
    "Callback",
    "LOSS_TYPES",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "build_model",
    "ema_decay_at",
    "progress_enabled",
    "resume_free_keys",
    "train",
    "update_ema",
]

MODEL_TYPES = ("unet", "mlp")
TIMESTEP_SAMPLERS = ("uniform", "importance")
LR_DECAYS = ("constant", "cosine")
#: With ``lr_decay="cosine"`` the learning rate ends at this fraction of ``lr``.
FINAL_LR_FRACTION = 0.1
#: Keys that may change when a run is resumed: they do not alter the trajectory of the weights.
RESUME_FREE_KEYS = ("steps", "checkpoint_every", "preview_every", "log_every")


def resume_free_keys(config: "TrainConfig") -> tuple[str, ...]:
    """The keys of ``config`` that a resumed run may change: ``RESUME_FREE_KEYS``, less ``steps`` when the
    learning rate decays towards the last step (then the number of steps shapes the whole trajectory)."""
    return tuple(k for k in RESUME_FREE_KEYS if not (k == "steps" and config.lr_decay != "constant"))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    """Everything needed to rebuild a model and its training data, saved as ``config.json`` beside the weights.

    Attributes:
        name: a label (the preset name); part of the cache folder's name.
        model_type: ``"unet"`` (``UNetConfig``) or ``"mlp"`` (``MLPConfig``, 2-D toy data).
        model: the network's config as a dict of ``UNetConfig`` / ``MLPConfig`` fields.
        dataset: a name from ``ddpm.data.DATASETS``.
        schedule, T: beta schedule (``"linear"`` or ``"cosine"``) and number of diffusion steps.
        loss_type: ``"simple"`` (L_simple), ``"hybrid"`` (L_simple + 0.001 L_vlb, learned variance) or ``"vlb"``.
        var_type: reverse-process variance: ``"fixed_small"`` (posterior variance), ``"fixed_large"`` (beta_t)
            or ``"learned_range"``; None picks ``"learned_range"`` when the model has ``learn_sigma``, else
            ``"fixed_small"``.
        timestep_sampler: ``"uniform"`` or ``"importance"`` (Nichol & Dhariwal Sec. 3.3, meant for ``vlb``).
        batch_size: global batch (split evenly across ranks).
        lr, weight_decay, warmup_steps: AdamW learning rate, decoupled weight decay, linear warm-up length.
        lr_decay: ``"constant"`` after the warm-up, or ``"cosine"``: half a cosine from ``lr`` down to
            ``0.1 * lr`` at ``steps`` (then ``steps`` is part of the trajectory and cannot change on resume).
        snr_gamma: Min-SNR-gamma weighting of the eps MSE (Hang et al. 2023; ``ddpm.losses.min_snr_weight``),
            or None for the unweighted L_simple; the bound term of L_hybrid is not weighted.
        steps: optimiser steps in total.
        grad_clip: maximal global gradient norm, or None for no clipping.
        ema_decay: EMA decay; with ``ema_warmup`` the decay at update n is min(ema_decay, (1 + n) / (10 + n)).
        label_dropout: probability of replacing a label by the null label (classifier-free guidance).
        seed: seeds the initial weights, the data order and every random draw of training.
        bf16, channels_last, compile: speed-ups: bf16 autocast (CUDA only), channels-last memory for the
            U-Net (CUDA and CPU), ``torch.compile``.
        preview_every: draw preview samples from the EMA model every N steps (0: never).
        checkpoint_every: write a checkpoint every N steps (0: only at the end and on Ctrl-C).
        log_every: steps per entry of the loss-by-quartile history.
    """

    name: str = "custom"
    model_type: str = "unet"
    model: dict = dataclasses.field(default_factory=dict)
    dataset: str = "mnist5k"
    schedule: str = "linear"
    T: int = 1000
    loss_type: str = "simple"
    var_type: str | None = None
    timestep_sampler: str = "uniform"
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "constant"
    snr_gamma: float | None = None
    steps: int = 1000
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    label_dropout: float = 0.0
    seed: int = 0
    bf16: bool = True
    channels_last: bool = True
    compile: bool = False
    preview_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 50

    # -- conversions ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the model config normalised: tuples become lists, defaults filled in)."""
        out = dataclasses.asdict(self)
        out["model"] = self.model_config().to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys or bad values raise ValueError naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a TrainConfig must be built from a dict, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; allowed keys are {names}")
        config = cls(**dict(data))
        config.validate()
        return config

    def model_config(self):
        """The network's config object (``UNetConfig`` or ``MLPConfig``), validated."""
        from .unet import MLPConfig, UNetConfig

        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}; got {self.model_type!r}")
        if not isinstance(self.model, Mapping):
            raise ValueError(f"model must be a dict of {self.model_type} config fields; got {type(self.model).__name__}")
        cls = UNetConfig if self.model_type == "unet" else MLPConfig
        return cls.from_dict(dict(self.model))

    @property
    def num_classes(self) -> int | None:
        return self.model_config().num_classes

    @property
    def resolved_var_type(self) -> str:
        """``var_type``, or the default implied by the model (learned_range with learn_sigma, else fixed_small)."""
        if self.var_type is not None:
            return self.var_type
        return "learned_range" if self.model_config().learn_sigma else "fixed_small"

    # -- validation ----------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its allowed values."""

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def need(ok: bool, field: str, allowed: str):
            if not ok:
                raise ValueError(f"TrainConfig.{field} must be {allowed}; got {getattr(self, field)!r}")

        need(isinstance(self.name, str) and self.name != "" and "/" not in self.name, "name",
             "a non-empty string without '/'")
        mc = self.model_config()
        info = dataset_info(self.dataset)
        need(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}")
        need(is_int(self.T) and self.T >= 2, "T", "an integer >= 2")
        try:
            NoiseSchedule.from_name(self.schedule, self.T)
        except ValueError as exc:
            raise ValueError(f"TrainConfig schedule {self.schedule!r} with T={self.T} is unusable: {exc}") from None
        need(self.loss_type in LOSS_TYPES, "loss_type", f"one of {', '.join(LOSS_TYPES)}")
        need(self.var_type is None or self.var_type in VAR_TYPES, "var_type", f"None or one of {', '.join(VAR_TYPES)}")
        need(self.timestep_sampler in TIMESTEP_SAMPLERS, "timestep_sampler", f"one of {', '.join(TIMESTEP_SAMPLERS)}")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(is_num(self.lr) and self.lr > 0, "lr", "a positive number")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(self.lr_decay in LR_DECAYS, "lr_decay", f"one of {', '.join(LR_DECAYS)}")
        need(self.snr_gamma is None or (is_num(self.snr_gamma) and self.snr_gamma > 0), "snr_gamma",
             "None or a positive number")
        if self.snr_gamma is not None and self.loss_type == "vlb":
            raise ValueError("TrainConfig.snr_gamma weights the eps MSE, which loss_type 'vlb' does not have; "
                             "set snr_gamma=None or use loss_type 'simple' or 'hybrid'")
        need(is_int(self.steps) and self.steps >= 1, "steps", "an integer >= 1")
        need(self.grad_clip is None or (is_num(self.grad_clip) and self.grad_clip > 0), "grad_clip",
             "None or a positive number")
        need(is_num(self.ema_decay) and 0 <= self.ema_decay < 1, "ema_decay", "a number in [0, 1)")
        need(is_num(self.label_dropout) and 0 <= self.label_dropout < 1, "label_dropout", "a probability in [0, 1)")
        need(is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0")
        for flag in ("ema_warmup", "bf16", "channels_last", "compile"):
            need(isinstance(getattr(self, flag), bool), flag, "True or False")
        for every in ("preview_every", "checkpoint_every"):
            need(is_int(getattr(self, every)) and getattr(self, every) >= 0, every, "an integer >= 0 (0 means never)")
        need(is_int(self.log_every) and self.log_every >= 1, "log_every", "an integer >= 1")
        # consistency between model, data and objective
        learned = self.resolved_var_type == "learned_range"
        if learned != mc.learn_sigma:
            raise ValueError(
                f"TrainConfig.var_type {self.resolved_var_type!r} does not fit model learn_sigma={mc.learn_sigma}; "
                "use var_type 'learned_range' exactly when the model learns its variance"
            )
        if self.loss_type == "hybrid" and not learned:
            raise ValueError("TrainConfig.loss_type 'hybrid' needs a learned variance: set model learn_sigma=True")
        if self.label_dropout > 0 and mc.num_classes is None:
            raise ValueError("TrainConfig.label_dropout > 0 needs a class-conditional model (model num_classes)")
        if mc.num_classes is not None:
            if info.num_classes is None:
                raise ValueError(f"dataset {self.dataset!r} has no labels; set model num_classes=None")
            if mc.num_classes != info.num_classes:
                raise ValueError(
                    f"model num_classes={mc.num_classes} does not match the {info.num_classes} classes of "
                    f"dataset {self.dataset!r}"
                )
        if info.kind == "points":
            if self.model_type != "mlp" or mc.dim != info.shape[0]:
                raise ValueError(f"dataset {self.dataset!r} holds 2-D points: use model_type 'mlp' with dim=2")
        else:
            c, h, _ = info.shape
            if self.model_type != "unet" or mc.in_channels != c or mc.image_size != h:
                raise ValueError(
                    f"dataset {self.dataset!r} holds {c}x{h}x{h} images: use model_type 'unet' with "
                    f"in_channels={c} and image_size={h}"
                )


def build_model(config: TrainConfig) -> torch.nn.Module:
    """A freshly initialised network for ``config`` (``UNet`` or ``MLP``), on the CPU."""
    from .unet import MLP, UNet

    mc = config.model_config()
    return UNet(mc) if config.model_type == "unet" else MLP(mc)


# ---------------------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (NumPy's SeedSequence hashing), e.g. ``(seed, rank, step)``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]) >> 1


def ema_decay_at(update: int, decay: float, warmup: bool = True) -> float:
    """EMA decay used at 0-based update ``update``: ``min(decay, (1 + n) / (10 + n))`` with warm-up.

    The warm-up (as in TensorFlow's ``ExponentialMovingAverage(num_updates=...)``) lets the average follow
    the fast early changes of the weights instead of remembering the random initialisation.
    """
    return min(decay, (1.0 + update) / (10.0 + update)) if warmup else decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for parameters; buffers are copied, never averaged."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def _batch_ancestor() -> str | None:
    """The command line of the nearest ancestor process that runs notebooks in batch (Jupyter Book, Sphinx,
    jupyter-cache, nbclient, nbconvert, papermill, pytest), or None. Reads ``/proc``, so Linux only."""
    markers = ("jupyter-book", "jupyter_book", "jb build", "sphinx-build", "sphinx.cmd", "jcache", "nbconvert",
               "nbclient", "papermill", "pytest", "py.test")
    pid = os.getppid()
    for _ in range(12):
        if pid <= 1:
            break
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if any(m in cmd for m in markers):
            return cmd
    return None


def _in_book_build() -> bool:
    """True inside a batch notebook run (see :func:`_batch_ancestor`)."""
    return _batch_ancestor() is not None


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None
    except Exception:
        ip = None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to show a progress bar. The rule, in order:

    1. an explicit ``progress=True/False`` wins;
    2. ``DDPM_PROGRESS=0`` (or ``1``) in the environment;
    3. never inside a batch notebook run: a Jupyter Book / Sphinx / nbclient / nbconvert / papermill / pytest
       process among the ancestors (found through ``/proc`` on Linux), so the book's pages carry no progress noise;
    4. in a live Jupyter kernel, or when stderr is a terminal: shown; otherwise (logs, pipes, CI): hidden.
    """
    if progress is not None:
        return bool(progress)
    env = os.environ.get("DDPM_PROGRESS")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    if _in_book_build():
        return False
    if _in_notebook():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    if _in_notebook():
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


class Callback:
    """Hooks called by :class:`Trainer`. Override any of them. Any object with some of these methods works too,
    and a plain callable ``fn(trainer, metrics)`` is treated as ``on_step_end``.

    ``on_step_end`` runs on every rank after each step with ``metrics`` = dict(step, loss, mse, vb, lr,
    grad_norm, ema_decay); ``on_preview`` and ``on_checkpoint`` run only on rank 0.
    """

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", metrics: dict) -> None: ...

    def on_preview(self, trainer: "Trainer", samples: torch.Tensor) -> None: ...

    def on_checkpoint(self, trainer: "Trainer", path: Path) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


class _FunctionCallback(Callback):
    def __init__(self, fn):
        self.fn = fn

    def on_step_end(self, trainer, metrics):
        self.fn(trainer, metrics)


_HOOKS = ("on_train_start", "on_step_end", "on_preview", "on_checkpoint", "on_train_end")


def _as_callback(obj) -> Callback:
    """A :class:`Callback` for ``obj``: a Callback, any object with some of the ``on_*`` hooks, or a callable."""
    if isinstance(obj, Callback):
        return obj
    if any(hasattr(obj, hook) for hook in _HOOKS):
        adapted = Callback()
        for hook in _HOOKS:
            if hasattr(obj, hook):
                setattr(adapted, hook, getattr(obj, hook))
        return adapted
    if callable(obj):
        return _FunctionCallback(obj)
    raise ValueError(f"callbacks must be Callback objects or callables fn(trainer, metrics); got {obj!r}")


# ---------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------


class Trainer:
    """Trains one model for a :class:`TrainConfig`.

    Args:
        config: the configuration.
        out_dir: checkpoint directory (None: nothing is written).
        device: torch device; default ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
        callbacks: :class:`Callback` objects or callables ``fn(trainer, metrics)``.
        progress: progress bar (None: :func:`progress_enabled`).
        preset: preset name recorded in the checkpoint.
        data: ``(x, y)`` tensors to train on instead of ``load_dataset(config.dataset)``.
        data_root: torchvision folder for ``load_dataset``.

    After :meth:`fit`, ``model`` holds the raw weights, ``ema`` the averaged ones, ``history`` the losses:
    ``step``, ``loss``, ``mse``, ``vb`` (one value per step, mean over the global batch), ``lr``,
    ``grad_norm``, and ``quartile_step`` / ``loss_q`` (mean loss for t in each quarter [0, T/4), ...,
    [3T/4, T) over the last ``log_every`` steps, None for an empty quarter, as the OpenAI code logs
    ``loss_q0`` ... ``loss_q3``).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        out_dir: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        callbacks: Iterable[Any] = (),
        progress: bool | None = None,
        preset: str | None = None,
        data: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        data_root: str | os.PathLike | None = None,
    ):
        config.validate()
        self.config = config
        self.preset = preset if preset is not None else config.name
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = [_as_callback(c) for c in callbacks]
        self.progress = progress

        # distributed set-up (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if config.batch_size % self.world_size:
            raise ValueError(
                f"batch_size={config.batch_size} must be divisible by the {self.world_size} processes"
            )
        self.local_batch = config.batch_size // self.world_size
        if device is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        cuda = self.device.type == "cuda"
        self.use_bf16 = cuda and config.bf16
        # channels-last helps oneDNN's CPU convolutions too (about 4% per mnist-cpu step on two cores)
        self.channels_last = config.channels_last and config.model_type == "unet"

        if data is None:  # first, so that a missing dataset fails before anything is built
            data = load_dataset(config.dataset, split="train", root=data_root, seed=config.seed)

        # the same initial weights everywhere; then per-rank dropout randomness
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        self.model = build_model(config).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        torch.manual_seed(_seed(config.seed, self.rank, 7))
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **({"fused": True} if cuda else {})
        )
        self.schedule = NoiseSchedule.from_name(config.schedule, config.T)
        self.t_sampler = (ImportanceSampler if config.timestep_sampler == "importance" else UniformSampler)(config.T)
        self.num_classes = config.num_classes
        self.var_type = config.resolved_var_type

        x, y = data
        self.x = x.to(self.device)
        self.y = y.to(self.device) if y is not None else None
        if self.num_classes is not None and self.y is None:
            raise ValueError("a class-conditional model needs labels: data must be (x, y) with y not None")
        self.shard_size = len(self.x) // self.world_size
        self.steps_per_epoch = self.shard_size // self.local_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size={config.batch_size} is larger than the {len(self.x)} training examples; lower it"
            )
        self._perm_epoch = -1
        self._perm = None

        train_model: torch.nn.Module = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(self.model, device_ids=[self.device.index] if cuda else None)
        if config.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model

        self.step = 0
        self.wall_time = 0.0
        self.history: dict[str, list] = {
            k: [] for k in ("step", "loss", "mse", "vb", "lr", "grad_norm", "quartile_step", "loss_q")
        }
        self._q_sum = [0.0] * 4
        self._q_count = [0] * 4
        self.last_batch_indices: torch.Tensor | None = None
        self.last_checkpoint_step: int | None = None
        self.previews: list[tuple[int, torch.Tensor]] = []
        self._stop_requested = False

    # -- properties ----------------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_name(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            return f"{self.world_size}x {name}" if self.world_size > 1 else name
        return f"cpu ({torch.get_num_threads()} threads)" + (f" x{self.world_size}" if self.world_size > 1 else "")

    # -- data ----------------------------------------------------------------------------------------------

    def batch_indices(self, step: int) -> torch.Tensor:
        """Indices of this rank's examples at 0-based ``step``: a fresh shuffle each epoch (from ``seed`` and the
        epoch), cut to a multiple of the world size and dealt out ``rank::world_size`` like ``DistributedSampler``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_seed(self.config.seed, epoch, 1))
            perm = torch.randperm(len(self.x), generator=g)[: self.shard_size * self.world_size]
            self._perm = perm[self.rank :: self.world_size]
            self._perm_epoch = epoch
        return self._perm[pos * self.local_batch : (pos + 1) * self.local_batch]

    def lr_at(self, step: int) -> float:
        """Learning rate at 0-based ``step``: linear warm-up over ``warmup_steps``, then constant, or with
        ``lr_decay="cosine"`` half a cosine from ``lr`` to ``FINAL_LR_FRACTION * lr`` at the last step."""
        c = self.config
        if c.warmup_steps > 0 and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.lr_decay == "cosine":
            progress = min(1.0, (step - c.warmup_steps) / max(1, c.steps - 1 - c.warmup_steps))
            return c.lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))
        return c.lr

    # -- one step ------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimiser step (see the module docstring); returns the metrics of the step."""
        c = self.config
        step = self.step
        g_cpu = torch.Generator().manual_seed(_seed(c.seed, self.rank, step, 2))
        if self.device.type == "cpu":
            g_dev = g_cpu
        else:
            g_dev = torch.Generator(self.device).manual_seed(_seed(c.seed, self.rank, step, 3))

        idx = self.batch_indices(step)
        self.last_batch_indices = idx
        x0 = augment(c.dataset, self.x[idx.to(self.device)], g_dev)
        y = None
        if self.num_classes is not None:
            y = self.y[idx.to(self.device)]
            if c.label_dropout > 0:
                drop = torch.rand(y.shape, device=self.device, generator=g_dev) < c.label_dropout
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        t, weights = self.t_sampler.sample(self.local_batch, device=self.device, generator=g_cpu)
        noise = randn_like(x0, g_dev)

        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            terms = training_losses(
                self.train_model, self.schedule, x0, t, y=y, noise=noise, loss_type=c.loss_type, var_type=self.var_type,
                snr_gamma=c.snr_gamma,
            )
        loss = (terms["loss"] * weights).mean()

        # global means (and the stop flag) in one all-reduce, so every rank takes the same decisions
        stats = torch.stack([
            loss.detach().float(),
            terms["mse"].detach().float().mean(),
            terms["vb"].detach().float().mean() if "vb" in terms else torch.zeros((), device=self.device),
            torch.tensor(float(self._stop_requested), device=self.device),
        ])
        if self.distributed:
            dist.all_reduce(stats)
            stats[:3] /= self.world_size
        loss_v, mse_v, vb_v, stop = stats.tolist()
        self._stop_requested = stop > 0
        if not math.isfinite(loss_v):
            where = (
                f"the last good checkpoint (step {self.last_checkpoint_step}) is kept in {self.out_dir}"
                if self.last_checkpoint_step is not None
                else "no checkpoint was written"
            )
            raise TrainingDiverged(
                f"training stopped: the loss is {loss_v} at step {step}; {where}; "
                f"lower lr (now {c.lr:g}) or set grad_clip"
            )

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None]))
        self.optimizer.step()
        decay = ema_decay_at(step, c.ema_decay, c.ema_warmup)
        update_ema(self.ema, self.model, decay)
        grad_norm = float(grad_norm)  # read back only after the step and the EMA are queued (no mid-step sync)

        per_example = terms["loss"].detach()
        if isinstance(self.t_sampler, ImportanceSampler):
            all_t, all_l = t, per_example
            if self.distributed:
                ts = [torch.empty_like(t) for _ in range(self.world_size)]
                ls = [torch.empty_like(per_example) for _ in range(self.world_size)]
                dist.all_gather(ts, t)
                dist.all_gather(ls, per_example.contiguous())
                all_t, all_l = torch.cat(ts), torch.cat(ls)
            self.t_sampler.update(all_t.cpu(), all_l.float().cpu())
        quartile = (t * 4 // c.T).cpu()
        for q, value in zip(quartile.tolist(), per_example.float().tolist()):
            self._q_sum[q] += value
            self._q_count[q] += 1

        self.step = step + 1
        h = self.history
        for key, value in (("step", self.step), ("loss", loss_v), ("mse", mse_v), ("vb", vb_v), ("lr", lr),
                           ("grad_norm", grad_norm)):
            h[key].append(value)
        if self.step % c.log_every == 0:
            h["quartile_step"].append(self.step)
            h["loss_q"].append([s / n if n else None for s, n in zip(self._q_sum, self._q_count)])
            self._q_sum, self._q_count = [0.0] * 4, [0] * 4
        return {"step": self.step, "loss": loss_v, "mse": mse_v, "vb": vb_v, "lr": lr, "grad_norm": grad_norm,
                "ema_decay": decay}

    # -- previews ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def preview(self, n: int = 16, steps: int = 25) -> torch.Tensor:
        """``n`` samples from the EMA model with DDIM in ``steps`` steps, from a fixed seed (labels cycle through
        the classes for a conditional model). Uses its own generator: training randomness is untouched."""
        from .samplers import ddim_sample

        info = dataset_info(self.config.dataset)
        g = torch.Generator(self.device).manual_seed(_seed(self.config.seed, 11))
        y = None
        if self.num_classes is not None:
            y = torch.arange(n, device=self.device) % self.num_classes
        return ddim_sample(self.ema, self.schedule, (n, *info.shape), steps=min(steps, self.config.T), y=y,
                           generator=g, device=self.device).cpu()

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike | None = None) -> Path | None:
        """Write a resumable checkpoint (rank 0 only; other ranks return None)."""
        directory = Path(directory) if directory is not None else self.out_dir
        if directory is None or not self.is_main:
            return None
        extra = self.t_sampler.state_dict() if isinstance(self.t_sampler, ImportanceSampler) else {}
        extra.update({f"preview/{step}": images for step, images in self.previews})
        state = {
            "step": self.step,
            "wall_time_s": self.wall_time,
            "history": self.history,
            "quartile_accumulator": [self._q_sum, self._q_count],
            "device": self.device_name(),
            "world_size": self.world_size,
            "preset": self.preset,
        }
        path = checkpoint.save_training_state(
            directory,
            config=self.config.to_dict(),
            model=self.model.state_dict(),
            ema=self.ema.state_dict(),
            optimizer=self.optimizer.state_dict(),
            state=state,
            extra_tensors=extra,
            preset=self.preset,
        )
        self.last_checkpoint_step = self.step
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path

    def load(self, directory: str | os.PathLike | None = None) -> None:
        """Resume from a checkpoint written by :meth:`save` for the same configuration (``steps`` and the
        logging intervals may differ). Restores weights, EMA, optimiser, step, history and random states."""
        directory = Path(directory) if directory is not None else self.out_dir
        if directory is None:
            raise ValueError("no checkpoint directory given")
        ck = checkpoint.load_training_state(directory, self.config.to_dict(), ignore_keys=resume_free_keys(self.config))
        try:
            self.model.load_state_dict(ck["model"])
            self.ema.load_state_dict(ck["ema"])
            saved = ck["optimizer"]
            current = self.optimizer.state_dict()["param_groups"]
            for g_saved, g_now in zip(saved["param_groups"], current):
                for key in ("fused", "foreach", "capturable", "differentiable"):
                    if key in g_now:
                        g_saved[key] = g_now[key]
            self.optimizer.load_state_dict(saved)
            sampler_state = {k: v for k, v in ck["extra"].items() if not k.startswith("preview/")}
            if isinstance(self.t_sampler, ImportanceSampler) and sampler_state:
                self.t_sampler.load_state_dict(sampler_state)
            self.previews = checkpoint.previews_from_extra(ck["extra"])
            state = ck["state"]
            self.step = int(state["step"])
            self.wall_time = float(state.get("wall_time_s", 0.0))
            self.history = {k: list(v) for k, v in state["history"].items()}
            self._q_sum, self._q_count = [list(v) for v in state.get("quartile_accumulator", [[0.0] * 4, [0] * 4])]
            self.trained_on = state.get("device")
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise checkpoint.CheckpointError(
                f"checkpoint {directory} does not fit this model ({first}); train from scratch"
            ) from None
        if self.distributed and self.rank > 0:  # the saved random state is rank 0's
            torch.manual_seed(_seed(self.config.seed, self.rank, self.step, 7))
        self.last_checkpoint_step = self.step

    # -- the loop ------------------------------------------------------------------------------------------

    def _install_sigint(self):
        """First Ctrl-C: finish the current step, save, then raise KeyboardInterrupt. Second: stop at once."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        try:
            return signal.signal(signal.SIGINT, handler)
        except (ValueError, OSError):
            return None

    def fit(self, steps: int | None = None) -> "Trainer":
        """Train until ``steps`` (default ``config.steps``) total steps.

        Checkpoints every ``checkpoint_every`` steps, at the end and on Ctrl-C (then re-raises
        KeyboardInterrupt); a NaN/inf loss raises :class:`TrainingDiverged`, keeping the last checkpoint.
        """
        c = self.config
        total = c.steps if steps is None else steps
        show = self.is_main and progress_enabled(self.progress)
        bar = _progress_bar(show, total, self.step, f"train {self.preset}")
        previous_handler = self._install_sigint()
        for cb in self.callbacks:
            cb.on_train_start(self)
        try:
            while self.step < total:
                start = time.perf_counter()
                metrics = self.train_step()
                self.wall_time += time.perf_counter() - start
                if bar is not None:
                    bar.update(1)
                    if self.step % 10 == 0 or self.step == total:
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                for cb in self.callbacks:
                    cb.on_step_end(self, metrics)
                if self._stop_requested:
                    self.save()
                    raise KeyboardInterrupt(f"training interrupted at step {self.step}")
                if self.is_main and c.preview_every and self.step % c.preview_every == 0:
                    samples = self.preview()
                    self.previews = (self.previews + [(self.step, samples)])[-8:]
                    for cb in self.callbacks:
                        cb.on_preview(self, samples)
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < total:
                    self.save()
            if self.out_dir is not None and self.last_checkpoint_step != self.step:
                self.save()
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            if bar is not None:
                bar.close()
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self

    # -- results -------------------------------------------------------------------------------------------

    def trained_model(self, digest: str | None = None) -> checkpoint.TrainedModel:
        """The result as a :class:`ddpm.checkpoint.TrainedModel` (EMA model and raw model in eval mode)."""
        from .presets import profile
        from .unet import count_parameters

        self.model.eval()
        self.ema.eval()
        info = {
            "preset": self.preset,
            "profile": profile(),
            "device": getattr(self, "trained_on", None) or self.device_name(),
            "steps": self.step,
            "wall_time_s": self.wall_time,
            "checkpoint_hash": digest or checkpoint.config_hash(self.config.to_dict()),
            "parameters": count_parameters(self.model),
            "dataset": self.config.dataset,
            "batch_size": self.config.batch_size,
            "ddpm_version": checkpoint.package_version(),
            "path": str(self.out_dir) if self.out_dir is not None else None,
        }
        return checkpoint.TrainedModel(
            model=self.ema, raw_model=self.model, schedule=self.schedule, config=self.config,
            history=self.history, info=info, path=self.out_dir, previews=list(self.previews),
        )


def train(
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    callbacks: Iterable[Any] = (),
    progress: bool | None = None,
    data: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> Trainer:
    """Build a :class:`Trainer`, resume it from ``out_dir`` when ``resume``, and run it to ``config.steps``."""
    trainer = Trainer(config, out_dir=out_dir, device=device, callbacks=callbacks, progress=progress, data=data)
    if resume:
        trainer.load()
    return trainer.fit()


def setup_distributed() -> bool:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on CUDA,
    gloo on the CPU. Returns True when training is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return True
