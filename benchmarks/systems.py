"""One adapter per benchmarked system: the same model, batch, loss and probe vector for all.

Every adapter has ``setup(model, batch, params) -> state`` (whatever the system builds before its first
product, e.g. PyHessian's kept graph), ``hvp(state, v) -> list of tensors`` (vectors are lists of tensors
shaped like ``params``) and, where the system has one, ``slq(state, iters, probes, seed) -> list of
per-probe Ritz value arrays``. The peers are called through their public APIs only.

The loss is the mean next-token cross-entropy over the ``4 x 127`` predicted tokens, written once here
(:func:`mean_loss`) and handed to each peer in the form its API takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------- the loss
def shifted(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, :-1, :].reshape(-1, logits.shape[-1])


def targets_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"][:, 1:].reshape(-1)


def mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    return F.cross_entropy(shifted(logits), targets_of(batch))


class ShiftedLogits(torch.nn.Module):
    """``input_ids -> (b * (s-1), vocab)`` logits, for peers that take ``criterion(model(X), y)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return shifted(self.model(input_ids=input_ids, use_cache=False).logits)


def flat(v: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in v])


def split_like(x: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(x[start : start + p.numel()].view_as(p))
        start += p.numel()
    return out


@dataclass
class System:
    name: str  # row label
    setup: Callable[..., Any]
    hvp: Callable[[Any, list[torch.Tensor]], list[torch.Tensor]] | None
    slq: Callable[[Any, int, int, int], list[np.ndarray]] | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------- gradient
def _grad_setup(model, batch, params):
    return (model, batch, params)


def plain_gradient(state, v=None):
    model, batch, params = state
    return list(torch.autograd.grad(mean_loss(model, batch), params))


# ---------------------------------------------------------------------------------------------- PyHessian
def _install_torch_eig_shim() -> None:
    """PyHessian 0.1's ``density`` calls ``torch.eig``, removed in torch 2 (a stub that raises); give it the
    symmetric eigh, in this worker process only."""

    def eig(matrix, eigenvectors=False):
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    torch.eig = eig


def _pyhessian_setup(model, batch, params):
    from pyhessian import hessian

    _install_torch_eig_shim()
    wrapper = ShiftedLogits(model)
    data = (batch["input_ids"], targets_of(batch))
    return hessian(wrapper, torch.nn.CrossEntropyLoss(), data=data, cuda=batch["input_ids"].is_cuda)


def _pyhessian_hvp(h, v):
    from pyhessian.utils import hessian_vector_product

    return [x.detach() for x in hessian_vector_product(h.gradsH, h.params, v)]


def _pyhessian_slq(h, iters, probes, seed):
    torch.manual_seed(seed)
    values, _ = h.density(iter=iters, n_v=probes)
    return [np.asarray(v, dtype=np.float64) for v in values]


# ---------------------------------------------------------------------------------------------- eigenthings
def _eigenthings_setup(method):
    def setup(model, batch, params):
        from hessian_eigenthings import HessianOperator

        return HessianOperator(model, [batch], mean_loss, method=method), params

    return setup


def _eigenthings_hvp(state, v):
    op, params = state
    return split_like(op.matvec(flat(v)), params)


def _eigenthings_slq(state, iters, probes, seed):
    from hessian_eigenthings import spectral_density

    op, _ = state
    res = spectral_density(op, num_runs=probes, lanczos_steps=iters, seed=seed)
    return [row[~torch.isnan(row)].double().cpu().numpy() for row in res.raw_eigenvalues]


# ---------------------------------------------------------------------------------------------- curvlinops
def _curvlinops_setup(model, batch, params):
    from curvlinops import HessianLinearOperator

    wrapper = ShiftedLogits(model)
    data = [(batch["input_ids"], targets_of(batch))]
    return HessianLinearOperator(wrapper, torch.nn.CrossEntropyLoss(), params, data, check_deterministic=False)


def _curvlinops_hvp(op, v):
    return [x.detach() for x in op @ list(v)]


def _curvlinops_slq(op, iters, probes, seed):
    """Papyan's Lanczos as curvlinops ships it (``fast_lanczos``: no re-orthogonalisation), per probe."""
    from curvlinops.papyan2020traces.spectrum import fast_lanczos

    out = []
    for p in range(probes):
        torch.manual_seed(seed + p)
        evals, _ = fast_lanczos(op, iters)
        out.append(evals.double().cpu().numpy())
    return out


# ---------------------------------------------------------------------------------------------- hess_utils
def _ours_setup(method, keep_graph=False, fd_mode=None):
    def setup(model, batch, params):
        from hess_utils.operators.hessian import HessianOperator

        return HessianOperator(model, [batch], method=method, keep_graph=keep_graph, fd_mode=fd_mode)

    return setup


def _ours_hvp(op, v):
    return op.matvec(v)


def _ours_hvp_pair(op, v):
    """Two products in one ``matmat`` (what SLQ with two probes does each step), per vector."""
    return op.matmat([v, v])[0]


def _ours_slq(probes_at_once=1, reorth=None):
    """Our SLQ; ``reorth=None`` is :func:`~hess_utils.algorithms.slq.slq`'s default (what a user gets)."""

    def run(op, iters, probes, seed):
        from hess_utils.algorithms.slq import slq

        kwargs = {} if reorth is None else {"reorth": reorth}
        res = slq(op, iters, probes, seed=seed, progress=False, probes_at_once=probes_at_once, **kwargs)
        return [row[~np.isnan(row)] for row in res.ritz_values]

    return run


def _glibc_trimming(setup):
    """``setup`` in a worker where the drivers leave glibc's heap trimming as it is (no held freed memory)."""

    def run(model, batch, params):
        import hess_utils._memory as memory

        memory._glibc = lambda: None  # what holding_freed_memory does in a process it must leave alone
        return setup(model, batch, params)

    return run


# ---------------------------------------------------------------------------------------------- registry
GRADIENT = "gradient"
SYSTEMS: dict[str, System] = {
    GRADIENT: System("plain gradient (unit)", _grad_setup, plain_gradient),
    "pyhessian": System("PyHessian 0.1 (graph kept between HVPs)", _pyhessian_setup, _pyhessian_hvp,
                        _pyhessian_slq, "density() with torch.eig -> torch.linalg.eigh shim"),
    "eigenthings": System("hessian-eigenthings 1.0.0a5", _eigenthings_setup("autograd"), _eigenthings_hvp,
                          _eigenthings_slq, "spectral_density(), full reorth as a Python loop"),
    "curvlinops": System("curvlinops 3.0.1", _curvlinops_setup, _curvlinops_hvp, _curvlinops_slq,
                         "fast_lanczos per probe (no reorth: ghost copies)"),
    "eigenthings-fd": System("eigenthings finite differences", _eigenthings_setup("finite_difference"),
                             _eigenthings_hvp, _eigenthings_slq, "fixed step 5e-3"),
    "ours-rebuilt": System("hess_utils rev-rev, graph rebuilt", _ours_setup("rev-rev"), _ours_hvp),
    "ours-kept": System("hess_utils rev-rev, keep_graph='auto'", _ours_setup("rev-rev", "auto"), _ours_hvp,
                        _ours_slq(1), "SLQ: the defaults (reorth='partial', probes_at_once=1: probe after probe)"),
    "ours-kept-trimming": System("hess_utils defaults, glibc trimming freed memory", _glibc_trimming(
                                 _ours_setup("rev-rev", "auto")), _ours_hvp, _ours_slq(1),
                                 "SLQ: the defaults without hess_utils._memory's held freed memory"),
    "ours-kept-full": System("hess_utils rev-rev kept, reorth='full'", _ours_setup("rev-rev", "auto"), _ours_hvp,
                             _ours_slq(1, reorth="full"), "SLQ: every step re-orthogonalised (the reference)"),
    "ours-kept-interleaved": System("hess_utils rev-rev kept, two probes interleaved", _ours_setup("rev-rev", "auto"),
                                    _ours_hvp, _ours_slq("auto"),
                                    "SLQ: probes_at_once='auto' (on a CPU one probe's Lanczos step in a side thread "
                                    "beside the other's product)"),
    "ours-kept-pair": System("hess_utils rev-rev kept, 2 vectors per matmat", _ours_setup("rev-rev", "auto"),
                             _ours_hvp_pair, _ours_slq(probes_at_once=2),
                             "time per vector; SLQ: both probes advanced together (one batched double backward "
                             "where the operator batches, interleaved on a CPU)"),
    "ours-fd": System("hess_utils central FD, adaptive step (default, 4 gradients)", _ours_setup("fd"), _ours_hvp),
    "ours-fd-fixed": System("hess_utils central FD, fixed step (2 gradients)", _ours_setup("fd", fd_mode="fixed"),
                            _ours_hvp),
}
PEERS = ("pyhessian", "eigenthings", "curvlinops", "eigenthings-fd")


def hvp_time_divisor(key: str) -> int:
    """Vectors multiplied per ``hvp`` call."""
    return 2 if key == "ours-kept-pair" else 1


def top_ritz(values: list[np.ndarray]) -> float:
    return max(float(np.max(v)) for v in values if v.size) if values else math.nan
