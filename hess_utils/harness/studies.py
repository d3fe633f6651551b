"""Small, reusable measurements behind the notebooks (05-09): each returns tables, never plots.

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
import ctypes
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
from hess_utils.algorithms.lanczos import machine_epsilon
from hess_utils.algorithms.probes import probe_seed
from hess_utils.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from hess_utils.operators.base import SymmetricOperator

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def unit_roundoff(dtype: str | torch.dtype) -> float:
    """``u = eps / 2`` of a floating dtype (1.1e-16 float64, 6.0e-8 float32, 3.9e-3 bfloat16)."""
    return machine_epsilon([_dtype(dtype)]) / 2


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
            dtype = _dtype(name)
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

    sequences = split_sequences(batches)
    mats, tokens = [], []
    for seq in progress_bar(sequences, desc="per-sequence subset Hessians", disable=not progress):
        result = subset_hessian(model, [seq], subset, reduction="sum", progress=False)
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
def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the RSS baseline of a measurement is honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
            _malloc_trim()
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
