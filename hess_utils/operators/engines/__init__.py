"""Engines: the same operator interface on accelerate device maps, torch.distributed data parallelism, FSDP2.

* device maps: a model dispatched by accelerate over several devices needs no engine of its own
  (:class:`HessianOperator` keeps each vector block on its parameter's device); what must hold for it is
  :mod:`hess_utils.placement`.
* ``ddp``: :class:`DataParallelHessianOperator`, batches dealt over ranks, products all-reduced.
* ``fsdp``: :class:`FSDPHessianOperator`, finite-difference products of an FSDP2-sharded model.
"""

from hess_utils.operators.engines.ddp import DataParallelHessianOperator, shard_batches
from hess_utils.operators.engines.fsdp import FSDPHessianOperator
from hess_utils.placement import check_materialised

__all__ = ["DataParallelHessianOperator", "FSDPHessianOperator", "check_materialised", "shard_batches"]
