"""Cullum-Willoughby identification of spurious and duplicate ("ghost") Ritz values.

Without re-orthogonalisation, Lanczos in floating point loses orthogonality once a Ritz value converges,
and the converged eigenvalue is found again and again. Cullum and Willoughby (1985, *Lanczos Algorithms
for Large Symmetric Eigenvalue Computations*, vol. 1, ch. 4) sort the eigenvalues of the Lanczos matrix
:math:`T_k` with the help of :math:`\\hat T_k`, the matrix :math:`T_k` with its first row and column
deleted:

1. Numerically multiple eigenvalues of :math:`T_k` (eigenvalues within ``tol`` of one another; an
   unreduced tridiagonal matrix has only simple eigenvalues in exact arithmetic) are copies of one
   converged eigenvalue of :math:`H`: they are genuine. One copy is kept; with ``deduplicate=True`` the
   other copies are flagged, so that the unflagged list holds every eigenvalue found exactly once.
2. A simple eigenvalue of :math:`T_k` that is also, within ``tol``, an eigenvalue of :math:`\\hat T_k`
   is spurious and flagged. Such an eigenvalue has (numerically) zero first eigenvector component,
   i.e. zero weight on the start vector: it is a copy on its way to converging, not information about
   :math:`H`.
3. Every other eigenvalue is genuine (converged or not).

Weight floor. ``|theta - hat theta| ~ beta_1 |u_1|`` for a Ritz value with first eigenvector component
``u_1``, so the distance test alone flags every value with ``|u_1| < tol / beta_1``. For the Hessian of a
language model the probe lies almost wholly in the near-null bulk, ``beta_1 << ||T||`` (0.12 against 450
for SmolLM2-135M), and in float32 that flagged 23 of 24 genuine Ritz values of weight 1e-9 to 1e-8. A
spurious value's first component is tiny, so a simple value is flagged only if its weight ``u_1^2`` is also
at most :func:`default_weight_floor`: on test matrices this keeps exactly the true outliers, as the
distance test alone does, and on SmolLM2 it flags none of the 23 (the smallest weight is 4e-12).

Re-orthogonalised runs. Ghosts come from the loss of orthogonality; a run with a kept basis has none, so
:func:`~hess_utils.algorithms.lanczos.lanczos_finish` applies the test only to ``reorth="none"`` runs.

Caveats. A true eigenvalue whose eigenvector is (numerically) orthogonal to the start vector has zero
weight and is flagged like a spurious one: the test cannot tell them apart. The mask is for *lists of
eigenvalues*; for quadrature (SLQ densities) keep every node with its weight, as the weights of the
copies of one eigenvalue add up to its weight and spurious nodes carry none.
"""

from __future__ import annotations

import numpy as np

from hess_utils.algorithms.tridiagonal import tridiagonal_eigh, tridiagonal_eigvalsh

# Neighbouring ghost copies of an eigenvalue agree to a few units of roundoff times ||T||. Measured on
# 100-dim test matrices (k = 100..1000 plain Lanczos steps): 20 eps links every group in float64; larger
# factors start to merge distinct eigenvalues or flag genuine ones in float32, where eps ||T|| is coarse.
GHOST_TOL_FACTOR = 20.0


def default_ghost_tol(ritz_values: np.ndarray, unit_roundoff: float = float(np.finfo(np.float64).eps)) -> float:
    """Default absolute tolerance ``20 * unit_roundoff * ||T_k||_2`` with ``||T_k||_2 = max |theta|``.

    About ``4.4e-15 * ||T||`` for a float64 run and ``2.4e-6 * ||T||`` for a float32 one. Ritz values
    closer than this are treated as copies of one eigenvalue; eigenvalues of ``H`` that close cannot be
    told apart from ghosts.
    """
    values = np.asarray(ritz_values, dtype=np.float64)
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    return GHOST_TOL_FACTOR * unit_roundoff * scale


def default_weight_floor(num_iters: int, unit_roundoff: float = float(np.finfo(np.float64).eps),
                         dim: int | None = None) -> float:
    """Largest weight of a spurious Ritz value: ``max(k (10 eps)^2, 1e-6 / dim)``.

    ``k (10 eps)^2`` is roundoff level (3.4e-11 for k = 24 in float32). With a random probe the weight of an
    eigenvector is about ``chi^2_1 / dim``, below ``1e-6 / dim`` with probability 8e-4, while spurious values
    measured here weigh 1e-19 to 1e-44 (float32) and 1e-22 to 1e-27 (float64, dim 100): the second term
    catches the latter where ``k eps^2`` is too fine.
    """
    floor = num_iters * (10.0 * unit_roundoff) ** 2
    return max(floor, 1e-6 / dim) if dim else floor


def _multiplicity_groups(values: np.ndarray, tol: float) -> list[np.ndarray]:
    """Indices of ``values`` (ascending) split where consecutive gaps exceed ``tol``."""
    breaks = np.flatnonzero(np.diff(values) > tol) + 1
    return np.split(np.arange(values.size), breaks)


def _distance_to_nearest(values: np.ndarray, others: np.ndarray) -> np.ndarray:
    """``min_j |values_i - others_j|`` for ascending ``others`` (inf when ``others`` is empty)."""
    if others.size == 0:
        return np.full(values.shape, np.inf)
    pos = np.searchsorted(others, values)
    left = np.abs(values - others[np.clip(pos - 1, 0, others.size - 1)])
    right = np.abs(values - others[np.clip(pos, 0, others.size - 1)])
    return np.minimum(left, right)


def deleted_first_row_eigenvalues(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of :math:`\\hat T`, the tridiagonal matrix without its first row and column."""
    return tridiagonal_eigvalsh(np.asarray(alphas)[1:], np.asarray(betas)[1:])


def cullum_willoughby_mask(
    alphas: np.ndarray,
    betas: np.ndarray,
    ritz_values: np.ndarray | None = None,
    tol: float | None = None,
    *,
    unit_roundoff: float = float(np.finfo(np.float64).eps),
    deduplicate: bool = True,
    residual_estimates: np.ndarray | None = None,
    weight_floor: float | None = None,
    dim: int | None = None,
) -> np.ndarray:
    """Flag the spurious Ritz values and the extra copies of multiple ones (see the module docstring).

    Parameters
    ----------
    alphas : array, shape (k,)
        Diagonal of :math:`T_k`.
    betas : array, shape (k-1,)
        Off-diagonal of :math:`T_k`.
    ritz_values : array, shape (k,), optional
        Eigenvalues of :math:`T_k` in ascending order; computed when omitted.
    tol : float, optional
        Absolute tolerance both for "numerically multiple" (two Ritz values within ``tol``) and for
        "also an eigenvalue of :math:`\\hat T_k`". Default :func:`default_ghost_tol`:
        ``20 * unit_roundoff * max|theta|``.
    unit_roundoff : float
        Machine epsilon of the arithmetic of the Lanczos run (float64 by default; pass
        ``torch.finfo(torch.float32).eps`` for a float32 run).
    deduplicate : bool
        Flag all but one copy of each group of numerically multiple Ritz values (default). With False
        only spurious values are flagged and every copy is kept.
    residual_estimates : array, shape (k,), optional
        Residual bounds of the Ritz values; when given, the copy kept from a multiple group is the one
        with the smallest residual (the most accurate), otherwise the lowest.
    weight_floor : float, optional
        A simple Ritz value is spurious only if its weight :math:`u_{1,i}^2` is also at most this (see the
        module docstring); default :func:`default_weight_floor` (of ``k``, ``unit_roundoff`` and ``dim``).
        ``np.inf`` gives the distance test alone (the original rule).
    dim : int, optional
        Dimension of the operator, for the default ``weight_floor``.

    Returns
    -------
    np.ndarray of bool, shape (k,)
        True where the Ritz value is a ghost (spurious or an extra copy), aligned with ``ritz_values``.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    if betas.shape != (max(alphas.size - 1, 0),):
        raise ValueError(f"betas must have k-1 = {alphas.size - 1} entries, got shape {betas.shape}")
    eigenvalues, vectors = tridiagonal_eigh(alphas, betas)
    weights = vectors[0, :] ** 2  # aligned with the ascending eigenvalues, as ritz_values must be
    if ritz_values is None:
        ritz_values = eigenvalues
    values = np.asarray(ritz_values, dtype=np.float64)
    if values.shape != alphas.shape or np.any(np.diff(values) < 0):
        raise ValueError("ritz_values must be the k eigenvalues of T in ascending order")
    if tol is None:
        tol = default_ghost_tol(values, unit_roundoff)
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if weight_floor is None:
        weight_floor = default_weight_floor(values.size, unit_roundoff, dim)
    if not weight_floor >= 0:
        raise ValueError(f"weight_floor must be >= 0, got {weight_floor!r}")

    rank = np.zeros(values.size) if residual_estimates is None else np.asarray(residual_estimates, np.float64)
    if rank.shape != values.shape:
        raise ValueError(f"residual_estimates must have shape {values.shape}, got {rank.shape}")

    mask = np.zeros(values.size, dtype=bool)
    simple = np.zeros(values.size, dtype=bool)
    for group in _multiplicity_groups(values, tol):
        if group.size == 1:
            simple[group] = True
        elif deduplicate:
            mask[group] = True
            mask[group[np.argmin(rank[group])]] = False  # argmin takes the lowest copy on ties
    hat = deleted_first_row_eigenvalues(alphas, betas)
    mask |= simple & (_distance_to_nearest(values, hat) <= tol) & (weights <= weight_floor)
    return mask
