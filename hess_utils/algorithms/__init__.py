"""Spectral algorithms on any :class:`~hess_utils.operators.base.SymmetricOperator`.

Lanczos (with ghost detection), stochastic Lanczos quadrature, smoothed densities, the kernel
polynomial method and Hutchinson estimators. Each takes an operator and nothing else about models.
"""

from hess_utils.algorithms.density import (
    DensityResult,
    LogDensityResult,
    gaussian_density,
    log_abs_density,
    spectral_nodes,
)
from hess_utils.algorithms.ghosts import cullum_willoughby_mask, default_ghost_tol
from hess_utils.algorithms.hutchinson import HutchinsonResult, hutchinson_diagonal, hutchinson_trace
from hess_utils.algorithms.kpm import (
    KPMResult,
    chebyshev_density,
    chebyshev_moments,
    estimate_bounds,
    jackson_coefficients,
    kpm_density,
    measure_moments,
)
from hess_utils.algorithms.lanczos import (
    LanczosResult,
    LanczosState,
    lanczos,
    lanczos_finish,
    lanczos_init,
    lanczos_resume,
    lanczos_step,
)
from hess_utils.algorithms.probes import probe_seed
from hess_utils.algorithms.slq import SLQResult, slq
from hess_utils.algorithms.tridiagonal import tridiagonal_eigh

__all__ = [
    "DensityResult",
    "HutchinsonResult",
    "KPMResult",
    "LanczosResult",
    "LanczosState",
    "LogDensityResult",
    "SLQResult",
    "chebyshev_density",
    "chebyshev_moments",
    "cullum_willoughby_mask",
    "default_ghost_tol",
    "estimate_bounds",
    "gaussian_density",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "jackson_coefficients",
    "kpm_density",
    "lanczos",
    "lanczos_finish",
    "lanczos_init",
    "lanczos_resume",
    "lanczos_step",
    "log_abs_density",
    "measure_moments",
    "probe_seed",
    "slq",
    "spectral_nodes",
    "tridiagonal_eigh",
]
