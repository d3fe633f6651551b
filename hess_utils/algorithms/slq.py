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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hess_utils.algorithms._frozen import freeze_arrays
from hess_utils.algorithms._products import owned_matmat
from hess_utils.algorithms.lanczos import (
    LanczosResult,
    LanczosState,
    lanczos_advance,
    lanczos_finish,
    lanczos_init,
    lanczos_step,
)
from hess_utils.algorithms.probes import check_count, check_seed, probe_seed
from hess_utils.operators.base import SymmetricOperator
from hess_utils.progress import progress_bar
from hess_utils.vectors import free_memory


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


def slq(
    op: SymmetricOperator,
    num_iters: int,
    num_probes: int,
    reorth: str = "full",
    seed: int = 0,
    probe: str = "rademacher",
    progress: bool = True,
    probes_at_once: int | str = 1,
) -> SLQResult:
    """Stochastic Lanczos quadrature with ``num_probes`` independent runs of ``num_iters`` iterations.

    Parameters
    ----------
    op : SymmetricOperator
        The symmetric operator :math:`H`.
    num_iters : int
        Lanczos iterations per probe ``k`` (quadrature nodes per probe).
    num_probes : int
        Number of independent probes ``P``.
    reorth : {"full", "offload", "none"}
        See :func:`~hess_utils.algorithms.lanczos.lanczos`.
    seed : int
        Probe ``p`` starts from ``op.random_vector(probe, seed * 1_000_003 + p)``.
    probe : {"rademacher", "gaussian"}
        Distribution of the start vectors.
    progress : bool
        Show one progress bar over all ``P * k`` products.
    probes_at_once : int, optional
        How many runs advance together: their products are computed by one
        :meth:`~hess_utils.operators.base.SymmetricOperator.matmat` call (for a Hessian, one double
        backward for all of them). The runs are the same as one after the other to rounding (not bit for
        bit, hence the default 1, which :func:`~hess_utils.runs` checkpointed runs reproduce exactly).
        ``"auto"``: all ``P`` when the operator batches products on an accelerator and their Lanczos
        bases fit together in half the free memory of the basis device, else 1. On a CPU the batched
        double backward is slower per vector than one product after the other (measured on the benchmark
        GPT-2 shape: 2.8 instead of 2.1 gradients per vector), so ``"auto"`` runs the probes in turn there.

    Returns
    -------
    SLQResult
    """
    num_probes = check_count("num_probes", num_probes)
    seed = check_seed(seed)
    group = _group_size(op, num_iters, num_probes, reorth) if probes_at_once == "auto" else probes_at_once
    group = min(check_count("probes_at_once", group), num_probes)
    runs: list[LanczosResult] = []
    spare: list[torch.Tensor] | None = None  # a finished run's basis, reused by the next run in turn
    with progress_bar(total=num_probes * num_iters, desc="slq", disable=not progress) as bar:
        for first in range(0, num_probes, group):
            states = [
                lanczos_init(op, num_iters, reorth=reorth, seed=probe_seed(seed, p), probe=probe,
                             workspace=spare if group == 1 else None)
                for p in range(first, min(first + group, num_probes))
            ]
            if len(states) == 1:
                runs.append(_run_quietly(op, states[0], bar))
                spare, states[0].basis = states[0].basis, None
            else:
                runs.extend(_run_together(op, states, bar))
    return stack_runs(runs, num_iters, op.dim, seed, probe, reorth)


def _group_size(op: SymmetricOperator, num_iters: int, num_probes: int, reorth: str) -> int:
    """Default ``probes_at_once``: all probes when the operator batches on an accelerator and their bases
    fit, else 1 (the batched double backward loses to one product after the other on a CPU)."""
    if num_probes == 1 or not op.batched_matmat:
        return 1
    if reorth == "none":
        return num_probes
    bytes_per_basis = (num_iters + 1) * sum(
        int(np.prod(s)) * torch.empty((), dtype=d).element_size() for s, d in zip(op.shapes, op.dtypes)
    )
    device = torch.device("cpu") if reorth == "offload" else torch.device(op.devices[0])
    free = free_memory(device)
    if free is None:
        return 1
    return max(1, min(num_probes, int(0.5 * free // max(bytes_per_basis, 1))))


def _run_together(op: SymmetricOperator, states: list[LanczosState], bar: tqdm) -> list[LanczosResult]:
    """Advance several Lanczos states in lockstep, one ``matmat`` per step for the unfinished ones."""
    while True:
        active = [s for s in states if not s.done]
        if not active:
            break
        keep = [b for s in active for b in (s.q_prev or ())]
        products = owned_matmat(op, [s.q for s in active], keep=keep)
        for state, w in zip(active, products, strict=True):
            lanczos_advance(state, w)
            bar.update(1)
            if state.done:
                bar.update(state.num_iters - state.iteration)
    return [lanczos_finish(s) for s in states]


def _run_quietly(op: SymmetricOperator, state: LanczosState, bar: tqdm) -> LanczosResult:
    """Run a Lanczos state to the end, advancing the shared bar (a breakdown skips the rest)."""
    while not state.done:
        lanczos_step(op, state)
        bar.update(1)
    bar.update(state.num_iters - state.iteration)
    return lanczos_finish(state)
