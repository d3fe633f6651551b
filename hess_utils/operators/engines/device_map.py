"""Model parallelism with accelerate's ``device_map``: what must hold for exact Hessians.

A model loaded with ``device_map="auto"`` (or an explicit map) keeps each parameter on its device and
accelerate's hooks move activations between devices; double backward runs through those hooks, so
:class:`~hess_utils.operators.hessian.HessianOperator` works unchanged, with vector blocks living where their
parameters live and reductions accumulated in float64 on the first block's device. What does *not* work is
offload: parameters kept on ``"disk"`` or ``"meta"`` (or CPU-offloaded by hooks that swap weights in) are
not leaves of the autograd graph, and silently drop out of it.
"""

from __future__ import annotations

import torch


def check_materialised(model: torch.nn.Module) -> None:
    """Refuse a model with offloaded or meta parameters, naming the fix."""
    device_map = getattr(model, "hf_device_map", None) or {}
    offloaded = sorted({str(d) for d in device_map.values() if str(d) in ("disk", "meta")})
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded or meta:
        where = ", ".join(offloaded) or "meta"
        example = meta[0] if meta else next(k for k, d in device_map.items() if str(d) in ("disk", "meta"))
        raise ValueError(
            f"the model has parameters offloaded to {where} (e.g. {example}): offloaded parameters silently "
            "drop out of the autograd graph, so the Hessian would be wrong. Load it fully materialised: give "
            "more memory (max_memory), use more devices, a smaller dtype, or a smaller model."
        )
