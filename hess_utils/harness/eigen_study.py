"""The analyses of notebook 10: top eigenpairs, where they live, gradient overlap, sharpness along training, influence.

Every number notebook 10 prints comes from a function here; ``tests/test_eigen_study.py`` checks each against
dense float64 Hessians of tiny models built independently (``tests/tiny.py``).

* :func:`eigen_analysis`: ``eigsh`` (``which="LA"``) on the Hessian of the loss, and from its eigenvectors the
  tables the notebook shows: :func:`eigenpair_table` (eigenvalues, true residuals, ``converged``),
  :func:`mass_tables` (mass per ``(layer, module kind)`` and per attention head, :mod:`~hess_utils.algorithms.
  directions`) and the gradient overlap (:func:`~hess_utils.algorithms.directions.gradient_overlap`). The
  eigenvectors themselves are not kept (at 134.5 M parameters five of them are 2.7 GB).
* :func:`train_with_checkpoints` / :func:`sharpness_at_checkpoints`: sharpness along training. The harness's
  loop (:func:`hess_utils.harness.training.continue_training`) runs AdamW; its ``callback(step, model)`` saves the
  weights and, rebuilt from the gradients the callback finds on the parameters (:class:`AdamSecondMoment`),
  AdamW's second-moment estimate. At each checkpoint :func:`sharpness_at_checkpoints` computes the raw sharpness
  :math:`\\lambda_{\\max}(H)` and the *preconditioned* sharpness :math:`\\lambda_{\\max}(P^{-1} H)` with
  Adam's preconditioner :math:`P_t = (1 - \\beta_1^t)\\, \\operatorname{diag}(\\sqrt{\\hat v_t} + \\epsilon)`
  (Cohen et al., "Adaptive gradient methods at the edge of stability", 2022), as the largest eigenvalue of the
  symmetric :math:`P^{-1/2} H P^{-1/2}` (:class:`PreconditionedOperator`). Gradient descent with step
  :math:`\\eta` is stable on a quadratic only while :math:`\\lambda_{\\max}(H) < 2/\\eta` (Cohen et al., "Gradient
  descent on neural networks typically occurs at the edge of stability", 2021); for Adam with momentum
  :math:`\\beta_1` the threshold :math:`(2 + 2\\beta_1) / ((1 - \\beta_1)\\eta)` (38/eta for 0.9) applies to the
  preconditioned sharpness, not to the raw one (:func:`stability_thresholds`).
* :func:`influence_table`: Koh and Liang's influence :math:`-g_{test}^\\top (H + \\lambda I)^{-1} g_{train}` of a
  few training sequences on a test loss, by :func:`hess_utils.influence` on a small parameter subset, next to the
  exact value from the dense sub-Hessian of the subset (:func:`dense_subset_hessian`, plain autograd) and
  ``numpy.linalg.solve``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hess_utils import loss as L
from hess_utils import vectors as V
from hess_utils.algorithms.directions import gradient_overlap, mass_by_group
from hess_utils.algorithms.eigsh import EigshResult, eigsh, wanted_order
from hess_utils.algorithms.solve import influence
from hess_utils.operators.base import SymmetricOperator
from hess_utils.operators.hessian import hessian_operator
from hess_utils.operators.selection import ParamSelector, select_parameters
from hess_utils.vectors import TensorList


# ---------------------------------------------------------------------------------------------- eigenpairs
def eigenpair_table(result: EigshResult) -> pd.DataFrame:
    """One row per eigenpair, most wanted first (largest first for ``which="LA"``).

    Columns ``rank`` (1-based), ``eigenvalue``, ``residual`` (true ``||H x - theta x||``), ``relative_residual``
    (``residual / scale``, what ``tol`` bounds), ``converged``.
    """
    order = wanted_order(np.asarray(result.eigenvalues), result.which)
    frame = result.to_frame().iloc[order].reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, result.k + 1))
    return frame


def mass_tables(op: Any, result: EigshResult, config: Any = None) -> dict[str, pd.DataFrame]:
    """Mass of each eigenvector per ``(layer, module kind)`` and, with a ``config``, per attention head.

    Returns ``{"mass_module": ..., "mass_head": ...}`` (the second only with ``config``): the frames of
    :func:`~hess_utils.algorithms.directions.mass_by_group` (``by="module"`` / ``by="head"``) of every
    eigenvector, stacked, with the columns ``rank`` (as in :func:`eigenpair_table`) and ``eigenvalue`` first.
    """
    order = wanted_order(np.asarray(result.eigenvalues), result.which)
    out: dict[str, list[pd.DataFrame]] = {"mass_module": [], "mass_head": []}
    for rank, i in enumerate(order, 1):
        vector = result.eigenvectors[i]
        for by in ("module", "head") if config is not None else ("module",):
            frame = mass_by_group(op, vector, by=by, config=config)
            frame.insert(0, "eigenvalue", float(result.eigenvalues[i]))
            frame.insert(0, "rank", rank)
            out[f"mass_{by}"].append(frame)
    return {name: pd.concat(frames, ignore_index=True) for name, frames in out.items() if frames}


def head_mass_grid(mass_head: pd.DataFrame, rank: int = 1) -> pd.DataFrame:
    """Layers x ``part+head`` (``q0``, ``q1``, ..., ``k0``, ..., ``o3``) attention mass of one eigenvector.

    ``mass_head`` is the ``"mass_head"`` table of :func:`mass_tables`; the output-projection bias (no head) is
    left out, so the cells sum to the vector's attention mass less that bias.
    """
    rows = mass_head[(mass_head["rank"] == rank) & mass_head["head"].notna()]
    if rows.empty:
        raise ValueError(f"no per-head rows for rank {rank}: pass the mass_head table of mass_tables(..., config=...)")
    labels = rows["part"].astype(str) + rows["head"].astype(int).astype(str)
    grid = rows.assign(column=labels.to_numpy(), layer=rows["layer"].astype(int)).pivot_table(
        index="layer", columns="column", values="mass", aggfunc="sum", fill_value=0.0)
    parts = "qkvo"
    columns = sorted(grid.columns, key=lambda c: (parts.index(c[0]), int(c[1:])))
    return grid[columns]


def eigen_analysis(
    model: torch.nn.Module,
    batches: Sequence[L.Batch],
    k: int = 5,
    tol: float = 1e-4,
    params: ParamSelector = None,
    max_products: int | None = None,
    num_extra: int | None = None,
    check_multiplicity: bool = False,
    heads: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Top ``k`` eigenpairs of the Hessian of the loss and the tables built from their vectors.

    Returns ``(tables, record)``: ``tables`` holds ``"eigenpairs"`` (:func:`eigenpair_table`), ``"mass_module"``
    and, with ``heads``, ``"mass_head"`` (:func:`mass_tables`), and ``"overlap"`` (the gradient's share in each
    eigenvector and cumulatively in the span of the leading ones,
    :func:`~hess_utils.algorithms.directions.gradient_overlap`, with ``gradient_norm`` as a column); ``record``
    the counters of the run (products, restarts, seconds, seconds per product, dimension, loss).
    """
    op = hessian_operator(model, batches, params=params)
    start = time.perf_counter()
    result = eigsh(op, k=k, which="LA", tol=tol, max_products=max_products, num_extra=num_extra, seed=seed,
                   check_multiplicity=check_multiplicity, progress=progress)
    eig_seconds = time.perf_counter() - start
    tables = {"eigenpairs": eigenpair_table(result)}
    tables.update(mass_tables(op, result, config=getattr(model, "config", None) if heads else None))
    gradient = op.gradient()
    overlap = gradient_overlap(result, gradient)
    overlap["gradient_norm"] = overlap.attrs["gradient_norm"]
    tables["overlap"] = overlap
    record = {"dim": int(op.dim), "num_tokens": int(op.num_tokens), "loss": float(op.loss()),
              "num_products": int(result.num_products), "num_restarts": int(result.num_restarts),
              "num_multiplicity_checks": int(result.num_multiplicity_checks), "basis_size": int(result.basis_size),
              "scale": float(result.scale), "eigsh_seconds": eig_seconds,
              "seconds_per_product": eig_seconds / max(result.num_products, 1)}
    return tables, record


# ---------------------------------------------------------------------------------------------- sharpness
class AdamSecondMoment:
    """AdamW's second-moment estimate :math:`v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2`, rebuilt from gradients.

    :meth:`update` reads ``p.grad`` of the trainable parameters, as :func:`continue_training`'s callback finds
    them after each step (the clipped gradient the optimiser used; it is cleared only before the next backward),
    with the same operations as ``torch.optim.AdamW`` (``mul_(beta2).addcmul_(g, g, value=1 - beta2)``).
    """

    def __init__(self, model: torch.nn.Module, beta2: float) -> None:
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.beta2 = float(beta2)
        self.step = 0
        self.v: dict[str, torch.Tensor] = {}

    def update(self, model: torch.nn.Module) -> None:
        """Fold in the current gradients (raises if a trainable parameter has none)."""
        named = dict(model.named_parameters())
        for name in self.names:
            grad = named[name].grad
            if grad is None:
                raise RuntimeError(f"{name} has no .grad in the training callback: cannot rebuild Adam's second "
                                   "moment (continue_training must leave the step's gradients on the parameters)")
            v = self.v.setdefault(name, torch.zeros_like(grad))
            v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        self.step += 1


def adam_preconditioner(v: dict[str, torch.Tensor], step: int, betas: tuple[float, float],
                        eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Adam's diagonal preconditioner :math:`P_t = (1 - \\beta_1^t) (\\sqrt{v_t / (1 - \\beta_2^t)} + \\epsilon)`.

    With it AdamW's update is :math:`w_t = w_{t-1} - \\eta P_t^{-1} m_t` (``m_t`` the first-moment EMA, before
    its bias correction), the preconditioned heavy-ball form of Cohen et al. (2022), whose stability threshold
    on :math:`\\lambda_{\\max}(P_t^{-1} H)` is :math:`(2 + 2\\beta_1)/((1 - \\beta_1) \\eta)`.
    """
    beta1, beta2 = betas
    return {n: (1 - beta1 ** step) * ((x / (1 - beta2 ** step)).sqrt() + eps) for n, x in v.items()}


def stability_thresholds(lr: float, beta1: float) -> dict[str, float]:
    """``{"gd": 2 / lr, "adam": (2 + 2 beta1) / ((1 - beta1) lr)}``: the edge-of-stability lines."""
    return {"gd": 2.0 / lr, "adam": (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)}


class PreconditionedOperator(SymmetricOperator):
    """:math:`P^{-1/2} H P^{-1/2}` for a positive diagonal :math:`P` (same eigenvalues as :math:`P^{-1} H`)."""

    def __init__(self, op: SymmetricOperator, diagonal: Sequence[torch.Tensor]) -> None:
        self.op = op
        self.param_names, self.shapes = list(op.param_names), list(op.shapes)
        self.dtypes, self.devices = list(op.dtypes), list(op.devices)
        diagonal = op.check_vector(diagonal)
        if not all(bool((d > 0).all()) for d in diagonal):
            raise ValueError("the preconditioner's diagonal must be positive")
        self.scale_vector = [d.rsqrt() for d in diagonal]

    @property
    def product_rtol(self) -> float | None:
        """That of the wrapped operator (a diagonal scaling keeps a product's relative accuracy)."""
        return self.op.product_rtol

    def _matvec(self, v: TensorList) -> TensorList:
        w = [x * s for x, s in zip(v, self.scale_vector, strict=True)]
        return [x * s for x, s in zip(self.op.matvec(w), self.scale_vector, strict=True)]


def train_with_checkpoints(
    model: torch.nn.Module,
    train_batches: Sequence[L.Batch],
    steps: int,
    lr: float,
    save_every: int,
    folder: str | Path,
    betas: tuple[float, float] = (0.9, 0.95),
    grad_clip: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[pd.DataFrame, Any]:
    """Train ``model`` in place with :func:`continue_training` (AdamW, constant ``lr``), saving checkpoints.

    The callback saves ``folder/step_NNNNN.pt`` (``{"step", "state_dict", "exp_avg_sq"}``, the second moment
    from :class:`AdamSecondMoment`) at step 0 (the start, no Adam state), every ``save_every`` steps and at the
    last step. Returns ``(checkpoints, history)``: a frame ``step, path, train_loss`` (the loss of the step's
    batch before its update; NaN at step 0) and the :class:`~hess_utils.harness.training.TrainingHistory`.
    """
    from hess_utils.harness.training import continue_training

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    moment = AdamSecondMoment(model, betas[1])
    rows: list[dict[str, Any]] = []

    def save(step: int) -> None:
        path = folder / f"step_{step:05d}.pt"
        state = {n: p.detach().clone() for n, p in model.state_dict().items()}
        torch.save({"step": step, "state_dict": state, "exp_avg_sq": {n: v.clone() for n, v in moment.v.items()}},
                   path)
        rows.append({"step": step, "path": str(path)})

    def callback(step: int, trained: torch.nn.Module) -> None:
        moment.update(trained)
        if step % save_every == 0 or step == steps:
            save(step)

    save(0)
    history = continue_training(model, train_batches, None, steps, lr=lr, seed=seed, betas=betas,
                                grad_clip=grad_clip, progress=progress, callback=callback, desc="sharpness run")
    frame = pd.DataFrame(rows)
    losses = dict(zip(history.train_steps.tolist(), history.train_loss.tolist(), strict=True))
    frame["train_loss"] = [losses.get(s, math.nan) for s in frame["step"]]
    return frame, history


def sharpness_at_checkpoints(
    model: torch.nn.Module,
    checkpoints: pd.DataFrame,
    batches: Sequence[L.Batch],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    tol: float = 1e-4,
    preconditioned: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Raw and preconditioned top eigenvalues (``eigsh`` ``k=1``, ``"LA"``) at each checkpoint.

    ``model`` is loaded with each checkpoint's weights in turn (it is changed). Returns one row per checkpoint:
    ``step, loss`` (the loss on ``batches``), ``sharpness, residual, converged`` (of :math:`H`),
    ``preconditioned_sharpness, preconditioned_residual, preconditioned_converged`` (of :math:`P^{-1/2} H
    P^{-1/2}` with :func:`adam_preconditioner`; NaN at step 0, where Adam has no state, or without
    ``preconditioned``), and the thresholds ``gd_threshold`` (``2/lr``) and ``adam_threshold``.
    """
    thresholds = stability_thresholds(lr, betas[0])
    rows = []
    for step, path in zip(checkpoints["step"], checkpoints["path"], strict=True):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        model.eval()
        op = hessian_operator(model, batches, params=None, keep_graph=True)
        raw = eigsh(op, k=1, which="LA", tol=tol, seed=seed, check_multiplicity=False, progress=progress)
        row = {"step": int(step), "loss": float(op.loss()), "sharpness": float(raw.eigenvalues[0]),
               "residual": float(raw.residuals[0]), "converged": bool(raw.converged[0]),
               "preconditioned_sharpness": math.nan, "preconditioned_residual": math.nan,
               "preconditioned_converged": False}
        if preconditioned and saved["exp_avg_sq"]:
            diag = adam_preconditioner(saved["exp_avg_sq"], int(step), betas, eps)
            pre = PreconditionedOperator(op, [diag[n] for n in op.param_names])
            res = eigsh(pre, k=1, which="LA", tol=tol, seed=seed, check_multiplicity=False, progress=progress)
            row.update(preconditioned_sharpness=float(res.eigenvalues[0]),
                       preconditioned_residual=float(res.residuals[0]),
                       preconditioned_converged=bool(res.converged[0]))
        rows.append({**row, "gd_threshold": thresholds["gd"], "adam_threshold": thresholds["adam"]})
    return pd.DataFrame(rows)


def sharpness_study(
    model: torch.nn.Module,
    train_batches: Sequence[L.Batch],
    steps: int,
    lr: float,
    save_every: int,
    folder: str | Path,
    betas: tuple[float, float] = (0.9, 0.95),
    tol: float = 1e-4,
    seed: int = 0,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """:func:`train_with_checkpoints`, then :func:`sharpness_at_checkpoints` on the loss over all ``train_batches``.

    Returns ``({"checkpoints": ..., "sharpness": ...}, record)`` (the form :func:`hess_utils.runs.cached_results`
    takes); the sharpness table gains the checkpoints' ``train_loss``. ``model`` ends at the last checkpoint.
    """
    start = time.perf_counter()
    checkpoints, _ = train_with_checkpoints(model, train_batches, steps, lr, save_every, folder, betas=betas,
                                            seed=seed)
    train_seconds = time.perf_counter() - start
    table = sharpness_at_checkpoints(model, checkpoints, train_batches, lr=lr, betas=betas, tol=tol, seed=seed)
    table.insert(2, "train_loss", checkpoints["train_loss"].to_numpy())
    return ({"checkpoints": checkpoints, "sharpness": table},
            {"train_seconds": train_seconds, "sharpness_seconds": time.perf_counter() - start - train_seconds})


# ---------------------------------------------------------------------------------------------- influence
def dense_subset_hessian(model: torch.nn.Module, batches: Sequence[L.Batch], names: Sequence[str]) -> np.ndarray:
    """The exact Hessian (float64 numpy) of the mean loss w.r.t. whole tensors ``names``, in that (block) order.

    Built here by plain autograd, apart from the package's operators: the gradient of
    :func:`hess_utils.loss.lm_loss` with ``create_graph=True``, then one double backward per entry (row ``i`` is
    ``d g_i / d w``), so it checks the products that :func:`hess_utils.influence` solves with. One backward pass
    per selected scalar: for subsets of a few hundred entries.
    """
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # twice differentiable whatever the attention implementation
        grads = torch.autograd.grad(L.lm_loss(model, list(batches)), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1)
                               for r, p in zip(row, params, strict=True)]))
    matrix = torch.stack(rows).detach().to(torch.float64).cpu().numpy()
    return (matrix + matrix.T) / 2


def influence_table(
    model: torch.nn.Module,
    train_batches: Sequence[L.Batch],
    test_batch: L.Batch,
    params: ParamSelector,
    damping: float,
    dtype: torch.dtype | None = torch.float64,
    tol: float = 1e-10,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Influence of each training sequence on the test loss, by ``influence`` and by a dense solve.

    ``H`` is the Hessian of the mean loss over all ``train_batches`` w.r.t. the parameters ``params`` (a small
    subset); ``g_test`` the gradient of the loss on ``test_batch``, ``g_i`` that of each single training
    sequence. With ``dtype`` the model is copied in that dtype first (float64: the comparison measures the
    solver, not float32 rounding). CG is used when ``H + damping I`` is positive definite (by the dense
    eigenvalues), else MINRES.

    Returns ``(table, record)``: rows ``sequence, influence, dense, rel_diff`` (``|a - b| / |b|``), and a record
    with the subset (names, size), the dense ``lambda_min``/``lambda_max``, ``damping`` and ``method``.
    """
    work = copy.deepcopy(model).to(dtype) if dtype is not None else model
    work.eval()
    names = [n for n, _ in select_parameters(work, params)]
    train_batches = list(train_batches)
    sequences = [{k: v[i: i + 1] for k, v in b.items()} for b in train_batches for i in range(len(b["input_ids"]))]
    op = hessian_operator(work, train_batches, params=names, keep_graph=True)
    dense = dense_subset_hessian(work, train_batches, names)
    eigenvalues = np.linalg.eigvalsh(dense)
    method = "cg" if eigenvalues[0] + damping > 0 else "minres"
    g_test = hessian_operator(work, [test_batch], params=names).gradient()
    g_test_flat = V.flatten(g_test).numpy()
    solved = np.linalg.solve(dense + damping * np.eye(len(dense)), g_test_flat)
    rows = []
    for i, seq in enumerate(sequences):
        g_train = hessian_operator(work, [seq], params=names).gradient()
        value = influence(op, g_test, g_train, damping=damping, method=method, tol=tol, progress=False)
        exact = -float(solved @ V.flatten(g_train).numpy())
        rows.append({"sequence": i, "influence": value, "dense": exact,
                     "rel_diff": abs(value - exact) / abs(exact) if exact else math.nan})
    record = {"params": names, "subset_size": int(op.dim), "lambda_min": float(eigenvalues[0]),
              "lambda_max": float(eigenvalues[-1]), "damping": float(damping), "method": method,
              "dtype": str(dtype if dtype is not None else op.dtype)}
    return pd.DataFrame(rows), record


def influence_study(*args: Any, **kwargs: Any) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """:func:`influence_table` as ``({"influence": table}, record)``, the form ``cached_results`` takes."""
    table, record = influence_table(*args, **kwargs)
    return {"influence": table}, record


# ---------------------------------------------------------------------------------------------- summary
def summary_markdown(results: dict[str, tuple[dict[str, pd.DataFrame], dict[str, Any]]], tol: float,
                     sharpness: pd.DataFrame | None = None, influence: pd.DataFrame | None = None,
                     lr: float | None = None) -> str:
    """The notebook's conclusions, every number read from the tables of :func:`eigen_analysis` (per model, as
    ``{name: (tables, record)}``), :func:`sharpness_study` and :func:`influence_study`."""
    parts = []
    for name, (tables, record) in results.items():
        pairs, overlap = tables["eigenpairs"], tables["overlap"]
        parts.append(
            f"**{name}**: top eigenvalue {pairs['eigenvalue'].iloc[0]:.4g}; {int(pairs['converged'].sum())}/"
            f"{len(pairs)} pairs converged to tol {tol:g} in {record['num_products']} products "
            f"({record['eigsh_seconds']:.0f} s, worst relative residual {pairs['relative_residual'].max():.1e}); "
            f"the top {len(pairs)} eigenvectors hold {overlap['cumulative'].iloc[-1]:.1%} of the gradient "
            f"(the top one {overlap['cos2'].iloc[0]:.1%}).")
    if sharpness is not None:
        first, last = sharpness.iloc[0], sharpness.iloc[-1]
        pre = sharpness["preconditioned_sharpness"].dropna()
        parts.append(
            f"**Sharpness** (AdamW, η = {lr:g}, steps {int(first['step'])}-{int(last['step'])}): λ_max(H) went from "
            f"{first['sharpness']:.4g} to {last['sharpness']:.4g} (at most {sharpness['sharpness'].max():.4g}), "
            f"against 2/η = {first['gd_threshold']:.4g}; the preconditioned sharpness λ_max(P⁻¹H) ranged "
            f"{pre.min():.4g}-{pre.max():.4g} (last {last['preconditioned_sharpness']:.4g}) against Adam's "
            f"(2 + 2β₁)/((1 - β₁)η) = {first['adam_threshold']:.4g}.")
    if influence is not None:
        parts.append(f"**Influence**: over {len(influence)} training sequences the largest relative difference "
                     f"between `influence` and the dense solve is {influence['rel_diff'].max():.1e}.")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- plotting
def plot_module_mass(mass_module: pd.DataFrame, axes: Sequence[Any]) -> None:
    """One layers x module-kinds heat map per eigenvector (:func:`~hess_utils.algorithms.directions.
    plot_mass_heatmap`), titled with its rank and eigenvalue; as many as ``axes``."""
    from hess_utils.algorithms.directions import plot_mass_heatmap

    for ax, (rank, rows) in zip(axes, mass_module.groupby("rank", sort=True), strict=False):
        plot_mass_heatmap(rows, ax=ax)
        ax.tick_params(axis="x", labelrotation=90, labelsize="small")
        ax.set_title(f"v{rank}: λ = {rows['eigenvalue'].iloc[0]:.4g}", fontsize="small")


def plot_grid(grid: pd.DataFrame, ax: Any, title: str, label: str = "share of ||v||²") -> None:
    """A heat map of a frame (rows x columns labelled from its index and columns), with a colour bar."""
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], rotation=90, fontsize="x-small")
    ax.set_yticks(range(grid.shape[0]), [str(r) for r in grid.index], fontsize="x-small")
    ax.set_title(title, fontsize="small")
    ax.figure.colorbar(image, ax=ax, label=label)


def plot_sharpness(sharp: pd.DataFrame, axes: Sequence[Any]) -> None:
    """Raw sharpness against ``2/lr`` (left) and preconditioned sharpness against Adam's threshold (right), log y."""
    axes[0].plot(sharp["step"], sharp["sharpness"], "o-", label="λ_max(H)")
    axes[0].axhline(sharp["gd_threshold"].iloc[0], color="k", ls="--", label="2/η (gradient descent's edge)")
    axes[1].plot(sharp["step"], sharp["preconditioned_sharpness"], "o-", color="C1", label="λ_max(P⁻¹H), Adam's P")
    axes[1].axhline(sharp["adam_threshold"].iloc[0], color="k", ls="--", label="(2 + 2β₁)/((1 - β₁)η)")
    for ax, what in zip(axes, ["λ_max(H) (nats/token per unit²)", "λ_max(P⁻¹H) (per unit of step size)"],
                        strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("AdamW step")
        ax.set_ylabel(what)
        ax.legend(fontsize="small")


def eigen_runs(out: Path, models: Sequence[tuple[str, int, int, int | None, int | None]], data_name: str, k: int,
               tol: float, seed: int) -> dict[str, tuple[dict[str, pd.DataFrame], dict[str, Any]]]:
    """:func:`eigen_analysis` of each ``(model, seq_len, num_sequences, max_products, num_extra)``, computed once.

    Results go to ``out/10_eigen-DIGEST`` (:func:`hess_utils.runs.cached_results`); a budget
    (``max_products`` not None) turns the multiplicity check off. Prints one line per model: products, time,
    dimension. Returns ``{model: (tables, run.json)}``.
    """
    from functools import partial

    from hess_utils import runs
    from hess_utils.batches import load_batches
    from hess_utils.models import load_model

    results = {}
    for name, length, count, budget, extra in models:
        model, tokenizer = load_model(name)
        batches = load_batches(data_name, tokenizer, seq_len=length, num_sequences=count, batch_size=count, seed=seed)
        config = dict(model=name, data=data_name, seq_len=length, num_sequences=count, k=k, tol=tol, seed=seed,
                      max_products=budget, num_extra=extra, check_multiplicity=budget is None)
        compute = partial(eigen_analysis, model, batches, k=k, tol=tol, max_products=budget, num_extra=extra,
                          check_multiplicity=budget is None, seed=seed)
        tables, run = runs.cached_results(runs.result_dir(out, "10_eigen", config), config, compute, model=name,
                                          data=data_name)
        results[name] = (tables, run)
        print(f"{name}: {run['num_products']} products in {run['eigsh_seconds']:.0f} s "
              f"({run['seconds_per_product']:.2f} s each), dimension {run['dim']:,}")
        del model
    return results


def mass_figure(tables: dict[str, pd.DataFrame], name: str, k: int) -> Any:
    """Notebook 10: the top ``k`` eigenvectors' mass per layer and module kind, and the first one's per head."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, k + 1, figsize=(3.2 * (k + 3), 0.18 * tables["mass_module"]["layer"].nunique() + 3.5),
                             width_ratios=[1] * k + [3])
    plot_module_mass(tables["mass_module"], axes[:k])
    plot_grid(head_mass_grid(tables["mass_head"], rank=1), axes[k], "v1: attention mass per head")
    axes[k].set_xlabel("projection + head")
    fig.suptitle(f"{name}: share of ||v||² of the top eigenvectors per layer and module kind", y=1.02)
    fig.tight_layout()
    return fig


def overlap_view(results: dict[str, tuple[dict[str, pd.DataFrame], dict[str, Any]]]) -> Any:
    """Notebook 10: the gradient-overlap tables of every model, one styled table."""
    overlap = pd.concat([t["overlap"].assign(model=name) for name, (t, _) in results.items()], ignore_index=True)
    return overlap[["model", "rank", "eigenvalue", "cos2", "cumulative", "gradient_norm"]].style.format(
        {"eigenvalue": "{:.5g}", "cos2": "{:.4f}", "cumulative": "{:.4f}", "gradient_norm": "{:.4f}"}).set_caption(
        "share of the gradient along each eigenvector (cos²) and in the span of the top ones (cumulative)")


def sharpness_figure(sharp: pd.DataFrame, title: str) -> Any:
    """Notebook 10: raw and preconditioned sharpness at the checkpoints against their stability thresholds."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    plot_sharpness(sharp, axes)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

