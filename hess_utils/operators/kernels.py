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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

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


@contextlib.contextmanager
def hessian_context(model: torch.nn.Module, exact: bool = True) -> Iterator[None]:
    """Run ``model`` inside this block with kernels fit for Hessians (module docstring).

    ``exact=False`` (finite differences, plain losses and gradients) only needs first derivatives, so
    SDPA and flash run as they are; the float64 mode applies to every method (a finite difference divides
    the forward's rounding by its step, so it needs float64 throughout even more than the exact methods).
    """
    with _attention_kernel(model, exact):
        if is_float64_model(model):
            with keep_float64():
                yield
        else:
            yield
