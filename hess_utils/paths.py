"""Where the project keeps what it prepares at set-up (corpora, tokenizers, models) and what it writes."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The checkout this package is installed from (editable install), or the working directory."""
    candidate = _PACKAGE_DIR.parent
    if (candidate / "pyproject.toml").exists():
        return candidate
    return Path.cwd()


def data_dir() -> Path:
    """Root of prepared data: ``$HESS_UTILS_DATA`` if set, else ``<repo>/data``. Created on demand."""
    root = Path(os.environ.get("HESS_UTILS_DATA", repo_root() / "data"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    """A sub-folder of :func:`data_dir` (git-ignored), created on demand."""
    path = data_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir() -> Path:
    """Where notebooks and the main job write figures: ``$HESS_UTILS_FIGURES`` or ``<repo>/figures``."""
    root = Path(os.environ.get("HESS_UTILS_FIGURES", repo_root() / "figures"))
    root.mkdir(parents=True, exist_ok=True)
    return root
