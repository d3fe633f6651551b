"""What the library needs to know of torch.distributed outside the engines: which process writes results."""

from __future__ import annotations

import torch.distributed as dist


def is_main_process() -> bool:
    """True on rank 0, or when torch.distributed is not initialised."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
