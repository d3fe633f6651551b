"""The measurements behind notebooks 05-09 (hess_utils.harness.studies, hess_utils.runs): numbers, not just shapes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from hess_utils.harness import studies
from hess_utils.operators.dense import as_operator
from hess_utils.operators.hessian import hessian_operator
from hess_utils.runs import cached_results
from tests.tiny import dense_hessian, tiny_batches, tiny_model


def _dense_subset(model, batches, subset: dict[str, int], reduction: str = "mean") -> np.ndarray:
    """The leading ``subset[name]`` entries of each named weight, from the independent dense Hessian."""
    names = list(subset)
    full = dense_hessian(model, batches, names=names, reduction=reduction).detach().numpy()
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    starts = np.cumsum([0] + sizes[:-1])
    idx = np.concatenate([start + np.arange(subset[n]) for start, n in zip(starts, names, strict=True)])
    return full[np.ix_(idx, idx)]


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
    whole = _dense_subset(model, batches, subset)
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


# ---------------------------------------------------------------------------------------------- notebook 03
def test_dense_hessian_tables_equal_the_exact_subset_hessian():
    model, batches = tiny_model("gpt2"), tiny_batches()
    name = "transformer.ln_f.weight"
    tables, record = studies.dense_hessian_tables(model, batches, [name], progress=False)
    n = dict(model.named_parameters())[name].numel()
    reference = _dense_subset(model, batches, {name: n})
    assert record["dim"] == n and record["param_names"] == [name]
    np.testing.assert_allclose(tables["hessian"].to_numpy(), reference, rtol=1e-9, atol=1e-12)
    h = studies.symmetric_matrix(tables["hessian"])
    assert h.dtype == torch.float64 and torch.equal(h, h.T)


def test_eigenvalue_summary_of_a_rotated_diagonal():
    lam = np.array([-2.0, -0.5, 0.0, 1.0, 3.0, 7.0])
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))
    s = studies.eigenvalue_summary((q * lam) @ q.T, top=3)
    np.testing.assert_allclose(s["eigenvalues"], lam, atol=1e-12)
    assert s["max"] == pytest.approx(7.0) and s["min"] == pytest.approx(-2.0) and s["dim"] == 6
    assert s["negative"] == 2 or (s["negative"] == 3 and s["eigenvalues"][2] < 0)  # the zero may round below 0
    np.testing.assert_allclose(s["top"], [7.0, 3.0, 1.0])


def test_ritz_recovery_error_and_ghost_matching_by_hand():
    exact = np.array([1.0, 2.0, 5.0])
    assert studies.ritz_recovery_error([5.0 + 1e-9, 1.0, 2.0 - 3e-9], exact) == pytest.approx(3e-9)
    assert math.isnan(studies.ritz_recovery_error([5.0, 2.0], exact))
    # tau = 1e-6 * 5: two kept copies of 5 (differing by 3e-7, more than any 12-decimal rounding), a flagged copy,
    # one of 2, and a spurious 3.6 near no eigenvalue
    ritz = pd.DataFrame({"value": [5.0, 5.0 + 3e-7, 5.0 - 1e-7, 3.6, 2.0 + 1e-8],
                         "ghost": [False, False, True, False, False], "weight": 0.2})
    view, m = studies.ghost_matching(ritz, exact, top=4)
    assert m.pop("tau") == pytest.approx(5e-6)
    assert m == {"ritz_values": 5, "flagged": 1, "kept": 4, "found": 3, "duplicates": 1}
    assert view["value"].tolist() == sorted(ritz["value"], reverse=True)[:4]
    np.testing.assert_allclose(view["nearest_exact"], [5.0, 5.0, 5.0, 5.0])
    np.testing.assert_allclose(view["error"], [3e-7, 0.0, 1e-7, 1.4], atol=1e-12)
    _, none_kept = studies.ghost_matching(ritz.assign(ghost=True), exact)
    assert none_kept["found"] == none_kept["duplicates"] == 0
    with pytest.raises(ValueError, match="ghost"):
        studies.ghost_matching(ritz.drop(columns="ghost"), exact)


def test_ghost_study_recovers_a_known_spectrum_and_finds_copies_without_reorth():
    rng = np.random.default_rng(0)
    lam = np.concatenate([rng.uniform(0, 1, 17), [4.0, 6.0, 9.0]])
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    h = torch.tensor((q * lam) @ q.T)
    out = studies.ghost_study(h, [5, 20, 60], stem_iters=8, seed=1, progress=False)
    ghosts, ritz = out["ghosts"], out["ritz"]
    assert set(ghosts.dtype) == {"float64", "float32"}
    full = ritz[(ritz.reorth == "full") & (ritz.dtype == "float64") & (ritz.k == 20)]
    assert studies.ritz_recovery_error(full.value, lam) < 1e-10
    assert sorted(set(ritz[(ritz.reorth == "none") & (ritz.dtype == "float64")].k)) == [8, 60]
    none60 = ghosts[(ghosts.reorth == "none") & (ghosts.dtype == "float64") & (ghosts.k == 60)].iloc[0]
    assert none60.copies_of_top >= 2 and none60.extra_converged > 0
    _, match = studies.ghost_matching(ritz[(ritz.reorth == "none") & (ritz.dtype == "float64") & (ritz.k == 60)], lam)
    assert match["flagged"] > 0


def test_ghost_summary_and_conclusions_from_hand_made_tables():
    ghosts = pd.DataFrame({
        "reorth": ["none"] * 4 + ["full"] * 2 + ["none"], "dtype": ["float32"] * 6 + ["float64"],
        "k": [4, 10, 20, 40, 4, 20, 4], "extra_converged": [0, 2, 5, 9, 0, 1, 7],
        "copies_of_top": [0, 1, 3, 6, 0, 1, 9],
        "cw_ghosts": [0, 1, 4, 8, 0, 2, 0]})
    costs = pd.DataFrame({"reorth": ["none", "full", "offload"], "s_per_iter": [1.0, 1.25, 1.5],
                          "basis_bytes_on_operator_device": [0, 3 * 2**20, 0], "operator_device": ["cpu"] * 3})
    s = studies.ghost_summary(ghosts, costs, dim=16, cost_iters=5)
    assert s["first_copy_k"] == 10 and s["at_dim"] == {"k": 20, "extra_converged": 5, "copies_of_top": 3,
                                                        "cw_ghosts": 4}
    assert s["full_max_extra"] == 1 and (s["cw_full"], s["k_full"]) == (2, 20)
    assert s["overhead"] == pytest.approx(0.25) and s["basis_mib"] == pytest.approx(3.0)
    assert s["basis_tib_70b"] == pytest.approx(101 * 70e9 * 4 / 2**40)
    text = studies.ghost_conclusions(s)
    assert "k = 10 iterations" in text and "+25%" in text and "3.0 MiB" in text and "flags 2 Ritz" in text
    with pytest.raises(ValueError, match="dim"):
        studies.ghost_summary(ghosts, costs, dim=100, cost_iters=5)


def test_basis_scale_table_is_the_closed_form():
    table = studies.basis_scale_table({"a": 1000, "b": 7e9}, iterations=(30, 100))
    assert table["model"].tolist() == ["a", "b"]
    np.testing.assert_allclose(table["basis GiB, k=100"], [101 * 1000 * 4 / 2**30, 101 * 7e9 * 4 / 2**30])
    np.testing.assert_allclose(table["basis GiB, k=30"], [31 * 1000 * 4 / 2**30, 31 * 7e9 * 4 / 2**30])


# ---------------------------------------------------------------------------------------------- notebook 06
def test_column_noise_floor_by_hand():
    exact = np.array([0.0, 1e-9, -3e-6, 0.5, -2.0])
    low = exact + np.array([1e-7, -2e-7, 0.0, 4e-7, 0.0])
    f = studies.column_noise_floor(low, exact)
    assert f["max_abs_error"] == pytest.approx(4e-7)
    assert f["fraction_below_noise"] == pytest.approx(2 / 5)  # 0 and 1e-9 are below 4e-7; -3e-6 is not
    assert f["fraction_exact_zero_f64"] == pytest.approx(1 / 5)
    assert f["rel_error"] == pytest.approx(math.sqrt(1e-14 + 4e-14 + 16e-14) / math.sqrt(1e-18 + 9e-12 + 0.25 + 4))
    same = studies.column_noise_floor(exact, exact)
    assert same["max_abs_error"] == 0 and same["fraction_below_noise"] == 0  # nothing is below a zero floor
    with pytest.raises(ValueError, match="same"):
        studies.column_noise_floor(exact[:2], exact)


def test_column_noise_floor_of_a_float32_hessian_column():
    from hess_utils.algorithms.columns import hessian_column

    op64 = hessian_operator(tiny_model("gpt2"), tiny_batches(), method="rev-rev")
    op32 = hessian_operator(tiny_model("gpt2", dtype=torch.float32), tiny_batches(), method="rev-rev")
    e, v = hessian_column(op64, 7).values, hessian_column(op32, 7).values
    f = studies.column_noise_floor(v, e)
    assert 0 < f["max_abs_error"] < 1e-4 * np.abs(e).max()  # float32 rounding, far from the column's scale
    assert f["fraction_below_noise"] == pytest.approx(float(np.mean(np.abs(e) < np.max(np.abs(v - e)))))


def test_column_magnitudes_and_banded_summary_on_hand_made_tables():
    m = studies.column_magnitudes(np.array([0.0, -4.0, 1.0, 0.0, 2.0]))
    assert m == {"max_abs": 4.0, "median_abs": 1.0, "median_nonzero_abs": 2.0, "exact_zeros": 0.4}
    assert math.isnan(studies.column_magnitudes(np.zeros(3))["median_nonzero_abs"])
    fractions = pd.DataFrame({"num_sequences": [1, 1, 4, 4], "column": ["F1", "F2", "F1", "F2"],
                              "<1e-08": [0.1, 0.3, 0.2, 0.4], "<1e-06": [0.5, 0.7, 0.6, 0.6]})
    stats = pd.DataFrame({"num_sequences": [1, 1, 4, 4], "exact_zeros": [0.2, 0.4, 0.1, 0.1],
                          "median_nonzero_abs": [1e-3, 3e-3, 1e-3, 1e-3], "tokens": [31, 31, 124, 124]})
    hists = pd.DataFrame({"num_sequences": [1, 1, 1, 4], "column": ["F1", "F1", "F2", "F1"], "count": [7, 3, 10, 10]})
    check = pd.DataFrame({"max_abs_error": [1e-9, 3e-9], "fraction_below_noise": [0.5, 0.7]})
    s = studies.banded_summary(fractions, stats, hists, check)
    assert s["sizes"] == [1, 4] and s["column_length"] == 10
    assert s["below_1e-8"] == pytest.approx({1: 0.2, 4: 0.3}) and s["below_1e-6"] == pytest.approx({1: 0.6, 4: 0.6})
    assert s["exact_zeros"] == pytest.approx({1: 0.3, 4: 0.1})
    assert s["median_nonzero"] == pytest.approx({1: 2e-3, 4: 1e-3})
    assert s["max_noise"] == 3e-9 and s["below_noise"] == pytest.approx(0.6)
    text = studies.banded_conclusions(s)
    assert "0.2000 (1 seq.), 0.3000 (4 seq.)" in text and "broaden with greater" in text and "at most 3.0e-09" in text
    pivots = studies.threshold_pivots(fractions, stats)
    assert list(pivots) == [1, 4] and pivots[4][1] == 124
    assert pivots[1][0].loc["<1e-08", "F2"] == 0.3


# ---------------------------------------------------------------------------------------------- notebook 04
def test_dataset_plan_shares_runs_between_studies():
    plan = studies.dataset_plan(["random", "wiki", "news"], [1, 2], [8, 16], "wiki", base_seq_len=16,
                                base_sequences=2)
    assert len(plan) == 3 + 4 * 2 + 2
    assert plan.label.nunique() == 9  # random 2x16 three times, news 2x16 and wiki train 2x16 twice each
    assert plan.label.iloc[0] == "random 2x16" and plan.label.iloc[1] == "wiki train 2x16"
    assert set(plan[plan.study == "seen vs unseen"].label) == {"wiki train 1x16", "wiki heldout 1x16",
                                                               "wiki train 2x16", "wiki heldout 2x16"}


def test_monotone_direction_and_sweeps():
    assert studies.monotone_direction([3, 2, 1]) == "falls" and studies.monotone_direction([1, 2, 5]) == "grows"
    assert studies.monotone_direction([1, 1, 2]) == "shows no monotone trend"
    assert studies.monotone_direction([1.0]) == "shows no monotone trend"
    summary = pd.DataFrame({"data": ["news"] * 4, "split": "train", "seq_len": [16, 16, 16, 8],
                            "num_sequences": [4, 1, 2, 1], "lambda_max": [3.0, 1.0, 2.0, 9.0]})
    values, sizes = studies.sample_size_sweep(summary, "news", "train", "lambda_max", 16, [1, 4])
    assert values.tolist() == [1.0, 3.0] and sizes.tolist() == [1, 4]


def test_dataset_conclusions_quote_the_summary():
    rows = []
    for data, split, n, top, low, out in [("random", "train", 1, 1.0, -0.2, 0.0),
                                          ("random", "train", 2, 1.5, -0.3, 0.0),
                                          ("wiki", "train", 1, 4.0, -2.0, 3.0), ("wiki", "train", 2, 5.0, -1.0, 4.0),
                                          ("wiki", "heldout", 1, 4.0, -1.0, 3.0),
                                          ("wiki", "heldout", 2, 6.0, -3.0, 5.0),
                                          ("news", "train", 1, 2.0, -1.0, 1.0), ("news", "train", 2, 3.0, -1.0, 2.0)]:
        rows.append({"label": f"{data} {split} {n}x16", "data": data, "split": split, "seq_len": 16,
                     "num_sequences": n, "lambda_max": top, "lambda_min": low, "neg_ratio": -low / top,
                     "near_zero_mass": 0.9, "est_outlier_eigenvalues": out})
    text = studies.dataset_conclusions(pd.DataFrame(rows), "wiki", 16, 2, [1, 2], num_iters=6)
    assert "one probe of 6 iterations" in text and "(ratio 1.50)" in text
    assert "λ_max 2, 3; estimated eigenvalues beyond 10 % of λ_max 1.0, 2.0: the outlier count grows" in text
    assert "0.5, 0.2 on seen data (falls) and 0.25, 0.5 on unseen data (grows)" in text


# ---------------------------------------------------------------------------------------------- notebook 07
def test_subset_hessians_count_predicted_tokens_not_input_ids():
    model = tiny_model("gpt2")
    batches = tiny_batches(num_batches=2, batch_size=2, pad=True)  # rows of 6 tokens, row 0 of each padded by 2
    subsets = {"one": {"transformer.h.0.attn.c_attn.weight": 4},
               "two": {"transformer.h.0.attn.c_attn.weight": 2, "transformer.h.0.mlp.c_fc.weight": 3}}
    out, record = studies.subset_hessians(model, batches, subsets, progress=False)
    # predicted tokens: (6 - 1) per full row, (4 - 1) per padded row; input_ids.numel() would say 24
    assert record["num_tokens"] == 2 * (3 + 5) != sum(b["input_ids"].numel() for b in batches)
    assert out["H_one"].shape == (4, 4) and out["H_two"].shape == (5, 5)
    assert studies.subset_offsets(out["layout"], "two") == [0, 2, 5]
    reference = _dense_subset(model, batches, subsets["two"], reduction="sum")
    np.testing.assert_allclose(out["H_two"] * 16, reference, rtol=1e-10, atol=1e-13)


def test_subset_summary_and_conclusions_on_hand_made_matrices():
    h = np.array([[4.0, 1.0, 0.0], [1.0, -2.0, 0.5], [0.0, 0.5, 1.0]])
    layout = pd.DataFrame({"subset": ["layer", "block", "block", "kind", "all"], "param": ["a", "a", "b", "a", "a"],
                           "start": [0, 0, 1, 0, 0], "stop": [3, 1, 3, 3, 3]})
    mats = {f"H_{k}": h for k in ("layer", "block", "kind", "all")}
    s = studies.subset_summary(mats, layout).set_index("subset")
    eig = np.linalg.eigvalsh(h)
    assert s.loc["layer", "max |H_ij|"] == 4.0 and s.loc["layer", "mean |diag|"] == pytest.approx(7 / 3)
    assert s.loc["layer", "mean |off-diag|"] == pytest.approx(3 / 6)
    assert s.loc["block", "weights"] == 2 and s.loc["layer", "negative eigenvalues"] == 1
    assert s.loc["layer", "λ_min"] == pytest.approx(eig[0]) and s.loc["layer", "λ_max"] == pytest.approx(eig[-1])
    assert s.loc["block", "share of ||H||²_F in per-weight blocks"] == pytest.approx((16 + 4 + 0.5 + 1) / 23.5)
    assert s.loc["layer", "share of ||H||²_F in per-weight blocks"] == 1.0
    text = studies.subset_conclusions(s.reset_index())
    assert "on average 4.7 times larger" in text and "layer 1, block 1, kind 1, all 1" in text


def test_batch_size_conclusions_find_the_first_b_below_the_threshold():
    errors = pd.DataFrame({"b": [1, 2, 3, 4], "rel_error_2": [0.9, 0.3, 0.05, 0.0]})
    text = studies.batch_size_conclusions(errors)
    assert text.startswith("The error falls from 0.90 at b = 1 to 0.30 at b = 2")
    assert "first drops below 0.1 at b = 3 of 4 (75%)" in text and "larger share" in text
    assert "stays above 0.5 until b = B = 4" in studies.batch_size_conclusions(errors.assign(rel_error_2=0.9), 0.5)


# ---------------------------------------------------------------------------------------------- notebook 08
def test_hutchinson_study_exact_row_is_the_subset_hessian_diagonal():
    model, batches = tiny_model("gpt2"), tiny_batches()
    weight = "transformer.h.0.attn.c_attn.weight"
    out, record = studies.hutchinson_study(model, batches, weight, num_probes=3, snapshots=(1,), seed=0)
    shape = tuple(dict(model.named_parameters())[weight].shape)
    dense = hessian_operator(model, batches, params=[weight], method="rev-rev").to_dense(progress=False).numpy()
    np.testing.assert_allclose(out["exact_first_row"], np.diag(dense)[: shape[-1]], rtol=1e-9, atol=1e-12)
    assert out["D_1"].shape == shape and set(out) >= {"D_1", "D_3", "curve", "stderr"}
    assert out["curve"]["k"].tolist() == [1, 2, 3] and record["seconds_per_product"] > 0


def test_hutchinson_summary_and_conclusions_on_a_known_power_law():
    k = np.arange(1, 101)
    curve = pd.DataFrame({"k": k, "rel_error": 2.0 * k**-0.5, "rel_diff": np.nan})
    first = np.array([[1.0, -2.0], [3.0, 4.0]])
    s = studies.hutchinson_summary(curve, first, 2 * first)
    assert s["fit"].exponent == pytest.approx(-0.5) and s["fit"].coefficient == pytest.approx(2.0)
    assert s["k_target"] == 64 and s["correlation"] == pytest.approx(1.0) and s["entries"] == 4  # 2/sqrt(64) = 0.25
    never = studies.hutchinson_summary(curve[curve.k < 50], first, -first)
    assert never["k_target"] is None and never["predicted"] == pytest.approx(64.0)
    text = studies.hutchinson_conclusions(s, 1)
    assert "k^-0.50" in text and "from 2.00 at k = 1 to 0.200 at k = 100" in text and "reaches 0.25 at k = 64" in text
    assert "fit predicts k ≈ 64" in studies.hutchinson_conclusions(never, 1)


# ---------------------------------------------------------------------------------------------- notebook 00
def test_ritz_measure_has_mass_one_whatever_the_probes():
    ritz = pd.DataFrame({"probe": [0, 0, 1, 1, 1], "value": [1, 2, 3, 4, 5], "weight": [0.25, 0.75, 0.5, 0.3, 0.2]})
    values, weights = studies.ritz_measure(ritz)
    assert values.dtype == np.float64 and values.tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(weights, [0.125, 0.375, 0.25, 0.15, 0.1])
    assert weights.sum() == pytest.approx(1.0)


def test_quickstart_conclusions_by_hand():
    # z = 1e-3 * 10: -0.5 is negative; |θ| > 0.1 * 10 = 1: only 10 is an outlier, weight 0.05 -> 50 of 1000
    ritz = pd.DataFrame({"probe": 0, "value": [-0.5, 0.0, 10.0], "weight": [0.1, 0.85, 0.05]})
    text = studies.quickstart_conclusions(ritz, 1000)
    assert "span -0.5 … 10 (|λ_min| / λ_max = 0.050); 10.0% of the spectral weight lies on negative" in text
    assert "95.000000% of the weight" in text and "the 1 Ritz values outside carry weight 5.00e-02" in text
    assert "about 50 of the 1,000 eigenvalues" in text and "Unlike the paper" in text and "Large negative" not in text
    # two probes: weights halve; -5 and 10 outside the bulk with weight (0.002 + 0.002) / 2 = 0.002 -> 2 of 1000
    two = pd.DataFrame({"probe": [0, 0, 0, 1, 1, 1], "value": [-5.0, 0.0, 10.0, -5.0, 0.0, 10.0],
                        "weight": [0.002, 0.996, 0.002] * 2})
    text = studies.quickstart_conclusions(two, 1000)
    assert "(|λ_min| / λ_max = 0.500); 0.2% of the spectral weight" in text and "99.600000%" in text
    assert "the 4 Ritz values outside carry weight 4.00e-03, i.e. about 4 of the 1,000" in text
    assert "As in the paper's spectra" in text and "Large negative outliers" in text


# ---------------------------------------------------------------------------------------------- notebook 01
def _losses(single, auto):
    rows = []
    for setup, values in (("single device", single), ('device_map="auto"', auto)):
        for split, (steps, losses) in values.items():
            rows += [{"step": s, "split": split, "loss": v, "setup": setup} for s, v in zip(steps, losses)]
    return pd.DataFrame(rows)


def test_loss_differences_and_device_map_summary_by_hand():
    losses = _losses({"train": ([1, 2], [3.0, 2.5]), "validation": ([0, 2], [3.2, 2.9])},
                     {"train": ([1, 2], [3.0, 2.5 + 1e-6]), "validation": ([0, 2], [3.2 - 2e-7, 2.9])})
    wide = studies.loss_differences(losses)
    assert wide.columns.tolist()[:2] == ["split", "step"] and len(wide) == 4
    np.testing.assert_allclose(wide.set_index(["split", "step"])["difference"].loc[[("train", 2), ("validation", 0)]],
                               [1e-6, -2e-7], rtol=1e-6)
    ritz = pd.DataFrame({"setup": ["single device"] * 3 + ['device_map="auto"'] * 3,
                         "value": [-1.0, 4.0, 0.5, 0.5, -1.0, 4.0 + 3e-9], "weight": 1 / 3})
    s = studies.device_map_summary(wide, ritz)
    assert s["ritz_diff"] == pytest.approx(3e-9, rel=1e-6) and s["top"] == pytest.approx(4.0 + 3e-9)
    assert s["d_train"] == pytest.approx(1e-6, rel=1e-6) and s["d_val"] == pytest.approx(2e-7, rel=1e-6)
    assert (s["first_val"], s["final_val"], s["count"]) == (3.2, 2.9, 3)
    where = {"mapped_devices": ["cpu"], "same_place": True}
    text = studies.device_map_conclusions(s, 2, where)
    assert "went from 3.2000 to 2.9000 nats/token in 2 steps" in text and "is 1e-06 (train) and 2e-07" in text
    assert "of the 3 Ritz values is 3e-09 (7.5e-10 relative to max |θ| = 4)" in text
    assert "only at rounding level" in text and "ran on cpu of one machine" in text
    zero = {**s, "d_train": 0.0, "d_val": 0.0, "ritz_diff": 0.0}
    assert "bit-for-bit identical" in studies.device_map_conclusions(zero, 2, where)
    assert "split over devices" in studies.device_map_conclusions(zero, 2, {**where, "same_place": False})


def test_device_map_training_of_two_copies_is_identical_and_exact():
    from hess_utils.batches import load_batches
    from tests.tiny import VOCAB, dense_hessian

    single = tiny_model("gpt2")
    mapped = copy.deepcopy(single)
    where = studies.device_map_placement(single, mapped)
    dim = sum(p.numel() for p in single.parameters())
    place = where["placement"].set_index("setup")
    assert place.loc["single device", "entries"] == dim and place.loc["single device", "bytes"] == 8 * dim
    assert where["same_place"] and where["hooks"] == where["single_hooks"] == 0 and where["device_map"] is None
    assert "on cpu; without it on cpu" in studies.device_map_placement_markdown(where)
    kw = dict(train_seq_len=6, train_sequences=4, batch_size=2, val_sequences=2, train_steps=2, lr=1e-3,
              eval_every=1, spec_seq_len=6, spec_sequences=2, num_iters=12, seed=0, progress=False)
    val = load_batches("random", VOCAB, 6, 2, 2, split="heldout", seed=0)
    with torch.no_grad():  # the validation loss before training: predicted-token mean cross-entropy, by hand
        logits = torch.cat([single(**b).logits for b in val])[:, :-1]
        targets = torch.cat([b["input_ids"] for b in val])[:, 1:]
        before = float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)))
    tables, record = studies.device_map_training(single, mapped, VOCAB, "random", **kw)
    assert record == {"hf_device_map": None} and tables["placement"].equals(where["placement"])
    wide = studies.loss_differences(tables["losses"])
    assert (wide["difference"] == 0).all() and len(wide) == 2 + 3  # 2 train steps, validation at 0, 1, 2
    first = wide[wide.split == "validation"].iloc[0]
    assert first["step"] == 0 and first["single device"] == pytest.approx(before, rel=1e-12)
    s = studies.device_map_summary(wide, tables["ritz"])
    assert s["ritz_diff"] == 0 and s["count"] == 12
    spec = load_batches("random", VOCAB, 6, 2, 2, split="train", seed=0)
    eig = np.linalg.eigvalsh(dense_hessian(single, spec).numpy())  # of the trained model
    ritz = tables["ritz"][tables["ritz"].setup == "single device"]
    assert eig[0] - 1e-9 <= ritz.value.min() and ritz.value.max() <= eig[-1] + 1e-9  # Cauchy interlacing
    assert ritz.value.max() == pytest.approx(eig[-1], rel=1e-3)  # Lanczos finds the top eigenvalue first
    assert ritz.weight.sum() == pytest.approx(1.0)


def test_density_slider_starts_at_the_default_width():
    import matplotlib

    matplotlib.use("Agg")
    pytest.importorskip("ipywidgets")
    from hess_utils import gaussian_density
    from hess_utils.harness.notebook_setup import density_slider

    ritz = pd.DataFrame({"probe": [0, 0, 1, 1], "value": [-1.0, 3.0, 0.5, 2.0], "weight": [0.5, 0.5, 0.25, 0.75]})
    shown = density_slider(ritz, "hand-made")
    sigma = gaussian_density(([-1.0, 3.0, 0.5, 2.0], [0.25, 0.25, 0.125, 0.375])).sigma
    slider = shown.widget.children[0]
    assert slider.value == pytest.approx(sigma) and slider.min == pytest.approx(np.log10(sigma) - 2)
    assert slider.max == pytest.approx(np.log10(sigma) + 1)


# ---------------------------------------------------------------------------------------------- notebook 02
def test_engine_runs_name_their_folders_by_the_whole_configuration(tmp_path, monkeypatch):
    from hess_utils import runs

    calls = []
    monkeypatch.setattr(studies, "spectrum_subprocess", lambda folder, opts, nproc, threads_per_process:
                        calls.append((folder, opts, nproc, threads_per_process)))
    options = {"model": "m", "num_iters": 3}
    folders = studies.engine_runs(tmp_path, "nb", options, {"ddp": 2, "single": None}, threads_per_process=3,
                                  verbose=False)
    assert folders == {"ddp": runs.result_dir(tmp_path, "nb_ddp", {**options, "engine": "ddp", "nproc": 2}),
                       "single": runs.result_dir(tmp_path, "nb_single", {**options, "engine": "single", "nproc": None})}
    assert folders["ddp"].name.startswith("nb_ddp-") and folders["single"].name.startswith("nb_single-")
    assert [c[1:] for c in calls] == [({**options, "engine": "ddp"}, 2, 3), ({**options, "engine": "single"}, None, 3)]
    assert options == {"model": "m", "num_iters": 3}  # not modified


def test_engine_table_agreement_and_conclusions_by_hand():
    timings = {"slq_compute_s": 2.0, "s_per_matvec": 0.5}
    rec = {"world_size": 2, "backend": "gloo", "rank_devices": ["cpu", "cpu"], "dim": 10, "num_tokens": 30,
           "loss": 3.5, "timings": timings}
    table = studies.engine_table({"ddp": (None, rec), "single": (None, {"timings": timings, "dim": 10})})
    assert table.loc[0, "rank_devices"] == "cpu, cpu" and table.loc[1, "rank_devices"] == ""
    assert table.loc[0, "tokens"] == 30 and table.loc[1, "s_per_product"] == 0.5 and pd.isna(table.loc[1, "world_size"])
    single = pd.DataFrame({"probe": 0, "value": [-1.0, 2.0, 4.0, 4.0 + 1e-7], "weight": [0.1, 0.2, 0.3, 0.4],
                           "ghost": [False, False, False, True]})
    ddp = pd.DataFrame({"probe": 0, "value": [4.0 + 1e-7 + 8e-10, 2.0, -1.0, 4.0],  # shuffled
                        "weight": [0.4 + 5e-12, 0.2, 0.1, 0.3], "ghost": False})
    a = studies.engine_agreement(ddp, single)
    assert a["max_dvalue"] == pytest.approx(8e-10, rel=1e-5) and a["median_rel"] == 0
    assert a["max_rel"] == pytest.approx(8e-10 / (4.0 + 1e-7), rel=1e-5)
    assert a["max_dweight"] == pytest.approx(5e-12, rel=1e-3) and a["worst_value"] == 4.0 + 1e-7
    assert a["paired"] and a["ghosts"] == 1 and a["count"] == 4 and a["table"]["rank"].tolist() == [0, 1, 2, 3]
    text = studies.engine_conclusions(a, rec)
    assert "used 2 ranks (gloo: cpu, cpu). Its 4 Ritz values differ" in text
    assert "at most 8.00e-10 (2.0e-10 of max |θ|; median 0.0e+00) and the weights by at most 5.0e-12" in text
    assert "identical to plotting accuracy" in text and "at θ = 4, one of two nearly equal" in text
    assert "1 Ritz value(s) of the run without re-orthogonalisation are flagged" in text
    far = studies.engine_agreement(ddp.assign(value=[4.1, 2.0, -1.0, 3.0]),
                                   single.assign(value=[-1.0, 2.0, 3.0, 4.0], ghost=False))
    assert not far["paired"] and far["max_rel"] == pytest.approx(0.1 / 4.0) and far["worst_value"] == 4.0
    text = studies.engine_conclusions(far, rec)
    assert "larger than rounding" in text and "nearly equal" not in text and "No Ritz value is flagged" in text
