"""Atomic writes (a reader never sees a half-written file, an interrupted write leaves nothing behind) and the
completion markers of prepared cache folders.

Completion markers
------------------
A prepared cache folder (tokenizer or model) is valid only if its marker file ``complete.json``, written
last, lists every other file of the folder with its size and sha256, and the recipe it was built from
matches the current one. Files whose size and modification time are unchanged are trusted without
re-hashing (so that loading a 500 MB model stays fast); others are re-hashed. A truncated, deleted,
rewritten or half-written file, or a changed recipe, makes the folder invalid, and it is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
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


MARKER = "complete.json"
MARKER_FORMAT = 1


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    str
        The hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def load_torch_payload(path: Path, error: type[Exception], fix: str, kind: str, format_version: int) -> dict:
    """``torch.load`` (weights only, onto the CPU) of a checkpoint file whose digest the caller has verified.

    Raises ``error`` naming ``path`` and ending in ``fix`` when the file does not unpickle or is not a dict
    whose ``"format"`` is ``format_version`` (``kind`` says what it should have been).
    """
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling error means the same thing here
        raise error(f"{path} is unreadable ({type(err).__name__}: {err}); {fix}") from err
    if not isinstance(payload, dict) or payload.get("format") != format_version:
        raise error(f"{path} is not a format-{format_version} {kind}; {fix}")
    return payload


def _normalised(recipe: Mapping[str, Any]) -> Any:
    """The recipe as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(recipe, sort_keys=True, default=str))


def _payload_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def mark_complete(folder: str | Path, recipe: Mapping[str, Any]) -> Path:
    """Write the marker of ``folder``: size, mtime and sha256 of every other file, and the recipe.

    Call it last, once everything else in the folder is written.

    Parameters
    ----------
    folder
        The cache folder (typically the temporary folder of :func:`hess_utils._io.atomic_path`).
    recipe
        JSON-serialisable description of how the content was built; :func:`is_complete` requires the
        same recipe.

    Returns
    -------
    Path
        The marker file.
    """
    folder = Path(folder)
    files = {}
    for p in _payload_files(folder):
        st = p.stat()
        files[p.relative_to(folder).as_posix()] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": file_sha256(p),
        }
    marker = folder / MARKER
    body = {"format": MARKER_FORMAT, "recipe": _normalised(recipe), "files": files}
    marker.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return marker


def is_complete(folder: str | Path, recipe: Mapping[str, Any] | None = None, full: bool = False) -> bool:
    """Whether ``folder`` holds a complete, intact cache built from ``recipe``.

    Parameters
    ----------
    folder
        The cache folder.
    recipe
        The expected recipe; ``None`` accepts any.
    full
        Re-hash every file even when its size and modification time match the marker.

    Returns
    -------
    bool
        ``True`` when the marker exists, is readable, matches the recipe, and every file it lists exists
        with the recorded size and content, and no file has been added.
    """
    folder = Path(folder)
    try:
        body = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = body["files"]
        if body.get("format") != MARKER_FORMAT or not files:
            return False
        if recipe is not None and body.get("recipe") != _normalised(recipe):
            return False
        present = {p.relative_to(folder).as_posix() for p in _payload_files(folder)}
        if present != set(files):
            return False
        for rel, meta in files.items():
            st = (folder / rel).stat()
            if st.st_size != meta["size"]:
                return False
            if full or st.st_mtime_ns != meta["mtime_ns"]:
                if file_sha256(folder / rel) != meta["sha256"]:
                    return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


