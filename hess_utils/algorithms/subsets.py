"""Exact dense Hessians of a few thousand selected scalar parameters (the perplexity paper, sections 4-5).

A subset is a mapping ``{parameter name: entries}`` where ``entries`` is an ``int t`` (the first ``t``
entries of the flattened weight), a ``slice``, or a sequence/tensor of flat indices. The selected scalars
form one vector ``x`` of length ``n``; the loss is evaluated with ``functional_call`` on weights in which
``x`` is scattered into a detached copy of each full weight (no monkey-patching of ``forward``), and

    H[i, j] = d^2 L / dx_i dx_j,        shape (n, n),

is built row by row: one double-backward pass per row and batch, exact in the model's dtype. With
``reduction="sum"`` the Hessians of disjoint batches add up exactly (section 7).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from hess_utils import loss as L
from hess_utils.algorithms._frozen import short_repr
from hess_utils.operators.hessian import check_eval_mode
from hess_utils.operators.kernels import hessian_context
from hess_utils.progress import progress_bar

SUBSET_KINDS = ("layer", "block", "kind", "all")
MAX_SUBSET = 20_000

Entries = int | slice | Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class SubsetHessian:
    """A dense Hessian block.

    Attributes
    ----------
    matrix : torch.Tensor
        ``(n, n)`` symmetric, on CPU, in the model's dtype.
    param_names : tuple[str, ...]
        The parameters the entries come from, in order.
    indices : tuple[torch.Tensor, ...]
        Flat indices into each parameter; ``matrix`` rows follow them parameter after parameter.
    offsets : tuple[int, ...]
        Row where each parameter's entries start (length ``len(param_names) + 1``).
    reduction : str
        ``"mean"`` or ``"sum"`` (see :mod:`hess_utils.loss`).
    num_tokens : int
        Predicted tokens in the batches.
    """

    matrix: torch.Tensor
    param_names: tuple[str, ...]
    indices: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]
    reduction: str
    num_tokens: int

    __repr__ = short_repr

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    def block(self, a: str, b: str | None = None) -> torch.Tensor:
        """The sub-block of rows of parameter ``a`` and columns of parameter ``b`` (default ``a``)."""
        i, j = self.param_names.index(a), self.param_names.index(b or a)
        return self.matrix[self.offsets[i] : self.offsets[i + 1], self.offsets[j] : self.offsets[j + 1]]


def _flat_indices(entries: Entries, numel: int, name: str) -> torch.Tensor:
    if isinstance(entries, bool):
        raise TypeError(f"{name}: entries must be an int, slice or index list, not a bool")
    if isinstance(entries, int):
        if not 0 < entries <= numel:
            raise ValueError(f"{name}: asked for the first {entries} entries of a weight with {numel}")
        return torch.arange(entries)
    if isinstance(entries, slice):
        idx = torch.arange(numel)[entries]
    else:
        idx = torch.as_tensor(entries, dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise ValueError(f"{name}: the selection is empty")
    if int(idx.min()) < 0 or int(idx.max()) >= numel:
        raise ValueError(f"{name}: indices must lie in [0, {numel})")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{name}: indices must be distinct")
    return idx


def subset_hessian(
    model: torch.nn.Module,
    batches: Iterable[L.Batch],
    subset: Mapping[str, Entries],
    reduction: str = "mean",
    progress: bool = True,
) -> SubsetHessian:
    """The exact dense Hessian of the loss with respect to the scalars selected by ``subset``.

    Parameters
    ----------
    model
        A causal LM in eval mode.
    batches
        Dicts with ``input_ids`` ``(b, s)`` (and optionally ``attention_mask``).
    subset
        ``{parameter name: int | slice | indices}``; see the module docstring and :func:`paper_subset`.
    reduction
        ``"mean"`` over all predicted tokens of all batches, or ``"sum"``.
    """
    check_eval_mode(model)
    if reduction not in L.REDUCTIONS:
        raise ValueError(f"reduction must be one of {L.REDUCTIONS}, got {reduction!r}")
    if not subset:
        raise ValueError("empty subset: pass {parameter name: number of leading entries or indices}")
    batches = list(batches)
    if not batches:
        raise ValueError("no batches given")
    named = dict(model.named_parameters())
    unknown = [n for n in subset if n not in named]
    if unknown:
        raise ValueError(f"unknown parameter names {unknown}; names look like {list(named)[:4]}")
    names = list(subset)
    indices = [_flat_indices(subset[n], named[n].numel(), n) for n in names]
    sizes = [int(i.numel()) for i in indices]
    n = sum(sizes)
    if n > MAX_SUBSET:
        raise ValueError(f"subset of {n} scalars: its dense Hessian is too large (limit {MAX_SUBSET})")
    dtype = named[names[0]].dtype
    x0 = torch.cat([named[nm].detach().reshape(-1)[idx.to(named[nm].device)].cpu() for nm, idx in zip(names, indices)])
    num_tokens = L.total_tokens(batches)
    if num_tokens == 0:
        raise ValueError("the batches contain no predicted token")
    device = L.input_device(model)

    def weights_from(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for part, nm, idx in zip(torch.split(x, sizes), names, indices, strict=True):
            p = named[nm]
            flat = p.detach().reshape(-1).index_put((idx.to(p.device),), part.to(p.device))
            out[nm] = flat.reshape(p.shape)
        return out

    H = torch.zeros(n, n, dtype=dtype)
    eye = torch.eye(n, dtype=dtype)
    from torch.func import functional_call

    with hessian_context(model), torch.enable_grad():
        for batch in progress_bar(batches, desc="subset Hessian (batches)", disable=not progress):
            x = x0.clone().requires_grad_(True)
            inputs = {**L.model_inputs(batch, device), "use_cache": False}
            logits = functional_call(model, weights_from(x), args=(), kwargs=inputs).logits
            (g,) = torch.autograd.grad(L.summed_cross_entropy(logits, batch), x, create_graph=True)
            for i in progress_bar(range(n), desc="rows", leave=False, disable=not progress):
                (row,) = torch.autograd.grad(g, x, grad_outputs=eye[i], retain_graph=i < n - 1)
                H[i] += row.detach().cpu()
    if reduction == "mean":
        H /= num_tokens
    H = (H + H.T) / 2  # exact up to rounding; symmetrise the last bits
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    return SubsetHessian(H, tuple(names), tuple(indices), tuple(offsets), reduction, num_tokens)


# --------------------------------------------------------------------------------------- paper subsets
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def linear_weights(model: torch.nn.Module) -> list[tuple[int, str, str]]:
    """``(block index, layer kind, weight name)`` for every linear layer inside the decoder blocks.

    Linear layers are ``torch.nn.Linear`` and transformers' ``Conv1D`` (GPT-2); the layer kind is the module
    path inside its block (``"self_attn.q_proj"``, ``"mlp.c_fc"``). Embeddings and the LM head are not
    inside a block and are left out.
    """
    from transformers.pytorch_utils import Conv1D

    out = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        match = _BLOCK_INDEX.search(f".{mod_name}.")
        if match is None:
            continue
        kind = f".{mod_name}."[match.end() :].strip(".")
        out.append((int(match.group(1)), kind, f"{mod_name}.weight"))
    return out


def paper_subset(
    model: torch.nn.Module, kind: str, num_entries: int, block: int = 0, layer: str | None = None
) -> dict[str, int]:
    """The four subsets of the perplexity paper (section 4), each the first ``num_entries`` of each weight.

    ``kind``: ``"layer"`` one linear layer (``layer``) of one block (``block``); ``"block"`` every linear
    layer of one block; ``"kind"`` one layer kind across all blocks; ``"all"`` every linear layer.
    """
    if kind not in SUBSET_KINDS:
        raise ValueError(f"unknown subset kind {kind!r}; choose one of {SUBSET_KINDS}")
    weights = linear_weights(model)
    if not weights:
        raise ValueError("found no linear layer inside numbered decoder blocks in this model")
    kinds = sorted({k for _, k, _ in weights})
    if kind in ("layer", "kind"):
        layer = layer or kinds[0]
        if layer not in kinds:
            raise ValueError(f"unknown layer kind {layer!r}; this model has {kinds}")
    chosen = [
        name
        for b, k, name in weights
        if (kind == "layer" and b == block and k == layer)
        or (kind == "block" and b == block)
        or (kind == "kind" and k == layer)
        or kind == "all"
    ]
    if not chosen:
        raise ValueError(f"no linear layer in block {block}; blocks are {sorted({b for b, _, _ in weights})}")
    return {name: num_entries for name in chosen}
