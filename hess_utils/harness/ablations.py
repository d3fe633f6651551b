"""Measurements behind the HessFormer section 3 notebooks (00-04); each returns run folders or tables, never plots.

* :func:`spectrum_run`: one SLQ spectrum of a loaded model on a corpus sample, in a checkpointed run folder
  (:func:`hess_utils.algorithms.slq.slq` with ``checkpoint_dir``) with its provenance, so notebooks re-plot
  without recomputing.
* :func:`load_spectra`, :func:`spectrum_summary`: Ritz tables of several run folders, and the numbers the
  dataset study (section 3.3) compares: extreme Ritz values, negative mass, outliers.
* :func:`ghost_table`: how many ghosts plain Lanczos makes as the iterations grow, against full
  re-orthogonalisation and the exact eigenvalues of a dense matrix (section 3.2, "investigating the ghosts").
* :func:`reorth_costs`, :func:`basis_bytes`: the memory / compute trade-off of keeping the Lanczos basis on
  the device, in CPU memory, or not at all.
* :func:`parameter_devices`: where the parameters of a (possibly device-mapped) model really are (section 3.1).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hess_utils.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from hess_utils.operators.base import SymmetricOperator


# ---------------------------------------------------------------------------------------------- spectra
def spectrum_run(
    model: torch.nn.Module,
    tokenizer: Any,
    run_dir: str | Path,
    *,
    model_name: str,
    data: str,
    split: str = "train",
    seq_len: int = 64,
    num_sequences: int = 4,
    batch_size: int = 4,
    num_iters: int = 30,
    num_probes: int = 1,
    reorth: str = "partial",
    seed: int = 0,
    params: Any = None,
    method: str = "auto",
    keep_graph: bool = True,
    checkpoint_every: int = 10,
    progress: bool = True,
) -> Path:
    """SLQ of the loss Hessian of ``model`` on ``num_sequences x seq_len`` tokens of ``data``, in ``run_dir``.

    The batches are :func:`hess_utils.batches.load_batches` ``(data, tokenizer, seq_len, num_sequences, batch_size,
    split, seed)``; the operator is :func:`hess_utils.operators.hessian.hessian_operator` (``params``, ``method``,
    ``keep_graph``: each product after the first costs one backward pass per batch); the run is
    :func:`hess_utils.algorithms.slq.slq` with ``checkpoint_dir=run_dir`` and ``num_iters`` Lanczos steps per
    probe, probe ``p`` starting from the Rademacher vector of seed ``seed * 1_000_003 + p``. ``run_dir`` then
    holds ``ritz.csv`` (one row per Ritz pair), ``run.json`` (model, data, loss, tokens, dimension, devices,
    versions, timings) and the other tables of :mod:`hess_utils.runs`. A finished run folder of the same
    configuration is read back, nothing recomputed; one of another configuration is refused (every difference
    named).

    Returns
    -------
    Path
        ``run_dir``.
    """
    from hess_utils.algorithms.slq import slq
    from hess_utils.batches import load_batches
    from hess_utils.models import model_provenance
    from hess_utils.operators.hessian import hessian_operator

    run_dir = Path(run_dir)
    batches = load_batches(data, tokenizer, seq_len=seq_len, num_sequences=num_sequences, batch_size=batch_size,
                           split=split, seed=seed)
    op = hessian_operator(model, batches, params=params, method=method, keep_graph=keep_graph)
    config = {"model": model_name, "data": data, "split": split, "seq_len": seq_len, "num_sequences": num_sequences,
              "batch_size": batch_size, "params": params, "method": op.method, "reduction": "mean"}

    def record() -> dict[str, Any]:
        return {"model": model_name, "data": data, "split": split, "seq_len": seq_len,
                "num_sequences": num_sequences, "num_tokens": op.num_tokens, "dim": op.dim, "method": op.method,
                "loss": op.loss(), "model_provenance": model_provenance(model),
                "parameter_devices": sorted({str(p.device) for p in op.params})}

    slq(op, num_iters=num_iters, num_probes=num_probes, reorth=reorth, seed=seed, progress=progress,
        checkpoint_dir=run_dir, checkpoint_every=checkpoint_every, config=config, record=record)
    return run_dir


def load_spectra(run_dirs: Mapping[str, str | Path]) -> pd.DataFrame:
    """The ``ritz.csv`` tables of several finished runs, stacked with a ``label`` column (the mapping's keys).

    Columns: ``label, probe, value, weight, ghost, residual`` plus ``model, data, split, seq_len,
    num_sequences, num_tokens, loss, dim`` from each ``run.json``.
    """
    import pandas as pd

    from hess_utils.runs import load_run

    frames = []
    for label, folder in run_dirs.items():
        ritz, record = load_run(folder)
        ritz.insert(0, "label", label)
        for key in ("model", "data", "split", "seq_len", "num_sequences", "num_tokens", "loss", "dim"):
            ritz[key] = record.get(key)
        frames.append(ritz)
    if not frames:
        raise ValueError("no run folders given")
    return pd.concat(frames, ignore_index=True)


def spectrum_summary(ritz: pd.DataFrame, outlier_fraction: float = 0.1, zero_rtol: float = 1e-3,
                     by: str = "label") -> pd.DataFrame:
    """One row per ``by`` group of a Ritz table: the numbers section 3.3 compares between datasets.

    With Ritz values :math:`\\theta_j` and weights :math:`w_j` (averaged over the group's probes):

    ``lambda_max``, ``lambda_min``
        :math:`\\max_j \\theta_j`, :math:`\\min_j \\theta_j`.
    ``neg_ratio``
        :math:`|\\lambda_{min}| / \\lambda_{max}` (0 when no Ritz value is negative).
    ``near_zero_mass``
        :math:`\\sum_{|\\theta_j| \\le z} w_j` with :math:`z` = ``zero_rtol`` :math:`\\cdot \\max_j |\\theta_j|`: the
        weight of the peak at zero (its Ritz value lands a little above or below zero from run to run, so it is
        counted apart from both signs).
    ``negative_mass``
        :math:`\\sum_{\\theta_j < -z} w_j`: the share of the spectral measure on clearly negative eigenvalues.
    ``top_outliers``, ``negative_outliers``
        Ritz values above ``outlier_fraction * lambda_max`` and below ``-outlier_fraction * lambda_max``: the
        isolated eigenvalues outside the bulk (the bulk of a trained LM's Hessian sits within a few per cent of
        :math:`\\lambda_{max}` of zero). Lanczos finds extreme eigenvalues first, so these count Ritz values,
        whatever their weight.
    ``outlier_mass``
        :math:`\\sum_{|\\theta_j| > f \\lambda_{max}} w_j` with :math:`f` = ``outlier_fraction``: the share of the
        spectral measure outside the bulk.
    ``est_outlier_eigenvalues``
        ``dim * outlier_mass`` (when the table has a ``dim`` column): the estimated *number of eigenvalues* of
        :math:`H` outside the bulk, since each eigenvalue carries weight :math:`1/n` in the spectral measure.
    ``mean``
        :math:`\\sum_j w_j \\theta_j`, an estimate of :math:`\\operatorname{tr}(H)/n`.
    """
    import pandas as pd

    if not 0 < outlier_fraction < 1:
        raise ValueError(f"outlier_fraction must lie in (0, 1), got {outlier_fraction}")
    if not 0 <= zero_rtol < outlier_fraction:
        raise ValueError(f"zero_rtol must lie in [0, outlier_fraction), got {zero_rtol}")
    rows = []
    for key, group in ritz.groupby(by, sort=False):
        values = group["value"].to_numpy(np.float64)
        weights = group["weight"].to_numpy(np.float64) / group["probe"].nunique()
        top, bottom = float(values.max()), float(values.min())
        zero = zero_rtol * float(np.abs(values).max())
        row = {by: key, "lambda_max": top, "lambda_min": bottom,
               "neg_ratio": max(-bottom, 0.0) / top if top > 0 else float("nan"),
               "near_zero_mass": float(weights[np.abs(values) <= zero].sum()),
               "negative_mass": float(weights[values < -zero].sum()),
               "top_outliers": int((values > outlier_fraction * top).sum()),
               "negative_outliers": int((values < -outlier_fraction * top).sum()),
               "outlier_mass": float(weights[np.abs(values) > outlier_fraction * top].sum()),
               "mean": float((weights * values).sum())}
        if "dim" in group and group["dim"].notna().all():
            row["est_outlier_eigenvalues"] = float(group["dim"].iloc[0]) * row["outlier_mass"]
        for extra in ("data", "split", "seq_len", "num_sequences", "num_tokens", "loss"):
            if extra in group:
                row[extra] = group[extra].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- ghosts
def ghost_table(
    matrix: torch.Tensor,
    iterations: Sequence[int],
    seed: int = 0,
    copy_rtol: float = 1e-6,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Ghosts of plain Lanczos against full re-orthogonalisation on a dense symmetric matrix of known spectrum.

    One Lanczos run per mode on ``as_operator(matrix)`` (in the matrix's dtype) from the same Rademacher start
    vector (``seed``): ``"none"`` for ``max(iterations)`` steps, ``"full"`` for ``min(max(iterations), n)``.
    The first ``k`` steps of a run are the run of ``k`` steps, so each ``k`` of ``iterations`` is read off the
    prefix :math:`T_k` of the Lanczos matrix. With :math:`\\lambda_1 \\ge \\dots \\ge \\lambda_n` the exact
    eigenvalues (``numpy.linalg.eigvalsh`` in float64) and :math:`\\tau = ` ``copy_rtol`` :math:`\\cdot
    \\max|\\lambda|`, each row gives, for the Ritz values :math:`\\theta` of :math:`T_k`:

    ``cw_ghosts``
        Ritz values flagged by the Cullum-Willoughby test (:func:`hess_utils.cullum_willoughby_mask`, with the
        unit roundoff of the matrix's dtype): spurious values and extra copies.
    ``copies_of_top``
        Ritz values within :math:`\\tau` of :math:`\\lambda_1` (1 when the top eigenvalue has converged once).
    ``eigenvalues_found``
        Exact eigenvalues with a Ritz value within :math:`\\tau`.
    ``extra_converged``
        Ritz values within :math:`\\tau` of an eigenvalue, minus ``eigenvalues_found``: converged copies, i.e.
        products of :math:`H` spent finding an eigenvalue again (0 in exact arithmetic).
    ``top_error``
        :math:`|\\max\\theta - \\lambda_1|`.

    Returns
    -------
    (DataFrame, dict)
        The rows ``reorth, k, cw_ghosts, copies_of_top, eigenvalues_found, extra_converged, top_error`` and
        ``{"eigenvalues": exact eigenvalues (ascending), "runs": {mode: LanczosResult of the longest run}}``.
    """
    import pandas as pd

    from hess_utils.algorithms.ghosts import cullum_willoughby_mask
    from hess_utils.algorithms.lanczos import lanczos
    from hess_utils.algorithms.tridiagonal import tridiagonal_eigvalsh
    from hess_utils.operators.dense import as_operator

    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
    ks = sorted({int(k) for k in iterations})
    if not ks or ks[0] < 1:
        raise ValueError(f"iterations must be positive integers, got {list(iterations)}")
    n = matrix.shape[0]
    exact = np.linalg.eigvalsh(matrix.double().cpu().numpy())
    tau = copy_rtol * float(np.abs(exact).max())
    eps = float(torch.finfo(matrix.dtype).eps)
    op = as_operator(matrix)
    runs = {"none": lanczos(op, ks[-1], reorth="none", seed=seed, progress=progress),
            "full": lanczos(op, min(ks[-1], n), reorth="full", seed=seed, progress=progress)}
    rows = []
    for mode, run in runs.items():
        for k in ks:
            if k > run.num_iters:
                continue
            alphas, betas = run.alphas[:k], run.betas[: k - 1]
            theta = tridiagonal_eigvalsh(alphas, betas)
            # A re-orthogonalised run has no ghosts (as LanczosResult.ghost_mask): the test is for plain runs.
            ghosts = (cullum_willoughby_mask(alphas, betas, theta, unit_roundoff=eps, dim=n) if mode == "none"
                      else np.zeros(k, dtype=bool))
            dist_to_exact = np.min(np.abs(theta[:, None] - exact[None, :]), axis=1)
            found = int((np.min(np.abs(exact[:, None] - theta[None, :]), axis=1) <= tau).sum())
            rows.append({"reorth": mode, "k": k, "cw_ghosts": int(ghosts.sum()),
                         "copies_of_top": int((np.abs(theta - exact[-1]) <= tau).sum()),
                         "eigenvalues_found": found, "extra_converged": int((dist_to_exact <= tau).sum()) - found,
                         "top_error": float(abs(theta.max() - exact[-1]))})
    return pd.DataFrame(rows), {"eigenvalues": exact, "runs": runs}


def prefix_ritz(alphas: np.ndarray, betas: np.ndarray, k: int, unit_roundoff: float,
                reorth: str = "none", dim: int | None = None, last_beta: float | None = None) -> pd.DataFrame:
    """The Ritz table of the first ``k`` Lanczos steps: ``value, weight, ghost, residual`` (ascending values).

    :math:`T_k` is the leading ``k x k`` block of a longer run's Lanczos matrix; ``weight`` is the squared first
    component of each eigenvector (the Gauss quadrature weight), ``residual`` :math:`|\\beta_k s_{ki}|` (with
    :math:`\\beta_k` = ``betas[k - 1]`` when the run went further, else 0), ``ghost`` the Cullum-Willoughby mask
    computed with ``unit_roundoff`` (the machine epsilon of the run's arithmetic) for a ``reorth="none"`` run,
    all False for a re-orthogonalised one (as :attr:`LanczosResult.ghost_mask`); ``dim`` is the operator's
    dimension, for the default weight floor of :func:`hess_utils.cullum_willoughby_mask`.
    """
    import pandas as pd

    from hess_utils.algorithms.lanczos import ritz_from_tridiagonal

    alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
    if not 1 <= k <= alphas.size:
        raise ValueError(f"k must lie in [1, {alphas.size}] (the run's iterations), got {k}")
    if betas.size >= k:
        last = float(betas[k - 1])
    elif last_beta is not None:
        last = float(last_beta)
    else:  # a zero here would make every residual zero: the whole run's table needs its final beta
        raise ValueError(f"k = {k} is the run's last step: pass last_beta=run.last_beta for its residuals")
    values, weights, residual, ghost = ritz_from_tridiagonal(alphas[:k], betas[: k - 1], last, reorth,
                                                             unit_roundoff, dim)
    return pd.DataFrame({"value": values, "weight": weights, "ghost": ghost, "residual": residual})


def exact_spectral_measure(matrix: torch.Tensor, start: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The spectral measure of ``matrix`` seen from ``start``: eigenvalues and weights :math:`(u_i^\\top q)^2`.

    With :math:`H = \\sum_i \\lambda_i u_i u_i^\\top` and :math:`q = ` ``start`` :math:`/ \\lVert` ``start``
    :math:`\\rVert`, this is the measure that Lanczos from ``start`` approximates by Gauss quadrature (its Ritz
    values and weights converge to it as ``k`` reaches ``n``). Computed in float64 with ``numpy.linalg.eigh``.

    Returns
    -------
    (np.ndarray, np.ndarray)
        Ascending eigenvalues ``(n,)`` and their weights ``(n,)`` (summing to 1).
    """
    H = matrix.double().cpu().numpy()
    q = start.double().cpu().numpy().reshape(-1)
    if q.shape != (H.shape[0],):
        raise ValueError(f"start must have {H.shape[0]} entries, got {q.size}")
    values, vectors = np.linalg.eigh(H)
    weights = (vectors.T @ (q / np.linalg.norm(q))) ** 2
    return values, weights


# ---------------------------------------------------------------------------------------------- memory / compute
def basis_bytes(dim: int, num_iters: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a kept Lanczos basis: ``(num_iters + 1) * dim`` entries of ``dtype``."""
    return (int(num_iters) + 1) * int(dim) * torch.tensor([], dtype=dtype).element_size()


def reorth_costs(
    op: SymmetricOperator,
    num_iters: int,
    modes: Sequence[str] = ("none", "partial", "full", "offload"),
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Measure re-orthogonalisation modes on one operator: time per iteration and where the basis is.

    Each mode runs ``num_iters`` Lanczos steps from the same start vector (``seed``); every step is timed, and
    the time of its product with ``H`` is timed separately, so ``reorth_s_per_iter`` is the cost of the
    re-orthogonalisation alone (plus the recurrence's vector updates). Memory is read off the Lanczos state:
    the basis tensors it holds and their devices.

    Returns
    -------
    pandas.DataFrame
        One row per mode: ``reorth, iterations, s_per_iter, matvec_s_per_iter, reorth_s_per_iter,
        basis_bytes_on_operator_device, basis_bytes_in_cpu_memory, working_vector_bytes, operator_device,
        orthogonality_loss, cw_ghosts``. ``working_vector_bytes`` counts the three vectors every mode keeps
        on the operator's device (:math:`q_j`, :math:`q_{j-1}` and the product). On a CPU-only machine the
        operator's device *is* CPU memory, so the full and offloaded bases land in the same memory and only
        the copy differs; on an accelerator ``"offload"`` keeps the device's share at three vectors.
    """
    import pandas as pd

    from hess_utils.algorithms.lanczos import lanczos_finish, lanczos_init, lanczos_step

    class _Timed:
        """The operator, with the seconds spent in its products added up."""

        def __init__(self, inner: SymmetricOperator) -> None:
            self.inner, self.seconds = inner, 0.0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def matvec(self, v):
            start = time.perf_counter()
            out = self.inner.matvec(v)
            self.seconds += time.perf_counter() - start
            return out

    device = str(op.devices[0])
    element = torch.tensor([], dtype=op.dtypes[0]).element_size()
    rows = []
    for mode in modes:
        timed = _Timed(op)
        state = lanczos_init(op, num_iters, reorth=mode, seed=seed)
        start = time.perf_counter()
        for _ in progress_bar(range(num_iters), desc=f"lanczos reorth={mode}", disable=not progress, leave=False):
            if state.done:
                break
            lanczos_step(timed, state)  # type: ignore[arg-type]
        total = time.perf_counter() - start
        result = lanczos_finish(state)
        on_device = sum(t.numel() * t.element_size() for t in (state.basis or []) if str(t.device) == device)
        on_cpu = sum(t.numel() * t.element_size() for t in (state.basis or []) if t.device.type == "cpu")
        k = result.num_iters
        rows.append({"reorth": mode, "iterations": k, "s_per_iter": total / k, "matvec_s_per_iter": timed.seconds / k,
                     "reorth_s_per_iter": (total - timed.seconds) / k, "basis_bytes_on_operator_device": on_device,
                     "basis_bytes_in_cpu_memory": on_cpu, "working_vector_bytes": 3 * op.dim * element,
                     "operator_device": device, "orthogonality_loss": result.orthogonality_loss,
                     "cw_ghosts": int(result.ghost_mask.sum())})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- devices
def parameter_devices(model: torch.nn.Module) -> pd.DataFrame:
    """Where the parameters really are: one row per device with ``parameters`` (count), ``entries``, ``bytes``."""
    import pandas as pd

    rows: dict[str, dict[str, int]] = {}
    for p in model.parameters():
        row = rows.setdefault(str(p.device), {"parameters": 0, "entries": 0, "bytes": 0})
        row["parameters"] += 1
        row["entries"] += p.numel()
        row["bytes"] += p.numel() * p.element_size()
    return pd.DataFrame([{"device": d, **r} for d, r in sorted(rows.items())])
