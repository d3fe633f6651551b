"""Atomic writes: a reader never sees a half-written file, and an interrupted write leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``, else delete it.

    Works for files and folders: write whatever you like at the yielded path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    inner = tmp / target.name
    try:
        yield inner
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(inner, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_json(target: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (non-JSON values are written with ``str``)."""
    return write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
