"""Keep a float64 forward in float64 throughout, whatever the modeling code casts to.

transformers' modeling code "upcasts to float32" for numerical safety in half precision: RMSNorms do
``hidden_states.to(torch.float32)``, attention does ``softmax(scores, dtype=torch.float32).to(query.dtype)``,
rotary embeddings do ``inv_freq.to(dtype=torch.float)`` and ``position_ids.float()``. For a float64 model
each of these is a cast *down*: the result is float64 again but carries float32 rounding, so a float64
Hessian-vector product is only accurate to about 1e-7 relative and a float64 finite difference, which
divides that rounding by its step, is useless (measured on the tiny models of tests/tiny.py, ``python -m
benchmarks.families``: exact methods 1.4e-9 to 4.6e-7 on 22 of 23 families, finite differences 4e-2 to
4e2 on 21). A list of known layers to replace cannot cover families it has not seen; :class:`KeepFloat64`
(``with keep_float64():``) is a ``torch.overrides.TorchFunctionMode`` that changes the requests themselves.

The rule
--------
Inside the mode, *a request for a floating dtype below float64 is answered in float64*. "Below float64"
means float32, float16 and bfloat16 (to float64) and complex32, complex64 (to complex128); float8 and
integer dtypes are left alone. Concretely:

1. Conversions: ``t.to(dtype)``, ``t.to(device, dtype)``, ``t.to(other)``, ``t.to(dtype=...)``,
   ``t.float()``, ``t.half()``, ``t.bfloat16()``, ``t.type(dtype)`` / ``t.type("torch.FloatTensor")``,
   ``t.type_as(other)``: the target becomes float64. For a float64 ``t`` the cast is then the identity, but
   where the original call would have made a new tensor the mode makes one too (``clone``), so code that
   writes into the "cast copy" in place does not write into its input.
2. ``dtype=`` requests of any operation, keyword or positional: ``softmax(x, dtype=torch.float32)``,
   ``log_softmax``, ``sum``/``mean``/``cumsum``/``prod(dtype=...)``, factories such as
   ``torch.full((), c, dtype=torch.float32)`` (Bloom's ALiBi) or ``torch.empty(..., dtype=torch.float32)``,
   ``new_zeros(..., dtype=...)``. Not ``t.view(dtype)`` (a
   reinterpretation of the bits, not a request for precision), ``torch.can_cast`` or
   ``torch.promote_types`` (questions about dtypes, not requests).
3. Factory functions called *without* a dtype whose result would be floating in the default dtype
   (``torch.tensor(0.1)``, ``torch.ones(n)``, ``torch.full(s, 0.5)``, ``torch.arange(0.0, n)``, ``randn``)
   are made in float64, as if the default dtype were float64: the values are computed in float64, not
   rounded to float32. Whether the result would be floating is read off the arguments before the call
   (``torch.full(s, 3)`` and ``torch.arange(n)`` stay integer; ``torch.tensor(t)`` of a tensor keeps its
   dtype), so no float32 tensor is made on the way.

What the rule does *not* change: an operation whose float32 result comes from integer tensors and Python
numbers (``int_tensor * 0.5``, ``int_tensor / int_tensor``) rather than from a factory or a cast, and
float32 tensors that come from outside the mode (a buffer a model keeps in float32). Neither occurs in the
families tested (tests/test_families.py); :func:`report_low_precision` lists every such operation, so a new
family that has one shows it. Code that *checks* that its upcast gave float32 fails in the mode, loudly:
GPT-2 with ``reorder_and_upcast_attn=True`` raises "Error with upcasting" (it does so for any float64
model in transformers 5.24, with the mode or without: its float64 causal mask promotes the weights).

Why the rule is right only for a float64 model
----------------------------------------------
Rule 2 and 3 make *every* floating tensor created in the scope float64, not only those that meet float64
data later: a factory cannot know where its result goes. That is what a float64 model needs (every
floating tensor of its forward belongs to the float64 computation; a float32 buffer written into in place
by float64 data would round it silently), and it would be wrong for a float32 or half model, whose
float32 upcasts are deliberate. So the mode is entered only for models whose floating parameters are all
float64 (:func:`is_float64_model`, used by :func:`hess_utils.operators.kernels.hessian_context`), and only
around each product, never globally: a ``TorchFunctionMode`` is thread-local and ends with its block.

Constants
---------
Constants the model computes *at construction* are what they are: the RoPE ``inv_freq`` buffer is computed
in float32 in ``__init__`` and converted to float64 by ``model.to(torch.float64)``, so it holds
float32-rounded values in float64. That is a constant of the model (the same in every forward, inside the
mode or not), not a loss of derivative precision, and every method and every reference uses the same buffer.
Constants computed *in the forward* from a float32 request (Bloom's ALiBi slopes,
``torch.full((), 2 ** (-8 / n), dtype=torch.float32)``) are computed in float64 inside the mode; for a
power-of-two head count they are exact either way. A reference Hessian must follow the same rule
(tests/tiny.py does, with code of its own).

Autocast
--------
``torch.autocast`` and transformers' ``maybe_autocast`` need nothing: autocast never casts float64 inputs
(ATen's ``is_eligible`` excludes double; measured on the CPU: ``x @ x``, ``linear``, ``softmax`` and
``layer_norm`` of float64 inputs stay float64 under ``autocast("cpu", torch.bfloat16)``), and inside the
mode no float32 tensor is left for it to act on. transformers 5.24's Llama, Qwen2, Phi-3 and Gemma-2 rotary
embeddings no longer enter one; GPT-2 enters ``maybe_autocast(enabled=False)`` around its upcast attention.

What a ``TorchFunctionMode`` sees
---------------------------------
Every call of a ``torch`` function or ``Tensor`` method from Python code, i.e. every operation of the
modeling code. Not the operations inside a function it intercepts (the body of ``F.softmax`` runs with the
mode suspended; PyTorch's own functions do not cast float64 down), and not backward passes: every mode is
suspended while it handles ``torch.autograd.grad`` (measured: a ``.float()`` in a custom backward is not
seen). The C++ derivative formulas follow the dtypes of the forward, so that costs nothing there; the Python
``backward`` of an ``autograd.Function`` runs as written, also in a double backward (Bloom's hand-written
GeLU backward has no cast; one that had would round, and only a comparison with a reference would show it).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, resolve_name

#: Floating dtypes below float64 and what the mode answers a request for them with.
WIDER: Mapping[torch.dtype, torch.dtype] = {
    torch.float32: torch.float64,
    torch.float16: torch.float64,
    torch.bfloat16: torch.float64,
    torch.complex64: torch.complex128,
    torch.complex32: torch.complex128,
}

_T = torch.Tensor
#: Conversions spelled as methods without a dtype argument: what dtype each one asks for.
_NAMED_CASTS = {_T.float: torch.float32, _T.half: torch.float16, _T.bfloat16: torch.bfloat16}
#: Calls whose dtype arguments are not requests for a result's precision (rule 2's exceptions).
_DTYPE_QUERIES = {_T.view, torch.can_cast, torch.promote_types}
#: Factories whose result without ``dtype`` is floating, in the default dtype (rule 3) ...
_FLOATING_FACTORIES = {
    torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.eye, torch.linspace, torch.logspace,
    torch.scalar_tensor, torch.rand, torch.randn,
}
#: ... and those whose result is floating only for floating arguments (``full(s, 0.5)``, ``arange(0.0, 3)``,
#: ``tensor([0.1])``, ``normal(0.0, 1.0, size)``; ``tensor(t)`` of a tensor keeps ``t``'s dtype).
_VALUE_FACTORIES = {torch.full, torch.arange, torch.range, torch.tensor, torch.as_tensor, torch.asarray,
                    torch.normal}
_ALL_FACTORIES = _FLOATING_FACTORIES | _VALUE_FACTORIES
_TYPE_STRING = re.compile(r"^(torch\.(?:cuda\.)?)(Float|Half|BFloat16)Tensor$")


def wider(dtype: Any) -> Any:
    """``dtype`` as the mode answers a request for it: float64 for float32/16/bf16, complex128 for complex64/32."""
    return WIDER.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype


def is_float64_model(model: torch.nn.Module) -> bool:
    """Whether every floating parameter of ``model`` is float64 (and it has one): the mode is meant for it."""
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return bool(floating) and all(d == torch.float64 for d in floating)


def _widen_type_arg(arg: Any) -> Any:
    if isinstance(arg, str):
        return _TYPE_STRING.sub(r"\1DoubleTensor", arg)
    return wider(arg)


def _widened_call(func: Callable, args: tuple, kwargs: dict) -> tuple[Callable, tuple, dict, bool]:
    """The call the mode makes instead of ``func(*args, **kwargs)`` and whether it differs (rules 1 and 2)."""
    if func in _NAMED_CASTS:  # t.float() is t.to(torch.float32), with memory_format passed on
        return _T.to, (args[0], WIDER[_NAMED_CASTS[func]]), kwargs, True
    if func is _T.type_as:  # t.type_as(o) is t.to(o.device, o.dtype), here at least float64
        self, other = args[0], args[1]
        if other.dtype in WIDER:
            return _T.to, (self, other.device, WIDER[other.dtype]), {}, True
        return func, args, kwargs, False
    if func in _DTYPE_QUERIES:
        return func, args, kwargs, False
    changed = False
    new_args = []
    for i, a in enumerate(args):
        if isinstance(a, torch.dtype) and a in WIDER:
            new_args.append(WIDER[a])
            changed = True
        elif func is _T.to and i == 1 and isinstance(a, torch.Tensor) and a.dtype in WIDER:
            # t.to(other, non_blocking, copy) is t.to(other.device, other.dtype, non_blocking, copy)
            new_args += [a.device, WIDER[a.dtype]]
            changed = True
        elif func is _T.type and i == 1 and isinstance(a, str) and _TYPE_STRING.match(a):
            new_args.append(_widen_type_arg(a))
            changed = True
        else:
            new_args.append(a)
    dtype = kwargs.get("dtype")
    if dtype is not None and (dtype in WIDER or (func is _T.type and isinstance(dtype, str)
                                                  and _TYPE_STRING.match(dtype))):
        kwargs = {**kwargs, "dtype": _widen_type_arg(dtype)}
        changed = True
    return func, tuple(new_args), kwargs, changed


def _float_number(x: Any, scalar_tensors: bool = False) -> bool:
    """Whether ``x`` is a Python float, a nested list holding one, or (``scalar_tensors``) a floating 0-dim tensor."""
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)):
        return any(_float_number(item) for item in x)
    return scalar_tensors and isinstance(x, torch.Tensor) and x.ndim == 0 and x.is_floating_point()


def _default_dtype_factory(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether ``func(*args, **kwargs)`` is a factory call whose result would have the default float dtype.

    Decided from the arguments, before the call, so that no float32 tensor is ever made (a checker below the
    mode would see it) and a random factory draws once. Complex numbers make complex results: left alone.
    """
    if kwargs.get("dtype") is not None or kwargs.get("out") is not None:
        return False
    if any(isinstance(a, complex) for a in (*args, *kwargs.values())):
        return False
    if func in _FLOATING_FACTORIES:
        return True
    if func is torch.full:  # full(size, 0.5) is floating, full(size, 3) is int64
        fill = args[1] if len(args) > 1 else kwargs.get("fill_value")
        return _float_number(fill, scalar_tensors=True)
    if func in (torch.arange, torch.range):  # arange(0.0, n) is floating, arange(n) is int64
        numbers = [*args, *(kwargs.get(k) for k in ("start", "end", "step"))]
        return any(_float_number(n, scalar_tensors=True) for n in numbers)
    if func is torch.normal:  # normal(mean, std, size) of two numbers; tensors give their own dtype
        return not any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values()))
    # tensor / as_tensor / asarray: Python floats make the default dtype; tensors and arrays keep theirs.
    data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
    return _float_number(data)


class KeepFloat64(TorchFunctionMode):
    """A ``TorchFunctionMode`` that answers requests for dtypes below float64 in float64 (module docstring).

    :attr:`turned` counts, per operation name, the calls the mode changed (for reports; the functions are
    counted as they come and named only when asked).
    """

    def __init__(self) -> None:
        super().__init__()
        self._turned: Counter[Callable] = Counter()

    @property
    def turned(self) -> Counter[str]:
        names: Counter[str] = Counter()
        for func, count in self._turned.items():
            names[_name(func)] += count
        return names

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not kwargs and len(args) < 2 and func not in _NAMED_CASTS and func not in _ALL_FACTORIES:
            return func(*args)  # the common case (unary methods, getters): nothing to change
        new_func, new_args, new_kwargs, changed = _widened_call(func, args, kwargs)
        if not changed and func in _ALL_FACTORIES and _default_dtype_factory(func, args, kwargs):
            # Rule 3: a floating factory without dtype makes float64, as if that were the default dtype.
            new_kwargs, changed = {**kwargs, "dtype": torch.float64}, True
        if not changed:
            return func(*args, **kwargs)
        self._turned[func] += 1
        out = new_func(*new_args, **new_kwargs)
        source = args[0] if args else None
        if out is source and isinstance(out, torch.Tensor):
            # The original call would have converted, i.e. made a new tensor; so does this one (a later
            # in-place write into "the float32 copy" must not reach the input).
            out = out.clone()
        return out


def keep_float64() -> KeepFloat64:
    """``with keep_float64():`` runs the block with requests below float64 answered in float64."""
    return KeepFloat64()


def float64_mode_active() -> bool:
    """Whether a :class:`KeepFloat64` mode is active on this thread (for tests of the scoping)."""
    from torch.overrides import _get_current_function_mode_stack

    return any(isinstance(m, KeepFloat64) for m in _get_current_function_mode_stack())


def _name(func: Callable) -> str:
    try:
        return resolve_name(func) or getattr(func, "__qualname__", repr(func))
    except Exception:  # resolve_name walks torch's namespaces; never let a report fail a product
        return getattr(func, "__qualname__", repr(func))


# ---------------------------------------------------------------------------------------------- checker
@dataclass(frozen=True)
class LowPrecisionOp:
    """One call that produced a floating tensor below float64 while a float64 computation was recorded.

    ``op``: its name (``torch.Tensor.to``, ``torch.nn.functional.softmax``, ...); ``dtype``: the first
    dtype below float64 among its outputs; ``source``: ``"float64"`` (it had a float64 tensor input: a cast
    down), ``"new"`` (no floating tensor input: a factory, a conversion of integers) or ``"low"`` (its
    floating inputs were below float64 already: the precision was lost earlier).
    """

    op: str
    dtype: torch.dtype
    source: str


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _tensors(item)
    elif isinstance(x, dict):  # transformers' ModelOutput is a dict too
        for item in x.values():
            yield from _tensors(item)


class LowPrecisionRecorder(TorchFunctionMode):
    """Records every call whose result holds a floating tensor below float64 (``found``, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[LowPrecisionOp] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        low = [t.dtype for t in _tensors(out) if (t.is_floating_point() or t.is_complex()) and t.dtype in WIDER]
        if low and func is not _T.view:  # a view by dtype reinterprets bits; it computes nothing
            inputs = [t for t in _tensors((args, kwargs)) if t.is_floating_point() or t.is_complex()]
            if any(t.dtype in (torch.float64, torch.complex128) for t in inputs):
                source = "float64"
            else:
                source = "low" if inputs else "new"
            self.found.append(LowPrecisionOp(_name(func), low[0], source))
        return out


def report_low_precision(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], keep: bool = True
) -> list[LowPrecisionOp]:
    """Every operation of one loss of a float64 ``model`` that made a tensor below float64, in order.

    Runs :func:`hess_utils.loss.batch_loss_sum` on ``batch`` (the forward and loss the Hessian products
    differentiate) inside :func:`~hess_utils.operators.kernels.hessian_context` (``keep=False``: outside it,
    to see what the modeling code casts down; mixture-of-experts layers still run on the experts kernel a
    product would choose, :func:`~hess_utils.operators.kernels.experts_kernel`, since the default one has no
    float64 version), under a :class:`LowPrecisionRecorder`. An empty list means the
    whole forward ran in float64. Backward passes are not visible to a ``TorchFunctionMode`` (module
    docstring). Raises ``ValueError`` for a model that is not float64.
    """

    from hess_utils import loss as L
    from hess_utils.operators.kernels import experts_kernel, hessian_context

    if not is_float64_model(model):
        raise ValueError("report_low_precision checks float64 models; this one has parameters of another dtype")
    recorder = LowPrecisionRecorder()
    scope = hessian_context(model, exact=True) if keep else experts_kernel(model, exact=True)
    # The recorder is entered first, so it sits below the float64 mode and sees the calls as changed.
    with recorder, scope, torch.no_grad():
        L.batch_loss_sum(model, batch)
    return recorder.found
