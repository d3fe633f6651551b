"""Algorithms on a real model Hessian: Lanczos, SLQ, Hutchinson against the dense float64 Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hess_utils import vectors as V
from hess_utils.algorithms import hutchinson_diagonal, hutchinson_trace, lanczos, slq
from hess_utils.operators.hessian import hessian_operator
from tests.tiny import dense_hessian, tiny_batches, tiny_model


@pytest.fixture(scope="module")
def model_hessian():
    model = tiny_model("llama")
    batches = tiny_batches(num_batches=2, pad=True)
    H = dense_hessian(model, batches)
    return hessian_operator(model, batches, method="rev-rev"), torch.linalg.eigvalsh(H).numpy(), H


def test_full_lanczos_recovers_extremal_eigenvalues_of_model_hessian(model_hessian):
    op, eigs, _ = model_hessian
    result = lanczos(op, num_iters=op.dim, reorth="full", seed=0, progress=False)
    radius = np.abs(eigs).max()
    ritz = np.sort(result.ritz_values)
    for k in range(3):
        assert abs(ritz[-1 - k] - eigs[-1 - k]) < 1e-8 * radius
        assert abs(ritz[k] - eigs[k]) < 1e-8 * radius
    assert result.orthogonality_loss < 1e-10


def test_offloaded_basis_gives_same_tridiagonal(model_hessian):
    op, _, _ = model_hessian
    full = lanczos(op, num_iters=40, reorth="full", seed=1, progress=False)
    offload = lanczos(op, num_iters=40, reorth="offload", seed=1, progress=False)
    assert np.allclose(full.alphas, offload.alphas, rtol=0, atol=1e-12 * np.abs(full.alphas).max())
    assert np.allclose(full.betas, offload.betas, rtol=0, atol=1e-12 * np.abs(full.betas).max())


def test_slq_top_ritz_value_and_weights(model_hessian):
    op, eigs, _ = model_hessian
    result = slq(op, num_iters=60, num_probes=2, seed=0, progress=False)
    assert result.ritz_values.shape == (2, 60)
    assert np.allclose(result.ritz_weights.sum(axis=1), 1.0)
    assert np.all(result.ritz_values.max(axis=1) <= eigs[-1] * (1 + 1e-10))
    assert abs(result.ritz_values.max() - eigs[-1]) < 1e-6 * abs(eigs).max()


def test_hutchinson_on_model_hessian_is_unbiased(model_hessian):
    op, eigs, H = model_hessian
    trace = hutchinson_trace(op, num_probes=60, seed=0)
    assert abs(trace.estimate - float(np.sum(eigs))) < 4 * trace.stderr
    diag = hutchinson_diagonal(op, num_probes=60, seed=0, progress=False)
    est, err = V.flatten(diag.estimate), V.flatten(diag.stderr)
    z = ((est - torch.diagonal(H)) / err.clamp_min(1e-300)).abs()
    assert float((z < 1.96).double().mean()) > 0.85
