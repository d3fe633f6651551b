"""Hessian columns ``H e_i`` and how many of their entries are negligible (HessFormer section 5).

A column of the Hessian shows whether curvature couples a parameter to its neighbours only (banded) or
to everything; the fraction of entries below thresholds ``1e-12 ... 1e-1`` summarises it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hess_utils import vectors as V
from hess_utils.algorithms._frozen import short_repr
from hess_utils.operators.base import SymmetricOperator

DEFAULT_THRESHOLDS = tuple(10.0**k for k in range(-12, 0))


@dataclass(frozen=True)
class HessianColumn:
    """Column ``index`` of ``H``.

    Attributes
    ----------
    index : int
        Global index (parameters in the operator's block order, each flattened row-major).
    param_name : str
        The parameter the index falls in, and ``local_index`` its flat position there.
    values : np.ndarray
        ``(dim,)`` float64, the whole column.
    """

    index: int
    param_name: str
    local_index: int
    values: np.ndarray

    __repr__ = short_repr

    @property
    def diagonal(self) -> float:
        """``H[index, index]``."""
        return float(self.values[self.index])


def hessian_column(op: SymmetricOperator, index: int) -> HessianColumn:
    """``H e_index`` as a :class:`HessianColumn` (one matvec)."""
    block, local = op.locate(index)
    values = V.flatten(op.matvec(op.basis_vector(index))).numpy()
    return HessianColumn(index, op.param_names[block], local, values)


def random_indices(op: SymmetricOperator, count: int, seed: int = 0) -> list[int]:
    """``count`` distinct global indices drawn uniformly, reproducibly."""
    if not 0 < count <= op.dim:
        raise ValueError(f"count must be in [1, {op.dim}], got {count}")
    g = torch.Generator().manual_seed(seed)
    return sorted(int(i) for i in torch.randperm(op.dim, generator=g)[:count])


def threshold_table(
    columns: HessianColumn | Iterable[HessianColumn],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    relative: bool = False,
):
    """Fraction of ``|entries| < t`` for each threshold ``t``, one row per column, as a DataFrame.

    ``relative=True`` compares ``|H_ij| / max_j |H_ij|`` instead of ``|H_ij|``.
    """
    import pandas as pd

    if isinstance(columns, HessianColumn):
        columns = [columns]
    rows = []
    for col in columns:
        mags = np.abs(col.values)
        if relative:
            mags = mags / max(mags.max(), np.finfo(float).tiny)
        row = {"index": col.index, "param": col.param_name}
        row.update({f"<{t:.0e}": float(np.mean(mags < t)) for t in thresholds})
        rows.append(row)
    if not rows:
        raise ValueError("no column given")
    return pd.DataFrame(rows)
