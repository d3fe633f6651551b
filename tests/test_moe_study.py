"""The MoE study of notebook 11 against the independent dense float64 Hessian of ``tests.tiny``.

The tiny Qwen2-MoE of ``tests/tiny.py`` (float64, 4 experts top-2, a gated shared expert, padded batches):
its dense Hessian is ``jacrev(grad(L))`` with the test's own loss and float64 mode, so the block traces and
top eigenvalues the study reports are checked against the diagonal blocks of a matrix built without the
package. Plus the training additions of the embedded MoE model: the load-balancing term against its closed
form and its effect on a training run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hess_utils.algorithms.probes import probe_seed
from hess_utils.harness import moe_study, training
from hess_utils.operators.hessian import hessian_operator
from tests import tiny


@pytest.fixture(scope="module")
def moe():
    model = tiny.tiny_model("qwen2_moe")
    batches = tiny.tiny_batches(pad=True)
    return model, batches


def _block_matrix(model, batches, names) -> np.ndarray:
    return tiny.dense_hessian(model, batches, names=names).detach().numpy()


def test_blocks_partition_the_parameters_by_kind(moe):
    model, _ = moe
    blocks = moe_study.moe_parameter_blocks(model)
    names = [n for n, _ in model.named_parameters()]
    flat = [n for kind in blocks.values() for n in kind]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert blocks["router"] == ["model.layers.0.mlp.gate.weight"]
    assert set(blocks["routed experts"]) == {"model.layers.0.mlp.experts.gate_up_proj",
                                             "model.layers.0.mlp.experts.down_proj"}
    assert "model.layers.0.mlp.shared_expert_gate.weight" in blocks["shared expert"]
    assert all(".self_attn." in n for n in blocks["attention"])
    assert all("norm" in n for n in blocks["norms"])
    assert set(blocks["embeddings and head"]) == {"model.embed_tokens.weight", "lm_head.weight"}


def test_a_dense_model_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="no top-k router.*tiny-qwen2-moe"):
        moe_study.moe_parameter_blocks(tiny.tiny_model("llama"))


def test_block_traces_match_the_dense_diagonal_blocks(moe):
    model, batches = moe
    blocks = moe_study.moe_parameter_blocks(model)
    op = hessian_operator(model, batches, method="rev-rev")
    samples = moe_study.tensor_quadratic_forms(op, num_probes=200)
    assert samples.shape == (200, len(op.param_names))
    h = tiny.dense_hessian(model, batches).detach().numpy()
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in op.shapes])
    diag = np.diag(h)
    for by_layer in (False, True):
        table = moe_study.aggregate_traces(samples, op, blocks, by_layer=by_layer)
        assert table.parameters.sum() == op.dim
        for row in table.itertuples():
            layer = None if pd.isna(row.layer) else int(row.layer)
            cols = [i for i, n in enumerate(op.param_names) if n in blocks[row.kind]
                    and (not by_layer or moe_study.layer_of(n) == layer)]
            assert cols
            exact = sum(diag[offsets[i]:offsets[i + 1]].sum() for i in cols)
            # Hutchinson is unbiased: the exact trace lies within a few standard errors of the estimate.
            assert abs(row.trace - exact) <= 4 * row.trace_stderr + 1e-12, (row.kind, row.trace, exact)
            assert row.mean_diagonal == pytest.approx(row.trace / row.parameters)
    # The samples themselves: probe p's per-tensor forms are v_p^T H v_p split by tensor, exactly.
    v = np.concatenate([t.reshape(-1).numpy() for t in op.random_vector("rademacher", probe_seed(0, 3))])
    forms = [v[a:b] @ (h @ v)[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    np.testing.assert_allclose(samples[3], forms, rtol=1e-10, atol=1e-12 * np.abs(forms).max())


def test_block_top_eigenvalues_match_the_dense_blocks(moe):
    model, batches = moe
    blocks = moe_study.moe_parameter_blocks(model)
    chosen = {kind: blocks[kind] for kind in ("router", "routed experts", "shared expert")}
    pairs = moe_study.block_top_eigenvalues(model, batches, chosen, k=3, tol=1e-10)
    for kind, names in chosen.items():
        exact = np.linalg.eigvalsh(_block_matrix(model, batches, names))
        rows = pairs[pairs.kind == kind].sort_values("rank")
        assert (rows.parameters == len(exact)).all() and rows.converged.all()
        np.testing.assert_allclose(rows.eigenvalue, exact[::-1][:3], rtol=1e-8, atol=1e-10 * abs(exact).max())


def test_routing_decisions_count_tokens_times_layers(moe):
    model, batches = moe
    tokens = sum(b["input_ids"].numel() for b in batches)
    assert moe_study.routing_decisions(model, batches) == tokens * model.config.num_hidden_layers


def test_fd_flips_grow_with_the_step_and_the_default_step_is_exact(moe):
    model, batches = moe
    frame = moe_study.fd_routing_flips(model, batches, fd_eps=(None, 3.0), num_vectors=2)
    default = frame[frame.fd_eps == "adaptive"]
    assert (default.flips == 0).all() and (default.relative_error < 1e-6).all()
    huge = frame[frame.fd_eps == 3.0]
    # A step of 3x the weights' norm sends tokens elsewhere, and the quotient is then no Hessian of any piece.
    assert (huge.flips > 0).all() and (huge.relative_error > 1e-2).all()
    assert ((huge.share_flipped > 0) & (huge.share_flipped <= 1)).all()


def test_balance_loss_closed_form():
    # Uniform probabilities and every expert chosen equally often: the term is exactly 1.
    logits = torch.zeros(4, 4)
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert float(training.router_balance_loss([(logits, indices)])) == pytest.approx(1.0)
    # One expert takes every slot with probability p: E * (1/k * 1) * p for the chosen ones.
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 3)
    indices = torch.tensor([[0, 1]] * 3)
    p = torch.softmax(logits[0], 0)
    expected = 4 * (0.5 * p[0] + 0.5 * p[1])
    assert float(training.router_balance_loss([(logits, indices)])) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="no router call"):
        training.router_balance_loss([])


def test_training_with_the_balance_term_records_the_plain_loss():
    model = tiny.tiny_model("qwen2_moe", dtype=torch.float32)
    batches = tiny.tiny_batches(num_batches=1)
    a = training.continue_training(model, batches, None, 3, lr=1e-2, progress=False, router_aux_loss_coef=1.0)
    model_b = tiny.tiny_model("qwen2_moe", dtype=torch.float32)
    b = training.continue_training(model_b, batches, None, 3, lr=1e-2, progress=False)
    assert a.train_loss[0] == b.train_loss[0]  # step 1 records l_1 before either update: the same
    assert a.train_loss[-1] != b.train_loss[-1]  # the term changed the updates
    with pytest.raises(ValueError, match="no router module"):
        training.continue_training(tiny.tiny_model("llama", dtype=torch.float32), batches, None, 1,
                                   progress=False, router_aux_loss_coef=0.1)
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        training.continue_training(model, batches, None, 1, progress=False, router_aux_loss_coef=-1.0)


def test_the_study_tables_agree_with_each_other(moe):
    model, batches = moe
    res = moe_study.moe_curvature_study(model, batches, num_probes=8, k=1, tol=1e-6, fd_eps=(None, 3.0),
                                        num_vectors=1, progress=False)
    kinds, layers = res["traces_by_kind"].set_index("kind"), res["traces_by_layer"]
    # Per-layer traces are the same samples split further: they add up to the per-kind ones.
    np.testing.assert_allclose(layers.groupby("kind")["trace"].sum().reindex(kinds.index), kinds["trace"], rtol=1e-12)
    assert res["trace_samples"].shape[0] == 8
    shares = res["expert_load"].groupby("layer")["share"].sum()
    np.testing.assert_allclose(shares, 1.0)
    assert set(res["eigenvalues"]["kind"]) == set(kinds.index)


def test_conclusions_quote_the_tables():
    kinds = pd.DataFrame({"kind": ["router", "routed experts"], "layer": [None, None], "parameters": [10, 100],
                          "trace": [1.0, 2.0], "trace_stderr": [0.1, 0.1], "mean_diagonal": [0.1, 0.02]})
    eig = pd.DataFrame({"kind": ["router", "routed experts"], "rank": [1, 1], "eigenvalue": [3.25, 1.5]})
    flips = pd.DataFrame({"fd_eps": ["adaptive", "0.001", "0.01", "0.01"], "flips": [0, 0, 2, 4],
                          "relative_error": [1e-10, 1e-6, 0.3, 0.1]})
    text = moe_study.moe_conclusions({"traces_by_kind": kinds, "eigenvalues": eig, "fd_flips": flips})
    assert "the router block has the largest mean diagonal entry" in text
    assert "router 1.00e-01, routed experts 2.00e-02" in text
    assert "router 3.25, routed experts 1.5" in text
    assert "flipped 0 routing decisions over 1 products (largest relative error 1.0e-10)" in text
    assert "step of 0.01 flips 3 decisions per product on average, and the error jumps to 3.0e-01" in text
