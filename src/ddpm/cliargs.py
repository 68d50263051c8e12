"""The command line's plumbing, shared by its subcommands: one-line usage errors, argument types and the device.

Nothing here imports torch at import time, so that ``python -m ddpm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math

PROG = "python -m ddpm"


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message} (see --help)")


def number(cast, ok, requirement: str, name: str = ""):
    """An argparse ``type``: ``cast`` the text, then check it with ``ok``; one message for both failures."""
    prefix = f"{name} " if name else ""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{prefix}must be {requirement}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{prefix}must be {requirement}, got {text}")
        return value

    return parse


def positive(name: str):
    return number(int, lambda v: v > 0, "a positive integer", name)


nonneg_int = number(int, lambda v: v >= 0, "an integer >= 0")
nonneg_float = number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def torch_device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: this machine has no usable CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA GPU(s), numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu")
    return device


def read_image_file(path, option: str, hint: str = ""):
    """The images ``arr_0`` (uint8 ``[N, H, W, C]``, N >= 1) and the labels ``arr_1`` (or None) of the ``.npz`` given
    to ``option``; a wrong suffix, a missing or unreadable file, or images of another layout is one line."""
    import numpy as np

    if path.suffix.lower() != ".npz":
        raise UsageError(f"{option} must be an .npz file (arr_0 uint8 [N, H, W, C]), got {path}")
    if not path.is_file():
        raise UsageError(f"{option}: {path} not found{hint}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arr = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f.files else None
    except Exception as exc:
        raise UsageError(f"{option}: {path} is not a readable .npz with arr_0 ({type(exc).__name__})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) == 0:
        raise UsageError(f"{option}: arr_0 must be uint8 [N, H, W, C] with N >= 1, got {arr.dtype} {list(arr.shape)}")
    return arr, labels


def load_pixel_diffusion_model(args, flow: str, latent: str):
    """``(model, config, device)`` of ``args.checkpoint`` on ``args.device``; a flow or a latent model is refused in one
    line that ends with ``flow`` or ``latent``, what the command needs instead."""
    from .cache import load_model

    device = torch_device(args.device)
    model, config, _ = load_model(args.checkpoint, device=device)
    if config.objective == "flow":
        raise UsageError(f"{args.checkpoint} is a flow (objective 'flow'): {flow}")
    if config.is_latent:
        raise UsageError(f"{args.checkpoint} is a latent model: {latent}")
    return model, config, device


def check_out(args) -> None:
    """Refuse an ``--out`` that cannot be written without losing anything, before any work (one line)."""
    from .samplefiles import check_output_path

    try:
        check_output_path(args.out, overwrite=args.overwrite, name="--out")
    except OSError as exc:
        raise UsageError(f"--out {args.out}: {exc.strerror or exc}") from None


def save_out(args, images, labels, what: str) -> None:
    """Write ``images`` (and, to an ``.npz``, their ``labels``) to ``--out``; a failed write is one line saying that
    the ``what`` were not saved."""
    from .samplefiles import save_samples

    try:
        save_samples(args.out, images, labels if args.out.suffix.lower() == ".npz" else None,
                     overwrite=args.overwrite)
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot write it ({exc.strerror or type(exc).__name__}); the {what} "
                         "were not saved") from None
