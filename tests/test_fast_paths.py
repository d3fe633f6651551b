"""The performance paths give the same numbers as the plain ones (issue #6), in float64."""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pytest
import torch

from hess_utils import vectors as V
from hess_utils.algorithms import lanczos, slq
from hess_utils.operators import hessian as hessian_module
from hess_utils.operators.hessian import hessian_operator
from tests.tiny import dense_hessian, tiny_batches, tiny_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
@pytest.mark.parametrize("keep_graph", [False, True, "auto"])
def test_batched_products_match_one_by_one(family, keep_graph):
    """``matmat`` (one double backward for k vectors, is_grads_batched) equals k ``matvec`` calls."""
    model = tiny_model(family)
    batches = tiny_batches(pad=True)
    plain = hessian_operator(model, batches, method="rev-rev")
    fast = hessian_operator(model, batches, method="rev-rev", keep_graph=keep_graph)
    vs = [plain.random_vector("gaussian", s) for s in range(3)]
    for _ in range(2):  # the second round reuses kept graphs
        products = fast.matmat(vs)
        assert fast._batched_ok, "is_grads_batched fell back to the loop"
        for v, hv in zip(vs, products, strict=True):
            assert rel(V.flatten(hv), V.flatten(plain.matvec(v))) < 1e-10
    assert fast.num_matvecs == 6


def test_matmat_of_other_methods_and_generic_operators_loops():
    model = tiny_model("gpt2")
    batches = tiny_batches()
    H = dense_hessian(model, batches)
    op = hessian_operator(model, batches, method="fwd-rev")
    vs = [op.random_vector("gaussian", s) for s in range(2)]
    for v, hv in zip(vs, op.matmat(vs), strict=True):
        assert rel(V.flatten(hv), H @ V.flatten(v)) < 1e-10


def test_keep_graph_auto_keeps_and_falls_back_with_a_warning(monkeypatch):
    model = tiny_model("qwen2")
    batches = tiny_batches()
    plain = hessian_operator(model, batches, method="rev-rev")
    auto = hessian_operator(model, batches, method="rev-rev", keep_graph="auto")
    v = plain.random_vector("gaussian", 0)
    assert rel(V.flatten(auto.matvec(v)), V.flatten(plain.matvec(v))) < 1e-13
    assert len(auto._graphs) == len(batches) and auto.graph_bytes > 0 and auto.keep_graph_fallback is None

    short = hessian_operator(model, batches, method="rev-rev", keep_graph="auto")
    monkeypatch.setattr(hessian_module.V, "free_memory", lambda device: 0)
    with pytest.warns(UserWarning, match="no longer kept"):
        out = short.matvec(v)
    assert rel(V.flatten(out), V.flatten(plain.matvec(v))) < 1e-13
    assert not short._graphs and short.keep_graph is False and short.keep_graph_mode == "never"
    assert "MiB are free" in short.keep_graph_fallback  # the reason is kept on the operator, not only warned
    with pytest.raises(ValueError, match="keep_graph"):
        hessian_operator(model, batches, keep_graph="sometimes")


def test_default_keeps_the_graph_and_drops_it_after_an_optimizer_step():
    model = tiny_model("llama")
    batches = tiny_batches(pad=True)
    op = hessian_operator(model, batches, method="rev-rev")
    assert op.keep_graph_mode == "auto"
    v = op.random_vector("gaussian", 4)
    first = op.matvec(v)
    assert op._graphs  # kept
    with torch.no_grad():  # what an optimizer step does: in place, so the versions move
        for p in op.params:
            p.mul_(1.01)
    after = op.matvec(v)
    fresh = hessian_operator(model, batches, method="rev-rev", keep_graph=False).matvec(v)
    assert rel(V.flatten(after), V.flatten(fresh)) < 1e-12
    assert rel(V.flatten(after), V.flatten(first)) > 1e-4  # the step matters: stale graphs would show


def test_fd_in_place_path_matches_the_formula_and_restores_weights_bit_for_bit():
    model = tiny_model("gpt_neox")
    batches = tiny_batches(pad=True)
    op = hessian_operator(model, batches, method="fd")
    before = [p.detach().clone() for p in op.params]
    v = op.random_vector("gaussian", 3)
    hv = op.matvec(v)
    assert all(torch.equal(a, p) for a, p in zip(before, op.params, strict=True))
    # Reference: the same central difference written out, at the first step of the rule and at the step the
    # adaptive product ended with.
    h1 = op.fd_eps * sum(float((a.abs() * b.abs()).sum()) for a, b in zip(v, before, strict=True)) / V.norm(v) ** 2
    assert math.isclose(op.last_fd.steps[0], h1, rel_tol=1e-12)
    h = op.last_fd.steps[-1]
    with torch.no_grad():
        for p, w, vi in zip(op.params, before, v, strict=True):
            p.copy_(w + h * vi)
    g_plus = op.gradient()
    with torch.no_grad():
        for p, w, vi in zip(op.params, before, v, strict=True):
            p.copy_(w - h * vi)
    g_minus = op.gradient()
    with torch.no_grad():
        for p, w in zip(op.params, before, strict=True):
            p.copy_(w)
    ref = (V.flatten(g_plus) - V.flatten(g_minus)) / (2 * h)
    assert rel(V.flatten(hv), ref) < 1e-9
    assert abs(op.fd_step(v) - h1) <= 1e-12 * h1
    assert rel(V.flatten(op.matvec(v)), V.flatten(hv)) < 1e-14  # a second product is the same
    assert all(torch.equal(a, p) for a, p in zip(before, op.params, strict=True))
    # The weight copy's buffers are reused between products, never its contents: weights changed behind the
    # operator's back (through .data, no version bump) are the ones perturbed and restored next time.
    op.params[0].data.mul_(1.5)
    changed = [p.detach().clone() for p in op.params]
    expected = hessian_operator(model, batches, method="fd").matvec(v)
    assert all(torch.equal(a, p) for a, p in zip(changed, op.params, strict=True))
    assert rel(V.flatten(op.matvec(v)), V.flatten(expected)) < 1e-14
    assert all(torch.equal(a, p) for a, p in zip(changed, op.params, strict=True))
    assert rel(V.flatten(expected), V.flatten(hv)) > 1e-6  # the change matters


def test_slq_with_probes_together_equals_probes_one_after_the_other():
    model = tiny_model("gpt2")
    batches = tiny_batches()
    op = hessian_operator(model, batches, method="rev-rev", keep_graph=True)
    k = 12
    one = slq(op, k, 3, seed=5, progress=False, probes_at_once=1)
    together = slq(op, k, 3, seed=5, progress=False, probes_at_once=3)
    default = slq(op, k, 3, seed=5, progress=False)
    # On a CPU the batched double backward is slower per vector, so the operator does not batch: probes
    # advancing together take turns, each one's Lanczos step beside the next one's product ("auto": two at
    # a time), and every run is bit for bit the one it would be alone.
    from hess_utils.algorithms.slq import _group_size

    assert not op.batched_matmat and _group_size(op, k, 3, "full") == 2
    for res in (together, default):
        np.testing.assert_array_equal(res.alphas, one.alphas)
        np.testing.assert_array_equal(res.betas, one.betas)
        np.testing.assert_array_equal(res.ritz_values, one.ritz_values)
        np.testing.assert_array_equal(res.ritz_weights, one.ritz_weights)
    # And the same as a single Lanczos run from the same probe, with SLQ's default re-orthogonalisation
    # (semi-orthogonal: its loss below sqrt(eps), the Ritz values of a fully re-orthogonalised run).
    single = lanczos(op, k, reorth="partial", seed=5 * 1_000_003 + 1, progress=False)
    np.testing.assert_allclose(together.runs[1].ritz_values, single.ritz_values, rtol=1e-10, atol=1e-12)
    assert together.reorth == "partial" and together.runs[1].orthogonality_loss < 1.5e-8
    full = lanczos(op, k, reorth="full", seed=5 * 1_000_003 + 1, progress=False)
    np.testing.assert_allclose(together.runs[1].ritz_values, full.ritz_values, rtol=1e-10, atol=1e-12)


class _Timed:
    """A dense symmetric operator whose products take ``delay`` seconds, each recorded as (start, end)."""

    def __init__(self, n: int = 60, delay: float = 0.03) -> None:
        from hess_utils.operators import as_operator

        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.op = as_operator(a + a.T)
        self.delay, self.products = delay, []
        inner = self.op._matvec

        def slow(v):
            start = time.perf_counter()
            time.sleep(self.delay)
            out = inner(v)
            self.products.append((start, time.perf_counter()))
            return out

        self.op._matvec = slow


def test_probes_advanced_together_overlap_each_step_with_the_next_product(monkeypatch):
    """On a CPU operator that computes one product at a time, each run's Lanczos step runs in a side thread
    while the next run's product runs; the results stay bit for bit those of the probes one after the other."""
    import threading

    slq_module, lanczos_module = sys.modules["hess_utils.algorithms.slq"], sys.modules["hess_utils.algorithms.lanczos"]
    steps = []
    advance = lanczos_module.lanczos_advance

    def slow_advance(state, w):  # a step as long as a product, so that overlap (or its absence) is plain
        start = time.perf_counter()
        time.sleep(0.03)
        out = advance(state, w)
        steps.append((start, time.perf_counter(), threading.current_thread().name))
        return out

    monkeypatch.setattr(slq_module, "lanczos_advance", slow_advance)  # the interleaved path
    monkeypatch.setattr(lanczos_module, "lanczos_advance", slow_advance)  # lanczos_step, one run after the other

    def overlaps(timed):
        return sum(1 for a, b, _ in steps for c, d in timed.products if a < d - 0.005 and c < b - 0.005)

    alone = _Timed()
    one = slq(alone.op, 6, 2, seed=1, progress=False, probes_at_once=1)
    assert len(steps) == 12 and overlaps(alone) == 0  # one after the other: a step never runs beside a product
    steps.clear()
    paired = _Timed()
    default = slq(paired.op, 6, 2, seed=1, progress=False, probes_at_once="auto")  # two probes interleaved here
    assert len(steps) == 12
    assert overlaps(paired) >= 8  # all but the last step of each run overlap a product of the other
    assert {name.split("_")[0] for _, _, name in steps} == {"hess-side"}
    for name in ("alphas", "betas", "ritz_values", "ritz_weights"):
        np.testing.assert_array_equal(getattr(default, name), getattr(one, name))


def test_interleaved_runs_split_across_threads_are_bit_identical(monkeypatch):
    """The side thread splits a re-orthogonalisation among the caller's thread count, as the caller would."""
    lanczos_module, vectors_module = sys.modules["hess_utils.algorithms.lanczos"], sys.modules["hess_utils.vectors"]
    monkeypatch.setattr(lanczos_module, "_MIN_SPLIT_COLUMNS", 16)
    monkeypatch.setattr(vectors_module, "_MIN_SPLIT_ENTRIES", 16)
    monkeypatch.setattr(vectors_module, "_MIN_SPLIT_BLOCK", 16)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        from hess_utils.operators import as_operator

        a = torch.randn(400, 400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for dtype in (torch.float64, torch.float32):
            op = as_operator((a + a.T).to(dtype))
            one = slq(op, 30, 3, seed=2, progress=False, probes_at_once=1)
            together = slq(op, 30, 3, seed=2, progress=False, probes_at_once=3)
            for name in ("alphas", "betas", "ritz_values", "ritz_weights"):
                np.testing.assert_array_equal(getattr(together, name), getattr(one, name))
    finally:
        torch.set_num_threads(before)


def test_default_group_is_two_interleaved_probes_on_a_cpu_when_their_bases_fit(monkeypatch):
    slq_module = sys.modules["hess_utils.algorithms.slq"]
    op = _Timed().op
    assert not op.batched_matmat
    assert slq_module._group_size(op, 20, 4, "full") == 2
    assert slq_module._group_size(op, 20, 1, "full") == 1
    basis = 21 * 60 * 8  # bytes of one basis of 21 float64 rows
    monkeypatch.setattr(slq_module, "free_memory", lambda device: 3 * basis)  # half of it holds one basis
    assert slq_module._group_size(op, 20, 4, "full") == 1
    assert slq_module._group_size(op, 20, 4, "none") == 2  # no basis to hold
    op.batched_matmat = True  # batching changes rounding: asked for with an integer, never by default
    assert slq_module._group_size(op, 20, 4, "none") == 1


def test_reorthogonalisation_keeps_the_basis_orthogonal_on_a_hard_spectrum():
    """One CGS pass plus the DGKS second pass when needed: orthogonal to rounding on clustered values."""
    from hess_utils.operators import as_operator

    rng = np.random.default_rng(0)
    eigs = np.concatenate([np.linspace(0, 1e-6, 100), [1.0, 1.0 + 1e-9, 2.0]])
    q, _ = np.linalg.qr(rng.standard_normal((eigs.size, eigs.size)))
    op = as_operator(torch.from_numpy((q * eigs) @ q.T))
    res = lanczos(op, 90, progress=False)
    assert res.orthogonality_loss < 1e-12
    assert abs(res.ritz_values[-1] - 2.0) < 1e-12


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_float64_dot_is_the_same_chunked_and_split_among_threads(monkeypatch, workers):
    """Chunked float64 conversion and the thread split give the float64 dot of the float32 blocks."""
    from hess_utils import _threads

    monkeypatch.setattr(V, "_DOT_CHUNK", 16)
    monkeypatch.setattr(V, "_MIN_SPLIT_ENTRIES", 8)
    monkeypatch.setattr(V, "_MIN_SPLIT_BLOCK", 5)
    monkeypatch.setattr(_threads, "cpu_workers", lambda: workers)
    g = torch.Generator().manual_seed(0)
    shapes = [(40, 7), (3,), (513,), (17, 2, 3)]
    a = [torch.randn(s, generator=g) * 1e3 for s in shapes]
    b = [torch.randn(s, generator=g) for s in shapes]
    if workers > 1:
        blocks, shares = V._cpu_split(a, b)
        assert blocks == [0, 2, 3] and len(shares) == workers  # the 3-entry block is not split
    else:
        assert V._cpu_split(a, b) is None
    exact = sum(float(torch.dot(x.double().reshape(-1), y.double().reshape(-1))) for x, y in zip(a, b))
    assert abs(V.dot(a, b) - exact) <= 1e-14 * sum(float((x.double().abs() * y.double().abs()).sum())
                                                    for x, y in zip(a, b))
    assert V.dot(a, b) == V.dot(a, b)  # a fixed split: the same number every time


def test_rev_rev_runs_linear_layers_through_the_contiguous_kernel_and_matches_native_autograd():
    """Under exact rev-rev products F.linear goes through kernels._Linear (weight gradients contiguous), and its
    Hessian-vector product equals native autograd's to float64 rounding; other methods stay native."""
    import torch.nn.functional as F

    from hess_utils.operators.kernels import hessian_context

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def hvp(ctx):
        with ctx:
            loss = model(x).pow(3).sum()
            grads = torch.autograd.grad(loss, params, create_graph=True)
            return torch.autograd.grad(grads, params, grad_outputs=v), grads

    with hessian_context(model, exact=True, method="rev-rev"):
        assert type(F.linear(x, params[0]).grad_fn).__name__ == "_LinearBackward"
    with hessian_context(model, exact=True, method="fwd-rev"):
        assert type(F.linear(x, params[0]).grad_fn).__name__ != "_LinearBackward"
    ours, grads = hvp(hessian_context(model, exact=True, method="rev-rev"))
    assert all(g.is_contiguous() for g in grads)
    native, _ = hvp(hessian_context(model, exact=False))
    for a, b in zip(ours, native, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert max(float(a.abs().max()) for a in native) > 1e-3  # a product that can differ


def test_axpy_in_one_call_and_block_by_block_match_the_formula():
    """``y <- y + alpha x``: the one-call path (same devices and dtypes), the block-by-block one (mixed dtypes, a
    tensor alpha), and a length mismatch reported."""
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 3), (1,), (70,)]
    x = [torch.randn(s, generator=g) for s in shapes]
    y = [torch.randn(s, generator=g) for s in shapes]
    expected = [yi.double() - 0.25 * xi.double() for xi, yi in zip(x, y, strict=True)]
    same = [t.clone() for t in y]
    V.axpy_(-0.25, x, same)
    mixed = [t.double() for t in y]
    V.axpy_(-0.25, x, mixed)
    tensor_alpha = [t.clone() for t in y]
    V.axpy_(torch.tensor(-0.25, dtype=torch.float64), x, tensor_alpha)
    for e, s, m, t in zip(expected, same, mixed, tensor_alpha, strict=True):
        assert s.dtype == torch.float32 and m.dtype == torch.float64
        assert torch.allclose(s.double(), e, rtol=0, atol=1e-6) and torch.allclose(m, e, rtol=0, atol=1e-15)
        assert torch.equal(s, t)
    with pytest.raises(ValueError, match="different lengths"):
        V.axpy_(1.0, x, y[:2])
