"""The mixture-of-experts study of notebook 11: curvature of the router, the shared and the routed experts.

A sparse MoE block ``y = sum_{e in I(x)} g_e(x) E_e(x) + sigma(u^T x) S(x)`` has three kinds of parameters:
the router (the logits ``W_r x`` whose top-k choice ``I(x)`` picks the experts and whose softmax gives the
mixing weights ``g_e``), the routed experts ``E_e`` (each sees only the tokens sent to it) and, in Qwen2-MoE
and DeepSeek, a shared expert ``S`` that sees every token (behind its own sigmoid gate ``u``). The Hessian
is that of the loss with the top-k choice held where it is at ``w`` (:mod:`hess_utils.operators.routing`).

:func:`moe_parameter_blocks` sorts a model's parameters into those kinds plus attention, norms and the
embeddings/head. The diagonal Hessian block ``H_gg`` of each kind (or kind and layer) is measured by its trace,
from one set of Hutchinson products of the whole Hessian split by tensor (:func:`tensor_quadratic_forms`,
:func:`aggregate_traces`, with standard errors), and by its top eigenvalues (:func:`block_top_eigenvalues`,
thick-restart Lanczos on the restricted operator, with residuals);
:func:`fd_routing_flips` counts how many routing decisions a finite-difference product crosses at a given
step, with the product's error against the exact one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from hess_utils import loss as L
from hess_utils import vectors as V
from hess_utils.algorithms.eigsh import eigsh
from hess_utils.algorithms.probes import probe_seed
from hess_utils.operators.hessian import hessian_operator
from hess_utils.operators.kernels import experts_kernel, experts_modules
from hess_utils.operators.routing import RoutingMonitor, router_modules

#: The kinds of :func:`moe_parameter_blocks`, in display order.
BLOCK_KINDS = ("router", "routed experts", "shared expert", "attention", "norms", "embeddings and head")

_NORM = re.compile(r"(^|\.)[^.]*norm[^.]*\.")
_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention)\.")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def moe_parameter_blocks(model: torch.nn.Module) -> dict[str, list[str]]:
    """``{kind: parameter names}`` over :data:`BLOCK_KINDS` (kinds without parameters left out).

    Router: the parameters of the router modules (:func:`~hess_utils.operators.routing.router_modules`, e.g.
    ``mlp.gate.weight``). Routed experts: those of transformers' experts modules
    (:func:`~hess_utils.operators.kernels.experts_modules`). Shared expert: names containing ``shared_expert``
    (its MLP and its gate). Then attention (``self_attn.``), norms (a module name containing ``norm``), and the
    rest (embeddings, output head, dense MLPs). Every trainable parameter is in exactly one block, in the
    model's order. Raises ``ValueError`` for a model with no router (a dense model).
    """
    routers = tuple(f"{name}." for name, _ in router_modules(model))
    experts = tuple(f"{name}." for name, _ in experts_modules(model))
    if not routers:
        raise ValueError(f"{type(model).__name__} has no top-k router: moe_parameter_blocks needs a "
                         "mixture-of-experts model (e.g. the embedded 'tiny-qwen2-moe')")
    blocks: dict[str, list[str]] = {kind: [] for kind in BLOCK_KINDS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(routers):
            kind = "router"
        elif name.startswith(experts):
            kind = "routed experts"
        elif "shared_expert" in name:
            kind = "shared expert"
        elif _ATTENTION.search(name):
            kind = "attention"
        elif _NORM.search(name):
            kind = "norms"
        else:
            kind = "embeddings and head"
        blocks[kind].append(name)
    return {kind: names for kind, names in blocks.items() if names}


def tensor_quadratic_forms(op: Any, num_probes: int, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Per-tensor Hutchinson samples ``Q[p, t] = v_p[t] . (H v_p)[t]`` of shape ``(num_probes, tensors)``.

    ``v_p`` is the operator's Rademacher probe ``probe_seed(seed, p)``; one product per probe. For any set
    ``g`` of tensors, ``sum_{t in g} Q[p, t]`` is an unbiased sample of ``tr H_gg`` (the trace of the diagonal
    block), since ``E[v v^T] = I``: one set of products of the whole Hessian gives the traces of every tensor,
    layer and kind at once (:func:`aggregate_traces`). Dot products are reduced in float64.
    """
    from hess_utils.progress import progress_bar

    out = np.empty((num_probes, len(op.shapes)), dtype=np.float64)
    for p in progress_bar(range(num_probes), desc="block traces", disable=not progress):
        v = op.random_vector("rademacher", probe_seed(seed, p))
        hv = op.matvec(v)
        out[p] = [V.dot([a], [b]) for a, b in zip(v, hv, strict=True)]
    return out


def layer_of(name: str) -> int | None:
    """The decoder block index of a parameter name (``...layers.3...`` -> 3), None outside the blocks."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def aggregate_traces(samples: np.ndarray, op: Any, blocks: dict[str, Sequence[str]],
                     by_layer: bool = False) -> pd.DataFrame:
    """Trace of each diagonal block from :func:`tensor_quadratic_forms` samples, with its standard error.

    ``samples``: ``(probes, tensors)`` over the tensors of ``op`` (``op.param_names``, ``op.shapes``). Groups
    are the kinds of ``blocks``, or with ``by_layer`` the pairs (kind, decoder layer; None outside the blocks).
    Returns one row per group: ``kind, layer, parameters``, ``trace`` (the mean over probes of the group's
    summed samples), ``trace_stderr`` (their standard deviation, ddof 1, over ``sqrt(probes)``) and
    ``mean_diagonal`` (``trace / parameters``: the mean diagonal entry, comparable between groups of other
    sizes).
    """
    index = {n: i for i, n in enumerate(op.param_names)}
    sizes = [int(np.prod(shape)) for shape in op.shapes]
    groups: dict[tuple[str, int | None], list[int]] = {}
    for kind, members in blocks.items():
        for n in members:
            groups.setdefault((kind, layer_of(n) if by_layer else None), []).append(index[n])
    rows = []
    num_probes = samples.shape[0]
    for (kind, layer), cols in groups.items():
        sums = samples[:, cols].sum(axis=1)
        stderr = float(sums.std(ddof=1) / np.sqrt(num_probes)) if num_probes > 1 else float("nan")
        count = sum(sizes[c] for c in cols)
        rows.append({"kind": kind, "layer": layer, "parameters": count, "trace": float(sums.mean()),
                     "trace_stderr": stderr, "mean_diagonal": float(sums.mean()) / count})
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")  # None outside the decoder blocks: <NA>, not a float NaN
    return frame


def block_top_eigenvalues(
    model: torch.nn.Module,
    batches: Sequence[L.Batch],
    blocks: dict[str, Sequence[str]],
    k: int = 3,
    tol: float = 1e-4,
    seed: int = 0,
    method: str = "auto",
    progress: bool = False,
) -> pd.DataFrame:
    """The ``k`` largest eigenvalues of each diagonal block ``H_gg``, with residuals and converged flags.

    For each ``kind -> names``, the operator restricted to those parameters
    (``hessian_operator(model, batches, params=names)``, routing held fixed) and thick-restart Lanczos to
    relative residual ``tol`` (``k`` lowered to ``n_g - 1`` for a smaller block). Returns ``kind, parameters,
    rank`` (1 = largest), ``eigenvalue, residual, relative_residual, converged, products`` (of that block's run).
    """
    frames = []
    for kind, names in blocks.items():
        op = hessian_operator(model, batches, params=list(names), method=method)
        kk = min(k, op.dim - 1)
        eig = eigsh(op, k=kk, which="LA", tol=tol, seed=seed, progress=progress)
        frame = eig.to_frame().iloc[::-1].reset_index(drop=True)
        frame.insert(0, "rank", np.arange(1, kk + 1))
        frame.insert(0, "parameters", op.dim)
        frame.insert(0, "kind", kind)
        frame["products"] = eig.num_products
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def routing_decisions(model: torch.nn.Module, batches: Sequence[L.Batch]) -> int:
    """Top-k routing decisions of one forward over ``batches``: tokens (padding included) times router calls."""
    return sum(int(sets.shape[0]) for _, sets in routing_calls(model, batches))


def routing_calls(model: torch.nn.Module, batches: Sequence[L.Batch]) -> list[tuple[str, torch.Tensor]]:
    """``(block, expert sets (tokens, k))`` of every router call of one no-grad forward over ``batches`` at ``w``
    (:class:`~hess_utils.operators.routing.RoutingMonitor`; empty for a dense model)."""
    monitor = RoutingMonitor(model)
    if not monitor:  # nothing to watch: no forward
        return []
    with torch.no_grad(), experts_kernel(model, exact=False), monitor.record() as calls:
        for batch in batches:
            L.batch_loss_sum(model, batch)
    return calls


def fd_routing_flips(
    model: torch.nn.Module,
    batches: Sequence[L.Batch],
    fd_eps: Sequence[float | None] = (None, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1),
    num_vectors: int = 3,
    seed: int = 0,
) -> pd.DataFrame:
    """Routing decisions crossed by finite-difference products, and their error, per step size.

    For each ``fd_eps`` (``None``: the operator's adaptive default step; a number: a fixed relative step) and
    ``num_vectors`` random unit directions ``v``, one ``method="fd"`` product on all parameters, compared
    with the exact ``method="rev-rev"`` product (routing held fixed at ``w``). A decision is one token at
    one router call; the product's points ``w + h v`` and ``w - h v`` each make every decision once per
    gradient, so the share flipped is ``flips / (decisions * gradients)``.

    Returns
    -------
    pandas.DataFrame
        One row per ``(fd_eps, vector)``: ``fd_eps`` (``"adaptive"`` or the number), ``vector``, ``steps``
        (the absolute steps ``h`` taken), ``gradients``, ``flips``, ``share_flipped``, ``relative_error``
        (``||H_fd v - H v|| / ||H v||``, reduced in float64).
    """
    import warnings

    exact = hessian_operator(model, batches, method="rev-rev")
    decisions = routing_decisions(model, batches)
    draws = [exact.random_vector("gaussian", probe_seed(seed, i)) for i in range(num_vectors)]
    vs = [V.scaled(1.0 / V.norm(v), v) for v in draws]
    reference = [exact.matvec(v) for v in vs]
    rows: list[dict[str, Any]] = []
    for eps in fd_eps:
        fd = hessian_operator(model, batches, method="fd", fd_eps=eps)
        for i, (v, hv) in enumerate(zip(vs, reference, strict=True)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the flips are the measurement here, not news
                out = fd.matvec(v)
            record = fd.last_fd
            rows.append({"fd_eps": "adaptive" if eps is None else float(eps), "vector": i,
                         "steps": ", ".join(f"{h:.1e}" for h in record.steps), "gradients": record.gradients,
                         "flips": record.routing_flips,
                         "share_flipped": record.routing_flips / (decisions * record.gradients),
                         "relative_error": V.norm(V.add(out, hv, alpha=-1.0)) / V.norm(hv)})
    return pd.DataFrame(rows)


def expert_load(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, list[float]]:
    """Share of the top-k slots each expert receives, per router, on ``batches`` (``{}`` for a dense model).

    ``{router block: [f_0, ..., f_{E-1}]}`` with :math:`f_e = \\frac{1}{kT}\\sum_t [e \\in I_t]` over the ``T``
    tokens of all batches (padding included); the shares of a router sum to 1, uniform routing gives ``1/E``.
    """
    calls = routing_calls(model, batches)
    if not calls:
        return {}
    counts: dict[str, torch.Tensor] = {}
    num_experts = _num_experts(model.config)
    for block, sets in calls:
        hits = torch.bincount(sets.reshape(-1).long(), minlength=num_experts).double()
        counts[block] = counts.get(block, torch.zeros(num_experts, dtype=torch.float64)) + hits
    return {block: (c / c.sum()).tolist() for block, c in counts.items()}


def _num_experts(config: Any) -> int:
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"{type(config).__name__} names no expert count")


def expert_load_table(model: torch.nn.Module, batches: Sequence[L.Batch]) -> pd.DataFrame:
    """:func:`expert_load` as a table: ``layer, expert, share`` (one row per router and expert)."""
    rows = [{"layer": layer_of(block + "."), "expert": e, "share": share}
            for block, shares in expert_load(model, list(batches)).items() for e, share in enumerate(shares)]
    return pd.DataFrame(rows)


def moe_curvature_study(
    model: torch.nn.Module,
    batches: Sequence[L.Batch],
    num_probes: int = 30,
    k: int = 3,
    tol: float = 1e-3,
    fd_eps: Sequence[float | None] = (None, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1),
    num_vectors: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Everything notebook 11 shows, as tables (and the raw trace samples), for ``runs.cached_results``.

    ``traces_by_kind`` and ``traces_by_layer`` (:func:`aggregate_traces` of ``num_probes`` products of the
    whole Hessian), ``trace_samples`` (their per-tensor samples, ``(num_probes, tensors)``),
    ``eigenvalues`` (:func:`block_top_eigenvalues` of each kind), ``fd_flips`` (:func:`fd_routing_flips`) and
    ``expert_load`` (:func:`expert_load_table`), all on ``batches`` with routing held fixed at ``w``.
    """
    blocks = moe_parameter_blocks(model)
    op = hessian_operator(model, batches)
    samples = tensor_quadratic_forms(op, num_probes, seed=seed, progress=progress)
    return {
        "traces_by_kind": aggregate_traces(samples, op, blocks),
        "traces_by_layer": aggregate_traces(samples, op, blocks, by_layer=True),
        "trace_samples": samples,
        "eigenvalues": block_top_eigenvalues(model, batches, blocks, k=k, tol=tol, seed=seed, progress=progress),
        "fd_flips": fd_routing_flips(model, batches, fd_eps=fd_eps, num_vectors=num_vectors, seed=seed),
        "expert_load": expert_load_table(model, batches),
    }


def moe_conclusions(results: dict[str, Any]) -> str:
    """The notebook's closing paragraph, every number read from ``results`` of :func:`moe_curvature_study`."""
    kinds = results["traces_by_kind"].set_index("kind")
    eig = results["eigenvalues"]
    top = eig[eig["rank"] == 1].set_index("kind")["eigenvalue"]
    flips = results["fd_flips"]
    default = flips[flips.fd_eps.astype(str) == "adaptive"]
    fixed = flips[flips.fd_eps.astype(str) != "adaptive"].copy()
    fixed["eps"] = fixed.fd_eps.astype(float)
    by_eps = fixed.groupby("eps").agg(flips=("flips", "mean"), error=("relative_error", "max"))
    first_flip = by_eps[by_eps.flips > 0]
    steepest = kinds["mean_diagonal"].idxmax()
    per_kind = ", ".join(f"{kind} {value:.2e}" for kind, value in kinds["mean_diagonal"].items())
    text = (f"Per parameter, the {steepest} block has the largest mean diagonal entry of H (traces over sizes: "
            f"{per_kind}; standard errors in the table). ")
    listed = ", ".join(f"{kind} {value:.3g}" for kind, value in top.items())
    text += f"Top eigenvalues of the diagonal blocks: {listed}. "
    text += (f"The default finite-difference step flipped {int(default.flips.sum())} routing decisions over "
             f"{len(default)} products (largest relative error {default.relative_error.max():.1e}). ")
    if len(first_flip):
        eps = first_flip.index.min()
        text += (f"A fixed relative step of {eps:g} flips {by_eps.loc[eps, 'flips']:.0f} decisions per product on "
                 f"average, and the error jumps to {by_eps.loc[eps, 'error']:.1e}: the difference quotient then mixes "
                 "two pieces of the piecewise-smooth loss, which the operator warns about.")
    else:
        text += "No fixed step tried here flipped a decision."
    return text


def moe_figure(results: dict[str, Any], title: str) -> Any:
    """Notebook 11's figure from :func:`moe_curvature_study` tables (it computes no number the notebook quotes).

    Left: the mean diagonal entry ``tr H_gg / n_g`` per kind and decoder layer (log colour scale, absolute
    value; kinds outside the blocks in the column ``-``). Middle: the top eigenvalues of each kind's block.
    Right: the finite-difference product's relative error against the exact one per fixed step, with the
    share of routing decisions it flipped (the adaptive default step as a dashed line).
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    layers = results["traces_by_layer"].copy()
    layers["column"] = layers["layer"].map(lambda x: "-" if pd.isna(x) else str(int(x)))
    grid = layers.pivot_table(index="kind", columns="column", values="mean_diagonal", aggfunc="sum")
    grid = grid.reindex([k for k in BLOCK_KINDS if k in grid.index])
    grid = grid[sorted(grid.columns, key=lambda c: (c == "-", int(c) if c != "-" else 0))]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    values = np.abs(grid.to_numpy(dtype=float))
    positive = values[np.isfinite(values) & (values > 0)]
    image = axes[0].imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis",
                           norm=LogNorm(positive.min(), positive.max()) if positive.size else None)
    axes[0].set_xticks(range(grid.shape[1]), grid.columns)
    axes[0].set_yticks(range(grid.shape[0]), grid.index)
    axes[0].set_xlabel("decoder layer")
    axes[0].set_title("|mean diagonal entry| of H per block (Hutchinson)")
    fig.colorbar(image, ax=axes[0], label="nats/token per unit²")
    eig = results["eigenvalues"]
    for i, (_, rows) in enumerate(eig.groupby("kind", sort=False)):
        axes[1].scatter(np.full(len(rows), i), rows["eigenvalue"], color=f"C{i}", zorder=3)
    axes[1].set_xticks(range(eig["kind"].nunique()), eig["kind"].unique(), rotation=20)
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[1].set_ylabel("eigenvalue of the diagonal block")
    axes[1].set_title(f"top {int(eig['rank'].max())} eigenvalues of each block")
    flips = results["fd_flips"]
    fixed = flips[flips.fd_eps.astype(str) != "adaptive"].assign(eps=lambda f: f.fd_eps.astype(float))
    curve = fixed.groupby("eps").agg(error=("relative_error", "max"), share=("share_flipped", "mean"))
    default = flips[flips.fd_eps.astype(str) == "adaptive"].relative_error.max()
    axes[2].loglog(curve.index, curve["error"], "o-", color="C0", label="relative error of H v (max over vectors)")
    axes[2].axhline(default, color="C0", ls="--", lw=1, label=f"adaptive default step: {default:.1e}")
    axes[2].set_xlabel("fixed relative step fd_eps")
    axes[2].set_ylabel("||H_fd v - H v|| / ||H v||")
    twin = axes[2].twinx()
    twin.semilogx(curve.index, curve["share"], "s:", color="C3", label="share of routing decisions flipped")
    twin.set_ylabel("share of decisions flipped", color="C3")
    axes[2].legend(loc="upper left", fontsize="small")
    twin.legend(loc="lower right", fontsize="small")
    axes[2].set_title("finite differences across the routing")
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    return fig
