"""The Hessian of the causal-LM loss of a model as an operator.

``H = d^2 L / dw^2`` for the loss ``L`` of :mod:`hess_utils.loss` over a fixed list of batches, with
respect to a selection of the model's parameters. Vectors are lists of tensors shaped like the selected
parameters, each on its parameter's device and in its dtype, so a model split over devices needs no
gathering.

Methods
-------
``"rev-rev"``
    Exact (Pearlmutter): differentiate ``g(w) . v`` where ``g`` is the gradient built with
    ``create_graph=True``. One forward, one backward and one double backward per batch.
``"fwd-rev"``
    Exact: forward-mode over reverse-mode, ``torch.func.jvp(torch.func.grad(f), (w,), (v,))`` with
    ``functional_call``. Never ``jvp`` of ``jacrev`` (measured 19 % off on ``F.layer_norm``).
``"fd"``
    Central finite differences of gradients, ``D(h) = (g(w + h v) - g(w - h v)) / (2 h)``, the step chosen
    per product (``fd_mode="adaptive"``, the default), 4 gradients a product, 6 where the first step was far
    too large:

    1. ``h1 = eps * <|v|, |w|> / ||v||^2`` (:func:`fd_step_size`: the weights ``v`` touches move by about
       ``eps`` of their own size; ``eps = DEFAULT_FD_EPS[dtype]``, large enough that rounding stays small).
       With the gradient at ``w`` (computed once, kept while the weights do not change) the same pair
       gives the second difference ``S = (g(w + h v) + g(w - h v) - 2 g(w)) / h^2``, the derivative of
       ``H v`` along ``v``, and ``tau = h ||S|| / ||D||``, the relative change of ``H v`` over the step.
    2. The truncation error of ``D(h)`` is modelled as ``FD_TRUNCATION_FACTOR * tau^2`` (``tau^2 / 6``
       for a gradient that varies like ``exp(t / s)`` along ``v``; 1, conservatively, since the embedded
       models measure between 0.08 and 2.3 ``tau^2``), which scales with ``h^2``: the
       second step ``h2`` brings it to an eighth of ``FD_TOLERANCE[dtype]``, at most ``h1 / 2``
       (:func:`second_fd_step`). Near-quadratic directions (most random vectors) get ``h1 / 2``; the
       vectors Lanczos multiplies, concentrated on embedding rows, get a step 10-256 times smaller.
    3. When the two differences agree to a quarter of the tolerance, ``D(h1)`` is returned (truncation
       is negligible there and its rounding the smallest). Else Richardson's combination
       ``D(h2) + (D(h2) - D(h1)) / ((h1 / h2)^2 - 1)`` removes the ``h^2`` term
       when both pairs are in the asymptotic range (:func:`asymptotic`: ``tau`` shrank with the step and
       the two differences agree to ``FD_MAX_EXTRAPOLATED_CHANGE``).
    4. Otherwise, when ``D(h2)`` itself misses the tolerance by the model (``tau2^2`` above it): ``tau1``
       was saturated (a first step far outside the quadratic range says only "much smaller", not how
       much), so ``h2`` was placed too large. A third pair at ``2 h2`` or ``h2 / 2`` (:func:`third_fd_step`),
       next to a pair that is now asymptotic, is combined with ``D(h2)`` as in step 3 (6 gradients). In any
       other case the difference at the last step stands (a ReLU kink crossed by the larger step only, or
       rounding noise).

    The loss of a ReLU network is only piecewise smooth: where a pre-activation lies closer to zero than the
    step, the difference quotient is that of two pieces, not the Hessian at ``w`` (measured on the embedded
    tiny-opt: O(1) wrong once one unit changes sides; benchmarks/RESULTS.md).

    ``fd_mode="fixed"`` is the cheap mode: one pair at ``h1``, 2 gradients, as accurate as the adaptive
    mode on random vectors but not on Krylov vectors (``python -m benchmarks.fd_accuracy`` measures both;
    benchmarks/RESULTS.md). An explicit ``fd_eps`` fixes the step. ``last_fd`` on the operator says what
    the last product did. Needs only gradients, so it runs where double backward does not (FSDP, flash
    attention). For a mixture-of-experts model the Hessian is that of the loss with the top-k routing held
    fixed (:mod:`hess_utils.operators.routing`); a product whose points ``w +- h v`` route a token to other
    experts than ``w`` warns (once per operator) and counts them on ``last_fd.routing_flips``.
``"auto"``
    ``"rev-rev"``, run inside a scoped context that makes the attention kernel differentiable twice:
    eager attention as is; SDPA under ``sdpa_kernel(SDPBackend.MATH)`` for the duration of each product
    only; flash attention has no exact second derivative, so ``"auto"`` falls back to ``"fd"`` and warns.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from hess_utils import loss as L
from hess_utils import vectors as V
from hess_utils.operators.base import SymmetricOperator
from hess_utils.operators.kernels import attention_implementation, hessian_context, model_family
from hess_utils.operators.routing import RoutingMonitor, routing_warning
from hess_utils.operators.selection import ParamSelector, select_parameters
from hess_utils.vectors import TensorList

METHODS = ("auto", "rev-rev", "fwd-rev", "fd")
EXACT_METHODS = ("rev-rev", "fwd-rev")
FD_MODES = ("adaptive", "fixed")
#: Relative first step ``eps`` of finite differences (the only step of ``fd_mode="fixed"``) per dtype.
DEFAULT_FD_EPS = {torch.float64: 2e-6, torch.float32: 2e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
#: Relative truncation error the adaptive step aims below, per dtype (rounding comes on top).
FD_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}
#: Truncation error of a central difference ``~ FD_TRUNCATION_FACTOR * tau^2`` (module docstring): 1/6 for
#: an exponential; on the embedded models the measured error / tau^2 lies between 0.08 and 2.3, so 1.
FD_TRUNCATION_FACTOR = 1.0
#: The second step is at least this fraction of the first (below it rounding would dominate).
FD_MIN_STEP_RATIO = 1 / 256
#: Extrapolate only when the two differences agree to this fraction and ``tau`` shrank with the step
#: (within a factor of 2): the first step was in the asymptotic range.
FD_MAX_EXTRAPOLATED_CHANGE = 0.25
#: A pair whose ``tau`` is at most this is taken to be in the asymptotic range (truncation ``~ tau^2``):
#: a third pair is placed next to it as its Richardson partner (:func:`third_fd_step`).
FD_PARTNER_TAU = 0.3


def asymptotic(h1: float, tau1: float, h2: float, tau2: float, change: float) -> bool:
    """Whether two central pairs behave as ``D(h) = H v + a h^2``, so that Richardson's step is sound.

    ``tau`` is proportional to the step there, and the differences agree to a fraction. A kink crossed by
    the first step only (ReLU) or rounding noise breaks the proportionality; the second difference stands.
    """
    if not (math.isfinite(tau1) and math.isfinite(tau2)) or tau2 <= 0 or change > FD_MAX_EXTRAPOLATED_CHANGE:
        return False
    return 0.5 <= (tau1 * h2 / h1) / tau2 <= 2.0


@dataclass(frozen=True)
class FDProduct:
    """What one finite-difference product did.

    ``steps``: the steps ``h`` evaluated, in order; ``taus``: ``h ||S|| / ||D||`` at each (NaN in
    ``"fixed"`` mode); ``change``: ``||D_big - D_small|| / ||D_small||`` of the last two pairs compared, the
    a-posteriori error estimate of the difference at the larger step (NaN with one step); ``chosen``: what
    was returned, ``"first"``, ``"second"`` or ``"third"`` (``D`` at ``steps[0]``, ``[1]``, ``[2]``) or
    ``"extrapolated"`` (Richardson's combination of the last two); ``gradients``: gradient evaluations spent
    on it, 2 per step (the gradient at ``w`` is shared by all products); ``routing_flips``: top-k routing
    decisions of a mixture-of-experts model that the points ``w +- h v`` made differently from ``w``
    (:mod:`hess_utils.operators.routing`; 0 for a dense model).
    """

    steps: tuple[float, ...]
    taus: tuple[float, ...]
    change: float
    chosen: str
    gradients: int
    routing_flips: int = 0


def fd_step_size(eps: float, abs_dot: float, v_sq_norm: float, w_norm: float, v_norm: float | None = None) -> float:
    """Central-difference step ``h = eps * <|v|, |w|> / ||v||^2`` (0 for ``v = 0``).

    It minimises ``|| h |v| - eps |w| ||`` over the entries, so ``h v`` changes each weight that ``v`` touches
    by about ``eps`` of its size, however concentrated ``v`` is. Where ``v`` touches only zero weights
    (``<|v|, |w|> = 0``) the norm rule ``eps ||w|| / ||v||`` is used (``eps / ||v||`` if ``w = 0``).
    """
    if v_sq_norm <= 0:
        return 0.0
    if abs_dot > 0:
        return eps * abs_dot / v_sq_norm
    v_norm = math.sqrt(v_sq_norm) if v_norm is None else v_norm
    return eps * (w_norm if w_norm > 0 else 1.0) / v_norm


def second_fd_step(h: float, tau: float, tolerance: float) -> float:
    """The second step after a pair at ``h`` whose relative change of ``H v`` over the step is ``tau``.

    The truncation error ``FD_TRUNCATION_FACTOR * tau^2`` scales with ``h^2``: the step that brings it to
    ``tolerance / 8``, at most ``h / 2`` (so that extrapolation gains an order) and at least
    ``FD_MIN_STEP_RATIO * h`` (below it rounding would dominate).
    """
    if not math.isfinite(tau) or tau <= 0:
        return h * (FD_MIN_STEP_RATIO if not math.isfinite(tau) else 0.5)
    ratio = math.sqrt(tolerance / (8 * FD_TRUNCATION_FACTOR)) / tau
    return h * min(0.5, max(ratio, FD_MIN_STEP_RATIO))


def third_fd_step(h1: float, h2: float, tau2: float, tolerance: float) -> float:
    """The third step, after a second pair at ``h2`` whose ``tau2`` still misses the tolerance.

    Where ``tau2 <= FD_PARTNER_TAU`` the second pair is in the asymptotic range and the third is its
    Richardson partner: ``2 h2`` (less rounding) when ``tau2 <= FD_PARTNER_TAU / 2``, so that ``tau`` stays in
    range there, and unless that is the first step again; else ``h2 / 2``. Above it, ``h2`` is treated as
    ``h1`` was (:func:`second_fd_step`).
    """
    if not math.isfinite(tau2) or tau2 > FD_PARTNER_TAU:
        return second_fd_step(h2, tau2, tolerance)
    if tau2 <= FD_PARTNER_TAU / 2 and 2 * h2 < h1:
        return 2 * h2
    return h2 / 2


def extrapolation_weight(ratio: float) -> float:
    """``c`` in Richardson's ``D(h2) + c (D(h2) - D(h1))`` for ``ratio = h1 / h2``: ``1 / (ratio^2 - 1)``.

    With ``D(h) = H v + a h^2 + O(h^4)`` it removes the ``h^2`` term.
    """
    return 1.0 / (ratio**2 - 1.0)


def abs_dot(v: Sequence[torch.Tensor], w: Sequence[torch.Tensor]) -> float:
    """``<|v|, |w|>``: per-block sums in the blocks' dtype (float32 at least), their total in float64.

    Only a step size is made of it, so three significant digits would do; a float64 reduction of every
    entry costs about ten times as much on a CPU.
    """
    parts = []
    for a, b in zip(v, w, strict=True):
        dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
        # |a| |b| = |a b|: one temporary and three passes instead of three temporaries and four.
        prod = torch.mul(a.to(dtype), b.detach().to(a.device, dtype)).abs_()
        parts.append(prod.sum().to(v[0].device, torch.float64))
    return float(torch.stack(parts).sum())


# ---------------------------------------------------------------------------------------------- checks
def check_eval_mode(model: torch.nn.Module) -> None:
    """Refuse a model whose dropout is active: its matvec would not be a deterministic linear map."""
    if not model.training:
        return
    active = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]
    if active:
        raise ValueError(
            f"the model is in training mode with active dropout ({active[0]}, ...): Hessian-vector "
            "products would be random; call model.eval() first"
        )


def resolve_method(model: torch.nn.Module, method: str) -> str:
    """Map ``"auto"`` to a concrete method for this model's attention kernel (see module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    impl = attention_implementation(model)
    if method == "auto":
        if "flash" in impl:
            warnings.warn(
                f"attention kernel {impl!r} has no second derivative: method='auto' uses finite "
                "differences ('fd'); load with attn_implementation='eager' for an exact Hessian",
                stacklevel=3,
            )
            return "fd"
        return "rev-rev"
    return method


def _check_dtype(dtype: torch.dtype, method: str) -> None:
    if dtype in (torch.float16, torch.bfloat16):
        warnings.warn(
            f"{dtype} Hessian-vector products are dominated by rounding (about 8e-3 relative error "
            "measured in bf16); use float32 or float64 for numbers you will publish",
            stacklevel=3,
        )


@contextlib.contextmanager
def only_these_require_grad(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Temporarily make exactly ``params`` require grad (smaller graphs); restore the flags afterwards."""
    chosen = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------- operator
class HessianOperator(SymmetricOperator):
    """``H v`` for the loss of ``model`` on ``batches`` with respect to the selected parameters.

    Parameters
    ----------
    model
        A causal LM returning ``.logits`` of shape ``(batch, seq, vocab)``; must be in eval mode.
    batches
        A re-iterable list of dicts with ``input_ids`` ``(b, s)`` and optionally ``attention_mask``.
    params
        Parameter selection (see :func:`select_parameters`); default all trainable parameters.
    method
        One of ``"auto"``, ``"rev-rev"``, ``"fwd-rev"``, ``"fd"`` (module docstring).
    reduction
        ``"mean"``: the loss is the mean over all predicted tokens of all batches; ``"sum"``: their sum.
    fd_eps
        Relative finite-difference step (``"fd"`` only); default per dtype, see ``DEFAULT_FD_EPS``. Given, it
        fixes the step (``fd_mode="fixed"`` unless ``fd_mode`` says otherwise).
    fd_mode
        ``"adaptive"`` (default without ``fd_eps``): two central pairs, the second step chosen from the
        first, extrapolated (module docstring), 4 gradients a product (a third pair, 6, when the first step
        was far off). ``"fixed"``: one central pair at ``eps``, 2 gradients, accurate on random vectors only.
    keep_graph
        ``"rev-rev"`` only: keep each batch's first-order graph between products, so every later product
        costs one backward pass instead of forward + backward + double backward (benchmarks/RESULTS.md).
        Memory grows by one graph per batch. ``"auto"`` (the default) keeps a batch's graph only when it
        fits: its size is measured while it is built (saved tensors, parameters excluded) and kept when at
        least twice that stays free on its device; otherwise, or when a kept product runs out of memory,
        every later product rebuilds its graph, with a warning saying so (``keep_graph_mode`` then reads
        ``"never"`` and ``keep_graph_fallback`` says why). ``False`` rebuilds every time (for batches or
        weights that change between products).

    Notes
    -----
    :meth:`matmat` multiplies several vectors at once; with ``"rev-rev"`` it differentiates each batch's
    first-order graph once for all of them (``is_grads_batched``), which is faster per vector than
    :meth:`matvec` and gives the same numbers to rounding.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batches: Iterable[L.Batch],
        params: ParamSelector = None,
        method: str = "auto",
        reduction: str = "mean",
        fd_eps: float | None = None,
        keep_graph: bool | str = "auto",
        progress: bool = False,
        fd_mode: str | None = None,
    ) -> None:
        if keep_graph not in (True, False, "auto"):
            raise ValueError(f"keep_graph must be True, False or 'auto', got {keep_graph!r}")
        if reduction not in L.REDUCTIONS:
            raise ValueError(f"reduction must be one of {L.REDUCTIONS}, got {reduction!r}")
        check_eval_mode(model)
        self.model = model
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("no batches given: pass a non-empty list of {'input_ids': ...} dicts")
        for i, b in enumerate(self.batches):
            if "input_ids" not in b or b["input_ids"].ndim != 2:
                raise ValueError(f"batch {i} needs 'input_ids' of shape (batch, seq_len)")
        self.method = resolve_method(model, method)
        self.requested_method = method
        self.reduction = reduction
        self.keep_graph = bool(keep_graph) and self.method == "rev-rev"
        self.keep_graph_mode = ("auto" if keep_graph == "auto" else "always") if self.keep_graph else "never"
        self.graph_bytes: int | None = None  # measured size of one batch's first-order graph ("auto")
        self.keep_graph_fallback: str | None = None  # why "auto" stopped keeping graphs, once it did
        self._batched_ok = True  # False once is_grads_batched failed for this model (loop instead)
        self.progress = progress
        selected = select_parameters(model, params)
        self.param_names = [n for n, _ in selected]
        self.params = [p for _, p in selected]
        self.shapes = [p.shape for p in self.params]
        self.dtypes = [p.dtype for p in self.params]
        self.devices = [p.device for p in self.params]
        if any(p.device.type == "meta" for p in self.params):
            raise ValueError(
                "some selected parameters are on the meta device (offloaded): they drop out of the "
                "autograd graph; load the model fully materialised"
            )
        _check_dtype(self.dtypes[0], self.method)
        if self.method == "fd":
            self.fd_eps = float(fd_eps) if fd_eps is not None else DEFAULT_FD_EPS.get(self.dtypes[0], 1e-3)
            if not self.fd_eps > 0:
                raise ValueError(f"fd_eps must be positive, got {fd_eps}")
            self.fd_mode = fd_mode if fd_mode is not None else ("fixed" if fd_eps is not None else "adaptive")
            if self.fd_mode not in FD_MODES:
                raise ValueError(f"fd_mode must be one of {FD_MODES}, got {fd_mode!r}")
            self.fd_tolerance = FD_TOLERANCE.get(self.dtypes[0], 1e-3)
        else:
            self.fd_eps = None
            self.fd_mode = None
        # Whether the output head runs on predicted positions only; turned off (with a warning) if it fails.
        self.row_logits = L.RowLogits.for_model(model)
        self.last_fd: FDProduct | None = None  # what the last finite-difference product did
        self._fd_routing = RoutingMonitor(model)  # top-k choices the fd steps cross (MoE models; else empty)
        self.num_gradients = 0  # gradient evaluations spent on finite-difference products
        self._fd_center: TensorList | None = None  # g(w) for the adaptive step, while the weights stay
        self.num_tokens = self._global_token_count()
        if self.num_tokens == 0:
            raise ValueError("the batches contain no predicted token (all padding, or sequences of length 1)")
        self._graphs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._graph_versions: tuple[int, ...] | None = None  # parameter versions the kept graphs were built at
        self._fd_buffers: TensorList | None = None  # the weight copy of "fd", kept between products
        self.num_matvecs = 0

    # ------------------------------------------------------------------ hooks for engines
    def _global_token_count(self) -> int:
        """Number of predicted tokens over all batches (engines sum it over ranks)."""
        return L.total_tokens(self.batches)

    def _reduce(self, local: TensorList) -> TensorList:
        """Combine partial products (engines all-reduce over ranks); identity on one process."""
        return local

    def _sum_scalar(self, x: float) -> float:
        """Sum a per-process number over ranks (engines); identity on one process."""
        return x

    @property
    def scale(self) -> float:
        """The factor between the summed loss and the loss (``1 / N`` for ``"mean"``)."""
        return 1.0 / self.num_tokens if self.reduction == "mean" else 1.0

    # ------------------------------------------------------------------ products
    def _matvec(self, v: TensorList) -> TensorList:
        if self.method == "fd":
            # The loss's scale joins the difference quotient's 1 / (2 h): one pass fewer.
            with hessian_context(self.model, exact=False):
                out = self._fd_hvp(v, self.scale)
        else:
            local = None
            self._drop_stale_graphs()
            with hessian_context(self.model, exact=True, method=self.method):
                for index, batch in enumerate(self._batch_iter("H v")):
                    part = self._rev_rev(index, batch, v) if self.method == "rev-rev" else self._fwd_rev(batch, v)
                    local = _accumulate(local, part)
            out = self._reduce(local if local is not None else V.zeros_like(v))
            V.scale_(self.scale, out)
        self._check_finite(out)
        self.num_matvecs += 1
        return out

    @property
    def product_rtol(self) -> float | None:
        """Finite differences: the relative truncation error the step aims below (``FD_TOLERANCE`` of the least
        precise dtype); None for the exact methods (see :class:`~hess_utils.operators.base.SymmetricOperator`)."""
        if self.method != "fd":
            return None
        return max(FD_TOLERANCE.get(d, max(FD_TOLERANCE.values())) for d in self.dtypes)

    @property
    def batched_matmat(self) -> bool:
        """True for exact products on an accelerator: one batched double backward for all vectors (on a CPU
        it loses to one product after the other, measured)."""
        return (self.method == "rev-rev" and self._batched_ok
                and not all(torch.device(d).type == "cpu" for d in self.devices))

    def matmat(self, vectors: Sequence[Sequence[torch.Tensor]]) -> list[TensorList]:
        """``[H v for v in vectors]``; with ``"rev-rev"`` one double backward per batch for all of them.

        The vectors are stacked block by block and each batch's first-order graph is differentiated once
        with ``is_grads_batched=True`` (built once for all of them when it is not kept). Where that fails
        for a model (an operation without a batching rule) it warns once and multiplies one by one.
        Other methods multiply one by one.
        """
        checked = [self.check_vector(v) for v in vectors]
        if len(checked) < 2 or self.method != "rev-rev" or not self._batched_ok:
            return [self.matvec(v) for v in checked]
        start = time.perf_counter()
        k = len(checked)
        self._drop_stale_graphs()
        stacked = [torch.stack(blocks) for blocks in zip(*checked, strict=True)]
        with hessian_context(self.model, exact=True, method=self.method):
            local = None
            for index, batch in enumerate(self._batch_iter("H V")):
                part = self._rev_rev_batched(index, batch, stacked)
                if part is None:  # no batching rule: fall back for good
                    return [self.matvec(v) for v in checked]
                local = _accumulate(local, part)
        out = self._reduce(local if local is not None else [torch.zeros_like(x) for x in stacked])
        V.scale_(self.scale, out)
        self._check_finite(out)
        self.num_matvecs += k
        self.record_product_time(time.perf_counter() - start, k)
        return [[block[i] for block in out] for i in range(k)]

    def _batch_iter(self, desc: str):
        from hess_utils.progress import progress_bar

        return progress_bar(self.batches, desc=desc, disable=not self.progress, leave=False)

    def _first_order_graph(self, batch: L.Batch, measure: bool = False) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad(), only_these_require_grad(self.model, self.params):
            if not measure:
                loss = L.batch_loss_sum(self.model, batch, self.row_logits)
                self._check_loss(loss)
                return torch.autograd.grad(
                    loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True
                )
            saved = _SavedBytes(self.params)
            with saved:
                loss = L.batch_loss_sum(self.model, batch, self.row_logits)
                self._check_loss(loss)
                grads = torch.autograd.grad(
                    loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True
                )
            self.graph_bytes = saved.total
            return grads

    def _drop_stale_graphs(self) -> None:
        """Forget kept graphs built at other weights: an in-place update (an optimizer step) bumps versions.

        Weights written through ``.data`` bump nothing; call :meth:`clear_graphs` after such a change.
        """
        versions = tuple(p._version for p in self.params)
        if self._graphs and getattr(self, "_graph_versions", None) != versions:
            self._graphs.clear()
        self._graph_versions = versions

    def _graph(self, index: int, batch: L.Batch) -> tuple[tuple[torch.Tensor, ...], bool]:
        """The first-order graph of batch ``index`` and whether it is kept (so must be retained)."""
        grads = self._graphs.get(index) if self.keep_graph else None
        if grads is not None:
            return grads, True
        auto = self.keep_graph and self.keep_graph_mode == "auto"
        grads = self._first_order_graph(batch, measure=auto and self.graph_bytes is None)
        if self.keep_graph and (not auto or self._graph_fits(index)):
            self._graphs[index] = grads
            return grads, True
        return grads, False

    def _graph_fits(self, index: int) -> bool:
        """``keep_graph="auto"``: keep this graph only if twice its size stays free; else stop keeping."""
        need = 2 * (self.graph_bytes or 0)
        free = V.free_memory(self.devices[0])
        if free is None or free >= need:
            return True
        self._stop_keeping(
            f"the first-order graph of a batch needs about {self.graph_bytes / 2**20:.0f} MiB and only "
            f"{free / 2**20:.0f} MiB are free"
        )
        return False

    def _stop_keeping(self, why: str) -> None:
        warnings.warn(
            f"keep_graph='auto': {why}; first-order graphs are no longer kept and every product rebuilds "
            "them (exact, about 3 gradients' time instead of 2)",
            stacklevel=4,
        )
        self._graphs.clear()
        self.keep_graph = False
        self.keep_graph_mode = "never"
        self.keep_graph_fallback = why

    def _rev_rev(self, index: int, batch: L.Batch, v: TensorList) -> TensorList:
        hv = self._double_backward(index, batch, v, batched=False)
        if hv is None:  # out of memory with the graph kept: keeping is off now, so this rebuilds it
            return self._rev_rev(index, batch, v)
        return hv

    def _rev_rev_batched(self, index: int, batch: L.Batch, stacked: TensorList) -> TensorList | None:
        """``H_b V`` for ``k`` vectors stacked along a new first axis; None if batching is unsupported."""
        return self._double_backward(index, batch, stacked, batched=True)

    def _double_backward(self, index: int, batch: L.Batch, v: TensorList, batched: bool) -> TensorList | None:
        """``H_b v`` (or ``H_b V`` with ``batched``: vectors stacked on a first axis) through batch ``index``'s
        first-order graph. None after an out-of-memory with the graph kept (keeping is then off, with a
        warning) or, batched, when the double backward has no vmap rule (batching is then off)."""
        grads, kept = self._graph(index, batch)
        pairs = [(g, vi) for g, vi in zip(grads, v, strict=True) if g.requires_grad]
        if not pairs:
            return [torch.zeros_like(x) for x in v]
        try:
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    [g for g, _ in pairs],
                    self.params,
                    grad_outputs=[vi for _, vi in pairs],
                    retain_graph=kept,
                    allow_unused=True,
                    materialize_grads=True,
                    is_grads_batched=batched,
                )
        except torch.OutOfMemoryError:
            if not (kept and self.keep_graph_mode == "auto"):
                raise
            del grads, pairs
            self._stop_keeping(f"a {'batched ' if batched else ''}product ran out of memory with the graphs kept")
            return None
        except RuntimeError as exc:  # batched: an operation without a vmap rule for its double backward
            if not batched:
                raise
            warnings.warn(
                f"is_grads_batched is not supported by this model ({str(exc).splitlines()[0][:200]}); "
                "multiplying the vectors one by one",
                stacklevel=5,
            )
            self._batched_ok = False
            return None
        return [h.detach() for h in hv]

    def _fwd_rev(self, batch: L.Batch, v: TensorList) -> TensorList:
        from torch.func import functional_call, grad, jvp

        names = self.param_names
        inputs = L.model_inputs(batch, L.input_device(self.model))

        def batch_loss(*weights: torch.Tensor) -> torch.Tensor:
            weights_by_name = dict(zip(names, weights, strict=True))
            out = functional_call(self.model, weights_by_name, args=(), kwargs={**inputs, "use_cache": False})
            return L.summed_cross_entropy(out.logits, batch)

        primals = tuple(p.detach() for p in self.params)
        argnums = tuple(range(len(primals)))
        with torch.no_grad():  # torch.func ignores an outer no_grad; it stops a graph for the other weights
            try:
                _, hv = jvp(grad(batch_loss, argnums=argnums), primals, tuple(v))
            except RuntimeError as err:
                if "setup_context" not in str(err):
                    raise
                raise ValueError(
                    f"method='fwd-rev' cannot differentiate {type(self.model).__name__}: its forward calls an "
                    "autograd.Function without setup_context (e.g. Bloom's GeLUFunction), which torch.func "
                    "refuses; use method='rev-rev' or 'fd'") from err
        return list(hv)

    def _gradient_sum(self) -> TensorList:
        """Sum over local batches of the gradient of the summed loss (no scaling, no reduction)."""
        total = None
        with torch.enable_grad(), only_these_require_grad(self.model, self.params):
            for batch in self.batches:
                loss = L.batch_loss_sum(self.model, batch, self.row_logits)
                self._check_loss(loss)
                grads = torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True)
                total = _accumulate(total, list(grads))
        return total if total is not None else [torch.zeros_like(p) for p in self.params]

    def fd_step(self, v: TensorList) -> float:
        """The finite-difference step ``h = eps * <|v|, |w|> / ||v||^2`` for this vector (:func:`fd_step_size`)."""
        v_norm = _fast_norm(v)
        if v_norm == 0:
            return 0.0
        weights = [p.detach() for p in self.params]
        if any(hasattr(p, "placements") for p in self.params):  # sharded (DTensor) parameters
            weights = [p.full_tensor() for p in weights]
        dot = abs_dot(v, weights)
        return fd_step_size(self.fd_eps, dot, v_norm**2, self._weight_norm() if dot == 0 else 0.0, v_norm)

    def _weight_norm(self) -> float:
        """``||w||``, recomputed only when a parameter was modified in place since the last call."""
        if any(hasattr(p, "placements") for p in self.params):  # sharded (DTensor) parameters
            return V.norm([p.detach() for p in self.params])
        versions = tuple(p._version for p in self.params)
        cached = getattr(self, "_w_norm_cache", None)
        if cached is None or cached[0] != versions:
            cached = (versions, _fast_norm([p.detach() for p in self.params]))
            self._w_norm_cache = cached
        return cached[1]

    # ------------------------------------------------------------------ finite differences
    # Engines that shard the weights (FSDP) override the four hooks below; the algorithm is written once.
    def _fd_weights(self) -> TensorList:
        """The tensors a finite difference moves in place (here the selected parameters themselves)."""
        return [p.detach() for p in self.params]

    def _fd_direction(self, v: TensorList) -> TensorList:
        """``v`` laid out like :meth:`_fd_weights` (here ``v`` itself)."""
        return v

    def _fd_gradient(self) -> TensorList:
        """The summed-loss gradient over all batches (of all processes), laid out like :meth:`_fd_weights`."""
        return self._reduce(self._gradient_sum())

    def _fd_sq_norm(self, x: Iterable[torch.Tensor]) -> float:
        """``||x||^2`` of a vector laid out like :meth:`_fd_weights` (sharded engines sum over ranks).

        ``x`` may be a generator: only one block's norm is kept at a time, so temporaries die as it goes.
        """
        parts = [torch.linalg.vector_norm(b).to(torch.float64).reshape(1).to(self.devices[0]) for b in x]
        return float(torch.linalg.vector_norm(torch.cat(parts)) ** 2) if parts else 0.0

    def _fd_assemble(self, d: TensorList) -> TensorList:
        """A product laid out like :meth:`_fd_weights` as a vector of the operator (here as it is)."""
        return d

    def _fd_hvp(self, v: TensorList, factor: float = 1.0) -> TensorList:
        """``factor * H v`` by central differences, the step adapted to ``v`` (module docstring).

        The result is the sum over all batches of all processes (no further reduction).
        """
        h1 = self.fd_step(v)
        if h1 == 0:
            self.last_fd = FDProduct((), (), float("nan"), "none", 0)
            return V.zeros_like(v)
        weights, direction = self._fd_weights(), self._fd_direction(v)
        saved, changed = self._fd_saved_weights(weights)
        adaptive = self.fd_mode == "adaptive"
        # Under DDP/FSDP every rank must take the same branch (the gradient is a collective), and a change
        # may touch only some ranks' shards: the decision is summed over ranks (identity on one process).
        routing = self._fd_routing
        if adaptive and self._sum_scalar(float(changed or self._fd_center is None)) > 0:
            self._fd_center = None
            with routing.record() as routing.center:
                self._fd_center = self._fd_gradient()
            self.num_gradients += 1
        elif routing and not adaptive:  # the expert choice at w, from one forward (fixed mode has no g(w))
            with routing.record() as routing.center:
                self.loss()
        try:
            with routing.record() as moved:
                first, tau1 = self._fd_pair(weights, saved, direction, h1, self._fd_center if adaptive else None)
                if adaptive:
                    h2 = second_fd_step(h1, tau1, self.fd_tolerance)
                    second, tau2 = self._fd_pair(weights, saved, direction, h2, self._fd_center)
        finally:
            self._fd_restore(weights, saved)
        if not adaptive:
            self.num_gradients += 2
            self.last_fd = FDProduct((h1,), (tau1,), float("nan"), "first", 2, self._fd_routing_flips(moved, 2))
            for block in first:  # in place: factor (g+ - g-) / (2 h) without new allocations
                block.mul_(factor / (2 * h1))
            return self._fd_assemble(first)
        # D1 = first / (2 h1), D2 = second / (2 h2), both in place.
        for d1, d2 in zip(first, second, strict=True):
            d1.mul_(factor / (2 * h1))
            d2.mul_(factor / (2 * h2))
        steps, taus = [h1, h2], [tau1, tau2]
        out, chosen, change = self._fd_combine(first, h1, tau1, second, h2, tau2)
        if chosen is None and FD_TRUNCATION_FACTOR * tau2**2 > self.fd_tolerance:
            # The first pair was far outside the asymptotic range (tau1 saturated), so the second step was
            # placed too large: D(h2) misses the tolerance by the model. A third pair next to it, where tau
            # is still small, makes a Richardson partner for D(h2) (module docstring, step 4).
            del first  # the difference D2 - D1, no longer needed
            h3 = third_fd_step(h1, h2, tau2, self.fd_tolerance)
            try:
                with routing.record() as moved_third:
                    third, tau3 = self._fd_pair(weights, saved, direction, h3, self._fd_center)
                moved += moved_third
            finally:
                self._fd_restore(weights, saved)
            for d3 in third:
                d3.mul_(factor / (2 * h3))
            steps.append(h3)
            taus.append(tau3)
            out, chosen, change = self._fd_combine(second, h2, tau2, third, h3, tau3)
            if chosen is None:  # no pair says more than the last: the smallest-tau difference stands
                out, chosen = third, "third"
            elif chosen == "first":  # the difference at the larger of the two steps
                chosen = "second" if h2 > h3 else "third"
        elif chosen is None:  # the first step says nothing (a kink crossed, or rounding noise): D(h2) stands
            out, chosen = second, "second"
        gradients = 2 * len(steps)
        self.num_gradients += gradients
        self.last_fd = FDProduct(tuple(steps), tuple(taus), change, chosen, gradients,
                                 self._fd_routing_flips(moved, gradients))
        return self._fd_assemble(out)

    def _fd_routing_flips(self, moved: list, gradients: int) -> int:
        """Routing decisions the product's points made differently from ``w`` (summed over ranks); warns once."""
        if not self._fd_routing:
            return 0
        flips = int(self._sum_scalar(float(self._fd_routing.flips(moved))))
        if flips and not self._fd_routing.warned:
            self._fd_routing.warned = True
            warnings.warn(routing_warning(model_family(self.model), flips, gradients), stacklevel=5)
        return flips

    def _fd_combine(
        self, da: TensorList, ha: float, taua: float, db: TensorList, hb: float, taub: float
    ) -> tuple[TensorList | None, str | None, float]:
        """Combine two central differences ``D(ha)``, ``D(hb)``; their buffers are reused (both are consumed).

        Returns ``(estimate, which, change)``: ``which`` is ``"first"``/``"second"`` for ``D`` at the
        larger/smaller step, ``"extrapolated"`` for Richardson's combination, ``None`` (estimate ``None``)
        when neither rule applies; ``change = ||D_big - D_small|| / ||D_small||``.
        """
        if ha < hb:
            da, ha, taua, db, hb, taub = db, hb, taub, da, ha, taua
        # da (larger step) becomes D_small - D_big; db stays D_small.
        for big, small in zip(da, db, strict=True):
            big.mul_(-1.0).add_(small)
        change = math.sqrt(self._fd_sq_norm(da) / max(self._fd_sq_norm(db), 1e-300))
        if change <= self.fd_tolerance / 4:
            # The two agree to well within the tolerance: truncation is negligible at the larger step, whose
            # difference has the smaller rounding error (half the other's, a third of the extrapolation's).
            for diff, small in zip(da, db, strict=True):
                small.sub_(diff)  # D_small - (D_small - D_big) = D_big
            return db, "first", change
        if asymptotic(ha, taua, hb, taub, change):
            weight = extrapolation_weight(ha / hb)  # Richardson removes the h^2 term of D_small
            for diff, small in zip(da, db, strict=True):
                small.add_(diff, alpha=weight)
            return db, "extrapolated", change
        # Undo nothing: the caller only needs D_small (db), which is intact.
        return None, None, change

    def _fd_pair(
        self, weights: TensorList, saved: TensorList, direction: TensorList, h: float, center: TensorList | None
    ) -> tuple[TensorList, float]:
        """``g(w + h v) - g(w - h v)`` and, given ``g(w)``, ``tau = h ||S|| / ||D||`` (else NaN).

        The weights are left at ``w - h v``; the caller restores them.
        """
        with torch.no_grad():
            for w, copy, d in zip(weights, saved, direction, strict=True):
                torch.add(copy, d, alpha=h, out=w)
        g_plus = self._fd_gradient()
        with torch.no_grad():
            for w, copy, d in zip(weights, saved, direction, strict=True):
                torch.add(copy, d, alpha=-h, out=w)
        g_minus = self._fd_gradient()
        tau = float("nan")
        if center is not None:
            # ||g+ + g- - 2 g0|| block by block (one temporary block at a time), before g+ becomes g+ - g-.
            second = self._fd_sq_norm(torch.add(gp, gm).sub_(g0, alpha=2.0)
                                      for gp, gm, g0 in zip(g_plus, g_minus, center, strict=True))
        for gp, gm in zip(g_plus, g_minus, strict=True):
            gp.sub_(gm)
        del g_minus
        if center is not None:
            first = self._fd_sq_norm(g_plus)
            # D = d / (2 h) and S = s / h^2, so h ||S|| / ||D|| = 2 ||s|| / ||d||.
            tau = 2 * math.sqrt(second / first) if first > 0 else (0.0 if second == 0 else float("inf"))
        return g_plus, tau

    def _fd_restore(self, weights: TensorList, saved: TensorList) -> None:
        """Put the weights back bit for bit from their saved copy (after the pairs, or on an error)."""
        with torch.no_grad():
            for w, copy in zip(weights, saved, strict=True):
                w.copy_(copy)
        self._fd_note_restored()

    def _fd_note_restored(self) -> None:
        """The weights are back bit for bit: caches keyed on their versions still hold."""
        versions = tuple(p._version for p in self.params)
        cache = getattr(self, "_w_norm_cache", None)
        if cache is not None:
            self._w_norm_cache = (versions, cache[1])

    def _fd_saved_weights(self, weights: TensorList) -> tuple[TensorList, bool]:
        """A copy of ``weights`` in buffers kept between products, and whether they changed since the last.

        Fresh buffers at every product cost a page fault per 4 KiB (about 10 ms for 5 M weights on a CPU).
        The copy itself is made every time, so no stale weights can come back; comparing with the previous
        copy first (one more read) tells whether the kept ``g(w)`` of the adaptive step still holds, also
        for weights changed through ``.data`` (no version bump).
        """
        buffers = self._fd_buffers
        layout = [(w.shape, w.dtype, w.device) for w in weights]
        changed = True
        if buffers is None or [(b.shape, b.dtype, b.device) for b in buffers] != layout:
            buffers = [torch.empty_like(w) for w in weights]
            self._fd_buffers = buffers
        elif self._fd_center is not None:
            changed = not all(torch.equal(b, w) for b, w in zip(buffers, weights, strict=True))
        for b, w in zip(buffers, weights, strict=True):
            b.copy_(w)
        return buffers, changed

    # ------------------------------------------------------------------ loss and gradient
    def loss(self) -> float:
        """``L(w)`` with this operator's reduction."""
        with torch.no_grad(), hessian_context(self.model, exact=False):
            total = sum(float(L.batch_loss_sum(self.model, b, self.row_logits)) for b in self.batches)
        return self._sum_scalar(total) * self.scale

    def gradient(self) -> TensorList:
        """``dL/dw`` for the selected parameters, as a vector list."""
        with hessian_context(self.model, exact=False):
            out = self._reduce(self._gradient_sum())
        V.scale_(self.scale, out)
        return out

    def clear_graphs(self) -> None:
        """Free the first-order graphs kept by ``keep_graph=True`` (and the finite-difference buffers)."""
        self._graphs.clear()
        self._fd_buffers = None
        self._fd_center = None

    # ------------------------------------------------------------------ errors
    @staticmethod
    def _check_loss(loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(
                f"the loss is not finite ({float(loss.detach())}); check the model's weights and dtype "
                "(fp16 overflows easily) and the token ids (must be < vocab size)"
            )

    def _check_finite(self, out: TensorList) -> None:
        # One reading pass per block and one host synchronisation: the smallest and largest entry are
        # finite exactly when every entry is (NaN propagates through both). A float64 sum would also do,
        # but costs about ten times as much on a CPU (5 ms per product for 5.3 M entries).
        home = out[0].device
        bounds = [torch.stack(torch.aminmax(b.detach())).to(home, torch.float64) for b in out if b.numel()]
        if bounds and not bool(torch.isfinite(torch.stack(bounds)).all()):
            raise FloatingPointError(
                f"H v is not finite (method {self.method!r}); check the loss and, for 'fd', the step fd_eps"
            )


def hessian_operator(
    model: torch.nn.Module,
    batches: Iterable[L.Batch],
    params: ParamSelector = None,
    method: str = "auto",
    reduction: str = "mean",
    fd_eps: float | None = None,
    keep_graph: bool | str = "auto",
    progress: bool = False,
    fd_mode: str | None = None,
) -> HessianOperator:
    """The Hessian of the causal-LM loss of ``model`` on ``batches`` as an operator (see :class:`HessianOperator`)."""
    return HessianOperator(
        model, batches, params=params, method=method, reduction=reduction, fd_eps=fd_eps,
        keep_graph=keep_graph, progress=progress, fd_mode=fd_mode,
    )


# ---------------------------------------------------------------------------------------------- helpers
def _accumulate(total: TensorList | None, part: Sequence[torch.Tensor]) -> TensorList:
    """``total + part`` in place (the first part is taken as is: one batch costs no extra pass)."""
    if total is None:
        return list(part)
    for acc, x in zip(total, part, strict=True):
        acc.add_(x)
    return total


def _fast_norm(x: Sequence[torch.Tensor]) -> float:
    """``||x||`` from per-block norms (no float64 copy of the blocks; a step size needs no more)."""
    home = x[0].device
    parts = torch.stack([torch.linalg.vector_norm(b).to(home, torch.float64) for b in x])
    return float(torch.linalg.vector_norm(parts))


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Count the bytes of the tensors autograd saves in this block (parameters and repeats excluded)."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.total = 0
        self._seen = {p.untyped_storage().data_ptr() for p in params}
        super().__init__(self._pack, _unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._seen:
                self._seen.add(ptr)
                self.total += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
            pass
        return t


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
