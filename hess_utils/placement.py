"""Model parallelism with accelerate's ``device_map``: what must hold for exact Hessians.

A model loaded with ``device_map="auto"`` (or an explicit map) keeps each parameter on its device and
accelerate's hooks move activations between devices; double backward runs through those hooks, so
:class:`~hess_utils.operators.hessian.HessianOperator` works unchanged, with vector blocks living where their
parameters live and reductions accumulated in float64 on the first block's device. What does *not* work is
offload: parameters kept on ``"disk"`` or ``"meta"``, or CPU-offloaded by hooks that copy weights in for each
forward (accelerate does this to the ``"cpu"`` entries of a map whose main device is a GPU), are not leaves of
the autograd graph and silently drop out of it. Such parameters sit on the meta device, which is what
:func:`check_materialised` looks for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

OFFLOAD_DEVICES = ("disk", "meta")


def validate_device_map(device_map: Any) -> None:
    """Refuse a device map (requested, or a loaded model's ``hf_device_map``) that offloads to disk or meta.

    Raises
    ------
    ValueError
        If any module is placed on ``"disk"`` or ``"meta"``, naming the modules and the fix.
    """
    if device_map is None:
        return
    if isinstance(device_map, Mapping):
        bad = {k: v for k, v in device_map.items() if str(v) in OFFLOAD_DEVICES}
    else:
        bad = {"": device_map} if str(device_map) in OFFLOAD_DEVICES else {}
    if bad:
        shown = ", ".join(f"{k or '<whole model>'!r}: {v!r}" for k, v in list(bad.items())[:8])
        raise ValueError(
            f"parameters are offloaded to disk/meta ({shown}{', ...' if len(bad) > 8 else ''}). Offloaded "
            "parameters are materialised by accelerate hooks only for the duration of each forward, so they "
            "silently drop out of the autograd graph: their gradients, Hessian-vector products and Hessian "
            "blocks would be missing or zero. Fix: give the devices more memory (max_memory), use more "
            "devices or device_map=None (everything on one device), or load a smaller model or lower dtype."
        )


def check_materialised(model: torch.nn.Module) -> None:
    """Refuse a model any of whose parameters or buffers is offloaded (``hf_device_map`` or meta tensors).

    Raises
    ------
    ValueError
        If ``model.hf_device_map`` contains ``"disk"``/``"meta"``, or a parameter or buffer is on meta.
    """
    validate_device_map(getattr(model, "hf_device_map", None))
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if meta:
        validate_device_map({n: "meta" for n in meta})
