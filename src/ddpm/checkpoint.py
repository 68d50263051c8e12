"""Checkpoint files: safetensors weights with a JSON configuration, atomic and durable writes, exact resume.

File I/O only: nothing here builds a network or trains one (that is ``ddpm.cache``, which sits above the
trainer). Two layers:

* ``save_weights`` / ``load_weights``: one ``.safetensors`` file holding a dict of tensors, with the JSON
  configuration stored in the file's metadata. Loading never unpickles anything.
* ``save_training_state`` / ``load_training_state``: a *training checkpoint*, i.e. a directory with

  ========================  ==========================================================================
  ``config.json``           the ``TrainConfig`` as a dict, the package version and the config hash
  ``model.safetensors``     raw weights
  ``ema.safetensors``       exponential moving average of the weights (what samplers use)
  ``optimizer.safetensors`` optimiser state tensors; ``optimizer.json`` holds the rest of it
  ``rng.safetensors``       torch CPU and CUDA generator states as uint8 tensors
  ``state.json``            step, wall time, loss history, Python and NumPy random states, extra state
  ========================  ==========================================================================

  The directory is written next to its final place and swapped in with ``os.replace``, each rename synced to
  disk, so a crash or a power cut while saving leaves the previous checkpoint intact (``ddpm.atomic``). The swap
  holds the lock ``<directory>.lock`` (``ddpm.locking``); readers wait out a swap instead of seeing half of one. A
  save replaces only an earlier checkpoint or an empty folder, never a folder of other files.

Every failure to read a checkpoint (missing, truncated, corrupt, trained with another configuration) raises
:class:`CheckpointError`, a ``ValueError`` whose one-line message names the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import torch

from . import atomic
from .atomic import atomic_write, fsync_path, recover_swap, swap_folder, tmp_sibling
from .locking import holding_lock
from .rng import capture_rng_state, restore_rng_state

__all__ = [
    "AUTOENCODER_PREFIX",
    "CheckpointError",
    "autoencoder_state_from_extra",
    "config_hash",
    "load_training_state",
    "load_weights",
    "is_checkpoint",
    "package_version",
    "previews_from_extra",
    "save_training_state",
    "save_weights",
    "check_config",
    "read_checkpoint_header",
    "read_consistently",
]

FORMAT_NAME = "ddpm-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, truncated, corrupt, or made for another configuration."""


# ---------------------------------------------------------------------------------------------------------
# Versions and hashes
# ---------------------------------------------------------------------------------------------------------


def package_version() -> str:
    """The installed version of the ``ddpm`` package (part of every config hash)."""
    try:
        from importlib.metadata import version

        return version("ddpm")
    except Exception:  # not installed (e.g. run from a source tree on sys.path)
        return "0+unknown"


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a JSON-serialisable config dict and the package version.

    Key order does not matter (the JSON is written with sorted keys); tuples and lists hash alike.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    payload = _canonical_json({"config": config, "ddpm_version": package_version()})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Atomic file writes
# ---------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def _read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found; train the model first or pass the right path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint file {path} is truncated or corrupt ({type(exc).__name__}); delete it and train again"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# One safetensors file
# ---------------------------------------------------------------------------------------------------------


def _plain_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise ValueError(f"tensor names must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"tensors[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        # A private, contiguous CPU copy: safetensors refuses tensors that share memory.
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def save_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and the JSON ``config`` to one safetensors file, atomically.

    The config is kept in the file's metadata under ``"config"`` (with ``"ddpm_version"`` beside it), so
    the file describes itself. Returns the path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {
        "format": FORMAT_NAME,
        "config": _canonical_json(dict(config)),
        "ddpm_version": package_version(),
    }
    plain = _plain_tensors(tensors)
    atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=metadata))
    return path


def _config_diff(found: Mapping[str, Any], expected: Mapping[str, Any], limit: int = 3) -> str:
    found_n = json.loads(_canonical_json(dict(found)))
    expected_n = json.loads(_canonical_json(dict(expected)))
    keys = sorted(set(found_n) | set(expected_n))
    diffs = [
        f"{k}: {found_n.get(k, '<missing>')!r} in file, {expected_n.get(k, '<missing>')!r} wanted"
        for k in keys
        if found_n.get(k, "<missing>") != expected_n.get(k, "<missing>")
    ]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def load_weights(
    path: str | os.PathLike, expected_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_weights`: returns ``(tensors on CPU, config dict)``.

    Raises :class:`CheckpointError` when the file is missing, truncated or corrupt, or when
    ``expected_config`` is given and differs from the stored config.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found; train the model first or pass the right path")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        config = json.loads(metadata["config"])
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(
            f"checkpoint file {path} is truncated or corrupt ({type(exc).__name__}); delete it and train again"
        ) from None
    if expected_config is not None and _canonical_json(config) != _canonical_json(dict(expected_config)):
        raise CheckpointError(
            f"checkpoint file {path} was made with another configuration ({_config_diff(config, expected_config)}); "
            "use a checkpoint made with this configuration or train a new one"
        )
    return tensors, config


# ---------------------------------------------------------------------------------------------------------
# Optimiser and random states without pickle
# ---------------------------------------------------------------------------------------------------------


def _optimizer_to_files(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<param index>.<name>``) and a JSON part."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = []
    for group in state_dict["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        groups.append({k: (tuple(v) if k == "betas" else v) for k, v in group.items()})
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints (directories)
# ---------------------------------------------------------------------------------------------------------


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a ddpm checkpoint: a folder whose ``config.json`` parses and says
    ``"format": "ddpm-checkpoint"`` (the only kind of folder a save ever replaces)."""
    try:
        header = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT_NAME


def refuse_foreign(directory: Path) -> None:
    """Raise :class:`CheckpointError` unless ``directory`` is new, an empty folder or a ddpm checkpoint."""
    if not directory.exists() or (directory.is_dir() and (is_checkpoint(directory) or not any(directory.iterdir()))):
        return
    kind = "a folder that is not a ddpm checkpoint" if directory.is_dir() else "a file"
    raise CheckpointError(f"{directory} is {kind}, and a checkpoint replaces only an earlier checkpoint, so nothing "
                          "was written there; choose an empty or new folder")


def save_training_state(
    directory: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    model: Mapping[str, torch.Tensor],
    ema: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any],
    state: Mapping[str, Any],
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    preset: str | None = None,
) -> Path:
    """Write a complete training checkpoint to ``directory``, replacing any previous one atomically.

    ``model`` and ``ema`` are state dicts, ``optimizer`` is ``optimizer.state_dict()``, ``state`` is a
    JSON-serialisable dict (must hold ``"step"``), ``extra_tensors`` are saved in ``extra.safetensors``
    (e.g. the importance sampler's loss history). The global random states are captured here.

    ``directory`` may be new, an empty folder or an earlier ddpm checkpoint (:func:`is_checkpoint`); anything else
    raises :class:`CheckpointError` and is left untouched. The swap runs under the lock ``<directory>.lock``
    (``ddpm.locking``); if the final rename fails, the complete new checkpoint is kept and the error names it.
    """
    directory = Path(directory)
    if "step" not in state:
        raise ValueError("state must hold 'step'")
    refuse_foreign(directory)  # before any work
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    digest = config_hash(config)
    tmp = tmp_sibling(directory)
    tmp.mkdir()
    keep = False
    try:
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "ddpm_version": package_version(),
            "config_hash": digest,
            "preset": preset,
            "config": config,
        }
        _write_json(tmp / CONFIG_FILE, header)
        save_weights(tmp / "model.safetensors", model, config)
        save_weights(tmp / "ema.safetensors", ema, config)
        opt_tensors, opt_meta = _optimizer_to_files(optimizer)
        save_weights(tmp / "optimizer.safetensors", opt_tensors, config)
        _write_json(tmp / "optimizer.json", opt_meta)
        rng_tensors, rng_meta = capture_rng_state()
        save_weights(tmp / "rng.safetensors", rng_tensors, config)
        save_weights(tmp / "extra.safetensors", dict(extra_tensors or {}), config)
        _write_json(tmp / STATE_FILE, {**dict(state), "rng": rng_meta, "config_hash": digest})
        fsync_path(tmp)
        # the swap (ddpm.atomic.swap_folder): a power cut leaves the old checkpoint or the new one, never neither
        with holding_lock(directory):
            recover_swap(directory)
            refuse_foreign(directory)  # again, now that no other writer can change it
            try:
                swap_folder(tmp, directory)
            except OSError as exc:
                keep = True
                raise CheckpointError(f"could not move the new checkpoint into {directory} "
                                      f"({exc.strerror or type(exc).__name__}); it is kept, complete, in {tmp}: "
                                      f"move it to {directory} by hand") from None
    finally:
        if not keep and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


_T = TypeVar("_T")


def read_consistently(directory: str | os.PathLike, read: Callable[[], _T]) -> _T:
    """``read()`` of files in the checkpoint ``directory``, all from one checkpoint even while a writer swaps in a
    new one (:func:`ddpm.atomic.read_consistently`): returns what ``read`` returns."""
    return atomic.read_consistently(Path(directory), read, CheckpointError)


def _read_header(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        if directory.exists():
            raise CheckpointError(f"checkpoint {directory} is a file, not a checkpoint directory; pass the directory")
        raise CheckpointError(f"checkpoint {directory} not found; train one with: "
                              f"python -m ddpm train --preset NAME --out {directory}")
    header = _read_json(directory / CONFIG_FILE)
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME or "config" not in header:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a ddpm checkpoint; pass a directory written by ddpm")
    return header


def read_checkpoint_header(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a training checkpoint (raises :class:`CheckpointError` when unusable).

    Safe while another process writes the checkpoint: it waits out a swap and never moves anything itself except,
    under the lock, the aside copy left by a writer that crashed mid-swap."""
    directory = Path(directory)
    return read_consistently(directory, lambda: _read_header(directory))


def check_config(directory: Path, found: Mapping[str, Any], expected: Mapping[str, Any], ignore: Iterable[str] = ()) -> None:
    """Raise :class:`CheckpointError` when the config ``found`` in ``directory`` differs from ``expected``
    outside the keys in ``ignore``."""
    ignore = set(ignore)
    f = {k: v for k, v in found.items() if k not in ignore}
    e = {k: v for k, v in expected.items() if k not in ignore}
    if _canonical_json(f) != _canonical_json(e):
        raise CheckpointError(
            f"checkpoint {directory} was trained with another configuration ({_config_diff(f, e)}); "
            "choose another output directory or train from scratch"
        )


def load_training_state(
    directory: str | os.PathLike,
    expected_config: Mapping[str, Any] | None = None,
    *,
    ignore_keys: Iterable[str] = (),
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Read a training checkpoint. Returns a dict with ``config``, ``header``, ``model``, ``ema``,
    ``optimizer`` (a state dict ready for ``load_state_dict``), ``state`` and ``extra``.

    ``expected_config`` (with ``ignore_keys`` left out of the comparison) guards against resuming a
    different run. With ``restore_rng`` the global random states are set to the saved ones.
    """
    directory = Path(directory)

    def read():  # every file from one checkpoint, even while a writer swaps in the next one
        header = _read_header(directory)
        if expected_config is not None:
            check_config(directory, header["config"], expected_config, ignore_keys)
        tensors = [load_weights(directory / f"{name}.safetensors")[0]
                   for name in ("model", "ema", "optimizer", "rng", "extra")]
        return header, tensors, _read_json(directory / "optimizer.json"), _read_json(directory / STATE_FILE)

    header, (model, ema, opt_tensors, rng_tensors, extra), opt_meta, state = read_consistently(directory, read)
    config = header["config"]
    try:
        optimizer = _optimizer_from_files(opt_tensors, opt_meta)
        step = int(state["step"])
        rng_meta = state.pop("rng")
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {directory} is incomplete or corrupt ({type(exc).__name__}); delete it and train again"
        ) from None
    if restore_rng:
        restore_rng_state(rng_tensors, rng_meta)
    state["step"] = step
    return {
        "config": config,
        "header": header,
        "model": model,
        "ema": ema,
        "optimizer": optimizer,
        "state": state,
        "extra": extra,
    }


def previews_from_extra(extra: Mapping[str, Any]) -> list:
    """The preview samples kept in a checkpoint's extra tensors (``preview/<step>``), as [(step, images)] by step."""
    found = [(int(key.split("/", 1)[1]), images) for key, images in extra.items() if key.startswith("preview/")]
    return sorted(found, key=lambda item: item[0])


#: Prefix of the autoencoder's tensors in a latent model's extra tensors.
AUTOENCODER_PREFIX = "autoencoder/"


def autoencoder_state_from_extra(extra: Mapping[str, Any]) -> dict:
    """The state dict of a latent model's autoencoder kept in a checkpoint's extra tensors ({} if none)."""
    return {k[len(AUTOENCODER_PREFIX):]: v for k, v in extra.items() if k.startswith(AUTOENCODER_PREFIX)}
