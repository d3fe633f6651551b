"""The symmetric Lanczos process on a :class:`~hess_utils.operators.base.SymmetricOperator`.

Starting from a unit vector :math:`q_1`, the three-term recurrence

.. math::

    \\beta_j q_{j+1} = H q_j - \\alpha_j q_j - \\beta_{j-1} q_{j-1}, \\qquad
    \\alpha_j = q_j^\\top H q_j, \\qquad \\beta_j = \\lVert \\cdot \\rVert,

builds an orthonormal basis :math:`Q_k = [q_1, \\dots, q_k]` of the Krylov space
:math:`\\mathcal{K}_k(H, q_1)` in which :math:`Q_k^\\top H Q_k = T_k` is tridiagonal (diagonal
:math:`\\alpha_{1..k}`, off-diagonal :math:`\\beta_{1..k-1}`). With :math:`T_k = S \\Theta S^\\top`:

* the Ritz values :math:`\\theta_i` approximate eigenvalues of :math:`H` (extreme ones first);
* the Ritz weights :math:`s_{1i}^2` are the Gauss quadrature weights of the spectral measure of
  :math:`H` seen from :math:`q_1` (they sum to 1), the basis of stochastic Lanczos quadrature;
* :math:`|\\beta_k s_{ki}|` is the residual norm :math:`\\lVert H y_i - \\theta_i y_i \\rVert` of the Ritz
  vector :math:`y_i = Q_k s_i`, so an eigenvalue of :math:`H` lies within it of :math:`\\theta_i`.

In floating point the :math:`q_j` lose orthogonality as Ritz values converge and converged eigenvalues
reappear as extra copies ("ghosts"). ``reorth="full"`` keeps the basis and re-orthogonalises every new
vector against it (classical Gram-Schmidt, repeated when the first pass removed more than half of the
vector: "twice is enough"); ``reorth="offload"`` does the same
with the basis in CPU memory; ``reorth="none"`` keeps O(1) vectors and leaves ghosts to
:func:`~hess_utils.algorithms.ghosts.cullum_willoughby_mask`. ``reorth="partial"`` (SLQ's default) keeps the
basis like ``"full"`` but re-orthogonalises only when Simon's recurrence (:class:`OmegaEstimates`) estimates
that some :math:`|q_{j+1}^\\top q_k|` exceeds :math:`\\sqrt{\\varepsilon}`, and measures a vector against the
basis at least every :data:`CHECK_EVERY` steps to keep the estimates honest (and recalibrates them from measured
rows where they run far ahead of the truth): a semi-orthogonal basis, which
gives the same :math:`T_k` as a fully orthogonal one to working precision, for a fraction of the basis passes.

The run is a resumable state machine (:func:`lanczos_init`, :func:`lanczos_step`,
:func:`lanczos_finish`) so that it can be checkpointed between matrix-vector products;
:func:`lanczos` is the loop over it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from hess_utils import _threads
from hess_utils import vectors as V
from hess_utils._memory import holds_freed_memory
from hess_utils.algorithms._frozen import freeze_arrays, short_repr
from hess_utils.algorithms._products import owned_matvec
from hess_utils.algorithms.ghosts import cullum_willoughby_mask
from hess_utils.algorithms.probes import check_count, check_seed
from hess_utils.algorithms.tridiagonal import tridiagonal_eigh
from hess_utils.operators.base import SymmetricOperator
from hess_utils.progress import progress_bar, set_postfix
from hess_utils.vectors import TensorList

REORTH_MODES = ("full", "offload", "none", "partial")
CUSTOM_START = "custom"

# Half-precision matrix products return half-precision results (3 significant digits for bfloat16), too
# coarse for re-orthogonalisation coefficients; they are computed in float32 in chunks of this many columns.
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_HALF_CHUNK = 1 << 22

# Float32 reductions over millions of entries are not accurate to eps when a few entries dominate (the
# Lanczos vectors of an outlier-dominated spectrum): every later addition rounds at the level of the big
# partial sum, and MKL's sgemv lost 330 eps relative to ||w|| on the 5e6-entry benchmark vectors (the full
# basis then was only 5e-5 orthogonal). Reductions of float32 vectors on the CPU therefore sum chunks of
# this many entries in the vector dtype and add the chunk sums in float64 (2.4 eps there), at the cost of a
# plain float32 product (a float64 conversion costs 4-6 x more on one core), except for the chunks _HEAVY_SHARE picks.
_ACC_CHUNK = 1 << 14
# ... as long as the float32 products neither overflow nor fall below float32's smallest normal number: a sum of n
# products smaller than n times this (float32's tiny over its eps) may have lost more than eps to such products.
_FLOAT32_TINY_SUM = torch.finfo(torch.float32).tiny / torch.finfo(torch.float32).eps
# The matrix products against the basis (re-orthogonalisation coefficients, the measurements of reorth="partial",
# the orthogonality diagnostic) accumulate each float32 chunk in float32 for each output: where a chunk holds most
# of both vectors the error reached 250 eps of ||q|| ||w|| (Lanczos vectors of 16 000 entries, a narrow bulk under
# outliers), 30 times the MEASUREMENT_ULPS the estimates assume. A chunk's error scales with its share of the
# vectors, so a float32 chunk that holds more than this share of the squared norm of w (in the diagnostic: of a
# basis row) is summed with float64 products, as are rows of at most _ACC_CHUNK columns and the tails of longer
# ones (a float64 conversion of so few columns costs next to nothing; of a whole long row, 2.2 x the float32
# product). Fewer than 1 / _HEAVY_SHARE chunks of a vector can be heavy; vectors spread over many chunks keep the
# float32 products. The coefficients look at w's share only (the basis rows' shares would cost a pass over each new
# row): a chunk holding most of a basis row but at most 1/64 of w is left with an error of at most about 1/8 of what
# a chunk holding most of both would have (the error scales with ||q_chunk|| ||w_chunk||). A w so small that its
# float32 squares or products could underflow takes float64 products in every chunk.
_HEAVY_SHARE = 1.0 / 64

# reorth="partial": at most this many steps between two measurements of a new vector against the whole basis
# (OmegaEstimates.check_every). A check reads the basis once; every 10 steps that is 5 % of what "full" reads.
CHECK_EVERY = 10
# ... and at every one of the first 16 iterations, where the basis is short (a check of iteration j reads j rows: 136
# rows in all, about 9 reads of a 16-row basis). The outliers of an LM-like spectrum converge in these steps, where the
# loss grows by up to |outlier| / beta (about 200) a step: before a measurement has calibrated the rounding level, an
# estimate a few times low let a vector pass sqrt(eps) unmeasured between the checks at 4 and 8 that this schedule
# had (float32, n = 676 513: a true loss of 5.2e-4 against max_omega 3.2e-4, and 92 of 100 steps re-orthogonalised
# after the check at 8 raised the level; measured every step, 62 and the truth below max_omega).
EARLY_CHECKS = tuple(range(1, 17))
# reorth="partial": the starting rounding level of its estimates, in units of eps (omega_rounding).
ROUNDINGS_PER_STEP = 8
# reorth="partial": a crossing whose measured loss leaves at least this many steps of growth (at the rate the
# estimates grow) below the threshold recalibrates the estimates instead of re-orthogonalising
# (OmegaEstimates.worth_recalibrating).
RECALIBRATION_STEPS = 4
# ... and the measured rows it keeps are given a radius of this many eps, what a measurement may be off by
# (up to 6 eps measured on 4e5-entry float32 vectors; up to 6.7 eps on float32 vectors concentrated in a few chunks
# of columns, which take float64 products there, _HEAVY_SHARE, where float32 chunks were up to 250 eps off).
MEASUREMENT_ULPS = 8


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LanczosResult:
    """The tridiagonal matrix of a Lanczos run and its eigen-decomposition (all float64).

    Attributes
    ----------
    alphas : np.ndarray, shape (k,)
        Diagonal of :math:`T_k`.
    betas : np.ndarray, shape (k-1,)
        Off-diagonal of :math:`T_k`.
    ritz_values : np.ndarray, shape (k,)
        Eigenvalues :math:`\\theta_i` of :math:`T_k`, ascending.
    ritz_weights : np.ndarray, shape (k,)
        :math:`s_{1i}^2`, squared first components of the eigenvectors of :math:`T_k`; they sum to 1.
    ghost_mask : np.ndarray of bool, shape (k,)
        Cullum-Willoughby mask (:func:`~hess_utils.algorithms.ghosts.cullum_willoughby_mask`): True for
        spurious Ritz values and for the extra copies of numerically multiple ones. With full
        re-orthogonalisation (``reorth="full"`` or ``"offload"``) it is all False: ghosts need lost orthogonality.
    residual_estimates : np.ndarray, shape (k,)
        :math:`|\\beta_k s_{ki}|`, the residual norm of each Ritz pair (an eigenvalue of :math:`H` lies
        within it of :math:`\\theta_i`).
    orthogonality_loss : float
        :math:`\\max_{i \\ne j} |q_i^\\top q_j|` over the kept basis; NaN when ``reorth="none"``. With
        ``reorth="partial"`` it is the measured counterpart of ``max_omega`` (semi-orthogonality: at most
        about :math:`\\sqrt{\\varepsilon}`).
    breakdown : bool
        True when the last :math:`\\beta` fell to the breakdown tolerance: the Krylov space is invariant
        under :math:`H` and the Ritz values are eigenvalues of :math:`H` (up to rounding). This stops the
        run early (``num_iters`` then is smaller than requested) and happens at the latest at
        ``k = dim``.
    num_iters : int
        ``k``, the number of iterations run.
    last_beta : float
        :math:`\\beta_k`, the norm of the residual after the last iteration.
    reorth : str
        ``"full"``, ``"offload"``, ``"none"`` or ``"partial"``.
    seed : int or None
        Seed of the start vector, None when a start vector was given.
    probe : str
        Distribution of the start vector (``"rademacher"``, ``"gaussian"``), ``"custom"`` when given.
    num_reorth_steps : int
        ``reorth="partial"`` only: how many iterations re-orthogonalised their new vector (0 in the other
        modes, although ``"full"`` and ``"offload"`` do it at every iteration and ``"none"`` never).
    reorth_steps : tuple of int or None
        ``reorth="partial"`` only: those iterations ``j`` (1-based; iteration ``j`` makes :math:`q_{j+1}`),
        ascending; None in the other modes.
    max_omega : float or None
        ``reorth="partial"`` only: the largest estimate :math:`|\\omega_{ik}|` of
        :math:`|q_i^\\top q_k|`, :math:`k < i \\le` ``num_iters``, as kept after the resets, i.e. the
        estimate of ``orthogonality_loss`` (it should bound it); None in the other modes.
    check_steps : tuple of int or None
        ``reorth="partial"`` only: the iterations whose new vector was measured against the whole basis
        without needing a re-orthogonalisation (:attr:`OmegaEstimates.check_every`); None in the other modes.
    recalibration_steps : tuple of int or None
        ``reorth="partial"`` only: the iterations where the estimates crossed the threshold but the measured
        loss was far below it, so that the estimates were reset to the measured rows of the new and the
        previous vector instead of re-orthogonalising (:meth:`OmegaEstimates.recalibrate`); None in the other
        modes.
    omega_rounding : float or None
        ``reorth="partial"`` only: the rounding level :math:`\\varepsilon_1` of the estimates at the end: 8 eps
        (:func:`omega_rounding`) or the operator's ``product_rtol`` if larger, unless a measurement exceeded its
        estimate and raised it.
    """

    alphas: np.ndarray
    betas: np.ndarray
    ritz_values: np.ndarray
    ritz_weights: np.ndarray
    ghost_mask: np.ndarray
    residual_estimates: np.ndarray
    orthogonality_loss: float
    breakdown: bool
    num_iters: int
    last_beta: float
    reorth: str
    seed: int | None
    probe: str
    # Diagnostics of reorth="partial"; the defaults are those of every other mode, and of results built
    # before these fields existed (checkpoints).
    num_reorth_steps: int = 0
    reorth_steps: tuple[int, ...] | None = None
    max_omega: float | None = None
    check_steps: tuple[int, ...] | None = None
    omega_rounding: float | None = None
    recalibration_steps: tuple[int, ...] | None = None

    __repr__ = short_repr

    def __post_init__(self) -> None:
        freeze_arrays(self)

    def to_frame(self):
        """The Ritz table, one row per Ritz value, ascending: columns ``value, weight, ghost, residual``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "value": self.ritz_values,
                "weight": self.ritz_weights,
                "ghost": self.ghost_mask,
                "residual": self.residual_estimates,
            }
        )

    def tridiagonal(self) -> np.ndarray:
        """The ``(k, k)`` float64 matrix :math:`T_k`."""
        return np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1)

    def converged(self, tol: float = 1e-8, relative: bool = True) -> np.ndarray:
        """Mask ``(k,)`` of Ritz values whose residual estimate is at most ``tol``.

        With ``relative=True`` (default) the bound is ``tol * max |theta|``, i.e. relative to
        :math:`\\lVert T_k \\rVert_2`; otherwise ``tol`` is absolute.
        """
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        scale = float(np.max(np.abs(self.ritz_values))) if relative else 1.0
        return self.residual_estimates <= tol * scale

    @property
    def distinct_ritz_values(self) -> np.ndarray:
        """Ritz values not flagged by :attr:`ghost_mask`: each eigenvalue found is listed once."""
        return self.ritz_values[~self.ghost_mask]


def omega_rounding(unit_roundoff: float) -> float:
    """The starting rounding level :math:`\\varepsilon_1 = 8 \\varepsilon` of Simon's recurrence.

    :math:`\\varepsilon_1` models :math:`|q_j^\\top f_k|`, the component along a basis vector of the rounding
    error :math:`f_k` of one Lanczos step (:class:`OmegaEstimates`), and the loss a re-orthogonalised vector
    keeps. A step rounds each entry a handful of times (the product, the two updates of the recurrence,
    the basis pass, the division; its reductions are accurate to a few eps, :func:`_fast_dot`), hence
    :data:`ROUNDINGS_PER_STEP` times :math:`\\varepsilon`. The worst case, the whole error vector,
    :math:`\\varepsilon \\sqrt{n} \\lVert H q_k \\rVert`, aligned with :math:`q_j`, is far from what happens: the
    roundings of different entries point in no common direction, so their component along a unit vector is
    about :math:`\\varepsilon \\lVert H q_k \\rVert` whatever ``n``. A level growing with ``n`` re-orthogonalises
    a float32 model run nearly every step while the measured loss stays a thousand times lower
    (``benchmarks/RESULTS.md``). The tests check that the estimates bound the measured loss row by row
    on dense and diagonal operators (the latter the worst case: eigenvectors along coordinates, where an
    entry's rounding is all along one of them).

    What is not covered is an operator's own asymmetry: a finite-difference product, or any operator
    whose rounding depends on the vector, makes :math:`q_k^\\top \\tilde H q_j \\ne q_j^\\top \\tilde H q_k` by
    far more than :math:`\\varepsilon`. So the level is only where a run starts: every measured row (each
    re-orthogonalisation's coefficients, and a check at least every :data:`CHECK_EVERY` steps) that
    exceeds its estimate raises it (:meth:`OmegaEstimates.measured`); and an operator that knows its products
    to be less accurate declares it (``product_rtol``, finite differences), where the estimates then start.
    """
    return ROUNDINGS_PER_STEP * float(unit_roundoff)


@dataclass
class OmegaEstimates:
    """Simon's running estimates of the loss of orthogonality of a ``reorth="partial"`` run (float64).

    With :math:`\\omega_{ik} = q_i^\\top q_k`, multiply the computed recurrence
    :math:`\\beta_j q_{j+1} = H q_j - \\alpha_j q_j - \\beta_{j-1} q_{j-1} + f_j` by :math:`q_k^\\top`, the one of
    :math:`q_{k+1}` by :math:`q_j^\\top`, and subtract; the symmetry of :math:`H` cancels both products:

    .. math::

        \\beta_j \\omega_{j+1,k} = \\beta_k \\omega_{j,k+1} + (\\alpha_k - \\alpha_j) \\omega_{jk}
            + \\beta_{k-1} \\omega_{j,k-1} - \\beta_{j-1} \\omega_{j-1,k} + (q_j^\\top f_k - q_k^\\top f_j),
        \\qquad k < j,

    with :math:`\\omega_{kk} = 1`, :math:`\\omega_{j0} = 0`, :math:`\\beta_0 = 0`. The roundings are unknown but
    bounded: :math:`\\lVert f_i \\rVert \\le \\varepsilon_1 \\nu_i` with :math:`\\varepsilon_1` from
    :func:`omega_rounding` and :math:`\\nu_i = |\\alpha_i| + \\beta_{i-1} + \\beta_i \\ge \\lVert H q_i \\rVert`
    (exact: :math:`\\lVert H q_i \\rVert^2 = \\beta_{i-1}^2 + \\alpha_i^2 + \\beta_i^2`). Following Simon, the last
    term is replaced by its bound :math:`\\varepsilon_1 (\\nu_k + \\nu_j)`, with the sign that increases
    :math:`|\\omega_{j+1,k}|`, so that the estimates err on the pessimistic side. The local term, where
    :math:`\\alpha_j` makes :math:`q_j^\\top q_{j+1}` vanish up to the rounding of :math:`f_j`, is
    :math:`\\omega_{j+1,j} = \\psi_j = \\varepsilon_1 \\nu_j / \\beta_j`, and :math:`\\omega_{j+1,j+1} = 1`.

    Measurements. Whenever :math:`Q_j^\\top w` is computed (a re-orthogonalisation's first pass, or a check,
    due :attr:`check_every` steps after the last), the row is compared with the truth
    (:meth:`measured`): entries are raised to their measurement, and a measurement above the row's largest
    estimate raises the rounding level for the rest of the run. A checked vector found above the threshold
    is re-orthogonalised with the coefficients in hand.

    When :math:`\\max_k |\\omega_{j+1,k}| > \\sqrt{\\varepsilon}` the new vector is re-orthogonalised against the
    whole basis, and so is the next one (the three-term recurrence would otherwise pass the loss of
    :math:`q_j`, not re-orthogonalised, straight on to :math:`q_{j+2}` through
    :math:`\\beta_{j-1}\\omega_{j-1,k}`). The row of each re-orthogonalised vector is reset to what one
    classical Gram-Schmidt pass against a basis that is itself only semi-orthogonal leaves: with
    :math:`Q^\\top Q = I + E`, removing :math:`c = Q^\\top w` leaves :math:`Q^\\top w' = -E c`, so the reset level
    is :math:`\\varepsilon_1 + L \\lVert c \\rVert_1 / \\lVert w' \\rVert` with :math:`L` the largest estimate
    kept for a basis vector (:meth:`reset_level`). Only the two latest rows are kept.

    Recalibration. The estimates bound the roundings with their worst sign and size at every step, so they
    run ahead of the truth by a factor set in the first steps (about a hundred on a float32 LM Hessian) and
    keep that factor while both grow along a converged Ritz vector. When they cross, the new vector's row is
    measured anyway; where the measured loss is so far below the threshold that it would take
    :data:`RECALIBRATION_STEPS` steps of the current growth to reach it (:meth:`worth_recalibrating`), the
    previous vector's row is measured too and the two rows are replaced by the measured values, signs
    included (:meth:`recalibrate`), and the vector is kept. That costs two reads of the basis instead of the
    four of a re-orthogonalised pair, and postpones the next pair by about as many steps as the factor allows.
    Fast growth (well separated outliers) never qualifies, so such spectra are handled as before.

    Bounds. From the first recalibration or re-orthogonalisation on, each row is kept as a centre and a
    radius (:attr:`center`, :attr:`radius`), which bound the truth, :math:`|\\omega_{ik} - c_{ik}| \\le r_{ik}`,
    as long as the roundings obey the bound above (it also has to cover what a re-orthogonalisation of
    :math:`q_{k+1}` adds to the recurrence, :math:`q_j^\\top Q_k c`, at most
    :math:`\\lVert c \\rVert_1 \\max_i |\\omega_{ji}|`, of order :math:`\\varepsilon \\beta_k`): the centre
    follows the recurrence without its rounding term (exact arithmetic), and the radius the same recurrence in
    absolute values, plus
    :math:`\\varepsilon_1 (\\nu_k + \\nu_j)` a step. A measured row starts with the measurement as centre and
    the measurement's own error as radius; a re-orthogonalised row with centre 0 and the reset level as
    radius. The estimate is :math:`|c| + r`. Simon's signed recurrence is not a bound: its rounding term keeps
    the sign of the sum, and through the signed coefficients raising one entry lowers another. Far above the
    truth (its factor of a hundred from the start) that does not show; started at the truth it fell 0.2 %
    below a measured loss (a dense float64 matrix with triple eigenvalues), and started from a reset level
    it let a float64 diagonal operator's loss pass sqrt(eps) by 17 %. Before the first reset the estimates
    are Simon's, checked by the measurements: a measured entry above its estimate (beyond the
    measurement's error) is answered like a crossing (a re-orthogonalised pair), since patching the row
    with the measurement kept the estimates' signs and let the truth pass sqrt(eps) 37-fold unseen.

    How many steps are saved depends on the spectrum. Along a converged Ritz vector of eigenvalue
    :math:`\\lambda` the loss grows by about :math:`|\\lambda - \\alpha_j| / \\beta_j` per step, so with outliers
    far above the bulk of the spectrum (LM Hessians), orthogonality decays from rounding level to
    :math:`\\sqrt{\\varepsilon}` within a few steps and pairs come every few steps; spectra without such
    gaps lose it slowly and re-orthogonalise rarely.

    :math:`\\beta_j` enters only as a divisor (the :math:`\\beta_j` part of :math:`\\nu_j`, divided by
    :math:`\\beta_j`, is the constant :math:`\\varepsilon_1`), so an estimate can only grow when
    :math:`\\beta_j` shrinks. The estimates depend on the measurements, so a checkpoint stores them
    (:meth:`to_dict`); :func:`replay_omega_estimates` rebuilds them for a state saved without.

    Attributes
    ----------
    rounding : float
        :math:`\\varepsilon_1`.
    threshold : float
        :math:`\\sqrt{\\varepsilon}`, the semi-orthogonality level.
    iteration : int
        The Lanczos iteration ``j`` these estimates belong to (``current`` is the row of :math:`q_{j+1}`).
    current : np.ndarray, shape (j + 1,)
        :math:`\\omega_{j+1, 1..j+1}`.
    previous : np.ndarray, shape (j,), or None
        :math:`\\omega_{j, 1..j}` (None before the first iteration).
    pending : bool
        The next vector is re-orthogonalised whatever its estimates: the second of a pair.
    reorth_steps : list of int
        The iterations whose new vector was re-orthogonalised.
    row_max : list of float
        ``row_max[j - 1]`` is :math:`\\max_{k \\le j} |\\omega_{j+1,k}|` as kept (after any reset).
    check_every : int
        A new vector is measured against the whole basis (:math:`Q_j^\\top w`, one read of the basis, half
        a re-orthogonalisation) when this many steps have passed since the last measured one, so a rounding
        level that is too low is found within that many steps.
    since_check : int
        Steps since the last measured one (a re-orthogonalisation measures its vector too).
    check_steps : list of int
        The iterations whose new vector was measured without needing a re-orthogonalisation.
    recalibration_steps : list of int
        The iterations whose crossing was answered by :meth:`recalibrate` instead of a re-orthogonalisation.
    center, radius : np.ndarray, shape (j + 1,), or None
        From the first recalibration or re-orthogonalisation on: ``current`` as a signed centre and a radius
        (``current`` is ``sign(c) (|c| + r)``); None before (Simon's rows).
    previous_center, previous_radius : np.ndarray, shape (j,), or None
        The same for ``previous``.
    """

    rounding: float
    threshold: float
    iteration: int = 0
    current: np.ndarray = field(default_factory=lambda: np.ones(1))
    previous: np.ndarray | None = None
    pending: bool = False
    reorth_steps: list[int] = field(default_factory=list)
    row_max: list[float] = field(default_factory=list)
    check_every: int = CHECK_EVERY
    since_check: int = 0
    check_steps: list[int] = field(default_factory=list)
    recalibration_steps: list[int] = field(default_factory=list)
    center: np.ndarray | None = None
    radius: np.ndarray | None = None
    previous_center: np.ndarray | None = None
    previous_radius: np.ndarray | None = None
    # The centre and radius of the row :meth:`next_row` (or :meth:`measured`) last proposed, for :meth:`accept`;
    # only ever set inside one step, so a checkpoint (taken between steps) has nothing to save.
    proposed: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    _ARRAYS = ("current", "previous", "center", "radius", "previous_center", "previous_radius")

    @classmethod
    def start(cls, unit_roundoff: float, *, product_rtol: float | None = None) -> OmegaEstimates:
        """The estimates before the first iteration: :math:`\\omega_{11} = 1` only; the rounding level is
        :func:`omega_rounding`, or the operator's ``product_rtol`` where that is larger (finite differences)."""
        rounding = max(omega_rounding(unit_roundoff), product_rtol or 0.0)
        return cls(rounding=rounding, threshold=math.sqrt(unit_roundoff))

    def to_dict(self) -> dict:
        """Plain Python values (lists, floats) for a checkpoint; :meth:`from_dict` restores them bit for bit."""
        out = {"rounding": self.rounding, "threshold": self.threshold, "iteration": self.iteration,
               "pending": self.pending, "reorth_steps": list(self.reorth_steps), "row_max": list(self.row_max),
               "check_every": self.check_every, "since_check": self.since_check,
               "check_steps": list(self.check_steps), "recalibration_steps": list(self.recalibration_steps)}
        for name in self._ARRAYS:
            value = getattr(self, name)
            out[name] = None if value is None else [float(x) for x in value]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> OmegaEstimates:
        known = {f.name for f in fields(cls)} - {"proposed"}
        d = {k: v for k, v in d.items() if k in known}  # a field dropped since the checkpoint was written
        for name in cls._ARRAYS:  # a checkpoint from before the centre and radius: None, Simon's rows
            if d.get(name) is not None:
                d[name] = np.asarray(d[name], dtype=np.float64)
        return cls(**d)

    @property
    def bounded_mode(self) -> bool:
        """True from the first recalibration or re-orthogonalisation on: rows are kept as centre and radius."""
        return self.center is not None

    @staticmethod
    def _combined(center: np.ndarray, radius: np.ndarray) -> np.ndarray:
        """The row of estimates ``sign(c) (|c| + r)`` (the sign of a zero centre is +)."""
        return np.copysign(np.abs(center) + radius, center)

    @property
    def measurement_error(self) -> float:
        """What a measured entry :math:`|q_k^\\top w| / \\lVert w \\rVert` may be off by: :data:`MEASUREMENT_ULPS`
        eps."""
        return MEASUREMENT_ULPS * self.threshold**2

    def _measured_row(self, signed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre and radius of a measured row ``signed`` (shape ``(j,)``, without its diagonal 1): the
        measurement, and :attr:`measurement_error`."""
        center = np.append(np.asarray(signed, dtype=np.float64), 1.0)
        radius = np.full(center.shape, self.measurement_error)
        radius[-1] = 0.0
        return center, radius

    @staticmethod
    def _uncentred_row(bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre 0 and radius ``|bound|`` for a row known only by its bound (diagonal entry 1, radius 0)."""
        center = np.zeros_like(bound)
        center[-1] = 1.0
        radius = np.abs(bound)
        radius[-1] = 0.0
        return center, radius

    def check_due(self) -> bool:
        """True when the new vector must be measured: at each of the first 16 iterations (:data:`EARLY_CHECKS`:
        an operator rounding worse than the starting level is found, and a vector passing the threshold while the
        outliers converge is re-orthogonalised, before the first vectors have lost what no later
        re-orthogonalisation restores), then :attr:`check_every` steps after the last measured one."""
        return self.iteration + 1 in EARLY_CHECKS or self.since_check + 1 >= self.check_every

    def measured(self, row: np.ndarray, loss: np.ndarray, signed: np.ndarray | None = None) -> np.ndarray:
        """Compare the estimated ``row`` with the measured ``loss`` :math:`|q_k^\\top w| / \\lVert w \\rVert`,
        ``k <= j`` (float64, shape ``(j,)``; ``signed``: the same with signs); return the row to keep.

        Each entry is raised to its measurement where that is larger, so that the estimates continue from
        what is known. Where the largest measurement exceeds the largest estimate, the rounding model was too
        optimistic for this operator: :attr:`rounding` is raised by twice that ratio, so the later estimates
        grow faster. (Entries far below the row's maximum, at the rounding floor, do not recalibrate: their
        ratios are noise.) In the bounded mode (:attr:`bounded_mode`, from the first recalibration or reset on) the
        row restarts from the measurement, as centre and radius (class docstring).
        """
        est = np.abs(row[:-1])
        finite = bool(np.all(np.isfinite(loss)))
        if finite:
            self._raise_rounding(est, loss)
        if finite and self.proposed is not None and signed is not None:
            self.proposed = self._measured_row(signed)
            return self._combined(*self.proposed)
        if not finite or not np.any(loss > est):
            return row
        row = row.copy()
        row[:-1] = np.copysign(np.maximum(est, loss), row[:-1])
        return row

    def _raise_rounding(self, estimates: np.ndarray, loss: np.ndarray) -> None:
        """Raise :attr:`rounding` by twice the ratio by which the largest measured ``loss`` of a row exceeds its
        largest estimate (:meth:`measured`); nothing when the estimates hold."""
        biggest = float(np.max(estimates, initial=0.0))
        worst = float(np.max(loss, initial=0.0))
        if worst > biggest > 0.0:
            self.rounding *= 2.0 * worst / biggest

    def worth_recalibrating(self, row: np.ndarray, loss: np.ndarray) -> bool:
        """True when a crossing ``row`` (estimates) whose measured ``loss`` (shape ``(j,)``) is this far below
        the threshold should recalibrate rather than re-orthogonalise: the headroom ``threshold / max(loss)``
        must exceed ``g ** RECALIBRATION_STEPS``, ``g`` the factor by which the largest estimate grew in this
        step (at least 2). Not for the second vector of a pair, nor at the first iteration (no previous row).
        """
        if self.pending or self.iteration < 1 or not self.row_max:
            return False
        # An exact breakdown (beta_j = 0) makes the row inf or NaN (0/0 in a centre): re-orthogonalise. (NaN
        # would slip through max(2.0, nan), which is 2.0.)
        if not np.all(np.isfinite(row[:-1])):
            return False
        biggest = float(np.max(loss)) if loss.size else 0.0
        growth = max(2.0, float(np.max(np.abs(row[:-1]))) / max(self.row_max[-1], 1e-300))
        if not (math.isfinite(biggest) and math.isfinite(growth)):
            return False
        if biggest == 0.0:
            return True
        # In logarithms: near a breakdown (beta_j ~ 1e-80) growth ** 4 overflows a Python float.
        return math.log(self.threshold / biggest) > RECALIBRATION_STEPS * math.log(growth)

    def recalibrate(self, previous_loss: np.ndarray, loss: np.ndarray) -> np.ndarray:
        """Replace the previous vector's row by its measured values :math:`q_k^\\top q_j` (``previous_loss``,
        signed, shape ``(j-1,)``) and return the new vector's row made of ``loss`` :math:`q_k^\\top w / \\lVert w
        \\rVert` (signed, shape ``(j,)``), to pass to :meth:`accept`. A measurement is exact up to its own
        rounding (a few eps, :func:`_chunked_rows_dot`), so each magnitude grows by :data:`MEASUREMENT_ULPS`
        eps and keeps its sign: the recurrence continues from the truth."""

        center, radius = self._measured_row(previous_loss)
        if center.shape != self.current.shape:
            raise ValueError(f"a previous row of {center.size - 1} entries for iteration {self.iteration}")
        # The measured previous row checks its estimate as a check would (:meth:`measured`).
        self._raise_rounding(np.abs(self.current[:-1]), np.abs(center[:-1]))
        self.center, self.radius = center, radius
        self.current = self._combined(center, radius)
        if self.row_max:
            self.row_max[-1] = float(np.max(np.abs(self.current[:-1]), initial=0.0))
        self.recalibration_steps.append(self.iteration + 1)
        self.proposed = self._measured_row(loss)
        return self._combined(*self.proposed)

    def reset_level(self, coeffs_l1: float) -> float:
        """The loss a vector keeps after one Gram-Schmidt pass that removed coefficients of 1-norm
        ``coeffs_l1`` (relative to the vector's norm after the pass): :math:`\\varepsilon_1 + L \\lVert c
        \\rVert_1`, :math:`L` the largest estimate kept for a basis vector (see the class docstring)."""
        basis_loss = max(self.row_max, default=0.0)
        return self.rounding + basis_loss * coeffs_l1

    def next_row(self, alphas: Sequence[float], betas: Sequence[float], beta: float) -> np.ndarray:
        """:math:`\\omega_{j+1, 1..j+1}` for :math:`\\alpha_{1..j}` = ``alphas``, :math:`\\beta_{1..j-1}` =
        ``betas[:j - 1]`` and :math:`\\beta_j` = ``beta``. Nothing is updated but :attr:`proposed`, the row's
        centre and radius in the bounded mode, which :meth:`accept` keeps (it does not read them back from the row
        it is given)."""
        j = self.current.size
        a = np.asarray(alphas[:j], dtype=np.float64)
        b = np.asarray(betas[: j - 1], dtype=np.float64)
        eps1 = self.rounding
        # nu_k without beta_j: |alpha_k| + beta_{k-1} + beta_k for k < j, |alpha_j| + beta_{j-1} for k = j.
        nu = np.abs(a)
        nu[1:] += b
        nu[:-1] += b
        row = np.empty(j + 1, dtype=np.float64)
        self.proposed = None
        with np.errstate(divide="ignore", invalid="ignore"):  # beta = 0 (exact breakdown): inf, reorthogonalise
            local = eps1 * nu[-1] / beta + eps1
            if self.bounded_mode and j >= 2:
                # Centre: the recurrence in exact arithmetic; radius: in absolute values, plus the roundings.
                c, r = self.center, self.radius
                s = b * c[1:] + (a[:-1] - a[-1]) * c[:-1] - b[-1] * self.previous_center
                s[1:] += b[:-1] * c[:-2]
                t = b * r[1:] + np.abs(a[:-1] - a[-1]) * r[:-1] + b[-1] * self.previous_radius
                t[1:] += b[:-1] * r[:-2]
                center = np.concatenate([s / beta, [0.0, 1.0]])
                radius = np.concatenate([(t + eps1 * (nu[:-1] + nu[-1])) / beta + eps1, [local, 0.0]])
                self.proposed = (center, radius)
                return self._combined(center, radius)
            if j >= 2:
                cur, prev = self.current, self.previous
                s = b * cur[1:] + (a[:-1] - a[-1]) * cur[:-1] - b[-1] * prev
                s[1:] += b[:-1] * cur[:-2]
                # |s| + eps1 (nu_k + nu_j) over beta_j, with nu_j's own beta_j giving the "+ eps1".
                row[:-2] = np.copysign((np.abs(s) + eps1 * (nu[:-1] + nu[-1])) / beta + eps1, s)
            row[-2] = local
        row[-1] = 1.0
        return row

    def exceeds(self, row: np.ndarray) -> bool:
        """True when some :math:`|\\omega_{j+1,k}|`, :math:`k \\le j`, of ``row`` passes the threshold (or is NaN)."""
        return not bool(np.max(np.abs(row[:-1])) <= self.threshold)

    def accept(self, row: np.ndarray, reorthogonalised: bool, measured: bool = False,
               reset: float | None = None) -> None:
        """Make ``row`` the current one; reset it to ``reset`` (default :math:`\\varepsilon_1`; see
        :meth:`reset_level`) if its vector was re-orthogonalised.

        ``measured``: the vector was measured against the basis (always true when re-orthogonalised).
        """
        if reorthogonalised:
            row[:-1] = self.rounding if reset is None else max(reset, self.rounding)
            self.reorth_steps.append(self.iteration + 1)
            # A threshold crossing asks for this vector and the next; the second of a pair asks for nothing.
            self.pending = not self.pending
            # A reset row is a bound with no centre (each entry anywhere within the reset level): from here on
            # the rows are centre and radius. The previous row enters with its estimates as radius.
            if self.bounded_mode:
                self.previous_center, self.previous_radius = self.center, self.radius
            else:
                self.previous_center, self.previous_radius = self._uncentred_row(self.current)
            self.center, self.radius = self._uncentred_row(row)
        elif self.proposed is None:
            # A row not proposed here (Simon's recurrence, before the first reset or recalibration).
            self.center = self.radius = self.previous_center = self.previous_radius = None
        else:
            self.previous_center, self.previous_radius = self.center, self.radius
            self.center, self.radius = self.proposed
        self.proposed = None
        self.since_check = 0 if (measured or reorthogonalised) else self.since_check + 1
        self.previous, self.current = self.current, row
        self.row_max.append(float(np.max(np.abs(row[:-1]))))
        self.iteration += 1


@dataclass
class LanczosState:
    """Everything needed to continue a Lanczos run (mutable; :func:`lanczos_step` updates it in place).

    After ``j = iteration`` steps, ``alphas`` and ``betas`` hold :math:`\\alpha_{1..j}` and
    :math:`\\beta_{1..j}` (the last one is the residual norm, not yet part of :math:`T_j`), ``q`` is
    :math:`q_{j+1}` and ``q_prev`` is :math:`q_j` (None before the first step). With full, offloaded or
    partial re-orthogonalisation ``basis`` holds one tensor per block, of shape ``(num_iters + 1, numel)``, whose
    row ``i`` is :math:`q_{i+1}` (rows ``0..j`` are filled). All vectors are in the operator's dtypes;
    ``basis`` lives on the blocks' devices (``"full"``, ``"partial"``) or in CPU memory (``"offload"``).

    Attributes
    ----------
    num_iters, reorth, seed, probe
        The configuration of the run (see :func:`lanczos`).
    tol : float or None
        Absolute breakdown tolerance given by the user, or None for ``rtol * max(|alpha|, beta)``.
    rtol : float
        Relative breakdown tolerance used when ``tol`` is None.
    unit_roundoff : float
        Machine epsilon of the least precise block dtype (scales the ghost tolerance).
    omega : OmegaEstimates or None
        ``reorth="partial"`` only: the orthogonality estimates (saved in checkpoints). None (a state built
        without them, e.g. from a checkpoint written before they were saved) makes the next step rebuild them
        from ``alphas`` and ``betas`` (:func:`replay_omega_estimates`).
    rank_group : process group, optional
        Set for operators spread over torch.distributed ranks (``world_size > 1``): ``reorth="partial"``'s
        decisions are then made by all ranks together (a max all-reduce), so that ranks whose vectors differ
        in the last bits cannot take different branches.
    """

    num_iters: int
    reorth: str
    seed: int | None
    probe: str
    tol: float | None
    rtol: float
    unit_roundoff: float
    q: TensorList
    q_prev: TensorList | None = None
    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    iteration: int = 0
    basis: list[torch.Tensor] | None = None
    breakdown: bool = False
    omega: OmegaEstimates | None = None
    rank_group: object | None = None

    @property
    def done(self) -> bool:
        """True once ``num_iters`` steps are done or the run broke down."""
        return self.breakdown or self.iteration >= self.num_iters

    def breakdown_tolerance(self) -> float:
        """The absolute threshold below which :math:`\\beta_j` counts as zero."""
        if self.tol is not None:
            return self.tol
        scale = max(max(abs(a) for a in self.alphas), max(self.betas))
        return self.rtol * scale


# ---------------------------------------------------------------------------------------------- checks
def default_breakdown_rtol(dtypes: Sequence[torch.dtype]) -> float:
    """Relative breakdown tolerance ``min(max(1e-10, 10 * eps), 1e-3)`` for the least precise ``dtypes``.

    That is 1e-10 in float64 and about 1.2e-6 in float32: a residual below it is indistinguishable from
    the rounding noise of a product with ``H``. Half precision is capped at 1e-3 (not 10 eps ~ 8e-2) so
    that a bulk of eigenvalues a few percent of the largest does not end the run: stopping too early
    loses the spectrum, while continuing through noise only adds Ritz values of negligible weight.
    """
    return min(max(1e-10, 10.0 * machine_epsilon(dtypes)), 1e-3)


def machine_epsilon(dtypes: Sequence[torch.dtype]) -> float:
    """Machine epsilon ``eps`` (spacing of floats at 1) of the least precise of ``dtypes``.

    The one definition of the package: the unit roundoff ``u`` is ``eps / 2``. The Lanczos state's
    ``unit_roundoff`` field and Cullum-Willoughby's ``unit_roundoff`` argument hold ``eps`` (a bound of
    the rounding of one step, not of one operation).
    """
    return max(torch.finfo(d).eps for d in dtypes)


def _check_config(op: SymmetricOperator, num_iters: int, reorth: str, tol: float | None) -> int:
    num_iters = check_count("num_iters", num_iters)
    if reorth not in REORTH_MODES:
        raise ValueError(f"unknown reorth {reorth!r}; choose one of {REORTH_MODES}")
    # Beyond dim steps an orthogonal basis cannot grow; without re-orthogonalisation long runs are the
    # classic way to expose ghosts (Cullum-Willoughby run 2-3 x dim steps), so they are allowed there.
    if reorth != "none" and num_iters > op.dim:
        raise ValueError(
            f"num_iters={num_iters} exceeds the operator dimension {op.dim}; use at most dim "
            f"(num_iters={op.dim}) with reorth={reorth!r}"
        )
    if tol is not None and not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0 or None for the default, got {tol!r}")
    return num_iters


def _start_vector(op: SymmetricOperator, start: Sequence[torch.Tensor] | None, probe: str, seed: int) -> TensorList:
    """The unit start vector: ``start`` normalised, or a seeded probe."""
    if start is None:
        v = op.random_vector(probe, seed)
    else:
        v = V.clone(op.check_vector(start))
    size = V.norm(v)
    if not math.isfinite(size):
        raise ValueError("the start vector has non-finite entries; pass a finite start vector")
    if size == 0.0:
        raise ValueError("the start vector is zero; pass a non-zero start vector (or start=None for a probe)")
    V.scale_(1.0 / size, v)
    return v


# ---------------------------------------------------------------------------------------------- basis
def _allocate_basis(
    q: TensorList, rows: int, offload: bool, workspace: Sequence[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """One ``(rows, numel)`` tensor per block, on the block's device or on the CPU when offloading.

    Uninitialised: only rows already stored are ever read. A ``workspace`` (the basis of a finished run)
    of the same layout is reused instead: a fresh basis of a large model costs as much to fault into
    memory as several Lanczos steps (0.7 s for 81 x 5.3 M float32 rows on the benchmark CPU).
    """
    wanted = [((rows, b.numel()), b.dtype, torch.device("cpu") if offload else b.device) for b in q]
    if workspace is not None and len(workspace) == len(wanted) and all(
        t.shape[0] >= shape[0] and t.shape[1:] == shape[1:] and t.dtype == dtype and t.device == device
        and t.is_contiguous()
        for t, (shape, dtype, device) in zip(workspace, wanted, strict=True)
    ):
        return [t[:rows] for t in workspace]
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in wanted]


def _store_row(basis: list[torch.Tensor], row: int, q: TensorList) -> None:
    for Qb, qb in zip(basis, q, strict=True):
        Qb[row].copy_(qb.reshape(-1))


def _rows_dot(rows: torch.Tensor, w: torch.Tensor, heavy: float) -> torch.Tensor:
    """``rows @ w`` as float64, ``rows: (k, n)``, ``w: (n,)`` on the same device (``heavy``: see
    :func:`_chunked_rows_dot`)."""
    if rows.dtype not in _HALF_DTYPES:
        return _chunked_rows_dot(rows, w, heavy)
    out = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
    for s in range(0, rows.shape[1], _HALF_CHUNK):
        out += rows[:, s : s + _HALF_CHUNK].float() @ w[s : s + _HALF_CHUNK].float()
    return out.to(torch.float64)


def _chunked_rows_dot(rows: torch.Tensor, w: torch.Tensor, heavy: float) -> torch.Tensor:
    """``rows @ w`` (float32 or float64) as float64.

    Float32 rows are summed over chunks of :data:`_ACC_CHUNK` columns, chunk sums in float64. Chunks whose part of
    ``w`` has a squared norm above ``heavy`` (the caller's :data:`_HEAVY_SHARE` of the whole ``||w||^2``: ``w`` may
    be a piece of a longer vector), rows of at most :data:`_ACC_CHUNK` columns and the tail of longer ones are
    summed with float64 products, and every chunk is when ``heavy`` is so small that ``w``'s float32 squares or
    products could underflow.
    """
    n = rows.shape[1]
    if rows.dtype == torch.float64:
        return rows @ w
    if n <= _ACC_CHUNK:
        return rows.double() @ w.double()
    whole = n - n % _ACC_CHUNK
    chunks = w[:whole].view(-1, _ACC_CHUNK)
    if heavy < _ACC_CHUNK * _FLOAT32_TINY_SUM:
        # So small a w (||w|| below about 3e-13) that its float32 squares, which pick the heavy chunks, or its float32
        # products with the rows may fall below float32's smallest normal number and lose digits (entries below 1e-19
        # square to subnormals; products below 1.2e-38 keep fewer than 24 bits): every chunk takes float64 products.
        heavy_chunks = range(chunks.shape[0])
        sums = torch.empty((chunks.shape[0], rows.shape[0]), dtype=torch.float64, device=rows.device)
    else:
        heavy_chunks = torch.nonzero(torch.linalg.vecdot(chunks, chunks).double() > heavy).view(-1).tolist()
        if rows.device.type == "cpu" and chunks.shape[0] > 1:
            # One batched product, (m, 1, C) @ (m, C, k), over strided views of the rows (no copy): each chunk is
            # still summed alone in float32, without the Python call per chunk that cost 10 ms a read of 5.3 M
            # columns (a check of a short basis at the start of a run). (A lone chunk keeps the plain product: bmm's
            # kernel for one 1 x 1 product rounds differently.)
            sums = torch.bmm(chunks.unsqueeze(1), rows[:, :whole].unflatten(1, (-1, _ACC_CHUNK)).permute(1, 2, 0))
            sums = sums.squeeze(1).double()
        else:
            sums = torch.stack([rows[:, c * _ACC_CHUNK : (c + 1) * _ACC_CHUNK] @ x for c, x in enumerate(chunks)])
            sums = sums.double()
    for c in heavy_chunks:
        s = c * _ACC_CHUNK
        sums[c] = rows[:, s : s + _ACC_CHUNK].double() @ w[s : s + _ACC_CHUNK].double()
    out = sums.sum(0)
    if whole < n:
        out += rows[:, whole:].double() @ w[whole:].double()
    return out


def _fast_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """``sum_i <a_i, b_i>`` as a Python float, for the alphas and betas of a step.

    CPU float32 blocks longer than :data:`_ACC_CHUNK`: the rows of ``(-1, _ACC_CHUNK)`` views dotted in
    one call (:func:`torch.linalg.vecdot`, whose sums are pairwise; it makes one float32 temporary of the
    block's size), the row sums added in float64; accurate to a few eps of ``sum |a_i b_i|`` with no float64
    copy of the block (which is what makes :func:`~hess_utils.vectors.dot` several times slower there) and no
    Python loop over chunks. Their tails and the CPU blocks of at most :data:`_ACC_CHUNK` entries (any
    dtype) are gathered into one float64 vector each and dotted once: a model has dozens of short blocks
    (biases, norms), whose float64 dots one by one cost more than all of them together. The partial sums stay
    tensors until one final sum (one host read). Other blocks: :func:`~hess_utils.vectors.dot`.
    """
    parts: list[torch.Tensor] = []  # the long float32 blocks' sums first, in the order of long_pairs
    long_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    short_a, short_b, rest_a, rest_b = [], [], [], []
    for x, y in zip(a, b, strict=True):
        n = x.numel()
        if x.device.type != "cpu" or y.device != x.device or x.shape != y.shape:
            rest_a.append(x)
            rest_b.append(y)
        elif n <= _ACC_CHUNK:
            short_a.append(x.view(-1) if x.is_contiguous() else x.reshape(-1))
            short_b.append(y.view(-1) if y.is_contiguous() else y.reshape(-1))
        elif x.dtype == y.dtype == torch.float32:
            x, y = x.reshape(-1), y.reshape(-1)
            whole = n - n % _ACC_CHUNK
            rows = torch.linalg.vecdot(x[:whole].view(-1, _ACC_CHUNK), y[:whole].view(-1, _ACC_CHUNK))
            parts.append(rows.sum(dtype=torch.float64))
            long_pairs.append((x[:whole], y[:whole]))
            if whole < n:
                short_a.append(x[whole:])
                short_b.append(y[whole:])
        else:
            rest_a.append(x)
            rest_b.append(y)
    if short_a:
        # torch.cat promotes mixed dtypes; the float64 conversion is then one call for all short pieces.
        parts.append(torch.dot(torch.cat(short_a).to(torch.float64), torch.cat(short_b).to(torch.float64)))
    values = torch.stack(parts).tolist() if parts else []  # one host read
    for i, (x, y) in enumerate(long_pairs):
        # The float32 products of a long block overflow (|x_i y_i| or a row's sum above 3.4e38) or lose digits
        # below float32's smallest normal number (each product under it is off by up to 1.2e-38): then that
        # block is summed again with float64 products. A finite sum at least n * 1.2e-38 / eps in size is accurate
        # to eps of it despite any such product.
        if not (math.isfinite(values[i]) and abs(values[i]) >= x.numel() * _FLOAT32_TINY_SUM):
            values[i] = V.dot([x], [y])
    total = math.fsum(values)
    if rest_a:
        total += V.dot(rest_a, rest_b)
    return total


def _fast_norm(a: Sequence[torch.Tensor]) -> float:
    return math.sqrt(max(_fast_dot(a, a), 0.0))


def _rows_combination(coeffs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``coeffs @ rows`` in the dtype of ``rows``, ``coeffs: (k,)`` float64, ``rows: (k, n)``."""
    if rows.dtype not in _HALF_DTYPES:
        return coeffs.to(rows.dtype) @ rows
    out = torch.empty(rows.shape[1], dtype=rows.dtype, device=rows.device)
    c = coeffs.float()
    for s in range(0, rows.shape[1], _HALF_CHUNK):
        out[s : s + _HALF_CHUNK] = (c @ rows[:, s : s + _HALF_CHUNK].float()).to(rows.dtype)
    return out


# ---------------------------------------------------------------------------------------------- CPU column split
# MKL's matrix-vector products run on one core: on a CPU the re-orthogonalisation, which reads the whole
# basis twice per step, is bound by one core's memory bandwidth. Splitting the columns of the basis among
# threads (each product releases the GIL) uses the bandwidth of all cores: 1.4-1.5x faster on 2 cores,
# measured alone for 40 x 5.3 M float32 rows (less inside an SLQ run, whose products share the memory
# bus and caches). The split depends only on the shapes and the thread count, and
# partial sums are added in a fixed order, so results are reproducible.
_MIN_SPLIT_COLUMNS = 1 << 18  # per worker; below this, thread hand-off costs more than it saves


def _splittable(Qb: torch.Tensor, wb: torch.Tensor) -> bool:
    return (
        Qb.device.type == "cpu" and wb.device == Qb.device and Qb.dtype not in _HALF_DTYPES
        and wb.dtype == Qb.dtype and wb.is_contiguous()
    )


def _column_shares(basis: list[torch.Tensor], w: TensorList) -> list[list[tuple[int, int, int]]] | None:
    """The CPU blocks' columns dealt into one near-equal share per worker, as ``(block, start, stop)``.

    None when there is one worker or too few such columns to be worth threads.
    """
    workers = _threads.cpu_workers()
    blocks = [i for i, (Qb, wb) in enumerate(zip(basis, w, strict=True)) if _splittable(Qb, wb)]
    sizes = [basis[i].shape[1] for i in blocks]
    if workers < 2 or sum(sizes) < _MIN_SPLIT_COLUMNS * workers:
        return None
    return [[(blocks[j], a, b) for j, a, b in share] for share in _threads.deal(sizes, workers)]


def _share_coefficients(basis, w, k: int, share, heavy: float) -> torch.Tensor:
    total = torch.zeros(k, dtype=torch.float64)
    for i, start, stop in share:
        total += _chunked_rows_dot(basis[i][:k, start:stop], w[i].view(-1)[start:stop], heavy)
    return total


def _share_subtract(basis, w, coeffs: dict[torch.dtype, torch.Tensor], k: int, share) -> None:
    for i, start, stop in share:
        w[i].view(-1)[start:stop].addmv_(basis[i][:k, start:stop].T, coeffs[basis[i].dtype], alpha=-1)


def _basis_coefficients(basis: list[torch.Tensor], w: TensorList, k: int, norm: float | None = None) -> torch.Tensor:
    """``Q[:k] w`` summed over blocks in float64, on the device of the first basis block. ``norm``: ``||w||`` where
    the caller knows it (it decides which float32 chunks take float64 products, :data:`_HEAVY_SHARE`)."""
    home = basis[0].device
    total = torch.zeros(k, dtype=torch.float64, device=home)
    if norm is None:
        norm = _fast_norm(w)
    heavy = _HEAVY_SHARE * norm * norm
    shares = _column_shares(basis, w)
    split = set()
    if shares is not None:
        pool = _threads.thread_pool(len(shares))
        jobs = [pool.submit(_share_coefficients, basis, w, k, share, heavy) for share in shares]
        for job in jobs:  # a fixed order of the partial sums: reproducible
            total += job.result().to(home)
        split = {i for share in shares for i, _, _ in share}
    for i, (Qb, wb) in enumerate(zip(basis, w, strict=True)):
        if i not in split:
            total += _rows_dot(Qb[:k], wb.reshape(-1).to(Qb.device), heavy).to(home)
    return total


def _subtract_projection_(w: TensorList, basis: list[torch.Tensor], coeffs: torch.Tensor, k: int) -> None:
    """In place ``w <- w - Q[:k]^T coeffs`` block by block."""
    shares = _column_shares(basis, w)
    split = set()
    if shares is not None:
        split = {i for share in shares for i, _, _ in share}
        by_dtype = {dtype: coeffs.to(device="cpu", dtype=dtype) for dtype in {basis[i].dtype for i in split}}
        pool = _threads.thread_pool(len(shares))
        for job in [pool.submit(_share_subtract, basis, w, by_dtype, k, share) for share in shares]:
            job.result()
    for i, (Qb, wb) in enumerate(zip(basis, w, strict=True)):
        if i in split:
            continue
        if Qb.dtype not in _HALF_DTYPES and Qb.device == wb.device and wb.is_contiguous():
            # One fused BLAS call, no temporary the size of the block.
            wb.view(-1).addmv_(Qb[:k].T, coeffs.to(device=Qb.device, dtype=Qb.dtype), alpha=-1)
            continue
        correction = _rows_combination(coeffs.to(Qb.device), Qb[:k])
        wb.sub_(correction.reshape(wb.shape).to(wb.device))


def _reorthogonalise_(w: TensorList, basis: list[torch.Tensor], k: int, coeffs: torch.Tensor | None = None,
                      rows: int | None = None) -> float:
    """Remove from ``w`` its components along ``q_1..q_k``; return ``||w||`` afterwards.

    Classical Gram-Schmidt with the Daniel-Gragg-Kaufman-Stewart criterion: a second pass runs only
    when the first removed more than half of ``w``'s squared norm (``||w'|| < ||w|| / sqrt(2)``), the
    only case where one pass can leave components above rounding level ("twice is enough", Giraud et
    al. 2005). Inside Lanczos, after the three-term recurrence, that is rare, so the basis is read twice
    per step instead of four times. Each pass is two matrix products per block, no loop over basis
    vectors; ``||w||^2 = ||w'||^2 + ||c||^2`` gives the test without an extra reduction. ``coeffs``: the
    first pass's ``Q[:k] w`` when the caller has measured them already; ``rows``: subtract only along the
    first ``rows`` of them in the first pass (the caller knows the others to be at rounding level).
    """
    if coeffs is None:
        coeffs = _basis_coefficients(basis, w, k)
    lead = k if rows is None else rows
    if lead > 0:
        _subtract_projection_(w, basis, coeffs[:lead], lead)
    size = _fast_norm(w)
    removed = float(coeffs[:lead] @ coeffs[:lead])
    if not (size * size >= removed):  # also when non-finite: let the caller's check report it
        coeffs = _basis_coefficients(basis, w, k, size)
        _subtract_projection_(w, basis, coeffs, k)
        size = _fast_norm(w)
    return size


def _gram_of_columns(rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``rows[:, start:stop] rows[:, start:stop]^T`` in float64, for unit rows: float64 rows in one product; float32
    rows summed over chunks of :data:`_ACC_CHUNK` columns, with float64 products for a chunk holding more than
    :data:`_HEAVY_SHARE` of some row's squared norm and for a shorter chunk (as :func:`_chunked_rows_dot`)."""
    if rows.dtype == torch.float64:
        block = rows[:, start:stop]
        return block @ block.T
    k = rows.shape[0]
    part = torch.zeros((k, k), dtype=torch.float64, device=rows.device)
    for s in range(start, stop, _ACC_CHUNK):
        block = rows[:, s : min(s + _ACC_CHUNK, stop)]
        if block.shape[1] < _ACC_CHUNK or float(torch.linalg.vecdot(block, block).max()) > _HEAVY_SHARE:
            block = block.double()
        part += block @ block.T
    return part


def _orthogonality_loss(basis: list[torch.Tensor] | None, k: int) -> float:
    """``max_{i != j} |q_i . q_j|`` over rows ``0..k-1`` of the basis, NaN without a basis.

    Chunks of columns summed in float64, as the coefficients (:func:`_chunked_rows_dot`): a float32 Gram matrix
    of 5e6 columns would measure its own rounding. The products of so few rows over so short chunks keep one
    core busy each, so on a CPU the columns are dealt among the worker threads (a fixed split, partial sums added
    in a fixed order: reproducible), as for the re-orthogonalisation.
    """
    if basis is None or k < 2:
        return math.nan if basis is None else 0.0
    gram = torch.zeros((k, k), dtype=torch.float64)
    for Qb in basis:
        rows = Qb[:k]
        if rows.dtype in _HALF_DTYPES:
            rows = rows.float()
        n = rows.shape[1]
        workers = _threads.cpu_workers()
        if rows.device.type == "cpu" and workers > 1 and n >= _MIN_SPLIT_COLUMNS * workers:
            shares = _threads.deal([n], workers, piece=_ACC_CHUNK)
            pool = _threads.thread_pool(len(shares))
            jobs = [pool.submit(_gram_of_columns, rows, a, b) for share in shares for _, a, b in share]
            for job in jobs:  # a fixed order of the partial sums
                gram += job.result()
        else:
            gram += _gram_of_columns(rows, 0, n).to("cpu")
    gram.fill_diagonal_(0.0)
    return float(gram.abs().max())


# ---------------------------------------------------------------------------------------------- partial
def replay_omega_estimates(state: LanczosState) -> OmegaEstimates:
    """:class:`OmegaEstimates` for a ``reorth="partial"`` state that has none (a checkpoint written before they
    were saved), rebuilt from its ``alphas`` and ``betas``.

    The recurrence is replayed with the starting rounding level, re-orthogonalising where it crosses; the
    measurements the run made are unknown, so the next step measures its vector (a check is due).
    """
    est = OmegaEstimates.start(state.unit_roundoff)
    for j in range(1, state.iteration + 1):
        row = est.next_row(state.alphas, state.betas, state.betas[j - 1])
        est.accept(row, est.pending or est.exceeds(row))
    est.since_check = est.check_every
    return est


def _current_estimates(state: LanczosState) -> OmegaEstimates:
    """``state.omega``, rebuilt first when missing or stale (a state restored from an old checkpoint)."""
    if state.omega is None or state.omega.iteration != state.iteration:
        state.omega = replay_omega_estimates(state)
    return state.omega


def _partial_reorthogonalise_(state: LanczosState, w: TensorList, alpha: float) -> float:
    """Partial re-orthogonalisation of ``w`` (the unnormalised :math:`q_{j+1}`); return :math:`\\beta_j`.

    Simon's rule: re-orthogonalise ``w`` against the whole basis :math:`q_1..q_j` (:func:`_reorthogonalise_`)
    when the estimates cross :math:`\\sqrt{\\varepsilon}`, and the next vector too. Every vector whose
    coefficients :math:`Q_j^\\top w` are computed, for a re-orthogonalisation or because a check is due
    (:meth:`OmegaEstimates.check_due`), is also a measurement: it calibrates the rounding level
    (:meth:`OmegaEstimates.measured`), and a checked vector found above the threshold is re-orthogonalised
    with the coefficients already computed. Where a crossing's measured loss is far below the threshold, the
    previous vector :math:`q_j` is measured too, the estimates are recalibrated from the two rows and nothing
    is re-orthogonalised (:meth:`OmegaEstimates.recalibrate`).

    All previous vectors rather than only those whose estimate exceeds :math:`\\varepsilon^{3/4}`: the basis
    pass is a matrix product over contiguous rows, bound by memory bandwidth, and a subset of rows would need
    a gather (a copy costing more than reading them in place); resetting every estimate lets all of them
    restart from rounding level, so the next crossing comes later.
    """
    est = _current_estimates(state)
    j = state.iteration + 1
    size = _fast_norm(w)
    row = est.next_row([*state.alphas, alpha], state.betas, size)
    crossing = _agreed(state, est.pending or est.exceeds(row))
    reorthogonalise = crossing
    measure = crossing or est.check_due()
    coeffs = host = None
    if measure:
        coeffs = _basis_coefficients(state.basis, w, j, size)
        host = coeffs.to("cpu").numpy()
        signed = host / size if size > 0 else np.zeros(j)
        loss = np.abs(signed)
        if crossing and not _agreed(state, not est.worth_recalibrating(row, loss)):
            # A second read of the basis (one matrix product for both vectors packs the basis, and two
            # products per chunk find nothing in cache: either is slower than two reads).
            previous = _basis_coefficients(state.basis, state.q, j - 1, 1.0).to("cpu").numpy()
            row = est.recalibrate(previous, signed)
            est.accept(row, False, measured=True)
            return size
        # A measured entry above its estimate (beyond the measurement's own error) means the estimates do not
        # hold for this operator: their signs, not only their sizes, may be wrong, and continuing from a row
        # patched with the measurement let the truth pass sqrt(eps) unseen (a float64 diagonal operator, 37x).
        # So such a check is answered like a crossing: this vector and the next are re-orthogonalised.
        violated = bool(np.any(loss > np.abs(row[:-1]) + est.measurement_error))
        row = est.measured(row, loss, signed)
        if not crossing:
            reorthogonalise = _agreed(state, violated or est.exceeds(row))
            if not reorthogonalise:
                est.check_steps.append(j)
    reset = None
    if reorthogonalise:
        # The first pass subtracts only up to the last coefficient above eps: later rows' coefficients are
        # below what a pass would leave (the loss lies along converged Ritz vectors, spanned by the rows from
        # before they converged). A contiguous prefix keeps the pass one matrix product.
        # (A re-orthogonalised vector is always measured first: coeffs and host are set.)
        c = np.abs(host)
        after = math.sqrt(max(size * size - float(c @ c), 0.0))
        above = np.flatnonzero(c > state.unit_roundoff * after)
        rows = int(above[-1]) + 1 if above.size else 0
        size = _reorthogonalise_(w, state.basis, j, coeffs=coeffs, rows=rows)
        if size > 0:
            reset = est.reset_level(float(c[:rows].sum()) / size) + float(np.max(c[rows:], initial=0.0)) / size
    est.accept(row, reorthogonalise, measured=measure, reset=reset)
    return size


def rank_group_of(op: SymmetricOperator) -> object | None:
    """The process group of an operator spread over several torch.distributed ranks, else None."""
    if getattr(op, "world_size", 1) <= 1:
        return None
    return getattr(op, "group", None) or "world"


def _agreed(state: LanczosState, decision: bool) -> bool:
    """``decision`` taken by every rank of the state's group when any rank takes it (a max all-reduce), so that
    a re-orthogonalisation happens on all ranks or on none; ``decision`` itself on one process."""
    if state.rank_group is None:
        return decision
    import torch.distributed as dist

    group = None if state.rank_group == "world" else state.rank_group
    device = state.basis[0].device if state.basis else torch.device("cpu")
    flag = torch.tensor([int(decision)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


# ---------------------------------------------------------------------------------------------- state machine
def lanczos_init(
    op: SymmetricOperator,
    num_iters: int,
    reorth: str = "full",
    seed: int = 0,
    start: Sequence[torch.Tensor] | None = None,
    probe: str = "rademacher",
    tol: float | None = None,
    workspace: Sequence[torch.Tensor] | None = None,
) -> LanczosState:
    """Validate the configuration and build the state before the first step (see :func:`lanczos`).

    ``workspace``: the ``basis`` of a finished state to reuse (overwritten; used when its layout fits).
    """
    num_iters = _check_config(op, num_iters, reorth, tol)
    if start is None:
        seed = check_seed(seed)
    q = _start_vector(op, start, probe, seed)
    state = LanczosState(
        num_iters=num_iters,
        reorth=reorth,
        seed=None if start is not None else seed,
        probe=CUSTOM_START if start is not None else probe,
        tol=None if tol is None else float(tol),
        rtol=default_breakdown_rtol(op.dtypes),
        unit_roundoff=machine_epsilon(op.dtypes),
        q=q,
    )
    if reorth != "none":
        state.basis = _allocate_basis(q, num_iters + 1, offload=reorth == "offload", workspace=workspace)
        _store_row(state.basis, 0, q)
    if reorth == "partial":
        state.omega = OmegaEstimates.start(state.unit_roundoff, product_rtol=getattr(op, "product_rtol", None))
        state.rank_group = rank_group_of(op)
    return state


def lanczos_step(op: SymmetricOperator, state: LanczosState) -> LanczosState:
    """One Lanczos iteration: one product with ``H``; updates ``state`` in place and returns it.

    Uses Paige's ordering (subtract :math:`\\beta_{j-1} q_{j-1}` before computing :math:`\\alpha_j`),
    the most stable variant of the plain recurrence.

    Raises
    ------
    ValueError
        If the state is already finished, or the product with ``H`` has non-finite entries.
    """
    if state.done:
        raise ValueError(
            f"the Lanczos state is finished ({state.iteration} iterations, breakdown={state.breakdown}); "
            "call lanczos_finish(state)"
        )
    w = owned_matvec(op, state.q, keep=state.q_prev or ())
    return lanczos_advance(state, w)


def lanczos_advance(state: LanczosState, w: TensorList) -> LanczosState:
    """Finish one iteration given ``w = H q`` (owned by the caller, modified in place).

    :func:`lanczos_step` is the product followed by this; SLQ computes the products of several runs
    together (:meth:`~hess_utils.operators.base.SymmetricOperator.matmat`) and advances each with it.
    """
    j = state.iteration + 1  # 1-based number of this iteration
    if state.q_prev is not None:
        V.axpy_(-state.betas[-1], state.q_prev, w)
    alpha = _fast_dot(state.q, w)
    # Any inf/NaN entry of w makes q.w non-finite (0 * inf = NaN), so this one check covers H q.
    if not math.isfinite(alpha):
        raise ValueError(
            f"the operator returned non-finite values at Lanczos iteration {j}; check the model/loss "
            "(e.g. overflow in half precision) before running Lanczos"
        )
    V.axpy_(-alpha, state.q, w)
    if state.reorth == "partial":
        beta = _partial_reorthogonalise_(state, w, alpha)
    elif state.basis is not None:
        beta = _reorthogonalise_(w, state.basis, j)
    else:
        beta = _fast_norm(w)
    if not math.isfinite(beta):
        raise ValueError(f"the operator returned non-finite values at Lanczos iteration {j}")
    state.alphas.append(alpha)
    state.betas.append(beta)
    state.iteration = j
    if beta <= state.breakdown_tolerance():
        # Invariant subspace found: T_j holds exact eigenvalues; there is no next direction.
        state.breakdown = True
        return state
    if state.basis is not None and all(
        Qb.device == wb.device and Qb.dtype == wb.dtype for Qb, wb in zip(state.basis, w, strict=True)
    ):
        # Normalise straight into the basis row and use the row as q: one pass instead of two.
        state.q_prev, state.q = state.q, [
            torch.div(wb, beta, out=Qb[j].view(wb.shape)) for Qb, wb in zip(state.basis, w, strict=True)
        ]
        return state
    state.q_prev, state.q = state.q, [wb.div_(beta) for wb in w]
    if state.basis is not None:
        _store_row(state.basis, j, state.q)
    return state


def ritz_from_tridiagonal(
    alphas: np.ndarray, betas: np.ndarray, last_beta: float, reorth: str, unit_roundoff: float, dim: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values, Gauss weights, residual estimates and ghost mask of :math:`T_k` (all float64, shape ``(k,)``).

    With :math:`T_k = S \\Theta S^\\top` (``alphas`` ``(k,)`` on the diagonal, ``betas`` ``(k-1,)`` beside it):
    values :math:`\\theta_i` ascending, weights :math:`s_{1i}^2` normalised to sum 1 (the quadrature weights of
    the spectral measure seen from the start vector), residuals :math:`|\\beta_k s_{ki}|` with
    :math:`\\beta_k` = ``last_beta`` (``||H y_i - theta_i y_i||`` in exact arithmetic), and the
    Cullum-Willoughby ghost mask for ``reorth="none"`` (``unit_roundoff`` of the run's arithmetic, ``dim`` the
    operator's dimension), all False otherwise: a kept, (semi-)orthogonal basis makes no ghosts, and the test
    would only flag close genuine values.
    """
    values, vectors = tridiagonal_eigh(alphas, betas)
    weights = vectors[0, :] ** 2
    residuals = np.abs(float(last_beta) * vectors[-1, :])
    if reorth == "none":
        ghosts = cullum_willoughby_mask(alphas, betas, values, unit_roundoff=unit_roundoff,
                                        residual_estimates=residuals, dim=dim)
    else:
        ghosts = np.zeros(values.size, dtype=bool)
    return values, weights / weights.sum(), residuals, ghosts


def lanczos_finish(state: LanczosState) -> LanczosResult:
    """Eigen-decompose :math:`T_k` of the steps done so far (in float64) into a :class:`LanczosResult`."""
    k = state.iteration
    if k < 1:
        raise ValueError("no Lanczos iteration has run yet; call lanczos_step(op, state) first")
    alphas = np.asarray(state.alphas, dtype=np.float64)
    betas = np.asarray(state.betas[: k - 1], dtype=np.float64)
    last_beta = float(state.betas[-1])
    values, weights, residuals, ghosts = ritz_from_tridiagonal(
        alphas, betas, last_beta, state.reorth, state.unit_roundoff, sum(t.numel() for t in state.q))
    partial = {}
    if state.reorth == "partial":
        est = _current_estimates(state)
        steps = tuple(j for j in est.reorth_steps if j <= k)
        # Rows of q_2..q_k, the vectors orthogonality_loss measures (q_{k+1} is not part of the result).
        partial = dict(num_reorth_steps=len(steps), reorth_steps=steps,
                       max_omega=max(est.row_max[: k - 1], default=0.0),
                       check_steps=tuple(j for j in est.check_steps if j <= k), omega_rounding=est.rounding,
                       recalibration_steps=tuple(j for j in est.recalibration_steps if j <= k))
    loss = _orthogonality_loss(state.basis, k)
    if state.reorth == "partial" and loss > math.sqrt(state.unit_roundoff):
        warnings.warn(
            f"reorth='partial' measured a loss of orthogonality of {loss:.1e}, above sqrt(eps) = "
            f"{math.sqrt(state.unit_roundoff):.1e}: the operator's rounding is worse than its estimates allow "
            "for, and Ritz values may be doubled; run with reorth='full' for this operator",
            RuntimeWarning, stacklevel=2)
    return LanczosResult(
        alphas=alphas,
        betas=betas,
        ritz_values=values,
        ritz_weights=weights,
        ghost_mask=ghosts,
        residual_estimates=residuals,
        orthogonality_loss=loss,
        breakdown=state.breakdown,
        num_iters=k,
        last_beta=last_beta,
        reorth=state.reorth,
        seed=state.seed,
        probe=state.probe,
        **partial,
    )


@holds_freed_memory
def lanczos(
    op: SymmetricOperator,
    num_iters: int,
    reorth: str = "full",
    seed: int = 0,
    start: Sequence[torch.Tensor] | None = None,
    probe: str = "rademacher",
    progress: bool = True,
    tol: float | None = None,
    callback: Callable[[LanczosState], None] | None = None,
) -> LanczosResult:
    """Run ``num_iters`` Lanczos iterations on ``op`` and eigen-decompose the tridiagonal matrix.

    Parameters
    ----------
    op : SymmetricOperator
        The symmetric operator :math:`H` (dimension ``n = op.dim``).
    num_iters : int
        Number of iterations ``k`` (= products with ``H``). At most ``n`` with ``reorth="full"``,
        ``"offload"`` or ``"partial"``; unrestricted with ``"none"``.
    reorth : {"full", "offload", "none", "partial"}
        ``"full"``: keep the basis, ``(num_iters + 1) x numel`` per block on the block's device, and
        re-orthogonalise every new vector against it (classical Gram-Schmidt as matrix products, a second
        pass when the first removed more than half of the vector). ``"offload"``: the same with the
        basis in CPU memory, so an accelerator holds O(1) vectors.
        ``"none"``: plain recurrence with three vectors; expect ghosts in long runs.
        ``"partial"``: the basis of ``"full"`` (same memory), re-orthogonalised only in pairs of steps when
        Simon's estimates (:class:`OmegaEstimates`) pass :math:`\\sqrt{\\varepsilon}`, with a measurement
        of the new vector against the basis at least every :data:`CHECK_EVERY` steps (one read of the basis)
        that raises them where they were too low, and a crossing far above the measured loss answered by
        measuring the previous vector too and continuing from the two measured rows (two reads instead of
        the four of a pair): the basis stays semi-orthogonal, which makes :math:`T_k` (Ritz values and
        weights) that of ``"full"`` to working precision and leaves no ghosts, while the other steps skip the
        basis passes (how many depends on the spectrum and the operator: see :class:`OmegaEstimates` and
        :func:`omega_rounding`). Should the measured loss at the end exceed :math:`\\sqrt{\\varepsilon}` anyway,
        a ``RuntimeWarning`` says so. :func:`~hess_utils.algorithms.slq.slq` uses it by default.
    seed : int
        Seed of the start probe (ignored when ``start`` is given).
    start : list of tensors, optional
        Start vector (normalised here); default a ``probe`` vector drawn with ``seed``.
    probe : {"rademacher", "gaussian"}
        Distribution of the start probe.
    progress : bool
        Show a progress bar.
    tol : float, optional
        Absolute breakdown tolerance on :math:`\\beta_j`. Default: ``rtol * max_i(|alpha_i|, beta_i)``
        with ``rtol = min(max(1e-10, 10 * eps), 1e-3)`` of the operator dtype (1e-10 in float64, 1.2e-6
        in float32, 1e-3 in half precision).
    callback : callable, optional
        Called as ``callback(state)`` after every step (e.g. to checkpoint the :class:`LanczosState`).

    Returns
    -------
    LanczosResult

    Raises
    ------
    ValueError
        For ``num_iters < 1``, ``num_iters > dim`` with a kept basis, an unknown ``reorth`` or ``probe``,
        a zero or non-finite start vector, or a product with ``H`` that is not finite.
    """
    state = lanczos_init(op, num_iters, reorth=reorth, seed=seed, start=start, probe=probe, tol=tol)
    return lanczos_resume(op, state, progress=progress, callback=callback)


@holds_freed_memory
def lanczos_resume(
    op: SymmetricOperator,
    state: LanczosState,
    progress: bool = True,
    callback: Callable[[LanczosState], None] | None = None,
) -> LanczosResult:
    """Step ``state`` until it is done (e.g. after loading a checkpoint), then finish it."""
    with progress_bar(total=state.num_iters, initial=state.iteration, desc="lanczos", disable=not progress) as bar:
        while not state.done:
            lanczos_step(op, state)
            bar.update(1)
            if callback is not None:
                callback(state)
        if state.breakdown:
            set_postfix(bar, f"breakdown at {state.iteration}")
    return lanczos_finish(state)
