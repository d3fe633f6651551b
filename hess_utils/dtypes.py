"""The one map from dtype names to torch dtypes: the CLI's ``--dtype``, ``load_model(dtype=...)``, the studies.

Torch is imported only when a name is resolved, so the CLI can list the choices before it loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float64", "float32", "bfloat16", "float16")


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``dtype`` as a floating torch dtype: a floating ``torch.dtype`` as it is, or one of :data:`DTYPE_NAMES`."""
    import torch

    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; pass a floating torch dtype or one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, dtype)
