"""Engines: the same operator interface on accelerate device maps, torch.distributed data parallelism, FSDP2.

* ``device_map``: a model dispatched by accelerate over several devices; :class:`HessianOperator` already
  keeps each vector block on its parameter's device, so only the placement check lives here.
* ``ddp``: :class:`DataParallelHessianOperator`, batches dealt over ranks, products all-reduced.
* ``fsdp``: :class:`FSDPHessianOperator`, finite-difference products of an FSDP2-sharded model.
"""

from hess_utils.operators.engines.ddp import DataParallelHessianOperator, shard_batches
from hess_utils.operators.engines.device_map import check_materialised
from hess_utils.operators.engines.fsdp import FSDPHessianOperator

__all__ = ["DataParallelHessianOperator", "FSDPHessianOperator", "check_materialised", "shard_batches"]
