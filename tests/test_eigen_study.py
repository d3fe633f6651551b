"""hess_utils.harness.eigen_study (notebook 10) against dense float64 Hessians of tiny models (tests/tiny.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hess_utils.harness import eigen_study as es
from tests.tiny import _float64_everywhere, _num_predicted, _summed_nll, dense_hessian, tiny_batches, tiny_model


def _flat_gradient(model, batches, names):
    """Float64 gradient of the token-mean loss written out here (tests/tiny.py's loss), flat in ``names`` order."""
    named = dict(model.named_parameters())
    with _float64_everywhere(model):  # rotary embeddings would otherwise run in float32
        total = sum(_summed_nll(model(input_ids=b["input_ids"], use_cache=False).logits, b) for b in batches)
        grads = torch.autograd.grad(total / _num_predicted(batches), [named[n] for n in names])
    return torch.cat([g.reshape(-1) for g in grads]).double().numpy()


def _slices(model):
    """``name -> slice`` of each parameter in the flat (named_parameters) order."""
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(offset, offset + p.numel())
        offset += p.numel()
    return out


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    batches = tiny_batches(num_batches=2, batch_size=2, seq_len=6, seed=0)
    H = dense_hessian(model, batches).numpy()
    values, vectors = np.linalg.eigh(H)
    tables, record = es.eigen_analysis(model, batches, k=3, tol=1e-9, seed=0)
    return model, batches, values, vectors, tables, record


def test_eigenpairs_match_the_dense_spectrum(llama):
    model, _, values, _, tables, record = llama
    table = tables["eigenpairs"]
    assert list(table["rank"]) == [1, 2, 3]
    np.testing.assert_allclose(table["eigenvalue"], values[::-1][:3], rtol=1e-8)
    assert table["converged"].all() and (table["relative_residual"] <= 1e-9).all()
    assert record["dim"] == sum(p.numel() for p in model.parameters())
    assert record["num_products"] > 0 and record["seconds_per_product"] > 0


def test_module_and_head_mass_match_the_dense_eigenvectors(llama):
    model, _, values, vectors, tables, _ = llama
    assert np.min(np.diff(values[::-1][:4]) * -1) > 1e-6 * abs(values).max()  # separated: vectors are defined
    where = _slices(model)
    mass = tables["mass_module"]
    for rank in (1, 2, 3):
        u = vectors[:, -rank]
        rows = mass[mass["rank"] == rank].set_index("group")["mass"]
        np.testing.assert_allclose(rows.sum(), 1.0, rtol=1e-12)
        attention = sum(float((u[s] ** 2).sum()) for n, s in where.items() if ".self_attn." in n)
        mlp = sum(float((u[s] ** 2).sum()) for n, s in where.items() if ".mlp." in n)
        embedding = float((u[where["model.embed_tokens.weight"]] ** 2).sum())
        head = float((u[where["lm_head.weight"]] ** 2).sum())
        np.testing.assert_allclose(rows["layer.0.attention"], attention, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(rows["layer.0.mlp"], mlp, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(rows["embedding"], embedding, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(rows["head"], head, rtol=1e-6, atol=1e-12)
    # Per head (2 query heads of size 4, 1 key/value head): rows of q/k/v_proj, columns of o_proj.
    u = vectors[:, -1]
    d = model.config.hidden_size // model.config.num_attention_heads
    q = u[where["model.layers.0.self_attn.q_proj.weight"]].reshape(-1, model.config.hidden_size)
    o = u[where["model.layers.0.self_attn.o_proj.weight"]].reshape(model.config.hidden_size, -1)
    k = u[where["model.layers.0.self_attn.k_proj.weight"]]
    grid = es.head_mass_grid(tables["mass_head"], rank=1)
    assert list(grid.columns) == ["q0", "q1", "k0", "v0", "o0", "o1"]
    for h in range(2):
        np.testing.assert_allclose(grid.loc[0, f"q{h}"], (q[h * d:(h + 1) * d] ** 2).sum(), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(grid.loc[0, f"o{h}"], (o[:, h * d:(h + 1) * d] ** 2).sum(), rtol=1e-6,
                                   atol=1e-12)
    np.testing.assert_allclose(grid.loc[0, "k0"], (k ** 2).sum(), rtol=1e-6, atol=1e-12)


def test_gradient_overlap_matches_the_dense_projection(llama):
    model, batches, _, vectors, tables, _ = llama
    g = _flat_gradient(model, batches, list(dict(model.named_parameters())))
    cos2 = (vectors[:, ::-1][:, :3].T @ g) ** 2 / (g @ g)
    overlap = tables["overlap"]
    np.testing.assert_allclose(overlap["cos2"], cos2, rtol=1e-6, atol=1e-8)  # shares of 1: absolute
    np.testing.assert_allclose(overlap["cumulative"], np.cumsum(cos2), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(overlap["gradient_norm"], np.linalg.norm(g), rtol=1e-10)


def test_eigenpair_table_orders_by_which():
    from hess_utils import as_operator, eigsh

    op = as_operator(torch.diag(torch.tensor([3.0, -5.0, 1.0, 2.0, 0.5, -1.0], dtype=torch.float64)))
    table = es.eigenpair_table(eigsh(op, k=2, which="LM", tol=1e-10, progress=False))
    np.testing.assert_allclose(table["eigenvalue"], [-5.0, 3.0])


# ---------------------------------------------------------------------------------------------- sharpness
def test_checkpoints_adam_state_and_sharpness_match_a_manual_adamw(tmp_path):
    lr, betas, steps = 1e-2, (0.9, 0.95), 3
    batches = tiny_batches(num_batches=2, batch_size=2, seq_len=6, seed=1)
    model = tiny_model("gpt2")
    manual = tiny_model("gpt2")
    checkpoints, history = es.train_with_checkpoints(model, batches, steps=steps, lr=lr, save_every=2,
                                                     folder=tmp_path, betas=betas)
    assert list(checkpoints["step"]) == [0, 2, 3] and np.isnan(checkpoints["train_loss"][0])
    np.testing.assert_allclose(checkpoints["train_loss"][1:], history.train_loss[[1, 2]])

    # The same AdamW steps by hand, with the loss of tests/tiny.py.
    params = dict(manual.named_parameters())
    opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=betas, weight_decay=0.0)
    for t in range(steps):
        before = {n: p.detach().clone() for n, p in params.items()}
        b = batches[t % len(batches)]
        loss = _summed_nll(manual(input_ids=b["input_ids"], use_cache=False).logits, b) / _num_predicted([b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    saved = torch.load(checkpoints["path"].iloc[-1], weights_only=True)
    v = {n: opt.state[p]["exp_avg_sq"] for n, p in params.items()}
    for n in params:
        torch.testing.assert_close(saved["exp_avg_sq"][n], v[n], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(saved["state_dict"][n], params[n].detach(), rtol=1e-9, atol=1e-12)
    # AdamW's last step is -lr P^-1 m (m the first moment before bias correction): the preconditioner's formula.
    P = es.adam_preconditioner(v, steps, betas)
    for n, p in params.items():
        torch.testing.assert_close(p.detach() - before[n], -lr * opt.state[p]["exp_avg"] / P[n], rtol=1e-7,
                                   atol=1e-13)

    table = es.sharpness_at_checkpoints(model, checkpoints, batches, lr=lr, betas=betas, tol=1e-9)
    names = list(params)
    for row, path in zip(table.itertuples(), checkpoints["path"], strict=True):
        state = torch.load(path, weights_only=True)
        manual.load_state_dict(state["state_dict"])
        H = dense_hessian(manual, batches).numpy()
        np.testing.assert_allclose(row.sharpness, np.linalg.eigvalsh(H)[-1], rtol=1e-7)
        assert row.converged
        if row.step == 0:
            assert np.isnan(row.preconditioned_sharpness)
            continue
        d = torch.cat([es.adam_preconditioner(state["exp_avg_sq"], row.step, betas)[n].reshape(-1)
                       for n in names]).double().numpy()
        scaled = H / np.sqrt(np.outer(d, d))
        np.testing.assert_allclose(row.preconditioned_sharpness, np.linalg.eigvalsh(scaled)[-1], rtol=1e-7)
        assert row.preconditioned_converged
    assert (table["gd_threshold"] == 2 / lr).all()
    np.testing.assert_allclose(table["adam_threshold"], 38 / lr)


# ---------------------------------------------------------------------------------------------- influence
def test_influence_table_matches_an_independent_dense_solve():
    model = tiny_model("gpt2").float()  # float32 model: influence_table works on a float64 copy
    train = tiny_batches(num_batches=2, batch_size=2, seq_len=6, seed=2)
    test = tiny_batches(num_batches=1, batch_size=1, seq_len=6, seed=3)[0]
    params = ["transformer.h.0.ln_1.*", "transformer.h.0.attn.c_proj.bias"]
    damping = 0.05
    table, record = es.influence_table(model, train, test, params, damping=damping)
    names = ["transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_proj.bias"]
    assert record["params"] == names and record["subset_size"] == 24 and record["dtype"] == "torch.float64"
    ref = model.double()
    H = dense_hessian(ref, train, names).detach().numpy()
    np.testing.assert_allclose([record["lambda_min"], record["lambda_max"]], np.linalg.eigvalsh(H)[[0, -1]],
                               rtol=1e-8, atol=1e-12)
    s = np.linalg.solve(H + damping * np.eye(len(H)), _flat_gradient(ref, [test], names))
    sequences = [{"input_ids": b["input_ids"][i:i + 1]} for b in train for i in range(2)]
    expected = [-s @ _flat_gradient(ref, [seq], names) for seq in sequences]
    assert len(table) == 4
    np.testing.assert_allclose(table["dense"], expected, rtol=1e-8)
    np.testing.assert_allclose(table["influence"], expected, rtol=1e-7)
    assert (table["rel_diff"] < 1e-7).all()
    assert record["method"] == ("cg" if record["lambda_min"] + damping > 0 else "minres")


def test_preconditioned_operator_refuses_a_non_positive_diagonal():
    from hess_utils import as_operator

    op = as_operator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        es.PreconditionedOperator(op, [torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)])
    pre = es.PreconditionedOperator(op, [torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)])
    np.testing.assert_allclose(pre.to_dense().diagonal().numpy(), [1.0, 0.25, 0.5])
    assert isinstance(es.stability_thresholds(0.1, 0.9), dict) and pd.isna(np.nan)


def test_summary_and_plots_read_the_tables(llama, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, values, _, tables, record = llama
    sharp = pd.DataFrame({"step": [0, 5], "sharpness": [1.5, 2.5], "preconditioned_sharpness": [np.nan, 300.0],
                          "gd_threshold": [200.0, 200.0], "adam_threshold": [3800.0, 3800.0]})
    infl = pd.DataFrame({"rel_diff": [1e-12, 3e-11]})
    text = es.summary_markdown({"tiny": (tables, record)}, 1e-9, sharp, infl, lr=0.01)
    assert f"top eigenvalue {values[-1]:.4g}" in text and "3/3 pairs converged" in text
    assert f"{tables['overlap']['cumulative'].iloc[-1]:.1%} of the gradient" in text
    assert "from 1.5 to 2.5" in text and "2/η = 200" in text and "= 3800" in text and "3.0e-11" in text
    fig, axes = plt.subplots(1, 6)
    es.plot_module_mass(tables["mass_module"], axes[:3])
    es.plot_grid(es.head_mass_grid(tables["mass_head"]), axes[3], "heads")
    es.plot_sharpness(sharp, axes[4:])
    assert axes[0].get_title().startswith("v1: λ = ") and axes[4].get_yscale() == "log"
    plt.close(fig)
