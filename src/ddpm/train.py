"""Training: the ``TrainConfig`` dataclass and a small ``Trainer`` with callbacks.

One training step (Ho et al. 2020, Algorithm 1; Nichol & Dhariwal 2021 for L_hybrid and L_vlb):

1. take the next batch ``x_0 [B, C, H, W]`` of a per-epoch shuffle (sharded across ranks under ``torchrun``),
   flip it at random for CIFAR-10, replace labels by the null label with probability ``label_dropout``
   (classifier-free guidance, Ho & Salimans 2022);
2. draw ``t`` (0-based, uniform or importance-sampled) and ``eps ~ N(0, I)``;
3. minimise ``losses.training_losses`` (``simple``, ``hybrid`` or ``vlb``) weighted by the sampler's
   importance weights, with AdamW, learning-rate warm-up and gradient clipping; a flow (``objective="flow"``)
   draws a flow time in (0, 1) instead and minimises ``flow.flow_losses`` (for a reflow, on the pairs
   ``(x_0, x_1)`` of its parent's ODE instead of fresh noise);
4. update the exponential moving average (EMA) of the weights.

A *latent* model (``TrainConfig.autoencoder`` set) first gets its autoencoder (trained on the images, or loaded
from the cache), encodes every training image once to its scaled latent mean, and then runs the same steps on
the latents (Rombach et al. 2022); previews are decoded to images and checkpoints carry the autoencoder.

Randomness is a function of ``(seed, rank, step)`` except the global torch generator (dropout), whose state
is saved in every checkpoint; a run stopped at step k and resumed therefore reaches step n with bitwise the
same weights as an uninterrupted run on the CPU (single process).

On CUDA the step runs under bf16 autocast with channels-last tensors and fused AdamW, optionally through
``torch.compile``. On a CPU with native bf16 arithmetic, ``cpu_bf16`` runs the step under bf16 autocast too
(``mnist-cpu`` does: about 1.25 times the images per second of fp32 on two AVX512-BF16 cores). Under
``torchrun --nproc_per_node=N`` the model is wrapped in PyTorch's ``DistributedDataParallel``; ``batch_size`` is
the global batch (``batch_size / N`` per rank) and only rank 0 writes checkpoints.

Progress bars follow :func:`ddpm.callbacks.progress_enabled`. The configuration lives in ``ddpm.trainconfig``
and the hooks in ``ddpm.callbacks``; the names are re-exported here.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from .autoencoder import decode_in_batches, encode_in_batches, first_stage
from .callbacks import Callback, as_callback, progress_bar, progress_enabled
from .data import augment, dataset_info, load_dataset
from .distributed import StopRequest, setup_distributed
from .flow import FlowTimeSampler, flow_losses, flow_sample
from .losses import ImportanceSampler, UniformSampler, training_losses
from .optim import ema_decay_at, learning_rate, update_ema
from .resume import load_trainer, save_trainer
from .rng import derive_seed as _seed
from .schedule import NoiseSchedule, randn_like
from .trainconfig import (LOSS_TYPES, RESUME_FREE_KEYS, TrainConfig, TrainingDiverged, build_model,
                          cpu_has_bf16, resume_free_keys)

__all__ = [
    "Callback",
    "LOSS_TYPES",
    "RESUME_FREE_KEYS",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "build_model",
    "cpu_has_bf16",
    "ema_decay_at",
    "progress_enabled",
    "resume_free_keys",
    "setup_distributed",
    "train",
    "update_ema",
]

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
        data: ``(x, y)`` tensors to train on instead of ``load_dataset(config.dataset)``; for a reflow
            (``config.reflow``), ``(x0, y, x1)`` with the noise ``x1`` paired with each ``x0``.
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
        data: tuple | None = None,
        data_root: str | os.PathLike | None = None,
    ):
        config.validate()
        self.config = config
        self.preset = preset if preset is not None else config.name
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = [as_callback(c) for c in callbacks]
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
        self.use_bf16 = config.bf16 if cuda else (config.cpu_bf16 and self.device.type == "cpu" and cpu_has_bf16())
        # channels-last helps oneDNN's fp32 CPU convolutions (about 4% per mnist-cpu step on two cores), but its
        # bf16 ones run twice as slowly in that layout, so a CPU step in bf16 keeps the default layout
        self.channels_last = (config.channels_last and config.model_type == "unet"
                              and (cuda or not self.use_bf16))

        given = data is not None
        if config.reflow is not None and (data is None or len(data) != 3):
            raise ValueError(f"TrainConfig {config.name!r} is a reflow: it trains on pairs drawn from its parent flow; "
                             "train it with ddpm.load_or_train(config), or pass data=(x0, y, x1) from "
                             "ddpm.flow.reflow_pairs")
        if data is None:  # first, so that a missing dataset fails before anything is built
            data = load_dataset(config.dataset, split="train", root=data_root, seed=config.seed)
        self.autoencoder = None
        self._images = None
        if config.is_latent:  # the first stage, before the seeds of the second are set
            self.autoencoder = first_stage(config, data[0] if given else None, data_root)
            self._images = data[0]
            data = (encode_in_batches(self.autoencoder, data[0]), data[1])

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
        self.time_span = 1.0 if config.objective == "flow" else config.T  # the range of the sampled times
        if config.objective == "flow":
            self.t_sampler = FlowTimeSampler(config.flow_time)
        else:
            self.t_sampler = (ImportanceSampler if config.timestep_sampler == "importance" else UniformSampler)(config.T)
        self.num_classes = config.num_classes
        self.var_type = config.resolved_var_type

        x, y = data[:2]
        self.pairs = data[2].to(self.device) if len(data) == 3 else None  # reflow: the x_1 paired with each x_0
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
        self.stop_request = StopRequest(self.distributed)

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

    def reencode(self) -> None:
        """Encode the training images again with ``autoencoder`` (after a checkpoint replaced its weights)."""
        self.x = encode_in_batches(self.autoencoder, self._images).to(self.device)

    def lr_at(self, step: int) -> float:
        """Learning rate at 0-based ``step`` (:func:`ddpm.optim.learning_rate`)."""
        return learning_rate(self.config, step)

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
        x0 = self.x[idx.to(self.device)]
        if not c.is_latent and self.pairs is None:  # a flipped latent (or reflow sample) is not that of the flip
            x0 = augment(c.dataset, x0, g_dev)
        y = None
        if self.num_classes is not None:
            y = self.y[idx.to(self.device)]
            if c.label_dropout > 0:
                drop = torch.rand(y.shape, device=self.device, generator=g_dev) < c.label_dropout
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        t, weights = self.t_sampler.sample(self.local_batch, device=self.device, generator=g_cpu)
        noise = randn_like(x0, g_dev) if self.pairs is None else self.pairs[idx.to(self.device)]
        if self.channels_last:
            noise = noise.contiguous(memory_format=torch.channels_last)

        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            if c.objective == "flow":
                terms = flow_losses(self.train_model, x0, t, y=y, noise=noise)
            else:
                terms = training_losses(
                    self.train_model, self.schedule, x0, t, y=y, noise=noise, loss_type=c.loss_type,
                    var_type=self.var_type, snr_gamma=c.snr_gamma,
                )
        loss = (terms["loss"] * weights).mean()

        # global means and the stop requests (ddpm.distributed.StopRequest) in one all-reduce, so that every rank
        # takes the same decisions
        stats = torch.stack([
            loss.detach().float(),
            terms["mse"].detach().float().mean(),
            terms["vb"].detach().float().mean() if "vb" in terms else torch.zeros((), device=self.device),
            self.stop_request.flag(self.device),
        ])
        if self.distributed:
            dist.all_reduce(stats)
            stats[:3] /= self.world_size
        loss_v, mse_v, vb_v, stop = stats.tolist()
        self.stop_request.agree(stop)
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
        quartile = (t * 4 / self.time_span).long().clamp(max=3).cpu()  # quarters of [0, T) steps or of flow time
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
        """``n`` samples from the EMA model with DDIM (a flow: Euler) in ``steps`` steps, from a fixed seed (labels
        cycle through the classes for a conditional model). Uses its own generator: training randomness is untouched."""
        from .samplers import ddim_sample

        g = torch.Generator(self.device).manual_seed(_seed(self.config.seed, 11))
        y = None
        if self.num_classes is not None:
            y = torch.arange(n, device=self.device) % self.num_classes
        latent = self.autoencoder is not None
        if self.config.objective == "flow":
            return flow_sample(self.ema, (n, *self.config.sample_shape), steps=steps, y=y, generator=g,
                               device=self.device).clamp(-1, 1).cpu()
        x = ddim_sample(self.ema, self.schedule, (n, *self.config.sample_shape), steps=min(steps, self.config.T),
                        y=y, generator=g, device=self.device, clip_denoised=not latent).cpu()
        return decode_in_batches(self.autoencoder, x) if latent else x

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike | None = None) -> Path | None:
        """Write a resumable checkpoint (rank 0 only; other ranks return None). See :func:`ddpm.resume.save_trainer`."""
        return save_trainer(self, directory)

    def load(self, directory: str | os.PathLike | None = None) -> None:
        """Resume from a checkpoint written by :meth:`save` for the same configuration (``steps`` and the
        logging intervals may differ, ``steps`` only with a constant learning rate). Restores weights, EMA,
        optimiser, step, history and random states (:func:`ddpm.resume.load_trainer`)."""
        load_trainer(self, directory)
        if self.distributed and self.rank > 0:  # the saved random state is rank 0's
            torch.manual_seed(_seed(self.config.seed, self.rank, self.step, 7))

    # -- the loop ------------------------------------------------------------------------------------------

    def fit(self, steps: int | None = None) -> "Trainer":
        """Train until ``steps`` (default ``config.steps``) total steps.

        Checkpoints every ``checkpoint_every`` steps, at the end and on Ctrl-C (then re-raises KeyboardInterrupt;
        under ``torchrun`` all ranks stop after the same step, see :class:`ddpm.distributed.StopRequest`); a NaN/inf
        loss raises :class:`TrainingDiverged`, keeping the last checkpoint.
        """
        c = self.config
        total = c.steps if steps is None else steps
        show = self.is_main and progress_enabled(self.progress)
        bar = progress_bar(show, total, self.step, f"train {self.preset}")
        self.stop_request.install()
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
                if self.stop_request.stop_now():
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
            self.stop_request.uninstall()
            if bar is not None:
                bar.close()
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self

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
