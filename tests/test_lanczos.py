"""Lanczos, its state machine and Cullum-Willoughby ghost detection, on dense matrices of known spectrum."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hess_utils import _threads
from hess_utils import vectors as V
from hess_utils.algorithms import (
    cullum_willoughby_mask,
    lanczos,
    lanczos_finish,
    lanczos_init,
    lanczos_resume,
    lanczos_step,
)
from hess_utils.operators import as_operator
from hess_utils.operators.base import SymmetricOperator


def symmetric_with_eigenvalues(eigs: np.ndarray, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """``Q diag(eigs) Q^T`` with a random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (q * torch.as_tensor(eigs, dtype=torch.float64)) @ q.T
    return ((a + a.T) / 2).to(dtype)


class BlockOperator(SymmetricOperator):
    """A dense matrix acting on vectors split into blocks of several shapes."""

    def __init__(self, matrix: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        assert sum(int(np.prod(s)) for s in shapes) == matrix.shape[0]
        self.matrix = matrix
        self.param_names = [f"block{i}" for i in range(len(shapes))]
        self.shapes = [torch.Size(s) for s in shapes]
        self.dtypes = [matrix.dtype] * len(shapes)
        self.devices = [matrix.device] * len(shapes)

    def _matvec(self, v):
        flat = torch.cat([b.reshape(-1) for b in v])
        return V.unflatten(self.matrix @ flat, v)


class IdentityOperator(SymmetricOperator):
    """Returns its input: the product aliases the Lanczos vector."""

    def __init__(self, n: int) -> None:
        self.param_names, self.shapes = ["x"], [torch.Size([n])]
        self.dtypes, self.devices = [torch.float64], [torch.device("cpu")]

    def _matvec(self, v):
        return v


class FailingOperator(SymmetricOperator):
    """A dense operator whose ``fail_at``-th product returns NaN."""

    def __init__(self, matrix: torch.Tensor, fail_at: int) -> None:
        self.inner = as_operator(matrix)
        self.param_names, self.shapes = self.inner.param_names, self.inner.shapes
        self.dtypes, self.devices = self.inner.dtypes, self.inner.devices
        self.calls, self.fail_at = 0, fail_at

    def _matvec(self, v):
        self.calls += 1
        out = self.inner.matvec(v)
        if self.calls == self.fail_at:
            out[0][3] = float("nan")
        return out


@pytest.fixture(scope="module")
def distinct60():
    eigs = np.sort(np.linspace(-1.0, 3.0, 60) + np.random.default_rng(1).uniform(0, 0.01, 60))
    return eigs, symmetric_with_eigenvalues(eigs, seed=0)


# ---------------------------------------------------------------------------------------------- full runs
def test_full_reorth_recovers_every_eigenvalue(distinct60):
    eigs, a = distinct60
    res = lanczos(as_operator(a), 60, reorth="full", progress=False)
    radius = np.abs(eigs).max()
    assert res.num_iters == 60
    assert np.max(np.abs(res.ritz_values - eigs)) < 1e-8 * radius
    assert res.orthogonality_loss < 1e-12
    assert res.alphas.shape == (60,) and res.betas.shape == (59,)


def test_ritz_weights_are_squared_overlaps_with_the_start(distinct60):
    eigs, a = distinct60
    start = torch.linspace(-1, 2, 60, dtype=torch.float64) ** 2
    res = lanczos(as_operator(a), 60, start=[start], progress=False)
    _, u = torch.linalg.eigh(a)
    expected = ((u.T @ (start / start.norm())) ** 2).numpy()
    np.testing.assert_allclose(res.ritz_weights, expected, atol=1e-10)
    assert res.seed is None and res.probe == "custom"


def test_offload_gives_the_same_recurrence_as_full(distinct60):
    _, a = distinct60
    full = lanczos(as_operator(a), 40, reorth="full", seed=3, progress=False)
    off = lanczos(as_operator(a), 40, reorth="offload", seed=3, progress=False)
    np.testing.assert_allclose(off.alphas, full.alphas, rtol=0, atol=1e-12)
    np.testing.assert_allclose(off.betas, full.betas, rtol=0, atol=1e-12)
    assert off.orthogonality_loss < 1e-12


def test_no_reorth_agrees_with_full_before_orthogonality_is_lost(distinct60):
    _, a = distinct60
    full = lanczos(as_operator(a), 8, reorth="full", seed=1, progress=False)
    plain = lanczos(as_operator(a), 8, reorth="none", seed=1, progress=False)
    np.testing.assert_allclose(plain.alphas, full.alphas, atol=1e-10)
    np.testing.assert_allclose(plain.betas, full.betas, atol=1e-10)
    assert np.isnan(plain.orthogonality_loss)


def test_residual_estimates_bound_the_distance_to_an_eigenvalue():
    eigs = np.sort(np.concatenate([np.linspace(-1.0, 1.0, 58), [5.0, 8.0]]))
    res = lanczos(as_operator(symmetric_with_eigenvalues(eigs, seed=5)), 20, progress=False)
    distance = np.min(np.abs(res.ritz_values[:, None] - eigs[None, :]), axis=1)
    assert np.all(distance <= res.residual_estimates * (1 + 1e-8) + 1e-12)
    assert res.residual_estimates.max() > 1e-3  # a 20-step run has unconverged Ritz values ...
    conv = res.converged(1e-8)
    assert conv[-1] and conv[-2] and not conv.all()  # ... and the converged outliers


def test_breakdown_on_five_distinct_eigenvalues():
    values = np.array([-2.0, 0.5, 1.0, 4.0, 7.0])
    a = symmetric_with_eigenvalues(np.repeat(values, 12), seed=2)
    res = lanczos(as_operator(a), 30, progress=False)
    assert res.breakdown
    assert res.num_iters <= 5
    np.testing.assert_allclose(res.ritz_values, values, rtol=0, atol=1e-10)
    assert res.residual_estimates.max() < 1e-9


def test_float32_operator():
    eigs = np.linspace(0.5, 4.0, 40)
    a = symmetric_with_eigenvalues(eigs, seed=4, dtype=torch.float32)
    state = lanczos_init(as_operator(a), 40, reorth="full")
    assert state.basis[0].dtype == torch.float32 and state.q[0].dtype == torch.float32
    res = lanczos_resume(as_operator(a), state, progress=False)
    assert res.alphas.dtype == np.float64
    np.testing.assert_allclose(res.ritz_values, eigs, atol=1e-4 * 4.0)
    assert res.orthogonality_loss < 1e-5


# ---------------------------------------------------------------------------------------------- blocks, aliasing
def test_multi_block_operator_matches_one_block(distinct60):
    _, a = distinct60
    blocks = BlockOperator(a, [(3, 4), (5,), (2, 3, 2), (31,)])
    assert blocks.dim == 60
    start = torch.randn(60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    split = V.unflatten(start, blocks.zeros())
    for reorth in ("full", "offload", "none"):
        one = lanczos(as_operator(a), 25, reorth=reorth, start=[start], progress=False)
        many = lanczos(blocks, 25, reorth=reorth, start=split, progress=False)
        np.testing.assert_allclose(many.alphas, one.alphas, rtol=0, atol=1e-12)
        np.testing.assert_allclose(many.betas, one.betas, rtol=0, atol=1e-12)
        np.testing.assert_allclose(many.ritz_values, one.ritz_values, rtol=0, atol=1e-12)


def test_multi_block_seeded_probe_matches_flattened_probe(distinct60):
    _, a = distinct60
    blocks = BlockOperator(a, [(6, 5), (30,)])
    many = lanczos(blocks, 10, seed=7, progress=False)
    flat_start = V.flatten(blocks.random_vector("rademacher", 7))
    one = lanczos(as_operator(a), 10, start=[flat_start], progress=False)
    np.testing.assert_allclose(many.alphas, one.alphas, atol=1e-12)


def test_operator_returning_its_input_does_not_corrupt_the_basis():
    res = lanczos(IdentityOperator(10), 5, progress=False)
    assert res.breakdown and res.num_iters == 1
    np.testing.assert_allclose(res.ritz_values, [1.0])


# ---------------------------------------------------------------------------------------------- state machine
def test_state_machine_resume_and_callback(distinct60):
    _, a = distinct60
    op = as_operator(a)
    seen = []
    reference = lanczos(op, 30, seed=5, progress=False, callback=lambda s: seen.append(s.iteration))
    assert seen == list(range(1, 31))

    state = lanczos_init(op, 30, seed=5)
    for _ in range(12):
        lanczos_step(op, state)
    checkpoint = copy.deepcopy(state)
    partial = lanczos_finish(state)
    assert partial.num_iters == 12
    resumed = lanczos_resume(op, checkpoint, progress=False)
    np.testing.assert_array_equal(resumed.alphas, reference.alphas)
    np.testing.assert_array_equal(resumed.betas, reference.betas)
    with pytest.raises(ValueError, match="finished"):
        lanczos_step(op, checkpoint)


def test_start_vector_is_normalised(distinct60):
    _, a = distinct60
    start = torch.arange(60, dtype=torch.float64) - 20.0
    one = lanczos(as_operator(a), 10, start=[start], progress=False)
    scaled = lanczos(as_operator(a), 10, start=[7.5 * start], progress=False)
    np.testing.assert_allclose(one.alphas, scaled.alphas, atol=1e-12)
    assert torch.equal(start, torch.arange(60, dtype=torch.float64) - 20.0)  # not modified in place


# ---------------------------------------------------------------------------------------------- errors
def test_errors(distinct60):
    _, a = distinct60
    op = as_operator(a)
    with pytest.raises(ValueError, match="num_iters=61 exceeds the operator dimension 60; use at most dim"):
        lanczos(op, 61, progress=False)
    with pytest.raises(ValueError, match="exceeds the operator dimension"):
        lanczos(op, 61, reorth="offload", progress=False)
    with pytest.raises(ValueError, match="num_iters must be an integer >= 1"):
        lanczos(op, 0, progress=False)
    with pytest.raises(ValueError, match="start vector is zero"):
        lanczos(op, 5, start=[torch.zeros(60, dtype=torch.float64)], progress=False)
    bad = torch.ones(60, dtype=torch.float64)
    bad[4] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        lanczos(op, 5, start=[bad], progress=False)
    with pytest.raises(ValueError, match="unknown reorth 'selective'"):
        lanczos(op, 5, reorth="selective", progress=False)
    with pytest.raises(ValueError, match="unknown probe kind"):
        lanczos(op, 5, probe="uniform", progress=False)
    with pytest.raises(ValueError, match="at Lanczos iteration 3"):
        lanczos(FailingOperator(a, fail_at=3), 10, progress=False)
    with pytest.raises(ValueError, match="tol must be"):
        lanczos(op, 5, tol=-1.0, progress=False)


# ---------------------------------------------------------------------------------------------- ghosts
@pytest.fixture(scope="module")
def long_plain_run():
    """300 plain Lanczos steps on a 100-dim matrix with well-separated extreme eigenvalues."""
    rng = np.random.default_rng(0)
    eigs = np.sort(np.concatenate([rng.uniform(0, 1, 94), [-5.0, -3.0, 5.0, 7.0, 10.0, 15.0]]))
    # One thread: 300 plain steps amplify rounding, and the order of a two-thread reduction changes which
    # tiny Ritz values appear; the claims below are about one fixed, reproducible trajectory.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = lanczos(as_operator(symmetric_with_eigenvalues(eigs, seed=3)), 300, reorth="none", progress=False)
    finally:
        torch.set_num_threads(threads)
    return eigs, res


def test_long_plain_run_has_ghosts(long_plain_run):
    eigs, res = long_plain_run
    tol = 1e-8 * np.abs(eigs).max()
    conv = res.converged(1e-8)
    top_copies = np.sum(conv & (np.abs(res.ritz_values - eigs[-1]) < tol))
    assert top_copies >= 3  # lambda_max found several times: ghosts
    assert res.ghost_mask.sum() >= 20


def test_cullum_willoughby_keeps_each_converged_eigenvalue_once(long_plain_run):
    eigs, res = long_plain_run
    tol = 1e-8 * np.abs(eigs).max()
    conv = res.converged(1e-8)
    match = np.abs(res.ritz_values[:, None] - eigs[None, :]) < tol  # (k, n)
    found = (match & conv[:, None]).any(axis=0)  # true eigenvalues with a converged copy
    kept = (match & (conv & ~res.ghost_mask)[:, None]).sum(axis=0)
    assert found.all()  # 3 x dim steps converge every eigenvalue, most of them several times
    np.testing.assert_array_equal(kept[found], 1)  # none lost, none duplicated
    np.testing.assert_array_equal(kept[~found], 0)
    # every unflagged converged Ritz value is a true eigenvalue
    assert match[conv & ~res.ghost_mask].any(axis=1).all()
    # with every eigenvalue converged, the unflagged list is exactly the spectrum
    np.testing.assert_allclose(res.distinct_ritz_values, eigs, rtol=0, atol=tol)


def test_deduplicate_false_keeps_every_copy(long_plain_run):
    eigs, res = long_plain_run
    mask = cullum_willoughby_mask(res.alphas, res.betas, res.ritz_values, deduplicate=False)
    assert mask.sum() < res.ghost_mask.sum()
    assert np.all(mask <= res.ghost_mask)  # only drops flags
    near_top = np.abs(res.ritz_values - eigs[-1]) < 1e-8 * eigs[-1]
    assert np.sum(near_top & ~mask) >= 2


def test_cullum_willoughby_rule_on_hand_made_matrices():
    # Two copies of one 2 x 2 block joined by a negligible beta: every eigenvalue is double -> keep one each.
    alphas = np.array([1.0, 3.0, 1.0, 3.0])
    betas = np.array([0.5, 1e-30, 0.5])
    mask = cullum_willoughby_mask(alphas, betas)
    np.testing.assert_array_equal(mask, [False, True, False, True])
    # A simple eigenvalue that is also an eigenvalue of T without its first row/column: spurious.
    mask = cullum_willoughby_mask(np.array([1.0, 3.0]), np.array([1e-30]))
    np.testing.assert_array_equal(mask, [False, True])
    # A genuinely coupled matrix has no ghosts.
    assert not cullum_willoughby_mask(np.array([1.0, 3.0, 2.0]), np.array([0.7, 0.4])).any()
    with pytest.raises(ValueError, match="k-1"):
        cullum_willoughby_mask(np.ones(3), np.ones(3))


def _bulk_and_outliers(n: int = 3000, seed: int = 0) -> np.ndarray:
    """An LLM-like spectrum: a bulk of spread 1e-3 around zero and 10 outliers from 1 to 100 (both signs)."""
    rng = np.random.default_rng(seed)
    outliers = np.geomspace(1, 100, 10) * np.where(rng.random(10) < 0.5, -1, 1)
    return np.concatenate([rng.normal(0, 1e-3, n - 10), outliers])


def test_reorthogonalised_float32_runs_keep_every_distinct_ritz_value():
    # The multiplicity test merges distinct bulk values closer than 20 eps32 ||T||: 138 of 150 were flagged.
    eigs = _bulk_and_outliers()
    op = as_operator(torch.diag(torch.tensor(eigs, dtype=torch.float32)))
    for reorth in ("full", "offload"):
        res = lanczos(op, 150, reorth=reorth, progress=False, seed=1)
        assert res.distinct_ritz_values.size == 150  # (the ghost mask is all False by construction here)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_runs_keep_each_outlier_once_and_genuine_small_weights(dtype):
    eigs = _bulk_and_outliers()
    outliers = np.sort(eigs[-10:])
    op = as_operator(torch.diag(torch.tensor(eigs, dtype=dtype)))
    long = lanczos(op, 600, reorth="none", progress=False, seed=1)
    big = np.abs(long.ritz_values) > 0.5
    assert (big & long.ghost_mask).sum() >= 400  # hundreds of copies of the outliers ...
    kept = long.ritz_values[big & ~long.ghost_mask]
    atol = 1e3 * float(torch.finfo(dtype).eps) * 100  # float32 Ritz values are good to a few eps ||T||
    np.testing.assert_allclose(kept, outliers, rtol=0, atol=atol)  # ... and each outlier listed exactly once
    # A short run from a probe almost in the bulk, as for an LLM Hessian: beta_1 << ||T||, and the genuine
    # outliers (weight 3e-8) were flagged in float32 by the distance test alone. Only a copy of the converged
    # top eigenvalue (weight 1e-13) is a ghost.
    start = torch.ones(eigs.size, dtype=dtype)
    start[-10:] = 1e-2
    short = lanczos(op, 12, reorth="none", progress=False, start=[start])
    genuine = (np.abs(short.ritz_values) > 0.5) & (short.ritz_weights > 1e-9)
    assert genuine.sum() >= 7 and short.ritz_weights[genuine].max() < 1e-6
    assert not short.ghost_mask[genuine].any()
    original = cullum_willoughby_mask(short.alphas, short.betas, short.ritz_values, weight_floor=np.inf,
                                      unit_roundoff=float(torch.finfo(dtype).eps))
    if dtype == torch.float32:
        assert original[genuine].sum() >= 3  # the failure this guards against


def test_reorthogonalisation_split_among_threads_matches_one_thread(distinct60, monkeypatch):
    """The CPU column split (several threads, each a share of every block's columns) changes nothing but
    rounding: same projections, same Lanczos run."""
    import sys

    lz = sys.modules["hess_utils.algorithms.lanczos"]
    g = torch.Generator().manual_seed(3)
    shapes = [(37,), (5, 11), (300,), (2, 3)]
    basis = [torch.randn(9, int(np.prod(s)), generator=g, dtype=torch.float64) for s in shapes]
    w = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]

    def project(workers):
        monkeypatch.setattr(_threads, "cpu_workers", lambda: workers)
        out = [x.clone() for x in w]
        coeffs = lz._basis_coefficients(basis, out, 7)
        lz._subtract_projection_(out, basis, coeffs, 7)
        return coeffs, out

    monkeypatch.setattr(lz, "_MIN_SPLIT_COLUMNS", 4)
    monkeypatch.setattr(_threads, "cpu_workers", lambda: 3)
    shares = lz._column_shares(basis, w)
    assert shares is not None and len(shares) == 3
    covered = sorted((i, start, stop) for share in shares for i, start, stop in share)
    for i, Qb in enumerate(basis):  # every column of every block exactly once
        pieces = [(a, b) for j, a, b in covered if j == i]
        assert pieces[0][0] == 0 and pieces[-1][1] == Qb.shape[1]
        assert all(pieces[t][1] == pieces[t + 1][0] for t in range(len(pieces) - 1))
    (c3, w3), (c1, w1) = project(3), project(1)
    assert torch.allclose(c3, c1, rtol=1e-13, atol=0)
    for a, b in zip(w3, w1, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    direct = torch.tensor([sum(float(Qb[r] @ x.reshape(-1)) for Qb, x in zip(basis, w, strict=True))
                           for r in range(7)], dtype=torch.float64)
    torch.testing.assert_close(c1, direct, rtol=1e-13, atol=0)

    _, a = distinct60
    blocks = BlockOperator(a, [(3, 4), (5,), (2, 3, 2), (31,)])
    start = V.unflatten(torch.randn(60, generator=g, dtype=torch.float64), blocks.zeros())
    monkeypatch.setattr(_threads, "cpu_workers", lambda: 3)
    threaded = lanczos(blocks, 40, reorth="full", start=start, progress=False)
    monkeypatch.setattr(_threads, "cpu_workers", lambda: 1)
    single = lanczos(blocks, 40, reorth="full", start=start, progress=False)
    np.testing.assert_allclose(threaded.ritz_values, single.ritz_values, rtol=0, atol=1e-12)
    assert threaded.orthogonality_loss < 1e-12
