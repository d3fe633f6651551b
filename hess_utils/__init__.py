"""hess_utils: the Hessian of the loss of Hugging Face causal language models.

Data flows one way: a model and batches become an operator (:func:`hessian_operator`); algorithms take an
operator and return frozen results (:func:`lanczos`, :func:`slq`, :func:`hutchinson_diagonal`, ...); runs
save results with their provenance; notebooks and the CLI plot saved results.

The public names are imported lazily, so ``import hess_utils`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "hess_utils.models",
    "model_provenance": "hess_utils.models",
    "load_batches": "hess_utils.batches",
    "hessian_operator": "hess_utils.operators.hessian",
    "HessianOperator": "hess_utils.operators.hessian",
    "as_operator": "hess_utils.operators.dense",
    "SymmetricOperator": "hess_utils.operators.base",
    "lanczos": "hess_utils.algorithms.lanczos",
    "slq": "hess_utils.algorithms.slq",
    "gaussian_density": "hess_utils.algorithms.density",
    "log_abs_density": "hess_utils.algorithms.density",
    "kpm_density": "hess_utils.algorithms.kpm",
    "hutchinson_diagonal": "hess_utils.algorithms.hutchinson",
    "hutchinson_trace": "hess_utils.algorithms.hutchinson",
    "subset_hessian": "hess_utils.algorithms.subsets",
    "paper_subset": "hess_utils.algorithms.subsets",
    "hessian_column": "hess_utils.algorithms.columns",
    "threshold_table": "hess_utils.algorithms.columns",
    "block_diagonal_error": "hess_utils.algorithms.blocks",
    "BlockDiagonalOperator": "hess_utils.algorithms.blocks",
    "cullum_willoughby_mask": "hess_utils.algorithms.ghosts",
    "lm_loss": "hess_utils.loss",
    "eigsh": "hess_utils.algorithms.eigsh",
    "EigshResult": "hess_utils.algorithms.eigsh",
    "cg": "hess_utils.algorithms.solve",
    "minres": "hess_utils.algorithms.solve",
    "influence": "hess_utils.algorithms.solve",
    "SolveResult": "hess_utils.algorithms.solve",
    "mass_by_tensor": "hess_utils.algorithms.directions",
    "mass_by_group": "hess_utils.algorithms.directions",
    "gradient_overlap": "hess_utils.algorithms.directions",
    "plot_mass_heatmap": "hess_utils.algorithms.directions",
    "parse_parameter_name": "hess_utils.algorithms.directions",
    # the frozen results the algorithms return (each with a short repr; tables through .to_frame())
    "LanczosResult": "hess_utils.algorithms.lanczos",
    "SLQResult": "hess_utils.algorithms.slq",
    "DensityResult": "hess_utils.algorithms.density",
    "LogDensityResult": "hess_utils.algorithms.density",
    "KPMResult": "hess_utils.algorithms.kpm",
    "HutchinsonResult": "hess_utils.algorithms.hutchinson",
    "SubsetHessian": "hess_utils.algorithms.subsets",
    "HessianColumn": "hess_utils.algorithms.columns",
    "BlockDiagonalError": "hess_utils.algorithms.blocks",
    "keep_float64": "hess_utils.operators.precision",
    "report_low_precision": "hess_utils.operators.precision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hess_utils' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # for type checkers and IDEs
    from hess_utils.algorithms.blocks import BlockDiagonalError, BlockDiagonalOperator, block_diagonal_error
    from hess_utils.algorithms.columns import HessianColumn, hessian_column, threshold_table
    from hess_utils.algorithms.density import DensityResult, LogDensityResult, gaussian_density, log_abs_density
    from hess_utils.algorithms.directions import (
        gradient_overlap,
        mass_by_group,
        mass_by_tensor,
        parse_parameter_name,
        plot_mass_heatmap,
    )
    from hess_utils.algorithms.eigsh import EigshResult, eigsh
    from hess_utils.algorithms.ghosts import cullum_willoughby_mask
    from hess_utils.algorithms.hutchinson import HutchinsonResult, hutchinson_diagonal, hutchinson_trace
    from hess_utils.algorithms.kpm import KPMResult, kpm_density
    from hess_utils.algorithms.lanczos import LanczosResult, lanczos
    from hess_utils.algorithms.slq import SLQResult, slq
    from hess_utils.algorithms.solve import SolveResult, cg, influence, minres
    from hess_utils.algorithms.subsets import SubsetHessian, paper_subset, subset_hessian
    from hess_utils.batches import load_batches
    from hess_utils.loss import lm_loss
    from hess_utils.models import load_model, model_provenance
    from hess_utils.operators.base import SymmetricOperator
    from hess_utils.operators.dense import as_operator
    from hess_utils.operators.hessian import HessianOperator, hessian_operator
    from hess_utils.operators.precision import keep_float64, report_low_precision
