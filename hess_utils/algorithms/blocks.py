"""Block-diagonal approximations of an operator and how far they are from it.

``H_bd`` keeps the blocks ``H_gg`` of a partition of the parameters into groups ``g`` and drops the
couplings between groups. For random ``v`` we report the relative error ``||(H - H_bd) v|| / ||H v||`` and
the cosine between ``H v`` and ``H_bd v`` (the foundation-scale paper finds order-one errors).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hess_utils import vectors as V
from hess_utils.algorithms._frozen import short_repr
from hess_utils.algorithms.probes import probe_seed
from hess_utils.operators.base import SymmetricOperator
from hess_utils.vectors import TensorList

GROUPINGS = ("tensor", "layer", "block")
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def group_parameters(param_names: Sequence[str], by: str | Sequence[Sequence[str]]) -> list[list[int]]:
    """Partition block positions ``0..len(param_names)-1`` into groups.

    ``by``: ``"tensor"`` one group per parameter tensor; ``"layer"`` one per module (name without its last
    component); ``"block"`` one per numbered decoder block (``...layers.3.``), other parameters grouped
    by module; or explicit groups of parameter names.
    """
    names = list(param_names)
    if isinstance(by, str):
        if by not in GROUPINGS:
            raise ValueError(f"unknown grouping {by!r}; choose one of {GROUPINGS} or pass lists of names")

        def key(name: str) -> str:
            if by == "tensor":
                return name
            if by == "block":
                match = _BLOCK.match(name)
                if match:
                    return match.group(1)
            return name.rsplit(".", 1)[0]

        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(key(name), []).append(i)
        return list(groups.values())
    position = {n: i for i, n in enumerate(names)}
    out, seen = [], set()
    for group in by:
        idx = []
        for n in group:
            if n not in position:
                raise ValueError(f"unknown parameter {n!r} in a group")
            if n in seen:
                raise ValueError(f"parameter {n!r} appears in two groups")
            seen.add(n)
            idx.append(position[n])
        out.append(idx)
    missing = [n for n in names if n not in seen]
    if missing:
        out.extend([[position[n]] for n in missing])  # ungrouped parameters form their own blocks
    return out


class BlockDiagonalOperator(SymmetricOperator):
    """``H_bd v``: for each group, ``H`` applied to ``v`` restricted to the group, restricted again.

    One matvec of the wrapped operator per group; vectors are those of the wrapped operator.
    """

    def __init__(self, op: SymmetricOperator, by: str | Sequence[Sequence[str]] = "tensor") -> None:
        self.op = op
        self.groups = group_parameters(op.param_names, by)
        self.param_names, self.shapes = list(op.param_names), list(op.shapes)
        self.dtypes, self.devices = list(op.dtypes), list(op.devices)

    @property
    def product_rtol(self) -> float | None:
        """That of the wrapped operator: its products, restricted, are this one's."""
        return self.op.product_rtol

    def _matvec(self, v: TensorList) -> TensorList:
        out = V.zeros_like(v)
        for group in self.groups:
            masked = V.zeros_like(v)
            for i in group:
                masked[i] = v[i]
            hv = self.op.matvec(masked)
            for i in group:
                out[i] = hv[i]
        return out


@dataclass(frozen=True)
class BlockDiagonalError:
    """Per random vector: ``relative_errors[k] = ||(H - H_bd) v_k|| / ||H v_k||``, ``cosines[k]``."""

    relative_errors: np.ndarray
    cosines: np.ndarray
    num_groups: int
    grouping: str

    __repr__ = short_repr

    def to_frame(self):
        """One row per test vector: ``relative_error``, ``cosine`` (a pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame({"relative_error": self.relative_errors, "cosine": self.cosines})

    @property
    def mean_relative_error(self) -> float:
        return float(self.relative_errors.mean())

    @property
    def mean_cosine(self) -> float:
        return float(self.cosines.mean())


def block_diagonal_error(
    op: SymmetricOperator,
    by: str | Sequence[Sequence[str]] = "tensor",
    num_vectors: int = 10,
    seed: int = 0,
    probe: str = "gaussian",
) -> BlockDiagonalError:
    """Compare ``H v`` with ``H_bd v`` over ``num_vectors`` seeded random vectors."""
    if num_vectors < 1:
        raise ValueError("num_vectors must be at least 1")
    bd = BlockDiagonalOperator(op, by)
    errors, cosines = [], []
    for k in range(num_vectors):
        v = op.random_vector(probe, seed=probe_seed(seed, k))
        hv, hbv = op.matvec(v), bd.matvec(v)
        hv_norm, hbv_norm = V.norm(hv), V.norm(hbv)
        errors.append(V.norm(V.add(hv, hbv, -1.0)) / max(hv_norm, torch.finfo(torch.float64).tiny))
        cosines.append(V.dot(hv, hbv) / max(hv_norm * hbv_norm, torch.finfo(torch.float64).tiny))
    return BlockDiagonalError(np.array(errors), np.array(cosines), len(bd.groups), str(by))
