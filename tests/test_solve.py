"""CG, MINRES and influence functions against torch.linalg.solve on dense float64 matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hess_utils.algorithms.solve import SolveResult, cg, influence, minres
from hess_utils.operators import as_operator

N = 200


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: these matrices are far too small to gain from more, and OpenMP spins on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def symmetric_with_eigenvalues(eigs, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigs) Q^T`` with a random orthogonal ``Q`` (QR of a Gaussian matrix)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (q * torch.as_tensor(np.asarray(eigs), dtype=torch.float64)) @ q.T
    return (a + a.T) / 2


def rhs(seed: int = 0, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def spd():
    return symmetric_with_eigenvalues(np.geomspace(1.0, 10.0, N), seed=1)


@pytest.fixture(scope="module")
def indefinite():
    """Eigenvalues in [-10, -1] and [1, 10]: symmetric, invertible, not positive definite."""
    eigs = np.concatenate([np.geomspace(1.0, 10.0, N // 2), -np.geomspace(1.0, 10.0, N // 2)])
    return symmetric_with_eigenvalues(eigs, seed=2)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------- solutions
@pytest.mark.parametrize("solver", [cg, minres])
def test_spd_solution_matches_dense_solve(spd, solver):
    b = rhs(0)
    result = solver(as_operator(spd), [b], tol=1e-12, progress=False)
    assert rel_err(result.x[0], torch.linalg.solve(spd, b)) < 1e-10
    assert result.converged and result.true_residual <= 1e-12
    true = float((b - spd @ result.x[0]).norm() / b.norm())
    assert abs(result.true_residual - true) <= 1e-3 * true
    assert result.method == solver.__name__
    assert result.num_products == result.num_iters + 1 + result.num_replacements  # + true residual checks
    assert result.residual_norms[0] == 1.0 and result.residual_norms[-1] <= 1e-12
    assert result.num_iters < N  # kappa = 10: far fewer iterations than the dimension


def test_minres_solves_indefinite_system_with_monotone_residuals(indefinite):
    b = rhs(1)
    result = minres(as_operator(indefinite), [b], tol=1e-12, progress=False)
    assert result.converged
    assert rel_err(result.x[0], torch.linalg.solve(indefinite, b)) < 1e-10
    # MINRES minimises the residual over nested Krylov spaces: the residual never grows.
    history = result.residual_norms[: result.num_iters + 1]
    assert np.all(np.diff(history) <= 1e-12)


def test_cg_refuses_indefinite_system(indefinite):
    with pytest.raises(ValueError, match=r"not positive definite for damping=0.*Increase damping.*minres"):
        cg(as_operator(indefinite), [rhs(1)], progress=False)


def test_damping_shifts_the_operator():
    """H has eigenvalues down to -0.5: damping 1 makes it SPD (CG works), damping 0.2 does not."""
    A = symmetric_with_eigenvalues(np.linspace(-0.5, 8.0, N), seed=4)
    op, b = as_operator(A), rhs(2)
    for damping in (1.0, 0.2):
        ref = torch.linalg.solve(A + damping * torch.eye(N, dtype=torch.float64), b)
        m = minres(op, [b], damping=damping, tol=1e-12, progress=False)
        assert m.converged and rel_err(m.x[0], ref) < 1e-9
        if damping == 1.0:
            c = cg(op, [b], damping=damping, tol=1e-12, progress=False)
            assert c.converged and rel_err(c.x[0], ref) < 1e-10
            assert c.damping == 1.0
        else:
            with pytest.raises(ValueError, match="damping=0.2"):
                cg(op, [b], damping=damping, progress=False)


@pytest.mark.parametrize("solver", [cg, minres])
def test_start_iterate_is_used_and_counted(spd, solver):
    b = rhs(3)
    ref = torch.linalg.solve(spd, b)
    near = [ref + 1e-6 * rhs(4)]
    cold = solver(as_operator(spd), [b], tol=1e-12, progress=False)
    warm = solver(as_operator(spd), [b], tol=1e-12, x0=near, progress=False)
    assert warm.converged and rel_err(warm.x[0], ref) < 1e-10
    assert warm.num_iters < cold.num_iters
    assert warm.num_products == warm.num_iters + 2 + warm.num_replacements  # start residual + final check
    assert warm.residual_norms[0] < 1e-5


def test_zero_rhs_gives_zero_solution(spd):
    result = cg(as_operator(spd), [torch.zeros(N, dtype=torch.float64)], progress=False)
    assert result.converged and result.num_products == 0 and float(result.x[0].abs().max()) == 0.0


def test_float32_operator(spd):
    b = rhs(5)
    result = cg(as_operator(spd.float()), [b.float()], tol=1e-5, progress=False)
    assert result.converged and result.x[0].dtype == torch.float32
    assert rel_err(result.x[0].double(), torch.linalg.solve(spd, b)) < 1e-4


# ---------------------------------------------------------------------------------------------- a model Hessian
@pytest.fixture(scope="module")
def model_system():
    """A float64 tiny-model Hessian operator, its gradient, and the independent dense oracle of the Hessian."""
    from hess_utils.operators.hessian import hessian_operator
    from tests.tiny import dense_hessian, tiny_batches, tiny_model

    model = tiny_model("gpt2")
    batches = tiny_batches(pad=True)
    op = hessian_operator(model, batches, method="rev-rev")
    return op, op.gradient(), dense_hessian(model, batches)


@pytest.mark.parametrize(("solver", "damping"), [(cg, 7.0), (minres, 7.0), (minres, 2.0)])
def test_model_hessian_solve_matches_dense_solve(model_system, solver, damping):
    """``(H + damping I) x = g`` for the loss gradient, to 1e-10 of ``torch.linalg.solve`` on the oracle ``H``.

    ``H`` spans about [-6, 11.5] with a large null space: damping 7 makes it positive definite (condition
    number 18), damping 2 leaves it indefinite (9 negative eigenvalues, condition number 183), where only
    MINRES applies. The relative error is at most ``kappa`` times the relative residual, so the solvers are
    asked for ``tol = 1e-13``: with ``kappa < 200`` that bounds the error by 2e-11, below the 1e-10 checked.
    """
    from hess_utils import vectors as V

    op, g, H = model_system
    shifted = H + damping * torch.eye(H.shape[0], dtype=torch.float64)
    eigs = torch.linalg.eigvalsh(shifted)
    assert (float(eigs.min()) > 0) == (damping == 7.0)
    kappa = float(eigs.abs().max() / eigs.abs().min())
    assert kappa < 200
    ref = torch.linalg.solve(shifted, V.flatten(g))
    result = solver(op, g, damping=damping, tol=1e-13, progress=False)
    assert kappa * result.true_residual < 1e-10
    assert result.converged
    assert rel_err(V.flatten(result.x), ref) < 1e-10
    assert [tuple(b.shape) for b in result.x] == [tuple(s) for s in op.shapes]


# ---------------------------------------------------------------------------------------------- preconditioning
@pytest.fixture(scope="module")
def ill_conditioned():
    """Diagonally dominant SPD with a diagonal spanning 1..1e4 (kappa ~ 1e4); Jacobi removes most of it."""
    g = torch.Generator().manual_seed(7)
    d = torch.as_tensor(np.geomspace(1.0, 1e4, N))
    E = 0.1 * torch.rand(N, N, generator=g, dtype=torch.float64) / N
    E = (E + E.T) / 2
    A = torch.diag(d) + E * torch.sqrt(d[:, None] * d[None, :])
    assert bool((torch.linalg.eigvalsh(A) > 0).all())
    return A


@pytest.mark.parametrize("solver", [cg, minres])
def test_jacobi_preconditioner_cuts_iterations(ill_conditioned, solver):
    A, b = ill_conditioned, rhs(6)
    ref = torch.linalg.solve(A, b)
    op = as_operator(A)
    plain = solver(op, [b], tol=1e-10, max_iters=5000, progress=False)
    jacobi = solver(op, [b], tol=1e-10, max_iters=5000, preconditioner=[torch.diagonal(A).clone()], progress=False)
    assert plain.converged and jacobi.converged
    assert rel_err(jacobi.x[0], ref) < 1e-8
    assert 5 * jacobi.num_iters < plain.num_iters, (jacobi.num_iters, plain.num_iters)
    # The same preconditioner as a function gives the same iterates.
    d = torch.diagonal(A).clone()
    as_function = solver(op, [b], tol=1e-10, preconditioner=lambda r: [r[0] / d], progress=False)
    assert as_function.num_iters == jacobi.num_iters
    assert rel_err(as_function.x[0], jacobi.x[0]) < 1e-12


def test_bad_preconditioners_are_refused(spd):
    op, b = as_operator(spd), [rhs(0)]
    negative = torch.ones(N, dtype=torch.float64)
    negative[3] = -1.0
    with pytest.raises(ValueError, match="positive entries"):
        cg(op, b, preconditioner=[negative], progress=False)
    with pytest.raises(ValueError, match="must be symmetric positive definite"):
        cg(op, b, preconditioner=lambda r: [-r[0]], progress=False)
    with pytest.raises(ValueError, match="does not fit the operator"):
        cg(op, b, preconditioner=lambda r: [r[0][:-1]], progress=False)
    with pytest.raises(ValueError, match="diagonal of M"):
        cg(op, b, preconditioner=torch.ones(N, dtype=torch.float64), progress=False)


# ---------------------------------------------------------------------------------------------- influence
@pytest.mark.parametrize(("matrix", "method", "damping"), [("spd", "cg", 0.0), ("indefinite", "minres", 0.3)])
def test_influence_matches_dense_formula(request, matrix, method, damping):
    A = request.getfixturevalue(matrix)
    g_test, g_train = rhs(8), rhs(9)
    expected = -float(g_test @ torch.linalg.solve(A + damping * torch.eye(N, dtype=torch.float64), g_train))
    value = influence(as_operator(A), [g_test], [g_train], damping=damping, method=method, tol=1e-12,
                      progress=False)
    assert isinstance(value, float)
    assert abs(value - expected) <= 1e-10 * abs(expected)
    # Sign convention: for an SPD Hessian, a training gradient aligned with the test gradient helps
    # (upweighting it lowers the test loss), so its influence is negative.
    if matrix == "spd":
        assert influence(as_operator(A), [g_test], [g_test], method=method, progress=False) < 0


def test_influence_refuses_unknown_method(spd):
    with pytest.raises(ValueError, match=r"unknown method 'lsqr'.*'cg', 'minres'"):
        influence(as_operator(spd), [rhs(0)], [rhs(1)], method="lsqr")


# ---------------------------------------------------------------------------------------------- result and input
def test_result_is_frozen_and_summarised(spd):
    result = cg(as_operator(spd), [rhs(0)], progress=False)
    assert isinstance(result, SolveResult)
    with pytest.raises(ValueError):
        result.residual_norms[0] = 0.0
    with pytest.raises(AttributeError):
        result.converged = False
    text = repr(result)
    assert text.startswith("SolveResult(method='cg', converged=True") and "[" not in text


@pytest.mark.parametrize("solver", [cg, minres])
def test_bad_input_is_refused(spd, solver):
    op = as_operator(spd)
    with pytest.raises(ValueError, match=r"b does not match the operator.*shape \(199,\) but expected \(200,\)"):
        solver(op, [torch.ones(N - 1, dtype=torch.float64)], progress=False)
    with pytest.raises(ValueError, match="b does not match the operator.*lists of tensors"):
        solver(op, torch.ones(N, dtype=torch.float64), progress=False)
    with pytest.raises(ValueError, match="x0 does not match the operator"):
        solver(op, [rhs(0)], x0=[torch.ones(3, dtype=torch.float64)], progress=False)
    with pytest.raises(ValueError, match="b has non-finite entries"):
        solver(op, [torch.full((N,), float("nan"), dtype=torch.float64)], progress=False)
    with pytest.raises(ValueError, match="damping must be a finite number"):
        solver(op, [rhs(0)], damping=float("inf"), progress=False)
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        solver(op, [rhs(0)], tol=-1.0, progress=False)
    with pytest.raises(ValueError, match="max_iters must be an integer >= 1"):
        solver(op, [rhs(0)], max_iters=0, progress=False)
    with pytest.raises(ValueError, match="grad_train does not match the operator"):
        influence(op, [rhs(0)], [torch.ones(5, dtype=torch.float64)], method=solver.__name__, progress=False)
