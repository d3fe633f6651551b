"""The state store of checkpointed SLQ runs: ``hess_utils.slq(..., checkpoint_dir=run_dir)``.

:func:`hess_utils.algorithms.slq.slq` runs the Lanczos loop; given a ``checkpoint_dir`` it hands every step to
an :class:`SLQStore`, which keeps the run folder. Every ``checkpoint_every`` Lanczos iterations, and at the end
of every probe (or group of probes advancing together), the store saves what the next iteration needs: the
finished probes' results and, for each probe in flight, its alphas, betas, its last two vectors and its kept
basis (``reorth="full"``, ``"offload"`` or ``"partial"``). Start vectors are drawn from seeded CPU generators
(:func:`~hess_utils.algorithms.probes.probe_seed`), never from a global random state, so there is no RNG state
to save. Re-running the same call resumes from the checkpoint and computes exactly the same floating-point
operations as an uninterrupted run, so on a deterministic operator (CPU) the alphas and betas are
bit-identical.

Files of the run folder (see also :mod:`hess_utils.runs` for the result tables)
----------------------------------------------------------------------------------
``config.json``
    Everything that defines the result (:func:`slq_config`). Written when the run starts.
``checkpoint.pt``
    ``torch.save`` of plain dicts, lists, numbers and CPU tensors (loaded with ``weights_only=True``): the
    finished probes' :class:`~hess_utils.algorithms.lanczos.LanczosResult` fields, and the
    :class:`~hess_utils.algorithms.lanczos.LanczosState` of the probe in flight under ``"state"`` (its last two
    vectors only without a basis: with one they are its last two rows). When several probes advance together
    (``probes_at_once > 1``), ``"state"`` is None and ``"lockstep"`` lists one entry per probe of the group, in
    probe order: a state as above, or ``{"result": ...}`` for a probe of the group that already broke down.
``basis/probeNNNNNN-rowsAAAAAA-BBBBBB.pt``
    The basis rows ``A..B-1`` of probe ``N`` in flight, one file per checkpoint holding only the rows added
    since the previous one, so a run of ``k`` iterations writes its basis once, not ``k / checkpoint_every``
    times. Listed with their sha256 in ``checkpoint.pt``; deleted once their probe is finished.
``checkpoint.json``
    The sha256 of ``checkpoint.pt`` and where the run stands (probe, iteration, products).

Every file is written to a temporary name and renamed (:func:`hess_utils._io.atomic_path`), so a kill at any
moment leaves either the old or the new version. The sidecar is renamed into place just *before* the new
checkpoint and accepts both the new digest and the one it replaces, so a kill between the two renames leaves
a valid pair. A checkpoint whose digest matches neither (truncated, bit-flipped, or edited) is refused with
:class:`CheckpointError`, never silently restarted.

Rules on a re-run
-----------------
* No ``config.json``: a new run (a folder holding other results but no ``config.json`` is refused).
* ``config.json`` differs from this call's configuration: :class:`ValueError` naming every differing key
  with its saved and new value.
* ``ritz.csv`` present: the run is finished; its result is loaded from the checkpoint and returned without
  computing anything.
* ``checkpoint.pt`` present: resumed (after checking its digest). The probes in flight continue as they were
  started (together, or one at a time); the probes after them follow this call's ``probes_at_once``.

``probes_at_once`` is not part of the configuration: advancing probes together changes their products at
rounding level only (a batched product is not bit-identical to single ones), like resuming on another number
of ranks.

Distributed runs
----------------
Under ``torch.distributed`` every rank runs the same iterations on the same vectors (the data-parallel and
FSDP operators return the same ``H v`` on every rank), so every rank reads the checkpoint to resume, and only
the writer (rank 0 by default) writes files. The run folder must be on a file system every rank sees; the
ranks check with one all-reduce that they resume from the same checkpoint. Resuming with another number of
ranks is allowed: the products then differ from an uninterrupted run at rounding level only.

The store imports :mod:`hess_utils.algorithms.slq` (for :class:`SLQResult`); the loop imports the store only
when a ``checkpoint_dir`` is given, so neither import is circular.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hess_utils import _io, runs
from hess_utils.algorithms.lanczos import LanczosResult, LanczosState, OmegaEstimates, rank_group_of
from hess_utils.algorithms.probes import check_count, check_seed
from hess_utils.algorithms.slq import SLQResult, stack_runs
from hess_utils.distributed import same_on_all_ranks
from hess_utils.operators.base import SymmetricOperator

#: A probe of the group in flight: its Lanczos state, or its result once it broke down before the others.
Slot = LanczosState | LanczosResult
FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
SIDECAR_FILE = "checkpoint.json"
BASIS_DIR = "basis"
_OWN_FILES = (CHECKPOINT_FILE, SIDECAR_FILE, runs.CONFIG_FILE, runs.RITZ_FILE, runs.TRIDIAGONAL_FILE,
              runs.PROBES_FILE, runs.DENSITY_FILE, runs.RUN_FILE)
_RESULT_FIELDS = ("alphas", "betas", "ritz_values", "ritz_weights", "ghost_mask", "residual_estimates")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: missing sidecar, digest mismatch, unreadable or inconsistent."""


# ---------------------------------------------------------------------------------------------- helpers
def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _default_writer() -> bool:
    from hess_utils.distributed import is_main_process

    return is_main_process()


def _fix_hint(run_dir: Path) -> str:
    return (f"use another run folder (--out), or delete {run_dir} to start over (a run started before SLQ's "
            "default became reorth='partial' resumes with reorth='full' / --reorth full)")


def operator_fingerprint(op: SymmetricOperator) -> dict[str, Any]:
    """What identifies an operator's vector space: ``dim``, ``dtype`` and a sha256 of its blocks' names and shapes."""
    names = getattr(op, "param_names", None) or [f"block{i}" for i in range(len(op.shapes))]
    text = "\n".join(f"{n}:{tuple(int(x) for x in s)}" for n, s in zip(names, op.shapes, strict=True))
    dtypes = sorted({str(d).replace("torch.", "") for d in op.dtypes})
    return {"dim": op.dim, "dtype": ",".join(dtypes), "blocks_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "num_blocks": len(op.shapes)}


def slq_config(
    op: SymmetricOperator,
    num_iters: int,
    num_probes: int,
    reorth: str,
    seed: int,
    probe: str,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration that defines an SLQ run's result, as ``config.json`` stores it.

    ``kind``, ``format``, ``num_iters``, ``num_probes``, ``reorth``, ``seed``, ``probe`` and the operator's
    fingerprint (:func:`operator_fingerprint`: ``dim``, ``dtype``, ``blocks_sha256``, ``num_blocks``), plus
    the caller's ``config`` (model, data, method, ...) at the top level.

    Raises
    ------
    ValueError
        If the caller's ``config`` gives one of those keys another value.
    """
    core = {"kind": "slq", "format": FORMAT_VERSION, "num_iters": int(num_iters), "num_probes": int(num_probes),
            "reorth": reorth, "seed": int(seed), "probe": probe, **operator_fingerprint(op)}
    extra = runs.normalise_config(dict(config or {}))
    clashes = [k for k in extra if k in core and extra[k] != runs.normalise_config({k: core[k]})[k]]
    if clashes:
        details = ", ".join(f"{k}={extra[k]!r} vs {core[k]!r}" for k in clashes)
        raise ValueError(f"config gives run parameters other values than the run itself ({details})")
    return runs.normalise_config({**extra, **core})


def _clean_stale_temporaries(run_dir: Path) -> None:
    """Remove temporary folders left by a process killed in the middle of an atomic write."""
    for folder in (run_dir, run_dir / BASIS_DIR):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)


def check_run_folder(
    run_dir: str | Path,
    config: dict[str, Any],
    finished_marker: str,
    is_writer: bool,
) -> bool:
    """Compare ``run_dir``'s ``config.json`` with ``config``; write it if absent. True if the run is finished.

    Parameters
    ----------
    run_dir
        The run folder (created if needed).
    config
        The configuration of the run about to start.
    finished_marker
        The file whose presence means the run is finished (``"ritz.csv"`` for spectra).
    is_writer
        Whether this process writes files (rank 0).

    Raises
    ------
    ValueError
        If the saved configuration differs (naming every differing key, its saved and new value, and the fix),
        or the folder holds results but no ``config.json``.
    """
    run_dir = Path(run_dir)
    saved = runs.load_config(run_dir)
    if saved is None:
        if not is_writer:
            # The writer checks for stray files and writes config.json; a reader looking now could see the
            # writer's fresh config.json after finding none, and refuse a folder that is fine.
            return False
        present = [name for name in _OWN_FILES if (run_dir / name).exists()] + (
            [finished_marker] if (run_dir / finished_marker).exists() else [])
        if present:
            raise ValueError(f"{run_dir} holds {', '.join(sorted(set(present)))} but no config.json, so it cannot "
                             f"be checked against this run; {_fix_hint(run_dir)}")
        if is_writer:
            run_dir.mkdir(parents=True, exist_ok=True)
            runs.save_config(run_dir, config)
        return False
    mismatches = runs.config_mismatches(saved, config)
    if mismatches:
        details = "; ".join(f"{key}: {old!r} (saved) != {new!r} (now)" for key, old, new in mismatches)
        raise ValueError(f"run folder {run_dir} holds a different run: {details}. Resuming would mix two runs; "
                         f"{_fix_hint(run_dir)}")
    return (run_dir / finished_marker).exists()


# ---------------------------------------------------------------------------------------------- (de)serialising
def _result_to_dict(result: LanczosResult) -> dict[str, Any]:
    out: dict[str, Any] = {name: torch.from_numpy(getattr(result, name).copy()) for name in _RESULT_FIELDS}
    out.update(orthogonality_loss=float(result.orthogonality_loss), breakdown=bool(result.breakdown),
               num_iters=int(result.num_iters), last_beta=float(result.last_beta), reorth=result.reorth,
               seed=result.seed, probe=result.probe, num_reorth_steps=int(result.num_reorth_steps),
               reorth_steps=None if result.reorth_steps is None else [int(i) for i in result.reorth_steps],
               max_omega=None if result.max_omega is None else float(result.max_omega),
               check_steps=None if result.check_steps is None else [int(i) for i in result.check_steps],
               omega_rounding=None if result.omega_rounding is None else float(result.omega_rounding),
               recalibration_steps=None if result.recalibration_steps is None
               else [int(i) for i in result.recalibration_steps])
    return out


def _result_from_dict(d: dict[str, Any]) -> LanczosResult:
    arrays = {name: d[name].numpy().copy() for name in _RESULT_FIELDS}
    return LanczosResult(**arrays, orthogonality_loss=d["orthogonality_loss"], breakdown=d["breakdown"],
                         num_iters=d["num_iters"], last_beta=d["last_beta"], reorth=d["reorth"], seed=d["seed"],
                         probe=d["probe"], num_reorth_steps=d.get("num_reorth_steps", 0),
                         reorth_steps=None if d.get("reorth_steps") is None else tuple(d["reorth_steps"]),
                         max_omega=d.get("max_omega"),
                         check_steps=None if d.get("check_steps") is None else tuple(d["check_steps"]),
                         omega_rounding=d.get("omega_rounding"),
                         recalibration_steps=None if d.get("recalibration_steps") is None
                         else tuple(d["recalibration_steps"]))


def _state_scalars(state: LanczosState) -> dict[str, Any]:
    return {"num_iters": state.num_iters, "reorth": state.reorth, "seed": state.seed, "probe": state.probe,
            "tol": state.tol, "rtol": state.rtol, "unit_roundoff": state.unit_roundoff,
            "alphas": [float(a) for a in state.alphas], "betas": [float(b) for b in state.betas],
            "iteration": state.iteration, "breakdown": state.breakdown,
            # reorth="partial": its estimates, which depend on measurements and cannot be rebuilt exactly.
            "omega": state.omega.to_dict() if state.omega is not None else None}


def _to_cpu(vector: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    return None if vector is None else [t.detach().to("cpu").clone() for t in vector]


def _on_operator(op: SymmetricOperator, vector: list[torch.Tensor]) -> list[torch.Tensor]:
    """Blocks moved to the operator's devices, checked against its shapes and dtypes (never cast)."""
    if len(vector) != len(op.shapes):
        raise CheckpointError(f"the checkpoint's vectors have {len(vector)} blocks, the operator {len(op.shapes)}")
    out = []
    for t, shape, dtype, device in zip(vector, op.shapes, op.dtypes, op.devices, strict=True):
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise CheckpointError(f"a checkpoint vector block is {tuple(t.shape)} {t.dtype}, the operator's "
                                  f"{tuple(shape)} {dtype}")
        out.append(t.to(device).clone())
    return out


# ---------------------------------------------------------------------------------------------- the store
class SLQStore:
    """The run folder of one checkpointed :func:`~hess_utils.algorithms.slq.slq` call (module docstring).

    Built by :meth:`open`; the loop then tells it what happens: :meth:`begin` (a group of probes starts),
    :meth:`stepped` (one iteration of the group done; saves when one is due), :meth:`probes_done` (the group
    finished; saves) and :meth:`finish` (the result files). It never runs a product itself.

    Attributes
    ----------
    finished : list of LanczosResult
        The finished probes, in probe order.
    group : list of LanczosState or LanczosResult
        The probes in flight (probe ``len(finished) + i`` at index ``i``); a result stands for a probe of a
        lockstep group that broke down before the others. The loop updates this list in place.
    result : SLQResult or None
        Set by :meth:`open` when the folder already holds this finished run (nothing is left to compute).
    """

    def __init__(self, op: SymmetricOperator | None, run_dir: Path, config: dict[str, Any], is_writer: bool,
                 checkpoint_every: int = 0) -> None:
        self.op = op
        self.run_dir = run_dir
        self.config = config
        self.is_writer = is_writer
        self.checkpoint_every = checkpoint_every
        self.finished: list[LanczosResult] = []
        self.group: list[Slot] = []
        self.result: SLQResult | None = None
        self.chunks: dict[int, list[dict[str, Any]]] = {}  # basis files of each probe in flight
        self.rows_saved: dict[int, int] = {}
        self.sha: str | None = None  # digest of the checkpoint.pt on disk
        self.products = 0
        self.elapsed = 0.0
        self.sessions: list[dict[str, Any]] = []
        self.session_start = time.perf_counter()
        self.session = {"started": _now(), "resumed_at": None, "products": 0, "seconds": 0.0}

    # -------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        op: SymmetricOperator,
        run_dir: str | Path,
        *,
        num_iters: int,
        num_probes: int,
        reorth: str,
        seed: int,
        probe: str,
        checkpoint_every: int = 10,
        config: dict[str, Any] | None = None,
        is_writer: bool | None = None,
    ) -> SLQStore:
        """Check ``run_dir`` against this run and load where it stands.

        A new folder gets its ``config.json``; a finished one sets :attr:`result` (loaded, nothing to
        compute); an interrupted one is restored from its verified checkpoint (every rank reads it).

        Raises
        ------
        ValueError
            For a run folder holding another run (every differing key named) or invalid arguments.
        CheckpointError
            For a checkpoint that fails verification (truncated, corrupted, unreadable).
        """
        num_iters = check_count("num_iters", num_iters)
        num_probes = check_count("num_probes", num_probes)
        seed = check_seed(seed)
        checkpoint_every = check_count("checkpoint_every", checkpoint_every, minimum=0)
        is_writer = _default_writer() if is_writer is None else bool(is_writer)
        run_dir = Path(run_dir)
        full_config = slq_config(op, num_iters, num_probes, reorth, seed, probe, config)
        if is_writer:
            _clean_stale_temporaries(run_dir)
        store = cls(op, run_dir, full_config, is_writer, checkpoint_every)
        if check_run_folder(run_dir, full_config, runs.RITZ_FILE, is_writer):
            store.result = load_slq_result(run_dir)
            if is_writer:
                print(f"{run_dir} holds this finished run: loaded its result, nothing recomputed", flush=True)
            return store
        resuming = store.checkpoint_path.exists()
        if resuming:
            store.load()
        _check_same_on_all_ranks(op, store, resuming)
        if resuming and is_writer:
            probe_index, iteration = store.position()
            print(f"resuming {run_dir} at probe {probe_index}, iteration {iteration} ({store.products} products "
                  "done)", flush=True)
        return store

    # -------------------------------------------------------------- paths
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    @property
    def sidecar_path(self) -> Path:
        return self.run_dir / SIDECAR_FILE

    @property
    def basis_dir(self) -> Path:
        return self.run_dir / BASIS_DIR

    # -------------------------------------------------------------- what the loop reports
    def begin(self, group: list[Slot]) -> None:
        """A new group of probes starts (``group`` is kept, not copied: the loop updates it in place)."""
        self.group = group
        self.chunks, self.rows_saved = {}, {}

    def stepped(self, products: int) -> None:
        """One iteration of every live probe of the group is done (``products`` vectors); save if one is due.

        Due when ``checkpoint_every > 0``, some probe of the group is still running, and its iteration count (the
        same for every running probe of a group) is a multiple of ``checkpoint_every``.
        """
        self.products += products
        self.session["products"] += products
        running = [s for s in self.group if isinstance(s, LanczosState) and not s.done]
        if self.checkpoint_every and running and running[0].iteration % self.checkpoint_every == 0:
            self.save()

    def probes_done(self, results: Sequence[LanczosResult]) -> None:
        """The group finished with ``results`` (in probe order); save (small: no basis)."""
        self.finished.extend(results)
        self.group = []
        self.chunks, self.rows_saved = {}, {}
        self.save()

    def finish(self, result: SLQResult, record: dict[str, Any] | Callable[[], dict[str, Any]] | None) -> None:
        """The result tables and ``run.json`` (writer only); a callable ``record`` is called on every rank."""
        extra = record() if callable(record) else dict(record or {})
        if self.is_writer:
            self._write_results(result, extra)

    def position(self) -> tuple[int, int]:
        """(first probe in flight or next to start, iterations done by the group in flight)."""
        iterations = [s.iteration if isinstance(s, LanczosState) else s.num_iters for s in self.group]
        return len(self.finished), max(iterations, default=0)

    # -------------------------------------------------------------- saving
    def _session_record(self) -> dict[str, Any]:
        now = time.perf_counter() - self.session_start
        return {**self.session, "seconds": now}

    def elapsed_total(self) -> float:
        return self.elapsed + (time.perf_counter() - self.session_start)

    def _save_new_rows(self, state: LanczosState, probe_index: int) -> list[dict[str, Any]]:
        """Write the basis rows of probe ``probe_index`` added since its last checkpoint to their own file."""
        chunks = self.chunks.setdefault(probe_index, [])
        filled = state.iteration + (0 if state.breakdown else 1)
        start, stop = self.rows_saved.get(probe_index, 0), filled
        if stop <= start:
            return chunks
        name = f"probe{probe_index:06d}-rows{start:06d}-{stop:06d}.pt"
        target = self.basis_dir / name
        with _io.atomic_path(target) as tmp:
            torch.save([rows[start:stop].detach().to("cpu").clone() for rows in state.basis], tmp)
        chunks.append({"file": name, "start": start, "stop": stop, "sha256": file_sha256(target)})
        self.rows_saved[probe_index] = stop
        return chunks

    def _state_dict(self, state: LanczosState, probe_index: int) -> dict[str, Any]:
        state_dict = _state_scalars(state)
        if state.basis is not None:
            chunks = self._save_new_rows(state, probe_index)
            state_dict.update(q=None, q_prev=None, basis_chunks=list(chunks))
        else:
            state_dict.update(q=_to_cpu(state.q), q_prev=_to_cpu(state.q_prev), basis_chunks=None)
        return state_dict

    def save(self) -> None:
        """Write the checkpoint (writer only): new basis rows, then sidecar + checkpoint (see module docstring)."""
        if not self.is_writer:
            return
        probe_index = len(self.finished)
        state_dict, lockstep = None, None
        if len(self.group) == 1 and isinstance(self.group[0], LanczosState):
            state_dict = self._state_dict(self.group[0], probe_index)
        elif self.group:
            lockstep = [self._state_dict(s, probe_index + i) if isinstance(s, LanczosState)
                        else {"result": _result_to_dict(s)} for i, s in enumerate(self.group)]
            for i, s in enumerate(self.group):  # a broken-down probe's rows are no longer needed
                if not isinstance(s, LanczosState):
                    self.chunks.pop(probe_index + i, None)
        payload = {
            "format": FORMAT_VERSION,
            "config": self.config,
            "probe_index": probe_index,
            "finished": [_result_to_dict(r) for r in self.finished],
            "state": state_dict,
            "products": self.products,
            "elapsed_s": self.elapsed_total(),
            "sessions": [*self.sessions, self._session_record()],
        }
        if lockstep is not None:
            payload["lockstep"] = lockstep
        _, iteration = self.position()
        with _io.atomic_path(self.checkpoint_path) as tmp:
            torch.save(payload, tmp)
            new_sha = file_sha256(tmp)
            accepted = [new_sha] + ([self.sha] if self.sha and self.sha != new_sha else [])
            _io.write_json(self.sidecar_path, {
                "sha256": new_sha, "accepted_sha256": accepted, "bytes": tmp.stat().st_size,
                "probe_index": probe_index, "iteration": iteration,
                "products": self.products, "saved": _now()})
        self.sha = new_sha
        self._drop_unlisted_chunks()

    def _drop_unlisted_chunks(self) -> None:
        """Delete basis files the checkpoint on disk no longer lists (finished probes, orphans of a kill)."""
        if not self.basis_dir.is_dir():
            return
        listed = {c["file"] for chunks in self.chunks.values() for c in chunks}
        for path in self.basis_dir.glob("probe*.pt"):
            if path.name not in listed:
                path.unlink(missing_ok=True)

    # -------------------------------------------------------------- loading
    def _verified_payload(self) -> dict[str, Any]:
        path, sidecar_path = self.checkpoint_path, self.sidecar_path
        fix = f"delete {self.run_dir} (or just {path.name}, {sidecar_path.name} and {BASIS_DIR}/) to start over"
        try:
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
            accepted = list(sidecar["accepted_sha256"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"cannot verify {path}: its sidecar {sidecar_path.name} is missing or unreadable "
                                  f"({type(err).__name__}: {err}); {fix}") from err
        digest = file_sha256(path)
        if digest not in accepted:
            raise CheckpointError(f"{path} is corrupt or truncated: its sha256 {digest[:16]}... matches none recorded "
                                  f"in {sidecar_path.name} ({', '.join(a[:16] + '...' for a in accepted)}); {fix}")
        payload = _io.load_torch_payload(path, CheckpointError, fix, "SLQ checkpoint", FORMAT_VERSION)
        mismatches = runs.config_mismatches(payload.get("config", {}), self.config)
        if mismatches:
            keys = ", ".join(k for k, _, _ in mismatches)
            raise CheckpointError(f"{path} was written by another run than config.json describes ({keys}); {fix}")
        self.sha = digest
        return payload

    def _load_basis(self, chunks: list[dict[str, Any]], state: dict[str, Any]) -> list[torch.Tensor]:
        op = self.op
        rows = state["num_iters"] + 1
        offload = state["reorth"] == "offload"
        basis = [torch.zeros((rows, math.prod(s)), dtype=d, device="cpu" if offload else dev)
                 for s, d, dev in zip(op.shapes, op.dtypes, op.devices, strict=True)]
        expected = 0
        for chunk in chunks:
            path = self.basis_dir / chunk["file"]
            if chunk["start"] != expected:
                raise CheckpointError(f"the checkpoint's basis files are not contiguous at row {expected}; delete "
                                      f"{self.run_dir} to start over")
            if not path.exists() or file_sha256(path) != chunk["sha256"]:
                raise CheckpointError(f"basis file {path} is missing, corrupt or truncated (sha256 differs from the "
                                      f"one in {CHECKPOINT_FILE}); delete {self.run_dir} to start over")
            try:
                blocks = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                raise CheckpointError(f"basis file {path} is unreadable ({err}); delete {self.run_dir}") from err
            for target, block in zip(basis, blocks, strict=True):
                target[chunk["start"] : chunk["stop"]].copy_(block)
            expected = chunk["stop"]
        return basis

    def _load_state(self, s: dict[str, Any], probe_index: int) -> LanczosState:
        op = self.op
        basis = None
        if s["basis_chunks"] is not None:
            chunks = list(s["basis_chunks"])
            self.chunks[probe_index] = chunks
            basis = self._load_basis(chunks, s)
            rows_saved = chunks[-1]["stop"] if chunks else 0
            self.rows_saved[probe_index] = rows_saved
            j = s["iteration"]
            if rows_saved != j + 1:
                raise CheckpointError(f"{self.checkpoint_path}: basis rows {rows_saved} of probe {probe_index} do not "
                                      f"match iteration {j}")
            # q_{j+1} and q_j are rows j and j-1 of the basis, copied bit for bit when they were stored.
            q = [rows[j].reshape(shape) for rows, shape in zip(basis, op.shapes, strict=True)]
            q_prev = [rows[j - 1].reshape(shape) for rows, shape in zip(basis, op.shapes, strict=True)] if j else None
            q = _on_operator(op, q)
            q_prev = _on_operator(op, q_prev) if q_prev is not None else None
        else:
            q = _on_operator(op, s["q"])
            q_prev = _on_operator(op, s["q_prev"]) if s["q_prev"] is not None else None
        return LanczosState(
            num_iters=s["num_iters"], reorth=s["reorth"], seed=s["seed"], probe=s["probe"], tol=s["tol"],
            rtol=s["rtol"], unit_roundoff=s["unit_roundoff"], q=q, q_prev=q_prev, alphas=list(s["alphas"]),
            betas=list(s["betas"]), iteration=s["iteration"], basis=basis, breakdown=s["breakdown"],
            omega=OmegaEstimates.from_dict(s["omega"]) if s.get("omega") is not None else None,
            rank_group=rank_group_of(op) if s["reorth"] == "partial" else None)

    def load(self) -> None:
        """Restore finished probes and the group in flight from ``checkpoint.pt`` (every rank reads it)."""
        payload = self._verified_payload()
        self.finished = [_result_from_dict(d) for d in payload["finished"]]
        if len(self.finished) != payload["probe_index"]:
            raise CheckpointError(f"{self.checkpoint_path} is inconsistent (probe index vs finished probes)")
        self.products = int(payload["products"])
        self.elapsed = float(payload["elapsed_s"])
        self.sessions = list(payload["sessions"])
        self.group = [
            _result_from_dict(s["result"]) if "result" in s else self._load_state(s, len(self.finished) + i)
            for i, s in enumerate(_in_flight(payload))
        ]
        if self.group:
            self.session["resumed_at"] = {"probe": len(self.finished), "iteration": self.position()[1]}

    # -------------------------------------------------------------- results
    def _write_results(self, result: SLQResult, extra: dict[str, Any]) -> None:
        """The result tables and ``run.json``; ``ritz.csv`` last, since its presence marks a finished run."""
        density = runs.save_slq_tables(self.run_dir, result)
        sessions = [*self.sessions, self._session_record()]
        compute_s = self.elapsed_total()
        fields = dict(
            kind="slq",
            config=self.config,
            dim=result.dim,
            num_iters=result.num_iters,
            num_probes=result.num_probes,
            reorth=result.reorth,
            seed=result.seed,
            probe=result.probe,
            iterations=[int(k) for k in result.iterations],
            largest_ritz_value=float(max(r.ritz_values.max() for r in result.runs)),
            smallest_ritz_value=float(min(r.ritz_values.min() for r in result.runs)),
            density=density,
            orthogonality=runs.orthogonality_record(result),
            timings={**dict(extra.get("timings", {})), "slq_compute_s": compute_s, "matvecs": self.products,
                     "s_per_matvec": compute_s / self.products if self.products else None, "sessions": sessions},
            files={"ritz": runs.RITZ_FILE, "tridiagonal": runs.TRIDIAGONAL_FILE, "probes": runs.PROBES_FILE,
                   "density": density.get("file"), "config": runs.CONFIG_FILE, "checkpoint": CHECKPOINT_FILE},
        )
        record = runs.provenance(**{**extra, **fields})
        runs.save_run_json(self.run_dir, record)
        runs.save_ritz_table(self.run_dir, runs.ritz_frame(result))


def _in_flight(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved entries of the probes in flight: ``"lockstep"`` for a group, else the one ``"state"``."""
    lockstep = payload.get("lockstep")
    if lockstep is not None:
        return list(lockstep)
    return [] if payload["state"] is None else [payload["state"]]


def _check_same_on_all_ranks(op: SymmetricOperator, store: SLQStore, resuming: bool) -> None:
    """Under torch.distributed, refuse to go on unless every rank starts from the same point (one all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    probe_index, iteration = store.position()
    sha = int(store.sha[:12], 16) if (resuming and store.sha) else 0
    if not same_on_all_ranks([int(resuming), probe_index, iteration, sha], op.devices[0]):
        raise CheckpointError(
            f"the ranks would start from different points (rank {dist.get_rank()}: resuming={bool(resuming)}, probe "
            f"{probe_index}, iteration {iteration}): the run folder {store.run_dir} must be on a file system every "
            "rank sees")


# ---------------------------------------------------------------------------------------------- public API
def load_slq_result(run_dir: str | Path) -> SLQResult:
    """The :class:`SLQResult` of a finished run folder, from its verified checkpoint (no operator needed).

    Raises
    ------
    FileNotFoundError
        If the folder holds no finished run.
    CheckpointError
        If its checkpoint fails verification.
    """
    run_dir = Path(run_dir)
    config = runs.load_config(run_dir)
    if config is None or not (run_dir / runs.RITZ_FILE).exists() or not (run_dir / CHECKPOINT_FILE).exists():
        raise FileNotFoundError(f"{run_dir} holds no finished SLQ run (config.json, checkpoint.pt and ritz.csv)")
    store = SLQStore(op=None, run_dir=run_dir, config=config, is_writer=False)
    payload = store._verified_payload()
    finished = [_result_from_dict(d) for d in payload["finished"]]
    if len(finished) != config["num_probes"] or _in_flight(payload):
        raise CheckpointError(f"{run_dir}: ritz.csv is present but the checkpoint holds an unfinished run")
    return stack_runs(finished, config["num_iters"], config["dim"], config["seed"], config["probe"], config["reorth"])
