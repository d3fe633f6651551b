"""The loss whose Hessian we study: token-weighted causal-LM cross-entropy, computed from the logits.

For batches ``b = 1..B`` with predicted-token sets ``T_b`` (every position but the last, padding excluded),

    L(w) = (1 / N) * sum_b sum_{t in T_b} -log softmax(logits_b(w))[t, y_t],     N = sum_b |T_b|

(``reduction="mean"``, the mean over all tokens of all batches, not a mean of batch means), or the same
without ``1 / N`` (``reduction="sum"``, the additive form of the perplexity paper, section 7, for which the
Hessians of disjoint batches add up exactly).

We compute the cross-entropy ourselves rather than through ``labels=``: transformers upcasts logits to
float32 there, which caps float64 work at about 1e-5 relative accuracy. Half-precision logits are upcast to
float32; float32 and float64 logits keep their dtype. :func:`batch_loss_sum` goes through
:func:`cross_entropy_sum`, whose first-order graph is cheaper to differentiate again than
``F.cross_entropy``'s (Hessian-vector products: one fused softmax backward over the logits instead of about
seven passes, and only the probabilities kept); :func:`summed_cross_entropy` is the plain formula, used by
the forward-mode path and as the reference in tests.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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


class _CrossEntropySum(torch.autograd.Function):
    """``sum_t -log p_t[y_t]`` of logits ``z`` ``(n, vocab)`` with ``p = softmax(z)`` given, built by autograd.

    The value is ``-log p[y]`` (``logsumexp(z) - z[y]`` on the rare rows where ``p[y]`` is too small for its
    logarithm to keep full precision). The gradient ``dL/dz = g (p - onehot(y))`` is returned for ``z`` and
    none for ``p``: that is the exact gradient, and when it is built with ``create_graph=True`` its
    dependence on ``z`` runs through ``p``'s own softmax node. Differentiating it again (Hessian-vector
    products) then costs one multiplication and one fused softmax backward on the ``(n, vocab)`` tensors,
    where ``F.cross_entropy``'s log-softmax double backward recomputes exponentials and takes about seven
    passes; and the graph keeps ``p`` but neither the logits nor the log-probabilities. Every order of
    derivative stays exact (the backward is written in differentiable operations).
    """

    @staticmethod
    def forward(logits: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        picked = probs.gather(1, targets[:, None]).squeeze(1)
        # Below tiny / eps, -log p[y] loses relative precision to subnormal rounding: recompute exactly.
        fragile = picked < torch.finfo(probs.dtype).tiny / torch.finfo(probs.dtype).eps
        nll = -torch.log(picked)
        if bool(fragile.any()):
            rows = fragile.nonzero().squeeze(1)
            exact = torch.logsumexp(logits[rows], dim=1) - logits[rows, targets[rows]]
            nll = nll.index_put((rows,), exact)
        return nll.sum()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, probs, targets = inputs
        ctx.save_for_backward(probs, targets)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, targets = ctx.saved_tensors
        rows = torch.arange(probs.shape[0], device=probs.device)
        if not _is_constant_one(grad_loss):
            grad = probs * grad_loss
            return grad.index_put_((rows, targets), -grad_loss.expand(rows.shape), accumulate=True), None, None
        # The usual seed 1 (autograd.grad of the loss): no scaling pass here nor in the double backward.
        minus_one = torch.full(rows.shape, -1.0, dtype=probs.dtype, device=probs.device)
        return probs.index_put((rows, targets), minus_one, accumulate=True), None, None


def _is_constant_one(t: torch.Tensor) -> bool:
    """True for the seed ``1`` that needs no gradient (False under torch.func transforms, which hide values)."""
    if t.requires_grad or t.numel() != 1:
        return False
    try:
        return float(t) == 1.0
    except (RuntimeError, ValueError):
        return False


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum_t -log softmax(logits_t)[targets_t]`` for logits ``(n, vocab)`` and targets ``(n,)``.

    The same number as ``F.cross_entropy(logits, targets, reduction="sum")`` with a graph that is cheaper
    to differentiate twice (:class:`_CrossEntropySum`). Half-precision logits are upcast to float32.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = targets.to(logits.device)
    return _CrossEntropySum.apply(logits, torch.softmax(logits, dim=-1), targets)


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


@dataclass
class RowLogits:
    """Whether a model's forward computes the logits of the predicted positions only (``logits_to_keep``).

    An operator holds one for its model, so the choice is visible (``enabled``, ``reason``) and made once:
    ``enabled`` starts as "the forward takes ``logits_to_keep``" and turns off, with a warning, the first time
    such a forward fails or returns logits of another shape (remote code, older architectures); every later
    loss of that operator then computes the full logits. Nothing is remembered across operators or models.
    """

    enabled: bool
    reason: str = ""

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> RowLogits:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "logits_to_keep" in params:
            return cls(True)
        return cls(False, f"{type(model).__name__}.forward takes no logits_to_keep")

    def disable(self, model: torch.nn.Module, why: str) -> None:
        self.enabled, self.reason = False, why
        warnings.warn(
            f"{type(model).__name__}: the output head cannot run on the predicted positions only ({why}); "
            "every later loss of this operator computes the full (batch, seq, vocab) logits (more memory, "
            "same numbers)", stacklevel=4)


def _predicted_rows(model: torch.nn.Module, batch: Batch, mask: torch.Tensor, policy: RowLogits) -> torch.Tensor | None:
    """Logits ``(n, vocab)`` of the ``n`` predicted positions only, or None where the model cannot.

    transformers' causal LMs take ``logits_to_keep``, a boolean ``(b, s)`` tensor that selects hidden states
    before the output head. Skipping the head on unpredicted positions (the last one, padding) saves the
    full ``(b, s, vocab)`` logits, their shifted copy and its zero-padded gradient: the largest tensors of
    the graph for a big vocabulary, kept twice over when Hessian-vector products keep the graph.
    """
    if not policy.enabled:
        return None
    keep = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1).to(output_device(model))
    try:
        logits = model(**model_inputs(batch, input_device(model)), use_cache=False, logits_to_keep=keep).logits
    except torch.OutOfMemoryError:
        raise  # a memory shortage says nothing about the model's support; callers handle it
    except (TypeError, IndexError, RuntimeError) as err:  # a forward of its own that slices differently
        policy.disable(model, f"a boolean logits_to_keep raised {type(err).__name__}: {str(err)[:200]}")
        return None
    if logits.ndim != 2 or logits.shape[0] != int(mask.sum()):
        policy.disable(model, f"a boolean logits_to_keep returned logits of shape {tuple(logits.shape)}")
        return None
    return logits


def batch_loss_sum(model: torch.nn.Module, batch: Batch, row_logits: RowLogits | None = None) -> torch.Tensor:
    """Summed cross-entropy of one batch (a scalar tensor with graph).

    The output head runs on the predicted positions only where the model allows it (:func:`_predicted_rows`;
    ``row_logits`` is the caller's :class:`RowLogits`, a fresh one per call if None); the loss is the same
    sum either way.
    """
    targets, mask = targets_and_mask(batch)
    policy = row_logits if row_logits is not None else RowLogits.for_model(model)
    with warnings.catch_warnings():
        if row_logits is None:  # nothing is kept from this call: no warning to act on
            warnings.simplefilter("ignore")
        rows = _predicted_rows(model, batch, mask, policy)
    if rows is None:
        logits = model(**model_inputs(batch, input_device(model)), use_cache=False).logits
        rows = logits[:, :-1, :][mask.to(logits.device)]
    return cross_entropy_sum(rows, targets[mask])


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
