"""Simon's partial re-orthogonalisation (``reorth="partial"``) against full re-orthogonalisation.

The matrices have known spectra: ``Q diag(eigs) Q^T`` with a random orthogonal ``Q``. The hard case is
shaped like an LM Hessian, a few large outliers over a bulk: the outliers converge within a few steps, and
from then on a plain run loses orthogonality along them by a factor of about ``|outlier| / beta`` per step.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings

import numpy as np
import pytest
import torch

from hess_utils import vectors as V
from hess_utils.algorithms import lanczos, lanczos_init, lanczos_resume, lanczos_step, slq
from hess_utils.operators import as_operator
from hess_utils.operators.base import SymmetricOperator
from hess_utils.operators.hessian import hessian_operator
from tests.test_lanczos import BlockOperator, IdentityOperator, symmetric_with_eigenvalues
from tests.tiny import tiny_batches, tiny_model

# The module, not the function of the same name that hess_utils.algorithms exports.
lz = importlib.import_module("hess_utils.algorithms.lanczos")

ITERS = 80
OUTLIERS = np.array([100.0, 60.0, 35.0, 20.0, 12.0, -8.0, -15.0])


def lm_like(n: int = 400, seed: int = 0) -> np.ndarray:
    """Seven outliers from -15 to 100 over a Gaussian bulk of standard deviation 0.5 (ascending)."""
    bulk = np.random.default_rng(seed).normal(0.0, 0.5, n - OUTLIERS.size)
    return np.sort(np.concatenate([bulk, OUTLIERS]))


def geometric(n: int = 300) -> np.ndarray:
    """Eigenvalues spread geometrically over six decades: the top ones converge one after the other."""
    return np.geomspace(1e-3, 1e3, n)


SPECTRA = {"lm_like": lm_like, "geometric": geometric}


@pytest.fixture(scope="module")
def runs64():
    """Full, partial and plain runs of ITERS steps on each float64 test matrix, from the same probe."""
    out = {}
    for name, make in SPECTRA.items():
        eigs = make()
        op = as_operator(symmetric_with_eigenvalues(eigs, seed=1))
        out[name] = eigs, {m: lanczos(op, ITERS, reorth=m, seed=2, progress=False) for m in ("full", "partial", "none")}
    return out


def copies_per_eigenvalue(res, eigs: np.ndarray, rtol: float) -> np.ndarray:
    """How many converged Ritz values (residual estimate <= rtol ||H||) lie within rtol ||H|| of each eigenvalue."""
    scale = np.abs(eigs).max()
    conv = res.ritz_values[res.converged(rtol)]
    near = np.abs(conv[:, None] - eigs[None, :]) <= rtol * scale
    assert near.any(axis=1).all(), "a converged Ritz value is no eigenvalue"
    return near.sum(axis=0)


def maximal_runs(steps) -> list[tuple[int, int]]:
    """``steps`` (ascending) as maximal runs of consecutive integers ``(first, length)``."""
    runs: list[tuple[int, int]] = []
    for s in steps:
        if runs and s == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs


# ---------------------------------------------------------------------------------------------- float64
@pytest.mark.parametrize("name", list(SPECTRA))
def test_partial_gives_the_ritz_values_and_weights_of_full(runs64, name):
    eigs, res = runs64[name]
    full, partial = res["full"], res["partial"]
    scale = np.abs(eigs).max()
    assert partial.num_iters == full.num_iters == ITERS and partial.reorth == "partial"
    np.testing.assert_allclose(partial.ritz_values, full.ritz_values, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(partial.ritz_weights, full.ritz_weights, rtol=0, atol=1e-10)
    np.testing.assert_allclose(partial.alphas, full.alphas, rtol=0, atol=1e-10 * scale)
    # ... while the plain recurrence does not (so these tolerances can fail).
    assert np.abs(res["none"].ritz_values - full.ritz_values).max() > 1e-2 * scale


@pytest.mark.parametrize("name", list(SPECTRA))
def test_partial_keeps_the_basis_semi_orthogonal_for_a_fraction_of_the_passes(runs64, name):
    eigs, res = runs64[name]
    partial, full = res["partial"], res["full"]
    eps = float(torch.finfo(torch.float64).eps)
    assert 0 < partial.num_reorth_steps < ITERS
    steps = partial.reorth_steps
    assert len(steps) == partial.num_reorth_steps and list(steps) == sorted(set(steps))
    assert all(1 <= s <= ITERS for s in steps)
    # Simon's pairs: a crossing re-orthogonalises its vector and the next one, so the steps come in runs
    # of even length (a pair may follow a pair at once), except a last one cut short by the end of the run.
    for first, length in maximal_runs(steps):
        assert length % 2 == 0 or first + length - 1 == ITERS
    # Semi-orthogonal: measured loss below sqrt(eps) (and far above what full keeps: it did skip steps),
    # bounded by the estimate, which itself was kept below the threshold.
    assert partial.orthogonality_loss <= math.sqrt(eps)
    assert partial.orthogonality_loss > 100 * full.orthogonality_loss
    assert partial.orthogonality_loss <= partial.max_omega <= math.sqrt(eps)


def test_partial_leaves_no_ghost_where_the_plain_run_does(runs64):
    eigs, res = runs64["lm_like"]
    for mode in ("full", "partial"):
        copies = copies_per_eigenvalue(res[mode], eigs, rtol=1e-8)
        assert copies.max() == 1, mode  # every converged eigenvalue once
        assert (copies[np.isin(eigs, OUTLIERS)] == 1).all(), mode  # and every outlier converged
        assert not res[mode].ghost_mask.any()
    # The same count on the plain run finds the duplicates: the test detects ghosts.
    copies = copies_per_eigenvalue(res["none"], eigs, rtol=1e-8)
    assert copies.max() >= 2
    assert (copies[np.isin(eigs, OUTLIERS)] >= 2).sum() >= 3


def test_other_modes_leave_the_new_diagnostics_at_their_defaults(runs64):
    _, res = runs64["geometric"]
    for mode in ("full", "none"):
        assert res[mode].num_reorth_steps == 0 and res[mode].reorth_steps is None and res[mode].max_omega is None
    assert "partial" in lz.REORTH_MODES
    state = lanczos_init(as_operator(symmetric_with_eigenvalues(geometric(20))), 5, reorth="full")
    assert state.omega is None


# ---------------------------------------------------------------------------------------------- estimates
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_estimates_bound_the_measured_loss_row_by_row(dtype):
    """Each kept estimate max_k |omega_{j+1,k}| is at least the measured max_k |q_{j+1}^T q_k|: the recurrence
    with its pessimistic rounding terms never lets a loss of orthogonality through unseen."""
    op = as_operator(symmetric_with_eigenvalues(lm_like(), seed=1, dtype=dtype))
    state = lanczos_init(op, ITERS, reorth="partial", seed=2)
    for _ in range(ITERS):
        lanczos_step(op, state)
    q = state.basis[0][: ITERS + 1].double()
    gram = (q @ q.T).abs()
    measured = np.array([float(gram[j, :j].max()) for j in range(1, ITERS + 1)])
    estimated = np.array(state.omega.row_max)
    assert estimated.shape == measured.shape
    assert np.all(estimated >= measured)
    assert np.all(estimated <= math.sqrt(float(torch.finfo(dtype).eps)))


def test_estimates_survive_a_checkpoint_and_are_rebuilt_without_one(runs64):
    """The estimates depend on measurements, so a checkpoint stores them (to_dict / from_dict, bit for bit);
    a state without them (an older checkpoint) rebuilds them from its alphas and betas and checks its next
    vector, and the run stays semi-orthogonal with the Ritz values of full."""
    eigs, res = runs64["geometric"]
    op = as_operator(symmetric_with_eigenvalues(eigs, seed=1))
    state = lanczos_init(op, ITERS, reorth="partial", seed=2)
    for _ in range(30):
        lanczos_step(op, state)
    kept = state.omega
    assert kept.check_steps, "the case must have measured a vector"
    restored = lz.OmegaEstimates.from_dict(copy.deepcopy(kept.to_dict()))
    assert np.array_equal(restored.current, kept.current) and np.array_equal(restored.previous, kept.previous)
    assert restored.to_dict() == kept.to_dict()
    reference = lanczos_resume(op, copy.deepcopy(state), progress=False)
    rebuilt = copy.deepcopy(state)
    state.omega = restored
    resumed = lanczos_resume(op, state, progress=False)
    np.testing.assert_array_equal(resumed.alphas, reference.alphas)
    np.testing.assert_array_equal(resumed.betas, reference.betas)
    assert resumed.reorth_steps == reference.reorth_steps and resumed.check_steps == reference.check_steps
    assert resumed.max_omega == reference.max_omega

    rebuilt.omega = None
    replayed = lz.replay_omega_estimates(rebuilt)
    assert replayed.iteration == 30 and replayed.check_due()
    out = lanczos_resume(op, rebuilt, progress=False)
    assert 31 in out.check_steps or 31 in out.reorth_steps
    eps = float(torch.finfo(torch.float64).eps)
    assert out.orthogonality_loss <= math.sqrt(eps)
    np.testing.assert_allclose(out.ritz_values, res["full"].ritz_values, rtol=0, atol=1e-10 * eigs.max())


def _skewed_operator(relative: float) -> tuple[SymmetricOperator, np.ndarray]:
    """``A + S``, ``S`` skew-symmetric with ``||S|| = relative ||A||``: products that are not symmetric by far
    more than eps, as a finite-difference product's are (the operator claims symmetry; nothing checks it)."""
    eigs = geometric()
    a = symmetric_with_eigenvalues(eigs, seed=1)
    r = torch.randn(a.shape, generator=torch.Generator().manual_seed(5), dtype=a.dtype)
    skew = (r - r.T) * (relative * float(np.abs(eigs).max()) / float(torch.linalg.matrix_norm(r - r.T, 2)))
    return as_operator(a + skew, check_symmetric=False), eigs


@pytest.mark.parametrize("relative", [1e-9, 1e-7])
def test_early_checks_keep_an_operator_far_from_symmetric_semi_orthogonal(relative):
    """Asymmetries from 1e-9 to 1e-7 ||H|| (eps 2.2e-16): the checks of the first iterations find the level
    before the first vectors lose orthogonality, and the run keeps full's Ritz values with no warning."""
    op, eigs = _skewed_operator(relative)
    eps = float(torch.finfo(torch.float64).eps)
    full = lanczos(op, ITERS, reorth="full", seed=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = lanczos(op, ITERS, reorth="partial", seed=2, progress=False)
    assert res.orthogonality_loss <= math.sqrt(eps)
    assert res.omega_rounding > 1e3 * lz.omega_rounding(eps)
    np.testing.assert_allclose(res.ritz_values, full.ritz_values, rtol=0, atol=1e-9 * eigs.max())


def test_measurements_raise_the_rounding_level_for_an_operator_rounding_worse_than_eps(monkeypatch):
    """An asymmetry of 1e-11 ||H||: the starting level (8 eps) underestimates the loss; the checks measure it,
    raise the level, and the run stays semi-orthogonal with the Ritz values of full. The same run blind to
    its measurements loses semi-orthogonality, says so, and its Ritz values move."""
    op, eigs = _skewed_operator(1e-11)
    eps = float(torch.finfo(torch.float64).eps)
    full = lanczos(op, ITERS, reorth="full", seed=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: semi-orthogonal
        res = lanczos(op, ITERS, reorth="partial", seed=2, progress=False)
    assert res.omega_rounding > 100 * lz.omega_rounding(eps)
    assert res.orthogonality_loss <= math.sqrt(eps)
    np.testing.assert_allclose(res.ritz_values, full.ritz_values, rtol=0, atol=1e-12 * eigs.max())

    monkeypatch.setattr(lz.OmegaEstimates, "measured", lambda self, row, loss, signed=None: row)
    monkeypatch.setattr(lz.OmegaEstimates, "check_due", lambda self: False)
    with pytest.warns(RuntimeWarning, match="reorth='full'"):
        blind = lanczos(op, ITERS, reorth="partial", seed=2, progress=False)
    assert blind.omega_rounding == lz.omega_rounding(eps)
    assert blind.orthogonality_loss > 10 * math.sqrt(eps)
    assert np.abs(blind.ritz_values - full.ritz_values).max() > 100 * np.abs(res.ritz_values - full.ritz_values).max()


def test_a_check_every_ten_steps_when_nothing_crosses():
    """A spectrum that loses orthogonality slowly: the estimates stay low and a vector is measured at the early
    iterations, then every CHECK_EVERY steps, and no more often."""
    op = as_operator(symmetric_with_eigenvalues(np.linspace(-1.0, 1.0, 400), seed=1))
    res = lanczos(op, 40, reorth="partial", seed=2, progress=False)
    assert res.num_reorth_steps == 0
    assert lz.EARLY_CHECKS == tuple(range(1, 17)) and lz.CHECK_EVERY == 10
    assert res.check_steps == (*range(1, 17), 26, 36)
    assert res.orthogonality_loss <= res.max_omega


# ---------------------------------------------------------------------------------------------- float32
def test_float32_partial_matches_full():
    eigs = lm_like()
    op = as_operator(symmetric_with_eigenvalues(eigs, seed=1, dtype=torch.float32))
    res = {m: lanczos(op, ITERS, reorth=m, seed=2, progress=False) for m in ("full", "partial", "none")}
    full, partial = res["full"], res["partial"]
    eps = float(torch.finfo(torch.float32).eps)
    scale = np.abs(eigs).max()
    # Float32 Ritz values are good to a few eps ||H||; partial and full agree to well within that.
    np.testing.assert_allclose(partial.ritz_values, full.ritz_values, rtol=0, atol=50 * eps * scale)
    np.testing.assert_allclose(partial.ritz_weights, full.ritz_weights, rtol=0, atol=1e-4)
    assert np.abs(res["none"].ritz_values - full.ritz_values).max() > 1e-2 * scale
    assert 0 < partial.num_reorth_steps < ITERS
    assert partial.orthogonality_loss <= partial.max_omega <= math.sqrt(eps)
    for mode in ("full", "partial"):
        assert copies_per_eigenvalue(res[mode], eigs, rtol=1e-5).max() == 1, mode
    assert copies_per_eigenvalue(res["none"], eigs, rtol=1e-5).max() >= 2


# ---------------------------------------------------------------------------------------------- edge cases
def test_partial_on_blocks_breakdown_and_aliasing():
    eigs = geometric(60)
    a = symmetric_with_eigenvalues(eigs, seed=4)
    blocks = BlockOperator(a, [(3, 4), (5,), (2, 3, 2), (31,)])
    start = torch.randn(60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one = lanczos(as_operator(a), 50, reorth="partial", start=[start], progress=False)
    many = lanczos(blocks, 50, reorth="partial", start=V.unflatten(start, blocks.zeros()), progress=False)
    np.testing.assert_allclose(many.ritz_values, one.ritz_values, rtol=0, atol=1e-12 * eigs.max())
    assert many.reorth_steps == one.reorth_steps and one.num_reorth_steps > 0

    values = np.array([-2.0, 0.5, 1.0, 4.0, 7.0])
    res = lanczos(as_operator(symmetric_with_eigenvalues(np.repeat(values, 12), seed=2)), 30, reorth="partial",
                  progress=False)
    assert res.breakdown and res.num_iters <= 5
    np.testing.assert_allclose(res.ritz_values, values, rtol=0, atol=1e-10)

    res = lanczos(IdentityOperator(10), 5, reorth="partial", progress=False)  # beta = 0 exactly
    assert res.breakdown and res.num_iters == 1 and res.num_reorth_steps == 1
    np.testing.assert_allclose(res.ritz_values, [1.0])
    with pytest.raises(ValueError, match="exceeds the operator dimension"):
        lanczos(as_operator(a), 61, reorth="partial", progress=False)


def test_slq_passes_partial_through():
    op = as_operator(symmetric_with_eigenvalues(lm_like(200), seed=3))
    full = slq(op, 40, 3, reorth="full", seed=1, progress=False)
    partial = slq(op, 40, 3, reorth="partial", seed=1, progress=False)
    assert partial.reorth == "partial" and all(r.num_reorth_steps > 0 for r in partial.runs)
    np.testing.assert_allclose(partial.ritz_values, full.ritz_values, rtol=0, atol=1e-10 * 100)
    np.testing.assert_allclose(partial.ritz_weights, full.ritz_weights, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------- recalibration
def _slow_growth_operator(dtype: torch.dtype = torch.float32, n: int = 400_000) -> tuple[_Diagonal, np.ndarray]:
    """Outliers near a wide bulk (50, 45, 40, 35 over a Gaussian of standard deviation 10), the shape of the GPT-2
    benchmark's Hessian: Ritz values converge over tens of steps and a plain run loses orthogonality by a factor
    of about 1.5-2 per step, so Simon's estimates, which start a hundred times above the truth, cross the
    threshold many steps before the truth does."""
    rng = np.random.default_rng(0)
    eigs = np.concatenate([rng.normal(0.0, 10.0, n - 4), [50.0, 45.0, 40.0, 35.0]])
    return _Diagonal(torch.tensor(eigs, dtype=dtype)), eigs


def _partial_state(op: SymmetricOperator, steps: int, iters: int = ITERS, seed: int = 0):
    state = lanczos_init(op, iters, reorth="partial", seed=seed)
    for _ in range(steps):
        lanczos_step(op, state)
    return state


def test_recalibration_answers_early_crossings_and_keeps_the_estimates_above_the_truth(monkeypatch):
    """Crossings whose measured loss is far below the threshold measure the previous vector too and continue
    from the measured rows: the estimates still bound the true loss row by row (a float64 Gram of the float32
    basis, exact), the basis stays semi-orthogonal with the Ritz values of full, and a third of the
    re-orthogonalisations of the same run without recalibration are left."""
    op, eigs = _slow_growth_operator()
    eps = float(torch.finfo(torch.float32).eps)
    state = _partial_state(op, ITERS)
    res = lz.lanczos_finish(state)
    assert len(res.recalibration_steps) >= 3
    assert not set(res.recalibration_steps) & set(res.reorth_steps)
    q = state.basis[0][: ITERS + 1].double()
    gram = (q @ q.T).abs()
    measured = np.array([float(gram[j, :j].max()) for j in range(1, ITERS + 1)])
    assert np.all(np.array(state.omega.row_max) >= measured)
    assert measured.max() <= math.sqrt(eps) and res.orthogonality_loss <= res.max_omega <= math.sqrt(eps)
    full = lanczos(op, ITERS, reorth="full", seed=0, progress=False)
    scale = np.abs(eigs).max()
    np.testing.assert_allclose(res.ritz_values, full.ritz_values, rtol=0, atol=50 * eps * scale)
    np.testing.assert_allclose(res.ritz_weights, full.ritz_weights, rtol=0, atol=1e-4)
    assert copies_per_eigenvalue(res, eigs, rtol=1e-5).max() == 1

    monkeypatch.setattr(lz.OmegaEstimates, "worth_recalibrating", lambda self, row, loss: False)
    plain = lz.lanczos_finish(_partial_state(op, ITERS))
    assert plain.recalibration_steps == ()
    assert plain.num_reorth_steps >= 2 * res.num_reorth_steps
    np.testing.assert_allclose(plain.ritz_values, full.ritz_values, rtol=0, atol=50 * eps * scale)


def test_recalibrated_estimates_survive_a_checkpoint():
    op, _ = _slow_growth_operator(n=100_000)
    state = _partial_state(op, 37)
    assert state.omega.recalibration_steps, "the case must have recalibrated before the checkpoint"
    assert state.omega.bounded_mode, "the checkpoint must fall between a recalibration and the next pair"
    restored = lz.OmegaEstimates.from_dict(copy.deepcopy(state.omega.to_dict()))
    assert restored.to_dict() == state.omega.to_dict()
    reference = lanczos_resume(op, copy.deepcopy(state), progress=False)
    state.omega = restored
    resumed = lanczos_resume(op, state, progress=False)
    np.testing.assert_array_equal(resumed.alphas, reference.alphas)
    assert resumed.recalibration_steps == reference.recalibration_steps
    assert resumed.reorth_steps == reference.reorth_steps and resumed.max_omega == reference.max_omega


def test_recalibration_rule_reset_level_and_measured_rows_in_closed_form():
    eps = float(torch.finfo(torch.float32).eps)
    est = lz.OmegaEstimates.start(eps)
    threshold = math.sqrt(eps)
    est.accept(np.array([1e-4, 1.0]), False)  # row of q_2: largest estimate 1e-4
    row = np.array([1.5e-4, -2e-5, 1.0])  # grew by 1.5 (counted as 2): headroom must exceed 2**4 = 16
    assert est.worth_recalibrating(row, np.array([0.9, 0.5]) * threshold / 16)
    assert not est.worth_recalibrating(row, np.array([1.1, 0.5]) * threshold / 16)
    fast = np.array([1e-2, 1e-3, 1.0])  # grew by 100: needs a headroom of 100**4 = 1e8
    assert not est.worth_recalibrating(fast, np.array([1e-8, 1e-8]))
    assert est.worth_recalibrating(fast, np.array([1e-12, 1e-12]))
    est.pending = True  # the second vector of a pair is re-orthogonalised whatever it measures
    assert not est.worth_recalibrating(row, np.array([1e-12, 1e-12]))
    est.pending = False
    assert not lz.OmegaEstimates.start(eps).worth_recalibrating(np.array([1e-3, 1.0]), np.array([0.0]))

    new = est.recalibrate(np.array([-3e-6]), np.array([2e-6, -1e-6]))
    margin = lz.MEASUREMENT_ULPS * eps
    np.testing.assert_allclose(est.current, [-3e-6 - margin, 1.0], rtol=1e-12)
    np.testing.assert_allclose(new, [2e-6 + margin, -1e-6 - margin, 1.0], rtol=1e-12)
    assert est.row_max[-1] == pytest.approx(3e-6 + margin) and est.recalibration_steps == [2]
    with pytest.raises(ValueError, match="previous row"):
        est.recalibrate(np.zeros(3), np.zeros(2))
    est.accept(new, False, measured=True)
    # One pass against a basis whose vectors keep up to L = 3e-6 + margin of loss leaves L ||c||_1.
    assert est.reset_level(0.25) == pytest.approx(est.rounding + (3e-6 + margin) * 0.25)


def test_a_reorthogonalisation_can_subtract_a_leading_block_of_rows():
    """``rows``: the first pass removes the components along the first ``rows`` basis vectors only."""
    basis = torch.linalg.qr(torch.randn(50, 4, dtype=torch.float64))[0].T.contiguous()
    rest = torch.randn(50, dtype=torch.float64)
    rest -= basis.T @ (basis @ rest)
    w = [rest + 3.0 * basis[0] - 2.0 * basis[1] + 1e-3 * basis[3]]
    coeffs = basis @ w[0]
    lz._reorthogonalise_(w, [basis], 4, coeffs=coeffs, rows=2)
    np.testing.assert_allclose((basis @ w[0]).numpy(), [0.0, 0.0, 0.0, 1e-3], atol=1e-13)


class Interrupting(SymmetricOperator):
    """Wraps an operator; raises KeyboardInterrupt at product number ``stop_at``."""

    def __init__(self, inner: SymmetricOperator, stop_at: int | None = None) -> None:
        self.inner, self.stop_at, self.count = inner, stop_at, 0
        self.param_names, self.shapes = inner.param_names, inner.shapes
        self.dtypes, self.devices = inner.dtypes, inner.devices

    def _matvec(self, v):
        self.count += 1
        if self.stop_at is not None and self.count >= self.stop_at:
            raise KeyboardInterrupt
        return self.inner.matvec(v)


def test_checkpointed_partial_run_resumes_bit_for_bit(tmp_path):
    """The checkpoint stores the estimates; the resumed probe continues with them and takes the same decisions."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical comparisons
    try:
        op = as_operator(symmetric_with_eigenvalues(geometric(200), seed=3))
        iters, probes = 40, 2
        ref = slq(op, iters, probes, reorth="partial", seed=4, progress=False)
        with pytest.raises(KeyboardInterrupt):  # in probe 1 at iteration 23; last checkpoint at 20
            slq(Interrupting(op, iters + 23), iters, probes, checkpoint_dir=tmp_path, reorth="partial", seed=4,
                checkpoint_every=5, progress=False)
        resumed = slq(op, iters, probes, checkpoint_dir=tmp_path, reorth="partial", seed=4, checkpoint_every=5,
                      progress=False)
    finally:
        torch.set_num_threads(before)
    # Probe 1 measured vectors before the checkpoint and crossed after it: the estimates carried over decide.
    assert ref.runs[1].check_steps and min(ref.runs[1].check_steps) <= 20 < max(ref.runs[1].reorth_steps)
    for a, b in zip(resumed.runs, ref.runs, strict=True):
        assert np.array_equal(a.alphas, b.alphas) and np.array_equal(a.betas, b.betas)
        assert a.reorth_steps == b.reorth_steps and a.check_steps == b.check_steps
        assert a.max_omega == b.max_omega and a.omega_rounding == b.omega_rounding
        assert a.recalibration_steps == b.recalibration_steps
    # Probe 0 finished before the interruption: its diagnostics come back from the checkpoint.
    assert resumed.runs[0].num_reorth_steps == ref.runs[0].num_reorth_steps > 0


# ---------------------------------------------------------------------------------------------- a model Hessian
@pytest.mark.slow
def test_tiny_model_hessian_partial_matches_full():
    op = hessian_operator(tiny_model("gpt2"), tiny_batches(pad=True), method="rev-rev")
    full = lanczos(op, 30, reorth="full", seed=0, progress=False)
    partial = lanczos(op, 30, reorth="partial", seed=0, progress=False)
    scale = np.abs(full.ritz_values).max()
    np.testing.assert_allclose(partial.ritz_values, full.ritz_values, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(partial.ritz_weights, full.ritz_weights, rtol=0, atol=1e-10)
    assert 0 < partial.num_reorth_steps < 30
    assert partial.orthogonality_loss <= partial.max_omega <= math.sqrt(float(torch.finfo(torch.float64).eps))


# ---------------------------------------------------------------------------------------------- long float32 vectors
class _Diagonal(SymmetricOperator):
    """``diag(d)`` on one float32 block: Lanczos vectors of an outlier spectrum have a few dominant entries."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d = d
        self.param_names, self.shapes = ["d"], [d.shape]
        self.dtypes, self.devices = [d.dtype], [d.device]

    def _matvec(self, v):
        return [self.d * v[0]]


def _long_lm_operator(n: int = 400_000) -> tuple[_Diagonal, np.ndarray]:
    eigs = np.concatenate([np.random.default_rng(0).normal(0.0, 0.5, n - OUTLIERS.size), OUTLIERS])
    return _Diagonal(torch.tensor(eigs, dtype=torch.float32)), eigs


def _measured_loss(basis: torch.Tensor, k: int) -> float:
    q = basis[:k].double()
    gram = q @ q.T
    gram.fill_diagonal_(0.0)
    return float(gram.abs().max())


def test_float32_reductions_over_long_vectors_sum_chunks_in_float64():
    """Reductions of float32 vectors with dominant entries, against float64 references: the chunked sums are
    accurate to a few eps of ||x|| ||y||, where one float32 product over all entries is not."""
    op, _ = _long_lm_operator()
    state = lanczos_init(op, 30, reorth="full", seed=0)
    for _ in range(20):
        lanczos_step(op, state)
    # The outliers' coordinates (the last seven) moved into the first chunk, out of the tail, whose products are
    # float64: the same dot products, now summed by float32 chunks.
    rows, w = state.basis[0][:20].roll(10_000, dims=1), (op.d * state.q[0]).roll(10_000).contiguous()
    eps = float(torch.finfo(torch.float32).eps)
    exact = rows.double() @ w.double()
    scale = float(w.double().norm())
    # heavy=inf: float32 products in every whole chunk, as for a vector spread over many chunks.
    assert torch.allclose(lz._chunked_rows_dot(rows, w, math.inf), exact, rtol=0, atol=8 * eps * scale)
    assert torch.allclose(lz._chunked_rows_dot(rows, w, lz._HEAVY_SHARE * scale**2), exact, rtol=0,
                          atol=8 * eps * scale)
    assert float(((rows @ w).double() - exact).abs().max()) > 8 * eps * scale  # what the chunks avoid
    assert abs(lz._fast_dot([rows[3]], [w]) - float(exact[3])) <= 8 * eps * scale
    assert abs(lz._fast_norm([w]) - scale) <= 8 * eps * scale


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("k", "m"), [(5, 3), (1, 3), (1, 1), (4, 1)])
def test_float32_chunk_sums_of_the_batched_product_are_those_of_each_chunk_alone(threads, k, m):
    """The CPU path sums the whole chunks in one batched product over strided views of the rows (a column slice of
    a wider basis block at an odd offset, as a thread's share is): each chunk's float32 sum must be bit for bit the
    product of that chunk alone (also for one row, and for a lone chunk), a heavy chunk a float64 product, the
    tail a float64 product."""
    C = lz._ACC_CHUNK
    g = torch.Generator().manual_seed(0)
    block = torch.randn(7, 5 * C + 1000, generator=g)
    rows, w = block[1 : 1 + k, 3 : 3 + m * C + 777], torch.randn(m * C + 777, generator=g)
    w[(m // 2) * C + 5] = 3e3  # that chunk holds nearly all of ||w||^2: heavy, the others (about 16 384 each) not
    heavy = lz._HEAVY_SHARE * float(w.double().norm()) ** 2
    shares = torch.linalg.vecdot(w[: m * C].view(m, C), w[: m * C].view(m, C))
    assert (shares > heavy).tolist() == [c == m // 2 for c in range(m)]
    pieces = [(rows[:, c * C : (c + 1) * C], w[c * C : (c + 1) * C]) for c in range(m)]
    tail = rows[:, m * C :].double() @ w[m * C :].double()
    in_float32 = torch.stack([(r @ x).double() for r, x in pieces]).sum(0) + tail
    expected = torch.stack([r.double() @ x.double() if c == m // 2 else (r @ x).double()
                            for c, (r, x) in enumerate(pieces)]).sum(0) + tail
    assert not torch.equal(in_float32, expected)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the batched product splits its batch among torch's threads
    try:
        assert torch.equal(lz._chunked_rows_dot(rows, w, heavy), expected)
        assert torch.equal(lz._chunked_rows_dot(rows, w, math.inf), in_float32)
    finally:
        torch.set_num_threads(before)


def test_step_reductions_over_a_model_layout_of_mixed_blocks_match_float64():
    """The alphas' and betas' dot over a model-like layout (long float32 blocks with and without a tail, dozens of
    short float32 blocks, short float64 and bfloat16 blocks, a long float64 block, a non-contiguous block),
    against a float64 sum formed independently: accurate to a few eps of sum |x_i y_i|."""
    gen = torch.Generator().manual_seed(3)
    shapes = [((1 << 16) + 7,), (3, 1 << 15), *[(256,)] * 30, (40, 30), (1 << 15,)]
    dtypes = [torch.float32, torch.float32, *[torch.float32] * 28, torch.float64, torch.bfloat16, torch.float32,
              torch.float64]
    a = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    b = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    for block in (0, 5):  # a few dominant entries, as in outlier-dominated Lanczos vectors: at the start of a
        a[block][:3] = 1e4  # long block and in a short one
        b[block][:3] = 1e4
    a[0][-3:] = -1e4  # and in a long block's tail, cancelling
    b[0][-3:] = 1e4
    a.append(torch.randn(64, 50, generator=gen).T)  # non-contiguous
    b.append(torch.randn(50, 64, generator=gen))
    products = [x.double().reshape(-1) * y.double().reshape(-1) for x, y in zip(a, b, strict=True)]
    exact = float(sum(p.sum() for p in products))
    scale = float(sum(p.abs().sum() for p in products))
    eps = float(torch.finfo(torch.float32).eps)
    assert abs(lz._fast_dot(a, b) - exact) <= 8 * eps * scale
    squares = float(sum((x.double() ** 2).sum() for x in a))
    assert abs(lz._fast_norm(a) - squares**0.5) <= 8 * eps * squares**0.5
    assert lz._fast_dot(a[:1], b[:1]) == pytest.approx(float(products[0].sum()), rel=0, abs=8 * eps * scale)
    with pytest.raises(ValueError, match="shapes differ"):
        lz._fast_dot([torch.ones(3)], [torch.ones(4)])


@pytest.mark.parametrize("scale", [1e-20, 1e18])
def test_step_reductions_and_lanczos_hold_at_extreme_scales_of_long_float32_blocks(scale):
    """Float32 vectors whose entries are far from 1 but well inside float32's range: squared, they overflow
    (1e18) or fall below its smallest normal number (1e-23); the dots and norms, and the Ritz values of a run on
    an operator of that scale, must not. Reference: float64 sums and the known largest eigenvalue."""
    n = 3 * lz._ACC_CHUNK + 100  # long blocks with a tail
    x = torch.full((n,), scale * 1e-3, dtype=torch.float32)
    x[::7] = scale
    y = torch.linspace(-1.0, 2.0, n, dtype=torch.float32) * scale
    exact_dot = float(x.double() @ y.double())
    exact_norm = float(x.double().norm())
    assert lz._fast_dot([x], [y]) == pytest.approx(exact_dot, rel=1e-6)
    assert lz._fast_norm([x]) == pytest.approx(exact_norm, rel=1e-6)
    assert lz._fast_norm([x, y[:100]]) == pytest.approx(math.hypot(exact_norm, float(y[:100].double().norm())),
                                                       rel=1e-6)
    eigs = np.concatenate([np.random.default_rng(0).normal(0.0, 0.5, n - OUTLIERS.size), OUTLIERS]) * scale
    op = _Diagonal(torch.tensor(eigs, dtype=torch.float32))
    top = float(torch.tensor(eigs, dtype=torch.float32).double().max())
    for reorth in ("partial", "full"):
        res = lanczos(op, 60, reorth=reorth, seed=0, progress=False)
        assert abs(res.ritz_values.max() - top) <= 1e-6 * abs(top)
        assert res.orthogonality_loss <= math.sqrt(float(torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_orthogonality_diagnostic_over_long_rows_matches_a_float64_gram(dtype, threads, monkeypatch):
    """max |q_i . q_j| over rows long enough for the columns to be dealt among threads (and on one thread), with a
    planted largest pair, against a float64 Gram formed independently."""
    monkeypatch.setattr(lz._threads, "cpu_workers", lambda: threads)
    gen = torch.Generator().manual_seed(5)
    n = 2 * lz._MIN_SPLIT_COLUMNS + 12_345
    rows = torch.randn(6, n, generator=gen, dtype=torch.float64)
    rows[4] = 0.6 * rows[1] + 0.8 * rows[4]
    rows = (rows / rows.norm(dim=1, keepdim=True)).to(dtype)
    basis = torch.empty(9, n, dtype=dtype)
    basis[:6] = rows
    exact = rows.double() @ rows.double().T
    exact.fill_diagonal_(0.0)
    expected = float(exact.abs().max())
    assert expected > 0.5
    eps = float(torch.finfo(dtype).eps)
    assert abs(lz._orthogonality_loss([basis], 6) - expected) <= 8 * eps
    assert lz._orthogonality_loss([basis[:, :1000], basis[:, 1000:]], 6) == pytest.approx(expected, abs=8 * eps)


def test_float32_full_basis_is_orthogonal_to_a_few_eps_and_the_diagnostic_measures_it(monkeypatch):
    op, eigs = _long_lm_operator()
    eps = float(torch.finfo(torch.float32).eps)
    state = lanczos_init(op, 40, reorth="full", seed=0)
    res = lanczos_resume(op, state, progress=False)
    loss = _measured_loss(state.basis[0], 40)
    assert loss <= 10 * eps
    assert abs(res.orthogonality_loss - loss) <= 2 * eps  # the float32 Gram is summed in float64 chunks
    # The outliers are found once each, within a few eps ||H|| of the eigenvalues (numpy reference).
    top = np.sort(eigs)[-3:]
    np.testing.assert_allclose(res.ritz_values[-3:], top, rtol=0, atol=5 * eps * np.abs(eigs).max())
    # Without the chunks (one float32 sum over all 4e5 entries) the same run is 20-30 x less orthogonal.
    monkeypatch.setattr(lz, "_chunked_rows_dot", lambda rows, w, heavy: (rows @ w).double())
    state = lanczos_init(op, 40, reorth="full", seed=0)
    lanczos_resume(op, state, progress=False)
    assert _measured_loss(state.basis[0], 40) > 10 * eps


def _narrow_bulk_operator(n: int, seed: int, wide: int = 0) -> _Diagonal:
    """Float32 ``diag(d)``: a bulk 1e-4 wide at 0.5 under outliers 100, 50 and -30, at permuted coordinates; with
    ``wide``, that many leading coordinates hold eigenvalues in [2, 3] (not permuted): the later Lanczos vectors
    hold most of their norm in one chunk of columns, the worst case for a float32 sum."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.5, 0.5001, n)
    if wide:
        d[:wide] = rng.uniform(2.0, 3.0, wide)
    d[:3] = [100.0, 50.0, -30.0]
    if not wide:
        d = d[rng.permutation(n)]
    return _Diagonal(torch.tensor(d, dtype=torch.float32))


def _float32_chunk_products(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows @ w with one float32 product per chunk of lz._ACC_CHUNK columns, chunk sums in float64 (what the
    measurements were before chunks holding much of w took float64 products)."""
    return sum((rows[:, s : s + lz._ACC_CHUNK] @ w[s : s + lz._ACC_CHUNK]).double()
               for s in range(0, rows.shape[1], lz._ACC_CHUNK))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("n", "wide"), [(16_000, 0), (49_152, 3000), (1_000_000, 3000)])
def test_float32_products_against_the_basis_hold_8_eps_where_one_chunk_holds_much_of_the_vectors(
        n, wide, threads, monkeypatch):
    """The coefficients Q^T w and the Gram matrix of the max |q_i . q_j| diagnostic of float32 Lanczos vectors
    concentrated in a few chunks of columns, against float64 products formed independently: within 8 eps
    (MEASUREMENT_ULPS, what the estimates assume) entry by entry, on one thread and with the columns dealt between
    two (n = 1e6), where plain float32 chunks are off by 25-250 eps."""
    monkeypatch.setattr(lz._threads, "cpu_workers", lambda: threads)
    op = _narrow_bulk_operator(n, seed=0, wide=wide)
    state = lanczos_init(op, 40, reorth="full", seed=0)
    res = lanczos_resume(op, state, progress=False)
    k = res.num_iters
    rows = state.basis[0][:k]
    eps = float(torch.finfo(torch.float32).eps)
    exact = rows.double() @ rows.double().T
    exact.fill_diagonal_(0.0)
    errors, plain = [], []
    for i in range(1, k):
        w = rows[i].clone()
        got = lz._basis_coefficients([state.basis[0]], [w], i)
        errors.append(float((got - exact[i, :i]).abs().max()))
        plain.append(float((_float32_chunk_products(rows[:i], w) - exact[i, :i]).abs().max()))
    assert max(errors) <= lz.MEASUREMENT_ULPS * eps
    assert max(plain) > 3 * lz.MEASUREMENT_ULPS * eps  # what the float64 products of heavy chunks avoid
    gram = lz._gram_of_columns(rows, 0, n)
    gram.fill_diagonal_(0.0)
    assert float((gram - exact).abs().max()) <= lz.MEASUREMENT_ULPS * eps
    assert abs(res.orthogonality_loss - float(exact.abs().max())) <= lz.MEASUREMENT_ULPS * eps


@pytest.mark.parametrize("scale", [1.0, 1e-24, 1e-36])
def test_float32_measurements_of_a_tiny_w_hold_8_eps(scale):
    """w scaled so far down that every squared entry underflows float32 (1e-24: below 1e-45), or even its products
    with the basis rows (1e-36: below float32's smallest normal number, 1.2e-38): the coefficients within 8 eps of
    ||w|| of float64 products, as at scale 1."""
    op = _narrow_bulk_operator(49_152, seed=0, wide=3000)
    state = lanczos_init(op, 40, reorth="full", seed=0)
    lanczos_resume(op, state, progress=False)
    rows = state.basis[0][:40]
    eps = float(torch.finfo(torch.float32).eps)
    errors, plain = [], []
    for i in range(1, 40):
        w = (rows[i].double() * scale).float()
        if scale < 1:
            assert float(torch.linalg.vecdot(w, w)) == 0.0  # float32 squares all underflow
        exact = rows[:i].double() @ w.double()
        size = float(w.double().norm())
        errors.append(float((lz._basis_coefficients([state.basis[0]], [w], i) - exact).abs().max()) / size)
        plain.append(float((_float32_chunk_products(rows[:i], w) - exact).abs().max()) / size)
    assert max(errors) <= lz.MEASUREMENT_ULPS * eps
    assert max(plain) > 3 * lz.MEASUREMENT_ULPS * eps  # what the float64 products of heavy chunks avoid


@pytest.mark.parametrize("seed", [1, 3])
def test_float32_partial_estimates_bound_the_true_loss_of_a_narrow_bulk(seed):
    """Float32 vectors of 5000 entries (one chunk) over a narrow bulk: the true loss (a float64 Gram of the basis)
    stays below max_omega and the diagnostic reports it to 8 eps. With float32 measurements (up to 250 eps off here)
    the estimates recalibrated from them fell 2.8x below the truth and the diagnostic was 30 eps off."""
    op = _narrow_bulk_operator(5000, seed)
    keep = {}
    res = lanczos(op, 80, reorth="partial", seed=seed, progress=False, callback=lambda s: keep.update(basis=s.basis))
    true = _measured_loss(keep["basis"][0], res.num_iters)
    eps = float(torch.finfo(torch.float32).eps)
    assert true <= res.max_omega
    assert abs(res.orthogonality_loss - true) <= lz.MEASUREMENT_ULPS * eps


@pytest.mark.slow
@pytest.mark.parametrize("seed", [28, 128])
def test_float32_partial_stays_below_its_estimates_while_lm_outliers_converge(seed):
    """Float32 diag of 676 513 entries, a Gaussian bulk under the seven LM outliers at random coordinates (found by an
    independent sweep): with checks at iterations 1, 2, 4 and 8 only, the vector of iteration 7 passed sqrt(eps)
    unmeasured (true loss 5.2e-4 and 4.4e-4 against max_omega 3.2e-4 and 3.0e-4). Measured at each early iteration,
    the true loss (a float64 Gram of the basis) stays below max_omega and sqrt(eps)."""
    n = 676_513
    rng = np.random.default_rng(seed)
    d = rng.normal(0.0, 0.5, n)
    d[rng.choice(n, OUTLIERS.size, replace=False)] = OUTLIERS
    op = _Diagonal(torch.tensor(d, dtype=torch.float32))
    keep = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "semi-orthogonality lost" warning
        res = lanczos(op, 100, reorth="partial", seed=seed + 1000, progress=False,
                      callback=lambda s: keep.update(basis=s.basis))
    true = _measured_loss(keep["basis"][0], res.num_iters)
    assert true <= res.max_omega <= math.sqrt(float(torch.finfo(torch.float32).eps))
    top = np.sort(OUTLIERS)[-3:]
    np.testing.assert_allclose(np.sort(res.ritz_values)[-3:], top, rtol=2e-6)


def test_float32_partial_estimates_bound_the_measured_loss_on_long_vectors():
    """The rounding level 8 eps (whatever n) bounds the true loss row by row at n = 4e5 on a diagonal operator,
    the worst case for it (every rounding of an entry lies along an eigenvector)."""
    op, _ = _long_lm_operator()
    state = lanczos_init(op, 40, reorth="partial", seed=0)
    for _ in range(40):
        lanczos_step(op, state)
    q = state.basis[0][:41].double()
    gram = (q @ q.T).abs()
    measured = np.array([float(gram[j, :j].max()) for j in range(1, 41)])
    assert np.all(np.array(state.omega.row_max) >= measured)
    assert measured.max() <= math.sqrt(float(torch.finfo(torch.float32).eps))


# ---------------------------------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("wrap", [False, True])
def test_finite_difference_operators_declare_their_accuracy_and_stay_semi_orthogonal(wrap):
    """An FD product is only as symmetric as it is accurate (1e-8 relative in float64, about sqrt(eps)): the
    operator says so (product_rtol), wrappers pass it on, and partial then re-orthogonalises as needed."""
    from hess_utils.algorithms.blocks import BlockDiagonalOperator
    from hess_utils.operators.hessian import FD_TOLERANCE

    op = hessian_operator(tiny_model("gpt2"), tiny_batches(num_batches=1), method="fd")
    exact = hessian_operator(tiny_model("gpt2"), tiny_batches(num_batches=1), method="rev-rev")
    assert op.product_rtol == FD_TOLERANCE[torch.float64] and exact.product_rtol is None
    if wrap:
        half = len(op.param_names) // 2  # two groups: two inner products per product
        op = BlockDiagonalOperator(op, [op.param_names[:half], op.param_names[half:]])
        assert op.product_rtol == FD_TOLERANCE[torch.float64]
    eps = float(torch.finfo(torch.float64).eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = lanczos(op, 20, reorth="partial", seed=0, progress=False)
    assert res.omega_rounding >= FD_TOLERANCE[torch.float64]
    assert res.orthogonality_loss <= math.sqrt(eps)
    assert res.num_reorth_steps >= 15  # nearly every step: the estimates start at the FD accuracy


# ---------------------------------------------------------------------------------------------- torch.distributed
class _TwoRanks(SymmetricOperator):
    """A dense operator that says it is spread over two ranks (as the DDP and FSDP engines do)."""

    world_size, group = 2, None

    def __init__(self, inner: SymmetricOperator) -> None:
        self.inner = inner
        self.param_names, self.shapes = inner.param_names, inner.shapes
        self.dtypes, self.devices = inner.dtypes, inner.devices

    def _matvec(self, v):
        return self.inner.matvec(v)


def test_a_reorthogonalisation_any_rank_decides_happens_on_every_rank(monkeypatch):
    """Ranks whose vectors differ in the last bits must not branch apart: each decision is a max all-reduce.
    Here the other rank (simulated) always decides to re-orthogonalise; this one follows every time."""
    import torch.distributed as dist

    local = []

    def other_rank_says_yes(flag, op=None, group=None):
        assert op == dist.ReduceOp.MAX and group is None
        local.append(int(flag.item()))
        flag.fill_(1)

    monkeypatch.setattr(dist, "all_reduce", other_rank_says_yes)
    op = _TwoRanks(as_operator(symmetric_with_eigenvalues(np.linspace(-1.0, 1.0, 100), seed=1)))
    res = lanczos(op, 12, reorth="partial", seed=2, progress=False)
    assert 0 in local  # alone, this rank would have skipped some steps
    assert res.reorth_steps == tuple(range(1, 13))
    alone = lanczos(op.inner, 12, reorth="partial", seed=2, progress=False)
    assert alone.num_reorth_steps < 12


def test_recalibration_is_agreed_between_ranks(monkeypatch):
    """A recalibration happens only when every rank finds it worth it. A second rank (simulated) that agrees with
    this one leaves the run as it is alone, recalibrations included; one that wants to re-orthogonalise at every
    decision leaves none."""
    import torch.distributed as dist

    op, _ = _slow_growth_operator(n=100_000)
    alone = lz.lanczos_finish(_partial_state(op, ITERS))
    assert alone.recalibration_steps

    monkeypatch.setattr(dist, "all_reduce", lambda flag, op=None, group=None: None)  # the other rank agrees
    agreed = lz.lanczos_finish(_partial_state(_TwoRanks(op), ITERS))
    assert agreed.recalibration_steps == alone.recalibration_steps
    assert agreed.reorth_steps == alone.reorth_steps
    np.testing.assert_array_equal(agreed.alphas, alone.alphas)

    monkeypatch.setattr(dist, "all_reduce", lambda flag, op=None, group=None: flag.fill_(1))  # it always wants more
    vetoed = lz.lanczos_finish(_partial_state(_TwoRanks(op), ITERS))
    assert vetoed.recalibration_steps == () and vetoed.num_reorth_steps == ITERS


def _triple_eigenvalues() -> tuple[SymmetricOperator, int, int]:
    """Dense float64, n = 300: 100 eigenvalues from -1 to 5, each three times; 299 steps nearly exhaust the space
    (operator, steps, probe seed)."""
    eigs = np.repeat(np.linspace(-1.0, 5.0, 100), 3)
    return as_operator(symmetric_with_eigenvalues(eigs, seed=300)), 299, 4


def _double_outliers() -> tuple[SymmetricOperator, int, int]:
    """Dense float64, n = 800: outliers 50, 45, 40, 35, each twice, over a Gaussian bulk of standard deviation 10
    (operator, steps, probe seed)."""
    rng = np.random.default_rng(2)
    outliers = np.repeat([50.0, 45.0, 40.0, 35.0], 2)
    eigs = np.concatenate([rng.normal(0.0, 10.0, 800 - outliers.size), outliers])
    return as_operator(symmetric_with_eigenvalues(eigs, seed=1)), 100, 2


@pytest.mark.parametrize("case", [_triple_eigenvalues, _double_outliers])
def test_recalibrated_estimates_bound_the_truth_entry_by_entry(monkeypatch, case):
    """After a recalibration the centre and radius bound every entry of the true loss (a float64 Gram of the
    basis), so the kept estimates bound each row and the basis stays semi-orthogonal. Simon's signed recurrence
    continued from the measured rows instead (the bounded mode switched off) falls below the truth on the triple
    eigenvalues: that is what the centre and radius are for."""
    op, iters, seed = case()
    eps = float(torch.finfo(torch.float64).eps)
    bounds = {}
    accept = lz.OmegaEstimates.accept

    def recording_accept(self, row, *args, **kwargs):
        accept(self, row, *args, **kwargs)
        if self.bounded_mode:
            bounds[self.iteration] = (self.center.copy(), self.radius.copy())

    def run(seed=seed):
        state = _partial_state(op, iters, iters, seed)
        q = state.basis[0][: iters + 1]
        gram = (q @ q.T).numpy()
        true = np.array([np.abs(gram[j, :j]).max() for j in range(1, iters + 1)])
        return state.omega, gram, true

    monkeypatch.setattr(lz.OmegaEstimates, "accept", recording_accept)
    est, gram, true = run()
    assert len(est.recalibration_steps) >= 2 and len(bounds) >= 10
    for j, (center, radius) in bounds.items():  # the row of q_{j+1} against q_1..q_{j+1}
        assert np.all(np.abs(gram[j, :j] - center[:-1]) <= radius[:-1]), f"iteration {j}"
    assert np.all(np.array(est.row_max) >= true)
    assert true.max() <= math.sqrt(eps)

    if case is _triple_eigenvalues:  # (on the other case Simon's continuation mostly stays above)
        monkeypatch.setattr(lz.OmegaEstimates, "accept", accept)
        monkeypatch.setattr(lz.OmegaEstimates, "bounded_mode", property(lambda self: False))
        below = []
        for probe in (4, 5):  # both fall below with one or two BLAS threads (rounding differs between them)
            simon, _, true = run(probe)
            assert simon.recalibration_steps
            below.append(int(np.sum(np.array(simon.row_max) < true)))
        assert max(below) > 0


def test_a_recalibration_checks_the_measured_rows_against_their_estimates():
    """The two rows a recalibration measures raise the rounding level where they exceed their estimates, as a
    check's row does: a recalibration counts as a measurement, so it must not hide a rounding model too low."""
    eps = float(torch.finfo(torch.float64).eps)
    est = lz.OmegaEstimates.start(eps)
    est.accept(np.array([1e-12, 1.0]), False)  # the row of q_2, estimated at 1e-12
    before = est.rounding
    est.recalibrate(np.array([4e-12]), np.array([1e-13, 1e-13]))  # q_2 measured 4x above its estimate
    assert est.rounding == pytest.approx(before * 2 * 4e-12 / 1e-12)
    calm = lz.OmegaEstimates.start(eps)
    calm.accept(np.array([1e-12, 1.0]), False)
    calm.recalibrate(np.array([5e-13]), np.array([1e-13, 1e-13]))
    assert calm.rounding == before


@pytest.mark.parametrize("coupling", [0.0, 1e-60, 1e-80, 1e-100, 1e-200])
def test_partial_reports_a_breakdown_whatever_the_size_of_the_last_beta(coupling):
    """``beta_2 = coupling``, below the breakdown tolerance: the estimates grow by ``1 / coupling`` in that step
    (1e80 and more, whose fourth power overflows a float): the run ends as full's does, with no error."""
    H = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, coupling], [0.0, coupling, 0.0]], dtype=torch.float64)
    start = [torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)]
    runs = {m: lanczos(as_operator(H), 3, reorth=m, start=start, progress=False) for m in ("full", "partial")}
    assert runs["partial"].breakdown and runs["full"].breakdown
    np.testing.assert_array_equal(runs["partial"].alphas, runs["full"].alphas)


def _edge_outliers(n: int, seed: int) -> tuple[_Diagonal, np.ndarray]:
    """float64 ``diag``: a Gaussian bulk (standard deviation 10) and one outlier just past each of its edges."""
    rng = np.random.default_rng(1000 + seed)
    eigs = np.concatenate([rng.normal(0.0, 10.0, n - 2), [rng.uniform(35, 60), rng.uniform(-60, -35)]])
    return _Diagonal(torch.tensor(eigs, dtype=torch.float64)), eigs


@pytest.mark.parametrize(("n", "seed"), [(5000, 19), (3000, 79)])
def test_edge_outliers_stay_semi_orthogonal_with_the_ritz_values_of_full(n, seed):
    """Two float64 cases found by a sweep of this spectrum's shape (2 threads): (5000, 19), where a check patched
    its row with the measurement, kept the estimates' signs and the loss passed sqrt(eps) 37-fold, and
    (3000, 79), where Simon's recurrence from a reset level fell below the truth and it passed by 17 %. Now
    both stay semi-orthogonal, with no warning, the estimates above the measured loss and Ritz values of full."""
    op, eigs = _edge_outliers(n, seed)
    eps = float(torch.finfo(torch.float64).eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = lanczos(op, 200, reorth="partial", seed=seed, probe="gaussian", progress=False)
    full = lanczos(op, 200, reorth="full", seed=seed, probe="gaussian", progress=False)
    assert res.orthogonality_loss <= res.max_omega <= math.sqrt(eps)
    scale = np.abs(eigs).max()
    conv = res.converged(1e-10)
    assert conv.sum() == full.converged(1e-10).sum() > 20
    np.testing.assert_allclose(res.ritz_values[conv], full.ritz_values[full.converged(1e-10)], rtol=0,
                               atol=20 * eps * scale)


def test_a_check_above_its_estimates_is_answered_like_a_crossing(monkeypatch):
    """A measured entry above its estimate (beyond the measurement's error) re-orthogonalises the vector and
    the next; one within the estimates is a plain check."""
    op, _ = _slow_growth_operator(n=20_000)
    state = _partial_state(op, 15)
    est = state.omega
    assert 8 in est.check_steps and not est.reorth_steps  # the early checks held
    monkeypatch.setattr(lz.OmegaEstimates, "check_due", lambda self: True)
    lanczos_step(op, state)
    assert est.check_steps[-1] == 16 and not est.reorth_steps  # a forced check within the estimates: nothing
    real_next = lz.OmegaEstimates.next_row
    monkeypatch.setattr(lz.OmegaEstimates, "next_row",  # estimates a millionth of their value: below the truth
                        lambda self, *a: np.append(real_next(self, *a)[:-1] * 1e-6, 1.0))
    lanczos_step(op, state)
    lanczos_step(op, state)
    assert est.reorth_steps == [17, 18] and 17 not in est.check_steps


def test_an_exact_breakdown_in_the_bounded_mode_is_never_recalibrated():
    """After a reset the centres are exactly 0, so ``beta_j = 0`` makes them 0/0 = NaN: a crossing (NaN counts as
    one) that must be re-orthogonalised, as in Simon's mode (inf), never answered by a recalibration."""
    est = lz.OmegaEstimates.start(float(torch.finfo(torch.float64).eps))
    alphas, betas = [0.0] * 6, [1.0] * 5
    for j in range(1, 5):
        est.accept(est.next_row(alphas, betas, betas[j - 1]), j in (2, 3))  # a re-orthogonalised pair at 2, 3
    assert est.bounded_mode and not est.pending
    row = est.next_row(alphas, betas, 0.0)
    assert np.isnan(row[:-1]).any() and est.exceeds(row)
    for loss in (0.0, 1e-300):
        assert not est.worth_recalibrating(row, np.full(row.size - 1, loss))
