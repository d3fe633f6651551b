"""hess_utils.harness.frontier_study (notebook 05) against hand-worked Ritz tables, closed forms and the dense float64
Hessian of a tiny model (tests/tiny.py)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from hess_utils import vectors as V
from hess_utils.harness import frontier_study as fs
from hess_utils.operators.hessian import hessian_operator
from tests.tiny import _float64_everywhere, _num_predicted, _summed_nll, dense_hessian, tiny_batches, tiny_model

matplotlib.use("Agg")


def _ritz(values, weights, residuals=None, probe=0, ghost=None):
    n = len(values)
    return pd.DataFrame({"probe": probe, "value": values, "weight": weights,
                         "residual": residuals if residuals is not None else [0.0] * n,
                         "ghost": ghost if ghost is not None else [False] * n})


def test_ritz_table_and_weight_summary_by_hand():
    ritz = pd.concat([_ritz([3.0, -1.0, 0.001, 2.0], [0.01, 0.02, 0.9, 0.07]),
                      _ritz([5.0, 0.0], [0.5, 0.5], probe=1)], ignore_index=True)
    table = fs.ritz_table(ritz)
    assert table["value"].tolist() == [-1.0, 0.001, 2.0, 3.0]
    assert list(table.columns) == ["value", "weight", "residual", "ghost"]
    s = fs.weight_summary(table, dim=1000)
    assert (s["top_value"], s["top_weight"], s["outliers"]) == (0.001, 0.9, 3)
    assert s["outlier_min"] == 0.01 and s["outlier_max"] == 0.07
    assert s["outlier_sum"] == pytest.approx(0.1) and s["outlier_median"] == 0.02
    assert s["one_over_dim"] == 1e-3 and s["of_that_order"]  # median 0.02 < 1e3 / 1000 = 1
    text = fs.table2_markdown(s)
    assert "θ = 0.001 with weight 0.9000" in text and "other 3 nodes" in text
    assert "from 1.00e-02 to 7.00e-02 (total 1.00e-01)" in text and "1/dim = 1.0e-03" in text
    assert text.endswith("of that order.")
    larger = fs.weight_summary(table, dim=10**6)  # median 0.02 > 1e3 / 1e6
    assert not larger["of_that_order"] and "(2.0e-02 median)" in fs.table2_markdown(larger)
    with pytest.raises(ValueError, match="empty"):
        fs.weight_summary(table.iloc[:0], 10)


def test_near_zero_table_relative_thresholds_are_epsilons_times_the_scale():
    assert fs.EPS32 == 2.0**-23 and fs.EPS64 == 2.0**-52
    ritz = pd.concat([_ritz([-4.0, 1e-9, 1e-3, 0.03], [0.1, 0.6, 0.2, 0.1]),
                      _ritz([2.0, 1e-20], [0.5, 0.5], probe=1)], ignore_index=True)
    mass, scale = fs.near_zero_table(ritz, [1e-10, 1.0], num_probes=2)
    assert scale == 4.0
    assert mass["threshold is"].tolist() == ["ε64 · max|θ|", "ε32 · max|θ|", "1e-4 · max|θ|", "1e-2 · max|θ|",
                                             "absolute", "absolute"]
    assert mass["threshold"].tolist() == pytest.approx([4 * 2.0**-52, 4 * 2.0**-23, 4e-4, 4e-2, 1e-10, 1.0])
    # below 8.9e-16: 1e-20 (0.5); below 4.8e-7: + 1e-9 (0.6); below 4e-4: same; below 4e-2: + 1e-3, 0.03 (0.3)
    assert mass["mass"].tolist() == pytest.approx([0.25, 0.55, 0.55, 0.7, 0.25, 0.7])
    assert mass["nodes"].tolist() == [1, 2, 2, 4, 1, 4]
    assert "<caption>" in fs.mass_view(mass, "m").to_html()


def test_zero_test_summary_and_markdown_by_hand():
    ritz = _ritz([-5.0, 0.2, 0.05, 3.0], [0.1, 0.3, 0.4, 0.2], residuals=[1.0, 0.1, 0.001, 3.5])
    noise = pd.DataFrame({"vector": [0, 1], "rel_error": [2e-7, 5e-7], "abs_error": [0.15, 0.05], "hv_norm": [1, 1]})
    s = fs.zero_test_summary(ritz, noise)
    # bounds residual + 0.15: 1.15, 0.25, 0.151, 3.65 -> resolved: -5 yes, 0.2 no, 0.05 no, 3.0 no
    assert s["floor"] == 0.15 and s["rel_error"] == 5e-7
    assert s["tested"]["resolved"].tolist() == [True, False, False, False]
    assert (s["unresolved"], s["total"]) == (3, 4) and s["unresolved_mass"] == pytest.approx(0.9)
    text = fs.zero_test_markdown(s, scale=5.0)
    assert "off by 5.0e-07" in text and "floor 1.50e-01" in text and "max |θ| = 5" in text
    assert "3 of 4 Ritz values" in text and "carry 0.9000" in text
    html = fs.zero_test_view(s["tested"]).to_html()
    assert "resolved: |θ|" in html and "bound" in html


def _precision_runs():
    probes = [pd.DataFrame({"orthogonality_loss": [x]}) for x in (0.3, 1e-7, 1e-14)]
    none = _ritz([-1.0000002, 0.0, 1e-8, 1.999996, 2.0000004], [0.1, 0.2, 0.3, 0.2, 0.2], ghost=[0, 0, 0, 1, 0])
    full = _ritz([-1.0, 0.0, 1e-8, 1.0, 2.000004], [0.1, 0.2, 0.3, 0.2, 0.2])
    ref = _ritz([-1.0, 1e-12, 4e-6, 1.0, 2.0], [0.1, 0.2, 0.3, 0.2, 0.2])
    return {"float32, reorth=none": (none, probes[0]), "float32, reorth=full": (full, probes[1]),
            "float64, reorth=full": (ref, probes[2])}


def test_precision_table_by_hand():
    table = fs.precision_table(_precision_runs(), rel_thresholds=(1e-7, 1e-3))
    assert table["run"].tolist() == list(_precision_runs())
    assert table["max θ"].tolist() == [2.0000004, 2.000004, 2.0] and table["min θ"].tolist() == [-1.0000002, -1, -1]
    # over the reference's scale 2, to 6 decimals: none -0.5, 0, 0, 0.999998, 1.0 (4 distinct); full -0.5, 0, 0, 0.5,
    # 1.000002 (4); the reference -0.5, 0, 2e-6, 0.5, 1.0 (5)
    assert table["distinct Ritz values"].tolist() == [4, 4, 5]
    assert table["ghosts"].tolist() == [1, 0, 0]
    assert table["orthogonality loss"].tolist() == [0.3, 1e-7, 1e-14]
    assert table[fs.SHIFT].tolist() == pytest.approx([2e-7, 2e-6, 0.0], rel=1e-6)  # 4e-7 / 2, 4e-6 / 2
    # below 2e-7: 0 and 1e-8 (0.5), the reference's 1e-12 (0.2); below 2e-3 also the reference's 4e-6
    assert table["mass |λ|<1e-07·max"].tolist() == pytest.approx([0.5, 0.5, 0.2])
    assert table["mass |λ|<1e-03·max"].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert "<caption>" in fs.precision_view(table, "p").to_html()
    with pytest.raises(ValueError, match="no runs"):
        fs.precision_table({})


def test_precision_markdown_quotes_the_table():
    table = fs.precision_table(_precision_runs())
    top = {"top_weight": 0.95, "top_value": 0.0123}
    text = fs.precision_markdown(table, "tiny", 5, "big", top, 0.25)
    assert "match float64 to 2.0e-06 of the spectral scale, and without re-orthogonalisation to 2.0e-07" in text
    assert "only 4 of 5 Ritz values are distinct" in text and "against 4 with it" in text
    assert "flags 1 / 0 / 0 Ritz values" in text
    assert "is 0.5000 / 0.5000 / 0.2000 (float32 none" in text
    assert "also seen on big: its heaviest node has weight 0.950 at θ = 0.0123" in text
    assert text.endswith("of zero is 0.2500.")
    assert "not seen" in fs.precision_markdown(table, "tiny", 5, "big", {**top, "top_weight": 0.5}, 0.25)


@pytest.mark.slow
def test_frontier_slq_moments_match_the_dense_hessian_and_a_rerun_reads_back(tmp_path):
    model, batches = tiny_model("llama"), tiny_batches()
    op = hessian_operator(model, batches, method="rev-rev")
    args = (tmp_path, "tiny-llama", "wiki", "float64", "rev-rev", 6, 4, 12, 2, "full", 3)
    ritz, record, run_dir, _ = fs.frontier_slq(op, *args, checkpoint_every=5)
    assert run_dir.parent == tmp_path and run_dir.name.startswith("05_frontier_slq-")
    H = dense_hessian(model, batches).numpy()
    with _float64_everywhere(model), torch.no_grad():
        loss = sum(float(_summed_nll(model(input_ids=b["input_ids"]).logits, b)) for b in batches)
    assert record["loss"] == pytest.approx(loss / _num_predicted(batches), rel=1e-12)
    assert (record["dim"], record["dtype"]) == (H.shape[0], "float64")
    eig = np.linalg.eigvalsh(H)
    for p in range(2):
        part = ritz[ritz.probe == p]
        v = V.flatten(op.random_vector("rademacher", 3 * 1_000_003 + p)).numpy()
        hv = H @ v
        # Gauss quadrature of k nodes is exact for the moments 0..2k-1 of the probe's spectral measure
        assert part.weight.sum() == pytest.approx(1.0, abs=1e-12)
        assert (part.weight * part.value).sum() == pytest.approx(v @ hv / (v @ v), rel=1e-9)
        assert (part.weight * part.value**2).sum() == pytest.approx(hv @ hv / (v @ v), rel=1e-9)
        assert part.value.max() <= eig[-1] + 1e-9 and part.value.min() >= eig[0] - 1e-9
    products = op.num_matvecs
    again, _, same_dir, _ = fs.frontier_slq(op, *args, checkpoint_every=5)
    assert same_dir == run_dir and op.num_matvecs == products
    pd.testing.assert_frame_equal(again, ritz)


@pytest.mark.slow
def test_noise_floor_and_precision_runs_of_the_embedded_tiny_llama(tmp_path):
    from hess_utils.batches import load_batches
    from hess_utils.models import load_model

    model, tokenizer = load_model("tiny-llama", dtype=torch.float32)
    batches = load_batches("wiki", tokenizer, seq_len=8, num_sequences=2, batch_size=2, seed=0)
    op = hessian_operator(model, batches, method="rev-rev")
    noise = fs.noise_floor_tables(op, "tiny-llama", batches, num_vectors=1)["noise"]
    assert len(noise) == 1 and 1e-9 < noise.rel_error[0] < 1e-4  # float32 rounding, not zero, not garbage
    assert noise.abs_error[0] == pytest.approx(noise.rel_error[0] * noise.hv_norm[0], rel=1e-9)
    small, dim = fs.precision_runs(tmp_path, "tiny-llama", "wiki", 8, 2, 6)
    assert dim == op.dim and list(small) == ["float32, reorth=none", "float32, reorth=full", "float64, reorth=full"]
    table = fs.precision_table(small)
    assert table[fs.SHIFT].iloc[2] == 0.0 and (table[fs.SHIFT] < 1e-4).all()  # float32 and float64 see one spectrum
    loss = table["orthogonality loss"]
    assert loss.iloc[2] < 1e-10 < loss.iloc[1] < 1e-4
    fig = fs.near_zero_figure(small, small["float64, reorth=full"][0], 1, "tiny-llama", "tiny-llama", "float64",
                              "full", "wiki")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) >= 4
