"""The loss whose Hessian we study: token-weighted causal-LM cross-entropy, computed from the logits.

For batches ``b = 1..B`` with predicted-token sets ``T_b`` (every position but the last, padding excluded),

    L(w) = (1 / N) * sum_b sum_{t in T_b} -log softmax(logits_b(w))[t, y_t],     N = sum_b |T_b|

(``reduction="mean"``, the mean over all tokens of all batches, not a mean of batch means), or the same
without ``1 / N`` (``reduction="sum"``, the additive form of the perplexity paper, section 7, for which the
Hessians of disjoint batches add up exactly).

We compute the cross-entropy ourselves rather than through ``labels=``: transformers upcasts logits to
float32 there, which caps float64 work at about 1e-5 relative accuracy. Half-precision logits are upcast to
float32; float32 and float64 logits keep their dtype.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")

Batch = Mapping[str, torch.Tensor]


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a batch must be on: that of the input embeddings (first device of a device map)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def targets_and_mask(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets ``(b, s-1)`` and a float mask of predicted positions ``(b, s-1)``.

    A position is predicted when its target is not padding (``attention_mask`` 0) and not ``-100`` in an
    explicit ``labels`` tensor.
    """
    input_ids = batch["input_ids"]
    labels = batch.get("labels", input_ids)
    targets = labels[:, 1:]
    mask = targets != -100
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        mask = mask & batch["attention_mask"][:, 1:].bool()
    return targets.clamp_min(0), mask


def count_tokens(batch: Batch) -> int:
    """Number of predicted tokens in a batch (the weight of the batch in the mean loss)."""
    _, mask = targets_and_mask(batch)
    return int(mask.sum())


def total_tokens(batches: Iterable[Batch]) -> int:
    """Number of predicted tokens over all batches (``N`` above)."""
    return sum(count_tokens(b) for b in batches)


def summed_cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum over predicted positions of ``-log p(y_t)`` for logits of shape ``(b, s, vocab)``."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets, mask = targets_and_mask(batch)
    targets, mask = targets.to(logits.device), mask.to(logits.device)
    shifted = logits[:, :-1, :]
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll * mask.reshape(-1).to(nll.dtype)).sum()


def model_inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The keyword arguments for the model's forward, on ``device`` (labels are never passed)."""
    inputs = {"input_ids": batch["input_ids"].to(device)}
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    return inputs


def output_device(model: torch.nn.Module) -> torch.device:
    """The device of the output head (last device of a device map), where the logits are made."""
    try:
        return model.get_output_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return input_device(model)


# Model classes whose forward refused a boolean ``logits_to_keep`` (remote code, older architectures).
_NO_ROW_LOGITS: set[type] = set()


def _predicted_rows(model: torch.nn.Module, batch: Batch, mask: torch.Tensor) -> torch.Tensor | None:
    """Logits ``(n, vocab)`` of the ``n`` predicted positions only, or None where the model cannot.

    transformers' causal LMs take ``logits_to_keep``, a boolean ``(b, s)`` tensor that selects hidden states
    before the output head. Skipping the head on unpredicted positions (the last one, padding) saves the
    full ``(b, s, vocab)`` logits, their shifted copy and its zero-padded gradient: the largest tensors of
    the graph for a big vocabulary, kept twice over when Hessian-vector products keep the graph.
    """
    if type(model) in _NO_ROW_LOGITS:
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "logits_to_keep" not in params:
        _NO_ROW_LOGITS.add(type(model))
        return None
    keep = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1).to(output_device(model))
    try:
        logits = model(**model_inputs(batch, input_device(model)), use_cache=False, logits_to_keep=keep).logits
    except torch.OutOfMemoryError:
        raise  # a memory shortage says nothing about the model's support; callers handle it
    except (TypeError, IndexError, RuntimeError):
        _NO_ROW_LOGITS.add(type(model))  # a forward of its own that slices differently: the plain path
        return None
    if logits.ndim != 2 or logits.shape[0] != int(mask.sum()):
        _NO_ROW_LOGITS.add(type(model))
        return None
    return logits


def batch_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy of one batch (a scalar tensor with graph).

    The output head runs on the predicted positions only where the model allows it (:func:`_predicted_rows`);
    the loss is the same sum either way.
    """
    targets, mask = targets_and_mask(batch)
    rows = _predicted_rows(model, batch, mask)
    if rows is not None:
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()
        return F.cross_entropy(rows, targets[mask].to(rows.device), reduction="sum")
    logits = model(**model_inputs(batch, input_device(model)), use_cache=False).logits
    return summed_cross_entropy(logits, batch)


def lm_loss(model: torch.nn.Module, batches: Iterable[Batch], reduction: str = "mean") -> torch.Tensor:
    """``L(w)`` over all batches, as defined in the module docstring (graph kept; use under no_grad to save)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    batches = list(batches)
    total = sum(batch_loss_sum(model, b) for b in batches)
    if reduction == "sum":
        return total
    n = total_tokens(batches)
    if n == 0:
        raise ValueError("the batches contain no predicted token (all padding, or sequences of length 1)")
    return total / n
