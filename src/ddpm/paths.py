"""Where the project keeps things: its root folder and the model cache. A leaf module: it imports nothing of ddpm."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "project_root"]


def project_root() -> Path:
    """The folder holding ``pyproject.toml`` above this package (``src/ddpm/..``), else the working directory."""
    here = Path(__file__).resolve().parent
    for folder in here.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return Path.cwd()


def cache_dir() -> Path:
    """The model cache: ``$DDPM_CACHE`` if set, else ``<project root>/.cache/ddpm``. Not created here."""
    env = os.environ.get("DDPM_CACHE")
    if env:
        return Path(env).expanduser()
    return project_root() / ".cache" / "ddpm"
