"""The ablation helpers behind notebooks 03 and 04, against Lanczos itself and closed forms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hess_utils.algorithms import lanczos
from hess_utils.harness import ablations
from hess_utils.operators import as_operator


def _matrix(n: int = 40, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    eigs = np.concatenate([rng.uniform(0, 1, n - 3), [4.0, 6.0, 9.0]])
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return torch.tensor((q * eigs) @ q.T)


def test_prefix_ritz_is_the_run_of_k_steps():
    matrix = _matrix()
    long = lanczos(as_operator(matrix), 30, reorth="none", progress=False, seed=2)
    short = lanczos(as_operator(matrix), 12, reorth="none", progress=False, seed=2)
    table = ablations.prefix_ritz(long.alphas, long.betas, 12, float(np.finfo(np.float64).eps), dim=40)
    np.testing.assert_allclose(table.value, short.ritz_values, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(table.weight, short.ritz_weights, rtol=1e-8, atol=1e-14)
    np.testing.assert_array_equal(table.ghost, short.ghost_mask)
    np.testing.assert_allclose(table.residual, short.residual_estimates, rtol=1e-6, atol=1e-12)
    full_run = lanczos(as_operator(matrix), 30, reorth="full", progress=False, seed=2)
    full = ablations.prefix_ritz(full_run.alphas, full_run.betas, 30, 2.2e-16, reorth="full",
                                 last_beta=full_run.last_beta)
    # The whole run's table: its residuals are the run's own (they were all zero when the final beta was lost).
    np.testing.assert_allclose(full.residual, full_run.residual_estimates, rtol=1e-10, atol=1e-14)
    assert full.residual.max() > 1e-6
    with pytest.raises(ValueError, match="last_beta"):
        ablations.prefix_ritz(full_run.alphas, full_run.betas, 30, 2.2e-16, reorth="full")


def test_ghost_table_counts_copies_only_without_reorthogonalisation():
    table, extra = ablations.ghost_table(_matrix(), [10, 40, 120], seed=1, progress=False)
    np.testing.assert_allclose(extra["eigenvalues"], np.linalg.eigvalsh(_matrix().numpy()), atol=1e-12)
    none, full = table[table.reorth == "none"].set_index("k"), table[table.reorth == "full"].set_index("k")
    assert none.loc[120, "copies_of_top"] >= 2 and none.loc[120, "cw_ghosts"] > 0  # 3 x n plain steps
    assert (full.copies_of_top <= 1).all() and (full.cw_ghosts == 0).all()
    assert full.loc[40, "eigenvalues_found"] == 40 and full.loc[40, "top_error"] < 1e-10


def test_spectrum_summary_on_a_hand_made_table():
    ritz = pd.DataFrame({"label": "a", "probe": 0, "value": [-2.0, 1e-6, 1.0, 10.0],
                         "weight": [0.1, 0.6, 0.2, 0.1]})
    row = ablations.spectrum_summary(ritz).iloc[0]
    assert row.lambda_max == 10.0 and row.lambda_min == -2.0
    np.testing.assert_allclose(row.neg_ratio, 0.2)
    np.testing.assert_allclose(row.near_zero_mass, 0.6)
    np.testing.assert_allclose(row.negative_mass, 0.1)
