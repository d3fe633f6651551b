"""hess_utils.harness.foundation_study (notebook 09) against hand-worked tables, closed forms (exact power laws,
GPT-2 parameter counts) and the dense float64 Hessian of a tiny model (tests/tiny.py)."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from hess_utils import vectors as V
from hess_utils.algorithms.probes import probe_seed
from hess_utils.harness import foundation_study as fs
from hess_utils.operators.hessian import hessian_operator
from tests.tiny import dense_hessian, tiny_batches, tiny_model

matplotlib.use("Agg")


# ---------------------------------------------------------------------------------------------- 1. finite differences
def _sweep():
    """float32 and float64, two vector kinds, steps 1e-4, 1e-3, 1e-2 (two vectors), and the exact products."""
    rows = []
    errors = {  # (dtype, kind) -> {eps: (vector 0, vector 1)}
        ("float32", "gaussian"): {1e-4: (0.4, 0.6), 1e-3: (0.1, 0.3), 1e-2: (0.5, 0.5)},
        ("float32", "krylov"): {1e-4: (2.0, 2.0), 1e-3: (3.0, 5.0), 1e-2: (0.7, 0.9)},
        ("float64", "gaussian"): {1e-4: (1e-8, 3e-8), 1e-3: (1e-6, 1e-6), 1e-2: (1e-4, 1e-4)},
        ("float64", "krylov"): {1e-4: (1e-7, 1e-7), 1e-3: (1e-5, 3e-5), 1e-2: (1e-3, 1e-3)},
    }
    for (dtype, kind), by_eps in errors.items():
        for vector in (0, 1):
            rows.append({"dtype": dtype, "kind": kind, "method": "rev-rev", "eps": math.nan, "vector": vector,
                         "rel_error": 1e-7 if dtype == "float32" else 1e-16})
            for eps, pair in by_eps.items():
                rows.append({"dtype": dtype, "kind": kind, "method": "fd", "eps": eps, "vector": vector,
                             "rel_error": pair[vector]})
    frame = pd.DataFrame(rows)
    frame["unit_roundoff"] = [2.0**-24 if d == "float32" else 2.0**-53 for d in frame["dtype"]]
    return frame


def test_error_at_nearest_step_by_hand():
    sweep = _sweep()
    # 2e-3 is 0.30 decades from 1e-3 and 0.70 from 1e-2: the mean of (0.1, 0.3)
    assert fs.error_at_nearest_step(sweep, "float32", "gaussian", 2e-3) == pytest.approx(0.2)
    assert fs.error_at_nearest_step(sweep, "float32", "krylov", 6e-3) == pytest.approx(0.8)  # 0.22 decades from 1e-2
    assert fs.error_at_nearest_step(sweep, "float64", "gaussian", 1e-9) == pytest.approx(2e-8)  # below the sweep
    assert fs.error_at_nearest_step(sweep, "float64", "krylov", 1.0) == pytest.approx(1e-3)  # above it
    # a tie (1 is one decade from 0.1 and from 10) goes to the smaller step
    tie = pd.DataFrame({"dtype": "float32", "kind": "gaussian", "method": "fd", "eps": [10.0, 0.1],
                        "vector": 0, "rel_error": [5.0, 7.0]})
    assert fs.error_at_nearest_step(tie, "float32", "gaussian", 1.0) == 7.0
    with pytest.raises(ValueError, match="no finite-difference rows of bfloat16"):
        fs.error_at_nearest_step(sweep, "bfloat16", "gaussian", 1e-2)


def test_fd_best_with_defaults_and_conclusions_by_hand():
    best = fs.fd_best_with_defaults(_sweep())
    b = best.set_index(["dtype", "kind"])
    assert b.loc[("float32", "gaussian"), "best_eps"] == 1e-3 and b.loc[("float32", "krylov"), "best_eps"] == 1e-2
    assert b.loc[("float64", "gaussian"), "best_eps"] == 1e-4
    # the package's defaults: 2e-3 (float32, nearest swept step 1e-3) and 2e-6 (float64, nearest 1e-4)
    assert b["package default eps"].tolist() == [2e-3, 2e-3, 2e-6, 2e-6]
    assert b["fd error at ~default"].tolist() == pytest.approx([0.2, 4.0, 2e-8, 1e-7])
    assert "best step per dtype" in fs.fd_best_view(best).to_html()
    text = fs.fd_conclusions(best, ["float32", "float64"], ["gaussian", "krylov"])
    assert "In float32 (Gaussian v) the error is smallest, 2.0e-01, at ε = 1e-03 (u^(1/3) = 4e-03" in text
    assert "the exact product in float32 is off by 1.0e-07" in text
    assert "ε = 1e-02 in float32 (error 8.0e-01), ε = 1e-04 in float64 (error 1.0e-07)" in text
    assert "the errors are 4.0e+00 (float32), 1.0e-07 (float64)" in text
    assert "Krylov" not in fs.fd_conclusions(best, ["float32"], ["gaussian"])


@pytest.mark.slow
def test_fd_sweep_is_computed_once_and_read_back(tmp_path):
    from hess_utils.models import load_model

    model, tokenizer = load_model("tiny-gpt2")
    args = (model, tokenizer, tmp_path, "tiny-gpt2", "wiki", 8, 1, [1e-6, 1e-2], ["float64"], 1, ["gaussian"])
    sweep, run = fs.fd_sweep(*args)
    fd = sweep[sweep.method == "fd"].set_index("eps")["rel_error"]
    assert sweep[sweep.method == "rev-rev"]["rel_error"].iloc[0] < 1e-14 and fd[1e-6] < fd[1e-2]
    again, run_again = fs.fd_sweep(*args)
    pd.testing.assert_frame_equal(again, sweep, check_dtype=False, check_exact=False)
    assert run_again["compute_seconds"] == run["compute_seconds"]
    fig = fs.fd_u_curve_figure(sweep, ["float64"], ["gaussian"], "tiny-gpt2", "wiki", 1, 8)
    assert len(fig.axes) == 1


# ---------------------------------------------------------------------------------------------- 2. FSDP2
def test_cli_variants_by_hand():
    v = fs.cli_variants(["float32", "float64"], {"float32": 1e-3}, nproc=3)
    assert list(v) == ["fsdp, fd, float32", "single, fd, float32", "fsdp, fd, float64", "single, fd, float64", fs.EXACT]
    assert v["fsdp, fd, float32"] == ({"engine": "fsdp", "method": "fd", "dtype": "float32", "fd_eps": 1e-3}, 3)
    assert v["single, fd, float64"] == ({"engine": "single", "method": "fd", "dtype": "float64"}, None)
    assert v[fs.EXACT] == ({"engine": "single", "method": "rev-rev", "dtype": "float64"}, None)


def _ritz(values, probe=0):
    return pd.DataFrame({"probe": probe, "value": values, "weight": 1.0 / len(values)})


def test_cli_summary_and_conclusions_by_hand():
    ritz = {"fsdp, fd, float32": _ritz([-1.0, 0.5, 4.00004]), "single, fd, float32": _ritz([-1.0, 0.5, 4.0]),
            fs.EXACT: _ritz([-1.002, 0.5, 4.0])}
    alphas = {"fsdp, fd, float32": [1.0, 2.5, 9], "single, fd, float32": [1.0, 2.0, 9], fs.EXACT: [0.9, 2.0, -8.0]}
    s = fs.cli_summary(ritz, alphas, ["float32"]).iloc[0]
    assert s[fs.FSDP_DIFF] == pytest.approx(4e-5 / 4.0)  # over max |value| of the single run
    assert s[fs.FD_DIFF] == pytest.approx(0.002 / 4.0)  # over max |value| of the exact run
    assert s["|α₀ fsdp − single| / max|α|"] == 0.0  # alphas over max |alpha_exact| = 8
    assert s["|α₁ fsdp − single| / max|α|"] == pytest.approx(0.5 / 8)
    assert s["|α₀ fd − exact| / max|α|"] == pytest.approx(0.1 / 8) and s["|α₁ fd − exact| / max|α|"] == 0.0
    summary = fs.cli_summary(ritz, alphas, ["float32"])
    assert "FSDP2 (2 gloo ranks)" in fs.cli_summary_view(summary, "m", 3, 2).to_html()
    text = fs.fsdp_conclusions(summary, ["float32"])
    assert "agree on α₀ to 0e+00 and their Ritz values differ by 1.0e-05" in text
    assert "by 5.0e-04 (α₁" in text and "||H q₀||: 0e+00)" in text and "rounding-level agreement" in text
    assert "the finite-difference step is." in fs.fsdp_conclusions(summary, ["float32"], agree_below=1e-6)
    fig = fs.fsdp_figure(ritz, ["float32"], "m", "d", 3)
    assert len(fig.axes[1].lines) == 2


def test_cli_runs_name_their_folders_and_read_the_runs_back(tmp_path, monkeypatch):
    from hess_utils import runs

    calls = []

    def fake_cli(folder, options, nproc=None, timeout=0):
        calls.append((folder, options, nproc))
        folder.mkdir(parents=True)
        _ritz([1.0, float(len(calls))]).to_csv(folder / "ritz.csv", index=False)
        pd.DataFrame({"probe": 0, "i": [0, 1], "alpha": [float(len(calls)), 2.0], "beta": [0.5, 0.0]}).to_csv(
            folder / "tridiagonal.csv", index=False)

    monkeypatch.setattr(fs.studies, "spectrum_subprocess", fake_cli)
    ritz, alphas = fs.cli_runs(tmp_path, "m", "d", 8, 2, 1, 4, ["float32"], {}, 2, seed=5, verbose=False)
    assert list(ritz) == ["fsdp, fd, float32", "single, fd, float32", fs.EXACT]
    base = dict(model="m", data="d", seq_len=8, num_sequences=2, batch_size=1, seed=5, num_iters=4, probes=1,
                reorth="full")
    fsdp = {**base, "engine": "fsdp", "method": "fd", "dtype": "float32"}
    exact = {**base, "engine": "single", "method": "rev-rev", "dtype": "float64", "device": "cpu"}
    assert calls[0] == (runs.result_dir(tmp_path, "09_cli_fsdp_fd_float32", {**fsdp, "nproc": 2}), fsdp, 2)
    assert calls[2] == (runs.result_dir(tmp_path, "09_cli_single_rev-rev_float64", {**exact, "nproc": None}), exact,
                        None)
    assert [a.tolist() for a in alphas.values()] == [[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]]
    assert ritz[fs.EXACT]["value"].tolist() == [1.0, 3.0]


# ---------------------------------------------------------------------------------------------- 3. block diagonal
def test_block_diagonal_errors_match_the_dense_hessian_masked_by_tensor():
    model, batches = tiny_model("llama"), tiny_batches()
    op = hessian_operator(model, batches, method="rev-rev")
    errors = fs.block_diagonal_tables(op, ["tensor"], num_vectors=2, seed=4)["errors"]
    H = dense_hessian(model, batches).numpy()
    sizes = [p.numel() for p in model.parameters()]
    blocks = np.repeat(np.arange(len(sizes)), sizes)
    H_bd = np.where(blocks[:, None] == blocks[None, :], H, 0.0)
    assert errors["groups"].tolist() == [len(sizes)] * 2 and errors["vector"].tolist() == [0, 1]
    for k in range(2):
        v = V.flatten(op.random_vector("gaussian", probe_seed(4, k))).numpy()
        hv, hbv = H @ v, H_bd @ v
        assert errors.relative_error[k] == pytest.approx(np.linalg.norm(hv - hbv) / np.linalg.norm(hv), rel=1e-9)
        assert errors.cosine[k] == pytest.approx(hv @ hbv / (np.linalg.norm(hv) * np.linalg.norm(hbv)), rel=1e-9)


def test_block_diagonal_summary_and_conclusions_by_hand():
    errors = pd.DataFrame({"grouping": ["tensor"] * 3 + ["block"] * 2, "groups": [9, 9, 9, 2, 2],
                           "vector": [0, 1, 2, 0, 1], "relative_error": [0.2, 0.4, 0.6, 0.1, 0.1],
                           "cosine": [0.9, 0.8, 0.7, 0.99, 0.97]})
    bd = fs.block_diagonal_summary(errors)
    assert bd["grouping"].tolist() == ["tensor", "block"] and bd["groups"].tolist() == [9, 2]
    assert bd["relative_error"].tolist() == pytest.approx([0.4, 0.1])
    assert bd["relative_error_sd"].tolist() == pytest.approx([0.2, 0.0])  # sample standard deviation
    assert bd["cosine"].tolist() == pytest.approx([0.8, 0.98]) and bd["cosine_min"].tolist() == [0.7, 0.97]
    assert "over 3 Gaussian vectors" in fs.block_diagonal_view(bd, "m", 3).to_html()
    spectra = {"H": _ritz([-0.5, 2.0, 10.0]), "H_bd (block)": _ritz([-0.25, 3.0, 12.5])}
    text = fs.block_diagonal_conclusions(bd, spectra)
    assert text.startswith("Dropping the couplings between blocks changes H v by 0.10-0.40 of its norm (cosine "
                           "0.80-0.98); order-one errors")
    assert text.endswith("from [-0.5, 10] for H to [-0.25, 12.5] for the per-block approximation.")
    assert "smaller errors" in fs.block_diagonal_conclusions(bd, spectra, order_one=0.5)
    fig = fs.block_diagonal_figure(errors, spectra, ["tensor", "block"], "m", "d", 3)
    assert len(fig.axes) == 3


# ---------------------------------------------------------------------------------------------- 4. scaling
def test_width_configs_give_the_closed_form_gpt2_parameter_count():
    from transformers import AutoModelForCausalLM

    configs = fs.width_configs("tiny-gpt2", [32, 64])
    assert list(configs) == ["width 32", "width 64"] and configs["width 32"] is not configs["width 64"]
    for d, cfg in zip((32, 64), configs.values()):
        assert (cfg.n_embd, cfg.n_inner) == (d, 4 * d)
        count = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
        per_layer = 12 * d * d + 13 * d  # ln 2d, qkv 3d^2+3d, proj d^2+d, ln 2d, mlp 4d^2+4d and 4d^2+d
        assert count == (cfg.vocab_size + cfg.n_positions) * d + cfg.n_layer * per_layer + 2 * d
    llama = fs.width_configs("tiny-llama", [48])["width 48"]
    assert (llama.hidden_size, llama.intermediate_size) == (48, 192)


def _costs():
    n = np.array([1e3, 1e4, 1e5])
    rows = []
    for op, (a, b, mem) in {"gradient": (2e-6, 1.0, (0.0, 0.0, 0.0)), "rev-rev": (1e-5, 0.9, (1.0, 10.0, 100.0)),
                            "fd": (3e-6, 1.1, (0.0, 5.0, 50.0))}.items():
        for ni, m in zip(n, mem):
            rows.append({"model": f"w{ni:g}", "op": op, "seconds": a * ni**b, "peak_mib": m, "num_params": int(ni)})
    costs = pd.DataFrame(rows)
    grad = costs[costs.op == "gradient"].set_index("num_params")["seconds"]
    costs["ratio_to_gradient"] = costs["seconds"] / costs["num_params"].map(grad)
    return costs


def test_power_law_fits_recover_exact_power_laws():
    fits = fs.power_law_fits(_costs()).set_index("op")
    assert list(fits.index) == ["gradient", "rev-rev", "fd"]
    assert fits["time exponent"].tolist() == pytest.approx([1.0, 0.9, 1.1])
    assert fits["time coefficient (s)"].tolist() == pytest.approx([2e-6, 1e-5, 3e-6])
    assert fits["time r²"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert math.isnan(fits.loc["gradient", "memory exponent"])  # no positive peak
    assert fits.loc["rev-rev", "memory exponent"] == pytest.approx(1.0)  # 1, 10, 100 MiB over 1e3..1e5
    assert fits.loc["fd", "memory exponent"] == pytest.approx(1.0)  # two positive rows suffice
    # ratios 5 N^-0.1 and 1.5 N^0.1: 5e-0.5 = 1.58 .. 5e-0.3 = 2.51 and 1.5e0.3 = 2.99 .. 1.5e0.5 = 4.74
    assert fits.loc["rev-rev", "ratio to gradient (min)"] == pytest.approx(5 * 1e5**-0.1)
    assert fits.loc["rev-rev", "ratio to gradient (max)"] == pytest.approx(5 * 1e3**-0.1)
    assert fits.loc["fd", "ratio to gradient (max)"] == pytest.approx(1.5 * 1e5**0.1)


def test_scaling_conclusions_and_figure_by_hand():
    costs = _costs()
    fits = fs.power_law_fits(costs)
    text = fs.scaling_conclusions(costs, fits)
    assert text.startswith("Over 1,000-100,000 parameters a gradient scales like N^1.00, an exact product like "
                           "N^0.90 and a finite-difference product like N^1.10; a product costs 1.6-2.5 gradients "
                           "(exact) and 3.0-4.7 (finite differences")
    assert "modest constant factor over first-order work" in text
    assert "larger than the modest" in fs.scaling_conclusions(costs, fits, modest_below=4.0)
    assert "power laws" in fs.fits_view(fits).to_html() and "100,000" in fs.costs_view(costs).to_html()
    fig = fs.scaling_figure(costs, fits, "tiny-gpt2", [32, 64, 128], 2, 16)
    assert len(fig.axes) == 3 and len(fig.axes[0].lines) == 6


@pytest.mark.slow
def test_scaling_costs_are_measured_once_per_configuration(tmp_path):
    costs, run = fs.scaling_costs(tmp_path, "tiny-gpt2", [16, 32], "wiki", 8, 1, 1)
    assert costs["op"].tolist() == ["gradient", "rev-rev", "fd"] * 2
    assert (costs["seconds"] > 0).all() and (costs[costs.op == "gradient"]["ratio_to_gradient"] == 1.0).all()
    cfgs = fs.width_configs("tiny-gpt2", [16, 32])
    for d, cfg in zip((16, 32), cfgs.values()):
        count = (cfg.vocab_size + cfg.n_positions) * d + cfg.n_layer * (12 * d * d + 13 * d) + 2 * d
        assert (costs[costs.model == f"width {d}"]["num_params"] == count).all()
    again, run_again = fs.scaling_costs(tmp_path, "tiny-gpt2", [16, 32], "wiki", 8, 1, 1)
    assert run_again["compute_seconds"] == run["compute_seconds"]
    assert again["seconds"].tolist() == pytest.approx(costs["seconds"].tolist())
