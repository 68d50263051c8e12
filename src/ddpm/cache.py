"""The model cache: a trained model for a preset, trained once and then loaded from disk.

``load_or_train(preset)`` returns a :class:`TrainedModel` (EMA network, raw network, schedule, configuration,
loss history, provenance, training previews). The checkpoint lives in ``<cache>/<name>-<config hash>/``; the hash
covers the whole ``TrainConfig`` and the package version, so any change trains a new model, a rebuild of the book
reuses the old one, and an interrupted run is resumed exactly. ``load_model`` rebuilds the network of any training
checkpoint (what ``python -m ddpm sample`` uses).

This module sits above the trainer (``ddpm.train``) and the file layer (``ddpm.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .atomic import recover_swap
from .checkpoint import (CONFIG_FILE, STATE_FILE, CheckpointError, _read_json, autoencoder_state_from_extra,
                         check_config, config_hash, load_weights, package_version, previews_from_extra,
                         is_checkpoint, read_checkpoint_header, read_consistently)
from .locking import holding_lock, lock_path
from .paths import cache_dir, project_root
from .presets import get_preset, profile
from .rng import capture_rng_state, restore_rng_state
from .schedule import NoiseSchedule
from .train import TrainConfig, Trainer, build_model
from .unet import count_parameters

__all__ = ["TrainedModel", "cache_dir", "cached_ddim_samples", "cached_samples", "frequency_labels", "load_autoencoder",
           "load_model", "load_or_train", "project_root", "trained_model"]


def _filled(model: torch.nn.Module, state, directory: Path, problem: str) -> torch.nn.Module:
    """``model`` with ``state`` loaded, in eval mode; a mismatch is a one-line CheckpointError naming ``problem``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {directory} {problem} ({first}); train it again") from None
    return model.eval()


def _load_network(directory: Path, file: str, config) -> torch.nn.Module:
    """The network of ``config`` with the weights of ``directory / file``, in eval mode on the CPU."""
    weights, _ = load_weights(directory / file)
    return _filled(build_model(config), weights, directory, "does not fit its configured network")


def _autoencoder_from_extra(directory: Path, config, extra):
    """The autoencoder of a latent model from its checkpoint's extra tensors (None for a pixel model)."""
    if not config.is_latent:
        return None
    from .autoencoder import Autoencoder

    model = Autoencoder(config.autoencoder_config()[0])
    return _filled(model, autoencoder_state_from_extra(extra), directory, "lacks a usable autoencoder")


def load_autoencoder(directory: str | os.PathLike, config=None, *, device: str | torch.device | None = None):
    """The autoencoder saved with a latent model's checkpoint, in eval mode (None for a pixel model)."""
    directory = Path(directory)
    if config is None:
        config = TrainConfig.from_dict(read_checkpoint_header(directory)["config"])
    if not config.is_latent:
        return None
    extra = read_consistently(directory, lambda: load_weights(directory / "extra.safetensors")[0])
    model = _autoencoder_from_extra(directory, config, extra)
    return model.to(device) if device is not None else model


def load_model(directory: str | os.PathLike, *, ema: bool = True, device: str | torch.device | None = None):
    """Rebuild the network of a training checkpoint: returns ``(model in eval mode, TrainConfig, state dict)``.

    ``ema=True`` loads the exponential moving average of the weights (what sampling should use). Safe while a
    trainer writes the checkpoint: the weights, configuration and state all come from one checkpoint.
    """
    directory = Path(directory)

    def read():
        header = read_checkpoint_header(directory)
        try:
            config = TrainConfig.from_dict(header["config"])
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {directory} holds an unusable configuration: {exc}") from None
        model = _load_network(directory, "ema.safetensors" if ema else "model.safetensors", config)
        return model, config, _read_json(directory / STATE_FILE)

    model, config, state = read_consistently(directory, read)
    if device is not None:
        model.to(device)
    state.pop("rng", None)
    return model, config, state


# ---------------------------------------------------------------------------------------------------------
# load_or_train
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainedModel:
    """A trained model as notebooks use it.

    ``model``: the EMA network in eval mode (use it for sampling); ``raw_model``: the raw weights;
    ``schedule``: the training ``NoiseSchedule``; ``config``: the ``TrainConfig``; ``history``: losses
    (see ``ddpm.train.Trainer.history``); ``info``: provenance (profile, device, steps, wall time in
    seconds, checkpoint hash, preset name, parameter count, checkpoint path, ``cached``: whether this call loaded
    a finished run instead of training); ``previews``: the samples
    drawn during training, ``[(step, images [16, C, H, W] in [-1, 1])]``; ``autoencoder``: the first stage of
    a latent model (None for a pixel model). The network denoises ``config.sample_shape``; :meth:`decode`
    turns its samples into images.
    """

    model: torch.nn.Module
    raw_model: torch.nn.Module
    schedule: Any
    config: Any
    history: dict
    info: dict
    path: Path | None = None
    previews: list = dataclasses.field(default_factory=list)
    autoencoder: Any = None

    def decode(self, samples: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Images in [-1, 1] from samples of the network: decoded latents for a latent model, else the samples."""
        if self.autoencoder is None:
            return samples
        from .autoencoder import decode_in_batches

        return decode_in_batches(self.autoencoder, samples, batch_size)

    def provenance(self) -> str:
        """One line for the caption under a figure of samples."""
        i = self.info
        minutes = i.get("wall_time_s", float("nan")) / 60.0
        first = (f" after its autoencoder ({i['autoencoder_seconds'] / 60.0:.1f} min)"
                 if "autoencoder_seconds" in i else "")
        return (
            f"preset {i.get('preset')}, profile {i.get('profile')}, trained on {i.get('device')} for "
            f"{i.get('steps')} steps ({minutes:.1f} min){first}, checkpoint {i.get('checkpoint_hash')}"
        )


def _resolve_config(preset_or_config):
    if isinstance(preset_or_config, str):
        return preset_or_config, get_preset(preset_or_config)
    if isinstance(preset_or_config, TrainConfig):
        return preset_or_config.name, preset_or_config
    if isinstance(preset_or_config, Mapping):
        config = TrainConfig.from_dict(dict(preset_or_config))
        return config.name, config
    raise ValueError(
        f"preset_or_config must be a preset name, a TrainConfig or a dict, got {type(preset_or_config).__name__}"
    )


_default_cache = cache_dir  # load_or_train's argument ``cache_dir`` shadows the function


def load_or_train(
    preset_or_config,
    *,
    steps: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    callbacks: Iterable[Any] = (),
    device: str | torch.device | None = None,
) -> TrainedModel:
    """A trained model for a preset name, ``TrainConfig`` or config dict; trains only on a cache miss.

    The checkpoint lives in ``<cache>/<name>-<config hash>/`` where the cache is ``cache_dir``, else
    ``$DDPM_CACHE``, else ``<project root>/.cache/ddpm``; the hash covers the whole configuration and the
    package version, so any change trains a new model and a rebuild reuses the old one. A run that was
    interrupted (Ctrl-C) is resumed exactly. ``steps`` overrides the configuration's number of steps.
    The global random generators (torch, Python, NumPy) are left as they were found, so a notebook draws the
    same numbers afterwards whether the model was cached or trained. The entry's lock ``<entry>.lock``
    (``ddpm.locking``) is held throughout: a second process that asks for the same model waits (saying so once on
    stderr) and then loads what the first trained.
    """
    name, config = _resolve_config(preset_or_config)
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        config = dataclasses.replace(config, steps=steps)
    config.validate()
    root = Path(cache_dir) if cache_dir is not None else _default_cache()
    digest = config_hash(config.to_dict())
    directory = root / f"{name}-{digest}"
    waiting = f"waiting for another process that is training or loading {directory} (lock {lock_path(directory)})"

    # Building and training a network draws from the global random generators; put them back afterwards so that
    # a notebook behaves the same whether its model came from the cache or was just trained.
    rng_tensors, rng_meta = capture_rng_state()
    try:
        with holding_lock(directory, waiting):  # one process trains an entry; the others wait and load it
            return _load_or_train_locked(directory, config, name, digest, device, callbacks, progress)
    finally:
        restore_rng_state(rng_tensors, rng_meta)


def _load_or_train_locked(directory: Path, config, name: str, digest: str, device, callbacks, progress):
    """The body of :func:`load_or_train`, run while holding the lock of ``directory``."""
    recover_swap(directory)
    if directory.exists() and not is_checkpoint(directory):  # e.g. a truncated config.json: keep it, out of the way
        aside = directory.with_name(f"{directory.name}.unusable-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(directory, aside)
        _retraining(CheckpointError(f"{directory} is not a usable checkpoint (moved to {aside.name})"))
    if (directory / CONFIG_FILE).exists():
        try:
            cached = _finished_model(directory, config, name, digest, device)
        except CheckpointError:
            cached = None  # an unusable entry (e.g. a truncated file) is resumed or trained again below
        if cached is not None:
            return cached
    data = _reflow_data(config, device) if config.reflow is not None else None
    trainer = Trainer(config, out_dir=directory, device=device, callbacks=callbacks, progress=progress, preset=name,
                      data=data)
    if (directory / CONFIG_FILE).exists():
        try:
            trainer.load(directory)  # an interrupted run: resume it exactly
        except CheckpointError as exc:
            _retraining(exc)
            trainer = Trainer(config, out_dir=directory, device=device, callbacks=callbacks, progress=progress,
                              preset=name, data=data)
    trainer.fit()
    return trained_model(trainer, digest)


def _reflow_data(config, device) -> tuple:
    """The training data of a reflow (``TrainConfig.reflow``): its parent flow from the cache (trained first when
    missing) and the pairs ``(x0, y, x1)`` of noise and the sample the parent's ODE maps it to, drawn from the
    reflow's seed, with labels from the class frequencies of a conditional parent. The same pairs come back on a
    resumed run."""
    from .flow import reflow_pairs
    from .trainconfig import TrainConfig

    r = config.reflow
    parent = load_or_train(TrainConfig.from_dict(r["parent"]), device=device, progress=False)
    y = frequency_labels(parent, r["pairs"], r["seed"]) if parent.config.num_classes is not None else None
    x1, x0 = reflow_pairs(parent.model, parent.config.sample_shape, r["pairs"], steps=r["steps"],
                          method=r["method"], y=y, seed=r["seed"])
    return x0, y, x1


def _retraining(exc: CheckpointError) -> None:
    """Say on stderr why a cache entry is trained again, so that a notebook's extra minutes have a reason."""
    reason = str(exc).split("; ")[0]
    print(f"{reason}; the model cache trains this model again", file=sys.stderr, flush=True)


def _finished_model(directory: Path, config, name: str, digest: str, device) -> TrainedModel | None:
    """The cached model of a finished run in ``directory`` (None when the run stopped early)."""
    header = read_checkpoint_header(directory)
    check_config(directory, header["config"], config.to_dict())
    state = _read_json(directory / STATE_FILE)
    if int(state.get("step", -1)) < config.steps:
        return None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    models = []
    for file in ("ema.safetensors", "model.safetensors"):
        models.append(_load_network(directory, file, config).to(device))
    info = {
        "preset": name,
        "profile": profile(),
        "device": state.get("device"),
        "steps": int(state["step"]),
        "wall_time_s": float(state.get("wall_time_s", float("nan"))),
        "checkpoint_hash": digest,
        "parameters": count_parameters(models[0]),
        "dataset": config.dataset,
        "batch_size": config.batch_size,
        "ddpm_version": header.get("ddpm_version"),
        "path": str(directory),
        "cached": True,
    }
    if config.is_latent:
        info["autoencoder_seconds"] = float(state.get("autoencoder", {}).get("seconds", float("nan")))
    extra, _ = load_weights(directory / "extra.safetensors")
    autoencoder = _autoencoder_from_extra(directory, config, extra)
    return TrainedModel(model=models[0], raw_model=models[1], schedule=NoiseSchedule.from_name(config.schedule, config.T),
                        config=config, history=state.get("history", {}), info=info, path=directory,
                        previews=previews_from_extra(extra),
                        autoencoder=autoencoder.to(device) if autoencoder is not None else None)


def trained_model(trainer: Trainer, digest: str | None = None) -> TrainedModel:
    """The result of a finished :class:`ddpm.train.Trainer` as a :class:`TrainedModel` (both networks in eval mode)."""
    trainer.model.eval()
    trainer.ema.eval()
    info = {
        "preset": trainer.preset,
        "profile": profile(),
        "device": getattr(trainer, "trained_on", None) or trainer.device_name(),
        "steps": trainer.step,
        "wall_time_s": trainer.wall_time,
        "checkpoint_hash": digest or config_hash(trainer.config.to_dict()),
        "parameters": count_parameters(trainer.model),
        "dataset": trainer.config.dataset,
        "batch_size": trainer.config.batch_size,
        "ddpm_version": package_version(),
        "path": str(trainer.out_dir) if trainer.out_dir is not None else None,
        "cached": False,
    }
    if trainer.autoencoder is not None:
        info["autoencoder_seconds"] = float(getattr(trainer.autoencoder, "info", {}).get("seconds", float("nan")))
    return TrainedModel(
        model=trainer.ema, raw_model=trainer.model, schedule=trainer.schedule, config=trainer.config,
        history=trainer.history, info=info, path=trainer.out_dir, previews=list(trainer.previews),
        autoencoder=trainer.autoencoder,
    )


def cached_samples(trained: TrainedModel, draw, **settings) -> tuple[torch.Tensor, float]:
    """Samples of ``trained`` drawn once and shared: ``(samples, seconds it took to draw them)``.

    ``draw()`` draws the samples; ``settings`` must name everything that determines them (sampler, steps,
    variance, number, seeds, guidance...), because together with the checkpoint's hash they are the key of the
    file in ``<cache>/samples/``. Two pages that ask for the same samples with the same settings draw them once:
    the second gets the first's tensor and its recorded drawing time. A corrupt file is drawn again. The samples
    come back on the CPU either way (wherever ``draw`` made them).
    """
    from .checkpoint import save_weights

    key = json.loads(json.dumps({"checkpoint": trained.info.get("checkpoint_hash"), **settings}, sort_keys=True))
    if key["checkpoint"] is None:
        raise ValueError("cached_samples needs a model with a checkpoint hash (from load_or_train)")
    path = _default_cache() / "samples" / f"{config_hash(key)}.safetensors"
    if path.is_file():
        try:
            tensors, meta = load_weights(path)
            seconds = float(meta.pop("seconds"))
            if meta == key and "samples" in tensors:
                return tensors["samples"], seconds
        except (CheckpointError, KeyError, TypeError, ValueError):
            pass  # unreadable or another key: draw again and replace it
    start = time.perf_counter()
    samples = draw().detach().cpu().contiguous()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, {"samples": samples}, {**key, "seconds": seconds})
    return samples, seconds


def frequency_labels(trained: TrainedModel, n: int, seed: int) -> torch.Tensor:
    """``n`` class labels of a class-conditional model drawn from its training set's class frequencies with seed
    ``seed`` (:func:`ddpm.data.draw_labels`): the labels of the model's headline samples."""
    from .data import class_frequencies, draw_labels

    if trained.config.num_classes is None:
        raise ValueError("frequency labels need a class-conditional model; this one is unconditional")
    return draw_labels(n, class_frequencies(trained.config.dataset), torch.Generator().manual_seed(seed))


def cached_ddim_samples(trained: TrainedModel, n: int, steps: int, seed: int, *, weights: str = "ema",
                        labels: str = "null", batch_size: int = 500) -> tuple[torch.Tensor, float]:
    """``n`` unguided DDIM samples of ``trained`` in ``steps`` steps (trailing spacing) from seed ``seed``, with its
    ``"ema"`` or ``"raw"`` weights, through :func:`cached_samples`: ``(samples, seconds)``. ``labels``: ``"null"``
    (the unconditional branch, the null label of classifier-free guidance) or ``"frequencies"`` (labels drawn from
    the training set's class frequencies, :func:`frequency_labels` with the same seed: how ADM and DiT score a
    class-conditional model, and the book's headline FID). The one place that names the settings of these sets, so
    that every page asking for one gets the same file."""
    from .samplers import sample_in_batches

    if trained.config.objective == "flow":
        raise ValueError(f"{trained.info.get('preset')} is a flow (objective 'flow'): DDIM needs a noise predictor; "
                         "draw its samples with ddpm.flow.flow_sample")
    nets = {"ema": trained.model, "raw": trained.raw_model}
    if weights not in nets:
        raise ValueError(f"weights must be 'ema' or 'raw'; got {weights!r}")
    if labels not in ("null", "frequencies"):
        raise ValueError(f"labels must be 'null' or 'frequencies'; got {labels!r}")
    y = frequency_labels(trained, n, seed) if labels == "frequencies" else None

    def draw():
        return sample_in_batches(nets[weights], trained.schedule, trained.config.sample_shape, n, y=y,
                                 batch_size=batch_size, sampler="ddim", steps=steps,
                                 generator=torch.Generator().manual_seed(seed),
                                 clip_denoised=not trained.config.is_latent)

    return cached_samples(trained, draw, sampler="ddim", spacing="trailing", steps=steps, n=n, seed=seed,
                          weights=weights, labels=labels, guidance=None)
