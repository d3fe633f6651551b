"""Stochastic Lanczos quadrature (SLQ): the spectral measure of ``H`` from a few Lanczos runs.

For a unit start vector :math:`q = z / \\lVert z \\rVert` the Lanczos Ritz values :math:`\\theta_j` and
weights :math:`w_j = s_{1j}^2` form the Gauss quadrature rule of the measure
:math:`\\sum_i (q^\\top u_i)^2 \\delta(x - \\lambda_i)`. For a normalised Rademacher or Gaussian
:math:`z`, :math:`\\mathbb{E}[(q^\\top u_i)^2] = 1/n`, so averaging over :math:`P` independent probes,

.. math:: \\hat\\phi(x) = \\frac{1}{P} \\sum_{p=1}^{P} \\sum_{j=1}^{k} w_{pj}\\, \\delta(x - \\theta_{pj}),

estimates the eigenvalue distribution :math:`\\phi(x) = \\frac{1}{n} \\sum_i \\delta(x - \\lambda_i)`
(a probability measure). Smooth it with :mod:`hess_utils.algorithms.density`.

Probe ``p`` is started from the seed :func:`~hess_utils.algorithms.probes.probe_seed` ``(seed, p)``
``= seed * 1_000_003 + p``.

:func:`slq` is the one SLQ driver: with ``checkpoint_dir`` the same loop saves its state in a run folder
and resumes from it (:class:`hess_utils.checkpoint.SLQStore` keeps the files; the loop stays here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hess_utils import _threads
from hess_utils._memory import holds_freed_memory
from hess_utils.algorithms._frozen import freeze_arrays, short_repr
from hess_utils.algorithms._products import owned_matmat, owned_matvec
from hess_utils.algorithms.lanczos import (
    LanczosResult,
    LanczosState,
    _check_config,
    lanczos_advance,
    lanczos_finish,
    lanczos_init,
    lanczos_step,
)
from hess_utils.algorithms.probes import check_count, check_seed, probe_seed
from hess_utils.distributed import min_on_all_ranks
from hess_utils.operators.base import SymmetricOperator
from hess_utils.progress import progress_bar, set_postfix
from hess_utils.vectors import free_memory

if TYPE_CHECKING:  # pragma: no cover
    from hess_utils.checkpoint import SLQStore


@dataclass(frozen=True)
class SLQResult:
    """Ritz values and weights of ``P`` independent Lanczos runs (float64 arrays).

    When a run breaks down early (an invariant subspace, ``k_p < k``), its row is padded: NaN values,
    alphas and betas, zero weights, False ghost flags. ``iterations`` gives each row's true length.

    Attributes
    ----------
    ritz_values : np.ndarray, shape (P, k)
        Ritz values of each probe, ascending within a row (then NaN padding).
    ritz_weights : np.ndarray, shape (P, k)
        Gauss quadrature weights; each row sums to 1.
    ghost_masks : np.ndarray of bool, shape (P, k)
        Cullum-Willoughby ghost flags of each run.
    residual_estimates : np.ndarray, shape (P, k)
        Ritz residual bounds :math:`|\\beta_k s_{ki}|` (NaN padding).
    alphas : np.ndarray, shape (P, k)
        Diagonals of the Lanczos matrices.
    betas : np.ndarray, shape (P, k - 1)
        Off-diagonals of the Lanczos matrices.
    iterations : np.ndarray of int, shape (P,)
        Iterations actually run by each probe (``< num_iters`` after a breakdown).
    num_iters : int
        Iterations requested per probe.
    num_probes : int
        ``P``.
    dim : int
        Dimension ``n`` of the operator.
    seed : int
        Seed of the run (probe ``p`` uses ``seed * 1_000_003 + p``).
    probe : str
        Distribution of the probes.
    reorth : str
        Re-orthogonalisation mode of every run.
    runs : tuple of LanczosResult
        The individual runs.
    """

    ritz_values: np.ndarray
    ritz_weights: np.ndarray
    ghost_masks: np.ndarray
    residual_estimates: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    iterations: np.ndarray
    num_iters: int
    num_probes: int
    dim: int
    seed: int
    probe: str
    reorth: str
    runs: tuple[LanczosResult, ...]

    __repr__ = short_repr

    def __post_init__(self) -> None:
        freeze_arrays(self)

    def spectral_measure(self) -> tuple[np.ndarray, np.ndarray]:
        """Nodes and weights of :math:`\\hat\\phi` flattened over probes, padding dropped.

        Returns
        -------
        values : np.ndarray, shape (m,)
        weights : np.ndarray, shape (m,)
            ``w_pj / P``; they sum to 1.
        """
        keep = ~np.isnan(self.ritz_values)
        return self.ritz_values[keep], self.ritz_weights[keep] / self.num_probes

    def table(self, probe: int = 0) -> pd.DataFrame:
        """The Ritz table of one probe: columns ``value, weight, ghost, residual``, sorted by value."""
        if not 0 <= probe < self.num_probes:
            raise ValueError(f"probe {probe} out of range; this result has {self.num_probes} probes")
        k = int(self.iterations[probe])
        frame = pd.DataFrame(
            {
                "value": self.ritz_values[probe, :k],
                "weight": self.ritz_weights[probe, :k],
                "ghost": self.ghost_masks[probe, :k],
                "residual": self.residual_estimates[probe, :k],
            }
        )
        return frame.sort_values("value", kind="stable", ignore_index=True)

    def to_frame(self) -> pd.DataFrame:
        """All nodes in long form: columns ``probe, value, weight`` (per-probe weights, padding dropped)."""
        probes = np.repeat(np.arange(self.num_probes), self.ritz_values.shape[1]).reshape(self.ritz_values.shape)
        keep = ~np.isnan(self.ritz_values)
        return pd.DataFrame(
            {"probe": probes[keep], "value": self.ritz_values[keep], "weight": self.ritz_weights[keep]}
        )


def _padded(rows: list[np.ndarray], width: int, fill: float | bool, dtype: type) -> np.ndarray:
    """Stack 1-d arrays of lengths ``<= width`` into ``(len(rows), width)``, padding with ``fill``."""
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : row.size] = row
    return out


def stack_runs(
    runs: list[LanczosResult], num_iters: int, dim: int, seed: int, probe: str, reorth: str
) -> SLQResult:
    """Assemble independent :class:`LanczosResult` runs into an :class:`SLQResult` (padding short runs)."""
    if not runs:
        raise ValueError("no Lanczos runs to stack; use num_probes >= 1")
    k = max(r.num_iters for r in runs)
    return SLQResult(
        ritz_values=_padded([r.ritz_values for r in runs], k, np.nan, np.float64),
        ritz_weights=_padded([r.ritz_weights for r in runs], k, 0.0, np.float64),
        ghost_masks=_padded([r.ghost_mask for r in runs], k, False, bool),
        residual_estimates=_padded([r.residual_estimates for r in runs], k, np.nan, np.float64),
        alphas=_padded([r.alphas for r in runs], k, np.nan, np.float64),
        betas=_padded([r.betas for r in runs], k - 1, np.nan, np.float64),
        iterations=np.array([r.num_iters for r in runs], dtype=np.int64),
        num_iters=num_iters,
        num_probes=len(runs),
        dim=dim,
        seed=seed,
        probe=probe,
        reorth=reorth,
        runs=tuple(runs),
    )


@holds_freed_memory
def slq(
    op: SymmetricOperator,
    num_iters: int,
    num_probes: int,
    reorth: str = "partial",
    seed: int = 0,
    probe: str = "rademacher",
    progress: bool = True,
    probes_at_once: int | str = 1,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    config: dict[str, Any] | None = None,
    is_writer: bool | None = None,
    record: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
) -> SLQResult:
    """Stochastic Lanczos quadrature with ``num_probes`` independent runs of ``num_iters`` iterations.

    With ``checkpoint_dir`` the run lives in a run folder (:mod:`hess_utils.checkpoint`): it is saved every
    ``checkpoint_every`` iterations, re-running the same call resumes it, and a finished folder is read back
    without computing anything. The numbers are the same with or without a folder, and whether or not the run
    was interrupted and resumed: the same floating-point operations run in the same order, so on a
    deterministic operator (CPU) the Ritz values and weights are bit-identical.

    Parameters
    ----------
    op : SymmetricOperator
        The symmetric operator :math:`H`.
    num_iters : int
        Lanczos iterations per probe ``k`` (quadrature nodes per probe).
    num_probes : int
        Number of independent probes ``P``.
    reorth : {"partial", "full", "offload", "none"}
        See :func:`~hess_utils.algorithms.lanczos.lanczos`. The default, ``"partial"``, keeps the basis on the
        operator's device like ``"full"`` and keeps it semi-orthogonal, which gives the Ritz values and weights
        of ``"full"`` to working precision and no ghosts, re-orthogonalising only the steps whose estimated or
        measured loss of orthogonality asks for it (``benchmarks/RESULTS.md``: SLQ time against ``"full"``).
        ``"full"`` re-orthogonalises every step (the reference); ``"offload"`` when the basis does not fit on
        the device; ``"none"`` when it does not fit at all (Cullum-Willoughby flags the ghosts).
    seed : int
        Probe ``p`` starts from ``op.random_vector(probe, seed * 1_000_003 + p)``.
    probe : {"rademacher", "gaussian"}
        Distribution of the start vectors.
    progress : bool
        Show one progress bar over all ``P * k`` products (with a run folder: on the writer only).
    probes_at_once : int or "auto", optional
        How many runs advance together, one step each per round. With an operator that batches products
        (``op.batched_matmat``: an exact Hessian on an accelerator) a round's products are one
        :meth:`~hess_utils.operators.base.SymmetricOperator.matmat` call (one double backward for all), the
        same as one run after the other to rounding, not bit for bit. On a CPU the products come one at a
        time and each run's Lanczos step (its re-orthogonalisation, bound by memory bandwidth) runs in a side
        thread while the next run's product runs, which hides much of the step's cost; the runs are then
        bit-identical to one after the other. Whether that is faster depends on the load of the machine: on an
        idle 2-core CPU the side thread slows the product by more than it hides, on a busy one it gains
        (``benchmarks/RESULTS.md``), hence the default 1 (one run after the other, reusing one basis).
        ``"auto"``: 2 on a CPU operator that does not batch, when both Lanczos bases fit in half the free
        memory, else 1; under torch.distributed the smallest choice of all ranks. Batching on an accelerator
        changes rounding, so it is asked for with an integer. A run folder checkpoints a group of probes advancing
        together as well as a single one; it does not record this choice (it changes rounding at most), and
        a resumed group continues together as it started.
    checkpoint_dir : path, optional
        The run folder (created if needed); None (default): nothing is written.
    checkpoint_every : int
        With a run folder: save every this many Lanczos iterations of a probe (``iteration %
        checkpoint_every == 0``), and at the end of every probe (or group); 0 saves only at the end of
        probes. A save writes the basis rows added since the last one (``reorth != "none"``, about
        ``checkpoint_every * dim`` numbers per probe) and two vectors per probe otherwise.
    config : dict, optional
        With a run folder: the caller's description of the run (model, data, method, engine, ...),
        JSON-serialisable; stored in ``config.json`` with the run parameters
        (:func:`~hess_utils.checkpoint.slq_config`) and compared on a re-run.
    is_writer : bool, optional
        With a run folder: whether this process writes files; default: rank 0 under torch.distributed, else
        True. Every rank computes, and reads the checkpoint to resume.
    record : dict or callable, optional
        With a run folder: extra fields for ``run.json`` (model, data, loss, ...). A callable is called on
        *every* rank once the iterations are done, so it may run collectives (e.g. ``op.loss()`` of a
        data-parallel operator).

    Returns
    -------
    SLQResult

    Raises
    ------
    ValueError
        For invalid arguments, ``config``, ``is_writer`` or ``record`` without ``checkpoint_dir``, or a run
        folder holding another run (every differing key named, with its saved and new value).
    hess_utils.checkpoint.CheckpointError
        For a checkpoint that fails verification (truncated, corrupted, unreadable); nothing is recomputed.
    """
    num_probes = check_count("num_probes", num_probes)
    seed = check_seed(seed)
    group = _group_size(op, num_iters, num_probes, reorth) if probes_at_once == "auto" else probes_at_once
    group = min(check_count("probes_at_once", group), num_probes)
    store = None
    if checkpoint_dir is None:
        given = [name for name, value in (("config", config), ("is_writer", is_writer), ("record", record))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} describe a run folder and are only used with checkpoint_dir=; "
                             "pass checkpoint_dir too, or drop them")
    else:
        # Imported here: the store imports this module (and runs -> density -> slq) at module level.
        from hess_utils.checkpoint import SLQStore

        _check_config(op, num_iters, reorth, None)  # before config.json is written
        store = SLQStore.open(op, checkpoint_dir, num_iters=num_iters, num_probes=num_probes, reorth=reorth,
                              seed=seed, probe=probe, checkpoint_every=checkpoint_every, config=config,
                              is_writer=is_writer)
        if store.result is not None:
            return store.result
    runs: list[LanczosResult] = [] if store is None else list(store.finished)
    initial = 0 if store is None else len(runs) * num_iters + sum(
        s.iteration if isinstance(s, LanczosState) else num_iters for s in store.group)
    spare: list[torch.Tensor] | None = None  # a finished run's basis, reused by the next run in turn
    show = progress and (store is None or store.is_writer)
    with progress_bar(total=num_probes * num_iters, initial=initial, desc="slq", disable=not show,
                      dynamic_ncols=True) as bar:
        while len(runs) < num_probes:
            first = len(runs)
            slots: list[LanczosState | LanczosResult] = [] if store is None else store.group  # resumed group
            if not slots:
                slots = [
                    lanczos_init(op, num_iters, reorth=reorth, seed=probe_seed(seed, p), probe=probe,
                                 workspace=spare if group == 1 else None)
                    for p in range(first, min(first + group, num_probes))
                ]
                if store is not None:
                    store.begin(slots)
            set_postfix(bar, f"probe {first + 1}/{num_probes}" if len(slots) == 1
                        else f"probes {first + 1}-{first + len(slots)}/{num_probes}")
            if len(slots) == 1 and isinstance(slots[0], LanczosState):
                state = slots[0]
                done = [_run_alone(op, state, bar, store)]
                spare, state.basis = state.basis, None
            else:
                done = _run_together(op, slots, bar, store)
            runs.extend(done)
            if store is not None:
                store.probes_done(done)
    result = stack_runs(runs, num_iters, op.dim, seed, probe, reorth)
    if store is not None:
        store.finish(result, record)
    return result


def _on_cpu(op: SymmetricOperator) -> bool:
    return all(torch.device(d).type == "cpu" for d in op.devices)


def _group_size(op: SymmetricOperator, num_iters: int, num_probes: int, reorth: str) -> int:
    """``probes_at_once="auto"``: two runs interleaved (:func:`_run_interleaved`) on a CPU operator that computes
    one product at a time, when both Lanczos bases fit in half the free memory; else 1.

    Interleaving changes when a step runs, not what it computes, so "auto" keeps results bit for bit those
    of one probe after the other. Batching the products of several probes (an accelerator's
    ``op.batched_matmat``) changes their rounding, so it is asked for with an integer, never chosen by
    memory. Under torch.distributed every rank takes the smallest choice of all ranks: they must multiply
    the same probes' vectors in the same collectives.
    """
    group = 1
    if num_probes > 1 and not op.batched_matmat and _on_cpu(op):
        group = 2
        if reorth != "none":
            bytes_per_basis = (num_iters + 1) * sum(
                int(np.prod(s)) * torch.empty((), dtype=d).element_size() for s, d in zip(op.shapes, op.dtypes)
            )
            free = free_memory(torch.device("cpu"))
            group = 1 if free is None else max(1, min(group, int(0.5 * free // max(bytes_per_basis, 1))))
    return min_on_all_ranks(group, torch.device(op.devices[0]))


def _run_together(
    op: SymmetricOperator, slots: list[LanczosState | LanczosResult], bar: tqdm, store: SLQStore | None = None
) -> list[LanczosResult]:
    """Advance several Lanczos states in lockstep, one step each per round.

    An operator that batches products computes a round's products in one ``matmat``; on a CPU the products
    come one at a time and each state's step runs beside the next product (:func:`_run_interleaved`);
    elsewhere the products of a round come one after the other, then the steps.
    ``slots`` is updated in place: a state is replaced by its result as soon as it is done (a breakdown
    ends one probe before the others), so a checkpoint of the group saves that probe's result, not a state
    it could not continue. ``store`` (a run folder) is told of every round.
    """
    if not op.batched_matmat and _on_cpu(op):
        return _run_interleaved(op, slots, bar, store)
    while True:
        active = [i for i, s in enumerate(slots) if isinstance(s, LanczosState) and not s.done]
        if not active:
            break
        states = [slots[i] for i in active]
        keep = [b for s in states for b in (s.q_prev or ())]
        products = owned_matmat(op, [s.q for s in states], keep=keep)
        for i, state, w in zip(active, states, products, strict=True):
            lanczos_advance(state, w)
            bar.update(1)
            if state.done:
                bar.update(state.num_iters - state.iteration)
                slots[i] = lanczos_finish(state)
        del states, products
        if store is not None:
            store.stepped(len(active))
    return [s if isinstance(s, LanczosResult) else lanczos_finish(s) for s in slots]


def _advance_with(grad: bool, inference: bool) -> Callable[[LanczosState, list[torch.Tensor]], LanczosState]:
    """:func:`lanczos_advance` under the caller's grad and inference modes (thread-local: a side thread starts
    with its own)."""

    def advance(state: LanczosState, w: list[torch.Tensor]) -> LanczosState:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return lanczos_advance(state, w)

    return advance


def _run_interleaved(
    op: SymmetricOperator, slots: list[LanczosState | LanczosResult], bar: tqdm, store: SLQStore | None = None
) -> list[LanczosResult]:
    """:func:`_run_together` on a CPU operator that computes one product at a time: each run's Lanczos step
    after its product (re-orthogonalisation against its basis: bound by memory bandwidth) runs in a side
    thread while the next run's product (bound by arithmetic) runs here.

    Every run does the same operations in the same order as alone, so the results are bit-identical to
    running the probes one after the other; only their order in time changes. The operator must return a
    fresh result for each product (every operator of this package does): a step still reads its product
    while the next one is computed. A round gives each live run one product; ``store`` is told of a round
    when its last step is done. That is after the next round's first product has been computed (before any
    state moved on, so a checkpoint sees every run exactly at the end of the round), except for a round
    whose checkpoint is due: its last step is waited for at once, so an interrupt in the next product cannot
    lose the save.
    """
    side = _threads.side_thread()
    advance = _advance_with(torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    inflight: list = []  # at most one [future, slot index, products of the round it closes (0: none)]

    def settle() -> None:
        if not inflight:
            return
        future, i, closes = inflight[0]
        future.result()  # popped after: an interrupt while waiting leaves it for the final wait
        inflight.pop()
        state = slots[i]
        bar.update(1)
        if state.done:
            bar.update(state.num_iters - state.iteration)
            slots[i] = lanczos_finish(state)
        if closes and store is not None:
            store.stepped(closes)

    try:
        while True:
            pending = inflight[0][1] if inflight else None
            live = [i for i, s in enumerate(slots) if isinstance(s, LanczosState) and (i == pending or not s.done)]
            if not live:
                break
            products, reached = 0, 0
            for i in live:
                if inflight and inflight[0][1] == i:  # its own step must be done before its next product
                    settle()
                state = slots[i]
                if not isinstance(state, LanczosState) or state.done:
                    continue
                w = owned_matvec(op, state.q, keep=state.q_prev or ())
                settle()
                reached = state.iteration + 1
                inflight.append([None, i, 0])
                inflight[0][0] = side.submit(advance, state, w)
                products += 1
            if not products:
                break
            inflight[0][2] = products  # the round's last step closes it
            if store is not None and store.checkpoint_every and reached % store.checkpoint_every == 0:
                settle()
    finally:
        if inflight and inflight[0][0] is not None:  # an error or interrupt: let the step in flight finish
            inflight[0][0].exception()
    settle()
    return [s if isinstance(s, LanczosResult) else lanczos_finish(s) for s in slots]


def _run_alone(op: SymmetricOperator, state: LanczosState, bar: tqdm, store: SLQStore | None = None) -> LanczosResult:
    """Run a Lanczos state to the end, advancing the shared bar (a breakdown skips the rest); ``store`` (a
    run folder) is told of every step."""
    while not state.done:
        lanczos_step(op, state)
        bar.update(1)
        if store is not None:
            store.stepped(1)
    bar.update(state.num_iters - state.iteration)
    return lanczos_finish(state)
