"""Hutchinson estimators of the diagonal and the trace of ``H``, and Hutch++.

For probes :math:`v` with :math:`\\mathbb{E}[v v^\\top] = I` (Rademacher or Gaussian),
:math:`\\mathbb{E}[v \\odot H v] = \\operatorname{diag}(H)` and :math:`\\mathbb{E}[v^\\top H v] =
\\operatorname{tr} H`. With :math:`K` independent probes the sample mean is unbiased and its standard error
is :math:`\\sqrt{s^2 / K}` (sample variance :math:`s^2`), which falls like :math:`1/\\sqrt{K}`.

The diagonal estimator streams: it keeps a running mean and a Welford sum of squared deviations per entry
(float64, on each block's device), never a probes x dim matrix.

Hutch++ (Meyer, Musco, Musco and Woodruff, SOSA 2021) spends a third of the products on a sketch
:math:`Q = \\operatorname{orth}(H S)` of the dominant range, takes :math:`\\operatorname{tr}(Q^\\top H Q)`
exactly and applies Hutchinson only to the deflated :math:`(I - QQ^\\top) H (I - QQ^\\top)`, which is
much more accurate when the spectrum is dominated by a few large eigenvalues.

Probe ``p`` is ``op.random_vector(probe, seed * 1_000_003 + p)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from hess_utils import vectors as V
from hess_utils._memory import holds_freed_memory
from hess_utils.algorithms._frozen import short_repr
from hess_utils.algorithms.probes import check_count, check_seed, probe_seed
from hess_utils.operators.base import SymmetricOperator
from hess_utils.progress import progress_bar
from hess_utils.vectors import TensorList

TRACE_METHODS = ("hutchinson", "hutch++")


@dataclass(frozen=True)
class HutchinsonResult:
    """A Hutchinson estimate and its standard error.

    Attributes
    ----------
    estimate : list of tensors or float
        Diagonal estimate (float64 blocks shaped like the operator's, on its devices) or trace estimate.
    stderr : list of tensors or float
        Standard error of the estimate, entry by entry (diagonal) or scalar (trace): ``sqrt(s^2 / K)``
        with the sample variance ``s^2`` of the ``K`` stochastic terms; NaN when ``K = 1``. For Hutch++
        only the stochastic (deflated) part contributes.
    num_probes : int
        Products with ``H`` spent (Hutch++: all three parts together).
    method : str
        ``"diagonal"``, ``"hutchinson"`` or ``"hutch++"``.
    seed : int
    probe : str
    """

    estimate: list[torch.Tensor] | float
    stderr: list[torch.Tensor] | float
    num_probes: int
    method: str
    seed: int
    probe: str

    __repr__ = short_repr

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(estimate, stderr)`` as flat float64 numpy arrays (block order; 0-d for a trace)."""
        if isinstance(self.estimate, float):
            return np.asarray(self.estimate), np.asarray(self.stderr)
        return V.flatten(self.estimate).numpy(), V.flatten(self.stderr).numpy()


# ---------------------------------------------------------------------------------------------- diagonal
def _welford_update_(mean: TensorList, m2: TensorList, sample: TensorList, count: int) -> None:
    """Fold the ``count``-th sample into the running mean and sum of squared deviations (in place)."""
    for mb, sb, xb in zip(mean, m2, sample, strict=True):
        delta = xb - mb
        mb.add_(delta, alpha=1.0 / count)
        sb.add_(delta * (xb - mb))


def _standard_error(m2: TensorList, count: int) -> TensorList:
    """``sqrt(m2 / (K - 1) / K)`` per entry; NaN for a single sample."""
    if count < 2:
        return [torch.full_like(b, math.nan) for b in m2]
    return [torch.sqrt(b / ((count - 1) * count)) for b in m2]


def _diagonal_sample(op: SymmetricOperator, v: TensorList) -> TensorList:
    """``v * (H v)`` in float64, block by block."""
    hv = op.matvec(v)
    return [vb.to(torch.float64) * hb.to(device=vb.device, dtype=torch.float64) for vb, hb in zip(v, hv, strict=True)]


@holds_freed_memory
def hutchinson_diagonal(
    op: SymmetricOperator,
    num_probes: int,
    seed: int = 0,
    probe: str = "rademacher",
    progress: bool = True,
    callback: Callable[[int, TensorList], None] | None = None,
) -> HutchinsonResult:
    """Estimate :math:`\\operatorname{diag}(H)` as the mean of :math:`v_k \\odot H v_k` over ``K`` probes.

    Parameters
    ----------
    op : SymmetricOperator
        The symmetric operator :math:`H`.
    num_probes : int
        Number of probes ``K`` (one product with ``H`` each).
    seed : int
        Probe ``k`` is ``op.random_vector(probe, seed * 1_000_003 + k)``.
    probe : {"rademacher", "gaussian"}
        Distribution of the probes (Rademacher has the lower variance).
    progress : bool
        Show a progress bar.
    callback : callable, optional
        Called as ``callback(k, estimate)`` after probe ``k = 1..K`` with a copy of the running mean
        (float64 blocks), e.g. to record a convergence curve.

    Returns
    -------
    HutchinsonResult
        ``estimate`` and ``stderr`` are lists of float64 tensors shaped like the operator's blocks.
    """
    num_probes = check_count("num_probes", num_probes)
    seed = check_seed(seed)
    mean = [torch.zeros(b.shape, dtype=torch.float64, device=b.device) for b in op.zeros()]
    m2 = V.zeros_like(mean)
    for k in progress_bar(range(1, num_probes + 1), desc="hutchinson diagonal", disable=not progress):
        v = op.random_vector(probe, probe_seed(seed, k - 1))
        _welford_update_(mean, m2, _diagonal_sample(op, v), k)
        if callback is not None:
            callback(k, V.clone(mean))
    if not all(bool(torch.isfinite(b).all()) for b in mean):
        raise ValueError("the operator returned non-finite values; the diagonal estimate is not finite")
    return HutchinsonResult(
        estimate=mean,
        stderr=_standard_error(m2, num_probes),
        num_probes=num_probes,
        method="diagonal",
        seed=seed,
        probe=probe,
    )


# ---------------------------------------------------------------------------------------------- trace
def _mean_and_stderr(samples: list[float]) -> tuple[float, float]:
    """Sample mean and its standard error ``std(ddof=1) / sqrt(K)`` (NaN for one sample)."""
    x = np.asarray(samples, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("the operator returned non-finite values; the trace estimate is not finite")
    stderr = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), stderr


def _quadratic_form(op: SymmetricOperator, v: TensorList) -> float:
    """:math:`v^\\top H v` accumulated in float64."""
    return V.dot(v, op.matvec(v))


def _append_orthonormal(basis: list[TensorList], v: TensorList) -> None:
    """Orthogonalise ``v`` against ``basis`` (Gram-Schmidt twice, in place) and append it normalised.

    A remainder below ``sqrt(eps)`` times the original norm is (nearly) dependent and dropped: any
    orthonormal basis keeps Hutch++ unbiased, so dropping costs only variance reduction, while
    normalising a rounding-level remainder could leave a direction that is not orthogonal.
    """
    size = V.norm(v)
    _project_out_(v, basis)
    rest = V.norm(v)
    eps = max(torch.finfo(b.dtype).eps for b in v)
    if rest > 0 and rest > math.sqrt(eps) * size:
        V.scale_(1.0 / rest, v)
        basis.append(v)


def _project_out_(v: TensorList, basis: list[TensorList]) -> None:
    """In place ``v <- (I - Q Q^T) v`` (twice, for orthogonality to working precision)."""
    for _ in range(2):
        for q in basis:
            V.axpy_(-V.dot(q, v), q, v)


def _hutchinson_samples(
    op: SymmetricOperator,
    count: int,
    seed: int,
    first: int,
    probe: str,
    bar: tqdm,
    basis: list[TensorList] | None = None,
) -> list[float]:
    """:math:`z^\\top P H P z` for probes ``first .. first + count - 1``, ``P = I - QQ^T`` (``I`` without basis)."""
    out = []
    for i in range(first, first + count):
        z = op.random_vector(probe, probe_seed(seed, i))
        if basis:
            _project_out_(z, basis)
        out.append(_quadratic_form(op, z))
        bar.update(1)
    return out


def _hutch_plus_plus(
    op: SymmetricOperator, num_probes: int, seed: int, probe: str, bar: tqdm
) -> tuple[float, float]:
    """Hutch++: ``s = num_probes // 3`` sketch probes (ids ``0..s-1``), the rest for the deflated part."""
    sketch = num_probes // 3
    basis: list[TensorList] = []
    for i in range(sketch):
        _append_orthonormal(basis, V.clone(op.matvec(op.random_vector(probe, probe_seed(seed, i)))))
        bar.update(1)
    exact = 0.0
    for q in basis:
        exact += _quadratic_form(op, q)
        bar.update(1)
    bar.update(sketch - len(basis))  # products not needed when the sketch has lower rank
    rest = num_probes - 2 * sketch
    residual, stderr = _mean_and_stderr(_hutchinson_samples(op, rest, seed, sketch, probe, bar, basis))
    return exact + residual, stderr


@holds_freed_memory
def hutchinson_trace(
    op: SymmetricOperator,
    num_probes: int,
    seed: int = 0,
    method: str = "hutchinson",
    probe: str = "rademacher",
    progress: bool = True,
) -> HutchinsonResult:
    """Estimate :math:`\\operatorname{tr} H` with ``num_probes`` products with ``H``.

    Parameters
    ----------
    op : SymmetricOperator
        The symmetric operator :math:`H`.
    num_probes : int
        Products with ``H`` to spend. ``"hutch++"`` needs at least 3: ``s = num_probes // 3`` for the
        sketch :math:`H S`, up to ``s`` for :math:`Q^\\top H Q`, the remaining ``num_probes - 2 s`` for
        Hutchinson on the deflated operator.
    seed : int
        Probe ``p`` is ``op.random_vector(probe, seed * 1_000_003 + p)`` (Hutch++: sketch probes first).
    method : {"hutchinson", "hutch++"}
        Plain Hutchinson, or Hutch++ (Meyer et al. 2021).
    probe : {"rademacher", "gaussian"}
        Distribution of the probes.
    progress : bool
        Show a progress bar.

    Returns
    -------
    HutchinsonResult
        ``estimate`` and ``stderr`` are floats; for Hutch++ ``stderr`` is that of the deflated part
        (the sketched part is exact given the sketch).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {TRACE_METHODS}")
    num_probes = check_count("num_probes", num_probes, minimum=3 if method == "hutch++" else 1)
    seed = check_seed(seed)
    with progress_bar(total=num_probes, desc=f"{method} trace", disable=not progress) as bar:
        if method == "hutch++":
            estimate, stderr = _hutch_plus_plus(op, num_probes, seed, probe, bar)
        else:
            estimate, stderr = _mean_and_stderr(_hutchinson_samples(op, num_probes, seed, 0, probe, bar))
    return HutchinsonResult(
        estimate=estimate, stderr=stderr, num_probes=num_probes, method=method, seed=seed, probe=probe
    )
