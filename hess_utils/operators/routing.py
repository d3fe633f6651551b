"""Top-k routing of mixture-of-experts layers, and finite differences that cross it.

The convention: routing held fixed
----------------------------------
A mixture-of-experts layer sends each token to the ``k`` experts with the largest router scores and mixes
their outputs with weights computed from those scores. The choice of the ``k`` experts is piecewise
constant in the weights: it changes only where two router scores tie. So the loss is piecewise smooth, and
*the Hessian of an MoE model here is that of the loss with the top-k expert choice held fixed at* ``w``:
the second derivative of the smooth piece that contains ``w``. The router's own weights still enter it,
through the mixing weights (softmax or sigmoid of the scores of the chosen experts) and their derivatives.

The exact methods (``"rev-rev"``, ``"fwd-rev"``) compute exactly that: ``topk`` indices carry no derivative,
so autograd differentiates the piece the forward at ``w`` selected, whatever the distance to the nearest
tie. The dense reference of the tests (``tests/tiny.py``, ``jacrev(grad(L))``) is the same object.

Finite differences evaluate gradients at ``w + h v`` and ``w - h v``. Where a router score pair lies closer
to a tie than the step moves it, one of the two points routes a token to another set of experts, and the
difference quotient mixes two pieces: it is not the Hessian of either (an O(1) error, like a ReLU unit that
changes sides). :class:`RoutingMonitor` detects that: during the gradients of a finite-difference product it
records, with forward hooks, the expert choice of every router call, and compares it with the choice at ``w``.
The operator (:mod:`hess_utils.operators.hessian`, ``method="fd"``) warns once when a product moved any
decision and records the count on ``last_fd.routing_flips`` of every product.

What counts as a decision
-------------------------
One token at one router call: its *set* of chosen experts (the order of the ``k`` indices does not matter).
A flipped decision is one whose set at ``w + h v`` or ``w - h v`` differs from that at ``w``; both points
are counted, so a token that changes sides once counts once per point that left ``w``'s piece. Every token is
counted, padding and the last position included, whose decisions cannot change the loss: the count is an
upper bound on the decisions that matter (a warning on a padded batch may be a false alarm; none of the
warnings it does not give is missed).

Which modules are watched
-------------------------
* Router modules: children named ``gate`` or ``router``, or whose class name contains ``Router``, that return
  an integer tensor (the top-k indices): Mixtral, Qwen2/3-MoE, GPT-oss, DeepSeek-V3 (group-limited top-k,
  ``e_score_correction_bias``), OLMoE, GraniteMoE, PhiMoE, ... A forward hook reads that tensor.
* Experts modules of transformers' ``@use_experts_implementation`` (:func:`~hess_utils.operators.kernels.
  experts_modules`), which receive the indices as an input: a forward pre-hook reads them where no router of
  the same block reported its choice (a family whose gate is a plain ``nn.Linear`` and whose block takes the
  top-k itself).

The hooks exist only inside :meth:`RoutingMonitor.record`; a dense model has nothing to watch and costs
nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from hess_utils.operators.kernels import experts_modules

#: Attribute names of router modules in transformers' MoE blocks.
ROUTER_NAMES = ("gate", "router")

Decisions = list[tuple[str, torch.Tensor]]


def _integer_tensors(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.is_complex()) and x.dtype != torch.bool and x.ndim >= 1:
            yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _integer_tensors(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _integer_tensors(item)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def router_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules that may return top-k expert indices (module docstring); plain ``nn.Linear`` gates excluded."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or not name:
            continue
        if name.rpartition(".")[2] in ROUTER_NAMES or "Router" in type(m).__name__:
            found.append((name, m))
    return found


def expert_sets(indices: torch.Tensor) -> torch.Tensor:
    """``(tokens, k)`` sorted expert indices: one row per token, the set of experts it was sent to."""
    idx = indices.detach()
    idx = idx.reshape(-1, 1) if idx.ndim == 1 else idx.reshape(-1, idx.shape[-1])
    return idx.sort(dim=-1).values


def flipped(center: Decisions, moved: Decisions) -> int:
    """The number of decisions of ``moved`` whose expert set differs from ``center``'s.

    ``moved`` holds one or more forwards, each making the same router calls as ``center`` in the same order
    (the gradients of a finite-difference pair over the same batches): call ``i`` is compared with call
    ``i mod len(center)``. A call whose layer or token count differs counts all its tokens.
    """
    if not center or not moved:
        return 0
    total = 0
    for i, (key, sets) in enumerate(moved):
        ref_key, ref = center[i % len(center)]
        if key != ref_key or ref.shape != sets.shape:
            total += sets.shape[0]
        else:
            total += int((ref != sets.to(ref.device)).any(dim=-1).sum())
    return total


class RoutingMonitor:
    """Records the top-k expert choices of a model's forwards (module docstring).

    ``bool(monitor)`` is False for a model without routers. ``center`` holds the decisions at ``w`` once set
    by the caller; ``warned`` whether the operator has warned already.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.routers = router_modules(model)
        self.experts = experts_modules(model)
        self.center: Decisions | None = None
        self.warned = False
        self._out: Decisions | None = None
        self._reported: set[str] = set()  # blocks whose router reported the current call's choice

    def __bool__(self) -> bool:
        return bool(self.routers or self.experts)

    def _router_hook(self, name: str):
        block = _parent(name)

        def hook(module, args, output):
            if self._out is None:
                return
            ints = next(iter(_integer_tensors(output)), None)
            if ints is not None:
                self._out.append((block, expert_sets(ints)))
                self._reported.add(block)

        return hook

    def _experts_hook(self, name: str):
        block = _parent(name)

        def hook(module, args, kwargs):
            if self._out is None:
                return
            if block in self._reported:  # its router said it already
                self._reported.discard(block)
                return
            ints = next(iter(_integer_tensors((args, kwargs))), None)
            if ints is not None:
                self._out.append((block, expert_sets(ints)))

        return hook

    @contextlib.contextmanager
    def record(self) -> Iterator[Decisions]:
        """Inside the block, every router call appends ``(block name, expert sets)`` to the yielded list."""
        out: Decisions = []
        if not self:
            yield out
            return
        handles = [m.register_forward_hook(self._router_hook(n)) for n, m in self.routers]
        handles += [m.register_forward_pre_hook(self._experts_hook(n), with_kwargs=True) for n, m in self.experts]
        previous, self._out = self._out, out
        self._reported = set()
        try:
            yield out
        finally:
            self._out = previous
            for h in handles:
                h.remove()

    def flips(self, moved: Decisions) -> int:
        """Decisions of ``moved`` that differ from :attr:`center` (0 without a center)."""
        return flipped(self.center or [], moved)


def routing_warning(family: str, flips: int, gradients: int) -> str:
    """The message of the operator's once-per-operator warning."""
    return (
        f"finite differences on {family} moved {flips} top-k routing decision(s) (a token sent to another set "
        f"of experts at w + h v or w - h v than at w, over the {gradients} gradients of this product): the "
        "difference quotient mixes two pieces of the piecewise-smooth loss and is not the Hessian with routing "
        "held fixed; use method='rev-rev' or 'fwd-rev' (exact, routing held fixed) or a smaller fd_eps. "
        "Warned once per operator; last_fd.routing_flips counts every product's"
    )
