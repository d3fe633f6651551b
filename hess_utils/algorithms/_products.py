"""Products with an operator whose result the caller may modify in place."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hess_utils.operators.base import SymmetricOperator
from hess_utils.vectors import TensorList


def owned_matvec(
    op: SymmetricOperator, v: Sequence[torch.Tensor], keep: Sequence[torch.Tensor] = ()
) -> TensorList:
    """``op.matvec(v)`` with every block that shares memory with ``v`` or ``keep`` cloned.

    An operator may legitimately return its input (the identity) or a view of it; algorithms that update
    the product in place would then corrupt vectors they still need.
    """
    out = op.matvec(v)
    taken = {t.untyped_storage().data_ptr() for t in (*v, *keep)}
    return [b.clone() if b.untyped_storage().data_ptr() in taken else b for b in out]
