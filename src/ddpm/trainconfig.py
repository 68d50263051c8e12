"""The training configuration: ``TrainConfig``, saved as ``config.json`` beside the weights, and the network it
builds. Every field is checked by :meth:`TrainConfig.validate`, which names the first bad field and its allowed
values, so a wrong configuration fails before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch

from .data import dataset_info
from .losses import LOSS_TYPES, VAR_TYPES
from .schedule import SCHEDULES, NoiseSchedule

__all__ = ["FINAL_LR_FRACTION", "LATER_KEYS", "LOSS_TYPES", "LR_DECAYS", "MODEL_TYPES", "OBJECTIVES", "REFLOW_KEYS",
           "RESUME_FREE_KEYS", "TIMESTEP_SAMPLERS", "TrainConfig", "TrainingDiverged", "build_model", "cpu_has_bf16",
           "resume_free_keys"]

MODEL_TYPES = ("unet", "mlp", "dit")
OBJECTIVES = ("diffusion", "flow")
#: The keys of ``TrainConfig.reflow``: the parent flow's config dict, and how its pairs are drawn.
REFLOW_KEYS = ("parent", "pairs", "steps", "method", "seed")
TIMESTEP_SAMPLERS = ("uniform", "importance")
LR_DECAYS = ("constant", "cosine")
#: With ``lr_decay="cosine"`` the learning rate ends at this fraction of ``lr``.
FINAL_LR_FRACTION = 0.1
#: Keys added after the first checkpoints, with their defaults: ``to_dict`` leaves a key out at its default, so the
#: dict (and the hash that names a cached model) of a configuration that does not use it is as it was before it.
LATER_KEYS = {"autoencoder": None, "cpu_bf16": False, "objective": "diffusion", "flow_time": "uniform", "reflow": None}
#: Keys that may change when a run is resumed: they do not alter the trajectory of the weights.
RESUME_FREE_KEYS = ("steps", "checkpoint_every", "preview_every", "log_every")


def resume_free_keys(config: "TrainConfig") -> tuple[str, ...]:
    """The keys of ``config`` that a resumed run may change: ``RESUME_FREE_KEYS``, less ``steps`` when the
    learning rate decays towards the last step (then the number of steps shapes the whole trajectory)."""
    return tuple(k for k in RESUME_FREE_KEYS if not (k == "steps" and config.lr_decay != "constant"))


def _is_int(value) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (oneDNN's check for AVX512-BF16 or AMX). Without it, bf16
    autocast on the CPU may be emulated and slow, so ``TrainConfig.cpu_bf16`` falls back to fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN, or without the private check
        return False


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
        model_type: ``"unet"`` (``UNetConfig``), ``"dit"`` (``DiTConfig``, a diffusion transformer) or ``"mlp"``
            (``MLPConfig``, 2-D toy data).
        model: the network's config as a dict of ``UNetConfig`` / ``MLPConfig`` fields.
        dataset: a name from ``ddpm.data.DATASETS``.
        autoencoder: None for a model of the data itself, or, for a *latent* diffusion model, the first stage:
            a dict of ``ddpm.autoencoder.AutoencoderConfig`` fields (``channels``, ``latent_channels``,
            ``kl_weight``) and its training settings (``steps``, ``batch_size``, ``lr``). The trainer trains the
            autoencoder on ``dataset`` (or loads it from the cache), encodes the images once, and the network of
            ``model`` learns the scaled latents (``in_channels`` and ``image_size`` are the latent's).
        objective: ``"diffusion"`` (the network predicts eps, trained with ``loss_type``) or ``"flow"`` (flow
            matching on the linear path, ``ddpm.flow``: the network predicts the velocity; ``schedule``, ``T``,
            ``loss_type`` and ``timestep_sampler`` are then unused and must stay at their defaults).
        flow_time: the distribution of training times of a flow: ``"uniform"`` or ``"logit-normal"``.
        reflow: None, or for a rectified flow trained on the coupling of another flow (Liu et al. 2023) a dict
            ``{"parent": parent TrainConfig dict, "pairs": n, "steps": K, "method": "euler"|"midpoint"|"heun",
            "seed": s}``: ``load_or_train`` trains (or loads) the parent, draws n pairs of noise and the sample its
            ODE maps them to (``ddpm.flow.reflow_pairs``; labels from the class frequencies for a conditional
            parent), and trains this flow, from fresh weights, on those pairs instead of ``dataset``.
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
        bf16, channels_last, compile: speed-ups: bf16 autocast on CUDA, channels-last memory for the U-Net
            (CUDA and CPU), ``torch.compile``.
        cpu_bf16: bf16 autocast on a CPU too, where it has native bf16 arithmetic (AVX512-BF16 or AMX, see
            :func:`cpu_has_bf16`); elsewhere the step stays in fp32. The weights, the optimiser and the
            EMA stay in fp32 either way.
        preview_every: draw preview samples from the EMA model every N steps (0: never).
        checkpoint_every: write a checkpoint every N steps (0: only at the end and on Ctrl-C).
        log_every: steps per entry of the loss-by-quartile history.
    """

    name: str = "custom"
    model_type: str = "unet"
    model: dict = dataclasses.field(default_factory=dict)
    dataset: str = "mnist5k"
    autoencoder: dict | None = None
    objective: str = "diffusion"
    flow_time: str = "uniform"
    reflow: dict | None = None
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
    cpu_bf16: bool = False
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
        for key, default in LATER_KEYS.items():
            if out[key] == default:
                del out[key]
        if self.reflow is not None:  # the parent normalised too, so that equal configs hash alike
            out["reflow"] = {**self.reflow, "parent": TrainConfig.from_dict(self.reflow["parent"]).to_dict()}
        if self.autoencoder is not None:
            ae, training = self.autoencoder_config()
            out["autoencoder"] = {k: v for k, v in ae.to_dict().items() if k not in ("image_size", "in_channels")}
            out["autoencoder"].update(training)
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
        """The network's config object (``UNetConfig``, ``MLPConfig`` or ``DiTConfig``), validated."""
        from .dit import DiTConfig
        from .mlp import MLPConfig
        from .unet import UNetConfig

        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}; got {self.model_type!r}")
        if not isinstance(self.model, Mapping):
            raise ValueError(f"model must be a dict of {self.model_type} config fields; got {type(self.model).__name__}")
        cls = {"unet": UNetConfig, "mlp": MLPConfig, "dit": DiTConfig}[self.model_type]
        return cls.from_dict(dict(self.model))

    def autoencoder_config(self):
        """``(AutoencoderConfig, training settings)`` of a latent model (see ``autoencoder``); ValueError otherwise."""
        from .autoencoder import autoencoder_from_settings

        if self.autoencoder is None:
            raise ValueError(f"TrainConfig {self.name!r} is not a latent model (autoencoder is None)")
        info = dataset_info(self.dataset)
        if info.kind != "image":
            raise ValueError(f"TrainConfig.autoencoder needs an image dataset; {self.dataset!r} holds {info.kind}")
        try:
            return autoencoder_from_settings(self.autoencoder, info.shape)
        except ValueError as exc:
            raise ValueError(f"TrainConfig.autoencoder: {exc}") from None

    @property
    def is_latent(self) -> bool:
        """True for a latent diffusion model (``autoencoder`` is set)."""
        return self.autoencoder is not None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample the network denoises: the latent's for a latent model, else the data's."""
        if self.is_latent:
            return tuple(self.autoencoder_config()[0].latent_shape)
        return tuple(dataset_info(self.dataset).shape)

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
        is_int = _is_int

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
        for flag in ("ema_warmup", "bf16", "cpu_bf16", "channels_last", "compile"):
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
        self._validate_objective(mc)
        if self.is_latent:
            self.autoencoder_config()  # names a bad key or value, or a dataset without images
        if info.kind == "points":
            if self.model_type != "mlp" or mc.dim != info.shape[0]:
                raise ValueError(f"dataset {self.dataset!r} holds 2-D points: use model_type 'mlp' with dim=2")
        elif self.is_latent:
            c, h, _ = self.sample_shape
            if self.model_type == "mlp" or mc.in_channels != c or mc.image_size != h:
                raise ValueError(
                    f"the autoencoder's latents are {c}x{h}x{h}: use model_type 'unet' or 'dit' with "
                    f"in_channels={c} and image_size={h}"
                )
        else:
            c, h, _ = info.shape
            if self.model_type == "mlp" or mc.in_channels != c or mc.image_size != h:
                raise ValueError(
                    f"dataset {self.dataset!r} holds {c}x{h}x{h} images: use model_type 'unet' or 'dit' with "
                    f"in_channels={c} and image_size={h}"
                )

    def _validate_objective(self, mc) -> None:
        """The flow fields: a known objective and time distribution, the diffusion-only fields at their defaults
        for a flow, and a well-formed ``reflow``."""
        from .flow import FLOW_METHODS, TIME_DISTRIBUTIONS

        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if self.flow_time not in TIME_DISTRIBUTIONS:
            raise ValueError(f"TrainConfig.flow_time must be one of {', '.join(TIME_DISTRIBUTIONS)}; "
                             f"got {self.flow_time!r}")
        if self.objective == "diffusion":
            if self.flow_time != "uniform" or self.reflow is not None:
                raise ValueError("TrainConfig.flow_time and reflow belong to objective 'flow'; set objective='flow' "
                                 "or leave them at their defaults")
            return
        if self.loss_type != "simple" or self.timestep_sampler != "uniform" or self.snr_gamma is not None \
                or mc.learn_sigma:
            raise ValueError("TrainConfig.objective 'flow' regresses the velocity: use loss_type 'simple', "
                             "timestep_sampler 'uniform', snr_gamma None and a model without learn_sigma")
        if self.is_latent:
            raise ValueError("TrainConfig.objective 'flow' is for models of the data; set autoencoder=None")
        if self.reflow is None:
            return
        if not isinstance(self.reflow, Mapping) or set(self.reflow) != set(REFLOW_KEYS):
            raise ValueError(f"TrainConfig.reflow must be None or a dict with the keys {list(REFLOW_KEYS)}; "
                             f"got {self.reflow!r:.200}")
        r = self.reflow
        for key in ("pairs", "steps"):
            if not _is_int(r[key]) or r[key] < 1:
                raise ValueError(f"TrainConfig.reflow[{key!r}] must be a positive integer; got {r[key]!r}")
        if not _is_int(r["seed"]) or r["seed"] < 0:
            raise ValueError(f"TrainConfig.reflow['seed'] must be an integer >= 0; got {r['seed']!r}")
        if r["method"] not in FLOW_METHODS:
            raise ValueError(f"TrainConfig.reflow['method'] must be one of {', '.join(FLOW_METHODS)}; "
                             f"got {r['method']!r}")
        try:
            parent = TrainConfig.from_dict(r["parent"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"TrainConfig.reflow['parent'] is not a usable TrainConfig: {exc}") from None
        if parent.objective != "flow" or parent.dataset != self.dataset or parent.num_classes != mc.num_classes:
            raise ValueError("TrainConfig.reflow['parent'] must be a flow of the same dataset and classes "
                             f"(objective 'flow', dataset {self.dataset!r}, num_classes {mc.num_classes})")


def build_model(config: TrainConfig) -> torch.nn.Module:
    """A freshly initialised network for ``config`` (``UNet``, ``MLP`` or ``DiT``), on the CPU."""
    from .dit import DiT
    from .mlp import MLP
    from .unet import UNet

    mc = config.model_config()
    return {"unet": UNet, "mlp": MLP, "dit": DiT}[config.model_type](mc)
