"""What the library needs to know of torch.distributed outside the engines: which process writes results, and
whether every rank agrees on where a resumed run starts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_main_process() -> bool:
    """True on rank 0, or when torch.distributed is not initialised."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_distributed() -> bool:
    """True when torch.distributed is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def min_on_all_ranks(value: int, device: torch.device) -> int:
    """The smallest of the integers the ranks passed (a min all-reduce on ``device``; a meta device counts as
    the CPU); ``value`` itself without torch.distributed."""
    if not is_distributed():
        return int(value)
    if device.type == "meta":
        device = torch.device("cpu")
    mine = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(mine, op=dist.ReduceOp.MIN)
    return int(mine.item())


def same_on_all_ranks(values: Sequence[int], device: torch.device) -> bool:
    """Whether every rank passed the same integers (an elementwise min and max all-reduce, on ``device``;
    a meta device counts as the CPU). True without torch.distributed."""
    if not is_distributed():
        return True
    if device.type == "meta":
        device = torch.device("cpu")
    mine = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))
