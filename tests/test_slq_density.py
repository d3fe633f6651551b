"""SLQ, Gaussian-smoothed and log densities, and KPM, against matrices of known spectrum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from hess_utils.algorithms import (
    chebyshev_density,
    gaussian_density,
    jackson_coefficients,
    kpm_density,
    lanczos,
    log_abs_density,
    measure_moments,
    probe_seed,
    slq,
    spectral_nodes,
)
from hess_utils.operators import as_operator


def symmetric_with_eigenvalues(eigs: np.ndarray, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigs) Q^T`` with a random orthogonal ``Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (q * torch.as_tensor(eigs, dtype=torch.float64)) @ q.T
    return (a + a.T) / 2


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


@pytest.fixture(scope="module")
def hessian_like():
    """n = 2000: a bulk near zero (mostly positive, some negative) plus 25 positive and 5 negative outliers."""
    rng = np.random.default_rng(3)
    n = 2000
    bulk = rng.gamma(1.0, 0.05, n - 30) * np.where(rng.random(n - 30) < 0.85, 1.0, -0.3)
    outliers = np.concatenate([rng.uniform(2, 10, 25), rng.uniform(-1.5, -0.5, 5)])
    eigs = np.sort(np.concatenate([bulk, outliers]))
    return eigs, as_operator(symmetric_with_eigenvalues(eigs, seed=5))


@pytest.fixture(scope="module")
def hessian_like_slq(hessian_like):
    _, op = hessian_like
    return slq(op, num_iters=80, num_probes=10, seed=0, progress=False)


@pytest.fixture(scope="module")
def hessian_like_kpm(hessian_like):
    _, op = hessian_like
    return kpm_density(op, num_moments=200, num_probes=10, seed=0, progress=False)


# ---------------------------------------------------------------------------------------------- SLQ
def test_slq_measure_is_close_to_the_eigenvalue_distribution(hessian_like, hessian_like_slq):
    eigs, _ = hessian_like
    values, weights = hessian_like_slq.spectral_measure()
    assert values.shape == (800,) and abs(weights.sum() - 1) < 1e-12
    width = eigs.max() - eigs.min()
    w1 = wasserstein_distance(values, eigs, u_weights=weights)
    assert w1 < 0.005 * width
    # the extreme Ritz values converge to the extreme eigenvalues
    assert abs(np.nanmax(hessian_like_slq.ritz_values) - eigs.max()) < 1e-8 * width
    assert abs(np.nanmin(hessian_like_slq.ritz_values) - eigs.min()) < 1e-8 * width


def test_slq_shapes_seeds_and_tables(hessian_like, hessian_like_slq):
    _, op = hessian_like
    res = hessian_like_slq
    assert res.ritz_values.shape == res.ritz_weights.shape == res.ghost_masks.shape == (10, 80)
    assert res.alphas.shape == (10, 80) and res.betas.shape == (10, 79)
    assert res.dim == 2000 and res.num_probes == 10 and res.num_iters == 80
    np.testing.assert_allclose(res.ritz_weights.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(np.diff(res.ritz_values, axis=1) >= 0)
    # probe p is the Lanczos run started from seed * 1_000_003 + p
    assert res.reorth == "partial"  # the default
    again = lanczos(op, 80, reorth="partial", seed=probe_seed(0, 7), progress=False)
    np.testing.assert_array_equal(res.alphas[7], again.alphas)
    assert probe_seed(2, 7) == 2 * 1_000_003 + 7

    table = res.table(3)
    assert list(table.columns) == ["value", "weight", "ghost", "residual"]
    assert table["value"].is_monotonic_increasing and len(table) == 80
    frame = res.to_frame()
    assert list(frame.columns) == ["probe", "value", "weight"] and len(frame) == 800
    np.testing.assert_allclose(frame.groupby("probe")["weight"].sum(), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        res.table(10)


def test_slq_pads_runs_that_break_down_early():
    # One eigenvector is (e0 - e1)/sqrt(2): Rademacher probes with v0 == v1 never see it (4 nodes, not 5).
    n = 10
    u0 = np.zeros(n)
    u0[[0, 1]] = [1 / math.sqrt(2), -1 / math.sqrt(2)]
    rest = np.linalg.qr(np.column_stack([u0, np.random.default_rng(0).standard_normal((n, n - 1))]))[0][:, 1:]
    eig_rest = np.repeat([1.0, 2.0, 3.0, 4.0], [3, 2, 2, 2])
    a = 7.0 * np.outer(u0, u0) + (rest * eig_rest) @ rest.T
    res = slq(as_operator(torch.tensor((a + a.T) / 2)), num_iters=8, num_probes=12, progress=False)
    assert set(res.iterations.tolist()) == {4, 5}
    assert res.ritz_values.shape == (12, 5)
    short = res.iterations == 4
    assert np.all(np.isnan(res.ritz_values[short, 4])) and np.all(res.ritz_weights[short, 4] == 0)
    assert np.all(np.isnan(res.betas[short, 3]))
    np.testing.assert_allclose(res.ritz_weights.sum(axis=1), 1.0, atol=1e-12)
    values, weights = res.spectral_measure()
    assert values.size == res.iterations.sum() and abs(weights.sum() - 1) < 1e-12
    assert len(res.table(int(np.flatnonzero(short)[0]))) == 4
    assert len(res.to_frame()) == res.iterations.sum()


# ---------------------------------------------------------------------------------------------- Gaussian density
def test_gaussian_density_integrates_to_one_and_matches_a_hand_computed_mixture():
    values = np.array([-1.0, 0.0, 2.5])
    weights = np.array([0.2, 0.5, 0.3])
    raw = gaussian_density((values, weights), sigma=0.3, normalize=False)
    assert abs(raw.mass_on_grid - 1) < 1e-5  # the default grid reaches 5 sigma beyond the nodes
    x = 0.4
    by_hand = sum(w * math.exp(-((x - v) ** 2) / (2 * 0.3**2)) / (0.3 * math.sqrt(2 * math.pi))
                  for v, w in zip(values, weights, strict=True))
    at = gaussian_density((values, weights), sigma=0.3, grid=np.array([x - 1e-3, x, x + 1e-3]), normalize=False)
    assert abs(at.density[1] - by_hand) < 1e-14
    dens = gaussian_density((values, weights), sigma=0.3)
    assert abs(trapezoid(dens.density, dens.grid) - 1) < 1e-12
    assert dens.sigma == 0.3 and dens.grid.shape == (1000,)
    assert dens.grid[0] == pytest.approx(-1.0 - 5 * 0.3) and dens.grid[-1] == pytest.approx(2.5 + 5 * 0.3)
    np.testing.assert_allclose(dens.density, raw.density / raw.mass_on_grid)


def test_gaussian_density_defaults_and_errors(hessian_like_slq):
    dens = gaussian_density(hessian_like_slq)
    values, _ = spectral_nodes(hessian_like_slq)
    assert dens.sigma == pytest.approx((values.max() - values.min()) / 100)
    assert abs(trapezoid(dens.density, dens.grid) - 1) < 1e-12
    assert np.all(dens.density >= 0)
    single = gaussian_density(hessian_like_slq.runs[0], sigma=0.05)
    assert abs(trapezoid(single.density, single.grid) - 1) < 1e-12
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sigma must be a positive standard deviation"):
            gaussian_density(hessian_like_slq, sigma=bad)
    with pytest.raises(ValueError, match="pass sigma explicitly"):
        gaussian_density((np.array([1.0, 1.0]), np.array([0.5, 0.5])))
    with pytest.raises(ValueError, match="strictly increasing"):
        gaussian_density(hessian_like_slq, sigma=0.1, grid=np.array([1.0, 0.0]))


def test_gaussian_density_of_slq_approaches_the_smoothed_truth(hessian_like, hessian_like_slq):
    eigs, _ = hessian_like
    est = gaussian_density(hessian_like_slq, sigma=0.05)
    truth = gaussian_density((eigs, np.ones_like(eigs)), sigma=0.05, grid=est.grid)
    assert trapezoid(np.abs(est.density - truth.density), est.grid) < 0.05


def test_log_abs_density_splits_signs():
    values = np.array([-100.0, -1.0, 1e-9, 0.01, 10.0])
    weights = np.array([0.2, 0.1, 0.05, 0.25, 0.4])
    res = log_abs_density((values, weights), sigma_log=0.05, threshold=1e-6)
    assert res.positive_mass == pytest.approx(0.65)
    assert res.negative_mass == pytest.approx(0.3)
    assert res.near_zero_mass == pytest.approx(0.05)
    assert trapezoid(res.positive, res.grid) == pytest.approx(0.65, abs=1e-6)
    assert trapezoid(res.negative, res.grid) == pytest.approx(0.3, abs=1e-6)
    assert res.grid[np.argmax(res.negative)] == pytest.approx(2.0, abs=0.01)  # |-100| -> u = 2
    assert res.grid[np.argmax(res.positive)] == pytest.approx(1.0, abs=0.01)  # 10 -> u = 1
    with pytest.raises(ValueError, match="sigma_log"):
        log_abs_density((values, weights), sigma_log=0.0)


# ---------------------------------------------------------------------------------------------- KPM
def test_jackson_and_exact_moments_recover_a_known_density():
    g = jackson_coefficients(50)
    assert g[0] == pytest.approx(1.0) and np.all(np.diff(g) < 0) and g[-1] > 0
    # The uniform distribution on [-0.5, 0.5], seen through bounds (-1, 3): density 1 away from the edges.
    nodes = np.linspace(-0.5, 0.5, 20001)
    bounds = (-1.0, 3.0)
    grid = np.linspace(-0.3, 0.3, 61)
    dens = chebyshev_density(measure_moments(nodes, np.full(nodes.size, 1 / nodes.size), bounds, 200), bounds, grid)
    np.testing.assert_allclose(dens, 1.0, rtol=0.03)
    assert chebyshev_density(np.array([1.0]), bounds, np.array([-2.0, 3.5])).tolist() == [0.0, 0.0]


def test_kpm_matches_exact_moments_slq_and_smoothed_truth(hessian_like, hessian_like_slq, hessian_like_kpm):
    eigs, _ = hessian_like
    kpm = hessian_like_kpm
    grid, bounds = kpm.grid, kpm.bounds
    width = eigs.max() - eigs.min()
    assert bounds[0] < eigs.min() and bounds[1] > eigs.max()
    assert bounds[1] - bounds[0] < 1.2 * width
    assert abs(trapezoid(kpm.density, grid) - 1) < 1e-12 and kpm.mass_on_grid == pytest.approx(1.0, abs=1e-3)
    assert kpm.moments[0] == pytest.approx(1.0) and kpm.probe_moments.shape == (10, 200)

    # 1. Only Monte Carlo error separates KPM from the same reconstruction with the exact moments.
    exact = chebyshev_density(measure_moments(eigs, np.full(eigs.size, 1 / eigs.size), bounds, 200), bounds, grid)
    exact /= trapezoid(exact, grid)
    assert trapezoid(np.abs(kpm.density - exact), grid) < 0.05

    # 2. Against Gaussian smoothing with the Jackson kernel's width at the bulk (sigma ~ pi h sqrt(1-t^2) / M).
    h, c = (bounds[1] - bounds[0]) / 2, (bounds[1] + bounds[0]) / 2
    sigma = math.pi * h * math.sqrt(1 - (c / h) ** 2) / 200
    smooth_slq = gaussian_density(hessian_like_slq, sigma=sigma, grid=grid).density
    smooth_true = gaussian_density((eigs, np.ones_like(eigs)), sigma=sigma, grid=grid).density
    for other in (smooth_slq, smooth_true):
        assert trapezoid(np.abs(kpm.density - other), grid) < 0.1
        assert wasserstein_distance(grid, grid, kpm.density, other) < 0.005 * width
    assert wasserstein_distance(grid, eigs, u_weights=kpm.density) < 0.005 * width


def test_kpm_refuses_bounds_that_cut_the_spectrum():
    eigs = np.linspace(-1.0, 4.0, 50)
    op = as_operator(symmetric_with_eigenvalues(eigs, seed=1))
    with pytest.raises(ValueError, match="pass wider bounds"):
        kpm_density(op, num_moments=60, num_probes=2, bounds=(-1.0, 2.0), progress=False)
    with pytest.raises(ValueError, match="lower < upper"):
        kpm_density(op, bounds=(2.0, 1.0), progress=False)
    ok = kpm_density(op, num_moments=60, num_probes=2, bounds=(-1.5, 4.5), progress=False)
    assert ok.bounds == (-1.5, 4.5) and np.all(ok.grid > -1.5) and np.all(ok.grid < 4.5)
