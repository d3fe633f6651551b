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
    return _owned(op.matvec(v), (*v, *keep))


def owned_matmat(
    op: SymmetricOperator, vectors: Sequence[Sequence[torch.Tensor]], keep: Sequence[torch.Tensor] = ()
) -> list[TensorList]:
    """``op.matmat(vectors)`` with every block that shares memory with an input or ``keep`` cloned."""
    outs = op.matmat(vectors)
    guard = (*(b for v in vectors for b in v), *keep)
    return [_owned(out, guard) for out in outs]


def _owned(out: Sequence[torch.Tensor], guard: Sequence[torch.Tensor]) -> TensorList:
    taken = {t.untyped_storage().data_ptr() for t in guard}
    return [b.clone() if b.untyped_storage().data_ptr() in taken else b for b in out]
