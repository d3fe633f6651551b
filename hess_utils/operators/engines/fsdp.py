"""FSDP2 (``torch.distributed.fsdp.fully_shard``): Hessian-vector products by finite differences.

Double backward does not survive FSDP (measured: the gradient comes back without a graph), so, as in the
foundation-scale paper, ``H v ~ (g(w + h v) - g(w - h v)) / (2 h)`` with the core's adaptive step
(:mod:`hess_utils.operators.hessian`): the first step ``h = eps * <|v|, |w|> / ||v||^2``
(:func:`~hess_utils.operators.hessian.fd_step_size`, the inner product summed over the local shards and
all-reduced), the norms of the step model all-reduced over the shards, so every rank takes the same
steps. The perturbation is applied to each rank's local shard: ``v`` is split with ``distribute_tensor``
using the parameter's own placements, and only the local piece is added.

Vectors are full (replicated) tensors shaped like the parameters, identical on every rank, so every
algorithm runs unchanged; ``H v`` is all-gathered to full tensors. Batches are dealt over ranks as in
:mod:`hess_utils.operators.engines.ddp`; FSDP's reduce-scatter averages gradients over ranks, which we undo
(times the world size) to get the token-weighted sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from hess_utils import loss as L
from hess_utils.operators.engines.ddp import DataParallelHessianOperator
from hess_utils.operators.hessian import abs_dot, fd_step_size
from hess_utils.vectors import TensorList


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class FSDPHessianOperator(DataParallelHessianOperator):
    """Finite-difference ``H v`` for a model sharded with ``fully_shard`` (module docstring)."""

    def __init__(self, model: torch.nn.Module, batches: Iterable[L.Batch], *, group=None, **options: Any) -> None:
        """``options``: the keywords of :class:`HessianOperator`; ``method`` can only be ``"fd"`` (the default
        here): a sharded model's parameters are gathered per forward, so they are no leaves of a graph that
        double backward or forward mode could differentiate."""
        method = options.setdefault("method", "fd")
        if method != "fd":
            raise ValueError(f"FSDPHessianOperator computes finite-difference products only (method='fd'), got "
                             f"method={method!r}: use DataParallelHessianOperator for exact products of an unsharded "
                             "model")
        super().__init__(model, batches, group=group, **options)
        self.devices = [_local(p).device for p in self.params]

    def _reduce(self, local: TensorList) -> TensorList:
        return local  # already summed by FSDP's reduce-scatter and gathered in _fd_hvp

    def _local_sq_norm(self, tensors) -> float:
        total = torch.zeros(1, dtype=torch.float64, device=self.devices[0])
        for t in tensors:
            total += _local(t).detach().to(torch.float64).pow(2).sum()
        dist.all_reduce(total, group=self.group)
        return float(total.item())

    def fd_step(self, v: TensorList) -> float:
        """The core's step rule with ``<|v|, |w|>`` from each rank's shard (one all-reduce)."""
        v_sq = sum(float(x.to(torch.float64).pow(2).sum()) for x in v)  # v is full on every rank
        if v_sq == 0:
            return 0.0
        dot = torch.tensor([abs_dot(self._local_pieces(v), [_local(p) for p in self.params])],
                           dtype=torch.float64, device=self.devices[0])
        dist.all_reduce(dot, group=self.group)
        w_norm = math.sqrt(self._local_sq_norm(self.params)) if float(dot) == 0 else 0.0
        return fd_step_size(self.fd_eps, float(dot), v_sq, w_norm)

    def _local_pieces(self, v: TensorList) -> TensorList:
        from torch.distributed.tensor import distribute_tensor

        out = []
        for p, vi in zip(self.params, v, strict=True):
            if hasattr(p, "placements"):
                out.append(distribute_tensor(vi.to(_local(p).device), p.device_mesh, p.placements).to_local())
            else:
                out.append(vi)
        return out

    def _sharded_gradient_sum(self) -> TensorList:
        """Local shards of the summed-loss gradient over all ranks' batches."""
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            # FSDP's all-gathers and reduce-scatters pair up across ranks, so every rank runs the same number
            # of passes: a rank with fewer batches runs zero-weight passes on a spare batch.
            for i in range(self.passes_per_rank):
                if i < len(self.batches):
                    loss = L.batch_loss_sum(self.model, self.batches[i], self.row_logits)
                    self._check_loss(loss)
                else:
                    loss = 0.0 * L.batch_loss_sum(self.model, self._spare_batch, self.row_logits)
                loss.backward()
        grads = []
        for p in self.params:
            g = torch.zeros_like(_local(p)) if p.grad is None else _local(p.grad).detach().clone()
            grads.append(g * self.world_size)  # undo FSDP's mean over ranks
            p.grad = None
        return grads

    def loss(self) -> float:
        """``L(w)``; every rank runs the same number of forward passes (see ``_sharded_gradient_sum``)."""
        total = 0.0
        with torch.no_grad():
            for i in range(self.passes_per_rank):
                if i < len(self.batches):
                    total += float(L.batch_loss_sum(self.model, self.batches[i], self.row_logits))
                else:
                    L.batch_loss_sum(self.model, self._spare_batch, self.row_logits)
        return self._sum_scalar(total) * self.scale

    def gradient(self) -> TensorList:
        """``dL/dw`` as full tensors (all-gathered from the shards)."""
        from torch.distributed.tensor import DTensor

        out = []
        for p, g in zip(self.params, self._sharded_gradient_sum(), strict=True):
            if hasattr(p, "placements"):
                g = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
            out.append(g * self.scale)
        return out

    # Finite-difference hooks of the core (HessianOperator._fd_hvp): each rank moves its own shards.
    def _fd_weights(self) -> TensorList:
        return [_local(p).detach() for p in self.params]

    def _fd_direction(self, v: TensorList) -> TensorList:
        return self._local_pieces(v)

    def _fd_gradient(self) -> TensorList:
        return self._sharded_gradient_sum()

    def _fd_sq_norm(self, x) -> float:
        return self._local_sq_norm(x)

    def _fd_assemble(self, d: TensorList) -> TensorList:
        from torch.distributed.tensor import DTensor

        out = []
        for p, local in zip(self.params, d, strict=True):
            if hasattr(p, "placements"):
                local = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                                           stride=p.stride()).full_tensor()
            out.append(local)
        return out
