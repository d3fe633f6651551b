"""Kernel polynomial method (KPM): the spectral density from stochastic Chebyshev moments.

With bounds :math:`[a, b]` containing the spectrum, :math:`\\tilde H = (H - c)/h`, :math:`c = (a+b)/2`,
:math:`h = (b-a)/2` has its spectrum in :math:`[-1, 1]`. The Chebyshev moments of the eigenvalue
distribution,

.. math:: \\mu_m = \\frac{1}{n} \\operatorname{tr} T_m(\\tilde H)
    \\approx \\frac{1}{P} \\sum_{p=1}^{P} \\frac{z_p^\\top T_m(\\tilde H) z_p}{n},

are estimated with Rademacher or Gaussian probes :math:`z_p` (unbiased since
:math:`\\mathbb{E}[z z^\\top] = I`), and the density is rebuilt with Jackson damping :math:`g_m`
(Weisse, Wellein, Alvermann and Fehske, Rev. Mod. Phys. 78, 275, 2006), which keeps it non-negative
for exact moments and smooths it with a kernel of width about :math:`\\pi h / M`:

.. math:: \\rho(x) = \\frac{g_0 \\mu_0 + 2 \\sum_{m=1}^{M-1} g_m \\mu_m T_m(t)}{\\pi h \\sqrt{1 - t^2}},
    \\qquad t = (x - c)/h.

Moments come in pairs per product with :math:`H` (:math:`T_{2m} = 2 T_m^2 - T_0`,
:math:`T_{2m+1} = 2 T_{m+1} T_m - T_1`), so ``M`` moments cost ``M // 2`` products per probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from hess_utils import vectors as V
from hess_utils._memory import holds_freed_memory
from hess_utils.algorithms._frozen import freeze_arrays, short_repr
from hess_utils.algorithms._products import owned_matvec
from hess_utils.algorithms.density import check_grid, normalise_on_grid
from hess_utils.algorithms.lanczos import lanczos
from hess_utils.algorithms.probes import check_count, check_seed, probe_seed
from hess_utils.operators.base import SymmetricOperator
from hess_utils.progress import progress_bar
from hess_utils.vectors import TensorList

BOUNDS_ITERS = 30  # Lanczos iterations used to estimate the spectral bounds
BOUNDS_MARGIN = 0.05  # extra fraction of the width added on each side of the estimated bounds
# |z^T T_m z| <= z^T z when the spectrum lies in the bounds; beyond this slack it does not.
_MOMENT_SLACK = 1e-2


@dataclass(frozen=True)
class KPMResult:
    """A KPM spectral density and the moments it came from.

    Attributes
    ----------
    grid : np.ndarray, shape (G,)
        Evaluation points, inside ``bounds``.
    density : np.ndarray, shape (G,)
        Density, normalised to integrate (trapezoid) to 1 over ``grid``.
    moments : np.ndarray, shape (M,)
        Estimated Chebyshev moments :math:`\\mu_m` (probe average, undamped).
    probe_moments : np.ndarray, shape (P, M)
        Moments of each probe (their spread gives the Monte Carlo error).
    bounds : tuple of float
        The interval :math:`[a, b]` mapped to :math:`[-1, 1]`.
    mass_on_grid : float
        Trapezoid integral of the density over the grid before normalisation.
    num_moments, num_probes : int
    seed : int
    probe : str
    """

    grid: np.ndarray
    density: np.ndarray
    moments: np.ndarray
    probe_moments: np.ndarray
    bounds: tuple[float, float]
    mass_on_grid: float
    num_moments: int
    num_probes: int
    seed: int
    probe: str

    __repr__ = short_repr

    def to_frame(self):
        """The density as a table: ``grid``, ``density`` (a pandas DataFrame, one row per grid point)."""
        import pandas as pd

        return pd.DataFrame({"grid": self.grid, "density": self.density})

    def __post_init__(self) -> None:
        freeze_arrays(self)


# ---------------------------------------------------------------------------------------------- bounds
@holds_freed_memory
def estimate_bounds(
    op: SymmetricOperator,
    num_iters: int = BOUNDS_ITERS,
    seed: int = 0,
    margin: float = BOUNDS_MARGIN,
    progress: bool = False,
) -> tuple[float, float]:
    """Interval containing the spectrum: Ritz extremes, widened by their residuals and a margin.

    A short fully re-orthogonalised Lanczos run gives :math:`\\theta_{\\min}, \\theta_{\\max}` with
    residual bounds :math:`r`; the interval :math:`[\\theta_{\\min} - r_{\\min}, \\theta_{\\max} +
    r_{\\max}]` is widened by ``margin`` times its width on each side, as unconverged extreme eigenvalues
    may lie beyond it.
    """
    result = lanczos(op, min(num_iters, op.dim), reorth="full", seed=seed, progress=progress)
    lo = float(result.ritz_values[0] - result.residual_estimates[0])
    hi = float(result.ritz_values[-1] + result.residual_estimates[-1])
    width = hi - lo
    pad = margin * (width if width > 0 else max(abs(lo), abs(hi), 1.0))
    return lo - pad, hi + pad


def check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    """``bounds`` as two finite floats ``a < b``."""
    try:
        a, b = (float(x) for x in bounds)
    except (TypeError, ValueError) as err:
        raise ValueError(f"bounds must be a pair (lower, upper), got {bounds!r}") from err
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ValueError(f"bounds must be finite with lower < upper, got {bounds!r}")
    return a, b


# ---------------------------------------------------------------------------------------------- moments
def jackson_coefficients(num_moments: int) -> np.ndarray:
    """Jackson damping factors :math:`g_m`, ``m = 0..M-1`` (shape ``(M,)``, :math:`g_0 = 1`).

    :math:`g_m = \\frac{(M - m + 1)\\cos\\frac{\\pi m}{M+1} + \\sin\\frac{\\pi m}{M+1}\\cot\\frac{\\pi}{M+1}}{M+1}`.
    """
    M = check_count("num_moments", num_moments)
    m = np.arange(M)
    q = math.pi / (M + 1)
    return ((M - m + 1) * np.cos(q * m) + np.sin(q * m) / math.tan(q)) / (M + 1)


def _probe_moments(
    op: SymmetricOperator, z: TensorList, num_moments: int, center: float, half_width: float, bar: tqdm
) -> np.ndarray:
    """:math:`z^\\top T_m(\\tilde H) z` for ``m < num_moments`` with ``num_moments // 2`` products."""
    mu = np.zeros(2 * (num_moments // 2) + 1)
    mu[0] = V.dot(z, z)
    prev, cur = None, z
    for m in range(num_moments // 2):
        nxt = owned_matvec(op, cur, keep=prev or ())
        # T_{m+1} = 2 t T_m - T_{m-1}, with T_1 = t, where t = (H - c) / h.
        V.axpy_(-center, cur, nxt)
        V.scale_((2.0 if prev is not None else 1.0) / half_width, nxt)
        if prev is not None:
            V.axpy_(-1.0, prev, nxt)
        if m == 0:
            mu[1] = V.dot(z, nxt)
        mu[2 * m + 1] = 2.0 * V.dot(nxt, cur) - mu[1]
        mu[2 * m + 2] = 2.0 * V.dot(nxt, nxt) - mu[0]
        prev, cur = cur, nxt
        bar.update(1)
    return mu[:num_moments]


def _check_moments_bounded(mu: np.ndarray, bounds: tuple[float, float], probe: int) -> None:
    """Refuse moments that prove the spectrum leaves the bounds (``|T_m| <= 1`` on ``[-1, 1]``)."""
    if not np.all(np.isfinite(mu)):
        raise ValueError(f"non-finite Chebyshev moments for probe {probe}: the operator returned inf/NaN")
    worst = int(np.argmax(np.abs(mu)))
    if abs(mu[worst]) > (1.0 + _MOMENT_SLACK) * mu[0]:
        raise ValueError(
            f"Chebyshev moment {worst} of probe {probe} is {mu[worst] / mu[0]:.3g} times z^T z, impossible "
            f"if the spectrum lies in bounds={bounds}; pass wider bounds"
        )


@holds_freed_memory
def chebyshev_moments(
    op: SymmetricOperator,
    num_moments: int,
    bounds: tuple[float, float],
    num_probes: int,
    seed: int = 0,
    probe: str = "rademacher",
    progress: bool = True,
) -> np.ndarray:
    """Per-probe moments :math:`z_p^\\top T_m(\\tilde H) z_p / n`, shape ``(P, M)``.

    Probe ``p`` is ``op.random_vector(probe, seed * 1_000_003 + p)``.
    """
    num_moments = check_count("num_moments", num_moments)
    num_probes = check_count("num_probes", num_probes)
    a, b = check_bounds(bounds)
    center, half_width = (a + b) / 2, (b - a) / 2
    out = np.zeros((num_probes, num_moments))
    with progress_bar(total=num_probes * (num_moments // 2), desc="kpm", disable=not progress) as bar:
        for p in range(num_probes):
            z = op.random_vector(probe, probe_seed(seed, p))
            mu = _probe_moments(op, z, num_moments, center, half_width, bar)
            _check_moments_bounded(mu, (a, b), p)
            out[p] = mu / op.dim
    return out


def measure_moments(
    values: np.ndarray, weights: np.ndarray, bounds: tuple[float, float], num_moments: int
) -> np.ndarray:
    """Exact Chebyshev moments :math:`\\sum_j w_j T_m(t_j)` of a discrete measure, shape ``(M,)``.

    For checks and comparisons, e.g. the true eigenvalues with weights ``1/n``, or SLQ nodes.
    """
    a, b = check_bounds(bounds)
    t = (np.asarray(values, dtype=np.float64) - (a + b) / 2) / ((b - a) / 2)
    if np.any(np.abs(t) > 1):
        raise ValueError(f"nodes lie outside bounds={bounds}; pass bounds containing them")
    m = np.arange(check_count("num_moments", num_moments))
    return np.cos(m[:, None] * np.arccos(t)[None, :]) @ np.asarray(weights, dtype=np.float64)


# ---------------------------------------------------------------------------------------------- density
def default_kpm_grid(bounds: tuple[float, float], num_points: int = 1000) -> np.ndarray:
    """``num_points`` equispaced points strictly inside ``bounds`` (the ends are singular)."""
    a, b = check_bounds(bounds)
    return np.linspace(a, b, num_points + 2)[1:-1]


def chebyshev_density(
    moments: np.ndarray, bounds: tuple[float, float], grid: np.ndarray, jackson: bool = True
) -> np.ndarray:
    """Density :math:`\\rho(x)` on ``grid`` from moments ``(M,)``; zero outside the open ``bounds``."""
    a, b = check_bounds(bounds)
    moments = np.asarray(moments, dtype=np.float64)
    damping = jackson_coefficients(moments.size) if jackson else np.ones(moments.size)
    coeffs = damping * moments
    coeffs[1:] *= 2.0
    t = (np.asarray(grid, dtype=np.float64) - (a + b) / 2) / ((b - a) / 2)
    inside = np.abs(t) < 1
    theta = np.arccos(t[inside])
    series = np.cos(np.arange(moments.size)[:, None] * theta[None, :]).T @ coeffs
    out = np.zeros(t.shape)
    out[inside] = series / (math.pi * (b - a) / 2 * np.sin(theta))
    return out


@holds_freed_memory
def kpm_density(
    op: SymmetricOperator,
    num_moments: int = 100,
    num_probes: int = 10,
    bounds: tuple[float, float] | None = None,
    seed: int = 0,
    grid: np.ndarray | None = None,
    num_points: int = 1000,
    probe: str = "rademacher",
    progress: bool = True,
) -> KPMResult:
    """Spectral density of ``op`` by the kernel polynomial method with Jackson damping.

    Parameters
    ----------
    op : SymmetricOperator
        The symmetric operator :math:`H` (dimension ``n``).
    num_moments : int
        Number of Chebyshev moments ``M`` (resolution about ``pi * (b - a) / (2 M)``).
    num_probes : int
        Number of random probes ``P``.
    bounds : (float, float), optional
        Interval containing the whole spectrum. Default :func:`estimate_bounds` (30 Lanczos iterations,
        seeded with probe ``P`` of ``seed``, i.e. ``seed * 1_000_003 + P``, widened by residuals + 5 %).
    seed : int
        Probe ``p`` uses seed ``seed * 1_000_003 + p``.
    grid : array, optional
        Evaluation points; default ``num_points`` points strictly inside the bounds.
    num_points : int
        Size of the default grid.
    probe : {"rademacher", "gaussian"}
        Distribution of the probes.
    progress : bool
        Show a progress bar.

    Returns
    -------
    KPMResult
        Density normalised to integrate to 1 on the grid (``mass_on_grid`` is the integral before).

    Raises
    ------
    ValueError
        For bad arguments, or moments showing that the spectrum leaves ``bounds``.
    """
    seed = check_seed(seed)
    num_probes = check_count("num_probes", num_probes)
    if bounds is None:
        bounds = estimate_bounds(op, seed=probe_seed(seed, num_probes), progress=False)
    bounds = check_bounds(bounds)
    per_probe = chebyshev_moments(op, num_moments, bounds, num_probes, seed, probe, progress)
    moments = per_probe.mean(axis=0)
    grid = default_kpm_grid(bounds, num_points) if grid is None else check_grid(grid)
    density, mass = normalise_on_grid(grid, chebyshev_density(moments, bounds, grid))
    return KPMResult(
        grid=grid,
        density=density,
        moments=moments,
        probe_moments=per_probe,
        bounds=bounds,
        mass_on_grid=mass,
        num_moments=int(num_moments),
        num_probes=num_probes,
        seed=seed,
        probe=probe,
    )
