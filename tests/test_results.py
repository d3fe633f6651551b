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
