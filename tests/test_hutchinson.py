"""Hutchinson diagonal and trace estimators and Hutch++ on dense matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hess_utils import vectors as V
from hess_utils.algorithms import hutchinson_diagonal, hutchinson_trace
from hess_utils.operators import as_operator
from hess_utils.operators.base import SymmetricOperator


def random_symmetric(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T) / 2 + torch.diag(torch.linspace(-2, 5, n, dtype=torch.float64))


class BlockOperator(SymmetricOperator):
    """A dense matrix acting on vectors split into blocks of several shapes."""

    def __init__(self, matrix: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        self.matrix = matrix
        self.param_names = [f"block{i}" for i in range(len(shapes))]
        self.shapes = [torch.Size(s) for s in shapes]
        self.dtypes = [matrix.dtype] * len(shapes)
        self.devices = [matrix.device] * len(shapes)

    def _matvec(self, v):
        return V.unflatten(self.matrix @ torch.cat([b.reshape(-1) for b in v]), v)


def test_diagonal_error_falls_like_one_over_sqrt_k():
    a = random_symmetric(50, seed=1)
    op, truth = as_operator(a), torch.diagonal(a).numpy()
    checkpoints = (16, 64, 256, 1024)
    sq_errors = np.zeros(len(checkpoints))
    for seed in range(12):
        def record(k, estimate, seed=seed):
            if k in checkpoints:
                sq_errors[checkpoints.index(k)] += np.sum((estimate[0].numpy() - truth) ** 2)
        hutchinson_diagonal(op, 1024, seed=seed, progress=False, callback=record)
    slope = np.polyfit(np.log(checkpoints), 0.5 * np.log(sq_errors), 1)[0]
    assert -0.6 < slope < -0.4


def test_diagonal_confidence_intervals_cover_about_95_percent():
    a = random_symmetric(400, seed=2)
    res = hutchinson_diagonal(as_operator(a), 300, seed=0, progress=False)
    est, err = res.to_numpy()
    assert est.dtype == np.float64 and err.shape == (400,)
    covered = np.abs(est - torch.diagonal(a).numpy()) <= 1.96 * err
    assert 0.88 <= covered.mean() <= 0.99
    # the standard error is the spread of v*Hv over sqrt(K): off-diagonal row norms over sqrt(300)
    offdiag = np.sqrt((a**2).sum(1).numpy() - torch.diagonal(a).numpy() ** 2)
    np.testing.assert_allclose(np.median(err / (offdiag / np.sqrt(300))), 1.0, rtol=0.1)


def test_diagonal_of_a_diagonal_matrix_is_exact_with_rademacher_probes():
    d = torch.linspace(-3, 4, 30, dtype=torch.float64)
    res = hutchinson_diagonal(as_operator(torch.diag(d)), 5, progress=False)
    torch.testing.assert_close(res.estimate[0], d, rtol=0, atol=1e-14)
    assert float(res.stderr[0].max()) < 1e-14
    one = hutchinson_diagonal(as_operator(torch.diag(d)), 1, progress=False)
    assert torch.isnan(one.stderr[0]).all()


def test_diagonal_keeps_block_shapes_and_matches_the_flat_operator():
    a = random_symmetric(29, seed=3)
    blocks = BlockOperator(a, [(3, 4), (5,), (2, 3, 2)])
    many = hutchinson_diagonal(blocks, 20, seed=4, progress=False)
    assert [tuple(e.shape) for e in many.estimate] == [(3, 4), (5,), (2, 3, 2)]
    assert all(e.dtype == torch.float64 for e in many.estimate + many.stderr)
    # the same probes, flattened, give the same estimate
    flat = torch.stack([V.flatten(blocks.random_vector("rademacher", s)) for s in range(4 * 1_000_003,
                                                                                    4 * 1_000_003 + 20)])
    expected = (flat * (flat @ a)).mean(0)
    torch.testing.assert_close(V.flatten(many.estimate), expected, rtol=0, atol=1e-12)


def test_trace_is_unbiased_within_three_standard_errors():
    a = random_symmetric(200, seed=5)
    truth = float(torch.trace(a))
    for probe in ("rademacher", "gaussian"):
        res = hutchinson_trace(as_operator(a), 400, seed=1, probe=probe, progress=False)
        assert isinstance(res.estimate, float) and res.stderr > 0
        assert abs(res.estimate - truth) < 3 * res.stderr


def test_hutch_plus_plus_beats_hutchinson_on_low_rank_plus_small():
    g = torch.Generator().manual_seed(6)
    n = 300
    u, _ = torch.linalg.qr(torch.randn(n, 10, generator=g, dtype=torch.float64))
    noise = torch.randn(n, n, generator=g, dtype=torch.float64) * 0.01
    a = (u * torch.linspace(20, 100, 10, dtype=torch.float64)) @ u.T + (noise + noise.T) / 2
    op, truth = as_operator(a), float(torch.trace(a))
    plain = [abs(hutchinson_trace(op, 60, seed=s, progress=False).estimate - truth) for s in range(8)]
    runs = [hutchinson_trace(op, 60, seed=s, method="hutch++", progress=False) for s in range(8)]
    better = [abs(r.estimate - truth) for r in runs]
    assert np.mean(better) < 0.1 * np.mean(plain)
    assert all(r.method == "hutch++" and r.num_probes == 60 for r in runs)
    assert all(abs(r.estimate - truth) < 4 * r.stderr for r in runs)


def test_hutch_plus_plus_on_an_exactly_low_rank_matrix():
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(80, 3, generator=g, dtype=torch.float64))
    a = (u * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)) @ u.T
    res = hutchinson_trace(as_operator(a), 30, method="hutch++", progress=False)
    assert abs(res.estimate - 6.0) < 1e-10


def test_errors():
    op = as_operator(random_symmetric(10))
    with pytest.raises(ValueError, match="num_probes must be an integer >= 3"):
        hutchinson_trace(op, 2, method="hutch++", progress=False)
    with pytest.raises(ValueError, match="unknown method 'xtrace'"):
        hutchinson_trace(op, 10, method="xtrace", progress=False)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1"):
        hutchinson_diagonal(op, 0, progress=False)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        hutchinson_diagonal(op, 3, seed=-1, progress=False)
