"""Kernels that can be differentiated twice, at the precision of the model's dtype.

Three facts measured with transformers 5 shape this module:

* SDPA's fused kernels have no double backward and no forward-mode derivative; its MATH backend does.
* Flash attention has neither, in any backend.
* transformers' modeling code casts to float32 in norms, softmaxes and rotary embeddings even for a float64
  model (``softmax(..., dtype=torch.float32)``, ``hidden_states.to(torch.float32)``, ``.float()``). A float64
  Hessian-vector product is then only accurate to about 1e-7 relative and not symmetric (measured: 6e-9
  asymmetry on a tiny GPT-NeoX, 1e-7 on a tiny Llama; Phi-3 1.2e-7 and Gemma-2 3.3e-7 relative error).

:func:`hessian_context` is a scoped context (never a global switch), entered around each product, that
runs the model with kernels satisfying all three: SDPA models run under ``sdpa_kernel(SDPBackend.MATH)``;
flash attention is refused for exact methods; and a model whose floating parameters are all float64 runs
under :func:`~hess_utils.operators.precision.keep_float64`, a ``TorchFunctionMode`` that answers every
request for a dtype below float64 in float64 (casts, ``dtype=`` arguments, factories: the rule is in
:mod:`hess_utils.operators.precision`). That covers families without a list of their layers; a float32 or
half model is run exactly as it is (its float32 upcasts are deliberate).

Mixture-of-experts layers
-------------------------
transformers 5 runs the experts of a mixture-of-experts layer (every class decorated with
``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, GPT-oss, DeepSeek-V2/V3, OLMoE, ...) through the kernel
named by ``config._experts_implementation``, read at every forward; the default is ``"grouped_mm"``
(``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``). Measured with torch 2.13 on the CPU, tiny
Mixtral and GPT-oss (``tests/test_families.py``): ``grouped_mm`` has no float64 kernel ("Expected mat_a to
be Float32, BFloat16 or Float16 matrix, got Double") and no forward-mode derivative ("forward AD with
_grouped_mm ... not implemented"); its float32 double backward works and matches the eager experts to float32
rounding (6e-9 to 1.2e-7 relative). ``"batched_mm"`` (``bmm`` and indexing) and ``"eager"`` (a loop over
the experts hit) are plain differentiable torch code: float64, double backward and forward mode, equal to
each other to 1e-16. :func:`experts_kernel` therefore picks, per product, the kernel the model was built
with where it has what the product needs (:func:`experts_implementation_for`) and ``"eager"`` otherwise:
always in float64, always for ``"fwd-rev"``, for ``"rev-rev"`` except ``grouped_mm`` in float32 on the CPU
(its double backward verified against eager there; on other devices it is not verified, so eager). The
choice is scoped like the attention kernel's: the experts' configs are set for the block and restored after
(a config is shared by all threads, so two operators of one model must not multiply concurrently from two
threads). Experts that cannot run eagerly (quantized expert weights, ``deepgemm_megamoe``, a load-time
layout) are refused for exact methods with a :class:`UnsupportedModelError` naming the family and the layer.

Linear layers (exact reverse-over-reverse products)
--------------------------------------------------
``F.linear(x, W)`` computes ``x @ W.T``; autograd's backward differentiates that transposed view, so the
gradient of ``W`` comes out as a transposed ``(in, out)`` tensor, and in the double backward of a Hessian-vector
product ``W`` then receives two contributions in opposite memory layouts (from ``x @ W.T`` and from the
backward's ``grad @ W``), added by a strided elementwise kernel several times slower than a contiguous one,
once per weight per product. Under ``method="rev-rev"`` the block runs every ``F.linear`` on plain tensors
through :class:`_Linear`, the same products written out (``grad_W = grad^T x`` as one ``(out, in)`` matrix
product): the same first and second derivatives up to rounding, with every weight contribution contiguous
(``benchmarks/RESULTS.md``: SmolLM2-135M). Tensor subclasses (DTensor, quantized weights) and linears whose
weight needs no gradient run natively. Finite differences and gradients (``exact=False``) and forward mode
(``"fwd-rev"``, which ``torch.func`` would need a ``jvp`` rule for) are untouched.

Errors
------
An error raised inside :func:`hessian_context` by the model's forward or by autograd (an operation without a
double backward, a forward-mode derivative or a float64 kernel) comes out as an
:class:`UnsupportedModelError` (a ``ValueError`` and a ``RuntimeError``) that names the family
(``config.model_type``), the layer (the innermost module of the model in the traceback, where there is one)
and the reason, with what to do instead; the original exception is kept as its ``original`` attribute.
Out-of-memory errors and errors raised by the package itself pass unchanged.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hess_utils.operators.precision import is_float64_model, keep_float64


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention kernel a transformers model was built with (``"eager"`` if it does not say)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    return str(impl or "eager")


@contextlib.contextmanager
def _attention_kernel(model: torch.nn.Module, exact: bool) -> Iterator[None]:
    impl = attention_implementation(model)
    if impl == "sdpa" and exact:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            yield
    elif "flash" in impl and exact:
        raise ValueError(
            f"attention kernel {impl!r} has no double backward or forward-mode derivative, so an exact "
            "Hessian cannot be computed; load the model with attn_implementation='eager' (or 'sdpa'), "
            "or use method='fd'"
        )
    else:
        yield


# ---------------------------------------------------------------------------------------------- errors
class UnsupportedModelError(ValueError, RuntimeError):
    """A model (family, layer) this package cannot differentiate as asked, and why (module docstring).

    Both a ``ValueError`` (the package's refusals) and a ``RuntimeError`` (what torch raised before, so code
    catching that keeps working). ``family``, ``layer``, ``reason``; ``original``: the exception it replaces.
    """

    def __init__(self, family: str, layer: str | None, reason: str, hint: str = "",
                 original: BaseException | None = None) -> None:
        where = f"layer {layer}" if layer else "a layer not named by the traceback (a backward pass)"
        message = f"{family}: {where}: {reason}"
        super().__init__(message + (f"; {hint}" if hint else ""))
        self.family, self.layer, self.reason, self.original = family, layer, reason, original


def model_family(model: torch.nn.Module) -> str:
    """``"mixtral (MixtralForCausalLM)"``: the family a model's config names, and its class."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None) or "model"
    return f"{kind} ({type(model).__name__})"


def _layer_of(model: torch.nn.Module, err: BaseException) -> str | None:
    """The innermost module of ``model`` whose code is on the traceback of ``err`` (its qualified name)."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)] or "(the model itself)"
            found = f"{found} ({type(owner).__name__})"
    return found


def _hint(message: str, exact: bool, method: str | None) -> str:
    low = message.lower()
    if "forward ad" in low or "forward-mode" in low or "jvp" in low:
        return "it has no forward-mode derivative: use method='rev-rev' or 'fd'"
    if "double" in low and ("expected" in low or "not implemented" in low or "unsupported" in low):
        return ("this kernel has no float64 version: load the model with a float64 kernel (for experts "
                "experts_implementation='eager', for attention attn_implementation='eager'), or run it in float32")
    if "derivative" in low or "double backward" in low or "backward" in low:
        return ("it has no second derivative: use method='fd' (gradients only)" if exact
                else "it cannot be differentiated")
    if "setup_context" in low:
        return "torch.func refuses this autograd.Function: use method='rev-rev' or 'fd'"
    return "this operation fails under the Hessian products; please report it with the model's config"


def _translate(model: torch.nn.Module, err: BaseException, exact: bool, method: str | None) -> BaseException | None:
    """The :class:`UnsupportedModelError` that replaces ``err``, or None to let ``err`` pass unchanged."""
    if isinstance(err, (UnsupportedModelError, torch.OutOfMemoryError)) or not isinstance(
        err, (RuntimeError, NotImplementedError)
    ):
        return None
    layer = _layer_of(model, err)
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    autograd = any(k in message.lower() for k in ("derivative", "backward", "forward ad", "setup_context",
                                                   "not implemented", "does not support"))
    if layer is None and not autograd:
        return None  # not the model's forward, not autograd: a collective, a device error, ...
    return UnsupportedModelError(model_family(model), layer, f"{type(err).__name__}: {message[:300]}",
                                 _hint(message, exact, method), original=err)


# ---------------------------------------------------------------------------------------------- experts
#: Experts kernels made of plain differentiable torch code (float64, double backward, forward mode: measured
#: equal to the eager experts to 1e-16 in float64, module docstring).
PLAIN_EXPERTS = ("eager", "batched_mm")
#: ``(kernel, device type, dtype, method)`` where a fused experts kernel's derivatives were verified against
#: the eager experts (tests/test_families.py: float32 rev-rev on the CPU, to float32 rounding).
VERIFIED_FUSED_EXPERTS = frozenset({("grouped_mm", "cpu", torch.float32, "rev-rev")})
#: Kernels that are a load-time choice of weight layout: they cannot be switched to eager per product.
LOCKED_EXPERTS = ("deepgemm_megamoe",)
_EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
_TRAINABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The experts modules of ``model`` that dispatch on ``config._experts_implementation``.

    transformers' ``@use_experts_implementation`` gives every instance ``config``, ``has_gate``,
    ``is_transposed`` and ``_is_expert_parallel``; those are the modules whose kernel :func:`experts_kernel`
    chooses.
    """
    return [
        (name, m) for name, m in model.named_modules()
        if hasattr(m, "_is_expert_parallel") and hasattr(m, "has_gate") and getattr(m, "config", None) is not None
    ]


def _experts_dtype_device(module: torch.nn.Module) -> tuple[torch.dtype | None, str]:
    for attr in _EXPERT_WEIGHTS:
        w = getattr(module, attr, None)
        if isinstance(w, torch.Tensor):
            return w.dtype, w.device.type
    for p in module.parameters(recurse=False):
        return p.dtype, p.device.type
    return None, "cpu"


def experts_implementation_for(impl: str | None, dtype: torch.dtype | None, device_type: str, exact: bool,
                               method: str | None = None) -> str:
    """The experts kernel to run a product with: ``impl`` where it has what the product needs, else ``"eager"``.

    ``exact=False`` needs first derivatives only (finite differences, losses, gradients); ``method`` is
    ``"rev-rev"``, ``"fwd-rev"`` or None (an exact product of either kind: the eager experts). ``None`` is
    transformers' own fallback to the module's eager forward.
    """
    impl = impl or "eager"
    if impl in PLAIN_EXPERTS:
        return impl
    if dtype == torch.float64:
        return "eager"  # no fused experts kernel has a float64 version (grouped_mm measured)
    if not exact:
        return impl
    if (impl, device_type, dtype, method) in VERIFIED_FUSED_EXPERTS:
        return impl
    return "eager"


def _set_experts_implementation(config, impl: str | None) -> None:
    if hasattr(config, "_experts_implementation_internal"):
        config._experts_implementation_internal = impl  # this config only, not its sub-configs
    else:
        config._experts_implementation = impl


@contextlib.contextmanager
def experts_kernel(model: torch.nn.Module, exact: bool, method: str | None = None) -> Iterator[dict[str, str]]:
    """Run the block with each experts module on :func:`experts_implementation_for`'s kernel; restore after.

    Yields ``{layer name: kernel}`` for the experts modules (empty for a dense model). A config shared by
    several experts modules runs eager if any of them needs it. Refuses (:class:`UnsupportedModelError`) an
    exact method on experts that cannot run eagerly: quantized expert weights or a load-time kernel.
    """
    modules = experts_modules(model)
    if not modules:
        yield {}
        return
    configs: dict[int, object] = {}  # id(config) -> config
    before: dict[int, str | None] = {}  # its kernel as built
    after: dict[int, str] = {}  # the kernel of this block: eager if any of its experts needs eager
    layers: dict[str, int] = {}
    for name, m in modules:
        config = m.config
        impl = getattr(config, "_experts_implementation", None)
        dtype, device_type = _experts_dtype_device(m)
        if exact and (impl in LOCKED_EXPERTS or (dtype is not None and dtype not in _TRAINABLE_DTYPES)):
            why = (f"its experts kernel {impl!r} is a load-time weight layout" if impl in LOCKED_EXPERTS
                   else f"its expert weights are quantized ({dtype})")
            raise UnsupportedModelError(
                model_family(model), f"{name} ({type(m).__name__})",
                f"{why}, so the experts cannot run as differentiable torch code and have no second derivative",
                "load the model unquantized with experts_implementation='eager', or use method='fd'")
        key = id(config)
        configs[key], before[key], layers[name] = config, impl, key
        target = experts_implementation_for(impl, dtype, device_type, exact, method)
        after[key] = "eager" if after.get(key) == "eager" else target
    changed = [key for key in configs if after[key] != (before[key] or "eager")]
    try:
        for key in changed:
            _set_experts_implementation(configs[key], after[key])
        yield {name: after[key] for name, key in layers.items()}
    finally:
        for key in changed:
            _set_experts_implementation(configs[key], before[key])


# ---------------------------------------------------------------------------------------------- linear layers
class _Linear(torch.autograd.Function):
    """``F.linear(x, W, b) = x W^T + b`` with its backward written as plain products (module docstring).

    Shapes: ``x`` ``(..., in)``, ``W`` ``(out, in)``, ``b`` ``(out,)``, gradient ``g`` ``(..., out)``:
    ``grad_x = g W`` ``(..., in)``, ``grad_W = G^T X`` ``(out, in)`` with ``G``, ``X`` the flattened
    ``(tokens, out)`` and ``(tokens, in)``, ``grad_b = G^T 1``. Written in differentiable operations, so a
    first-order graph built with ``create_graph=True`` differentiates again exactly.
    """

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = flat.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _plain(t: torch.Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


class _ContiguousLinear(TorchFunctionMode):
    """Runs ``F.linear`` on plain tensors whose weight needs a gradient through :class:`_Linear`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            x, weight, bias = (*args, None, None, None)[:3]
            x, weight = kwargs.get("input", x), kwargs.get("weight", weight)
            bias = kwargs.get("bias", bias)
            if weight is not None and weight.requires_grad and _plain(x) and _plain(weight) and _plain(bias):
                return _Linear.apply(x, weight, bias)
        return func(*args, **kwargs)


@contextlib.contextmanager
def linear_kernel(exact: bool, method: str | None) -> Iterator[bool]:
    """Run the block's linear layers through :class:`_Linear` for exact ``"rev-rev"`` products (yields whether)."""
    if exact and method == "rev-rev":
        with _ContiguousLinear():
            yield True
    else:
        yield False


# ---------------------------------------------------------------------------------------------- the scope
@contextlib.contextmanager
def hessian_context(model: torch.nn.Module, exact: bool = True, method: str | None = None) -> Iterator[None]:
    """Run ``model`` inside this block with kernels fit for Hessians (module docstring).

    ``exact=False`` (finite differences, plain losses and gradients) only needs first derivatives, so
    SDPA and flash run as they are; the float64 mode applies to every method (a finite difference divides
    the forward's rounding by its step, so it needs float64 throughout even more than the exact methods).
    ``method`` (``"rev-rev"`` or ``"fwd-rev"``, None when not known) refines the experts kernel's choice
    (:func:`experts_kernel`) and, for ``"rev-rev"``, runs linear layers through :func:`linear_kernel`. Errors
    of the model's forward and of autograd come out as
    :class:`UnsupportedModelError` (module docstring).
    """
    with _attention_kernel(model, exact), experts_kernel(model, exact, method), linear_kernel(exact, method):
        try:
            if is_float64_model(model):
                with keep_float64():
                    yield
            else:
                yield
        except BaseException as err:
            new = _translate(model, err, exact, method)
            if new is None:
                raise
            raise new from None
