"""Make the numpy arrays of a frozen result dataclass read-only, so results cannot be edited in place."""

from __future__ import annotations

from dataclasses import fields

import numpy as np


def freeze_arrays(result: object) -> None:
    """Clear the ``writeable`` flag of every numpy array field of the dataclass instance ``result``."""
    for f in fields(result):
        value = getattr(result, f.name)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False


def _summary(value: object) -> str:
    """A few characters for one field: arrays and tensors by shape and dtype, long sequences by length."""
    if isinstance(value, np.ndarray):
        return f"array{list(value.shape)} {value.dtype}"
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):  # a torch tensor, without importing torch here
        return f"tensor{list(shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"<{len(value)} {type(value).__name__} items>"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def short_repr(result: object) -> str:
    """``Name(field=value, ...)`` with arrays, tensors and long lists summarised, for results in a notebook.

    The dataclass default prints every array in full, which buries the scalars a reader looks for.
    """
    parts = ", ".join(f"{f.name}={_summary(getattr(result, f.name))}" for f in fields(result) if f.repr)
    return f"{type(result).__name__}({parts})"
