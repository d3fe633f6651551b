"""Operators: one interface (:class:`SymmetricOperator`) for every way of computing ``H v``."""

from hess_utils.operators.base import SymmetricOperator
from hess_utils.operators.dense import DenseOperator, as_operator

__all__ = ["SymmetricOperator", "DenseOperator", "as_operator"]
