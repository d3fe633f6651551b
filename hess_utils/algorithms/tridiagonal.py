"""Eigen-decomposition of symmetric tridiagonal matrices in float64 (the Lanczos matrices ``T_k``)."""

from __future__ import annotations

import numpy as np
import scipy.linalg


def tridiagonal_eigh(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of the symmetric tridiagonal ``T`` with LAPACK (float64).

    Parameters
    ----------
    alphas : array, shape (k,)
        Diagonal.
    betas : array, shape (k-1,)
        Off-diagonal.

    Returns
    -------
    values : np.ndarray, shape (k,)
        Ascending eigenvalues.
    vectors : np.ndarray, shape (k, k)
        Orthonormal eigenvectors as columns, ``T = vectors @ diag(values) @ vectors.T``.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size < 1 or betas.shape != (alphas.size - 1,):
        raise ValueError(f"need alphas of shape (k,) with k >= 1 and betas of shape (k-1,); got "
                         f"{alphas.shape} and {betas.shape}")
    if alphas.size == 1:
        return alphas.copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(alphas, betas)


def tridiagonal_eigvalsh(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues ``(k,)`` of the symmetric tridiagonal ``T`` (``k = 0`` gives an empty array)."""
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    if alphas.size <= 1:
        return alphas.copy()
    return scipy.linalg.eigvalsh_tridiagonal(alphas, betas)
