"""The measurements behind notebooks 05-09 (hess_utils.harness.studies, hess_utils.runs): numbers, not just shapes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from hess_utils.algorithms.subsets import subset_hessian
from hess_utils.harness import studies
from hess_utils.operators.dense import as_operator
from hess_utils.operators.hessian import hessian_operator
from hess_utils.runs import cached_results
from tests.tiny import tiny_batches, tiny_model


def test_fd_sweep_has_the_u_curve_and_the_exact_floors():
    model = tiny_model("gpt2")
    eps = [1e-9, 1e-6, 1e-3, 1e-1]
    sweep = studies.fd_error_sweep(model, tiny_batches(), eps, dtypes=("float64", "float32"), num_vectors=1,
                                   progress=False)
    assert len(sweep) == 2 * (len(eps) + 1) and set(sweep["kind"]) == {"gaussian"}
    err = {(r.dtype, r.method, r.eps if not math.isnan(r.eps) else None): r.rel_error for r in sweep.itertuples()}
    assert err[("float64", "rev-rev", None)] < 1e-14  # the reference itself
    assert 1e-9 < err[("float32", "rev-rev", None)] < 1e-4  # float32 rounding, not zero
    assert err[("float64", "fd", 1e-6)] < 1e-8
    # U-curve in float32: too small a step drowns in rounding, too large a step in truncation
    assert err[("float32", "fd", 1e-3)] < err[("float32", "fd", 1e-9)]
    assert err[("float32", "fd", 1e-3)] < err[("float32", "fd", 1e-1)]
    best = studies.fd_best_eps(sweep).set_index("dtype")
    assert best.loc["float32", "best_eps"] == 1e-3
    assert best.loc["float64", "u^(1/3)"] == pytest.approx((2.0**-53) ** (1 / 3))
    with pytest.raises(ValueError, match="positive"):
        studies.fd_error_sweep(model, tiny_batches(), [0.0], progress=False)
    with pytest.raises(ValueError, match="vector kinds"):
        studies.fd_error_sweep(model, tiny_batches(), [1e-3], vector_kinds=("lanczos",), progress=False)


def test_fd_sweep_krylov_vectors_are_unit_and_exact_in_float64():
    model = tiny_model("gpt2")
    sweep = studies.fd_error_sweep(model, tiny_batches(), [1e-6], dtypes=("float64",), num_vectors=1,
                                   vector_kinds=("gaussian", "krylov"), progress=False)
    assert sweep["kind"].tolist() == ["gaussian", "gaussian", "krylov", "krylov"]
    assert (sweep[sweep.method == "rev-rev"]["rel_error"] < 1e-14).all()
    assert (sweep[sweep.method == "fd"]["rel_error"] < 1e-5).all()
    best = studies.fd_best_eps(sweep)
    assert list(best["kind"]) == ["gaussian", "krylov"]


def test_hvp_precision_float32_against_float64():
    model = tiny_model("gpt2")
    op32 = hessian_operator(tiny_model("gpt2", dtype=torch.float32), tiny_batches(), method="rev-rev")
    op64 = hessian_operator(model, tiny_batches(), method="rev-rev")
    table = studies.hvp_precision(op32, op64, num_vectors=2)
    assert list(table.columns) == ["vector", "rel_error", "abs_error", "hv_norm"]
    assert (table["rel_error"] > 1e-9).all() and (table["rel_error"] < 1e-4).all()
    np.testing.assert_allclose(table["abs_error"], table["rel_error"] * table["hv_norm"], rtol=1e-12)
    same = studies.hvp_precision(op64, op64, num_vectors=1)
    assert same.loc[0, "rel_error"] == 0.0


def test_per_sequence_hessians_add_up_to_the_mean_hessian():
    model = tiny_model("gpt2")
    batches = tiny_batches(num_batches=2, batch_size=2, pad=True)
    subset = {"transformer.h.0.attn.c_attn.weight": 5, "transformer.h.0.mlp.c_fc.weight": 3}
    mats, tokens = studies.per_sequence_subset_hessians(model, batches, subset, progress=False)
    assert mats.shape == (4, 8, 8) and tokens.tolist() == [3, 5, 3, 5]  # right padding: 2 fewer in row 0 of each batch
    whole = subset_hessian(model, batches, subset, reduction="mean", progress=False).matrix.numpy()
    np.testing.assert_allclose(mats.sum(0) / tokens.sum(), whole, rtol=1e-10, atol=1e-13)


def test_batch_size_errors_on_known_matrices():
    eye = np.eye(2)
    hessians = np.stack([2 * eye, 0 * eye, 4 * eye])  # summed-loss Hessians
    tokens = np.array([1, 1, 2])
    # H^1 = 2I, H^2 = I, H^3 = 6/4 I = 1.5 I
    table = studies.batch_size_errors(hessians, tokens)
    np.testing.assert_allclose(table["rel_error_2"], [0.5 / 1.5, 0.5 / 1.5, 0.0])
    np.testing.assert_allclose(table["rel_error_fro"], table["rel_error_2"])
    np.testing.assert_allclose(table["rel_diff_2"][:2], [1.0 / 1.0, 0.5 / 1.5])
    assert math.isnan(table["rel_diff_2"].iloc[-1])
    assert studies.batch_size_errors(hessians, tokens, sizes=[3, 1])["b"].tolist() == [1, 3]
    with pytest.raises(ValueError, match="shape"):
        studies.batch_size_errors(hessians[:, :1], tokens)


def test_hutchinson_convergence_exact_on_a_diagonal_and_converging_otherwise():
    d = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    diag = studies.hutchinson_convergence(as_operator(torch.diag(d)), d.numpy(), np.arange(4), num_probes=3,
                                          progress=False)
    assert diag.curve["rel_error"].max() < 1e-15  # Rademacher: v * (D v) = d exactly
    assert set(diag.snapshots) == {1, 3}
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    h = (a + a.T) / 2 + 10 * torch.eye(30, dtype=torch.float64)
    conv = studies.hutchinson_convergence(as_operator(h), torch.diag(h)[:10].numpy(), np.arange(10),
                                          num_probes=400, snapshot_at=(1, 50), progress=False)
    curve = conv.curve.set_index("k")
    assert curve.loc[400, "rel_error"] < 0.5 * curve.loc[1, "rel_error"]
    assert curve.loc[400, "rel_error"] < 0.1
    assert math.isnan(curve.loc[1, "rel_diff"]) and curve.loc[400, "rel_diff"] < curve.loc[2, "rel_diff"]
    np.testing.assert_allclose(conv.snapshots[400][:10], torch.diag(h)[:10].numpy(), atol=5 * conv.stderr.max())
    with pytest.raises(ValueError, match="exact_indices"):
        studies.hutchinson_convergence(as_operator(h), [1.0], [99], num_probes=1, progress=False)


def test_near_zero_mass_and_zero_test():
    values = np.array([-5.0, 1e-7, 2e-3, 4.0, 1e-9, 3.0])
    weights = np.array([0.1, 0.6, 0.3, 0.2, 0.7, 0.1])  # two probes, each summing to 1
    table = studies.near_zero_mass(values, weights, [1e-8, 1e-6, 1e-2, 10.0], num_probes=2)
    np.testing.assert_allclose(table["mass"], [0.35, 0.65, 0.8, 1.0])
    assert table["nodes"].tolist() == [1, 2, 3, 6]
    ritz = pd.DataFrame({"value": [1e-3, -2.0, 0.5], "weight": [0.9, 0.05, 0.05], "residual": [1e-2, 1e-6, 0.1]})
    tested = studies.ritz_zero_test(ritz, noise_floor=0.45)
    assert tested["resolved"].tolist() == [False, True, False]
    with pytest.raises(ValueError, match="residual"):
        studies.ritz_zero_test(ritz.drop(columns="residual"))


def test_power_law_fit_recovers_the_exponent():
    x = np.array([1e3, 1e4, 1e5, 1e6])
    fit = studies.fit_power_law(x, 3e-6 * x**0.8)
    assert fit.exponent == pytest.approx(0.8, abs=1e-12) and fit.coefficient == pytest.approx(3e-6, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    np.testing.assert_allclose(fit(x), 3e-6 * x**0.8, rtol=1e-9)
    with pytest.raises(ValueError, match="positive"):
        studies.fit_power_law([1, 2], [1, -1])


def test_gradient_and_hvp_costs_on_a_tiny_model():
    model = tiny_model("gpt2", dtype=torch.float32)
    table = studies.gradient_and_hvp_costs(model, tiny_batches(), repeats=2)
    assert table["op"].tolist() == ["gradient", "rev-rev", "fd"]
    assert (table["seconds"] > 0).all() and (table["peak_mib"] >= 0).all()
    assert table.loc[0, "ratio_to_gradient"] == 1.0
    assert table["num_params"].iloc[0] == sum(p.numel() for p in model.parameters())


def test_compare_ritz_and_a_failing_cli_run(tmp_path):
    a = pd.DataFrame({"probe": [0, 0, 1], "value": [2.0, -1.0, 3.0]})
    b = pd.DataFrame({"probe": [0, 0, 1], "value": [-1.0, 2.5, 3.0]})
    table = studies.compare_ritz(a, b, labels=("fsdp", "single"))
    assert table["value_fsdp"].tolist() == [-1.0, 2.0, 3.0]
    np.testing.assert_allclose(table["rel_diff"], [0.0, 0.5 / 3.0, 0.0])
    with pytest.raises(RuntimeError, match="num-iters"):
        studies.spectrum_subprocess(tmp_path / "run", {"num_iters": "not-a-number"}, timeout=120)


def test_cached_results_round_trip_and_refusal(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"table": pd.DataFrame({"x": [1.5, 2.0]}), "matrix": np.arange(6.0).reshape(2, 3)}, {"note": "hi"}

    out, run = cached_results(tmp_path / "r", {"a": 1}, compute, model="m")
    again, run2 = cached_results(tmp_path / "r", {"a": 1}, compute, model="m")
    assert len(calls) == 1 and run2["note"] == "hi" and run2["model"] == "m"
    np.testing.assert_array_equal(again["matrix"], np.arange(6.0).reshape(2, 3))
    pd.testing.assert_frame_equal(again["table"], out["table"])
    with pytest.raises(ValueError, match="a: 1"):
        cached_results(tmp_path / "r", {"a": 2}, compute)
    with pytest.raises(ValueError, match="DataFrames or numpy arrays"):
        cached_results(tmp_path / "s", {"a": 1}, lambda: {"bad": [1, 2]})


def test_log_magnitude_histogram_counts_everything():
    x = np.array([0.0, 1e-20, 3e-5, -3e-5, 0.5, 1e5])
    hist = studies.log_magnitude_histogram(x, low=-8, high=0, per_decade=1)
    assert hist["count"].sum() == x.size and hist["fraction"].sum() == pytest.approx(1.0)
    zero = hist[hist["lo"] == 0]
    assert zero["count"].item() == 1
    counts = dict(zip(hist["lo"].round(12), hist["count"]))
    assert counts[1e-8] == 1 and counts[1e-5] == 2 and counts[0.1] == 2  # clipped into the end bins
    with pytest.raises(ValueError, match="NaN"):
        studies.log_magnitude_histogram(np.array([np.nan]))


def test_within_block_fraction():
    h = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 1.0], [0.0, 1.0, 3.0]])
    inside, total = 1 + 4 + 4 + 1 + 9, 1 + 4 + 4 + 1 + 1 + 1 + 9
    assert studies.within_block_fraction(h, [0, 2, 3]) == pytest.approx(inside / total)
    assert studies.within_block_fraction(np.diag([1.0, 2.0]), [0, 1, 2]) == 1.0
    with pytest.raises(ValueError, match="offsets"):
        studies.within_block_fraction(h, [0, 3, 2])
