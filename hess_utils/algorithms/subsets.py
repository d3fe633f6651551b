"""Exact dense Hessians of a few thousand selected scalar parameters (the perplexity paper, sections 4-5).

A subset is a mapping ``{parameter name: entries}`` where ``entries`` is an ``int t`` (the first ``t``
entries of the flattened weight), a ``slice``, or a sequence/tensor of flat indices. The selected scalars
form one vector ``x`` of length ``n``, and

    H[i, j] = d^2 L / dx_i dx_j,        shape (n, n),

is built column by column from the Hessian operator: column ``j`` is the product ``H e_j`` read at the
selected rows (one product per selected scalar, exact in the operator's method and dtype, on every engine).
With ``reduction="sum"`` the Hessians of disjoint batches add up exactly (section 7).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from hess_utils._memory import holds_freed_memory
from hess_utils.algorithms._frozen import short_repr
from hess_utils.operators.base import SymmetricOperator
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


@holds_freed_memory
def subset_hessian(op: SymmetricOperator, subset: Mapping[str, Entries], progress: bool = True) -> SubsetHessian:
    """The exact dense Hessian of ``op`` restricted to the scalars selected by ``subset``.

    Column ``j`` is ``H e_j`` (one product with ``op``) read at the selected rows, so the block is exact in the
    operator's method and dtype, on any engine, at one product per selected scalar.

    Parameters
    ----------
    op
        The Hessian operator (e.g. ``hessian_operator(model, batches, params=list(subset))``); every name of
        ``subset`` must be one of its parameters (``op.param_names``). Its reduction (mean over the
        predicted tokens, or their sum) is the block's.
    subset
        ``{parameter name: int | slice | indices}``; see the module docstring and :func:`paper_subset`.
    progress
        Show a progress bar over the columns.

    Returns
    -------
    SubsetHessian
        ``matrix`` of shape ``(n, n)``, ``n`` the number of selected scalars, symmetrised (the two triangles
        agree to rounding), on the CPU in the operator's dtype.
    """
    if not subset:
        raise ValueError("empty subset: pass {parameter name: number of leading entries or indices}")
    position = {name: i for i, name in enumerate(op.param_names)}
    unknown = [n for n in subset if n not in position]
    if unknown:
        raise ValueError(f"parameter names {unknown} are not parameters of the operator (its names look like "
                         f"{list(op.param_names)[:4]}); build it with hessian_operator(model, batches, "
                         "params=list(subset))")
    names = list(subset)
    blocks = [position[n] for n in names]
    indices = [_flat_indices(subset[n], math.prod(op.shapes[b]), n) for n, b in zip(names, blocks, strict=True)]
    sizes = [int(i.numel()) for i in indices]
    n = sum(sizes)
    if n > MAX_SUBSET:
        raise ValueError(f"subset of {n} scalars: its dense Hessian is too large (limit {MAX_SUBSET})")
    H = torch.zeros(n, n, dtype=op.dtypes[blocks[0]])
    columns = [(b, int(i)) for b, idx in zip(blocks, indices, strict=True) for i in idx.tolist()]
    e = op.zeros()  # one basis vector, its 1 moved from column to column (no allocation per column)
    for j, (block, flat) in enumerate(progress_bar(columns, desc="subset Hessian (columns)", disable=not progress)):
        e[block].view(-1)[flat] = 1
        hv = op.matvec(e)
        e[block].view(-1)[flat] = 0
        H[:, j] = torch.cat([hv[b].reshape(-1)[idx.to(hv[b].device)].cpu().to(H.dtype)
                             for b, idx in zip(blocks, indices, strict=True)])
    H = (H + H.T) / 2  # exact up to rounding; symmetrise the last bits
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return SubsetHessian(H, tuple(names), tuple(indices), tuple(offsets), op.reduction, int(op.num_tokens))


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
