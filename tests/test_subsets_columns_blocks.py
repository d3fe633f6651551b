"""Exact subset Hessians, Hessian columns and block-diagonal errors against dense float64 Hessians."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hess_utils import vectors as V
from hess_utils.algorithms.blocks import BlockDiagonalOperator, block_diagonal_error, group_parameters
from hess_utils.algorithms.columns import hessian_column, random_indices, threshold_table
from hess_utils.algorithms.subsets import linear_weights, paper_subset, subset_hessian
from hess_utils.operators.base import SymmetricOperator
from hess_utils.operators.hessian import hessian_operator
from tests.tiny import dense_hessian, tiny_batches, tiny_model


def _offsets(model):
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = start
        start += p.numel()
    return out


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    batches = tiny_batches(num_batches=2, pad=True)
    return model, batches, dense_hessian(model, batches)


@pytest.mark.parametrize("kind", ["layer", "block", "kind", "all"])
def test_subset_hessian_equals_dense_block(llama, kind):
    model, batches, H = llama
    subset = paper_subset(model, kind, num_entries=7, layer="self_attn.q_proj")
    result = subset_hessian(hessian_operator(model, batches, params=list(subset)), subset, progress=False)
    offsets = _offsets(model)
    idx = torch.cat([offsets[n] + torch.arange(7) for n in subset])
    assert result.matrix.shape == (len(idx), len(idx))
    assert torch.allclose(result.matrix, H[idx][:, idx], rtol=0, atol=1e-12 * H.abs().max())


def test_paper_subsets_have_the_right_layers(llama):
    model = llama[0]
    kinds = {k for _, k, _ in linear_weights(model)}
    assert {"self_attn.q_proj", "mlp.down_proj"} <= kinds
    assert len(paper_subset(model, "layer", 3, layer="mlp.down_proj")) == 1
    assert len(paper_subset(model, "block", 3)) == len(kinds)
    assert len(paper_subset(model, "all", 3)) == len(linear_weights(model))
    with pytest.raises(ValueError, match="unknown layer kind"):
        paper_subset(model, "layer", 3, layer="nope")


def test_sum_mode_subset_hessians_of_single_sequences_add_up():
    model = tiny_model("gpt2")
    batch = tiny_batches(num_batches=1, batch_size=3)[0]
    subset = {"transformer.h.0.attn.c_attn.weight": 20, "transformer.ln_f.weight": slice(0, 8, 2)}
    whole = subset_hessian(hessian_operator(model, [batch], params=list(subset), reduction="sum"), subset,
                           progress=False).matrix
    singles = [{"input_ids": batch["input_ids"][i : i + 1]} for i in range(3)]
    parts = sum(subset_hessian(hessian_operator(model, [s], params=list(subset), reduction="sum"), subset,
                               progress=False).matrix for s in singles)
    assert torch.allclose(parts, whole, rtol=0, atol=1e-13 * whole.abs().max())


def test_subset_bad_input():
    model = tiny_model("gpt2")
    op = hessian_operator(model, tiny_batches(), params=["transformer.ln_f.weight"])
    with pytest.raises(ValueError, match="not parameters of the operator.*params=list"):
        subset_hessian(op, {"nope": 3})
    with pytest.raises(ValueError, match="not parameters of the operator"):
        subset_hessian(op, {"transformer.h.0.attn.c_attn.weight": 3})
    with pytest.raises(ValueError, match="empty subset"):
        subset_hessian(op, {})
    with pytest.raises(ValueError, match="first 100000"):
        subset_hessian(op, {"transformer.ln_f.weight": 100000})


def test_hessian_column_matches_dense(llama):
    model, batches, H = llama
    op = hessian_operator(model, batches)
    for index in random_indices(op, 3, seed=1) + [0, op.dim - 1]:
        col = hessian_column(op, index)
        assert np.allclose(col.values, H[:, index].numpy(), rtol=0, atol=1e-12 * float(H.abs().max()))
        assert col.diagonal == pytest.approx(float(H[index, index]), abs=1e-12 * float(H.abs().max()))
    table = threshold_table([hessian_column(op, 5)], thresholds=(1e-12, 1e-1, 1e3))
    assert list(table.columns[-3:]) == ["<1e-12", "<1e-01", "<1e+03"]
    assert table["<1e+03"].iloc[0] == 1.0
    exact = float(np.mean(np.abs(H[:, 5].numpy()) < 1e-1))
    assert table["<1e-01"].iloc[0] == pytest.approx(exact)


class TwoBlocks(SymmetricOperator):
    """A dense matrix seen as two parameter blocks of sizes 2 and 1."""

    def __init__(self, A):
        self.A = A
        self.param_names, self.shapes = ["a", "b"], [torch.Size([2]), torch.Size([1])]
        self.dtypes, self.devices = [A.dtype] * 2, [A.device] * 2

    def _matvec(self, v):
        out = self.A @ torch.cat(v)
        return [out[:2], out[2:]]


def test_block_diagonal_error_on_known_matrix():
    A = torch.tensor([[2.0, 1.0, 0.3], [1.0, 3.0, 0.5], [0.3, 0.5, 4.0]], dtype=torch.float64)
    op = TwoBlocks(A)
    Abd = A.clone()
    Abd[:2, 2] = 0
    Abd[2, :2] = 0
    err = block_diagonal_error(op, "tensor", num_vectors=4, seed=3)
    for k in range(4):
        x = V.flatten(op.random_vector("gaussian", seed=3 * 1_000_003 + k))
        expect = float(((A - Abd) @ x).norm() / (A @ x).norm())
        cos = float((A @ x) @ (Abd @ x) / ((A @ x).norm() * (Abd @ x).norm()))
        assert err.relative_errors[k] == pytest.approx(expect, rel=1e-12)
        assert err.cosines[k] == pytest.approx(cos, rel=1e-12)
    whole = block_diagonal_error(op, [["a", "b"]], num_vectors=2)
    assert np.allclose(whole.relative_errors, 0) and np.allclose(whole.cosines, 1)


def test_block_diagonal_on_model_matches_dense_blocks(llama):
    model, batches, H = llama
    op = hessian_operator(model, batches)
    bd = BlockDiagonalOperator(op, "layer")
    groups = group_parameters(op.param_names, "layer")
    sizes = [int(np.prod(s)) for s in op.shapes]
    starts = np.cumsum([0] + sizes)
    mask = torch.zeros_like(H, dtype=torch.bool)
    for g in groups:
        idx = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in g])
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = True
    Hbd = torch.where(mask, H, torch.zeros_like(H))
    v = op.random_vector("gaussian", 0)
    got = V.flatten(bd.matvec(v))
    assert float((got - Hbd @ V.flatten(v)).norm() / (Hbd @ V.flatten(v)).norm()) < 1e-10
    err = block_diagonal_error(op, "layer", num_vectors=2)
    vs = [V.flatten(op.random_vector("gaussian", k)) for k in range(2)]
    expect = [float(((H - Hbd) @ x).norm() / (H @ x).norm()) for x in vs]
    assert np.allclose(err.relative_errors, expect, rtol=1e-8)
    assert np.all(err.cosines <= 1 + 1e-12)
