"""Smoothed spectral densities from quadrature nodes (SLQ or Lanczos Ritz values and weights).

A discrete spectral measure :math:`\\hat\\phi = \\frac{1}{P}\\sum_p \\sum_j w_{pj} \\delta_{\\theta_{pj}}`
(see :mod:`hess_utils.algorithms.slq`) is turned into a density by Gaussian smoothing,

.. math:: \\rho_\\sigma(x) = \\frac{1}{P} \\sum_{p,j} w_{pj}\\, \\mathcal{N}(x; \\theta_{pj}, \\sigma^2),

as in Ghorbani, Krishnan and Xiao (2019) and their ``density.py``. Here ``sigma`` is a **standard
deviation** (PyHessian's ``sigma_squared`` is a variance). Small functions do one job each: take the
nodes out of a result, choose ``sigma`` and the grid, evaluate the mixture, normalise on the grid.

For spectra spanning orders of magnitude, :func:`log_abs_density` smooths in :math:`u = \\log_{10}
|\\lambda|`, separately for positive and negative nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hess_utils.algorithms._frozen import freeze_arrays, short_repr
from hess_utils.algorithms.lanczos import LanczosResult
from hess_utils.algorithms.slq import SLQResult

SpectralInput = SLQResult | LanczosResult | tuple[np.ndarray, np.ndarray]

DEFAULT_SIGMA_FRACTION = 0.01  # default sigma: 1/100 of the spread of the nodes
DEFAULT_MARGIN = 5.0  # default grids reach this many sigmas beyond the extreme nodes
_NODE_CHUNK = 4096  # nodes per chunk of the (grid x nodes) Gaussian matrix
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


@dataclass(frozen=True)
class DensityResult:
    """A spectral density on a grid.

    Attributes
    ----------
    grid : np.ndarray, shape (G,)
        Ascending evaluation points.
    density : np.ndarray, shape (G,)
        Density values; ``np.trapezoid(density, grid) == 1`` when normalised (the default).
    sigma : float
        Standard deviation of the Gaussian kernel (NaN for kernels that are not Gaussian).
    mass_on_grid : float
        Integral (trapezoid) of the unnormalised density over the grid: close to 1 when the grid covers
        the spectrum, smaller when it cuts mass off.
    """

    grid: np.ndarray
    density: np.ndarray
    sigma: float
    mass_on_grid: float

    __repr__ = short_repr

    def to_frame(self):
        """The density as a table: ``grid``, ``density`` (a pandas DataFrame, one row per grid point)."""
        import pandas as pd

        return pd.DataFrame({"grid": self.grid, "density": self.density})

    def __post_init__(self) -> None:
        freeze_arrays(self)


@dataclass(frozen=True)
class LogDensityResult:
    """Densities of :math:`u = \\log_{10}|\\lambda|` for the positive and for the negative nodes.

    ``positive`` integrates over the real line to ``positive_mass``, ``negative`` to ``negative_mass``;
    together with ``near_zero_mass`` (nodes with ``|lambda| < threshold``, left out of both) they sum to 1.

    Attributes
    ----------
    grid : np.ndarray, shape (G,)
        Values of :math:`u = \\log_{10}|\\lambda|`.
    positive, negative : np.ndarray, shape (G,)
        Density per unit of :math:`\\log_{10}|\\lambda|` of the nodes :math:`\\lambda \\geq` threshold and
        :math:`\\lambda \\leq -` threshold.
    sigma_log : float
        Standard deviation of the Gaussian kernel in :math:`u`.
    threshold : float
        Nodes with :math:`|\\lambda|` below it count as near zero.
    positive_mass, negative_mass, near_zero_mass : float
        Weight of each group of nodes.
    """

    grid: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    sigma_log: float
    threshold: float
    positive_mass: float
    negative_mass: float
    near_zero_mass: float

    __repr__ = short_repr

    def to_frame(self):
        """``grid`` (of ``log10 |lambda|``), ``positive``, ``negative`` as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame({"grid": self.grid, "positive": self.positive, "negative": self.negative})

    def __post_init__(self) -> None:
        freeze_arrays(self)


# ---------------------------------------------------------------------------------------------- nodes
def spectral_nodes(result: SpectralInput) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights (summing to 1) of a result, flattened, padding and zero weights dropped.

    Parameters
    ----------
    result : SLQResult, LanczosResult or (values, weights)
        For an SLQResult the probes are averaged (weights ``w_pj / P``). Arrays of any matching shapes
        are flattened; NaN values (padding) are dropped; the weights are rescaled to sum to 1.

    Returns
    -------
    values, weights : np.ndarray, shape (m,)
    """
    if isinstance(result, SLQResult):
        values, weights = result.spectral_measure()
    elif isinstance(result, LanczosResult):
        values, weights = result.ritz_values, result.ritz_weights
    else:
        values, weights = result
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if values.shape != weights.shape:
        raise ValueError(f"values and weights differ in size ({values.size} vs {weights.size})")
    keep = ~np.isnan(values)
    values, weights = values[keep], weights[keep]
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(weights)) and np.all(weights >= 0)):
        raise ValueError("nodes must be finite with finite non-negative weights")
    total = weights.sum()
    if total <= 0:
        raise ValueError("the weights sum to zero; there is no measure to smooth")
    keep = weights > 0
    return values[keep], weights[keep] / total


# ---------------------------------------------------------------------------------------------- choices
def check_sigma(sigma: float, name: str = "sigma") -> float:
    """``sigma`` as a float, refusing non-positive or non-finite values."""
    if not (isinstance(sigma, (int, float, np.floating)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{name} must be a positive standard deviation, got {sigma!r}")
    return float(sigma)


def default_sigma(values: np.ndarray, fraction: float = DEFAULT_SIGMA_FRACTION) -> float:
    """``fraction * (max - min)`` of the nodes (1/100 of their spread by default)."""
    width = float(np.max(values) - np.min(values))
    if width <= 0:
        raise ValueError("all nodes coincide, so there is no spread to scale sigma by; pass sigma explicitly")
    return fraction * width


def default_grid(
    values: np.ndarray, sigma: float, num_points: int = 1000, margin: float = DEFAULT_MARGIN
) -> np.ndarray:
    """``num_points`` equispaced points from ``min - margin * sigma`` to ``max + margin * sigma``."""
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    return np.linspace(np.min(values) - margin * sigma, np.max(values) + margin * sigma, num_points)


def check_grid(grid: np.ndarray) -> np.ndarray:
    """``grid`` as a new 1-d float64 array of at least 2 finite, strictly increasing points."""
    grid = np.array(grid, dtype=np.float64)  # a copy: results freeze their arrays
    if grid.ndim != 1 or grid.size < 2 or not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
        raise ValueError("grid must be a 1-d array of at least 2 finite, strictly increasing points")
    return grid


# ---------------------------------------------------------------------------------------------- evaluation
def gaussian_mixture(grid: np.ndarray, values: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """:math:`\\sum_j w_j \\mathcal{N}(x; \\theta_j, \\sigma^2)` at every ``x`` of ``grid`` (shape ``(G,)``)."""
    out = np.zeros(grid.shape, dtype=np.float64)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    for s in range(0, values.size, _NODE_CHUNK):
        z = (grid[:, None] - values[None, s : s + _NODE_CHUNK]) / sigma
        out += np.exp(-0.5 * z * z) @ weights[s : s + _NODE_CHUNK]
    return out * norm


def normalise_on_grid(grid: np.ndarray, density: np.ndarray) -> tuple[np.ndarray, float]:
    """``density`` divided by its trapezoid integral over ``grid``, and that integral."""
    mass = float(_trapezoid(density, grid))
    if not mass > 0:
        raise ValueError("the density has no mass on the grid; widen the grid to cover the spectrum")
    return density / mass, mass


def gaussian_density(
    result: SpectralInput,
    sigma: float | None = None,
    grid: np.ndarray | None = None,
    num_points: int = 1000,
    margin: float = DEFAULT_MARGIN,
    normalize: bool = True,
) -> DensityResult:
    """Gaussian-smoothed spectral density :math:`\\rho_\\sigma` of an SLQ or Lanczos result.

    Parameters
    ----------
    result : SLQResult, LanczosResult or (values, weights)
        The quadrature nodes (see :func:`spectral_nodes`).
    sigma : float, optional
        Kernel **standard deviation** (not a variance). Default: 1/100 of ``max - min`` of the nodes.
    grid : array, shape (G,), optional
        Evaluation points; default ``num_points`` points over ``[min - margin sigma, max + margin sigma]``.
    num_points : int
        Size of the default grid.
    margin : float
        How many sigmas the default grid extends beyond the extreme nodes.
    normalize : bool
        Divide by the trapezoid integral over the grid so that the density integrates to 1 there
        (default). With False the values are the exact mixture (integrating to 1 over the real line).

    Returns
    -------
    DensityResult
        ``mass_on_grid`` is the integral before normalisation.
    """
    values, weights = spectral_nodes(result)
    sigma = default_sigma(values) if sigma is None else check_sigma(sigma)
    grid = default_grid(values, sigma, num_points, margin) if grid is None else check_grid(grid)
    density = gaussian_mixture(grid, values, weights, sigma)
    normalised, mass = normalise_on_grid(grid, density)
    return DensityResult(grid=grid, density=normalised if normalize else density, sigma=sigma, mass_on_grid=mass)


# ---------------------------------------------------------------------------------------------- log view
def default_threshold(values: np.ndarray, relative: float = 1e-6) -> float:
    """``relative * max |lambda|``: nodes below it are indistinguishable from zero at single precision."""
    scale = float(np.max(np.abs(values)))
    if scale <= 0:
        raise ValueError("all nodes are zero; there is nothing to show on a log scale")
    return relative * scale


def log_abs_density(
    result: SpectralInput,
    sigma_log: float = 0.05,
    grid: np.ndarray | None = None,
    num_points: int = 1000,
    threshold: float | None = None,
    margin: float = DEFAULT_MARGIN,
) -> LogDensityResult:
    """Densities of :math:`\\log_{10}|\\lambda|` for positive and negative nodes, for wide spectra.

    Each node with :math:`|\\theta| \\geq` ``threshold`` contributes
    :math:`w\\,\\mathcal{N}(u; \\log_{10}|\\theta|, \\sigma_{\\log}^2)` to the density of its sign; nodes
    below the threshold are counted in ``near_zero_mass`` only. No normalisation on the grid: each
    density integrates over the real line to the weight of its sign.

    Parameters
    ----------
    result : SLQResult, LanczosResult or (values, weights)
        The quadrature nodes (see :func:`spectral_nodes`).
    sigma_log : float
        Kernel standard deviation in decades (0.05: about 12 % in :math:`|\\lambda|`).
    grid : array, optional
        Points in :math:`u`; default ``num_points`` points from ``log10(threshold) - margin sigma_log``
        to ``log10(max |theta|) + margin sigma_log``.
    num_points : int
        Size of the default grid.
    threshold : float, optional
        Magnitude below which nodes count as zero; default ``1e-6 * max |theta|``.
    margin : float
        Extension of the default grid in units of ``sigma_log``.

    Returns
    -------
    LogDensityResult
    """
    values, weights = spectral_nodes(result)
    sigma_log = check_sigma(sigma_log, "sigma_log")
    threshold = default_threshold(values) if threshold is None else check_sigma(threshold, "threshold")
    if grid is None:
        top = math.log10(float(np.max(np.abs(values))))
        lo = math.log10(threshold) - margin * sigma_log
        grid = np.linspace(lo, max(top, math.log10(threshold)) + margin * sigma_log, num_points)
    grid = check_grid(grid)
    pos = values >= threshold
    neg = values <= -threshold
    return LogDensityResult(
        grid=grid,
        positive=gaussian_mixture(grid, np.log10(values[pos]), weights[pos], sigma_log),
        negative=gaussian_mixture(grid, np.log10(-values[neg]), weights[neg], sigma_log),
        sigma_log=sigma_log,
        threshold=threshold,
        positive_mass=float(weights[pos].sum()),
        negative_mass=float(weights[neg].sum()),
        near_zero_mass=float(weights[~(pos | neg)].sum()),
    )
