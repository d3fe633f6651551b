"""Dense symmetric matrices as operators, so every algorithm can be checked on known spectra."""

from __future__ import annotations

import torch

from hess_utils.operators.base import SymmetricOperator
from hess_utils.vectors import TensorList


class DenseOperator(SymmetricOperator):
    """``H`` given as a dense symmetric ``(n, n)`` tensor; vectors are one-block lists ``[x]``, ``x: (n,)``."""

    def __init__(self, matrix: torch.Tensor, name: str = "matrix", check_symmetric: bool = True) -> None:
        if not isinstance(matrix, torch.Tensor):
            matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"as_operator needs a square matrix, got shape {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            matrix = matrix.to(torch.float64)
        if check_symmetric:
            scale = matrix.abs().max().clamp_min(1e-300)
            asym = float((matrix - matrix.T).abs().max() / scale)
            tol = 1e-10 if matrix.dtype == torch.float64 else 1e-5
            if asym > tol:
                raise ValueError(
                    f"matrix is not symmetric (max |A - A^T| / max |A| = {asym:.2e}); pass (A + A.T) / 2"
                )
        self.matrix = matrix
        self.param_names = [name]
        self.shapes = [torch.Size([matrix.shape[0]])]
        self.dtypes = [matrix.dtype]
        self.devices = [matrix.device]

    def _matvec(self, v: TensorList) -> TensorList:
        return [self.matrix @ v[0]]


def as_operator(matrix: torch.Tensor, check_symmetric: bool = True) -> DenseOperator:
    """Wrap a dense symmetric tensor as an operator whose vectors are ``[x]`` with ``x`` of shape ``(n,)``."""
    return DenseOperator(matrix, check_symmetric=check_symmetric)
