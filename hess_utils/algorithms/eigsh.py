"""A few extreme eigenpairs of a :class:`~hess_utils.operators.base.SymmetricOperator` by thick-restart Lanczos.

Plain Lanczos (:mod:`hess_utils.algorithms.lanczos`) keeps every basis vector to stay orthogonal, so its
memory grows with the number of products. Here the basis holds at most ``m = basis_size = k + p`` vectors
however many products are spent (Wu & Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
problems", SIAM J. Matrix Anal. Appl. 22, 2000; in the form of Stewart's Krylov-Schur method).

The state after ``f`` basis vectors :math:`Q_f = [q_1 \\dots q_f]` (orthonormal) is the relation

.. math::

    H Q_f = Q_f T_f + r\\, b^\\top, \\qquad Q_f^\\top r = 0,\\ \\lVert r \\rVert = 1,

with :math:`T_f = Q_f^\\top H Q_f` symmetric (``f x f``, float64) and a coupling vector :math:`b \\in
\\mathbb{R}^f`. A Lanczos step appends :math:`q_{f+1} = r`: :math:`w = H r - Q_f b - \\alpha r` with
:math:`\\alpha = r^\\top H r`, re-orthogonalised against the whole (small) basis, :math:`\\beta = \\lVert w
\\rVert`, new :math:`r = w / \\beta` and :math:`b = \\beta e_{f+1}`. For an eigenpair :math:`T_f s =
\\theta s`, the Ritz vector :math:`y = Q_f s` has the residual :math:`H y - \\theta y = r\\,(b^\\top s)`,
so :math:`|b^\\top s|` is its residual norm at no cost.

When the basis is full (``f = m``), :math:`T_m = S \\Theta S^\\top` is diagonalised and the ``l`` most
wanted Ritz vectors are kept (``k <= l < m``): :math:`Q_l \\leftarrow Q_m S_l`, :math:`T_l =
\\Theta_l` (diagonal), :math:`b \\leftarrow S_l^\\top b`, and ``r`` is unchanged, so the relation holds
again with ``l`` vectors ("thick" restart: many Ritz vectors, not one, as in implicit restarting with
exact shifts). The Krylov space of the next cycle is the one a longer run would have built, filtered
towards the wanted end; only ``m`` vectors are ever stored.

Single-vector Krylov methods see one direction of each eigenspace: the second copy of a repeated eigenvalue is
invisible to them in exact arithmetic (and in floating point it appears only after many restarts, if at all).
Once the wanted pairs converge to half the tolerance, ``check_multiplicity=True`` (off by default, as in
ARPACK) locks them (their couplings, which stay in their true residuals, are dropped), starts a fresh Lanczos
sequence from a random vector orthogonal to them and iterates until the best Ritz pair outside the wanted set
has settled clearly behind it (its residual is below half its distance to the wanted set), tested after every
product once the check's sequence has ``_CHECK_LENGTH`` (6) vectors. That pair approximates the extreme
eigenvalue of :math:`H` deflated by the locked pairs: a missed copy shows up there as a Ritz value more wanted
than the current ones, enters the wanted set, and the check is repeated for the new set. The check costs what
resolving the deflated extreme costs: a few products when the next eigenvalue is well behind the wanted set,
more when it is close (to settle, its Ritz value must be resolved to half its distance from the wanted set).
Like every Krylov method it can only see a copy its sequence has had time to amplify from a random start (a
component of about ``n^-1/2`` in dimension ``n``).

Every decision (converged, lock, check settled) is taken after every product, not only when the basis is
full: the iteration stops at the first product where the wanted pairs meet the tolerance. (A cycle in which
an invariant subspace was found waits for a full basis, so that the exact pairs of that subspace are not
mistaken for the wanted ones.)

The reported residuals are true ones, ``||H x - theta x||`` with one product per pair at the end, not the
estimates above.

Between two products the relation above (``Q_f``, ``T_f``, ``b``, ``r``), the counters, the number of random
vectors drawn (their seeds follow from it) and two flags of the multiplicity check are the whole state of the
iteration. With ``checkpoint_dir`` it is saved at restarts (atomically, with sha256 digests and the
operator's fingerprint; :mod:`hess_utils.algorithms._eigsh_store`), and a re-run resumes from it with the
same floating-point operations as an uninterrupted run.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hess_utils import vectors as V
from hess_utils._memory import holds_freed_memory
from hess_utils.algorithms import _eigsh_store as store_
from hess_utils.algorithms._frozen import freeze_arrays
from hess_utils.algorithms._products import owned_matvec
from hess_utils.algorithms.lanczos import (
    _HALF_DTYPES,
    _allocate_basis,
    _reorthogonalise_,
    _start_vector,
    _store_row,
    _subtract_projection_,
    default_breakdown_rtol,
    machine_epsilon,
)
from hess_utils.algorithms.probes import check_count, check_seed, probe_seed
from hess_utils.operators.base import SymmetricOperator
from hess_utils.progress import progress_bar, set_postfix
from hess_utils.vectors import TensorList

WHICH = ("LA", "SA", "LM", "BE")
EigshCheckpointError = store_.EigshCheckpointError

# Restarts keep the converged wanted pairs plus this fraction of the rest of the basis (SLEPc's Krylov-Schur
# default): more kept vectors mean a better start, fewer mean more new directions per cycle.
_KEEP_FRACTION = 0.5

# Locking drops the couplings of the locked pairs, which then stay in their true residuals: they are locked
# only once their residuals are this fraction of the tolerance, so the reported residuals still meet it (the
# half left covers the estimate-to-true difference and what the couplings of a newly found copy miss).
_LOCK_FRACTION = 0.5

# A multiplicity check may stop once its own Lanczos sequence has this many vectors (fewer with a small basis):
# a shorter one has seen too little of the deflated operator for its Ritz pairs to say anything (on a
# 3e5-dimensional dense spectrum 2 missed a doubled eigenvalue that 3 and more found).
_CHECK_LENGTH = 6

# Default basis size for small k (scipy's eigsh default ncv = max(2k + 1, 20)).
_DEFAULT_BASIS = 20

# A random vector left with less than this norm after orthogonalisation against the basis is drawn again.
_MIN_RANDOM_NORM = 1e-6


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class EigshResult:
    """``k`` eigenpairs of ``H`` from :func:`eigsh`.

    Attributes
    ----------
    eigenvalues : np.ndarray, shape (k,)
        Ritz values, float64, ascending (scipy's ``eigsh`` order, whatever ``which``).
    eigenvectors : list of k vector lists
        Unit Ritz vectors, ``eigenvectors[i]`` belongs to ``eigenvalues[i]``; each is laid out like
        ``op.zeros()`` (blocks on the operator's devices, in its dtypes; views into one ``(k, numel)``
        tensor per block). Their sign is arbitrary.
    residuals : np.ndarray, shape (k,)
        True residual norms ``||H x_i - theta_i x_i||`` (one product each, after the iteration).
        An eigenvalue of ``H`` lies within ``residuals[i]`` of ``eigenvalues[i]``.
    converged : np.ndarray of bool, shape (k,)
        ``residuals <= tol * scale``.
    scale : float
        ``max |theta|`` over the Ritz values of the last projected matrix, a lower bound of
        ``||H||_2`` that makes ``tol`` relative.
    tol : float
        Relative tolerance asked for.
    which : str
        ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``.
    num_products : int
        Products with ``H``, including the ``k`` residual products at the end.
    num_restarts : int
        Times the basis was compressed (thick restarts and multiplicity checks together).
    num_multiplicity_checks : int
        Cycles run from a fresh random vector after the wanted pairs had converged.
    basis_size : int
        ``m``: the number of basis vectors kept in memory (``min(k + num_extra, dim)``).
    seed : int
        Seed of the random start and injected vectors.
    """

    eigenvalues: np.ndarray
    eigenvectors: list[TensorList]
    residuals: np.ndarray
    converged: np.ndarray
    scale: float
    tol: float
    which: str
    num_products: int
    num_restarts: int
    num_multiplicity_checks: int
    basis_size: int
    seed: int

    def __post_init__(self) -> None:
        freeze_arrays(self)

    @property
    def k(self) -> int:
        """The number of eigenpairs."""
        return len(self.eigenvalues)

    @property
    def all_converged(self) -> bool:
        """True when every pair met the tolerance."""
        return bool(self.converged.all())

    @property
    def relative_residuals(self) -> np.ndarray:
        """``residuals / scale`` (the quantity compared with ``tol``)."""
        return self.residuals / self.scale if self.scale > 0 else self.residuals.copy()

    def to_frame(self) -> pd.DataFrame:
        """One row per pair: ``eigenvalue, residual, relative_residual, converged``."""
        return pd.DataFrame(
            {
                "eigenvalue": self.eigenvalues,
                "residual": self.residuals,
                "relative_residual": self.relative_residuals,
                "converged": self.converged,
            }
        )

    def __repr__(self) -> str:
        worst = float(self.relative_residuals.max()) if self.k else math.nan
        return (
            f"EigshResult(which={self.which!r}, k={self.k}, converged={int(self.converged.sum())}/{self.k}, "
            f"max_relative_residual={worst:.1e}, num_products={self.num_products}, "
            f"num_restarts={self.num_restarts}, basis_size={self.basis_size})"
        )


@dataclass
class EigshState:
    """The Krylov-Schur relation ``H Q_f = Q_f T_f + r b^T`` of a running :func:`eigsh` (mutable).

    Attributes
    ----------
    basis : list[torch.Tensor]
        One ``(basis_size, numel)`` tensor per block, allocated once; rows ``0..filled-1`` are
        :math:`Q_f`. Never reallocated: the memory of the run is this plus two work vectors.
    filled : int
        ``f``, the number of basis rows in use.
    T : np.ndarray, shape (basis_size, basis_size)
        :math:`T_f` in its leading ``f x f`` block (float64).
    b : np.ndarray, shape (f,)
        Coupling of the basis to the residual direction.
    r : list of tensors or None
        The unit residual direction, orthogonal to the basis (None once the basis spans the whole space).
    num_products, num_restarts, num_multiplicity_checks : int
        Counters.
    norm_estimate : float
        Largest ``|alpha|``, ``beta`` or ``|theta|`` seen, the scale of the breakdown test.
    draws : int
        Random vectors drawn so far (their seeds are ``probe_seed(seed, draws)``).
    """

    basis: list[torch.Tensor]
    T: np.ndarray
    b: np.ndarray
    r: TensorList | None
    filled: int = 0
    num_products: int = 0
    num_restarts: int = 0
    num_multiplicity_checks: int = 0
    norm_estimate: float = 0.0
    draws: int = 0

    @property
    def basis_size(self) -> int:
        """Rows of the basis (the most vectors ever kept)."""
        return int(self.basis[0].shape[0])


# ---------------------------------------------------------------------------------------------- checks
def _default_writer() -> bool:
    from hess_utils.distributed import is_main_process

    return is_main_process()


def _check_config(
    op: SymmetricOperator, k: int, which: str, tol: float, num_extra: int | None, max_products: int | None
) -> tuple[int, int, int]:
    """Validated ``(k, basis_size, max_products)``."""
    if which not in WHICH:
        raise ValueError(
            f"unknown which={which!r}; choose one of {WHICH} (largest algebraic, smallest algebraic, "
            "largest magnitude, both ends)"
        )
    k = check_count("k", k)
    dim = op.dim
    if k >= dim:
        raise ValueError(
            f"k={k} eigenpairs of an operator of dimension {dim}: eigsh needs k < dim; for all eigenpairs use "
            "torch.linalg.eigh(op.to_dense())"
        )
    if not (isinstance(tol, numbers.Real) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0 (relative residual), got {tol!r}")
    eps = machine_epsilon(op.dtypes)
    if tol < eps:
        raise ValueError(
            f"tol={tol:g} is below the rounding unit {eps:.1e} of the operator dtype ({op.dtype}): no residual "
            f"can get there; use tol >= {10 * eps:.0e} or a float64 operator"
        )
    if num_extra is None:
        num_extra = max(k + 1, _DEFAULT_BASIS - k)  # basis max(2k + 1, 20): ARPACK's (scipy's) default ncv
    num_extra = check_count("num_extra", num_extra)
    basis_size = min(k + num_extra, dim)
    if max_products is None:
        max_products = max(1000, 50 * basis_size)
    max_products = check_count("max_products", max_products)
    if max_products < basis_size:
        raise ValueError(
            f"max_products={max_products} is less than one cycle (basis_size={basis_size} products); "
            f"use max_products >= {basis_size} or a smaller num_extra"
        )
    return k, basis_size, max_products


# ---------------------------------------------------------------------------------------------- ordering
def wanted_order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` from the most to the least wanted for ``which``.

    ``"BE"`` alternates the ends, largest first, so the first ``k`` hold ``ceil(k/2)`` values from the top
    and ``floor(k/2)`` from the bottom (ARPACK's split).
    """
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")
    if which == "BE":
        ascending = np.argsort(theta, kind="stable")
        order = np.empty_like(ascending)
        order[0::2] = ascending[::-1][: (len(theta) + 1) // 2]
        order[1::2] = ascending[: len(theta) // 2]
        return order
    raise ValueError(f"unknown which={which!r}; choose one of {WHICH}")


# ---------------------------------------------------------------------------------------------- basis algebra
def _row(basis: list[torch.Tensor], i: int, shapes: Sequence[torch.Size]) -> TensorList:
    """Row ``i`` of the basis as a vector list (views, no copy)."""
    return [Qb[i].view(shape) for Qb, shape in zip(basis, shapes, strict=True)]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision products of the coefficients would round them to 3 digits; combine in float32.
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _chunk_columns(numel: int, rows: int) -> int:
    """Columns per chunk so that a ``rows x chunk`` temporary is about one vector (at least 4096 columns)."""
    return max(numel // max(rows, 1), min(numel, 4096), 1)


def _compress_rows_(basis: list[torch.Tensor], coeffs: np.ndarray) -> None:
    """In place ``Q[:l] <- coeffs^T Q[:f]`` for ``coeffs`` of shape ``(f, l)``, ``l <= f``.

    Done a column chunk at a time: every chunk of the ``f`` old rows is read before its ``l`` new rows are
    written, and the temporary is about one vector, so the restart needs no second basis.
    """
    f, l = coeffs.shape
    for Qb in basis:
        C = torch.as_tensor(coeffs.T.copy(), device=Qb.device).to(_work_dtype(Qb.dtype))
        n = Qb.shape[1]
        step = _chunk_columns(n, l)
        for s in range(0, n, step):
            block = Qb[:f, s : s + step]
            Qb[:l, s : s + step] = (C @ block.to(C.dtype)).to(Qb.dtype)


def _combine_rows(basis: list[torch.Tensor], coeffs: np.ndarray, shapes: Sequence[torch.Size]) -> list[TensorList]:
    """New vector lists ``Q[:f] coeffs[:, i]`` for ``coeffs`` of shape ``(f, k)`` (the returned eigenvectors)."""
    f, k = coeffs.shape
    per_block = []
    for Qb in basis:
        C = torch.as_tensor(coeffs.T.copy(), device=Qb.device).to(_work_dtype(Qb.dtype))
        out = torch.empty((k, Qb.shape[1]), dtype=Qb.dtype, device=Qb.device)
        step = _chunk_columns(Qb.shape[1], k)
        for s in range(0, Qb.shape[1], step):
            out[:, s : s + step] = (C @ Qb[:f, s : s + step].to(C.dtype)).to(Qb.dtype)
        per_block.append(out)
    return [[out[i].view(shape) for out, shape in zip(per_block, shapes, strict=True)] for i in range(k)]


def _random_orthogonal(op: SymmetricOperator, state: EigshState, rows: int, seed: int) -> TensorList:
    """A unit random vector orthogonal to basis rows ``0..rows-1`` (Gaussian, seeded, drawn again if degenerate)."""
    for _ in range(8):
        state.draws += 1
        v = V.random_like(op.zeros(), kind="gaussian", seed=probe_seed(seed, state.draws))
        V.scale_(1.0 / V.norm(v), v)
        size = _reorthogonalise_(v, state.basis, rows) if rows else 1.0
        if size > _MIN_RANDOM_NORM:
            V.scale_(1.0 / size, v)
            return v
    raise RuntimeError(
        f"could not draw a vector orthogonal to {rows} basis vectors in dimension {op.dim}; "
        "the operator is too small for this basis size"
    )


# ---------------------------------------------------------------------------------------------- iteration
def _expand(op: SymmetricOperator, state: EigshState, seed: int, rtol: float) -> None:
    """Append ``r`` to the basis and take one Lanczos step (one product)."""
    f = state.filled
    _store_row(state.basis, f, state.r)
    q = _row(state.basis, f, op.shapes)
    state.T[:f, f] = state.b
    state.T[f, :f] = state.b
    w = owned_matvec(op, q)
    state.num_products += 1
    # The known part of H r is Q_f b: subtract it exactly, then what is left is along r and new directions.
    nonzero = np.flatnonzero(state.b)
    if len(nonzero) == 1:
        i = int(nonzero[0])
        V.axpy_(-float(state.b[i]), _row(state.basis, i, op.shapes), w)
    elif len(nonzero) > 1:
        coeffs = torch.as_tensor(state.b, dtype=torch.float64, device=state.basis[0].device)
        _subtract_projection_(w, state.basis, coeffs, f)
    alpha = V.dot(q, w)
    if not math.isfinite(alpha):
        raise ValueError(
            f"the operator returned non-finite values at product {state.num_products}; check the model/loss "
            "(e.g. overflow in half precision) before running eigsh"
        )
    V.axpy_(-alpha, q, w)
    # Full re-orthogonalisation against the whole basis (it is small): Gram-Schmidt twice when needed.
    beta = _reorthogonalise_(w, state.basis, f + 1)
    if not math.isfinite(beta):
        raise ValueError(f"the operator returned non-finite values at product {state.num_products}")
    state.T[f, f] = alpha
    state.filled = f + 1
    state.norm_estimate = max(state.norm_estimate, abs(alpha), beta)
    state.b = np.zeros(f + 1)
    if state.filled == op.dim:
        state.r = None  # the basis spans the space: T_f holds every eigenvalue, nothing is left to couple
    elif beta <= rtol * state.norm_estimate:
        # Invariant subspace: its Ritz pairs are exact. Continue from a new direction, coupling zero.
        state.r = _random_orthogonal(op, state, state.filled, seed)
    else:
        state.b[f] = beta
        V.scale_(1.0 / beta, w)
        state.r = w


def _analyse(state: EigshState, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(theta, S, estimates, order)`` of the current ``T_f``: Ritz values, vectors, residuals, wanted order."""
    f = state.filled
    theta, S = np.linalg.eigh(state.T[:f, :f])
    estimates = np.abs(state.b @ S)
    return theta, S, estimates, wanted_order(theta, which)


def _restart(state: EigshState, theta: np.ndarray, S: np.ndarray, keep: np.ndarray) -> None:
    """Thick restart onto the Ritz vectors ``keep``: ``Q_l = Q_f S_l``, ``T_l = Theta_l``, ``b = S_l^T b``."""
    _compress_rows_(state.basis, S[:, keep])
    l = len(keep)
    state.b = state.b @ S[:, keep]
    state.T[:] = 0.0
    state.T[np.arange(l), np.arange(l)] = theta[keep]
    state.filled = l
    state.num_restarts += 1


def _settled_outside(
    theta: np.ndarray, estimates: np.ndarray, order: np.ndarray, k: int, which: str, bound: float
) -> bool:
    """Whether the best Ritz pairs outside the wanted set are known to be less wanted than it.

    At each wanted end, the best unwanted Ritz value ``theta_c`` (residual ``e_c``) is compared with the
    least wanted value there; with ``margin`` their distance in the wanted direction (``min(wanted) -
    theta_c`` at the top, ``theta_c - max(wanted)`` at the bottom, ``min|wanted| - |theta_c|`` for
    ``"LM"``), the pair is settled once ``e_c <= max(margin / 2, bound)``: an eigenvalue lies within
    ``e_c`` of ``theta_c``, on the unwanted side. Lanczos approximates the extreme eigenvalues first, so
    once the extreme Ritz pair of the deflated operator has settled there, no missed eigenvalue lies
    beyond it (the usual Krylov caveat: unless the start vector is nearly orthogonal to it).
    """
    rest = order[k:]
    if len(rest) == 0:
        return True
    wanted = order[:k]
    checks: list[tuple[int, float]] = []
    if which == "LM":
        c = rest[np.argmax(np.abs(theta[rest]))]
        checks.append((c, float(np.abs(theta[wanted]).min() - abs(theta[c]))))
    else:
        top = wanted if which == "LA" else order[0:k:2] if which == "BE" else wanted[:0]
        bottom = wanted if which == "SA" else order[1:k:2] if which == "BE" else wanted[:0]
        if len(top):
            c = rest[np.argmax(theta[rest])]
            checks.append((c, float(theta[top].min() - theta[c])))
        if len(bottom):
            c = rest[np.argmin(theta[rest])]
            checks.append((c, float(theta[c] - theta[bottom].max())))
    return all(estimates[c] <= max(margin / 2, bound) for c, margin in checks)


def _lock_and_inject(
    op: SymmetricOperator, state: EigshState, theta: np.ndarray, S: np.ndarray, wanted: np.ndarray, seed: int
) -> None:
    """Keep only the converged wanted Ritz vectors, drop their couplings, restart from a random direction."""
    _restart(state, theta, S, wanted)
    state.b = np.zeros(len(wanted))
    state.r = _random_orthogonal(op, state, state.filled, seed)
    state.num_multiplicity_checks += 1


@holds_freed_memory
def eigsh(
    op: SymmetricOperator,
    k: int = 5,
    which: str = "LA",
    tol: float = 1e-6,
    max_products: int | None = None,
    num_extra: int | None = None,
    seed: int = 0,
    v0: Sequence[torch.Tensor] | None = None,
    check_multiplicity: bool = False,
    progress: bool = True,
    callback: Callable[[EigshState], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    checkpoint_config: dict[str, Any] | None = None,
    is_writer: bool | None = None,
) -> EigshResult:
    """``k`` extreme eigenpairs of ``op`` by thick-restart Lanczos with a fixed basis of ``k + num_extra`` vectors.

    Parameters
    ----------
    op : SymmetricOperator
        The symmetric operator :math:`H` (dimension ``n = op.dim``).
    k : int
        Number of eigenpairs, ``1 <= k < n``.
    which : {"LA", "SA", "LM", "BE"}
        Largest algebraic, smallest algebraic, largest magnitude, or both ends (``ceil(k/2)`` from the top,
        ``floor(k/2)`` from the bottom).
    tol : float
        Relative tolerance: a pair is converged when ``||H x - theta x|| <= tol * max|theta|`` (``max``
        over the Ritz values of the basis, about ``||H||_2``). The eigenvalue error is at most the residual,
        and about ``residual^2 / gap`` for an eigenvalue ``gap`` away from the others; the eigenvector
        angle about ``residual / gap``. It must be above the rounding unit of the operator dtype
        (``1.2e-7`` for float32, where ``1e-5`` is realistic).
    max_products : int, optional
        Products with ``H`` allowed in the iteration (the ``k`` residual products come on top). Default
        ``max(1000, 50 * basis_size)``. Running out returns the current pairs with ``converged`` False
        where they fell short, and warns.
    num_extra : int, optional
        ``p``: the basis holds ``m = min(k + p, n)`` vectors. Default ``max(k + 1, 20 - k)``, i.e.
        ``m = max(2k + 1, 20)``, scipy's (ARPACK's) default ``ncv``. The basis is the memory of the run:
        ``m`` vectors of the operator's size and dtype (``20 x 4 x 5.3e6`` bytes = 423 MB for a float32
        5.3 M-parameter Hessian), allocated once and flat in the number of products. A larger basis restarts
        less and needs fewer products on clustered spectra (down to those of unrestarted Lanczos, which keeps
        every vector); a smaller one (down to ``p = 1``) saves memory at the cost of more products (products
        against basis size on the benchmark Hessian: ``benchmarks/RESULTS.md``).
    seed : int
        Seed of the start vector (Rademacher, unless ``v0`` is given) and of the Gaussian vectors drawn
        for multiplicity checks and after an invariant subspace is found.
    v0 : list of tensors, optional
        Start vector (normalised here), e.g. an eigenvector of a previous run.
    check_multiplicity : bool
        After the wanted pairs converge (to ``tol / 2``), restart from a random vector orthogonal to them
        until the best pair outside them has settled (at least 6 products; more when the next eigenvalue is
        close to the wanted set), to find copies of repeated eigenvalues that one Krylov sequence cannot
        see. Off by default, as in ARPACK (scipy's ``eigsh``) and every single-vector Krylov method: an
        exactly repeated eigenvalue is not generic for the Hessian of a trained model, and the check costs
        what resolving the next eigenvalue behind the wanted set costs (``benchmarks/RESULTS.md``). Turn it
        on where
        symmetry can make eigenvalues repeat (tied or permuted weights, a symmetric initialisation) or
        where a missed copy would change a conclusion.
    progress : bool
        Show a progress bar (over products).
    callback : callable, optional
        ``callback(state)`` after every product, with the :class:`EigshState` (e.g. to watch memory). An
        exception it raises stops the run (a checkpointed run then resumes from its last saved state).
    checkpoint_dir : path, optional
        A folder to checkpoint in (created if needed; layout in :mod:`hess_utils.algorithms._eigsh_store`).
        The state is saved atomically at a restart every ``checkpoint_every`` restarts, and the result at the
        end. Calling again with the same arguments resumes from the last saved state and performs the same
        floating-point operations as an uninterrupted run (bit-identical results on a deterministic
        operator); a finished folder returns its saved result without any product. A folder of another
        configuration or operator (``dim``, dtypes, parameter names and shapes) is refused.
    checkpoint_every : int
        Restarts between saved states (each rewrites the ``f <= basis_size`` kept rows and ``r``); a cycle
        between restarts is at most ``basis_size - k`` products. 0 saves the result only.
    checkpoint_config : dict, optional
        Extra JSON fields stored in the folder's ``config.json`` and compared on a re-run (model, data, ...:
        what the operator's fingerprint cannot tell apart).
    is_writer : bool, optional
        Whether this process writes the checkpoint; default rank 0 under torch.distributed, else True.
        Every rank reads it to resume.

    Returns
    -------
    EigshResult
        Eigenvalues ascending, true residuals, convergence flags and counters.

    Notes
    -----
    Memory: ``basis_size`` vectors in the operator's dtype on its devices, allocated once, plus two work vectors;
    at the end ``k`` more for the returned eigenvectors. Dot products and all small matrices are float64.

    Raises
    ------
    ValueError
        For ``k >= n``, an unknown ``which``, ``tol`` not above the dtype's rounding unit, ``max_products``
        below one cycle, a zero or non-finite ``v0``, or a product with non-finite entries; for a
        ``checkpoint_dir`` holding another run (every differing key named, with the fix).
    EigshCheckpointError
        (a ``ValueError``) for a checkpoint that fails verification (truncated, corrupted, unreadable):
        nothing is recomputed over it.
    """
    k, m, max_products = _check_config(op, k, which, tol, num_extra, max_products)
    seed = check_seed(seed)
    r0 = _start_vector(op, v0, "rademacher", seed)
    state = EigshState(
        basis=_allocate_basis(r0, m, offload=False),
        T=np.zeros((m, m)),
        b=np.zeros(0),
        r=r0,
    )
    rtol = default_breakdown_rtol(op.dtypes)
    confirmed: np.ndarray | None = None  # wanted Ritz values under (or after) a multiplicity check
    checking = False  # a check has started: accept a converged wanted set once the pairs outside it settle

    store = None
    if checkpoint_dir is not None:
        checkpoint_every = check_count("checkpoint_every", checkpoint_every, minimum=0)
        config = store_.eigsh_config(op, k=k, which=which, tol=tol, max_products=max_products, basis_size=m,
                                     seed=seed, check_multiplicity=check_multiplicity, v0=v0,
                                     extra=checkpoint_config)
        store = store_.EigshStore(checkpoint_dir, config, _default_writer() if is_writer is None else bool(is_writer))
        pointer = store.open()
        store_.check_same_on_all_ranks(op, store)
        if pointer is not None and pointer["finished"]:
            fields, vectors = store.load_result(op)
            if progress and store.is_writer:
                print(f"{store.folder} holds this finished eigsh run: loaded its result, no product computed",
                      flush=True)
            return EigshResult(eigenvectors=vectors, **fields)
        if pointer is not None:
            saved = store.load_state(op, state.basis)
            confirmed, checking = saved.pop("confirmed"), saved.pop("checking")
            for name, value in saved.items():
                setattr(state, name, value)
            if progress and store.is_writer:
                print(f"resuming eigsh from {store.folder} at restart {state.num_restarts} "
                      f"({state.num_products} products done)", flush=True)
    last_saved = state.num_restarts

    check_length = min(_CHECK_LENGTH, m - k)  # check vectors in the basis before a check may stop
    cycle_draws = state.draws  # random draws at the start of this cycle (a breakdown since: wait for a full basis)

    with progress_bar(total=max_products, initial=state.num_products, desc=f"eigsh {which}",
                      disable=not progress) as bar:
        while True:
            if store is not None and checkpoint_every and state.num_restarts - last_saved >= checkpoint_every:
                # Between restarts the relation H Q_f = Q_f T_f + r b^T and the two flags are the whole state:
                # resuming here repeats the very operations that follow.
                store.save_state(state, confirmed, checking)
                last_saved = state.num_restarts
            if state.filled < m and state.r is not None and state.num_products < max_products:
                _expand(op, state, seed, rtol)
                bar.update(1)
                if callback is not None:
                    callback(state)
            # Decisions after every product (T_f is at most basis_size x basis_size, its eigh costs nothing next
            # to a product): a cycle stops as soon as the wanted pairs meet the tolerance, not at a full basis.
            theta, S, estimates, order = _analyse(state, which)
            scale = float(np.abs(theta).max())
            state.norm_estimate = max(state.norm_estimate, scale)
            bound = tol * scale
            wanted = order[:k]
            ok = estimates[order] <= bound
            num_conv = int(np.argmin(ok)) if not ok.all() else len(ok)  # leading wanted pairs converged
            set_postfix(bar, f"converged {min(num_conv, k)}/{k}, restarts {state.num_restarts}")
            if state.r is None:
                break  # the basis spans the space: the Ritz pairs are exact
            full = state.filled >= m
            # An invariant subspace found in this cycle makes its Ritz pairs exact, not the wanted ones: decide
            # only once the basis is full (the vectors after the breakdown explore the rest of the space).
            decide = full or state.draws == cycle_draws
            if checking:
                # The best pairs outside the wanted set must settle clearly behind it: they approximate the
                # extremes of H deflated by the locked pairs, where a missed copy would show; the check's
                # sequence has at least ``check_length`` vectors first.
                decide = decide and (full or state.filled - k >= check_length)
                settled = decide and _settled_outside(theta, estimates, order, k, which, bound)
            else:
                settled = decide
            if num_conv >= k and settled:
                values = np.sort(theta[wanted])
                new = confirmed is None or np.abs(values - confirmed).max() > 10 * bound
                if not (check_multiplicity and new):
                    break
                if state.num_products + check_length > max_products:
                    break  # no budget left for a check
                if np.all(estimates[wanted] <= _LOCK_FRACTION * bound):
                    confirmed = values
                    _lock_and_inject(op, state, theta, S, wanted, seed)
                    cycle_draws = state.draws
                    checking = True
                    continue
                # else: converge them further before locking drops their couplings
            if state.num_products >= max_products:
                break
            if not full:
                continue
            l = min(max(k, num_conv + int((m - num_conv) * _KEEP_FRACTION)), m - 1)
            _restart(state, theta, S, order[:l])
            cycle_draws = state.draws

    # Final pairs, ascending, and their true residuals (k products).
    pick = wanted[np.argsort(theta[wanted], kind="stable")]
    values = theta[pick].astype(np.float64)
    vectors = _combine_rows(state.basis, S[:, pick], op.shapes)
    state.basis = []  # free the basis before the residual products
    residuals = np.empty(k)
    for i, (value, x) in enumerate(zip(values, vectors, strict=True)):
        hx = owned_matvec(op, x)
        V.axpy_(-float(value), x, hx)
        residuals[i] = V.norm(hx)
    num_products = state.num_products + k
    converged = residuals <= tol * scale
    if not converged.all():
        warnings.warn(
            f"eigsh({which!r}): {int(converged.sum())} of {k} eigenpairs reached tol={tol:g} after "
            f"{num_products} products (worst relative residual {float((residuals / max(scale, 1e-300)).max()):.1e}); "
            "raise max_products or num_extra, or loosen tol",
            RuntimeWarning,
            stacklevel=2,
        )
    fields = dict(
        eigenvalues=values,
        residuals=residuals,
        converged=converged,
        scale=scale,
        tol=float(tol),
        which=which,
        num_products=num_products,
        num_restarts=state.num_restarts,
        num_multiplicity_checks=state.num_multiplicity_checks,
        basis_size=m,
        seed=seed,
    )
    if store is not None:
        store.save_result(op, fields, vectors)
        store_.wait_for_writer()
    return EigshResult(eigenvectors=vectors, **fields)
