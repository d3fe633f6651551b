"""Result objects a researcher reads in JupyterLab: a short repr (no arrays printed) and tables."""

from __future__ import annotations

import numpy as np
import torch

import hess_utils as hu
from hess_utils.algorithms.blocks import block_diagonal_error
from hess_utils.algorithms.density import gaussian_density
from hess_utils.algorithms.kpm import kpm_density
from hess_utils.algorithms.slq import slq


def _operator(n: int = 60):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigs = np.concatenate([np.linspace(-1, 1, n - 3), [5.0, 8.0, 12.0]])
    return hu.as_operator(torch.from_numpy((q * eigs) @ q.T))


def test_density_results_print_short_and_tabulate():
    res = slq(_operator(), num_iters=20, num_probes=2, progress=False)
    dens = gaussian_density(res, num_points=500)
    text = repr(dens)
    assert text.startswith("DensityResult(") and "array[500] float64" in text and len(text) < 200
    frame = dens.to_frame()
    assert list(frame.columns) == ["grid", "density"] and len(frame) == 500
    assert np.array_equal(frame["density"].to_numpy(), dens.density)
    kpm = kpm_density(_operator(), num_moments=20, num_probes=2, progress=False)
    assert len(repr(kpm)) < 300 and list(kpm.to_frame().columns) == ["grid", "density"]


def test_block_error_tabulates_one_row_per_vector():
    op = _operator()
    err = block_diagonal_error(op, by="tensor", num_vectors=3)
    frame = err.to_frame()
    assert len(frame) == 3 and np.allclose(frame["relative_error"], err.relative_errors)
    assert "relative_errors=array[3]" in repr(err)


def test_lanczos_and_slq_print_short_and_lanczos_and_solves_tabulate():
    """A long run's repr summarises its arrays (a notebook shows the scalars, not 400 numbers), and the
    Ritz table / residual history come out as DataFrames whose columns are the result's own arrays."""
    op = hu.as_operator(torch.diag(torch.linspace(-1.0, 3.0, 300, dtype=torch.float64)))
    run = hu.lanczos(op, 200, progress=False)
    spectrum = hu.slq(op, num_iters=200, num_probes=2, progress=False)
    for result in (run, spectrum):
        text = repr(result)
        assert len(text) < 1500 and "array[" in text, text[:300]
    frame = run.to_frame()
    assert list(frame.columns) == ["value", "weight", "ghost", "residual"]
    np.testing.assert_array_equal(frame["value"].to_numpy(), run.ritz_values)
    np.testing.assert_array_equal(frame["weight"].to_numpy(), run.ritz_weights)
    np.testing.assert_array_equal(frame["residual"].to_numpy(), run.residual_estimates)

    solved = hu.cg(op, [torch.ones(300, dtype=torch.float64)], damping=2.0, progress=False)
    history = solved.to_frame()
    assert list(history.columns) == ["entry", "relative_residual"]
    np.testing.assert_array_equal(history["relative_residual"].to_numpy(), solved.residual_norms)
    assert history["entry"].tolist() == list(range(solved.residual_norms.size))
