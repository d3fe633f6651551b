"""Where eigenvectors live: masses against hand-built assignments and HF's own head layout, overlaps against numpy.

The references share nothing with :mod:`hess_utils.algorithms.directions`: kinds come from tables written
out per family below, head membership from autograd through the model's own attention code (a capture
attention function records the per-head query/key/value tensors HF builds), and gradient overlaps from
``numpy.linalg.eigh`` of :func:`tests.tiny.dense_hessian`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

from hess_utils import vectors as V
from hess_utils.algorithms.directions import (
    gradient_overlap,
    mass_by_group,
    mass_by_tensor,
    parse_parameter_name,
    plot_mass_heatmap,
)
from hess_utils.algorithms.eigsh import eigsh
from hess_utils.operators.hessian import hessian_operator
from tests.tiny import dense_hessian, tiny_batches, tiny_config, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: the tensors are tiny, and OpenMP spins on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _two_layer_model(family: str) -> torch.nn.Module:
    """The tiny model of ``family`` with two blocks, so layer indices are tested beyond 0."""
    cfg = tiny_config(family)
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(torch.float64).eval()


def _op(model: torch.nn.Module, params=None):
    return hessian_operator(model, tiny_batches(num_batches=1), params=params, method="rev-rev")


# ---------------------------------------------------------------------------------------------- kinds by hand
# (layer, kind) of every parameter, written out: block parameters by their name inside the block.
_BLOCK_KINDS = {
    "gpt2": ("transformer.h.{}.", {
        "ln_1.weight": "norm", "ln_1.bias": "norm", "attn.c_attn.weight": "attention",
        "attn.c_attn.bias": "attention", "attn.c_proj.weight": "attention", "attn.c_proj.bias": "attention",
        "ln_2.weight": "norm", "ln_2.bias": "norm", "mlp.c_fc.weight": "mlp", "mlp.c_fc.bias": "mlp",
        "mlp.c_proj.weight": "mlp", "mlp.c_proj.bias": "mlp"}),
    "gpt_neox": ("gpt_neox.layers.{}.", {
        "input_layernorm.weight": "norm", "input_layernorm.bias": "norm", "post_attention_layernorm.weight": "norm",
        "post_attention_layernorm.bias": "norm", "attention.query_key_value.weight": "attention",
        "attention.query_key_value.bias": "attention", "attention.dense.weight": "attention",
        "attention.dense.bias": "attention", "mlp.dense_h_to_4h.weight": "mlp", "mlp.dense_h_to_4h.bias": "mlp",
        "mlp.dense_4h_to_h.weight": "mlp", "mlp.dense_4h_to_h.bias": "mlp"}),
    "llama": ("model.layers.{}.", {
        "self_attn.q_proj.weight": "attention", "self_attn.k_proj.weight": "attention",
        "self_attn.v_proj.weight": "attention", "self_attn.o_proj.weight": "attention",
        "mlp.gate_proj.weight": "mlp", "mlp.up_proj.weight": "mlp", "mlp.down_proj.weight": "mlp",
        "input_layernorm.weight": "norm", "post_attention_layernorm.weight": "norm"}),
    "opt": ("model.decoder.layers.{}.", {
        **{f"self_attn.{p}_proj.{a}": "attention" for p in ("q", "k", "v", "out") for a in ("weight", "bias")},
        "self_attn_layer_norm.weight": "norm", "self_attn_layer_norm.bias": "norm", "fc1.weight": "mlp",
        "fc1.bias": "mlp", "fc2.weight": "mlp", "fc2.bias": "mlp", "final_layer_norm.weight": "norm",
        "final_layer_norm.bias": "norm"}),
}
_OUTSIDE_KINDS = {
    "gpt2": {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "embedding",
             "transformer.ln_f.weight": "norm", "transformer.ln_f.bias": "norm"},
    "gpt_neox": {"gpt_neox.embed_in.weight": "embedding", "gpt_neox.final_layer_norm.weight": "norm",
                 "gpt_neox.final_layer_norm.bias": "norm", "embed_out.weight": "head"},
    "llama": {"model.embed_tokens.weight": "embedding", "model.norm.weight": "norm", "lm_head.weight": "head"},
    "opt": {"model.decoder.embed_tokens.weight": "embedding", "model.decoder.embed_positions.weight": "embedding",
            "model.decoder.final_layer_norm.weight": "norm", "model.decoder.final_layer_norm.bias": "norm"},
}
HAND_FAMILIES = tuple(_BLOCK_KINDS)


def _hand_assignment(family: str, names: list[str]) -> dict[str, tuple[int | None, str]]:
    prefix, inside = _BLOCK_KINDS[family]
    table = {prefix.format(layer) + n: (layer, kind) for layer in (0, 1) for n, kind in inside.items()}
    outside = dict(_OUTSIDE_KINDS[family])
    if family == "gpt_neox" and "lm_head.weight" in names:  # the output head's name changed across versions
        outside["lm_head.weight"] = outside.pop("embed_out.weight")
    table.update({n: (None, kind) for n, kind in outside.items()})
    assert set(names) == set(table), sorted(set(names) ^ set(table))
    return table


@pytest.mark.parametrize("family", HAND_FAMILIES)
def test_module_and_layer_masses_match_a_hand_built_assignment(family):
    model = _two_layer_model(family)
    op = _op(model)
    table = _hand_assignment(family, op.param_names)
    v = op.random_vector("gaussian", seed=3)
    squares = {n: float(np.sum(b.numpy() ** 2)) for n, b in zip(op.param_names, v, strict=True)}
    total = sum(squares.values())

    expected_module: dict[tuple, float] = {}
    for n, key in table.items():
        expected_module[key] = expected_module.get(key, 0.0) + squares[n] / total
    frame = mass_by_group(op, v, by="module")
    got = {(None if pd.isna(lay) else int(lay), kind): m
           for lay, kind, m in zip(frame["layer"], frame["kind"], frame["mass"], strict=True)}
    assert got.keys() == expected_module.keys()
    for key, mass in expected_module.items():
        assert got[key] == pytest.approx(mass, rel=1e-12, abs=1e-15), key
    assert frame["mass"].sum() == pytest.approx(1.0, abs=1e-14)
    numel = {(None if pd.isna(lay) else int(lay), kind): n
             for lay, kind, n in zip(frame["layer"], frame["kind"], frame["numel"], strict=True)}
    for key in expected_module:
        assert numel[key] == sum(dict(model.named_parameters())[n].numel() for n, k in table.items() if k == key)

    by_layer = mass_by_group(op, v, by="layer")
    for layer in (0, 1):
        row = by_layer[by_layer["layer"] == layer]
        assert len(row) == 1
        want = sum(squares[n] for n, (lay, _) in table.items() if lay == layer) / total
        assert float(row["mass"].iloc[0]) == pytest.approx(want, rel=1e-12)
    # Outside the blocks, rows are kept apart by kind (embedding first, then the rest).
    outside = by_layer[by_layer["layer"].isna()]
    assert outside["group"].iloc[0] == "embedding"
    assert set(outside["group"]) == {k for lay, k in table.values() if lay is None}


@pytest.mark.parametrize("family", HAND_FAMILIES)
def test_an_indicator_of_one_layers_mlp_has_all_its_mass_there(family):
    model = _two_layer_model(family)
    op = _op(model)
    table = _hand_assignment(family, op.param_names)
    v = [torch.ones_like(b) if table[n] == (1, "mlp") else torch.zeros_like(b)
         for n, b in zip(op.param_names, op.zeros(), strict=True)]
    for by in ("module", "head"):
        frame = mass_by_group(op, v, by=by, config=model.config)
        hit = (frame["layer"] == 1).fillna(False) & (frame["kind"] == "mlp")
        assert frame.loc[hit, "mass"].tolist() == [1.0]
        assert (frame.loc[~hit, "mass"] == 0).all()
    # A one-hot: one entry of layer 0's first MLP tensor.
    first = next(i for i, n in enumerate(op.param_names) if table[n] == (0, "mlp"))
    e = op.basis_vector(sum(s.numel() for s in op.shapes[:first]) + 5)
    frame = mass_by_group(op, e, by="module")
    assert frame.set_index("group").loc["layer.0.mlp", "mass"] == 1.0


def test_parse_parameter_name_on_the_documented_examples():
    cases = {
        "model.layers.3.self_attn.q_proj.weight": (3, "attention", "q_proj", "weight"),
        "transformer.h.0.attn.c_attn.weight": (0, "attention", "c_attn", "weight"),
        "gpt_neox.layers.0.attention.query_key_value.weight": (0, "attention", "query_key_value", "weight"),
        "model.decoder.layers.11.fc2.bias": (11, "mlp", "fc2", "bias"),
        "model.layers.2.self_attn.q_norm.weight": (2, "norm", "q_norm", "weight"),
        "transformer.word_embeddings_layernorm.bias": (None, "norm", "word_embeddings_layernorm", "bias"),
        "transformer.wte.weight": (None, "embedding", "wte", "weight"),
        "lm_head.weight": (None, "head", "lm_head", "weight"),
        "transformer.ln_f.weight": (None, "norm", "ln_f", "weight"),
    }
    for name, want in cases.items():
        p = parse_parameter_name(name)
        assert (p.layer, p.kind, p.module, p.attribute) == want, name


# ---------------------------------------------------------------------------------------------- heads via HF's own code
_CAPTURED: dict[str, object] = {}
_CAPTURE_NAME = "hess_utils_test_capture"


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that records HF's per-head tensors (B, heads, T, d) and can keep one head's output only."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _CAPTURED.update(q=query, k=key, v=value)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # (B, T, H, d)
    keep = _CAPTURED.get("keep_head")
    if keep is not None:
        mask = torch.zeros(out.shape[2], dtype=out.dtype)
        mask[keep] = 1.0
        out = out * mask[:, None]
    return out, weights


# The attention module of block 0, by family (its parameters are the projections: none of these has QK norms).
_ATTENTION_PREFIX = {"gpt2": "transformer.h.0.attn.", "gpt_neox": "gpt_neox.layers.0.attention.",
                     "llama": "model.layers.0.self_attn.", "opt": "model.decoder.layers.0.self_attn.",
                     "qwen2": "model.layers.0.self_attn."}


def _nonzero_gradient(model, names, objective) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    objective().backward()
    params = dict(model.named_parameters())
    return {n: (params[n].grad != 0) if params[n].grad is not None else torch.zeros_like(params[n], dtype=torch.bool)
            for n in names}


@pytest.mark.parametrize("family", list(_ATTENTION_PREFIX))
def test_head_masses_follow_the_models_own_head_layout(family):
    """Entries that move head h's query (key, value; output) by autograd through HF's forward: mass 1 there."""
    from transformers import AttentionInterface

    AttentionInterface.register(_CAPTURE_NAME, _capture_attention)
    model = tiny_model(family)
    model.config._attn_implementation = _CAPTURE_NAME
    ids = tiny_batches(num_batches=1)[0]["input_ids"]
    op = _op(model)
    prefix = _ATTENTION_PREFIX[family]
    inside = [n for n in op.param_names if n.startswith(prefix)]
    gen = torch.Generator().manual_seed(0)
    try:
        model(input_ids=ids)
        num = {p: _CAPTURED[p].shape[1] for p in "qkv"}
        weights = {p: torch.randn(_CAPTURED[p].shape, generator=gen, dtype=torch.float64) for p in "qkv"}
        logits_weight = torch.randn(model(input_ids=ids).logits.shape, generator=gen, dtype=torch.float64)

        def one_head(part, h):
            def objective():
                model(input_ids=ids)
                return (_CAPTURED[part][:, h] * weights[part][:, h]).sum()
            return objective

        indicators = {(p, h): _nonzero_gradient(model, inside, one_head(p, h)) for p in "qkv" for h in range(num[p])}
        qkv_union = {n: torch.stack([ind[n] for ind in indicators.values()]).any(0) for n in inside}
        for h in range(num["q"]):
            _CAPTURED["keep_head"] = h
            through = _nonzero_gradient(model, inside, lambda: (model(input_ids=ids).logits * logits_weight).sum())
            # The output projection's entries reading head h: moved now, not a q/k/v entry, not a bias.
            indicators[("o", h)] = {n: through[n] & ~qkv_union[n] if dict(model.named_parameters())[n].ndim == 2
                                    else torch.zeros_like(through[n]) for n in inside}
        _CAPTURED["keep_head"] = None
    finally:
        _CAPTURED.clear()
        model.config._attn_implementation = "eager"

    kv_heads = model.config.num_key_value_heads if family in ("llama", "qwen2") else num["q"]
    assert num["k"] == num["v"] == kv_heads
    for (part, h), ind in indicators.items():
        count = sum(int(ind[n].sum()) for n in inside)
        assert count > 0, (part, h)
        v = [ind[n].to(torch.float64) if n in ind else torch.zeros(s, dtype=torch.float64)
             for n, s in zip(op.param_names, op.shapes, strict=True)]
        frame = mass_by_group(op, v, by="head", config=model.config)
        hit = (frame["part"] == part) & (frame["head"] == h).fillna(False) & (frame["layer"] == 0).fillna(False)
        assert frame.loc[hit, "mass"].tolist() == [1.0], (part, h, frame)
        assert (frame.loc[~hit, "mass"] == 0).all(), (part, h)
        assert int(frame.loc[hit, "numel"].iloc[0]) == count, (part, h)  # every entry of that head, no other


def test_head_mode_sums_to_one_and_refines_the_module_rows():
    model = tiny_model("llama")
    op = _op(model)
    v = op.random_vector("gaussian", seed=1)
    heads = mass_by_group(op, v, by="head", config=model.config)
    modules = mass_by_group(op, v, by="module")
    assert heads["mass"].sum() == pytest.approx(1.0, abs=1e-14)
    attention = heads[heads["kind"] == "attention"]
    assert set(zip(attention["part"], attention["head"])) == {("q", 0), ("q", 1), ("k", 0), ("v", 0), ("o", 0),
                                                              ("o", 1)}
    want = float(modules.loc[modules["group"] == "layer.0.attention", "mass"].iloc[0])
    assert attention["mass"].sum() == pytest.approx(want, rel=1e-12)
    # A model passed instead of its config works the same.
    pd.testing.assert_frame_equal(heads, mass_by_group(op, v, by="head", config=model))


@pytest.mark.parametrize("family,param", [
    ("falcon", "transformer.h.0.self_attention.query_key_value.weight"),
    ("phi3", "model.layers.0.self_attn.qkv_proj.weight"),
    ("gpt_bigcode", "transformer.h.0.attn.c_attn.weight"),
    ("codegen", "transformer.h.0.attn.qkv_proj.weight"),
])
def test_unsupported_head_layouts_are_refused_by_name(family, param):
    model = tiny_model(family)
    op = _op(model)
    v = op.random_vector()
    with pytest.raises(ValueError, match=param.replace(".", r"\.")):
        mass_by_group(op, v, by="head", config=model.config)
    assert mass_by_group(op, v, by="module")["mass"].sum() == pytest.approx(1.0)  # other modes still work


def test_bad_head_configs_and_arguments_are_clear_errors():
    model = tiny_model("llama")
    op = _op(model)
    v = op.random_vector()
    with pytest.raises(ValueError, match="needs the model config"):
        mass_by_group(op, v, by="head")
    wrong = {"model_type": "llama", "num_attention_heads": 2, "head_dim": 3, "num_key_value_heads": 1}
    with pytest.raises(ValueError, match=r"q_proj\.weight.*does not fit"):
        mass_by_group(op, v, by="head", config=wrong)
    with pytest.raises(ValueError, match="by must be one of"):
        mass_by_group(op, v, by="tensor")
    with pytest.raises(ValueError, match="nonzero"):
        mass_by_tensor(op, op.zeros())
    with pytest.raises(ValueError, match="shape"):
        mass_by_tensor(op, [torch.zeros(3)] + v[1:])


def test_mass_by_tensor_is_float64_for_any_block_dtype_and_reads_dicts():
    model = tiny_model("gpt2")
    op = _op(model)
    v = [b.to(torch.bfloat16) for b in op.random_vector("gaussian", seed=2)]
    squares = np.array([np.sum(b.to(torch.float64).numpy() ** 2) for b in v])
    frame = mass_by_tensor(op, v)
    assert list(frame.columns) == ["param_name", "numel", "mass"]
    assert frame["param_name"].tolist() == op.param_names
    np.testing.assert_allclose(frame["mass"], squares / squares.sum(), rtol=1e-13)
    assert frame["numel"].tolist() == [b.numel() for b in v]
    as_dict = dict(zip(reversed(op.param_names), reversed(v), strict=True))  # order of a dict does not matter
    pd.testing.assert_frame_equal(frame, mass_by_tensor(op, as_dict))


# ---------------------------------------------------------------------------------------------- gradient overlap
@pytest.fixture(scope="module")
def dense_case():
    """GPT-2's attention block: operator, dense float64 Hessian (numpy eigh) and gradient (dim 288)."""
    model = tiny_model("gpt2")
    batches = tiny_batches(num_batches=2)
    op = hessian_operator(model, batches, params="transformer.h.0.attn.*", method="rev-rev")
    H = dense_hessian(model, batches, names=op.param_names).detach().numpy()
    values, vectors = np.linalg.eigh(H)
    g = op.gradient()
    return op, values, vectors, g, V.flatten(g).numpy()


def _numpy_overlap(U: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos^2 with each column of ``U`` and ``||P_j g||^2 / ||g||^2`` by numpy QR of the leading columns."""
    cos2 = (U.T @ g) ** 2 / (np.sum(U**2, 0) * (g @ g))
    cumulative = []
    for j in range(1, U.shape[1] + 1):
        Q, R = np.linalg.qr(U[:, :j])
        independent = np.abs(np.diag(R)) > 1e-8 * np.abs(R).max()
        Q = Q[:, independent]
        cumulative.append(float(np.sum((Q.T @ g) ** 2) / (g @ g)))
    return cos2, np.array(cumulative)


def _as_vector(column: np.ndarray, op) -> list[torch.Tensor]:
    return V.unflatten(torch.from_numpy(np.ascontiguousarray(column)), op.zeros())


def test_gradient_overlap_of_exact_eigenvectors_matches_numpy(dense_case):
    op, values, vectors, g, g_np = dense_case
    top = vectors[:, ::-1][:, :6]  # descending
    frame = gradient_overlap([_as_vector(top[:, i], op) for i in range(6)], g)
    share = (top.T @ g_np) ** 2 / (g_np @ g_np)
    np.testing.assert_allclose(frame["cos2"], share, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(frame["cumulative"], np.cumsum(share), rtol=1e-10, atol=1e-15)
    assert frame["rank"].tolist() == list(range(1, 7)) and frame["eigenvalue"].isna().all()
    assert frame.attrs["gradient_norm"] == pytest.approx(np.linalg.norm(g_np), rel=1e-14)
    # All eigenvectors together hold the whole gradient.
    full = gradient_overlap([_as_vector(vectors[:, i], op) for i in range(vectors.shape[1])], g)
    assert full["cumulative"].iloc[-1] == pytest.approx(1.0, abs=1e-10)


def test_gradient_overlap_of_eigsh_pairs_ranks_them_and_matches_numpy(dense_case):
    op, values, vectors, g, g_np = dense_case
    k = 4
    gaps = -np.diff(values[::-1][: k + 1])  # gaps of the top k + 1, descending
    result = eigsh(op, k=k, which="LA", tol=1e-10, seed=0, progress=False)
    frame = gradient_overlap(result, g)
    np.testing.assert_allclose(frame["eigenvalue"], values[::-1][:k], rtol=1e-9)
    assert frame["index"].tolist() == [3, 2, 1, 0]  # eigsh's ascending order, ranked largest first
    # Eigenvector angles are about residual / gap; cos^2 moves by about twice that.
    angle = float(result.residuals.max() / gaps.min())
    top = vectors[:, ::-1][:, :k]
    share = (top.T @ g_np) ** 2 / (g_np @ g_np)
    np.testing.assert_allclose(frame["cos2"], share, atol=10 * angle + 1e-12)
    np.testing.assert_allclose(frame["cumulative"], np.cumsum(share), atol=10 * angle + 1e-12)
    assert angle < 1e-6


def test_gradient_overlap_orthonormalises_mixed_and_dependent_vectors(dense_case):
    op, values, vectors, g, g_np = dense_case
    top = vectors[:, ::-1][:, :4]
    rng = np.random.default_rng(5)
    mix = np.triu(rng.normal(size=(4, 4))) + 3 * np.eye(4)  # upper triangular: leading spans stay the same
    W = top @ mix * np.array([1e-3, 5.0, 1.0, 200.0])  # and arbitrary scales
    W = np.column_stack([W, W[:, 0] - 2 * W[:, 1]])  # a fifth vector in the span of the first two
    frame = gradient_overlap([_as_vector(W[:, i], op) for i in range(W.shape[1])], g)
    cos2, cumulative = _numpy_overlap(W, g_np)
    exact = np.cumsum((top.T @ g_np) ** 2) / (g_np @ g_np)
    np.testing.assert_allclose(frame["cos2"], cos2, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(frame["cumulative"], cumulative, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(frame["cumulative"].iloc[:4], exact, rtol=1e-9, atol=1e-14)
    assert abs(frame["share"].iloc[4]) < 1e-12  # the dependent vector adds nothing
    # Summing cos^2 instead would be wrong for these vectors: the test above can tell.
    assert np.abs(np.cumsum(cos2)[:4] - exact).max() > 1e-3
    # float32 blocks go through float64 sums too.
    frame32 = gradient_overlap([[b.float() for b in _as_vector(W[:, i], op)] for i in range(4)], g)
    np.testing.assert_allclose(frame32["cumulative"], exact, rtol=1e-5)


def test_gradient_overlap_refuses_zero_inputs(dense_case):
    op, _, vectors, g, _ = dense_case
    with pytest.raises(ValueError, match="gradient"):
        gradient_overlap([_as_vector(vectors[:, 0], op)], op.zeros())
    with pytest.raises(ValueError, match="vector 1 is zero"):
        gradient_overlap([_as_vector(vectors[:, 0], op), op.zeros()], g)


# ---------------------------------------------------------------------------------------------- plotting
def test_plot_mass_heatmap_draws_layers_by_kinds():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = _two_layer_model("gpt2")
    op = _op(model)
    frame = mass_by_group(op, op.random_vector("gaussian", seed=4), by="module")
    ax = plot_mass_heatmap(frame)
    try:
        grid = np.asarray(ax.images[0].get_array())
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "outside blocks"]
        kinds = [t.get_text() for t in ax.get_xticklabels()]
        assert kinds == ["embedding", "attention", "mlp", "norm"]
        for lay, kind, mass in zip(frame["layer"], frame["kind"], frame["mass"], strict=True):
            row = 2 if pd.isna(lay) else int(lay)
            assert grid[row, kinds.index(kind)] == pytest.approx(mass)
        assert grid.sum() == pytest.approx(1.0)
        with pytest.raises(ValueError, match="select one"):
            plot_mass_heatmap(pd.concat([frame.assign(eigenvector=0), frame.assign(eigenvector=1)]))
        with pytest.raises(ValueError, match="by='module'"):
            plot_mass_heatmap(mass_by_group(op, op.random_vector(), by="layer"))
    finally:
        plt.close("all")
