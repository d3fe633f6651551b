"""Where a direction of parameter space lives: its mass per tensor, layer, module kind or attention head.

For a vector :math:`v` laid out like ``op.zeros()`` (an eigenvector of the Hessian, a gradient, a solve),
the *mass* of a set :math:`S` of entries is

.. math::

    m(S) = \\frac{\\sum_{i \\in S} v_i^2}{\\sum_i v_i^2},

so the masses of a partition of the entries sum to 1, and the mass of a unit vector is the squared norm of
its restriction to :math:`S`. Every square is formed and summed in float64 (a bfloat16 square alone would
carry a relative error of ``4e-3``).

The partitions:

* :func:`mass_by_tensor`: one group per parameter tensor.
* :func:`mass_by_group`: Hugging Face parameter names parsed by :func:`parse_parameter_name` into a layer
  index and a module kind (``embedding``, ``attention``, ``mlp``, ``norm``, ``head``, ``other``), grouped by
  layer, by ``(layer, kind)``, or with the attention projections further split into heads.

:func:`gradient_overlap` measures how much of a gradient lies in the span of a few eigenvectors, and
:func:`plot_mass_heatmap` draws a layers x module kinds map of one vector's mass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from hess_utils import vectors as V

KINDS = ("embedding", "attention", "mlp", "norm", "head", "other")
GROUP_BY = ("layer", "module", "head")
PARTS = ("q", "k", "v", "o")

# Leaf module names (the component before ``.weight``/``.bias``) that decide the kind on their own.
_HEAD_LEAVES = {"lm_head", "embed_out"}
_EMBEDDING_LEAVES = {"wte", "wpe"}
_ATTENTION_CONTAINER = re.compile(r"attn|attention")
_MLP_CONTAINERS = {"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "experts"}
_MLP_LEAVES = {"fc1", "fc2", "fc_in", "fc_out", "c_fc", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
               "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3"}
_NORM_LEAF = re.compile(r".*norm.*|ln(_.*)?")

# Separate projections of the query/key/value heads and of the attention output, by leaf name.
_SEPARATE_QKV = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
_OUTPUT_LEAVES = {"o_proj", "out_proj", "dense"}
# Families whose fused ``query_key_value`` rows are interleaved per head, ``(heads, 3, head_dim)``.
_INTERLEAVED_QKV = {"gpt_neox", "bloom"}
# Families whose attention matrices are GPT-2 ``Conv1D`` weights, stored transposed: ``(in, out)``.
_CONV1D = {"gpt2"}

# A unit vector whose part orthogonal to the previous ones has a squared norm below this (an angle under
# 1e-6 to their span) is taken as dependent on them: its share of the gradient would be rounding, not signal.
_GRAM_RCOND = 1e-12


# ---------------------------------------------------------------------------------------------- names
@dataclass(frozen=True)
class ParameterName:
    """A parsed Hugging Face parameter name.

    Attributes
    ----------
    name : str
        The full name, e.g. ``"model.layers.3.self_attn.q_proj.weight"``.
    layer : int or None
        The decoder block index (the first all-digit component of the name), None outside the blocks.
    kind : str
        One of :data:`KINDS`.
    module : str
        The leaf module name (``"q_proj"``, ``"c_attn"``, ``"ln_1"``; empty for a bare parameter).
    attribute : str
        The parameter's own name, usually ``"weight"`` or ``"bias"``.
    """

    name: str
    layer: int | None
    kind: str
    module: str
    attribute: str


def parse_parameter_name(name: str) -> ParameterName:
    """Layer index and module kind of a Hugging Face parameter name.

    The layer is the first all-digit component (``layers.3``, ``h.0``, ``decoder.layers.1``): the blocks
    of every decoder-only family are a ``ModuleList``, whose children are named by their index, and
    nothing before them is. The kind comes from the leaf module name, then from the containers inside the
    block, in this order:

    ``norm``
        a leaf containing ``norm`` or named ``ln``/``ln_*`` (``ln_1``, ``ln_f``, ``input_layernorm``,
        ``q_norm``, ``word_embeddings_layernorm``): a norm's parameters are scales and shifts, whatever
        module holds them.
    ``head``
        ``lm_head`` or ``embed_out`` outside the blocks (a tied head is the embedding and appears once).
    ``embedding``
        a leaf containing ``embed`` or named ``wte``/``wpe``.
    ``attention``
        inside a container whose name contains ``attn`` or ``attention`` (``self_attn``, ``attn``,
        ``attention``, ``self_attention``).
    ``mlp``
        inside ``mlp``/``feed_forward``/``ffn``/``experts``..., or a leaf such as ``fc1``, ``c_fc``,
        ``gate_proj``, ``dense_h_to_4h`` (OPT's ``fc1``/``fc2`` hang directly off the block).
    ``other``
        anything else.
    """
    parts = name.split(".")
    attribute = parts[-1]
    path = parts[:-1]
    layer = None
    for i, part in enumerate(path):
        if part.isdigit():
            layer = int(part)
            path = path[i + 1:]
            break
    module = path[-1] if path else ""
    containers = path[:-1]
    if _NORM_LEAF.fullmatch(module):
        kind = "norm"
    elif layer is None and module in _HEAD_LEAVES:
        kind = "head"
    elif "embed" in module or module in _EMBEDDING_LEAVES:
        kind = "embedding"
    elif any(_ATTENTION_CONTAINER.search(c) for c in containers) or module in {*_SEPARATE_QKV, "c_attn",
                                                                               "query_key_value", "qkv_proj"}:
        kind = "attention"
    elif any(c in _MLP_CONTAINERS for c in containers) or module in _MLP_LEAVES:
        kind = "mlp"
    else:
        kind = "other"
    return ParameterName(name=name, layer=layer, kind=kind, module=module, attribute=attribute)


# ---------------------------------------------------------------------------------------------- blocks
def _layout(op: Any) -> tuple[list[str], list[tuple[int, ...]]]:
    """``(param_names, shapes)`` of an operator (anything with those two attributes)."""
    try:
        names, shapes = list(op.param_names), [tuple(int(x) for x in s) for s in op.shapes]
    except AttributeError as err:
        raise TypeError(
            f"expected an operator with param_names and shapes (e.g. hessian_operator(...)), got {type(op).__name__}"
        ) from err
    return names, shapes


def _blocks(op: Any, vector: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The blocks of ``vector`` in the operator's order, shapes checked (a dict is read by parameter name)."""
    names, shapes = _layout(op)
    if isinstance(vector, torch.Tensor):
        raise TypeError("vectors are lists of tensors, one per parameter (like op.zeros()), or dicts name -> tensor")
    if isinstance(vector, Mapping):
        missing = [n for n in names if n not in vector]
        if missing:
            raise ValueError(f"the vector has no block for {missing[0]!r} ({len(missing)} parameters missing)")
        vector = [vector[n] for n in names]
    blocks = list(vector)
    if len(blocks) != len(names):
        raise ValueError(f"the vector has {len(blocks)} blocks but the operator has {len(names)} parameters")
    for name, block, shape in zip(names, blocks, shapes, strict=True):
        if tuple(block.shape) != shape:
            raise ValueError(f"block {name!r}: shape {tuple(block.shape)} but the parameter is {shape}")
    return [b.detach() for b in blocks]


def _square_sums(blocks: Sequence[torch.Tensor]) -> np.ndarray:
    """``sum(b^2)`` of every block in float64 (chunked conversion, see :func:`hess_utils.vectors.dot`)."""
    return np.array([V.dot([b], [b]) if b.numel() else 0.0 for b in blocks], dtype=np.float64)


def _total(sums: np.ndarray) -> float:
    total = float(sums.sum())
    if not (total > 0 and math.isfinite(total)):
        raise ValueError(f"the vector's squared norm is {total}: mass is defined for finite nonzero vectors only")
    return total


def mass_by_tensor(op: Any, vector: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Share of ``||v||^2`` in each parameter tensor.

    Parameters
    ----------
    op : SymmetricOperator
        Gives the parameter names and shapes (``op.param_names``, ``op.shapes``).
    vector : list of tensors, or dict name -> tensor
        Laid out like ``op.zeros()`` (any dtype and device per block), or keyed by parameter name (as in
        the CLI's ``eigenvectors.pt``).

    Returns
    -------
    pandas.DataFrame
        One row per parameter, in the operator's order: ``param_name``, ``numel``, ``mass``
        (``sum v_i^2`` over the tensor / ``sum v_i^2`` over all, float64; sums to 1).

    Raises
    ------
    ValueError
        For blocks that do not fit the operator, or a zero or non-finite vector.
    """
    names, shapes = _layout(op)
    sums = _square_sums(_blocks(op, vector))
    total = _total(sums)
    return pd.DataFrame({
        "param_name": names,
        "numel": [math.prod(s) for s in shapes],
        "mass": sums / total,
    })


# ---------------------------------------------------------------------------------------------- heads
def _config_value(config: Any, *names: str) -> Any:
    """The first attribute (or key) of ``config`` among ``names`` that is set, else None."""
    for n in names:
        value = config.get(n) if isinstance(config, Mapping) else getattr(config, n, None)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class _Heads:
    """The head geometry of a model config: query heads, key/value heads, head size, model type."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str

    @classmethod
    def from_config(cls, config: Any) -> _Heads:
        if config is None:
            raise ValueError("by='head' needs the model config (mass_by_group(..., config=model.config)) to know "
                             "the number of heads and their size")
        if not isinstance(config, Mapping) and hasattr(config, "config") and not hasattr(config, "model_type"):
            config = config.config  # a model was passed
        heads = _config_value(config, "num_attention_heads", "n_head")
        hidden = _config_value(config, "hidden_size", "n_embd")
        if heads is None:
            raise ValueError("the config has no num_attention_heads (or n_head): cannot split attention into heads")
        kv = _config_value(config, "num_key_value_heads") or heads
        head_dim = _config_value(config, "head_dim")
        if head_dim is None:
            if hidden is None:
                raise ValueError("the config has neither head_dim nor hidden_size: cannot size the heads")
            head_dim = int(hidden) // int(heads)
        return cls(int(heads), int(kv), int(head_dim), str(_config_value(config, "model_type") or ""))


def _unsupported(name: str, heads: _Heads, why: str) -> ValueError:
    return ValueError(
        f"by='head' does not support {name!r} (model_type {heads.model_type or 'unknown'!r}): {why}. Supported "
        "layouts: separate q_proj/k_proj/v_proj with o_proj/out_proj/dense (Llama, Qwen, Mistral, OPT, ...), "
        "GPT-2's fused Conv1D c_attn and c_proj, GPT-NeoX/Bloom's interleaved query_key_value; use "
        "by='module' for this model"
    )


def _expect(info: ParameterName, sq: torch.Tensor, dim: int, size: int, heads: _Heads, layout: str) -> None:
    """Refuse a tensor whose dimension ``dim`` is not ``size`` (the layout does not fit the config)."""
    if sq.ndim == 0 or sq.ndim <= dim or sq.shape[dim] != size:
        raise _unsupported(info.name, heads, f"its shape {tuple(sq.shape)} does not fit the {layout} layout "
                                             f"(dimension {dim} of size {size} for {heads.num_heads} heads, "
                                             f"{heads.num_kv_heads} key/value heads, head size {heads.head_dim})")


def _split_heads(info: ParameterName, sq: torch.Tensor, heads: _Heads) -> list[tuple[str, int | None, float]]:
    """``[(part, head or None, sum of squares)]`` of one attention parameter; ``sq`` its float64 squares.

    The layouts (``H`` query heads, ``K`` key/value heads, ``d`` the head size, ``n`` the hidden size;
    all tensors row-major):

    Separate projections (``nn.Linear``, weight ``(out, in)``, ``y = x W^T + b``)
        ``q_proj.weight (H d, n)``: rows ``h d .. (h+1) d - 1`` make head ``h``'s query; ``k_proj`` and
        ``v_proj`` ``(K d, n)`` likewise per key/value head (with grouped-query attention, key/value head
        ``j`` serves query heads ``j H/K .. (j+1) H/K - 1``); biases split like the rows.
        ``o_proj``/``out_proj``/``dense`` ``.weight (n, H d)``: columns ``h d .. (h+1) d - 1`` read head
        ``h``'s output; the output bias belongs to no head (part ``o``, head None).
    GPT-2 (``Conv1D``, weight ``(in, out)``, ``y = x W + b``)
        ``c_attn.weight (n, 3 H d)``: columns ``[q | k | v]``, each ``H d`` wide and split into heads of
        ``d`` columns, i.e. the columns viewed as ``(3, H, d)``; ``c_attn.bias (3 H d,)`` the same.
        ``c_proj.weight (H d, n)``: rows by head (the input side); its bias belongs to no head.
    GPT-NeoX, Bloom (``nn.Linear``)
        ``query_key_value.weight (3 H d, n)``: rows viewed as ``(H, 3, d)``, i.e. head ``h`` owns rows
        ``3 h d .. 3 (h+1) d - 1``, its query first, then its key, then its value; the bias alike.
        ``dense`` is an output projection as above.
    """
    H, K, d = heads.num_heads, heads.num_kv_heads, heads.head_dim
    module, is_bias = info.module, info.attribute == "bias"
    conv1d = heads.model_type in _CONV1D
    if module in _SEPARATE_QKV:
        part = _SEPARATE_QKV[module]
        n = H if part == "q" else K
        _expect(info, sq, 0, n * d, heads, "rows-by-head")
        return [(part, h, float(s)) for h, s in enumerate(sq.reshape(n, -1).sum(1))]
    if module == "c_attn" and conv1d:
        _expect(info, sq, -1, 3 * H * d, heads, "GPT-2 c_attn (columns q|k|v)")
        sums = sq.reshape(-1, 3, H, d).sum((0, 3))  # (3, H)
        return [(p, h, float(sums[i, h])) for i, p in enumerate("qkv") for h in range(H)]
    if module == "query_key_value" and heads.model_type in _INTERLEAVED_QKV:
        _expect(info, sq, 0, 3 * H * d, heads, "interleaved (heads, 3, head_dim) rows")
        sums = sq.reshape(H, 3, -1).sum(-1)  # (H, 3)
        return [(p, h, float(sums[h, i])) for i, p in enumerate("qkv") for h in range(H)]
    if module in _OUTPUT_LEAVES or (module == "c_proj" and conv1d):
        if is_bias:  # added after the heads are summed: it belongs to none of them
            return [("o", None, float(sq.sum()))]
        if conv1d:  # Conv1D (H d, n): the heads are the input side, the rows
            _expect(info, sq, 0, H * d, heads, "GPT-2 c_proj (rows by head)")
            return [("o", h, float(s)) for h, s in enumerate(sq.reshape(H, -1).sum(1))]
        _expect(info, sq, 1, H * d, heads, "output projection (columns by head)")
        sums = sq.reshape(sq.shape[0], H, d).sum((0, 2))
        return [("o", h, float(s)) for h, s in enumerate(sums)]
    raise _unsupported(info.name, heads, f"no known head layout for the module {module!r}")


# ---------------------------------------------------------------------------------------------- groups
def _sort_key(row: dict[str, Any]) -> tuple:
    """Embeddings first, then the blocks in order, then what follows them (final norm, head)."""
    layer = row["layer"]
    place = 1 if layer is not None else (0 if row.get("kind") == "embedding" else 2)
    kind = KINDS.index(row["kind"]) if "kind" in row else 0
    part = row.get("part")
    head = row.get("head")
    return (place, -1 if layer is None else layer, kind, -1 if part is None else PARTS.index(part),
            -1 if head is None else head)


def _label(row: dict[str, Any]) -> str:
    bits = [] if row["layer"] is None else [f"layer.{row['layer']}"]
    if "kind" in row:
        bits.append(row["kind"])
    if row.get("part") is not None:
        bits.append(row["part"])
    if row.get("head") is not None:
        bits.append(f"head{row['head']}")
    return ".".join(bits)


def mass_by_group(
    op: Any,
    vector: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    by: str = "layer",
    config: Any = None,
) -> pd.DataFrame:
    """Share of ``||v||^2`` per layer, per ``(layer, module kind)``, or per attention head.

    Parameters are sorted into groups by :func:`parse_parameter_name`. Outside the decoder blocks (token
    and position embeddings, the final norm, an untied output head) there is no layer, so those parameters
    are grouped by their kind alone, in every mode.

    Parameters
    ----------
    op : SymmetricOperator
        Gives the parameter names and shapes.
    vector : list of tensors, or dict name -> tensor
        As in :func:`mass_by_tensor`.
    by : {"layer", "module", "head"}
        ``"layer"``: one row per block (and one per kind outside the blocks). ``"module"``: one row per
        ``(layer, kind)``, the input of :func:`plot_mass_heatmap`. ``"head"``: as ``"module"``, with each
        layer's attention row replaced by one row per ``(part, head)``, ``part`` in ``q, k, v, o`` (``k``
        and ``v`` counted per key/value head), plus a ``(o, None)`` row for the output bias; the layouts
        are documented in :func:`_split_heads`.
    config : transformers config, dict or model, optional
        Needed for ``by="head"``: ``num_attention_heads``, ``num_key_value_heads`` (default: the same),
        ``head_dim`` (default ``hidden_size // num_attention_heads``) and ``model_type`` (which tells GPT-2's
        transposed ``Conv1D`` and NeoX's interleaved ``query_key_value`` apart from look-alikes).

    Returns
    -------
    pandas.DataFrame
        Columns ``group`` (a label such as ``"layer.3.attention.q.head1"`` or ``"embedding"``), ``layer``
        (nullable ``Int64``: missing outside the blocks), then ``kind`` (modes ``"module"`` and ``"head"``),
        ``part`` and ``head`` (mode ``"head"``; ``head`` nullable ``Int64``, ``part`` None outside the
        attention projections), then ``numel`` and ``mass`` (float64, summing to 1). Rows: embeddings, the
        blocks in order, then the rest.

    Raises
    ------
    ValueError
        For an unknown ``by``; for ``by="head"`` without a config, or with an attention parameter whose
        layout is not one of the above (naming it: e.g. Falcon's multi-query ``query_key_value``, Phi-3's
        and CodeGen's ``qkv_proj``, GPT-BigCode's ``c_attn``); as :func:`mass_by_tensor` for the vector.
    """
    if by not in GROUP_BY:
        raise ValueError(f"by must be one of {GROUP_BY}, got {by!r}")
    heads = _Heads.from_config(config) if by == "head" else None
    names, shapes = _layout(op)
    blocks = _blocks(op, vector)
    sums = _square_sums(blocks)
    total = _total(sums)
    groups: dict[tuple, dict[str, Any]] = {}

    def add(key_fields: dict[str, Any], numel: int, squares: float) -> None:
        key = tuple(key_fields.values())
        row = groups.setdefault(key, {**key_fields, "numel": 0, "sq": 0.0})
        row["numel"] += numel
        row["sq"] += squares

    for name, shape, block, sq_sum in zip(names, shapes, blocks, sums, strict=True):
        info = parse_parameter_name(name)
        numel = math.prod(shape)
        if by == "layer":
            add({"layer": info.layer} if info.layer is not None else {"layer": None, "kind": info.kind},
                numel, float(sq_sum))
            continue
        base = {"layer": info.layer, "kind": info.kind}
        if by == "module" or info.kind != "attention" or info.layer is None:
            add({**base, "part": None, "head": None} if by == "head" else base, numel, float(sq_sum))
            continue
        # The whole projection in float64 at once: attention matrices are hidden x hidden, not vocab-sized.
        squares = block.to(torch.float64).square()
        pieces = _split_heads(info, squares, heads)
        for part, head, piece_sum in pieces:  # every layout splits a tensor into equal pieces
            add({**base, "part": part, "head": head}, numel // len(pieces), piece_sum)

    rows = sorted(groups.values(), key=_sort_key)
    for row in rows:
        row["group"] = _label(row)
    frame = pd.DataFrame({"group": [r["group"] for r in rows],
                          "layer": pd.array([r["layer"] for r in rows], dtype="Int64")})
    if by in ("module", "head"):
        frame["kind"] = [r["kind"] for r in rows]
    if by == "head":
        frame["part"] = [r["part"] for r in rows]
        frame["head"] = pd.array([r["head"] for r in rows], dtype="Int64")
    frame["numel"] = np.array([r["numel"] for r in rows], dtype=np.int64)
    frame["mass"] = np.array([r["sq"] for r in rows], dtype=np.float64) / total
    return frame


# ---------------------------------------------------------------------------------------------- gradients
def _vectors_and_values(eig: Any) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """``(vectors, eigenvalues or NaN, order)`` of an :class:`EigshResult` or a sequence of vector lists."""
    from hess_utils.algorithms.eigsh import EigshResult, wanted_order

    if isinstance(eig, EigshResult):
        values = np.asarray(eig.eigenvalues, dtype=np.float64)
        return list(eig.eigenvectors), values, wanted_order(values, eig.which)
    vectors = list(eig)
    if not vectors or isinstance(vectors[0], torch.Tensor):
        raise TypeError("expected an EigshResult or a non-empty sequence of vector lists (each like op.zeros())")
    return vectors, np.full(len(vectors), np.nan), np.arange(len(vectors))


# Float64 entries _gram converts at a time, over all vectors together (8 MiB): the temporaries stay small.
_GRAM_ENTRIES = 1 << 20


def _gram(vectors: Sequence[Sequence[torch.Tensor]]) -> np.ndarray:
    """The float64 Gram matrix ``[x_i . x_j]`` of vector lists, one matrix product per block chunk.

    Every chunk of every block is converted to float64 (on the first vector's device for that block) and
    multiplied there, so products and sums are float64 whatever the blocks' dtypes; ``m`` vectors cost one
    pass over the data instead of the ``m^2 / 2`` passes of pairwise dots.
    """
    m = len(vectors)
    lengths = {len(x) for x in vectors}
    if len(lengths) != 1:
        raise ValueError(f"the vectors have different numbers of blocks: {sorted(lengths)}")
    total = np.zeros((m, m))
    for b in range(lengths.pop()):
        first = vectors[0][b]
        shapes = {tuple(x[b].shape) for x in vectors}
        if len(shapes) != 1:
            raise ValueError(f"block {b} has different shapes across the vectors: {sorted(shapes)}")
        flat = [x[b].detach().reshape(-1) for x in vectors]
        acc = torch.zeros((m, m), dtype=torch.float64, device=first.device)
        step = max(_GRAM_ENTRIES // m, 1024)
        for start in range(0, first.numel(), step):
            stop = min(start + step, first.numel())
            rows = torch.stack([f[start:stop].to(device=first.device, dtype=torch.float64) for f in flat])
            acc += rows @ rows.T
        total += acc.cpu().numpy()
    return (total + total.T) / 2


def _orthonormal_shares(gram: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``(q_j^T g)^2`` for the Gram-Schmidt directions ``q_j`` of vectors with Gram matrix ``gram``, ``c = V g``.

    Gram-Schmidt in coefficient space: ``q_j = sum_i B[j, i] u_i`` over the unit vectors ``u_i = v_i /
    ||v_i||``, whose inner products are the normalised Gram matrix ``N``, so ``q_m^T u_j = (B N)[m, j]`` and
    ``q_j^T g = B[j] . (c / ||v||)``. Each new direction is orthogonalised twice against the previous ones
    ("twice is enough", Giraud et al. 2005), and dropped when what is left of ``u_j`` has squared norm under
    :data:`_GRAM_RCOND` (an angle under ``1e-6`` to the span so far): scale-free, so a short vector counts
    as much as a long one. Working from the Gram matrix, the shares are accurate to about ``kappa^2 * 1e-16``
    for unit vectors whose Gram matrix has condition number ``kappa`` (1 for eigenvectors).
    """
    norms = np.sqrt(np.diag(gram))
    unit_gram = gram / np.outer(norms, norms)
    unit_c = c / norms
    k = len(c)
    B = np.zeros((k, k))
    accepted = 0
    share = np.zeros(k)
    for j in range(k):
        b = np.zeros(k)
        b[j] = 1.0
        for _ in range(2):
            overlaps = B[:accepted] @ (unit_gram @ b)
            b = b - overlaps @ B[:accepted]
        sq = float(b @ unit_gram @ b)
        if sq <= _GRAM_RCOND:
            continue
        B[accepted] = b / math.sqrt(sq)
        share[j] = float(B[accepted] @ unit_c) ** 2
        accepted += 1
    return share


def gradient_overlap(eig_result_or_vectors: Any, gradient: Sequence[torch.Tensor]) -> pd.DataFrame:
    """How much of the gradient ``g`` lies along each eigenvector and in the span of the leading ones.

    With the vectors :math:`v_1, \\dots, v_k` in rank order (for an :class:`EigshResult`: most wanted first,
    e.g. the largest eigenvalue first for ``which="LA"``; a plain sequence keeps its order):

    .. math::

        \\cos^2_i = \\frac{(v_i^\\top g)^2}{\\lVert v_i \\rVert^2 \\lVert g \\rVert^2}, \\qquad
        \\text{cumulative}_j = \\frac{\\lVert P_j g \\rVert^2}{\\lVert g \\rVert^2}, \\qquad
        P_j = \\text{the orthogonal projector onto } \\operatorname{span}(v_1, \\dots, v_j).

    For orthonormal eigenvectors ``cumulative_j = cos2_1 + ... + cos2_j``. Eigenvectors from an iterative
    solver are orthogonal only to their tolerance, and a user's set need not be orthogonal at all, where
    summing ``cos2`` would double-count shared directions (or exceed 1). So the vectors are orthonormalised
    in float64, in rank order, first: from the Gram matrix :math:`G = V V^\\top` and :math:`c = V g` (one
    float64 pass over the vectors, :func:`_gram`; no vector is copied, which matters at 10^8 parameters)
    the Gram-Schmidt directions are built as combinations of the vectors (:func:`_orthonormal_shares`), and
    ``cumulative_j`` sums their squared components along ``g``. A vector (numerically) in the span of the
    previous ones, at an angle under ``1e-6`` to it, adds nothing.

    Parameters
    ----------
    eig_result_or_vectors : EigshResult or sequence of vector lists
        The eigenvectors (any scale; each laid out like ``gradient``).
    gradient : list of tensors
        ``g``, e.g. ``op.gradient()``.

    Returns
    -------
    pandas.DataFrame
        One row per vector, in rank order: ``rank`` (1-based), ``index`` (position in
        ``result.eigenvectors`` / the input), ``eigenvalue`` (NaN for plain vectors), ``cos2``, ``share``
        (``cumulative_j - cumulative_{j-1}``: the squared component along the ``j``-th orthonormalised
        direction), ``cumulative``. ``frame.attrs["gradient_norm"]`` holds ``||g||``.

    Raises
    ------
    ValueError
        For a zero gradient or a zero vector, or blocks that do not match.
    """
    vectors, values, order = _vectors_and_values(eig_result_or_vectors)
    vectors = [vectors[i] for i in order]
    k = len(vectors)
    full = _gram([*vectors, gradient])  # (k + 1, k + 1): the vectors, then g
    gram, c, g_sq = full[:k, :k], full[:k, k], float(full[k, k])
    if not (g_sq > 0 and math.isfinite(g_sq)):
        raise ValueError(f"the gradient's squared norm is {g_sq}: overlaps are defined for a finite nonzero gradient")
    norms_sq = np.diag(gram).copy()
    zero = np.flatnonzero(~(norms_sq > 0))
    if len(zero):
        raise ValueError(f"vector {int(order[zero[0]])} is zero: it has no direction")
    share = _orthonormal_shares(gram, c) / g_sq
    cumulative = np.cumsum(share)
    frame = pd.DataFrame({
        "rank": np.arange(1, k + 1),
        "index": order.astype(np.int64),
        "eigenvalue": values[order],
        "cos2": c**2 / (norms_sq * g_sq),
        "share": share,
        "cumulative": cumulative,
    })
    frame.attrs["gradient_norm"] = math.sqrt(g_sq)
    return frame


# ---------------------------------------------------------------------------------------------- plotting
OUTSIDE_LABEL = "outside blocks"


def plot_mass_heatmap(frame: pd.DataFrame, ax: Any = None) -> Any:
    """A layers x module kinds image of one vector's mass (a :func:`mass_by_group` frame, ``by="module"``).

    Rows are the blocks in order, plus a last row, ``"outside blocks"``, for the embeddings, the final norm
    and the head; columns the kinds present, in the order of :data:`KINDS`; a cell is the summed mass of
    its rows of ``frame`` (so a ``by="head"`` frame works too). A kind absent from a row reads 0.

    Parameters
    ----------
    frame : pandas.DataFrame
        Columns ``layer``, ``kind``, ``mass``; with an ``eigenvector`` column (as in the CLI's
        ``mass_by_layer.csv``) it must hold one eigenvector only: select it first.
    ax : matplotlib Axes, optional
        Where to draw (default: a new figure).

    Returns
    -------
    matplotlib.axes.Axes
    """
    from hess_utils.plotting import _matplotlib

    missing = {"layer", "kind", "mass"} - set(frame.columns)
    if missing:
        raise ValueError(f"the frame lacks {sorted(missing)}: pass mass_by_group(op, v, by='module')")
    if "eigenvector" in frame.columns and frame["eigenvector"].nunique() > 1:
        raise ValueError(f"the frame holds {frame['eigenvector'].nunique()} eigenvectors; select one, e.g. "
                         "frame[frame.eigenvector == 0]")
    plt = _matplotlib()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    layer = pd.array(frame["layer"], dtype="Int64")
    layers = sorted(int(x) for x in pd.unique(layer.dropna()))
    kinds = [k for k in KINDS if k in set(frame["kind"])]
    rows = [str(x) for x in layers] + ([OUTSIDE_LABEL] if layer.isna().any() else [])
    grid = np.zeros((len(rows), len(kinds)))
    for lay, kind, mass in zip(layer, frame["kind"], frame["mass"], strict=True):
        r = len(layers) if pd.isna(lay) else layers.index(int(lay))
        grid[r, kinds.index(kind)] += float(mass)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("module kind")
    ax.set_ylabel("layer")
    ax.set_title("share of ||v||² per layer and module kind")
    ax.figure.colorbar(image, ax=ax, label="mass")
    return ax
