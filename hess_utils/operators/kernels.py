"""Kernels that can be differentiated twice, at the precision of the model's dtype.

Three facts measured with transformers 5 shape this module:

* SDPA's fused kernels have no double backward and no forward-mode derivative; its MATH backend does.
* transformers' *eager* attention for GPT-NeoX, Llama, Qwen2 and OPT computes the softmax in float32 even
  for a float64 model (``softmax(..., dtype=torch.float32).to(query.dtype)``). A float64 Hessian is then
  only accurate to about 1e-8 and is not symmetric (measured 6e-9 relative asymmetry on a tiny GPT-NeoX).
* Llama/Qwen2-style RMSNorm casts its input to float32 (1e-7 asymmetry measured on a tiny Llama).

:func:`hessian_context` is a scoped context (never a global switch) that runs the model with kernels
satisfying all three: eager models whose weights are float64 use ``"hess_eager"``, the eager formula with
the softmax kept in the query's dtype (half precision is still upcast to float32 as in eager), and their
RMSNorms are recomputed in float64 by a forward hook removed on exit; SDPA models run under
``sdpa_kernel(SDPBackend.MATH)``; flash attention is refused for exact methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISE_EAGER = "hess_eager"
_registered = False


def precise_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention ``softmax(q k^T * scaling + mask) v`` with the softmax in the query's dtype.

    Shapes: ``query (b, h, s, d)``, ``key``/``value`` ``(b, h_kv, s, d)``; returns ``(b, s, h, d)`` and the
    attention weights ``(b, h, s, s)``, as transformers' attention interface expects.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    softmax_dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=softmax_dtype).to(value.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register() -> None:
    """Make ``"hess_eager"`` known to transformers (a new name; existing kernels are untouched)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(PRECISE_EAGER, precise_eager_attention)
    AttentionMaskInterface.register(PRECISE_EAGER, eager_mask)
    _registered = True


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention kernel a transformers model was built with (``"eager"`` if it does not say)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    return str(impl or "eager")


# RMSNorm classes whose forward is ``weight * x / sqrt(mean(x^2) + eps)`` computed in float32.
_FLOAT32_RMSNORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm", "OlmoRMSNorm")


def _precise_rmsnorm_hook(module, args, output):
    """Replace an RMSNorm's float32-rounded output by the same formula in the input's dtype."""
    (x,) = args[:1]
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return module.weight * normed


@contextlib.contextmanager
def _float64_rmsnorms(model: torch.nn.Module) -> Iterator[None]:
    handles = [
        m.register_forward_hook(_precise_rmsnorm_hook)
        for m in model.modules()
        if type(m).__name__ in _FLOAT32_RMSNORMS and getattr(m, "weight", None) is not None
        and m.weight.dtype == torch.float64
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _attention_kernel(model: torch.nn.Module, exact: bool) -> Iterator[None]:
    impl = attention_implementation(model)
    config = getattr(model, "config", None)
    if impl == "eager" and config is not None and any(p.dtype == torch.float64 for p in model.parameters()):
        _register()
        config._attn_implementation = PRECISE_EAGER
        try:
            yield
        finally:
            config._attn_implementation = impl
    elif impl == "sdpa" and exact:
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


@contextlib.contextmanager
def hessian_context(model: torch.nn.Module, exact: bool = True) -> Iterator[None]:
    """Run ``model`` inside this block with kernels fit for Hessians (module docstring).

    ``exact=False`` (finite differences, plain losses and gradients) only needs first derivatives, so
    SDPA and flash run as they are; the float64 precision fixes apply to every method.
    """
    with _attention_kernel(model, exact), _float64_rmsnorms(model):
        yield
