"""Data parallelism on ``torch.distributed``: each rank holds the whole model and a share of the batches.

With ``N`` the predicted tokens over all batches of all ranks (all-reduced once, at construction),

    H v = (1 / N) * sum_ranks sum_{b in rank's batches} H_b^sum v,

so each rank computes its un-normalised share and one all-reduce sums it. Every rank then holds the same
``H v``; Lanczos and SLQ run identically on every rank (same seed), so no vector is ever sent. Only rank 0
should write results (:func:`is_main_process`).

Batches are dealt round-robin: rank ``r`` of ``W`` takes batches ``r, r + W, r + 2W, ...``. The result does
not depend on ``W``; a rank that gets no batch (``W`` larger than the number of batches) contributes zero
and a warning says so, since it wastes a device.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from hess_utils import loss as L
from hess_utils.distributed import is_main_process  # noqa: F401 - re-exported for callers of the engine
from hess_utils.operators.hessian import HessianOperator
from hess_utils.vectors import TensorList


def shard_batches(batches: Sequence[L.Batch], rank: int, world_size: int) -> list[L.Batch]:
    """Rank ``rank``'s batches under the round-robin rule of the module docstring."""
    return list(batches[rank::world_size])


def all_reduce_blocks(blocks: TensorList, group=None) -> TensorList:
    """Sum each block over ranks with one all-reduce of a flat buffer per dtype (blocks on one device)."""
    if not blocks:
        return blocks
    flat = torch.cat([b.reshape(-1) for b in blocks])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, start = [], 0
    for b in blocks:
        out.append(flat[start : start + b.numel()].view_as(b))
        start += b.numel()
    return out


class DataParallelHessianOperator(HessianOperator):
    """:class:`HessianOperator` over the batches of all ranks (module docstring).

    Pass the *same* full list of batches on every rank; each rank keeps its own share. ``options`` are the
    keywords of :class:`HessianOperator` (``params``, ``method``, ``reduction``, ``fd_eps``, ``fd_mode``,
    ``keep_graph``, ``progress``: shown on rank 0 only); ``group`` the process group (default: the world).
    """

    def __init__(self, model: torch.nn.Module, batches: Iterable[L.Batch], *, group=None, **options: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("torch.distributed is not initialised: launch with torchrun, or use HessianOperator")
        self.group = group
        self._sharded = False
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        all_batches = list(batches)
        options["progress"] = bool(options.get("progress", False)) and self.rank == 0
        super().__init__(model, all_batches, **options)
        self.batches = shard_batches(all_batches, self.rank, self.world_size)
        self.passes_per_rank = -(-len(all_batches) // self.world_size)  # ceil: the busiest rank's count
        self._spare_batch = all_batches[0]
        self._sharded = True
        if len(all_batches) < self.world_size:
            warnings.warn(f"{len(all_batches)} batches over {self.world_size} ranks: some ranks have nothing to do",
                          stacklevel=2)
        self.num_tokens = self._global_token_count()

    def _global_token_count(self) -> int:
        if not self._sharded:
            return L.total_tokens(self.batches)  # during the base constructor: validation only
        local = torch.tensor([L.total_tokens(self.batches)], dtype=torch.int64, device=self.devices[0])
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group)
        return int(local.item())

    def _reduce(self, local: TensorList) -> TensorList:
        return all_reduce_blocks(local, self.group)

    def _sum_scalar(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.devices[0])
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return float(t.item())
