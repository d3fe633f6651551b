"""Linear solves with a damped operator: conjugate gradients, MINRES, and influence functions.

Both solvers find ``x`` with :math:`(H + \\lambda I) x = b` from products with :math:`H` alone (the damping
is added to each product as :math:`\\lambda v`), keeping O(1) vectors:

* :func:`cg` (Hestenes & Stiefel 1952) minimises the :math:`(H + \\lambda I)`-norm of the error over the
  Krylov space; it needs :math:`H + \\lambda I` positive definite. A direction with
  :math:`p^\\top (H + \\lambda I) p \\le 0` proves it is not, and CG stops with a ValueError instead of
  returning a meaningless iterate (a Hessian of a language model is indefinite unless damped past
  :math:`-\\lambda_{\\min}`).
* :func:`minres` (Paige & Saunders 1975) minimises the residual norm :math:`\\lVert b - (H + \\lambda I)
  x \\rVert` over the same space with the Lanczos recurrence and Givens rotations; it needs only symmetry,
  so it solves indefinite systems.

Vectors stay in the operator's dtype on its devices; every scalar (step lengths, rotations, norms) is a
float64 reduction (:mod:`hess_utils.vectors`). The stopping test is the relative residual
:math:`\\lVert r \\rVert / \\lVert b \\rVert \\le` ``tol`` on the recurrence's residual; the recurrence and
the true residual drift apart in floating point, so when the recurrence says converged the true residual is
recomputed (one product) and, if it misses ``tol``, the method restarts from the current iterate with the
true residual ("residual replacement", at most :data:`MAX_REPLACEMENTS` times). ``converged`` reports the
true residual.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hess_utils import vectors as V
from hess_utils._memory import holds_freed_memory
from hess_utils.algorithms._frozen import freeze_arrays
from hess_utils.algorithms._products import owned_matvec
from hess_utils.algorithms.probes import check_count
from hess_utils.operators.base import SymmetricOperator
from hess_utils.progress import progress_bar, set_postfix
from hess_utils.vectors import TensorList

METHODS = ("cg", "minres")

#: Restarts from the true residual after the recurrence claimed convergence but the true residual did not.
MAX_REPLACEMENTS = 3

Preconditioner = Callable[[TensorList], Sequence[torch.Tensor]] | Sequence[torch.Tensor]


# ---------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class SolveResult:
    """The solution of :math:`(H + \\lambda I) x = b` by :func:`cg` or :func:`minres`.

    Attributes
    ----------
    x : list of tensors
        The solution, laid out like ``op.zeros()``.
    residual_norms : np.ndarray, shape (num_iters + 1 + num_replacements,)
        The method's relative residual after each iteration (entry 0: the start), float64: the recurrence's
        ``||r_i|| / ||b||`` for CG and unpreconditioned MINRES; for preconditioned MINRES the residual in the
        preconditioner's norm ``||r_i||_{M^-1} / ||b||_{M^-1}``. A residual replacement appends the true
        residual it restarts from.
    true_residual : float
        ``||b - (H + damping I) x|| / ||b||`` recomputed from ``x`` with one product at the end.
    converged : bool
        ``true_residual <= tol``.
    num_iters : int
        Iterations (one product each).
    num_products : int
        All products with ``H``: iterations, the start residual for a given ``x0``, and every true-residual
        check.
    num_replacements : int
        Restarts from the true residual.
    method : str
        ``"cg"`` or ``"minres"``.
    damping : float
        :math:`\\lambda`.
    tol : float
        The relative tolerance asked for.
    """

    x: TensorList
    residual_norms: np.ndarray
    true_residual: float
    converged: bool
    num_iters: int
    num_products: int
    num_replacements: int
    method: str
    damping: float
    tol: float

    def __post_init__(self) -> None:
        freeze_arrays(self)

    def __repr__(self) -> str:
        return (
            f"SolveResult(method={self.method!r}, converged={self.converged}, "
            f"true_residual={self.true_residual:.1e}, num_iters={self.num_iters}, "
            f"num_products={self.num_products}, damping={self.damping:g})"
        )

    def to_frame(self):
        """The residual history, one row per entry of ``residual_norms``: columns ``entry, relative_residual``
        (entries are iterations, plus the true residual each replacement restarts from)."""
        import pandas as pd

        return pd.DataFrame(
            {"entry": np.arange(self.residual_norms.size), "relative_residual": self.residual_norms}
        )


# ---------------------------------------------------------------------------------------------- checks
def _check_vector(op: SymmetricOperator, v: Sequence[torch.Tensor], name: str) -> TensorList:
    """``v`` placed on the operator's devices/dtypes, with a ValueError naming ``name`` if it does not fit."""
    try:
        v = op.check_vector(v)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name} does not match the operator: {err}. Build it like op.zeros() (one tensor per block, "
            "shaped like the selected parameters)"
        ) from err
    if not all(bool(torch.isfinite(t).all()) for t in v):
        raise ValueError(f"{name} has non-finite entries")
    return v


def _check_common(op: SymmetricOperator, damping: float, tol: float, max_iters: int | None) -> tuple[float, int]:
    if not (isinstance(damping, numbers.Real) and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite number, got {damping!r}")
    if not (isinstance(tol, numbers.Real) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0 (relative residual), got {tol!r}")
    if max_iters is None:
        max_iters = min(2 * op.dim, 10_000)
    return float(damping), check_count("max_iters", max_iters)


def _make_preconditioner(op: SymmetricOperator, preconditioner: Preconditioner | None):
    """A function ``r -> M^{-1} r`` (new vector list), or None for no preconditioning.

    A vector list is the diagonal ``d`` of ``M`` (Jacobi): ``M^{-1} r = r / d``, entries must be positive.
    """
    if preconditioner is None:
        return None
    if callable(preconditioner):
        def apply(r: TensorList) -> TensorList:
            z = preconditioner(V.clone(r))  # a copy: the function may work in place
            try:
                return op.check_vector(z)
            except (ValueError, TypeError) as err:
                raise ValueError(f"the preconditioner returned a vector that does not fit the operator: {err}") from err

        return apply
    if isinstance(preconditioner, torch.Tensor) or not isinstance(preconditioner, Sequence):
        raise ValueError(
            "preconditioner must be None, a function on vector lists, or a vector list holding the diagonal "
            f"of M (like op.zeros()), got {type(preconditioner).__name__}"
        )
    diagonal = _check_vector(op, preconditioner, "the diagonal preconditioner")
    if not all(bool((d > 0).all()) for d in diagonal):
        raise ValueError(
            "a diagonal preconditioner needs positive entries (M must be positive definite); use e.g. "
            "d.abs().clamp_min(eps) + damping"
        )

    def apply_diagonal(r: TensorList) -> TensorList:
        return [ri / di for ri, di in zip(r, diagonal, strict=True)]

    return apply_diagonal


def _damped_product(op: SymmetricOperator, v: TensorList, damping: float) -> TensorList:
    """``(H + damping I) v`` as a new vector list the caller owns."""
    out = owned_matvec(op, v)
    if damping != 0.0:
        V.axpy_(damping, v, out)
    return out


def _true_residual(op: SymmetricOperator, b: TensorList, x: TensorList, damping: float) -> TensorList:
    """``b - (H + damping I) x``."""
    out = _damped_product(op, x, damping)
    V.scale_(-1.0, out)
    V.axpy_(1.0, b, out)
    return out


def _not_spd_preconditioner(value: float) -> ValueError:
    return ValueError(
        f"the preconditioner gave r^T M^-1 r = {value:.3e}, not > 0: it must be symmetric positive definite "
        "(a diagonal one needs positive entries; a function must return a positive definite transform of r)"
    )


def _not_positive_definite(what: str, value: float, iteration: int, damping: float) -> ValueError:
    return ValueError(
        f"CG found {what} = {value:.3e} <= 0 at iteration {iteration}: H + {damping:g} I is not positive "
        f"definite for damping={damping:g}, so CG does not apply. Increase damping above -lambda_min(H) "
        "(eigsh(op, k=1, which='SA') estimates lambda_min), or use minres(op, b, damping=...), which "
        "solves indefinite systems"
    )


# ---------------------------------------------------------------------------------------------- CG
def _cg_run(op, b_norm, x, r, damping, tol, budget, precond, history, bar, start_iter):
    """CG iterations from ``x`` with residual ``r`` (both updated in place) until the recurrence meets ``tol``."""
    z = precond(r) if precond is not None else r
    rz = V.dot(r, z)
    if precond is not None and not rz > 0 and V.norm(r) > 0:
        raise _not_spd_preconditioner(rz)
    p = V.clone(z)
    iters = 0
    while iters < budget and history[-1] > tol:
        ap = _damped_product(op, p, damping)
        iters += 1
        p_ap = V.dot(p, ap)
        if not math.isfinite(p_ap):
            raise ValueError(f"the operator returned non-finite values at CG iteration {start_iter + iters}")
        if p_ap <= 0:
            raise _not_positive_definite("p^T (H + damping I) p", p_ap, start_iter + iters, damping)
        alpha = rz / p_ap
        V.axpy_(alpha, p, x)
        V.axpy_(-alpha, ap, r)
        history.append(V.norm(r) / b_norm)
        bar.update(1)
        set_postfix(bar, f"residual {history[-1]:.1e}")
        if history[-1] <= tol:
            break
        z = precond(r) if precond is not None else r
        rz_new = V.dot(r, z)
        if precond is not None and not rz_new > 0:
            raise _not_spd_preconditioner(rz_new)
        # p <- z + (rz_new / rz) p, in place
        V.scale_(rz_new / rz, p)
        V.axpy_(1.0, z, p)
        rz = rz_new
    return iters


# ---------------------------------------------------------------------------------------------- MINRES
def _minres_run(op, b_norm_m, x, r0, damping, tol, budget, precond, history, bar, start_iter):
    """MINRES iterations from ``x`` (updated in place) with residual ``r0`` until the estimate meets ``tol``.

    Lanczos on the (preconditioned) operator, ``beta_{j+1} v_{j+1} = A v_j - alpha_j v_j - beta_j v_{j-1}``,
    gives ``A V_j = V_{j+1} T_{j+1,j}``; ``min_y ||beta_1 e_1 - T_{j+1,j} y||`` is solved by updating a QR
    factorisation of ``T`` with one Givens rotation per step (its upper triangle has three diagonals:
    ``gamma``, ``delta``, ``epsilon``). The search directions ``w_j = (v_j - delta_j w_{j-1} - epsilon_j
    w_{j-2}) / gamma_j`` turn the update into ``x += phi_j w_j``, and ``|phibar_j|`` is the residual norm.
    The vectors ``r`` below are the unpreconditioned Lanczos vectors (``v = M^{-1} r / beta``).
    """
    r_prev: TensorList | None = None
    r_cur = V.clone(r0)
    y = precond(r_cur) if precond is not None else r_cur  # only read until replaced
    beta2 = V.dot(r_cur, y)
    if precond is not None and not beta2 > 0:
        raise _not_spd_preconditioner(beta2)
    beta = math.sqrt(beta2)
    old_beta = 0.0
    # Previous rotation (cs, sn) and the entries it left in the next column of R.
    cs, sn = -1.0, 0.0
    dbar, eps = 0.0, 0.0
    phibar = beta
    w_prev = V.zeros_like(x)
    w_prev2 = V.zeros_like(x)
    iters = 0
    while iters < budget and history[-1] > tol:
        v = V.scaled(1.0 / beta, y)
        y = _damped_product(op, v, damping)
        iters += 1
        if r_prev is not None:
            V.axpy_(-beta / old_beta, r_prev, y)
        alpha = V.dot(v, y)
        if not math.isfinite(alpha):
            raise ValueError(f"the operator returned non-finite values at MINRES iteration {start_iter + iters}")
        V.axpy_(-alpha / beta, r_cur, y)
        r_prev, r_cur = r_cur, y
        y = precond(r_cur) if precond is not None else r_cur
        old_beta = beta
        beta2 = V.dot(r_cur, y)
        if not beta2 >= 0:
            raise _not_spd_preconditioner(beta2)
        beta = math.sqrt(beta2)
        # Apply the previous rotation to this column (old_beta above the diagonal, alpha on it) and to the
        # next column's entry beta.
        old_eps = eps
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        eps = sn * beta
        dbar = -cs * beta
        # The new rotation annihilates beta below the diagonal.
        gamma = math.hypot(gbar, beta)
        if gamma == 0.0:
            break  # singular and b outside the range: the residual can shrink no further
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w_new = V.add(v, w_prev2, alpha=-old_eps)
        V.axpy_(-delta, w_prev, w_new)
        V.scale_(1.0 / gamma, w_new)
        V.axpy_(phi, w_new, x)
        w_prev2, w_prev = w_prev, w_new
        history.append(abs(phibar) / b_norm_m)
        bar.update(1)
        set_postfix(bar, f"residual {history[-1]:.1e}")
        if beta == 0.0:
            break  # invariant Krylov space: x is exact
    return iters


# ---------------------------------------------------------------------------------------------- driver
def _solve(
    method: str,
    op: SymmetricOperator,
    b: Sequence[torch.Tensor],
    damping: float,
    tol: float,
    max_iters: int | None,
    preconditioner: Preconditioner | None,
    x0: Sequence[torch.Tensor] | None,
    progress: bool,
) -> SolveResult:
    damping, max_iters = _check_common(op, damping, tol, max_iters)
    b = _check_vector(op, b, "b")
    precond = _make_preconditioner(op, preconditioner)
    b_norm = V.norm(b)
    if b_norm == 0.0:
        return SolveResult(
            x=op.zeros(), residual_norms=np.zeros(1), true_residual=0.0, converged=True, num_iters=0,
            num_products=0, num_replacements=0, method=method, damping=damping, tol=float(tol),
        )
    products = 0
    if x0 is None:
        x = op.zeros()
        r = V.clone(b)
    else:
        x = V.clone(_check_vector(op, x0, "x0"))
        r = _true_residual(op, b, x, damping)
        products += 1
    # The norm the recurrence measures: ||.||_2 except for preconditioned MINRES, ||.||_{M^-1}.
    if method == "minres" and precond is not None:
        b_scale = math.sqrt(max(V.dot(b, precond(b)), 0.0))
        start = math.sqrt(max(V.dot(r, precond(r)), 0.0)) / b_scale
    else:
        b_scale = b_norm
        start = V.norm(r) / b_norm
    history = [start]
    iters = 0
    replacements = 0
    run = _cg_run if method == "cg" else _minres_run
    inner_tol = tol  # what the recurrence must reach; tightened when the true residual lags behind it
    with progress_bar(total=max_iters, desc=method, disable=not progress) as bar:
        while True:
            iters += run(op, b_scale, x, r, damping, inner_tol, max_iters - iters, precond, history, bar, iters)
            r = _true_residual(op, b, x, damping)
            products += 1
            true = V.norm(r) / b_norm
            if true <= tol or iters >= max_iters or replacements >= MAX_REPLACEMENTS:
                break
            if history[-1] > inner_tol:
                break  # the recurrence stopped without converging (MINRES on a singular system)
            # The recurrence met its target but the true residual did not (rounding drift, or for
            # preconditioned MINRES another norm): restart from the true residual with a target lowered
            # by the factor that was missed.
            replacements += 1
            inner_tol *= 0.5 * tol / true
            history.append(
                math.sqrt(max(V.dot(r, precond(r)), 0.0)) / b_scale
                if method == "minres" and precond is not None else true
            )
        set_postfix(bar, f"true residual {true:.1e}")
    return SolveResult(
        x=x, residual_norms=np.asarray(history, dtype=np.float64), true_residual=float(true),
        converged=bool(true <= tol), num_iters=iters, num_products=products + iters,
        num_replacements=replacements, method=method, damping=damping, tol=float(tol),
    )


@holds_freed_memory
def cg(
    op: SymmetricOperator,
    b: Sequence[torch.Tensor],
    damping: float = 0.0,
    tol: float = 1e-10,
    max_iters: int | None = None,
    preconditioner: Preconditioner | None = None,
    x0: Sequence[torch.Tensor] | None = None,
    progress: bool = True,
) -> SolveResult:
    """Solve :math:`(H + \\lambda I) x = b` by (preconditioned) conjugate gradients.

    Parameters
    ----------
    op : SymmetricOperator
        :math:`H`; ``H + damping I`` must be positive definite.
    b : list of tensors
        Right-hand side, laid out like ``op.zeros()``.
    damping : float
        :math:`\\lambda`, added to every product as ``damping * v``.
    tol : float
        Relative residual ``||b - (H + lambda I) x|| / ||b||`` to reach.
    max_iters : int, optional
        Iterations (one product each); default ``min(2 * dim, 10000)``. In exact arithmetic CG ends within
        ``dim`` iterations, in floating point it may need more on ill-conditioned systems.
    preconditioner : callable or list of tensors, optional
        :math:`M^{-1}`, symmetric positive definite, approximating :math:`(H + \\lambda I)^{-1}`: a function
        ``r -> M^{-1} r`` on vector lists, or a vector list holding the positive diagonal of
        :math:`M \\approx H + \\lambda I` (Jacobi: ``r / d``; e.g. a Hutchinson diagonal plus the damping).
    x0 : list of tensors, optional
        Start iterate (default zero; a given one costs one product).
    progress : bool
        Show a progress bar.

    Returns
    -------
    SolveResult

    Raises
    ------
    ValueError
        When ``p^T (H + lambda I) p <= 0`` for a search direction ``p``: the damped operator is not positive
        definite (increase ``damping`` or use :func:`minres`); for a ``b`` or ``x0`` that does not fit the
        operator, a bad ``damping``, ``tol``, ``max_iters`` or preconditioner.
    """
    return _solve("cg", op, b, damping, tol, max_iters, preconditioner, x0, progress)


@holds_freed_memory
def minres(
    op: SymmetricOperator,
    b: Sequence[torch.Tensor],
    damping: float = 0.0,
    tol: float = 1e-10,
    max_iters: int | None = None,
    preconditioner: Preconditioner | None = None,
    x0: Sequence[torch.Tensor] | None = None,
    progress: bool = True,
) -> SolveResult:
    """Solve :math:`(H + \\lambda I) x = b` for symmetric, possibly indefinite :math:`H + \\lambda I` by MINRES.

    Each iterate minimises ``||b - (H + lambda I) x||`` over the Krylov space (Paige & Saunders 1975), so the
    residual never grows. The parameters are those of :func:`cg`; a preconditioner must still be symmetric
    positive definite (a diagonal one: positive entries, e.g. ``|diag(H)| + damping``), and with one the
    recurrence measures the residual in the norm ``||r||_{M^{-1}}``, the stopping test the true 2-norm.

    Returns
    -------
    SolveResult
        For a singular, inconsistent system the residual stalls and ``converged`` is False.
    """
    return _solve("minres", op, b, damping, tol, max_iters, preconditioner, x0, progress)


@holds_freed_memory
def influence(
    op: SymmetricOperator,
    grad_test: Sequence[torch.Tensor],
    grad_train: Sequence[torch.Tensor],
    damping: float = 0.0,
    method: str = "cg",
    tol: float = 1e-10,
    max_iters: int | None = None,
    preconditioner: Preconditioner | None = None,
    progress: bool = True,
) -> float:
    """Influence of upweighting a training example on a test loss, :math:`-g_t^\\top (H + \\lambda I)^{-1} g_z`.

    This is Koh and Liang's "influence of upweighting z on the loss at z_test" (Understanding Black-box
    Predictions via Influence Functions, ICML 2017): upweighting the training example by a small
    :math:`\\epsilon` changes the test loss by about :math:`\\epsilon` times this value, so a negative value
    means the example helps (upweighting it lowers the test loss), a positive one that it hurts; removing
    one of ``n`` equally weighted examples (:math:`\\epsilon = -1/n`) changes the test loss by about
    ``-value / n``. The damping :math:`\\lambda` makes the indefinite Hessian of a non-convex model
    invertible, as in their treatment of non-convex models.

    With :math:`g_t` = ``grad_test`` and :math:`g_z` = ``grad_train``, it solves
    :math:`(H + \\lambda I) s = g_t` (Koh and Liang's :math:`s_{test}`, reusable for every
    training example: call :func:`cg` or :func:`minres` once and take ``-dot(s, g_train)``) and returns
    :math:`-s^\\top g_z` (equal by symmetry).

    Parameters
    ----------
    op : SymmetricOperator
        :math:`H`, the Hessian of the training loss.
    grad_test, grad_train : list of tensors
        Gradients of the test and the training loss, laid out like ``op.zeros()``.
    damping : float
        :math:`\\lambda`.
    method : {"cg", "minres"}
        CG needs ``H + damping I`` positive definite; MINRES does not.
    tol, max_iters, preconditioner, progress
        As in :func:`cg`.

    Returns
    -------
    float
        ``-grad_test^T (H + damping I)^{-1} grad_train``. Warns when the solve did not reach ``tol``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    grad_train = _check_vector(op, grad_train, "grad_train")
    solver = cg if method == "cg" else minres
    result = solver(
        op, grad_test, damping=damping, tol=tol, max_iters=max_iters, preconditioner=preconditioner,
        progress=progress,
    )
    if not result.converged:
        warnings.warn(
            f"influence: {method} stopped at relative residual {result.true_residual:.1e} > tol={tol:g} after "
            f"{result.num_iters} iterations; raise max_iters or damping",
            RuntimeWarning,
            stacklevel=2,
        )
    return -V.dot(result.x, grad_train)
