"""Small, reusable measurements behind the notebooks (03-09): each returns tables (or a conclusion's Markdown built
from tested numbers), never plots; the notebooks' figures are drawn in :mod:`hess_utils.harness.notebook_setup`.

Finite differences against exact products (:func:`fd_error_sweep`), the precision of a product in a low
dtype (:func:`hvp_precision`), Hessians from growing numbers of sequences (:func:`per_sequence_subset_hessians`,
:func:`batch_size_errors`), Hutchinson convergence against an exact diagonal (:func:`hutchinson_convergence`),
spectral mass near zero (:func:`near_zero_mass`, :func:`ritz_zero_test`), cost of products against gradients
(:func:`gradient_and_hvp_costs`, :func:`scaling_study`, :func:`fit_power_law`) and spectra computed by the
command line in other processes (:func:`spectrum_subprocess`, :func:`compare_ritz`).

All norms and reductions are accumulated in float64, whatever the dtype of the products.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hess_utils import loss as L
from hess_utils import vectors as V
from hess_utils._memory import return_freed_memory
from hess_utils.algorithms.lanczos import machine_epsilon
from hess_utils.algorithms.probes import probe_seed
from hess_utils.dtypes import as_dtype
from hess_utils.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from hess_utils.operators.base import SymmetricOperator

def unit_roundoff(dtype: str | torch.dtype) -> float:
    """``u = eps / 2`` of a floating dtype (1.1e-16 float64, 6.0e-8 float32, 3.9e-3 bfloat16)."""
    return machine_epsilon([as_dtype(dtype)]) / 2


def relative_error(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` of two vector lists, computed in float64 (``b`` is the reference)."""
    fa, fb = V.flatten(a), V.flatten(b)
    if fa.shape != fb.shape:
        raise ValueError(f"vectors of different sizes: {fa.numel()} and {fb.numel()}")
    denominator = float(fb.norm())
    if denominator == 0:
        raise ValueError("the reference vector is zero: a relative error is undefined")
    return float((fa - fb).norm()) / denominator


# ---------------------------------------------------------------------------------------------- precision
def _cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy of ``model`` in ``dtype`` (eval mode), leaving ``model`` untouched."""
    return copy.deepcopy(model).to(dtype).eval()


def hvp_precision(
    op: SymmetricOperator, reference: SymmetricOperator, num_vectors: int = 2, seed: int = 0, probe: str = "gaussian"
) -> pd.DataFrame:
    """How far ``op``'s products are from ``reference``'s on the same vectors.

    The vectors are drawn by ``op`` (in its dtype) and given to ``reference`` converted exactly to its
    dtype, so both see the same vector. For each: ``rel_error = ||H v - H_ref v|| / ||H_ref v||`` and
    ``abs_error = ||H v - H_ref v|| / ||v||``, the second an eigenvalue-sized noise floor: an eigenvalue
    smaller than it cannot be told from zero with ``op``.

    Returns
    -------
    DataFrame
        ``vector, rel_error, abs_error, hv_norm`` (``hv_norm = ||H_ref v|| / ||v||``), one row per vector.
    """
    import pandas as pd

    if op.dim != reference.dim:
        raise ValueError(f"operators of different dimensions: {op.dim} and {reference.dim}")
    rows = []
    for k in range(int(num_vectors)):
        v = op.random_vector(probe, probe_seed(seed, k))
        v_ref = [x.to(dtype=d, device=dev) for x, d, dev in zip(v, reference.dtypes, reference.devices, strict=True)]
        hv, hv_ref = V.flatten(op.matvec(v)), V.flatten(reference.matvec(v_ref))
        diff = float((hv - hv_ref).norm())
        v_norm = float(V.flatten(v).norm())
        rows.append({"vector": k, "rel_error": diff / float(hv_ref.norm()), "abs_error": diff / v_norm,
                     "hv_norm": float(hv_ref.norm()) / v_norm})
    return pd.DataFrame(rows)


def fd_error_sweep(
    model: torch.nn.Module,
    batches: Iterable[L.Batch],
    eps_values: Sequence[float],
    dtypes: Sequence[str] = ("float64", "float32", "bfloat16"),
    num_vectors: int = 2,
    seed: int = 0,
    params: Any = None,
    progress: bool = True,
    vector_kinds: Sequence[str] = ("gaussian",),
) -> pd.DataFrame:
    r"""Relative error of finite-difference and exact products in several dtypes, against float64 exact.

    For each dtype the model is copied into it; for each of ``num_vectors`` vectors ``v`` of each kind the
    reference is the exact reverse-over-reverse product of a float64 copy on the same ``v`` (``v`` is rounded
    to the dtype first, so both see the same vector). Kinds: ``"gaussian"``, drawn in the dtype (spread over
    all parameters); ``"krylov"``, :math:`H r / \|H r\|` for a Rademacher ``r`` (computed in float64, then
    rounded), the kind of vector Lanczos multiplies after its first step, concentrated on few parameters.

    The central difference :math:`(g(w + h v) - g(w - h v)) / 2h` with the package's step
    :math:`h = \epsilon \langle |v|, |w| \rangle / \|v\|^2`
    (:func:`~hess_utils.operators.hessian.fd_step_size`) has a truncation error :math:`O(\epsilon^2)` and a
    rounding error :math:`O(u / \epsilon)` (unit roundoff :math:`u`), so its error over :math:`\epsilon` is a
    U-curve with its bottom near :math:`\epsilon \approx u^{1/3}`; the exact product in the same dtype is the
    rounding floor.

    Parameters
    ----------
    model
        A causal LM in eval mode (any dtype; it is not modified).
    batches
        The batches of the loss.
    eps_values
        Relative steps :math:`\epsilon` to try.
    dtypes
        Names among ``float64``, ``float32``, ``bfloat16``, ``float16``.
    num_vectors, seed
        Vector ``k`` is ``op.random_vector("gaussian", probe_seed(seed, k))``.
    params
        Parameter selection, as in :func:`~hess_utils.operators.hessian.hessian_operator`.

    vector_kinds
        Among ``"gaussian"`` and ``"krylov"``.

    Returns
    -------
    DataFrame
        ``dtype, kind, method, eps, vector, rel_error`` with ``method`` ``"fd"`` (one row per eps) or
        ``"rev-rev"`` (``eps`` NaN), and ``unit_roundoff`` of the dtype.
    """
    import pandas as pd

    from hess_utils.operators.hessian import hessian_operator

    eps_values = [float(e) for e in eps_values]
    if not eps_values or min(eps_values) <= 0:
        raise ValueError("eps_values must be a non-empty list of positive relative steps, e.g. np.logspace(-8, 0, 9)")
    unknown = set(vector_kinds) - {"gaussian", "krylov"}
    if unknown or not vector_kinds:
        raise ValueError(f"unknown vector kinds {sorted(unknown)}; choose among 'gaussian' and 'krylov'")
    batches = list(batches)
    reference = hessian_operator(_cast_model(model, torch.float64), batches, params=params, method="rev-rev")
    krylov = []
    if "krylov" in vector_kinds:
        for k in range(int(num_vectors)):
            hr = reference.matvec(reference.random_vector("rademacher", probe_seed(seed, k)))
            krylov.append(V.scaled(1.0 / V.norm(hr), hr))
    rows = []
    total = len(dtypes) * len(vector_kinds) * num_vectors * (len(eps_values) + 1)
    sweep_bar = progress_bar(total=total, desc="finite-difference sweep", disable=not progress)
    with sweep_bar as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the low-precision warning is the point of the sweep
        for name in dtypes:
            dtype = as_dtype(name)
            low = _cast_model(model, dtype)
            exact = hessian_operator(low, batches, params=params, method="rev-rev")
            for kind in vector_kinds:
                for k in range(int(num_vectors)):
                    if kind == "gaussian":
                        v = exact.random_vector("gaussian", probe_seed(seed, k))
                    else:
                        v = [x.to(dtype) for x in krylov[k]]
                    ref = reference.matvec([x.to(torch.float64) for x in v])
                    rows.append({"dtype": name, "kind": kind, "method": "rev-rev", "eps": math.nan, "vector": k,
                                 "rel_error": relative_error(exact.matvec(v), ref)})
                    bar.update()
                    for eps in eps_values:
                        fd = hessian_operator(low, batches, params=params, method="fd", fd_eps=eps)
                        rows.append({"dtype": name, "kind": kind, "method": "fd", "eps": eps, "vector": k,
                                     "rel_error": relative_error(fd.matvec(v), ref)})
                        bar.update()
            del low, exact
    frame = pd.DataFrame(rows)
    frame["unit_roundoff"] = [unit_roundoff(d) for d in frame["dtype"]]
    return frame


def fd_best_eps(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per dtype (and vector kind) of a :func:`fd_error_sweep` table: the step with the smallest mean error,
    that error, the exact product's error, and the rule of thumb :math:`u^{1/3}`."""
    import pandas as pd

    keys = ["dtype", "kind"] if "kind" in sweep.columns else ["dtype"]
    rows = []
    for key, group in sweep.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        fd = group[group["method"] == "fd"].groupby("eps")["rel_error"].mean()
        exact = group[group["method"] == "rev-rev"]["rel_error"].mean()
        u = unit_roundoff(key[0])
        rows.append({**dict(zip(keys, key)), "best_eps": float(fd.idxmin()), "best_fd_error": float(fd.min()),
                     "exact_error": float(exact), "u": u, "u^(1/3)": u ** (1 / 3)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- magnitudes
def log_magnitude_histogram(values: np.ndarray, low: int = -16, high: int = 2, per_decade: int = 4) -> pd.DataFrame:
    """Histogram of ``log10 |x|`` of an array's entries, with exact zeros counted apart.

    Bins are ``per_decade`` per decade from ``10**low`` to ``10**high``; magnitudes below ``10**low`` (but not
    zero) go to the first bin and above ``10**high`` to the last, so counts always add up to ``x.size``.

    Returns
    -------
    DataFrame
        ``lo, hi, count, fraction``: one row per bin (edges in magnitude, not in log), then one row with
        ``lo = hi = 0`` for exact zeros.
    """
    import pandas as pd

    if high <= low or per_decade < 1:
        raise ValueError("need high > low and per_decade >= 1")
    x = np.abs(np.asarray(values, dtype=np.float64).reshape(-1))
    if x.size == 0:
        raise ValueError("empty array")
    if not np.isfinite(x).all():
        raise ValueError("the array holds NaN or infinite entries")
    edges = np.linspace(low, high, (high - low) * per_decade + 1)
    nonzero = x[x > 0]
    logs = np.clip(np.log10(nonzero), low, high)
    counts, _ = np.histogram(logs, bins=edges)
    frame = pd.DataFrame({"lo": 10.0 ** edges[:-1], "hi": 10.0 ** edges[1:], "count": counts})
    frame = pd.concat([frame, pd.DataFrame({"lo": [0.0], "hi": [0.0], "count": [x.size - nonzero.size]})],
                      ignore_index=True)
    frame["fraction"] = frame["count"] / x.size
    return frame


# ---------------------------------------------------------------------------------------------- batch size
def split_sequences(batches: Iterable[L.Batch]) -> list[L.Batch]:
    """One single-sequence batch per row of every batch (tensors sliced along their first dimension)."""
    out = []
    for batch in batches:
        size = batch["input_ids"].shape[0]
        for i in range(size):
            out.append({k: (v[i : i + 1] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == size else v)
                        for k, v in batch.items()})
    if not out:
        raise ValueError("no sequence in the batches")
    return out


def per_sequence_subset_hessians(
    model: torch.nn.Module, batches: Iterable[L.Batch], subset: Mapping[str, Any], progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Summed-loss Hessians of a parameter subset, one per sequence (the perplexity paper, section 7).

    The summed token loss is additive over sequences, so the mean-loss Hessian of the first ``b``
    sequences is ``sum_{i<b} H_i / sum_{i<b} N_i`` (``N_i`` predicted tokens of sequence ``i``).

    Returns
    -------
    hessians : np.ndarray, shape (num_sequences, n, n), float64
        ``H_i``, the Hessian of the *summed* loss of sequence ``i``.
    tokens : np.ndarray, shape (num_sequences,), int64
        ``N_i``.
    """
    from hess_utils.algorithms.subsets import subset_hessian
    from hess_utils.operators.hessian import hessian_operator

    sequences = split_sequences(batches)
    mats, tokens = [], []
    for seq in progress_bar(sequences, desc="per-sequence subset Hessians", disable=not progress):
        op = hessian_operator(model, [seq], params=list(subset), reduction="sum")
        result = subset_hessian(op, subset, progress=False)
        mats.append(result.matrix.to(torch.float64).numpy())
        tokens.append(result.num_tokens)
    return np.stack(mats), np.asarray(tokens, dtype=np.int64)


def batch_size_errors(hessians: np.ndarray, tokens: np.ndarray, sizes: Sequence[int] | None = None) -> pd.DataFrame:
    r"""Relative errors of the Hessian of the first ``b`` sequences (the perplexity paper, section 5.3).

    With :math:`H^b = \sum_{i<b} H_i / \sum_{i<b} N_i` and the reference :math:`H^B` over all ``B``
    sequences: ``rel_error = ||H^b - H^B|| / ||H^B||`` and ``rel_diff = ||H^{b+1} - H^b|| / ||H^{b+1}||``,
    each in the spectral norm (``_2``, the paper's) and the Frobenius norm (``_fro``).

    Parameters
    ----------
    hessians : array (B, n, n)
        Summed-loss Hessians per sequence (:func:`per_sequence_subset_hessians`).
    tokens : array (B,)
        Predicted tokens per sequence.
    sizes : sequence of int, optional
        The ``b`` to report (default ``1..B``).

    Returns
    -------
    DataFrame
        ``b, rel_error_2, rel_error_fro, rel_diff_2, rel_diff_fro`` (``rel_diff`` NaN at ``b = B``).
    """
    import pandas as pd

    hessians = np.asarray(hessians, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if hessians.ndim != 3 or hessians.shape[1] != hessians.shape[2] or hessians.shape[0] != tokens.shape[0]:
        raise ValueError(f"need hessians of shape (B, n, n) and tokens of shape (B,), got {hessians.shape} and "
                         f"{tokens.shape}")
    count = hessians.shape[0]
    sizes = list(range(1, count + 1)) if sizes is None else sorted({int(b) for b in sizes})
    if sizes[0] < 1 or sizes[-1] > count:
        raise ValueError(f"batch sizes must lie in [1, {count}]")
    cum_h, cum_n = np.cumsum(hessians, axis=0), np.cumsum(tokens)

    def mean_hessian(b: int) -> np.ndarray:
        return cum_h[b - 1] / cum_n[b - 1]

    def norms(x: np.ndarray) -> tuple[float, float]:
        return float(np.linalg.norm(x, 2)), float(np.linalg.norm(x, "fro"))

    ref = mean_hessian(count)
    ref2, ref_f = norms(ref)
    rows = []
    for b in sizes:
        hb = mean_hessian(b)
        e2, ef = norms(hb - ref)
        row = {"b": b, "rel_error_2": e2 / ref2, "rel_error_fro": ef / ref_f, "rel_diff_2": math.nan,
               "rel_diff_fro": math.nan}
        if b < count:
            nxt = mean_hessian(b + 1)
            d2, df = norms(nxt - hb)
            n2, nf = norms(nxt)
            row.update(rel_diff_2=d2 / n2, rel_diff_fro=df / nf)
        rows.append(row)
    return pd.DataFrame(rows)


def within_block_fraction(matrix: np.ndarray, offsets: Sequence[int]) -> float:
    """Share of ``||H||_F^2`` in the diagonal blocks ``H[o_i:o_{i+1}, o_i:o_{i+1}]`` of a partition.

    1 for a block-diagonal matrix; ``sum_i n_i^2 / n^2`` on average for a matrix of i.i.d. entries.

    Parameters
    ----------
    matrix : array (n, n)
    offsets : sequence of int
        ``0 = o_0 < o_1 < ... < o_m = n`` (e.g. :attr:`~hess_utils.algorithms.subsets.SubsetHessian.offsets`).
    """
    h = np.asarray(matrix, dtype=np.float64)
    offsets = [int(o) for o in offsets]
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"need a square matrix, got shape {h.shape}")
    if offsets[0] != 0 or offsets[-1] != h.shape[0] or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"offsets must increase from 0 to {h.shape[0]}, got {offsets}")
    total = float((h**2).sum())
    if total == 0:
        raise ValueError("the matrix is zero")
    inside = sum(float((h[a:b, a:b] ** 2).sum()) for a, b in zip(offsets, offsets[1:]))
    return inside / total


# ---------------------------------------------------------------------------------------------- Hutchinson
@dataclass(frozen=True)
class HutchinsonConvergence:
    """A convergence curve of the Hutchinson diagonal and snapshots of the estimate.

    Attributes
    ----------
    curve : DataFrame
        ``k, rel_error, rel_diff``: ``rel_error = ||[D^k - D]_S|| / ||[D]_S||`` on the entries ``S`` whose exact
        value is known (the paper's eq. 2), ``rel_diff = ||D^k - D^{k-1}|| / ||D^k||`` over all entries (its
        eq. 3, indexed by the later estimate; NaN at ``k = 1``).
    snapshots : dict[int, np.ndarray]
        ``k -> D^k`` (flat float64, operator order) for the requested ``k``.
    stderr : np.ndarray
        Standard error of the final estimate, entry by entry.
    """

    curve: pd.DataFrame
    snapshots: dict[int, np.ndarray]
    stderr: np.ndarray


def hutchinson_convergence(
    op: SymmetricOperator,
    exact: np.ndarray,
    exact_indices: Sequence[int] | np.ndarray,
    num_probes: int,
    snapshot_at: Sequence[int] = (1,),
    seed: int = 0,
    probe: str = "rademacher",
    progress: bool = True,
) -> HutchinsonConvergence:
    """Run :func:`~hess_utils.algorithms.hutchinson.hutchinson_diagonal` and record its convergence.

    Parameters
    ----------
    op
        The operator whose diagonal ``D`` is estimated (``dim`` entries).
    exact : array (m,)
        Exact diagonal entries (e.g. from :func:`~hess_utils.algorithms.subsets.subset_hessian`).
    exact_indices : array (m,)
        Their flat positions in ``op``'s vectors.
    num_probes
        ``K``; the last estimate is always kept as a snapshot too.
    """
    import pandas as pd

    from hess_utils.algorithms.hutchinson import hutchinson_diagonal

    exact = np.asarray(exact, dtype=np.float64).reshape(-1)
    idx = np.asarray(exact_indices, dtype=np.int64).reshape(-1)
    if exact.shape != idx.shape:
        raise ValueError(f"exact has {exact.size} entries but exact_indices {idx.size}")
    if idx.size == 0 or idx.min() < 0 or idx.max() >= op.dim:
        raise ValueError(f"exact_indices must be non-empty and lie in [0, {op.dim})")
    exact_norm = float(np.linalg.norm(exact))
    if exact_norm == 0:
        raise ValueError("the exact diagonal is zero: a relative error is undefined")
    keep = {int(k) for k in snapshot_at} | {int(num_probes)}
    rows: list[dict[str, float]] = []
    snapshots: dict[int, np.ndarray] = {}
    previous: list[np.ndarray] = []

    def record(k: int, estimate: list[torch.Tensor]) -> None:
        flat = V.flatten(estimate).cpu().numpy()
        rel_diff = math.nan
        if previous:
            rel_diff = float(np.linalg.norm(flat - previous[0]) / max(np.linalg.norm(flat), np.finfo(float).tiny))
        rows.append({"k": k, "rel_error": float(np.linalg.norm(flat[idx] - exact)) / exact_norm, "rel_diff": rel_diff})
        previous[:] = [flat]
        if k in keep:
            snapshots[k] = flat

    result = hutchinson_diagonal(op, num_probes, seed=seed, probe=probe, progress=progress, callback=record)
    return HutchinsonConvergence(pd.DataFrame(rows), snapshots, result.to_numpy()[1])


# ---------------------------------------------------------------------------------------------- near zero
def near_zero_mass(values: np.ndarray, weights: np.ndarray, thresholds: Sequence[float],
                   num_probes: int = 1) -> pd.DataFrame:
    """Spectral mass of ``|lambda| < t`` for each threshold ``t`` (SLQ weights, averaged over probes).

    ``weights`` are per-probe quadrature weights (each probe's sum to 1), so the mass is
    ``sum(weights[|values| < t]) / num_probes``, the SLQ estimate of the fraction of eigenvalues below ``t``.

    Returns
    -------
    DataFrame
        ``threshold, mass, nodes`` (``nodes``: how many Ritz values fall below it).
    """
    import pandas as pd

    values, weights = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if values.shape != weights.shape:
        raise ValueError("values and weights must have the same shape")
    if num_probes < 1:
        raise ValueError("num_probes must be at least 1")
    rows = []
    for t in thresholds:
        below = np.abs(values) < float(t)
        rows.append({"threshold": float(t), "mass": float(weights[below].sum()) / num_probes,
                     "nodes": int(below.sum())})
    return pd.DataFrame(rows)


def ritz_zero_test(ritz: pd.DataFrame, noise_floor: float = 0.0) -> pd.DataFrame:
    """Which Ritz values can be told apart from zero.

    A Ritz value ``theta`` with residual estimate ``r`` (``beta_k |s_ki|``) lies within ``r`` of an eigenvalue
    of ``H`` (Kahan/Parlett bound for symmetric matrices); and products computed with an absolute error
    ``noise_floor`` per unit vector (see :func:`hvp_precision`) blur every eigenvalue by about that much.
    ``theta`` is resolved from zero when ``|theta| > r + noise_floor``.

    Parameters
    ----------
    ritz : DataFrame
        With columns ``value, weight, residual`` (e.g. ``ritz.csv`` of a run).
    noise_floor : float
        Absolute eigenvalue uncertainty of the products.

    Returns
    -------
    DataFrame
        ``ritz`` with added ``bound = residual + noise_floor`` and ``resolved`` (bool).
    """
    missing = {"value", "weight", "residual"} - set(ritz.columns)
    if missing:
        raise ValueError(f"the Ritz table lacks columns {sorted(missing)} (use ritz.csv of a spectrum run)")
    out = ritz.copy()
    out["bound"] = out["residual"].astype(float) + float(noise_floor)
    out["resolved"] = out["value"].abs() > out["bound"]
    return out


# ---------------------------------------------------------------------------------------------- costs
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _PeakRSS:
    """Sample the resident set size every ``interval`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure_cost(fn: Callable[[], Any], repeats: int = 3, device: torch.device | str = "cpu") -> dict[str, float]:
    """Median wall time of ``fn()`` over ``repeats`` calls (after one warm-up) and its peak extra memory.

    Memory is the peak over the timed calls of what ``fn`` allocates beyond what was held before: on CUDA
    ``torch.cuda.max_memory_allocated`` minus the allocation before; on CPU the resident set size sampled
    every 2 ms minus the RSS before (after returning freed heap to the OS), an approximation that can miss
    very short peaks.

    Returns
    -------
    dict
        ``seconds`` (median), ``seconds_min``, ``peak_mib``.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    device = torch.device(device)
    fn()  # warm-up: allocator caches, lazy initialisation
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        else:
            return_freed_memory()  # so that the RSS baseline of a measurement is honest
            base = _rss_bytes()
            with _PeakRSS() as sampler:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            peaks.append(max(sampler.peak - base, 0))
    return {"seconds": statistics.median(times), "seconds_min": min(times), "peak_mib": max(peaks) / 2**20}


def gradient_and_hvp_costs(
    model: torch.nn.Module,
    batches: Iterable[L.Batch],
    methods: Sequence[str] = ("rev-rev", "fd"),
    repeats: int = 3,
    seed: int = 0,
) -> pd.DataFrame:
    """Time and peak memory of one gradient and of one Hessian-vector product per method, same batches.

    The gradient is that of the summed loss over ``batches`` (one forward and backward per batch, nothing
    kept between calls); products come from :func:`~hess_utils.operators.hessian.hessian_operator` with
    graphs rebuilt every call (no ``keep_graph``), so the ratio is the honest per-product overhead.

    Returns
    -------
    DataFrame
        ``op, seconds, seconds_min, peak_mib, ratio_to_gradient, num_params`` with ``op`` ``"gradient"`` or
        a method name.
    """
    import pandas as pd

    from hess_utils.operators.hessian import hessian_operator, only_these_require_grad

    batches = list(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device

    def gradient() -> None:
        with torch.enable_grad(), only_these_require_grad(model, params):
            for batch in batches:
                torch.autograd.grad(L.batch_loss_sum(model, batch), params, allow_unused=True)

    rows = [{"op": "gradient", **measure_cost(gradient, repeats, device)}]
    for method in methods:
        op = hessian_operator(model, batches, method=method)
        v = op.random_vector("rademacher", seed)
        rows.append({"op": method, **measure_cost(lambda op=op, v=v: op.matvec(v), repeats, device)})
    frame = pd.DataFrame(rows)
    frame["ratio_to_gradient"] = frame["seconds"] / frame.loc[0, "seconds"]
    frame["num_params"] = sum(p.numel() for p in params)
    return frame


def scaling_study(
    configs: Mapping[str, Any],
    batches: Iterable[L.Batch],
    methods: Sequence[str] = ("rev-rev", "fd"),
    repeats: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`gradient_and_hvp_costs` for models built from each config (random weights, float32, eager).

    Parameters
    ----------
    configs
        ``{label: transformers config}``, e.g. widths of one family from
        :func:`hess_utils.harness.zoo.tiny_config`. Costs do not depend on the weights' values.
    batches
        Token batches valid for every config (same vocabulary).

    Returns
    -------
    DataFrame
        The rows of :func:`gradient_and_hvp_costs` with a ``model`` column (the label).
    """
    import pandas as pd
    from transformers import AutoModelForCausalLM

    batches = list(batches)
    frames = []
    for label, config in progress_bar(list(configs.items()), desc="models", disable=not progress):
        config = copy.deepcopy(config)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
        vocab = config.vocab_size
        if max(int(b["input_ids"].max()) for b in batches) >= vocab:
            raise ValueError(f"{label}: the batches hold token ids beyond its vocabulary ({vocab})")
        frame = gradient_and_hvp_costs(model, batches, methods=methods, repeats=repeats, seed=seed)
        frame.insert(0, "model", label)
        frames.append(frame)
        del model
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class PowerLaw:
    """``y = coefficient * x ** exponent``, fitted by least squares on ``log y`` against ``log x``.

    ``r2`` is the coefficient of determination of that log-log fit.
    """

    coefficient: float
    exponent: float
    r2: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.coefficient * np.asarray(x, dtype=np.float64) ** self.exponent


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Fit ``y = a x^b`` to positive data (least squares in log-log space)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.size < 2:
        raise ValueError("need at least two (x, y) pairs of equal length")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("a power law needs positive x and y")
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    fitted = intercept + slope * lx
    total = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float(((ly - fitted) ** 2).sum()) / total if total > 0 else 1.0
    return PowerLaw(float(math.exp(intercept)), float(slope), r2)


# ---------------------------------------------------------------------------------------------- CLI runs
def spectrum_subprocess(
    out: str | Path,
    options: Mapping[str, Any],
    nproc: int | None = None,
    timeout: float = 1800,
    threads_per_process: int = 1,
) -> Path:
    """Run ``python -m hess_utils spectrum`` in a new process (under torchrun when ``nproc`` is given).

    Parameters
    ----------
    out
        The run folder (``--out``). A finished run is not recomputed (the CLI says so and exits).
    options
        ``{option: value}`` without the leading dashes, underscores allowed (``{"num_iters": 10,
        "engine": "fsdp"}``); ``True`` adds a bare flag.
    nproc
        Number of processes under ``torch.distributed.run --standalone`` (gloo on CPU); None: one plain process.
    timeout
        Seconds before the run is killed.
    threads_per_process
        ``OMP_NUM_THREADS`` of each process.

    Returns
    -------
    Path
        ``out``, holding ``ritz.csv`` and the other tables of :mod:`hess_utils.runs`.

    Raises
    ------
    RuntimeError
        If the command fails; the message holds the command and the end of its output.
    """
    out = Path(out)
    cli = [sys.executable, "-m", "hess_utils", "spectrum"]
    if nproc is not None:
        if int(nproc) < 1:
            raise ValueError(f"nproc must be at least 1, got {nproc}")
        cli = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
               "-m", "hess_utils", "spectrum"]
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            cli.append(flag)
        elif value is not False and value is not None:
            cli += [flag, str(value)]
    cli += ["--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(int(threads_per_process)), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(cli, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{' '.join(cli)} ran past {timeout} s; raise timeout or shrink the run") from err
    if done.returncode != 0 or not (out / "ritz.csv").exists():
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(cli)} failed (exit {done.returncode}):\n{tail}")
    return out


def compare_ritz(a: pd.DataFrame, b: pd.DataFrame, labels: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """Ritz values of two runs of the same probes side by side, sorted per probe.

    Returns
    -------
    DataFrame
        ``probe, rank, value_<a>, value_<b>, abs_diff, rel_diff`` with ``rel_diff`` relative to the largest
        ``|value|`` of run ``b`` (the scale of the spectrum, so near-zero values are not over-weighted).
    """
    import pandas as pd

    la, lb = labels
    frames = []
    for probe in sorted(set(a["probe"]) | set(b["probe"])):
        va = np.sort(a.loc[a["probe"] == probe, "value"].to_numpy(np.float64))
        vb = np.sort(b.loc[b["probe"] == probe, "value"].to_numpy(np.float64))
        if va.size != vb.size:
            raise ValueError(f"probe {probe}: {va.size} Ritz values in {la} but {vb.size} in {lb}")
        frames.append(pd.DataFrame({"probe": probe, "rank": np.arange(va.size), f"value_{la}": va,
                                    f"value_{lb}": vb}))
    out = pd.concat(frames, ignore_index=True)
    out["abs_diff"] = (out[f"value_{la}"] - out[f"value_{lb}"]).abs()
    scale = float(np.abs(out[f"value_{lb}"]).max()) or 1.0
    out["rel_diff"] = out["abs_diff"] / scale
    return out


# ---------------------------------------------------------------------------------------------- notebook 03: ghosts
def dense_hessian_tables(
    model: torch.nn.Module, batches: Iterable[L.Batch], params: Any, progress: bool = True
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The dense Hessian of the mean loss with respect to ``params``, column by column from exact products.

    For :func:`hess_utils.runs.cached_tables`: ``({"hessian": DataFrame (n, n)}, {"param_names", "dim", "loss",
    "num_tokens"})``. The model's dtype is kept (float64 gives the Hessian to float64 rounding).
    """
    import pandas as pd

    from hess_utils.operators.hessian import hessian_operator

    op = hessian_operator(model, list(batches), params=params, method="rev-rev", keep_graph=True)
    matrix = op.to_dense(progress=progress).numpy()
    return {"hessian": pd.DataFrame(matrix)}, {"param_names": op.param_names, "dim": op.dim, "loss": op.loss(),
                                               "num_tokens": op.num_tokens}


def symmetric_matrix(matrix: Any) -> torch.Tensor:
    """``(H + H^T) / 2`` in float64 of a square matrix (array, tensor or DataFrame): rounding made symmetric."""
    h = torch.tensor(np.array(matrix, dtype=np.float64))
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"need a square matrix, got shape {tuple(h.shape)}")
    return (h + h.T) / 2


def eigenvalue_summary(matrix: Any, top: int = 5) -> dict[str, Any]:
    """Exact eigenvalues of a symmetric matrix (float64 ``eigvalsh``): ``eigenvalues`` (ascending), ``max``,
    ``min``, ``negative`` (how many are below zero) and ``top`` (the ``top`` largest, descending)."""
    values = np.linalg.eigvalsh(np.asarray(symmetric_matrix(matrix)))
    return {"eigenvalues": values, "max": float(values[-1]), "min": float(values[0]),
            "negative": int((values < 0).sum()), "top": values[::-1][:top].tolist(), "dim": int(values.size)}


def ghost_study(
    matrix: torch.Tensor,
    iterations: Sequence[int],
    stem_iters: int,
    seed: int = 0,
    dtypes: Sequence[str] = ("float64", "float32"),
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Ghosts of Lanczos on a dense matrix in several dtypes (notebook 03), for :func:`~hess_utils.runs.cached_tables`.

    For each dtype, :func:`hess_utils.harness.ablations.ghost_table` (one run per re-orthogonalisation mode from the
    same Rademacher probe) and the Ritz tables (:func:`~hess_utils.harness.ablations.prefix_ritz`, Cullum-Willoughby
    mask with the dtype's machine epsilon) at ``k = min(stem_iters, run length)`` and at the run's last step.

    Returns
    -------
    dict
        ``ghosts``: the rows of ``ghost_table`` with a ``dtype`` column; ``ritz``: ``value, weight, ghost, residual,
        dtype, reorth, k``.
    """
    import pandas as pd

    from hess_utils.harness import ablations

    dim = matrix.shape[0]
    tables, ritz = [], []
    for name in dtypes:
        dtype = as_dtype(name)
        table, extra = ablations.ghost_table(matrix.to(dtype), iterations, seed=seed, progress=progress)
        tables.append(table.assign(dtype=name))
        eps = float(torch.finfo(dtype).eps)
        for mode, run in extra["runs"].items():
            for k in sorted({min(int(stem_iters), run.num_iters), run.num_iters}):
                ritz.append(ablations.prefix_ritz(run.alphas, run.betas, k, eps, reorth=mode, dim=dim,
                                                  last_beta=run.last_beta).assign(dtype=name, reorth=mode, k=k))
    return {"ghosts": pd.concat(tables, ignore_index=True), "ritz": pd.concat(ritz, ignore_index=True)}


def ritz_recovery_error(values: Sequence[float], exact: Sequence[float]) -> float:
    """``max_i |theta_(i) - lambda_(i)|`` of sorted Ritz values against sorted exact eigenvalues; NaN when the
    counts differ (a run shorter than the dimension cannot recover every eigenvalue)."""
    theta, lam = np.sort(np.asarray(values, np.float64)), np.sort(np.asarray(exact, np.float64))
    if theta.size != lam.size or theta.size == 0:
        return math.nan
    return float(np.max(np.abs(theta - lam)))


def ghost_matching(ritz: pd.DataFrame, exact: Sequence[float], rtol: float = 1e-6,
                   top: int = 10) -> tuple[pd.DataFrame, dict[str, Any]]:
    r"""Match the Ritz values of one Lanczos run to the exact eigenvalues (notebook 03's Cullum-Willoughby check).

    Each Ritz value :math:`\theta` is paired with its nearest exact eigenvalue; it is *converged* when
    :math:`|\theta - \lambda| \le \tau = ` ``rtol`` :math:`\cdot \max|\lambda|`. Among the Ritz values the
    Cullum-Willoughby test kept (``ghost`` False), ``found`` counts the converged ones and ``duplicates`` those
    converged to an eigenvalue another kept Ritz value already converged to (``found`` minus the number of
    distinct eigenvalues matched): copies the filter missed.

    Parameters
    ----------
    ritz : DataFrame
        ``value, ghost`` (and any other columns) of one run at one ``k``.
    exact : array
        The exact eigenvalues.

    Returns
    -------
    (DataFrame, dict)
        The ``top`` largest Ritz values with ``nearest_exact`` and ``error`` added, and ``{"ritz_values",
        "flagged", "kept", "found", "duplicates", "tau"}``.
    """
    lam = np.sort(np.asarray(exact, np.float64))
    if lam.size == 0:
        raise ValueError("no exact eigenvalue")
    if "ghost" not in ritz.columns or "value" not in ritz.columns:
        raise ValueError("the Ritz table needs columns value and ghost")
    ordered = ritz.sort_values("value", ascending=False)
    theta = ordered["value"].to_numpy(np.float64)
    nearest_index = np.argmin(np.abs(theta[:, None] - lam[None, :]), axis=1) if theta.size else np.zeros(0, int)
    nearest = lam[nearest_index]
    error = np.abs(theta - nearest)
    tau = float(rtol) * float(np.abs(lam).max())
    ghost = ordered["ghost"].astype(bool).to_numpy()
    converged_kept = (~ghost) & (error <= tau)
    found = int(converged_kept.sum())
    distinct = int(np.unique(nearest_index[converged_kept]).size)
    view = ordered.assign(nearest_exact=nearest, error=error).head(int(top))
    return view, {"ritz_values": int(theta.size), "flagged": int(ghost.sum()), "kept": int((~ghost).sum()),
                  "found": found, "duplicates": found - distinct, "tau": tau}


def basis_scale_table(sizes: Mapping[str, float], iterations: Sequence[int] = (30, 100, 1000),
                      dtype: torch.dtype = torch.float32) -> pd.DataFrame:
    """GiB of a kept Lanczos basis (:func:`hess_utils.harness.ablations.basis_bytes`) per model size and ``k``:
    ``model, parameters, basis GiB, k=<k>...``."""
    import pandas as pd

    from hess_utils.harness.ablations import basis_bytes

    return pd.DataFrame([{"model": name, "parameters": n,
                          **{f"basis GiB, k={k}": basis_bytes(n, k, dtype) / 2**30 for k in iterations}}
                         for name, n in sizes.items()])


def reorth_cost_tables(model_name: str, data_name: str, seq_len: int, num_sequences: int, num_iters: int,
                       seed: int = 0) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """:func:`hess_utils.harness.ablations.reorth_costs` on the full model (float32, all parameters), for
    :func:`~hess_utils.runs.cached_tables`: ``({"costs": ...}, {"dim": n})``. One product is computed before the
    timings so that every timed product reuses the kept graph."""
    import hess_utils as hu
    from hess_utils.harness import ablations

    model, tokenizer = hu.load_model(model_name)
    batches = hu.load_batches(data_name, tokenizer, seq_len, num_sequences, num_sequences, seed=seed)
    op = hu.hessian_operator(model, batches, keep_graph=True)
    op.matvec(op.random_vector("rademacher", seed))
    return {"costs": ablations.reorth_costs(op, num_iters, seed=seed)}, {"dim": op.dim}


def reorth_cost_view(costs: pd.DataFrame) -> pd.DataFrame:
    """The columns of a :func:`~hess_utils.harness.ablations.reorth_costs` table a notebook shows, bytes in MiB."""
    return costs.assign(basis_MB_device=costs.basis_bytes_on_operator_device / 2**20,
                        basis_MB_cpu=costs.basis_bytes_in_cpu_memory / 2**20)[
        ["reorth", "iterations", "s_per_iter", "matvec_s_per_iter", "reorth_s_per_iter", "basis_MB_device",
         "basis_MB_cpu", "operator_device", "orthogonality_loss", "cw_ghosts"]]


def ghost_summary(ghosts: pd.DataFrame, costs: pd.DataFrame, dim: int, cost_iters: int,
                  dtype: str = "float32") -> dict[str, Any]:
    """The numbers of notebook 03's conclusion, from its ghost table (:func:`ghost_study`) and cost table.

    ``first_copy_k``: the first ``k`` of the plain run (in ``dtype``) with a converged copy (None if none);
    ``at_dim``: its first row with ``k >= dim`` (``k, extra_converged, copies_of_top, cw_ghosts``);
    ``full_max_extra``: the most converged copies of any re-orthogonalised run; ``cw_full``, ``k_full``: the
    Cullum-Willoughby count of the longest re-orthogonalised run in ``dtype`` and its ``k``; ``overhead``: time per
    iteration of ``full`` over ``none`` minus 1; ``basis_mib``, ``device``: the kept basis of ``full`` and where;
    ``basis_tib_70b``: a float32 basis of 100 iterations at 70e9 parameters, in TiB.
    """
    from hess_utils.harness.ablations import basis_bytes

    none = ghosts[(ghosts.reorth == "none") & (ghosts.dtype == dtype)].sort_values("k")
    copies = none[none.extra_converged > 0]
    beyond = none[none.k >= dim]
    if beyond.empty:
        raise ValueError(f"the plain run never reaches k = dim = {dim}")
    at_dim = beyond.iloc[0]
    full = ghosts[ghosts.reorth == "full"]
    full_dt = full[full.dtype == dtype].sort_values("k")
    c = costs.set_index("reorth")
    return {
        "dim": int(dim), "first_copy_k": int(copies.k.min()) if len(copies) else None,
        "at_dim": {key: int(at_dim[key]) for key in ("k", "extra_converged", "copies_of_top", "cw_ghosts")},
        "full_max_extra": int(full.extra_converged.max()),
        "cw_full": int(full_dt.cw_ghosts.iloc[-1]), "k_full": int(full_dt.k.iloc[-1]),
        "overhead": float((c.loc["full", "s_per_iter"] - c.loc["none", "s_per_iter"]) / c.loc["none", "s_per_iter"]),
        "basis_mib": float(c.loc["full", "basis_bytes_on_operator_device"]) / 2**20,
        "device": str(c.loc["full", "operator_device"]), "cost_iters": int(cost_iters),
        "basis_tib_70b": basis_bytes(70e9, 100) / 2**40,
    }


def ghost_conclusions(s: Mapping[str, Any]) -> str:
    """Notebook 03's conclusion (Markdown) from :func:`ghost_summary`."""
    at = s["at_dim"]
    first = (f"the first converged copy of an eigenvalue appears at k = {s['first_copy_k']} iterations"
             if s["first_copy_k"] is not None else "no converged copy of an eigenvalue appears")
    text = (f"**From these runs:** without re-orthogonalisation {first} (dim {s['dim']}, float32); at k = {at['k']} "
            f"there are {at['extra_converged']} converged copies and {at['copies_of_top']} Ritz values sit on the top "
            f"eigenvalue, against at most {s['full_max_extra']} copies with full re-orthogonalisation. As in the "
            "paper's Figure 3(d), the copies pile up at the largest eigenvalues while the support and the bulk are "
            f"kept; the Cullum-Willoughby test flags {at['cw_ghosts']} Ritz values. ")
    if s["cw_full"]:
        text += (f"Caveat, measured: in float32 it also flags {s['cw_full']} Ritz value(s) of the fully "
                 f"re-orthogonalised run at k = {s['k_full']}, which are genuine: the test cannot tell a spurious "
                 "value from an eigenvalue nearly orthogonal to the start vector (weight near zero), so it is for "
                 "lists of eigenvalues, not for the quadrature weights. ")
    text += (f"The price of removing them: on {s['device']} a kept basis of {s['cost_iters']} iterations holds "
             f"{s['basis_mib']:.1f} MiB and costs {s['overhead']:+.0%} time per iteration here (the Hessian-vector "
             "product dominates), while `offload` moves the same bytes to CPU memory "
             + ("(on this CPU-only machine that is the same memory, so only the copy is measured)."
                if s["device"] == "cpu" else "and frees the device.")
             + f" At 70B parameters and 100 iterations the basis would need {s['basis_tib_70b']:.0f} TiB in float32, "
             "which is why the paper runs without it and keeps the number of iterations small.")
    return text


# ---------------------------------------------------------------------------------------------- notebook 06: columns
def column_noise_floor(values: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """How a low-precision Hessian column compares with the same column in float64 (notebook 06).

    ``max_abs_error = max_i |v_i - e_i|`` is the column's noise floor; ``rel_error = ||v - e|| / ||e||``;
    ``fraction_below_noise``: the share of entries with ``|e_i|`` below that floor (their low-precision values are
    rounding noise); ``fraction_exact_zero_f64``: the share of exact zeros in float64.
    """
    v, e = np.asarray(values, np.float64).reshape(-1), np.asarray(exact, np.float64).reshape(-1)
    if v.shape != e.shape or v.size == 0:
        raise ValueError(f"need two columns of the same non-zero length, got {v.size} and {e.size}")
    floor = float(np.max(np.abs(v - e)))
    return {"max_abs_error": floor, "rel_error": float(np.linalg.norm(v - e) / max(np.linalg.norm(e), 1e-300)),
            "fraction_below_noise": float(np.mean(np.abs(e) < floor)),
            "fraction_exact_zero_f64": float(np.mean(e == 0))}


def column_magnitudes(values: np.ndarray) -> dict[str, float]:
    """``max_abs``, ``median_abs``, ``median_nonzero_abs`` (NaN when every entry is zero) and ``exact_zeros``
    (the share of zero entries) of a Hessian column."""
    mags = np.abs(np.asarray(values, np.float64).reshape(-1))
    if mags.size == 0:
        raise ValueError("empty column")
    nonzero = mags[mags > 0]
    return {"max_abs": float(mags.max()), "median_abs": float(np.median(mags)),
            "median_nonzero_abs": float(np.median(nonzero)) if nonzero.size else math.nan,
            "exact_zeros": float(np.mean(mags == 0))}


def banded_columns(
    model_name: str,
    data_name: str,
    seq_len: int,
    subsample_sizes: Sequence[int],
    batch_size: int,
    num_columns: int,
    dtype: str = "float32",
    float64_check: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Random whole Hessian columns at several subsample sizes (HessFormer section 5, notebook 06).

    For each number of sequences: the same ``num_columns`` random columns ``H e_i``
    (:func:`~hess_utils.algorithms.columns.random_indices`, ``seed``) of the model in ``dtype``, their threshold
    fractions (:func:`~hess_utils.algorithms.columns.threshold_table`), magnitude histograms
    (:func:`log_magnitude_histogram`) and statistics (:func:`column_magnitudes`, ``tokens``: the operator's
    predicted tokens); with ``float64_check`` the columns of the largest size again in float64
    (:func:`column_noise_floor`).

    Returns
    -------
    dict
        ``fractions``, ``histograms``, ``columns``, ``float64_check`` (empty without the check).
    """
    import pandas as pd

    import hess_utils as hu
    from hess_utils.algorithms.columns import hessian_column, random_indices, threshold_table

    model, tokenizer = hu.load_model(model_name, dtype=as_dtype(dtype))
    fractions, hists, stats, noise = [], [], [], []
    for size in progress_bar(list(subsample_sizes), desc="subsample sizes", disable=not progress):
        batches = hu.load_batches(data_name, tokenizer, seq_len=seq_len, num_sequences=size,
                                  batch_size=min(size, batch_size), seed=seed)
        op = hu.hessian_operator(model, batches, method="rev-rev", keep_graph=True)
        indices = random_indices(op, num_columns, seed=seed)  # the same columns for every subsample size
        columns = [hessian_column(op, i) for i in progress_bar(indices, desc=f"{size} sequences: columns",
                                                                leave=False, disable=not progress)]
        names = [f"F{j + 1}" for j in range(len(columns))]
        table = threshold_table(columns)
        table.insert(0, "num_sequences", size)
        table.insert(1, "column", names)
        fractions.append(table)
        for name, col in zip(names, columns):
            hist = log_magnitude_histogram(col.values)
            hist.insert(0, "num_sequences", size)
            hist.insert(1, "column", name)
            hists.append(hist)
            stats.append({"num_sequences": size, "column": name, "index": col.index, "param": col.param_name,
                          "local_index": col.local_index, "diagonal": col.diagonal, **column_magnitudes(col.values),
                          "tokens": op.num_tokens})
        if float64_check and size == max(subsample_sizes):
            model64, _ = hu.load_model(model_name, dtype=torch.float64)
            op64 = hu.hessian_operator(model64, batches, method="rev-rev", keep_graph=True)
            for name, col in zip(names, columns):
                noise.append({"column": name, "param": col.param_name,
                              **column_noise_floor(col.values, hessian_column(op64, col.index).values)})
            del model64, op64
    return {"fractions": pd.concat(fractions, ignore_index=True), "histograms": pd.concat(hists, ignore_index=True),
            "columns": pd.DataFrame(stats), "float64_check": pd.DataFrame(noise)}


def threshold_pivots(fractions: pd.DataFrame, stats: pd.DataFrame) -> dict[int, tuple[pd.DataFrame, int]]:
    """Per number of sequences of :func:`banded_columns`: the threshold table with thresholds as rows and columns
    F1.. as columns, and the predicted tokens of its loss."""
    thr_cols = [c for c in fractions.columns if c.startswith("<")]
    out = {}
    for size, group in fractions.groupby("num_sequences"):
        pivot = group.set_index("column")[thr_cols].T
        pivot.index.name = "threshold"
        out[int(size)] = (pivot, int(stats.loc[stats["num_sequences"] == size, "tokens"].iloc[0]))
    return out


def banded_summary(fractions: pd.DataFrame, stats: pd.DataFrame, hists: pd.DataFrame,
                   check: pd.DataFrame) -> dict[str, Any]:
    """The numbers of notebook 06's conclusion: per number of sequences (``sizes``) the mean fraction of entries
    below ``1e-8`` and ``1e-6`` over the columns, the mean share of exact zeros and of the median nonzero |entry|;
    ``column_length`` (entries of a column: the Hessian's dimension); from the float64 check (if any) the largest
    noise floor and the mean fraction of entries below each column's floor."""
    thr_cols = [c for c in fractions.columns if c.startswith("<")]
    mean_frac = fractions.groupby("num_sequences")[thr_cols].mean()
    sizes = [int(s) for s in mean_frac.index]
    first = hists[(hists.num_sequences == sizes[0]) & (hists.column == hists.column.iloc[0])]
    out = {"sizes": sizes, "below_1e-8": {s: float(mean_frac.loc[s, "<1e-08"]) for s in sizes},
           "below_1e-6": {s: float(mean_frac.loc[s, "<1e-06"]) for s in sizes},
           "exact_zeros": {int(s): float(v) for s, v in stats.groupby("num_sequences")["exact_zeros"].mean().items()},
           "median_nonzero": {int(s): float(v)
                              for s, v in stats.groupby("num_sequences")["median_nonzero_abs"].mean().items()},
           "column_length": int(first["count"].sum()), "max_noise": None, "below_noise": None}
    if len(check):
        out.update(max_noise=float(check["max_abs_error"].max()),
                   below_noise=float(check["fraction_below_noise"].mean()))
    return out


def banded_conclusions(s: Mapping[str, Any]) -> str:
    """Notebook 06's conclusion (Markdown) from :func:`banded_summary`."""
    sizes, f8 = s["sizes"], s["below_1e-8"]
    small, large = sizes[0], sizes[-1]
    med = s["median_nonzero"]
    text = (f"Mean fraction of entries below 1e-8: {', '.join(f'{f8[n]:.4f} ({n} seq.)' for n in sizes)}; the "
            "paper reports 0.94-0.998 below 1e-8 for DeepSeek-70B and Pythia columns of 11.8-32.8 B entries. ")
    text += (f"Here the columns have {s['column_length']:,} entries and are "
             f"{'far from' if min(f8.values()) < 0.5 else 'close to'} that sparse: at {s['column_length'] / 1e6:.1f} M "
             "parameters the curvature per weight is much larger than in a 70 B model (the paper notes that outliers "
             "scale like 1/size), so a fixed absolute threshold is not comparable across model sizes. ")
    text += (f"Exact zeros make up {s['exact_zeros'][small]:.3f} of the entries with {small} sequence(s) and "
             f"{s['exact_zeros'][large]:.3f} with {large}: rows of token embeddings that the sampled text never uses "
             "have no curvature at all, and more text uses more tokens. ")
    text += (f"With {large} instead of {small} sequence(s) the median nonzero |entry| goes from {med[small]:.2e} to "
             f"{med[large]:.2e} and the fraction below 1e-6 from {s['below_1e-6'][small]:.4f} to "
             f"{s['below_1e-6'][large]:.4f}: "
             + ("values broaden with greater subsampling, as the paper observes. " if med[large] < med[small] else
                "unlike the paper, greater subsampling does not broaden the values here. "))
    if s["max_noise"] is not None:
        text += (f"In float64 the same columns differ from float32 by at most {s['max_noise']:.1e}; "
                 f"{s['below_noise']:.3f} of the entries (mean over columns) are below that noise, "
                 "so their float32 values, and any sparsity claimed for them, are rounding noise.")
    return text


# ---------------------------------------------------------------------------------------------- notebook 04: datasets
def dataset_plan(corpora: Sequence[str], sample_sizes: Sequence[int], seq_lens: Sequence[int], data_name: str,
                 base_seq_len: int, base_sequences: int) -> pd.DataFrame:
    """The spectra of notebook 04: ``study, data, split, seq_len, num_sequences, label``, one row per spectrum of a
    study; runs shared by studies have the same ``label`` (``"<data>[ <split>] <n>x<seq_len>"``, no split for
    random tokens)."""
    import pandas as pd

    plan = [("corpora", corpus, "train", base_seq_len, base_sequences) for corpus in corpora]
    for n in sample_sizes:
        plan += [("random: sample size", "random", "train", base_seq_len, n),
                 ("news: sample size", "news", "train", base_seq_len, n),
                 ("seen vs unseen", data_name, "train", base_seq_len, n),
                 ("seen vs unseen", data_name, "heldout", base_seq_len, n)]
    plan += [("random: sequence length", "random", "train", s, base_sequences) for s in seq_lens]
    plan = pd.DataFrame(plan, columns=["study", "data", "split", "seq_len", "num_sequences"])
    plan["label"] = [f"{d}{'' if d == 'random' else ' ' + sp} {n}x{s}" for d, sp, s, n in
                     zip(plan.data, plan.split, plan.seq_len, plan.num_sequences)]
    return plan


def dataset_spectra(model: torch.nn.Module, tokenizer: Any, plan: pd.DataFrame, out: str | Path, model_name: str,
                    batch_size: int, num_iters: int, num_probes: int = 1, reorth: str = "full", seed: int = 0,
                    progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One checkpointed SLQ run (:func:`hess_utils.harness.ablations.spectrum_run`) per distinct label of a
    :func:`dataset_plan`, each in its own folder under ``out``; returns the Ritz values of all
    (:func:`~hess_utils.harness.ablations.load_spectra`) and their summary
    (:func:`~hess_utils.harness.ablations.spectrum_summary`)."""
    from hess_utils import runs
    from hess_utils.harness import ablations

    folders = {}
    unique = plan.drop_duplicates("label")
    for row in progress_bar(list(unique.itertuples()), desc="spectra", disable=not progress):
        cfg = dict(model=model_name, data=row.data, split=row.split, seq_len=row.seq_len,
                   num_sequences=row.num_sequences, batch_size=batch_size, num_iters=num_iters,
                   num_probes=num_probes, reorth=reorth, seed=seed)
        folders[row.label] = ablations.spectrum_run(
            model, tokenizer, runs.result_dir(Path(out), row.label.replace(" ", "_"), cfg), model_name=model_name,
            data=row.data, split=row.split, seq_len=row.seq_len, num_sequences=row.num_sequences,
            batch_size=batch_size, num_iters=num_iters, num_probes=num_probes, reorth=reorth, seed=seed,
            progress=False)
    ritz = ablations.load_spectra(folders)
    return ritz, ablations.spectrum_summary(ritz)


def study_spectra(plan: pd.DataFrame, ritz: pd.DataFrame, study: str,
                  num_probes: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{label: (Ritz values, weights / num_probes)}`` of one study of a :func:`dataset_plan` (for
    :func:`hess_utils.plotting.density_overlay`)."""
    return {lab: (ritz[ritz.label == lab].value.to_numpy(), ritz[ritz.label == lab].weight.to_numpy() / num_probes)
            for lab in plan[plan.study == study].label}


def monotone_direction(x: Sequence[float]) -> str:
    """``"falls"`` / ``"grows"`` when every step of ``x`` goes down / up, else ``"shows no monotone trend"``."""
    d = np.diff(np.asarray(x, dtype=float))
    if len(d) and (d < 0).all():
        return "falls"
    if len(d) and (d > 0).all():
        return "grows"
    return "shows no monotone trend"


def sample_size_sweep(summary: pd.DataFrame, data: str, split: str, column: str, seq_len: int,
                      sample_sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(values of column, num_sequences)`` of the spectra of ``data`` / ``split`` at ``seq_len`` whose number
    of sequences is in ``sample_sizes``, by increasing number of sequences."""
    part = summary[(summary.data == data) & (summary.split == split) & (summary.seq_len == seq_len)
                   & summary.num_sequences.isin(list(sample_sizes))].sort_values("num_sequences")
    return part[column].to_numpy(), part.num_sequences.to_numpy()


def dataset_conclusions(summary: pd.DataFrame, data_name: str, base_seq_len: int, base_sequences: int,
                        sample_sizes: Sequence[int], num_iters: int) -> str:
    """Notebook 04's conclusion (Markdown) from the :func:`dataset_spectra` summary: the spread of the extremes on
    random tokens, real text against random tokens, the outlier trend on news and the negative eigenvalues on seen
    against unseen text, each trend named by :func:`monotone_direction`."""

    def fmt(xs: Iterable[Any], f: str = "{:.3g}") -> str:
        return ", ".join(f.format(x) for x in xs)

    def sweep(data: str, split: str = "train", column: str = "neg_ratio") -> tuple[np.ndarray, np.ndarray]:
        return sample_size_sweep(summary, data, split, column, base_seq_len, sample_sizes)

    rnd = summary[summary.data == "random"]
    spread_top = float(rnd.lambda_max.max() / rnd.lambda_max.min())
    spread_neg = float(rnd.lambda_min.min() / rnd.lambda_min.max()) if (rnd.lambda_min < 0).all() else float("inf")
    text = [f"* **Random tokens** ({len(rnd)} spectra, sample sizes and sequence lengths): λ_max spans "
            f"{rnd.lambda_max.min():.3g} … {rnd.lambda_max.max():.3g} (ratio {spread_top:.2f}) and λ_min "
            f"{rnd.lambda_min.max():.3g} … {rnd.lambda_min.min():.3g}; the weight on the peak at zero is "
            f"{rnd.near_zero_mass.min():.3f} … {rnd.near_zero_mass.max():.3f}. "
            + ("The density is consistent across sizes with a large near-zero peak, as in the paper's Fig. 4"
               if max(spread_top, spread_neg) < 2 else
               "The large near-zero peak is there, as in the paper's Fig. 4, but the extremes vary with the size by "
               "more than a factor 2")
            + (f", and unlike the paper, random tokens give negative eigenvalues as large as "
               f"{abs(rnd.lambda_min.min()):.3g}, {rnd.neg_ratio.max():.1f} × λ_max: the support is not compact "
               "around the bulk here." if rnd.neg_ratio.max() > 0.5 else ", with compact support, as in the paper.")]
    real = summary[(summary.data != "random") & (summary.seq_len == base_seq_len)
                   & (summary.num_sequences == base_sequences)]
    base_rnd = rnd[(rnd.seq_len == base_seq_len) & (rnd.num_sequences == base_sequences)]
    text.append(f"* **Real text against random tokens** at {base_sequences} x {base_seq_len} tokens: λ_max "
                f"{', '.join(f'{lab}: {v:.3g}' for lab, v in zip(real.label, real.lambda_max))}, against "
                f"{float(base_rnd.lambda_max.iloc[0]):.3g} for random tokens; estimated eigenvalues beyond 10 % of "
                "λ_max (dimension × weight) "
                f"{', '.join(f'{lab}: {v:.1f}' for lab, v in zip(real.label, real.est_outlier_eigenvalues))} "
                f"against {float(base_rnd.est_outlier_eigenvalues.iloc[0]):.1f}.")
    out_news, n_news = sweep("news", column="est_outlier_eigenvalues")
    top_news, _ = sweep("news", column="lambda_max")
    news_trend = monotone_direction(out_news)
    text.append(f"* **News, growing sample** ({fmt(n_news, '{}')} sequences): λ_max {fmt(top_news)}; estimated "
                f"eigenvalues beyond 10 % of λ_max {fmt(out_news, '{:.1f}')}: the outlier count {news_trend} with "
                "the sample. " + ("As in the paper's Fig. 5, more data shows more outliers." if news_trend == "grows"
                                  else "The paper's Fig. 5 sees more outliers with more data; this small run does "
                                  "not show it."))
    neg_seen, n_seen = sweep(data_name, "train")
    neg_unseen, _ = sweep(data_name, "heldout")
    seen, unseen = monotone_direction(neg_seen), monotone_direction(neg_unseen)
    text.append(f"* **Seen ({data_name} train) against unseen ({data_name} held-out)**, {fmt(n_seen, '{}')} "
                f"sequences: |λ_min| / λ_max is {fmt(neg_seen)} on seen data ({seen}) and {fmt(neg_unseen)} on "
                f"unseen data ({unseen}). "
                + ("As in the paper (Pythia on the Pile), the negative eigenvalues shrink relative to the top with "
                   "more training data. " if seen == "falls" else
                   "The paper (Pythia on the Pile) sees the negative eigenvalues disappear with more training data; "
                   "not so here. ")
                + ("On unseen data they do not shrink, as in the paper." if unseen != "falls" else
                   "On unseen data they shrink as well, which the paper did not see."))
    return (f"**From these runs** (one probe of {num_iters} iterations per spectrum, so single extreme Ritz values "
            "are noisy; trends are called monotone only when every step agrees):\n\n" + "\n".join(text)
            + "\n\nThe tiny model saw orders of magnitude fewer tokens of wiki than the paper's models saw of their "
            "data, and each spectrum here uses a few short sequences: where the results differ from the paper they "
            "are stated as measured.")


# ---------------------------------------------------------------------------------------------- notebook 07: subsets
def paper_subsets(model: torch.nn.Module, layer: str, block: int, t_layer: int | None, t_block: int, t_kind: int,
                  t_all: int) -> tuple[str, dict[str, int], dict[str, dict[str, int]]]:
    """The four parameter subsets of the perplexity paper (section 4) for notebook 07.

    Returns the name of the ``layer`` weight of ``block``, the entries per weight of each subset (``t_layer``
    None: that weight's first row, ``d_in`` entries) and ``{kind: {weight: entries}}``
    (:func:`hess_utils.paper_subset` for ``layer, block, kind, all``).
    """
    from hess_utils.algorithms.subsets import linear_weights, paper_subset

    first = next(name for b, k, name in linear_weights(model) if b == block and k == layer)
    row_length = dict(model.named_parameters())[first].shape[-1]  # nn.Linear stores (out, in)
    sizes = {"layer": int(t_layer or row_length), "block": int(t_block), "kind": int(t_kind), "all": int(t_all)}
    return first, sizes, {kind: paper_subset(model, kind, t, block=block, layer=layer) for kind, t in sizes.items()}


def subset_hessians(model: torch.nn.Module, batches: Sequence[L.Batch], subsets: Mapping[str, Mapping[str, int]],
                    progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Exact mean-loss Hessians of each subset (:func:`~hess_utils.algorithms.subsets.subset_hessian`), for
    :func:`~hess_utils.runs.cached_results`: ``{"H_<kind>": float64 array, "layout": DataFrame subset, param,
    start, stop}`` and ``{"num_tokens"}``, the predicted tokens of the loss as the library counts them (the
    targets: padding and each sequence's last position excluded, not ``input_ids.numel()``)."""
    import pandas as pd

    from hess_utils.algorithms.subsets import subset_hessian
    from hess_utils.operators.hessian import hessian_operator

    out: dict[str, Any] = {}
    layout, num_tokens = [], None
    for kind, subset in subsets.items():
        h = subset_hessian(hessian_operator(model, batches, params=list(subset)), subset, progress=progress)
        out[f"H_{kind}"] = h.matrix.to(torch.float64).numpy()
        num_tokens = h.num_tokens
        layout += [{"subset": kind, "param": name, "start": start, "stop": stop}
                   for name, start, stop in zip(h.param_names, h.offsets[:-1], h.offsets[1:])]
    return {**out, "layout": pd.DataFrame(layout)}, {"num_tokens": num_tokens}


def subset_offsets(layout: pd.DataFrame, kind: str) -> list[int]:
    """``0, stop_1, ..., stop_m`` of one subset of a :func:`subset_hessians` layout (the per-weight blocks)."""
    return [0] + layout[layout["subset"] == kind]["stop"].astype(int).tolist()


def subset_summary(matrices: Mapping[str, np.ndarray], layout: pd.DataFrame) -> pd.DataFrame:
    """Per subset: ``size, weights, max |H_ij|, mean |diag|, mean |off-diag|, λ_min, λ_max, negative eigenvalues``
    (below ``-1e-12 max|λ|``) and the share of ``||H||_F^2`` in the per-weight blocks
    (:func:`within_block_fraction`)."""
    import pandas as pd

    rows = []
    for kind in layout["subset"].drop_duplicates():
        h = np.asarray(matrices[f"H_{kind}"], np.float64)
        offsets = subset_offsets(layout, kind)
        eig = np.linalg.eigvalsh(h)
        rows.append({"subset": kind, "size": h.shape[0], "weights": len(offsets) - 1, "max |H_ij|": np.abs(h).max(),
                     "mean |diag|": np.abs(np.diag(h)).mean(),
                     "mean |off-diag|": np.abs(h - np.diag(np.diag(h))).sum() / max(h.size - h.shape[0], 1),
                     "λ_min": eig[0], "λ_max": eig[-1],
                     "negative eigenvalues": int((eig < -1e-12 * np.abs(eig).max()).sum()),
                     "share of ||H||²_F in per-weight blocks": within_block_fraction(h, offsets)})
    return pd.DataFrame(rows)


def subset_conclusions(summary: pd.DataFrame) -> str:
    """Notebook 07's conclusion on the four subsets (Markdown) from :func:`subset_summary`."""
    s = summary.set_index("subset")
    share = s["share of ||H||²_F in per-weight blocks"]
    strong = [k for k in ("block", "kind", "all") if share[k] < 0.5]
    return (f"As in the paper's Figure 1, every subset's Hessian is dense but far from uniform: the diagonal is on "
            f"average {s.loc['layer', 'mean |diag|'] / s.loc['layer', 'mean |off-diag|']:.1f} times larger than the "
            f"off-diagonal in the one-layer subset, and in the multi-weight subsets the blocks of single weights hold "
            f"{share['block']:.2f} (one block), {share['kind']:.2f} (one kind) and {share['all']:.2f} (all layers) of "
            "the squared Frobenius norm. "
            + (f"The couplings between different weights carry most of the norm in the {', '.join(strong)} "
               "subset(s), and are exactly what block-diagonal curvature approximations drop (notebook 09). "
               if strong else "Couplings between different weights are small here. ")
            + (f"The couplings between the same layer kind of different blocks are weak ({1 - share['kind']:.3f} of "
               "the norm). " if share["kind"] > 0.9 else "")
            + f"Negative eigenvalues per subset: {', '.join(f'{k} {v}' for k, v in s['negative eigenvalues'].items())}"
            + (": the trained model does not sit at a minimum of the loss on this text."
               if (s["negative eigenvalues"] > 0).all() else "."))


def batch_size_study(model: torch.nn.Module, batches: Iterable[L.Batch], subset: Mapping[str, int],
                     progress: bool = True) -> dict[str, Any]:
    """Notebook 07's section 5.3 study, for :func:`~hess_utils.runs.cached_results`: per-sequence summed-loss
    Hessians (:func:`per_sequence_subset_hessians`), their :func:`batch_size_errors` and the predicted tokens of
    each sequence."""
    import pandas as pd

    mats, tokens = per_sequence_subset_hessians(model, batches, subset, progress=progress)
    return {"errors": batch_size_errors(mats, tokens), "per_sequence": mats,
            "tokens": pd.DataFrame({"sequence": np.arange(len(tokens)), "tokens": tokens})}


def batch_size_conclusions(errors: pd.DataFrame, threshold: float = 0.1) -> str:
    """Notebook 07's conclusion on the batch size (Markdown) from a :func:`batch_size_errors` table."""
    e = errors.set_index("b")["rel_error_2"]
    count = int(e.index.max())
    hit = e[e < threshold]
    b10 = int(hit.index.min()) if len(hit) else None
    half = count // 2
    return (f"The error falls from {e.iloc[0]:.2f} at b = 1 to {e.loc[half]:.2f} at b = {half}"
            + (f" and first drops below {threshold:g} at b = {b10} of {count} ({b10 / count:.0%})."
               if b10 else f" and stays above {threshold:g} until b = B = {count}.")
            + " The paper finds the Hessian accurately estimated from about b ≈ 60 of 140 sequences of 2048 tokens "
            "(43 %); its reference also contains the b sequences, so the error must reach 0 at b = B, here as there: "
            + ("the same qualitative picture." if b10 and b10 / count <= 0.6 else
               "with our much shorter sequences the estimate needs a larger share of the reference set."))


# ---------------------------------------------------------------------------------------------- notebook 08: diagonal
def hutchinson_study(model: torch.nn.Module, batches: Sequence[L.Batch], weight: str, num_probes: int,
                     snapshots: Sequence[int] = (1,), seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Notebook 08, for :func:`~hess_utils.runs.cached_results`: the exact diagonal of the first row of ``weight``
    (:func:`~hess_utils.algorithms.subsets.subset_hessian`, the row's ``d_in`` leading entries) and the
    :func:`hutchinson_convergence` of the operator restricted to ``weight`` against it. Arrays ``curve``,
    ``exact_first_row``, ``stderr`` and ``D_<k>`` (shaped like the weight); record ``hutchinson_seconds``,
    ``seconds_per_product``."""
    from hess_utils.algorithms.subsets import subset_hessian
    from hess_utils.operators.hessian import hessian_operator

    shape = tuple(dict(model.named_parameters())[weight].shape)
    row = shape[-1]
    op = hessian_operator(model, batches, params=[weight], method="rev-rev", keep_graph=True)
    exact = subset_hessian(op, {weight: row}).matrix.to(torch.float64).diagonal().numpy().copy()
    t0 = time.perf_counter()
    conv = hutchinson_convergence(op, exact, np.arange(row), num_probes, snapshot_at=snapshots, seed=seed)
    seconds = time.perf_counter() - t0
    arrays = {f"D_{k}": v.reshape(shape) for k, v in conv.snapshots.items()}
    return ({"curve": conv.curve, "exact_first_row": exact, "stderr": conv.stderr.reshape(shape), **arrays},
            {"hutchinson_seconds": seconds, "seconds_per_product": seconds / num_probes})


def hutchinson_summary(curve: pd.DataFrame, first: np.ndarray, last: np.ndarray,
                       target: float = 0.25) -> dict[str, Any]:
    """Notebook 08's numbers: the power-law fit of the error (:func:`fit_power_law`), the first ``k`` with error
    ``<= target`` (None if never; then ``predicted``, the fit's ``k`` for it), and the correlation of ``|D^first|``
    with ``|D^last|`` over all entries."""
    err = curve.set_index("k")["rel_error"]
    fit = fit_power_law(curve["k"], curve["rel_error"])
    reached = err[err <= target]
    return {"fit": fit, "K": int(err.index.max()), "first_error": float(err.iloc[0]),
            "last_error": float(err.loc[err.index.max()]),
            "k_target": int(reached.index.min()) if len(reached) else None, "target": float(target),
            "predicted": (target / fit.coefficient) ** (1 / fit.exponent) if fit.exponent < 0 else math.inf,
            "correlation": float(np.corrcoef(np.abs(first).ravel(), np.abs(last).ravel())[0, 1]),
            "entries": int(np.asarray(last).size)}


def hutchinson_conclusions(s: Mapping[str, Any], first_k: int) -> str:
    """Notebook 08's conclusion (Markdown) from :func:`hutchinson_summary`."""
    fit, K = s["fit"], s["K"]
    text = (f"The error falls like k^{fit.exponent:.2f} (fit over k = 1..{K}; pure Monte Carlo noise gives k^-0.5) "
            f"from {s['first_error']:.2f} at k = 1 to {s['last_error']:.3f} at k = {K}. ")
    text += (f"It first reaches {s['target']:g} at k = {s['k_target']}; the paper needed about 3000 products for "
             f"{s['target']:g} on OPT-125M. " if s["k_target"] else
             f"It does not reach {s['target']:g} within k = {K} (the fit predicts k ≈ {s['predicted']:,.0f}); the "
             "paper needed about 3000 products on OPT-125M. ")
    text += (f"The correlation between |D^{first_k}| and |D^{K}| over all {s['entries']:,} entries is "
             f"{s['correlation']:.2f}: "
             + ("as the paper observes, a single product already shows the main row/column pattern of the diagonal."
                if s["correlation"] > 0.5 else
                "unlike the paper's observation, a single product shows little of the final pattern here."))
    return text


# ---------------------------------------------------------------------------------------------- notebook 00: quickstart
def ritz_measure(ritz: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The spectral measure of a Ritz table as ``(values, weights)`` in float64, the weights divided by the number
    of probes (each probe's weights sum to 1, so the measure has mass 1 whatever the number of probes)."""
    return (ritz["value"].to_numpy(np.float64),
            ritz["weight"].to_numpy(np.float64) / ritz["probe"].nunique())


def quickstart_conclusions(ritz: pd.DataFrame, dim: int) -> str:
    """Notebook 00's conclusion (Markdown): the :func:`hess_utils.harness.ablations.spectrum_summary` of the run
    (range, negative weight, weight of the bulk within 10 % of ``lambda_max`` of zero, outliers and the number of
    eigenvalues they stand for, ``dim * outlier_mass``)."""
    from hess_utils.harness.ablations import spectrum_summary

    s = spectrum_summary(ritz.assign(label="run", dim=int(dim))).iloc[0]
    bulk = 1 - s.outlier_mass
    return (f"**From this run:** the Ritz values span {s.lambda_min:.4g} … {s.lambda_max:.4g} (|λ_min| / λ_max = "
            f"{s.neg_ratio:.3f}); {s.negative_mass:.1%} of the spectral weight lies on negative values. {bulk:.6%} of "
            f"the weight sits within ±10 % of λ_max around zero; the {s.top_outliers + s.negative_outliers} Ritz "
            f"values outside carry weight {s.outlier_mass:.2e}, i.e. about {s.est_outlier_eigenvalues:.0f} of the "
            f"{int(dim):,} eigenvalues (weight × dimension). "
            + ("As in the paper's spectra (section 4.1), the density is a huge peak near zero with a few outliers: a "
               "tiny fraction of the parameter directions carries the large curvature."
               if s.outlier_mass < 0.01 else
               "Unlike the paper's spectra, a sizeable share of the weight lies away from zero here.")
            + (" Large negative outliers, comparable in size to the positive ones, are present, as the paper reports "
               "for its frontier models (section 4)." if s.neg_ratio > 0.3 else ""))


# ---------------------------------------------------------------------------------------------- notebook 01: device map
DEVICE_MAP_SETUPS = ("single device", 'device_map="auto"')


def device_map_placement(single: torch.nn.Module, mapped: torch.nn.Module) -> dict[str, Any]:
    """Notebook 01: where the parameters of the plain (``single``) and the ``device_map="auto"`` (``mapped``) model
    really are. ``placement`` (:func:`~hess_utils.harness.ablations.parameter_devices` of both, column ``setup``
    from :data:`DEVICE_MAP_SETUPS`), ``device_map`` (the mapped model's ``hf_device_map``), ``hooks`` and
    ``single_hooks`` (modules carrying accelerate's ``_hf_hook``), ``mapped_devices``, ``single_devices`` (sorted
    device names) and ``same_place`` (both on the same devices)."""
    import pandas as pd

    from hess_utils.harness.ablations import parameter_devices

    one, auto = DEVICE_MAP_SETUPS
    placement = pd.concat([parameter_devices(single).assign(setup=one), parameter_devices(mapped).assign(setup=auto)],
                          ignore_index=True)
    mapped_devices = sorted(placement.loc[placement.setup != one, "device"])
    single_devices = sorted(placement.loc[placement.setup == one, "device"])
    return {"placement": placement, "device_map": getattr(mapped, "hf_device_map", None),
            "hooks": sum(hasattr(m, "_hf_hook") for m in mapped.modules()),
            "single_hooks": sum(hasattr(m, "_hf_hook") for m in single.modules()),
            "mapped_devices": mapped_devices, "single_devices": single_devices,
            "same_place": mapped_devices == single_devices}


def device_map_placement_markdown(p: Mapping[str, Any]) -> str:
    """Notebook 01's statement (Markdown) of the devices really used, from :func:`device_map_placement`."""
    return (f"**Devices really used:** with `device_map=\"auto\"` the parameters are on "
            f"{', '.join(p['mapped_devices'])}; without it on {', '.join(p['single_devices'])}. "
            + (f"`hf_device_map` is {p['device_map']!r} and {p['hooks']} module(s) carry accelerate hooks. Both runs "
               "therefore compute on the same device: this machine cannot show a multi-GPU split, only that loading "
               "through `device_map` leaves the arithmetic unchanged." if p["same_place"] else
               "The device-mapped model really is split over several devices."))


def device_map_training(single: torch.nn.Module, mapped: torch.nn.Module, tokenizer: Any, data_name: str, *,
                        train_seq_len: int, train_sequences: int, batch_size: int, val_sequences: int,
                        train_steps: int, lr: float, eval_every: int, spec_seq_len: int, spec_sequences: int,
                        num_iters: int, seed: int = 0, progress: bool = True
                        ) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Notebook 01, for :func:`~hess_utils.runs.cached_tables`: the same further training of both models
    (:func:`~hess_utils.harness.training.continue_training` on ``train_sequences`` of the train split, seed
    ``seed + 1``, validated on ``val_sequences`` of the held-out split), then one SLQ probe (``num_iters``
    iterations, full re-orthogonalisation) of each trained model's Hessian on ``spec_sequences`` of the train split.
    Tables ``losses`` (``step, split, loss, setup``), ``ritz`` (with ``setup``) and ``placement``
    (:func:`device_map_placement`, taken before training); record ``hf_device_map``."""
    import pandas as pd

    from hess_utils.algorithms.slq import slq
    from hess_utils.batches import load_batches
    from hess_utils.harness.training import continue_training
    from hess_utils.operators.hessian import hessian_operator

    where = device_map_placement(single, mapped)
    train = load_batches(data_name, tokenizer, train_seq_len, train_sequences, batch_size, split="train", seed=seed + 1)
    val = load_batches(data_name, tokenizer, train_seq_len, val_sequences, val_sequences, split="heldout", seed=seed)
    spec = load_batches(data_name, tokenizer, spec_seq_len, spec_sequences, spec_sequences, split="train", seed=seed)
    losses, ritz = [], []
    for name, model in zip(DEVICE_MAP_SETUPS, (single, mapped)):
        hist = continue_training(model, train, val, steps=train_steps, lr=lr, seed=seed, eval_every=eval_every,
                                 progress=progress)
        losses.append(hist.frame().assign(setup=name))
        op = hessian_operator(model, spec, keep_graph=True)
        res = slq(op, num_iters=num_iters, num_probes=1, reorth="full", seed=seed, progress=progress)
        ritz.append(res.to_frame().assign(setup=name))
    return ({"losses": pd.concat(losses, ignore_index=True), "ritz": pd.concat(ritz, ignore_index=True),
             "placement": where["placement"]}, {"hf_device_map": where["device_map"]})


def loss_differences(losses: pd.DataFrame) -> pd.DataFrame:
    """Notebook 01: the losses of both set-ups side by side per ``split, step`` and their ``difference``
    (``device_map="auto"`` minus single device)."""
    one, auto = DEVICE_MAP_SETUPS
    wide = losses.pivot_table(index=["split", "step"], columns="setup", values="loss").reset_index()
    wide["difference"] = wide[auto] - wide[one]
    return wide


def device_map_summary(wide: pd.DataFrame, ritz: pd.DataFrame) -> dict[str, Any]:
    """Notebook 01's numbers: the largest loss difference per split (``d_train``, ``d_val``) of a
    :func:`loss_differences` table, the first and last validation loss of the single device, and the largest
    difference of the sorted Ritz values of the two set-ups (``ritz_diff``; ``top``: the largest ``|θ|``,
    ``count``: Ritz values per set-up)."""
    one, auto = DEVICE_MAP_SETUPS
    by = {name: np.sort(g["value"].to_numpy(np.float64)) for name, g in ritz.groupby("setup", sort=False)}
    val = wide[wide.split == "validation"]
    return {"ritz_diff": float(np.max(np.abs(by[one] - by[auto]))),
            "top": float(max(np.abs(v).max() for v in by.values())),
            "d_train": float(wide.loc[wide.split == "train", "difference"].abs().max()),
            "d_val": float(val["difference"].abs().max()),
            "first_val": float(val[one].iloc[0]), "final_val": float(val[one].iloc[-1]), "count": len(by[one])}


def device_map_conclusions(s: Mapping[str, Any], train_steps: int, placement: Mapping[str, Any]) -> str:
    """Notebook 01's conclusion (Markdown) from :func:`device_map_summary` and :func:`device_map_placement`."""
    same = s["d_train"] == s["d_val"] == s["ritz_diff"] == 0
    return (f"**From this run:** the validation loss went from {s['first_val']:.4f} to {s['final_val']:.4f} nats/token "
            f"in {train_steps} steps. The largest loss difference between the two set-ups is {s['d_train']:.3g} "
            f"(train) and {s['d_val']:.3g} (validation) nats/token; the largest difference of the {s['count']} Ritz "
            f"values is {s['ritz_diff']:.3g} ({s['ritz_diff'] / s['top']:.2g} relative to max |θ| = {s['top']:.4g}). "
            + ("The two runs are bit-for-bit identical: " if same else "The runs differ only at rounding level: ")
            + ("the paper saw differences at GPU machine precision between two *different machines*; here both set-ups "
               f"ran on {', '.join(placement['mapped_devices'])} of one machine, so `device_map=\"auto\"` changes "
               "nothing in the arithmetic, which is the paper's conclusion (gradients and Hessian products are "
               "computed correctly under `auto`) in its strongest form." if placement["same_place"] else
               "as in the paper, the split over devices changes the results at machine-precision level only."))


# ------------------------------------------------------------------------------------------- notebook 02: distributed
def engine_runs(out: str | Path, stem: str, options: Mapping[str, Any], engines: Mapping[str, int | None],
                threads_per_process: int = 1, verbose: bool = True) -> dict[str, Path]:
    """Notebook 02: one :func:`spectrum_subprocess` per ``{engine: nproc}`` (None: a plain process) with
    ``{**options, "engine": engine}``, each in the run folder ``runs.result_dir(out, f"{stem}_{engine}",
    {**options, "engine": engine, "nproc": nproc})`` (a finished one is read, not recomputed). Prints the seconds
    each took in this session (process start-up included) when ``verbose``; returns ``{engine: folder}``."""
    from hess_utils import runs

    folders = {}
    for engine, ranks in engines.items():
        opts = {**options, "engine": engine}
        folder = runs.result_dir(out, f"{stem}_{engine}", {**opts, "nproc": ranks})
        t0 = time.perf_counter()
        spectrum_subprocess(folder, opts, nproc=ranks, threads_per_process=threads_per_process)
        folders[engine] = folder
        if verbose:
            print(f"{engine}: {folder} ({time.perf_counter() - t0:.0f} s in this session, including process start-up)")
    return folders


def engine_table(loaded: Mapping[str, tuple[pd.DataFrame, Mapping[str, Any]]]) -> pd.DataFrame:
    """Notebook 02: which ranks, backend and devices each run used, from ``{engine: (ritz, run.json record)}``
    (:func:`hess_utils.runs.load_run`): ``engine, world_size, backend, rank_devices, dim, tokens, loss, slq_s,
    s_per_product``."""
    import pandas as pd

    return pd.DataFrame([{"engine": e, "world_size": rec.get("world_size"), "backend": rec.get("backend"),
                          "rank_devices": ", ".join(rec.get("rank_devices") or []), "dim": rec.get("dim"),
                          "tokens": rec.get("num_tokens"), "loss": rec.get("loss"),
                          "slq_s": rec["timings"]["slq_compute_s"], "s_per_product": rec["timings"]["s_per_matvec"]}
                         for e, (_, rec) in loaded.items()])


def engine_agreement(ddp: pd.DataFrame, single: pd.DataFrame, pair_rtol: float = 1e-6) -> dict[str, Any]:
    """Notebook 02's numbers: the :func:`compare_ritz` ``table`` of two Ritz tables, the largest difference of the
    sorted values (``max_dvalue``; ``max_rel`` and ``median_rel`` relative to max ``|θ_single|``) and of the weights
    in the same order (``max_dweight``), the single value where the values differ most (``worst_value``) and whether
    another Ritz value lies within ``pair_rtol * max |θ|`` of it (``paired``: a converged eigenvalue and its ghost
    copy), the ghosts flagged in ``single`` (``ghosts``) and the number of Ritz values (``count``)."""
    cmp = compare_ritz(ddp, single, labels=("ddp", "single"))
    w_ddp = ddp.sort_values(["probe", "value"])["weight"].to_numpy(np.float64)
    w_single = single.sort_values(["probe", "value"])["weight"].to_numpy(np.float64)
    worst = cmp["abs_diff"].idxmax()
    others = cmp["value_single"].drop(index=worst).to_numpy()
    scale = float(np.abs(cmp["value_single"]).max())
    value = float(cmp.loc[worst, "value_single"])
    return {"table": cmp, "max_dvalue": float(cmp["abs_diff"].max()), "max_rel": float(cmp["rel_diff"].max()),
            "median_rel": float(np.median(cmp["rel_diff"])), "max_dweight": float(np.max(np.abs(w_ddp - w_single))),
            "worst_value": value,
            "paired": bool(np.min(np.abs(others - value)) <= pair_rtol * scale) if len(others) else False,
            "ghosts": int(single["ghost"].astype(bool).sum()), "count": len(ddp)}


def engine_conclusions(a: Mapping[str, Any], record: Mapping[str, Any]) -> str:
    """Notebook 02's conclusion (Markdown) from :func:`engine_agreement` and the distributed run's ``run.json``."""
    return (f"**From these runs:** the distributed run used {record.get('world_size')} ranks ({record.get('backend')}: "
            f"{', '.join(record.get('rank_devices') or [])}). Its {a['count']} Ritz values differ from the single "
            f"process's by at most {a['max_dvalue']:.2e} ({a['max_rel']:.1e} of max |θ|; median {a['median_rel']:.1e}) "
            f"and the weights by at most {a['max_dweight']:.1e}: "
            + ("the stem plots are identical to plotting accuracy, as in the paper's Figure 2. " if a["max_rel"] < 1e-6
               else "larger than rounding: check the runs. ")
            + (f"The largest difference is at θ = {a['worst_value']:.6g}, one of two nearly equal Ritz values (a "
               "converged eigenvalue and its ghost copy), whose split is sensitive to rounding in the products. "
               if a["paired"] else "")
            + (f"{a['ghosts']} Ritz value(s) of the run without re-orthogonalisation are flagged as ghosts by the "
               "Cullum-Willoughby test (the paper attributes its one outlying value to a ghost; notebook 03 studies "
               "them)." if a["ghosts"] else "No Ritz value is flagged as a ghost at this number of iterations (the "
               "paper saw one outlier, which it attributes to a ghost, after more iterations on a far larger model; "
               "see notebook 03)."))
