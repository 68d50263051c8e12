"""Named training configurations and the choice of profile.

=================  =========================================================================================
``toy2d``          an MLP with Fourier input features on the 2-D swiss roll, L_simple, linear schedule; 6,000 small
                   steps, about a minute on a CPU
``mnist-cpu``      the ``cpu`` profile's digit model: a small class-conditional U-Net (~1.0M parameters) on
                   ``mnist5k`` with label dropout 0.3 (classifier-free guidance), linear schedule and learned
                   variances trained with L_hybrid, Min-SNR-5 weighting and a decaying learning rate; six to
                   ten minutes on two CPU cores (its steps in bf16 where the CPU has native bf16)
``mnist-gpu``      the ``gpu`` profile's digit model: the same recipe, wider, on full MNIST, bf16, with the cosine
                   schedule of Improved DDPM (it trains twenty times longer)
``cifar10-gpu``    a class-conditional U-Net for CIFAR-10 in the spirit of Improved DDPM's CIFAR-10 model
                   (smaller), random flips, L_hybrid, cosine schedule
``mnist-latent``   the book's small latent diffusion model: a KL-regularised autoencoder (28x28 digits to 4x7x7
                   latents, about a minute) and a class-conditional U-Net on its latents with label dropout 0.5 and
                   the cosine schedule, as in Rombach et al.; together about as long as ``mnist-cpu``, six to ten
                   minutes on two CPU cores (a diffusion transformer on the same latents is the measured
                   alternative, ``ALTERNATIVE_NETWORKS``)
``mnist-flow``     ``mnist-cpu``'s U-Net (without the variance channels), data, batch, optimiser, EMA and number of
                   steps, trained by flow matching on the linear path (rectified flow, ``ddpm.flow``) with uniform
                   training times: the same wall-clock time as ``mnist-cpu``, sampled with Euler, midpoint or Heun
``mnist14``        a small unconditional U-Net on the digits pooled to 14x14 (``mnist5k-14``), cosine schedule,
                   L_hybrid: the base recipe that the Improved DDPM notebook varies (schedule, objective,
                   :func:`improved_variants`) at a scale where each variant learns to draw digits in about a
                   minute on a CPU (about 180k parameters)
=================  =========================================================================================

The profile is ``"gpu"`` when CUDA is available and ``"cpu"`` otherwise; ``DDPM_PROFILE=cpu`` or ``gpu``
overrides it. :func:`mnist_preset` gives the profile's MNIST preset, so the same notebook trains the small
model on a laptop and the larger one on a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from .optim import ema_decay_at
from .trainconfig import TrainConfig

__all__ = ["ALTERNATIVE_NETWORKS", "PRESETS", "PROFILES", "flow_variant", "get_preset", "improved_variants",
           "mnist_preset", "preset_names", "profile", "recipe_summary"]

PROFILES = ("cpu", "gpu")


def profile() -> str:
    """``"gpu"`` when CUDA is available, else ``"cpu"``; ``DDPM_PROFILE`` (``cpu`` or ``gpu``) overrides it."""
    env = os.environ.get("DDPM_PROFILE", "").strip().lower()
    if env:
        if env not in PROFILES:
            raise ValueError(f"DDPM_PROFILE must be one of {', '.join(PROFILES)}; got {env!r}")
        return env
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _toy2d() -> TrainConfig:
    return TrainConfig(
        name="toy2d",
        model_type="mlp",
        model={"dim": 2, "hidden": 128, "num_layers": 3, "num_classes": None, "learn_sigma": False,
               "fourier_levels": 6},
        dataset="swiss_roll",
        schedule="linear",
        T=1000,
        loss_type="simple",
        batch_size=256,
        lr=1e-3,
        warmup_steps=100,
        steps=6000,
        grad_clip=1.0,
        ema_decay=0.999,
        log_every=100,
    )


def _mnist_cpu() -> TrainConfig:
    # Sized for two CPU cores: 2,400 steps of 64 digits (about 38 passes over the 4,000 training digits) in six to ten
    # minutes, depending on the CPU, the step under bf16 autocast where the CPU has native bf16 (cpu_bf16: about 1.25
    # times the images per second of fp32 on two AVX512-BF16 cores; on other CPUs it runs in fp32, about 13 minutes).
    # Channels 16/32/80 at 28/14/7: most weights sit at 7x7, where a convolution costs 16 times less than at 28x28. The
    # recipe is the best of a search at equal wall-clock time (benchmarks/recipe_search.py, shown on the book's
    # benchmark page), scored by the FID of unconditional samples and the accuracy of conditional ones:
    # * Min-SNR-5 weighting of the noise term (Hang et al. 2023): the nearly clean steps, easy and of little use to
    #   a sampler, stop dominating the gradient; it was the largest single gain;
    # * AdamW at 2e-3 with a cosine decay to a tenth: better than 1e-3 constant and than 4e-3;
    # * label dropout 0.3 instead of the 0.1 of Ho & Salimans: the unconditional branch is used on its own (the
    #   book's unconditional samples, classifier guidance) and at 0.1 it sees too few batches in a short run; 0.5
    #   gave no significantly better unconditional FID and a lower conditional accuracy (at full length, seed 0,
    #   n = 1,000: 27.1 +- 2.6 against 31.1 +- 2.8, and 88.2% against 92.7%);
    # * the linear schedule, not the cosine one: coarse shape and brightness are decided near pure noise, and the
    #   linear schedule trains there about five times as often. At full length the cosine schedule's null-label
    #   samples scored about 4 lower in FID (two seeds each: 27.0 and 42.4 against 31.3 and 46.9) but its
    #   conditional ones were the requested digit less often (91.0% and 90.5% against 91.3% and 93.1%).
    # One training run differs from the next by more than these gains: seeds 0, 1 and 2 of this recipe score 31.1,
    # 47.0 and 37.5 (benchmarks/train_mnist_cpu.py --train-seed), while their conditional samples all sit at the floor.
    # At full length, one change at a time (seed 0; train_mnist_cpu.py --set), no other choice did better on both
    # measures: without Min-SNR 34.9 and 90.2%, lr 1e-3 32.6 and 89.3%, label dropout 0.2 40.1 and 92.8%, attention at
    # 14x14 too 32.1 and 91.0% in 2.7 times the time. The EMA's warm-up decides its memory here: it never reaches the
    # cap of 0.999 in 2,400 steps and averages about the last ninth of them; a true 0.999 (ema_warmup=False) averages
    # the last thousand, reaching back to weights far from converged, and scored 139.7 and 69.7%. Averages kept beside
    # the EMA in one run, with decay (1 + n) / (k + n), scored 37.6, 33.2, 31.1 and 32.9 for k = 4, 6, 20 and 40
    # (memories of about n/3 to n/39), the raw weights 33.8: the warm-up's k = 10 sits at the optimum.
    return TrainConfig(
        name="mnist-cpu",
        model_type="unet",
        model={
            "image_size": 28, "in_channels": 1, "model_channels": 16, "channel_mult": [1, 2, 5],
            "num_res_blocks": 1, "attention_resolutions": [7], "num_heads": 4, "num_head_channels": -1,
            "dropout": 0.0, "num_classes": 10, "learn_sigma": True, "use_scale_shift_norm": True,
            "resblock_updown": False,
        },
        dataset="mnist5k",
        schedule="linear",
        T=1000,
        loss_type="hybrid",
        snr_gamma=5.0,
        batch_size=64,
        lr=2e-3,
        lr_decay="cosine",
        warmup_steps=50,
        steps=2400,
        grad_clip=1.0,
        ema_decay=0.999,
        label_dropout=0.3,
        cpu_bf16=True,
        checkpoint_every=200,
        preview_every=480,
        log_every=50,
    )


def flow_variant(config: TrainConfig) -> TrainConfig:
    """``config``'s network, data, batch, optimiser, EMA and number of steps trained by flow matching instead, so that
    the two compare at equal compute: the velocity has no variance to learn (``learn_sigma=False``, one output
    channel less), L_hybrid and Min-SNR weighting are eps-objectives (the flow loss is plain velocity regression,
    Lipman et al. 2023, with uniform times, as Lipman et al. and Liu et al. train), and the path is the linear one,
    not a beta schedule. ``mnist-cpu``'s variant is the preset ``mnist-flow``; another preset's is named
    ``<name>-flow`` (``mnist-gpu-flow`` for the ``gpu`` profile's notebooks)."""
    name = "mnist-flow" if config.name == "mnist-cpu" else f"{config.name}-flow"
    return dataclasses.replace(config, name=name, model={**config.model, "learn_sigma": False}, objective="flow",
                               flow_time="uniform", loss_type="simple", snr_gamma=None, var_type=None,
                               timestep_sampler="uniform")


def _mnist_flow() -> TrainConfig:
    return flow_variant(_mnist_cpu())


def _mnist_gpu() -> TrainConfig:
    return TrainConfig(
        name="mnist-gpu",
        model_type="unet",
        model={
            "image_size": 28, "in_channels": 1, "model_channels": 64, "channel_mult": [1, 2, 2],
            "num_res_blocks": 2, "attention_resolutions": [14, 7], "num_heads": 4, "num_head_channels": -1,
            "dropout": 0.1, "num_classes": 10, "learn_sigma": True, "use_scale_shift_norm": True,
            "resblock_updown": False,
        },
        dataset="mnist",
        schedule="cosine",
        T=1000,
        loss_type="hybrid",
        batch_size=128,
        lr=2e-4,
        warmup_steps=500,
        steps=20000,
        grad_clip=1.0,
        ema_decay=0.9999,
        label_dropout=0.1,
        bf16=True,
        channels_last=True,
        checkpoint_every=2000,
        preview_every=2000,
        log_every=100,
    )


def _cifar10_gpu() -> TrainConfig:
    return TrainConfig(
        name="cifar10-gpu",
        model_type="unet",
        model={
            "image_size": 32, "in_channels": 3, "model_channels": 128, "channel_mult": [1, 2, 2, 2],
            "num_res_blocks": 2, "attention_resolutions": [16, 8], "num_heads": 4, "num_head_channels": -1,
            "dropout": 0.1, "num_classes": 10, "learn_sigma": True, "use_scale_shift_norm": True,
            "resblock_updown": False,
        },
        dataset="cifar10",
        schedule="cosine",
        T=1000,
        loss_type="hybrid",
        batch_size=128,
        lr=1e-4,
        warmup_steps=1000,
        steps=100000,
        grad_clip=1.0,
        ema_decay=0.9999,
        label_dropout=0.1,
        bf16=True,
        channels_last=True,
        checkpoint_every=5000,
        preview_every=5000,
        log_every=200,
    )


def _mnist_latent() -> TrainConfig:
    # Rombach et al.'s two stages at the size of two CPU cores. The autoencoder (ddpm.autoencoder's defaults)
    # reconstructs held-out digits at the metric's real-data floor in about a minute. The denoiser is a U-Net on the
    # 4x7x7 latent, as in Rombach et al.'s latent diffusion models: one 7x7 level of width 48 with two residual blocks
    # and attention (0.61M parameters). With the same recipe it scored a null-label FID of 36.1 at 2,000 steps, 25.5
    # at 3,500, 24.4 at 4,500 and 18.6 at 6,000 (n = 1,000, floor 11.1; 6.6 minutes for both stages), meeting the
    # preset's targets, where the diffusion transformer of ddpm.dit (width 96, depth 4, conv_mlp, 0.72M parameters;
    # ALTERNATIVE_NETWORKS) stays far from them: 47.9 at 3,500 steps (6.2 minutes), 41.3 at 4,500, and 46.3 at 3,500
    # with the initialisation of facebookresearch/DiT (Xavier-uniform linear layers, N(0, 0.02) embeddings; the
    # label embedding no longer swamps the time embedding), 4.2 times the floor, while its samples with labels from
    # the class frequencies scored 20.5. A transformer must learn locality from data, and 4,000 digits and a few
    # minutes are too little: the plain DiT scored 80.6 at 2,000 steps, 61.7 with the depthwise convolution of PVT v2
    # in its MLPs (conv_mlp). Min-SNR-5 and the decaying learning rate are the pixel model's recipe, at three times
    # its rate: for the DiT at 2,000 steps (one run each; n = 1,000) the null-label FID was 155 at lr 1e-3, 105 at
    # 3e-3 and 94 at 6e-3. The cosine schedule of Improved DDPM, not the pixel model's linear one: for the DiT at lr
    # 6e-3 its null-label FID was 77 against 94 and its guided samples (w = 1) scored 19 against 25. Label dropout
    # 0.5: the null label is the weak branch of a class-conditional model trained for minutes (for the DiT at 3,000
    # steps, 73 against 115 with 0.2). 6,000 steps give both stages about the pixel model's minutes.
    return TrainConfig(
        name="mnist-latent",
        model_type="unet",
        model=dict(_LATENT_UNET),
        dataset="mnist5k",
        autoencoder={"channels": [16, 32], "latent_channels": 4, "kl_weight": 1e-3, "steps": 1200,
                     "batch_size": 64, "lr": 2e-3},
        schedule="cosine",
        T=1000,
        loss_type="simple",
        snr_gamma=5.0,
        batch_size=64,
        lr=6e-3,
        lr_decay="cosine",
        warmup_steps=100,
        steps=6000,
        grad_clip=1.0,
        ema_decay=0.999,
        label_dropout=0.5,
        checkpoint_every=500,
        preview_every=1000,
        log_every=50,
    )


#: The latent model's denoiser: a U-Net on the 4x7x7 latent, one 7x7 level of width 48, two residual blocks, attention.
_LATENT_UNET = {"image_size": 7, "in_channels": 4, "model_channels": 48, "channel_mult": [1], "num_res_blocks": 2,
                "attention_resolutions": [7], "num_heads": 4, "num_head_channels": -1, "dropout": 0.0,
                "num_classes": 10, "learn_sigma": False, "use_scale_shift_norm": True, "resblock_updown": False}
#: The diffusion transformer measured against it (Peebles & Xie 2023, with the ConvFFN of PVT v2 in its MLPs).
_LATENT_DIT = {"image_size": 7, "in_channels": 4, "patch_size": 1, "hidden": 96, "depth": 4, "num_heads": 4,
               "mlp_ratio": 4, "num_classes": 10, "learn_sigma": False, "conv_mlp": True}


def _mnist14() -> TrainConfig:
    # 1,200 steps: at 400 (one run, n = 500, ancestral sampling with 100 steps and the learned variance) the samples
    # scored 39.7 against a floor of 12.0 and most were blobs; at 1,200 they scored 19.7 and most are recognisable
    # digits, the regime in which Nichol & Dhariwal's claims about sample quality are made. A cosine decay of the
    # learning rate gave no gain at 1,200 steps (21.4).
    return TrainConfig(
        name="mnist14",
        model_type="unet",
        model={
            "image_size": 14, "in_channels": 1, "model_channels": 16, "channel_mult": [1, 2],
            "num_res_blocks": 1, "attention_resolutions": [], "num_heads": 4, "num_head_channels": -1,
            "dropout": 0.0, "num_classes": None, "learn_sigma": True, "use_scale_shift_norm": True,
            "resblock_updown": False,
        },
        dataset="mnist5k-14",
        schedule="cosine",
        T=1000,
        loss_type="hybrid",
        batch_size=64,
        lr=2e-3,
        warmup_steps=50,
        steps=1200,
        grad_clip=1.0,
        ema_decay=0.999,
        log_every=50,
    )


def improved_variants(seed: int = 0, steps: int | None = None) -> dict[str, TrainConfig]:
    """The three variants of ``mnist14`` that the Improved DDPM notebook compares, each one change from the next:
    ``"cosine, L_simple"`` (fixed variance, one output channel), ``"linear, L_hybrid"`` and ``"cosine, L_hybrid"``
    (learned variance). ``seed`` and ``steps`` apply to all three (the benchmark of their seed spread trains them from
    several seeds; the ``gpu`` profile trains them longer)."""
    base = get_preset("mnist14", seed=seed, **({} if steps is None else {"steps": steps}))

    def variant(schedule: str, loss_type: str) -> TrainConfig:
        model = {**base.model, "learn_sigma": loss_type == "hybrid"}
        return dataclasses.replace(base, schedule=schedule, loss_type=loss_type, model=model)

    return {"cosine, L_simple": variant("cosine", "simple"), "linear, L_hybrid": variant("linear", "hybrid"),
            "cosine, L_hybrid": variant("cosine", "hybrid")}


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "toy2d": _toy2d,
    "mnist-cpu": _mnist_cpu,
    "mnist-flow": _mnist_flow,
    "mnist-gpu": _mnist_gpu,
    "cifar10-gpu": _cifar10_gpu,
    "mnist-latent": _mnist_latent,
    "mnist14": _mnist14,
}


def preset_names() -> list[str]:
    """The valid preset names."""
    return list(PRESETS)


#: Networks that can stand in for a preset's own, by preset and then model type, for comparisons at the same recipe
#: (``benchmarks/train_mnist_cpu.py --set model_type=dit``). For ``mnist-latent``: the diffusion transformer of
#: ``ddpm.dit`` on the same 4x7x7 latents (0.72M parameters, beside the U-Net's 0.61M).
ALTERNATIVE_NETWORKS: dict[str, dict[str, dict]] = {
    "mnist-latent": {"dit": _LATENT_DIT},
}


def get_preset(name: str, **overrides) -> TrainConfig:
    """A fresh :class:`TrainConfig` for preset ``name``, with ``overrides`` applied (e.g. ``steps=100``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets are {', '.join(PRESETS)}")
    config = PRESETS[name]()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    config.validate()
    return config


def mnist_preset(profile_name: str | None = None) -> str:
    """Name of the MNIST preset of a profile (default: the current :func:`profile`)."""
    p = profile() if profile_name is None else profile_name
    if p not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {p!r}")
    return "mnist-gpu" if p == "gpu" else "mnist-cpu"


def recipe_summary(config: TrainConfig) -> str:
    """The training recipe of ``config`` in plain words (no LaTeX: glued text is not rendered as math)."""
    objective = {"simple": "the simple objective", "hybrid": "the hybrid objective", "vlb": "the bound"}[config.loss_type]
    parts = [objective + (f" with Min-SNR-{config.snr_gamma:g} weighting of the noise term"
                          if config.snr_gamma is not None else "")]
    parts.append(f"the {config.schedule} schedule")
    if config.label_dropout > 0:
        parts.append(f"label dropout {config.label_dropout:g}")
    decay = "with a cosine decay" if config.lr_decay == "cosine" else "constant after the warm-up"
    parts.append(f"AdamW at {config.lr:g} {decay}")
    parts.append(f"batch {config.batch_size}")
    last = ema_decay_at(config.steps - 1, config.ema_decay, config.ema_warmup)
    parts.append(f"EMA {config.ema_decay:g}" if last == config.ema_decay
                 else f"an EMA whose warm-up stops at {last:.4f} on the last step, short of its cap {config.ema_decay:g}")
    return ", ".join(parts)
