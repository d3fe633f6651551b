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
