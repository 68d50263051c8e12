"""Saving a ``Trainer`` to a training checkpoint and resuming it exactly (the file format is ``ddpm.checkpoint``'s)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import checkpoint
from .checkpoint import AUTOENCODER_PREFIX
from .losses import ImportanceSampler
from .trainconfig import resume_free_keys

if TYPE_CHECKING:  # only for annotations: the trainer imports this module, not the reverse
    from .train import Trainer

__all__ = ["load_trainer", "save_trainer"]


def save_trainer(trainer: "Trainer", directory: str | os.PathLike | None = None) -> Path | None:
    """Write a resumable checkpoint of ``trainer`` to ``directory`` (default its ``out_dir``); rank 0 only, the
    other ranks return None. Calls the ``on_checkpoint`` hooks."""
    directory = Path(directory) if directory is not None else trainer.out_dir
    if directory is None or not trainer.is_main:
        return None
    extra = trainer.t_sampler.state_dict() if isinstance(trainer.t_sampler, ImportanceSampler) else {}
    extra.update({f"preview/{step}": images for step, images in trainer.previews})
    if trainer.autoencoder is not None:  # a latent model's checkpoint carries its decoder
        extra.update({f"{AUTOENCODER_PREFIX}{k}": v for k, v in trainer.autoencoder.state_dict().items()})
    state = {
        "step": trainer.step,
        "wall_time_s": trainer.wall_time,
        "history": trainer.history,
        "quartile_accumulator": [trainer._q_sum, trainer._q_count],
        "device": trainer.device_name(),
        "world_size": trainer.world_size,
        "preset": trainer.preset,
    }
    if trainer.autoencoder is not None:
        state["autoencoder"] = dict(getattr(trainer.autoencoder, "info", {}))
    path = checkpoint.save_training_state(
        directory,
        config=trainer.config.to_dict(),
        model=trainer.model.state_dict(),
        ema=trainer.ema.state_dict(),
        optimizer=trainer.optimizer.state_dict(),
        state=state,
        extra_tensors=extra,
        preset=trainer.preset,
    )
    trainer.last_checkpoint_step = trainer.step
    for cb in trainer.callbacks:
        cb.on_checkpoint(trainer, path)
    return path


def load_trainer(trainer: "Trainer", directory: str | os.PathLike | None = None) -> None:
    """Put ``trainer`` in the state of the checkpoint in ``directory`` (default its ``out_dir``), written by
    :func:`save_trainer` for the same configuration less :func:`ddpm.trainconfig.resume_free_keys`. Restores
    weights, EMA, optimiser, step, history and the global random states. A checkpoint that does not fit raises
    :class:`ddpm.checkpoint.CheckpointError` in one line."""
    directory = Path(directory) if directory is not None else trainer.out_dir
    if directory is None:
        raise ValueError("no checkpoint directory given")
    ck = checkpoint.load_training_state(directory, trainer.config.to_dict(), ignore_keys=resume_free_keys(trainer.config))
    try:
        trainer.model.load_state_dict(ck["model"])
        trainer.ema.load_state_dict(ck["ema"])
        saved = ck["optimizer"]
        current = trainer.optimizer.state_dict()["param_groups"]
        for g_saved, g_now in zip(saved["param_groups"], current):
            for key in ("fused", "foreach", "capturable", "differentiable"):
                if key in g_now:
                    g_saved[key] = g_now[key]
        trainer.optimizer.load_state_dict(saved)
        sampler_state = {k: v for k, v in ck["extra"].items()
                         if not k.startswith(("preview/", AUTOENCODER_PREFIX))}
        if isinstance(trainer.t_sampler, ImportanceSampler) and sampler_state:
            trainer.t_sampler.load_state_dict(sampler_state)
        trainer.previews = checkpoint.previews_from_extra(ck["extra"])
        saved_ae = checkpoint.autoencoder_state_from_extra(ck["extra"])
        if (trainer.autoencoder is None) != (not saved_ae):
            raise ValueError("a latent model and a pixel model cannot resume each other")
        if saved_ae:
            current = trainer.autoencoder.state_dict()
            if any(not torch.equal(current[k], v) for k, v in saved_ae.items() if k in current):
                trainer.autoencoder.load_state_dict(saved_ae)  # the run's own first stage, not a retrained one
                trainer.reencode()
        state = ck["state"]
        trainer.step = int(state["step"])
        trainer.wall_time = float(state.get("wall_time_s", 0.0))
        trainer.history = {k: list(v) for k, v in state["history"].items()}
        trainer._q_sum, trainer._q_count = [list(v) for v in state.get("quartile_accumulator", [[0.0] * 4, [0] * 4])]
        trainer.trained_on = state.get("device")
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise checkpoint.CheckpointError(
            f"checkpoint {directory} does not fit this model ({first}); train from scratch"
        ) from None
    trainer.last_checkpoint_step = trainer.step
