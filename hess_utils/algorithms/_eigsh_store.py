"""The checkpoint folder of :func:`hess_utils.algorithms.eigsh.eigsh`: save, verify and resume a thick-restart run.

What a resumed run needs is the Krylov-Schur relation ``H Q_f = Q_f T_f + r b^T`` between two products (the
:class:`~hess_utils.algorithms.eigsh.EigshState`: the ``f`` basis rows, ``T``, ``b``, the residual direction
``r``, the counters and the number of random vectors drawn, whose seeds are ``probe_seed(seed, draws)``) and
the two loop flags of the multiplicity check. Nothing else is random or hidden, so the resumed run performs
the same floating-point operations as an uninterrupted one.

Files of a checkpoint folder
----------------------------
``config.json``
    What defines the result (:func:`eigsh_config`): ``k``, ``which``, ``tol``, ``max_products``,
    ``basis_size``, ``seed``, ``check_multiplicity``, the sha256 of ``v0``, the operator's fingerprint
    (``dim``, ``dtype``, ``blocks_sha256`` of the parameter names and shapes, ``num_blocks``) and the caller's
    extra fields. A re-run with another configuration is refused, every differing key named.
``state-PPPPPPPPP-RRRRRR/``
    One saved state (``P`` products, ``R`` restarts): ``state.pt`` (``torch.save`` of numbers, lists and
    CPU tensors, loaded with ``weights_only=True``) and ``basis.bin``, the raw bytes of basis rows
    ``0..f-1`` then ``r``, block after block, written one row at a time (no second copy of the basis in
    memory).
``result/``
    The finished result: ``result.pt`` (values, residuals, counters) and ``vectors.bin`` (the ``k``
    eigenvectors, raw, block after block).
``checkpoint.json``
    The pointer: which state folder (or result) is current, with the sha256 of each of its files.

A state or result folder is written under a temporary name and renamed (:func:`hess_utils._io.atomic_path`)
to a name no other folder has; only then is ``checkpoint.json`` replaced (one atomic rename) to point at
it, and the folders it no longer names are deleted. A kill at any moment therefore leaves a pointer to a
complete folder. A file whose sha256 differs from the pointer's is refused with
:class:`EigshCheckpointError`, never silently restarted.

Under ``torch.distributed`` every rank runs the same iteration on the same vectors (the data-parallel and
FSDP operators return the same ``H v`` on every rank): every rank reads the folder to resume, only the
writer (rank 0) writes, and one all-reduce checks that all ranks start from the same saved point.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hess_utils import _io, runs
from hess_utils.distributed import same_on_all_ranks
from hess_utils.operators.base import SymmetricOperator

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
POINTER_FILE = "checkpoint.json"
STATE_FILE = "state.pt"
BASIS_FILE = "basis.bin"
RESULT_DIR = "result"
RESULT_FILE = "result.pt"
VECTORS_FILE = "vectors.bin"
_STATE_PREFIX = "state-"


class EigshCheckpointError(ValueError):
    """A checkpoint folder that cannot be trusted: digest mismatch, missing or unreadable file, wrong layout."""


# ---------------------------------------------------------------------------------------------- config
def vector_sha256(vector: Sequence[torch.Tensor] | None) -> str | None:
    """sha256 of a vector list's shapes, dtypes and bytes (None for None): identifies a start vector ``v0``."""
    if vector is None:
        return None
    digest = hashlib.sha256()
    for block in vector:
        t = block.detach().to("cpu").contiguous()
        digest.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def eigsh_config(
    op: SymmetricOperator,
    *,
    k: int,
    which: str,
    tol: float,
    max_products: int,
    basis_size: int,
    seed: int,
    check_multiplicity: bool,
    v0: Sequence[torch.Tensor] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration that defines an eigsh result, as ``config.json`` stores it.

    The run parameters, the sha256 of ``v0`` and the operator's fingerprint
    (:func:`hess_utils.checkpoint.operator_fingerprint`), plus the caller's ``extra`` fields (model, data, ...)
    at the top level.

    Raises
    ------
    ValueError
        If ``extra`` gives one of the run's own keys another value.
    """
    from hess_utils.checkpoint import operator_fingerprint

    core = {"kind": "eigsh", "format": FORMAT_VERSION, "k": int(k), "which": which, "tol": float(tol),
            "max_products": int(max_products), "basis_size": int(basis_size), "seed": int(seed),
            "check_multiplicity": bool(check_multiplicity), "v0_sha256": vector_sha256(v0),
            **operator_fingerprint(op)}
    extra = runs.normalise_config(dict(extra or {}))
    core = runs.normalise_config(core)
    clashes = [key for key in extra if key in core and extra[key] != core[key]]
    if clashes:
        details = ", ".join(f"{key}={extra[key]!r} vs {core[key]!r}" for key in clashes)
        raise ValueError(f"checkpoint_config gives run parameters other values than the run itself ({details})")
    return {**extra, **core}


# ---------------------------------------------------------------------------------------------- raw rows
def _write_rows(path: Path, rows: Iterable[torch.Tensor]) -> str:
    """Write each 1-D tensor's bytes to ``path`` in turn (one row in host memory at a time); their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for row in rows:
            data = row.detach().to("cpu").contiguous().view(torch.uint8).numpy()
            digest.update(data)
            f.write(memoryview(data))
    return digest.hexdigest()


def _read_rows(path: Path, targets: Iterable[torch.Tensor], expected_sha: str, fix: str) -> None:
    """Fill each 1-D target tensor in turn from ``path`` (written by :func:`_write_rows`), checking the sha256."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for target in targets:
                buffer = torch.empty(target.numel() * target.element_size(), dtype=torch.uint8)
                got = f.readinto(memoryview(buffer.numpy()))
                if got != buffer.numel():
                    raise EigshCheckpointError(f"{path} is truncated; {fix}")
                digest.update(buffer.numpy())
                target.copy_(buffer.view(target.dtype))
            if f.read(1):
                raise EigshCheckpointError(f"{path} is longer than its layout says; {fix}")
    except OSError as err:
        raise EigshCheckpointError(f"cannot read {path} ({err}); {fix}") from err
    if digest.hexdigest() != expected_sha:
        raise EigshCheckpointError(f"{path} is corrupt: its sha256 differs from the one in {POINTER_FILE}; {fix}")


def _layout(op: SymmetricOperator) -> list[list[Any]]:
    return [[int(math.prod(s)), str(d).replace("torch.", "")] for s, d in zip(op.shapes, op.dtypes, strict=True)]


# ---------------------------------------------------------------------------------------------- the folder
class EigshStore:
    """One eigsh checkpoint folder (the public API is :func:`~hess_utils.algorithms.eigsh.eigsh`)."""

    def __init__(self, folder: str | Path, config: dict[str, Any], is_writer: bool) -> None:
        self.folder = Path(folder)
        self.config = config
        self.is_writer = is_writer
        self.pointer: dict[str, Any] | None = None

    @property
    def fix(self) -> str:
        return f"pass another checkpoint_dir (--out), or delete {self.folder} to start over"

    # -------------------------------------------------------------- opening
    def open(self) -> dict[str, Any] | None:
        """Check ``config.json`` against this run (write it if absent); the pointer, or None for a new run.

        Raises
        ------
        ValueError
            If the folder holds another run (every differing key named, saved and new value) or files of a run
            but no ``config.json``.
        """
        folder = self.folder
        if self.is_writer and folder.is_dir():
            for tmp in folder.glob(".*.tmp"):  # left by a process killed inside an atomic write
                shutil.rmtree(tmp, ignore_errors=True)
        saved = runs.load_config(folder)
        if saved is None:
            if not self.is_writer:
                return None
            present = sorted(p.name for p in folder.glob("*") if p.name in (POINTER_FILE, RESULT_DIR)
                             or p.name.startswith(_STATE_PREFIX)) if folder.is_dir() else []
            if present:
                raise ValueError(f"{folder} holds {', '.join(present)} but no {CONFIG_FILE}, so it cannot be checked "
                                 f"against this run; {self.fix}")
            folder.mkdir(parents=True, exist_ok=True)
            runs.save_config(folder, self.config)
            return None
        mismatches = runs.config_mismatches(saved, self.config)
        if mismatches:
            details = "; ".join(f"{key}: {old!r} (saved) != {new!r} (now)" for key, old, new in mismatches)
            raise ValueError(f"checkpoint folder {folder} holds a different eigsh run: {details}. Resuming would mix "
                             f"two runs; {self.fix}")
        path = folder / POINTER_FILE
        if not path.exists():
            return None
        try:
            pointer = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise EigshCheckpointError(f"{path} is unreadable ({err}); {self.fix}") from err
        if not isinstance(pointer, dict) or pointer.get("format") != FORMAT_VERSION:
            raise EigshCheckpointError(f"{path} is not a format-{FORMAT_VERSION} eigsh checkpoint; {self.fix}")
        self.pointer = pointer
        if self.is_writer:
            self._drop_unnamed()
        return pointer

    def _drop_unnamed(self) -> None:
        """Delete state folders the pointer does not name (older states, or one a kill left unpointed)."""
        keep = (self.pointer or {}).get("folder")
        for path in self.folder.glob(f"{_STATE_PREFIX}*"):
            if path.is_dir() and path.name != keep:
                shutil.rmtree(path, ignore_errors=True)
        if keep != RESULT_DIR and (self.folder / RESULT_DIR).is_dir():
            shutil.rmtree(self.folder / RESULT_DIR, ignore_errors=True)

    def _commit(self, pointer: dict[str, Any]) -> None:
        _io.write_json(self.folder / POINTER_FILE, pointer)
        self.pointer = pointer
        self._drop_unnamed()

    def _payload(self, name: str) -> dict[str, Any]:
        """The verified ``torch.load`` of file ``name`` of the pointer's folder."""
        pointer = self.pointer or {}
        path = self.folder / pointer["folder"] / name
        if not path.exists():
            raise EigshCheckpointError(f"{path}, named by {POINTER_FILE}, is missing; {self.fix}")
        if _io.file_sha256(path) != pointer["sha256"][name]:
            raise EigshCheckpointError(f"{path} is corrupt or truncated: its sha256 differs from the one in "
                                       f"{POINTER_FILE}; {self.fix}")
        return _io.load_torch_payload(path, EigshCheckpointError, self.fix, "eigsh file", FORMAT_VERSION)

    def _check_layout(self, op: SymmetricOperator, payload: dict[str, Any]) -> None:
        if payload.get("layout") != _layout(op):
            raise EigshCheckpointError(f"{self.folder}: the saved vectors' layout {payload.get('layout')} is not the "
                                       f"operator's {_layout(op)}; {self.fix}")

    # -------------------------------------------------------------- states
    def save_state(self, state: Any, confirmed: np.ndarray | None, checking: bool) -> None:
        """Write ``state`` (an :class:`~hess_utils.algorithms.eigsh.EigshState`) and the loop flags (writer only)."""
        if not self.is_writer:
            return
        name = f"{_STATE_PREFIX}{state.num_products:09d}-{state.num_restarts:06d}"
        if self.pointer is not None and self.pointer.get("folder") == name:
            return  # this very state is on disk already
        target = self.folder / name
        if target.exists():
            shutil.rmtree(target)
        f = state.filled
        rows = [Qb[i] for Qb in state.basis for i in range(f)]
        if state.r is not None:
            rows += [block.reshape(-1) for block in state.r]
        with _io.atomic_path(target) as tmp:
            tmp.mkdir()
            basis_sha = _write_rows(tmp / BASIS_FILE, rows)
            payload = {
                "format": FORMAT_VERSION, "layout": [[int(Qb.shape[1]), str(Qb.dtype).replace("torch.", "")]
                                                     for Qb in state.basis],
                "basis_size": state.basis_size, "filled": int(f), "has_r": state.r is not None,
                "T": torch.from_numpy(np.array(state.T, dtype=np.float64)),
                "b": torch.from_numpy(np.array(state.b, dtype=np.float64)),
                "num_products": int(state.num_products), "num_restarts": int(state.num_restarts),
                "num_multiplicity_checks": int(state.num_multiplicity_checks),
                "norm_estimate": float(state.norm_estimate), "draws": int(state.draws),
                "confirmed": None if confirmed is None else torch.from_numpy(np.array(confirmed, dtype=np.float64)),
                "checking": bool(checking),
            }
            torch.save(payload, tmp / STATE_FILE)
            state_sha = _io.file_sha256(tmp / STATE_FILE)
        self._commit({"format": FORMAT_VERSION, "finished": False, "folder": name,
                      "sha256": {STATE_FILE: state_sha, BASIS_FILE: basis_sha},
                      "num_products": int(state.num_products), "num_restarts": int(state.num_restarts)})

    def load_state(self, op: SymmetricOperator, basis: list[torch.Tensor]) -> dict[str, Any]:
        """The saved state's fields, with its basis rows copied into ``basis`` and ``r`` as a vector list.

        ``basis`` is the freshly allocated ``(basis_size, numel)`` tensor per block of the run.
        """
        payload = self._payload(STATE_FILE)
        self._check_layout(op, payload)
        f = int(payload["filled"])
        if payload["basis_size"] != basis[0].shape[0] or not 0 <= f <= basis[0].shape[0]:
            raise EigshCheckpointError(f"{self.folder}: the saved basis ({payload['basis_size']} rows, {f} filled) "
                                       f"does not fit this run's ({basis[0].shape[0]} rows); {self.fix}")
        r = op.zeros() if payload["has_r"] else None
        targets = [Qb[i] for Qb in basis for i in range(f)] + ([x.view(-1) for x in r] if r is not None else [])
        path = self.folder / self.pointer["folder"] / BASIS_FILE  # type: ignore[index]
        _read_rows(path, targets, self.pointer["sha256"][BASIS_FILE], self.fix)  # type: ignore[index]
        confirmed = payload["confirmed"]
        return {"filled": f, "r": r, "T": payload["T"].numpy().copy(), "b": payload["b"].numpy().copy(),
                "num_products": int(payload["num_products"]), "num_restarts": int(payload["num_restarts"]),
                "num_multiplicity_checks": int(payload["num_multiplicity_checks"]),
                "norm_estimate": float(payload["norm_estimate"]), "draws": int(payload["draws"]),
                "confirmed": None if confirmed is None else confirmed.numpy().copy(),
                "checking": bool(payload["checking"])}

    # -------------------------------------------------------------- results
    def save_result(self, op: SymmetricOperator, fields: dict[str, Any], vectors: list[list[torch.Tensor]]) -> None:
        """Write the finished result (writer only) and point at it; the saved states are deleted."""
        if not self.is_writer:
            return
        target = self.folder / RESULT_DIR
        if target.exists():
            shutil.rmtree(target)
        rows = [x[b].reshape(-1) for b in range(len(op.shapes)) for x in vectors]
        with _io.atomic_path(target) as tmp:
            tmp.mkdir()
            vectors_sha = _write_rows(tmp / VECTORS_FILE, rows)
            payload = {"format": FORMAT_VERSION, "layout": _layout(op), "k": len(vectors),
                       **{key: torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value
                          for key, value in fields.items()}}
            torch.save(payload, tmp / RESULT_FILE)
            result_sha = _io.file_sha256(tmp / RESULT_FILE)
        self._commit({"format": FORMAT_VERSION, "finished": True, "folder": RESULT_DIR,
                      "sha256": {RESULT_FILE: result_sha, VECTORS_FILE: vectors_sha},
                      "num_products": int(fields["num_products"]), "num_restarts": int(fields["num_restarts"])})

    def load_result(self, op: SymmetricOperator) -> tuple[dict[str, Any], list[list[torch.Tensor]]]:
        """The finished result's fields and its eigenvectors, laid out like :func:`eigsh` returns them."""
        payload = self._payload(RESULT_FILE)
        self._check_layout(op, payload)
        k = int(payload["k"])
        per_block = [torch.empty((k, math.prod(s)), dtype=d, device=dev)
                     for s, d, dev in zip(op.shapes, op.dtypes, op.devices, strict=True)]
        path = self.folder / RESULT_DIR / VECTORS_FILE
        _read_rows(path, [out[i] for out in per_block for i in range(k)], self.pointer["sha256"][VECTORS_FILE],  # type: ignore[index]
                   self.fix)
        vectors = [[out[i].view(shape) for out, shape in zip(per_block, op.shapes, strict=True)] for i in range(k)]
        fields = {key: value.numpy().copy() if isinstance(value, torch.Tensor) else value
                  for key, value in payload.items() if key not in ("format", "layout", "k")}
        return fields, vectors


def check_same_on_all_ranks(op: SymmetricOperator, store: EigshStore) -> None:
    """Under torch.distributed, refuse to go on unless every rank starts from the same saved point (one all-reduce).

    Raises
    ------
    EigshCheckpointError
        If the ranks read different pointers (the folder is not on a file system every rank sees).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    pointer = store.pointer or {}
    digest = "".join(sorted((pointer.get("sha256") or {}).values()))
    token = int(hashlib.sha256(digest.encode()).hexdigest()[:12], 16) if digest else 0
    mine = [int(bool(pointer)), int(bool(pointer.get("finished"))), int(pointer.get("num_products", 0)), token]
    if not same_on_all_ranks(mine, op.devices[0]):
        raise EigshCheckpointError(
            f"the ranks would start from different points (rank {dist.get_rank()}: "
            f"{pointer.get('folder', 'a new run')}): the checkpoint folder {store.folder} must be on a file system "
            "every rank sees")


def wait_for_writer() -> None:
    """Under torch.distributed, a barrier: the writer's last files are on disk before any rank goes on.

    Without it a reader that returns from :func:`~hess_utils.algorithms.eigsh.eigsh` first could open the same
    folder again while the writer still saves the result, and see the previous pointer.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
