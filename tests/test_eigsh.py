"""Thick-restart Lanczos eigsh against dense float64 references (torch.linalg.eigh) of known spectra."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

from hess_utils import vectors as V
from hess_utils.algorithms.eigsh import EigshResult, eigsh
from hess_utils.operators import as_operator
from hess_utils.operators.base import SymmetricOperator
from hess_utils.operators.hessian import hessian_operator
from tests.tiny import dense_hessian, tiny_batches, tiny_model

N = 300


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: these matrices are far too small to gain from more, and OpenMP spins on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

WHICH = ("LA", "SA", "LM", "BE")


def symmetric_with_eigenvalues(eigs, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """``Q diag(eigs) Q^T`` with a random orthogonal ``Q`` (QR of a Gaussian matrix)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (q * torch.as_tensor(np.asarray(eigs), dtype=torch.float64)) @ q.T
    return ((a + a.T) / 2).to(dtype)


def _spectra() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    bulk = N - 10
    return {
        # separated ends, negative bottom
        "separated": np.concatenate([np.linspace(-1, 1, bulk), [3, 4, 5, 6, 7], [-2, -3, -4, -5, -6]]),
        # two tight clusters at the ends (gaps 1e-3), far from a random bulk
        "clustered": np.concatenate(
            [rng.uniform(-1, 1, bulk), 5 + 1e-3 * np.arange(5), -5.5 - 1e-3 * np.arange(5)]
        ),
        # repeated eigenvalues at both ends (9 twice, -8.5 twice): a single Krylov sequence sees one copy
        "repeated": np.concatenate(
            [np.linspace(-1, 1, N - 12), [10, 9, 9, 8, 7, 6], [-8.5, -8.5, -6.5, -5.5, -5, -4.5]]
        ),
    }


SPECTRA = _spectra()


@pytest.fixture(scope="module", params=list(SPECTRA))
def known(request):
    eigs = SPECTRA[request.param]
    A = symmetric_with_eigenvalues(eigs, seed=3)
    values, vectors = torch.linalg.eigh(A)  # the independent reference
    return request.param, A, values.numpy(), vectors


def reference_indices(values: np.ndarray, which: str, k: int) -> np.ndarray:
    """Indices (into ascending ``values``) of the ``k`` wanted eigenvalues, written out per ``which``."""
    n = len(values)
    if which == "LA":
        return np.arange(n - k, n)
    if which == "SA":
        return np.arange(k)
    if which == "LM":
        return np.sort(np.argsort(-np.abs(values), kind="stable")[:k])
    top, bottom = (k + 1) // 2, k // 2
    return np.concatenate([np.arange(bottom), np.arange(n - top, n)])


def flat(x) -> torch.Tensor:
    return V.flatten(x)


# ---------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("which", WHICH)
def test_eigenpairs_match_dense_eigh(known, which):
    name, A, values, vectors = known
    k = 5
    # The repeated spectrum's copies need the multiplicity check (off by default, as in ARPACK).
    result = eigsh(as_operator(A), k=k, which=which, tol=1e-10, check_multiplicity=name == "repeated", progress=False)
    idx = reference_indices(values, which, k)
    radius = np.abs(values).max()
    expected = values[idx]
    assert result.eigenvalues.dtype == np.float64 and result.eigenvalues.shape == (k,)
    assert np.all(np.diff(result.eigenvalues) >= 0), "ascending, as scipy returns them"
    assert np.abs(result.eigenvalues - expected).max() <= 1e-10 * radius, (name, result.eigenvalues, expected)
    assert result.converged.all()

    X = torch.stack([flat(x) for x in result.eigenvectors], dim=1)  # (n, k)
    # Orthonormal, also within a repeated eigenvalue.
    assert float((X.T @ X - torch.eye(k, dtype=torch.float64)).abs().max()) < 1e-10
    # Reported residuals are the true ones.
    true = torch.linalg.vector_norm(A @ X - X * torch.from_numpy(result.eigenvalues.copy()), dim=0).numpy()
    assert np.allclose(result.residuals, true, rtol=1e-6, atol=1e-14 * radius)
    assert np.all(true <= 1e-10 * result.scale)
    # The Ritz vectors span the wanted invariant subspace: Davis-Kahan bounds the sines of the angles by
    # ||R||_F / gap (gap: Ritz values to the unwanted eigenvalues), and a separated set is found to 1e-8.
    U = vectors[:, idx]
    sines = float(torch.linalg.matrix_norm(X - U @ (U.T @ X)))
    others = np.delete(values, idx)
    gap = np.min(np.abs(others[:, None] - result.eigenvalues[None, :]))
    assert sines <= 1.01 * np.linalg.norm(true) / gap + 1e-13
    if gap > 1e-2 * radius:
        assert sines < 1e-8
    # Individually separated eigenvalues have individually determined eigenvectors (up to sign).
    for j, i in enumerate(idx):
        gap = np.min(np.abs(np.delete(values, i) - values[i]))
        if gap > 1e-2 * radius:
            u, x = vectors[:, i], X[:, j]
            err = min(float((x - u).norm()), float((x + u).norm()))
            assert err < 1e-8, (name, which, j, err)


def test_repeated_eigenvalue_is_found_twice():
    A = symmetric_with_eigenvalues(SPECTRA["repeated"], seed=3)
    blind = eigsh(as_operator(A), k=5, which="LA", tol=1e-10, progress=False)  # the default, as ARPACK
    assert blind.num_multiplicity_checks == 0 and not np.allclose(blind.eigenvalues, [7, 8, 9, 9, 10], atol=1e-6)
    result = eigsh(as_operator(A), k=5, which="LA", tol=1e-10, check_multiplicity=True, progress=False)
    assert np.allclose(result.eigenvalues, [7, 8, 9, 9, 10], rtol=0, atol=1e-10 * 10)
    assert result.num_multiplicity_checks >= 1
    # With a small basis the check cycle is short: it must keep going until the copy shows.
    small = eigsh(as_operator(A), k=5, which="LA", num_extra=2, tol=1e-10, check_multiplicity=True, progress=False)
    assert np.allclose(small.eigenvalues, [7, 8, 9, 9, 10], rtol=0, atol=1e-10 * 10)
    low = eigsh(as_operator(A), k=3, which="SA", tol=1e-10, check_multiplicity=True, progress=False)
    assert np.allclose(low.eigenvalues, [-8.5, -8.5, -6.5], rtol=0, atol=1e-10 * 10)


class DiagonalOperator(SymmetricOperator):
    """``diag(d)``: large dimensions at no cost (the spectrum is known exactly)."""

    def __init__(self, d: np.ndarray) -> None:
        self.d = torch.as_tensor(d, dtype=torch.float64)
        self.param_names = ["x"]
        self.shapes = [torch.Size((len(d),))]
        self.dtypes = [torch.float64]
        self.devices = [torch.device("cpu")]

    def _matvec(self, v):
        return [self.d * v[0]]


def _lm_like_spectrum(n: int, double: int | None) -> np.ndarray:
    """The top of the gpt2-5m Hessian (SLQ Ritz values, close 5th and 6th) over a dense bulk; ``double``: the
    index (0 = largest) of a top eigenvalue given a second copy."""
    rng = np.random.default_rng(1)
    top = [50.62, 48.739, 46.239, 44.775, 42.947, 42.198, 40.812, 40.426, 40.063, 38.6, 38.5, 38.2, 38.0]
    if double is not None:
        top.append(top[double])
    bulk = n - len(top)
    return np.concatenate([rng.normal(0, 4, bulk - bulk // 10), rng.uniform(-43, 37.5, bulk // 10), top])


@pytest.mark.parametrize("double", [0, 2, 3])
def test_multiplicity_check_finds_a_doubled_eigenvalue_in_a_dense_spectrum(double):
    """A copy hidden among close eigenvalues over a bulk of 40000, where one Krylov sequence sees one copy.

    The check (stopped as soon as its own sequence has settled behind the wanted set, not after a whole
    cycle) finds it. Without the check the copies of the 3rd and 4th eigenvalues are missed and the k-th
    value is wrong. A copy of the dominant one can surface in the main sequence by rounding over restarts
    (it did on one CPU and not on another), so for it only the checked result is asserted."""
    d = _lm_like_spectrum(40_000, double)
    expected = np.sort(d)[-5:]
    op = DiagonalOperator(d)
    result = eigsh(op, k=5, which="LA", tol=1e-8, check_multiplicity=True, progress=False)
    assert np.abs(result.eigenvalues - expected).max() <= 1e-8 * 50.62, (result.eigenvalues, expected)
    assert result.converged.all()
    X = torch.stack([flat(x) for x in result.eigenvectors], dim=1)
    assert float((X.T @ X - torch.eye(5, dtype=torch.float64)).abs().max()) < 1e-8  # two vectors for the copy
    if double != 0:
        blind = eigsh(op, k=5, which="LA", tol=1e-8, progress=False)  # the default: no check
        assert np.abs(blind.eigenvalues - expected).max() > 0.1  # the test is not vacuous
        assert result.num_multiplicity_checks >= 2  # the copy entered the wanted set: checked again


# ---------------------------------------------------------------------------------------------- restarts and memory
def _vector_storages(n: int, itemsize: int) -> dict[int, int]:
    """``{data_ptr: nbytes}`` of the live tensor storages at least one vector long."""
    out = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.nbytes() >= n * itemsize:
                out[storage.data_ptr()] = storage.nbytes()
    return out


def test_small_basis_restarts_with_fixed_memory():
    A = symmetric_with_eigenvalues(SPECTRA["clustered"], seed=3)
    values = torch.linalg.eigvalsh(A).numpy()
    before = _vector_storages(N, 8)
    seen: list[tuple[int, tuple[int, ...], int]] = []
    extra_bytes: list[int] = []

    def watch(state):
        seen.append((state.basis[0].untyped_storage().data_ptr(), tuple(state.basis[0].shape), state.filled))
        if state.num_products % 10 == 0:  # a heap walk is slow; sample it
            live = _vector_storages(N, 8)
            extra_bytes.append(sum(b for p, b in live.items() if p not in before))

    result = eigsh(as_operator(A), k=5, which="LA", num_extra=2, tol=1e-10, progress=False, callback=watch)
    assert result.basis_size == 7
    assert result.num_restarts > 0
    assert result.converged.all()
    assert np.abs(result.eigenvalues - values[-5:]).max() <= 1e-10 * np.abs(values).max()
    # The basis is allocated once and never grows, however many products and restarts.
    assert len({ptr for ptr, _, _ in seen}) == 1
    assert {shape for _, shape, _ in seen} == {(7, N)}
    assert max(filled for _, _, filled in seen) == 7
    assert len(seen) > 3 * 7  # more products than one basis could hold
    # Everything vector-sized the run keeps alive: the basis plus a few work vectors.
    assert extra_bytes and max(extra_bytes) <= (7 + 4) * N * 8, max(extra_bytes) / (N * 8)


def test_basis_spanning_the_space_is_exact_without_restart():
    eigs = np.array([-3.0, -1, 0.5, 1, 2, 2.5, 4, 6, 7, 9, 11, 12])
    A = symmetric_with_eigenvalues(eigs, seed=1)
    result = eigsh(as_operator(A), k=5, which="BE", tol=1e-12, progress=False)
    assert result.basis_size == 12 and result.num_restarts == 0
    assert np.allclose(result.eigenvalues, [-3, -1, 9, 11, 12], rtol=0, atol=1e-12)


def test_start_in_an_invariant_subspace_still_finds_the_top():
    """A start vector that is an eigenvector spans an invariant subspace at once (beta = 0)."""
    A = symmetric_with_eigenvalues(SPECTRA["separated"], seed=3)
    values, vectors = torch.linalg.eigh(A)
    bottom = [vectors[:, 0].clone()]
    result = eigsh(as_operator(A), k=5, which="LA", tol=1e-10, v0=bottom, progress=False)
    assert np.allclose(result.eigenvalues, values[-5:].numpy(), rtol=0, atol=1e-10 * 7)


def test_low_rank_operator():
    """Rank 3: after three steps the Krylov space is invariant; zeros fill the rest of the wanted set."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(50, 3, generator=g, dtype=torch.float64)
    A = B @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ B.T
    values = torch.linalg.eigvalsh(A).numpy()
    result = eigsh(as_operator(A), k=5, which="LA", tol=1e-10, progress=False)
    assert np.allclose(result.eigenvalues, values[-5:], rtol=0, atol=1e-10 * values.max())
    assert result.converged.all()


class SplitOperator(SymmetricOperator):
    """A dense matrix acting on vectors split into blocks of several shapes."""

    def __init__(self, matrix: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        self.matrix = matrix
        self.param_names = [f"block{i}" for i in range(len(shapes))]
        self.shapes = [torch.Size(s) for s in shapes]
        self.dtypes = [matrix.dtype] * len(shapes)
        self.devices = [matrix.device] * len(shapes)

    def _matvec(self, v):
        return V.unflatten(self.matrix @ torch.cat([b.reshape(-1) for b in v]), v)


def test_blocks_layout_like_the_operator():
    A = symmetric_with_eigenvalues(SPECTRA["separated"], seed=3)
    op = SplitOperator(A, [(10, 10), (150,), (5, 2, 5)])
    values, vectors = torch.linalg.eigh(A)
    result = eigsh(op, k=3, which="SA", tol=1e-10, progress=False)
    assert np.allclose(result.eigenvalues, values[:3].numpy(), rtol=0, atol=1e-10 * 7)
    for x, i in zip(result.eigenvectors, range(3), strict=True):
        assert [tuple(b.shape) for b in x] == [(10, 10), (150,), (5, 2, 5)]
        u = vectors[:, i]
        assert min(float((flat(x) - u).norm()), float((flat(x) + u).norm())) < 1e-8


def test_float32_operator():
    A = symmetric_with_eigenvalues(SPECTRA["separated"], seed=3)
    values = torch.linalg.eigvalsh(A).numpy()
    result = eigsh(as_operator(A.float()), k=5, which="LA", tol=1e-5, progress=False)
    assert result.converged.all()
    assert all(x[0].dtype == torch.float32 for x in result.eigenvectors)
    assert np.abs(result.eigenvalues - values[-5:]).max() <= 1e-5 * 7


def test_not_converging_warns_and_flags():
    A = symmetric_with_eigenvalues(SPECTRA["clustered"], seed=3)
    with pytest.warns(RuntimeWarning, match="raise max_products"):
        result = eigsh(as_operator(A), k=5, num_extra=2, tol=1e-12, max_products=7, progress=False)
    assert not result.converged.all()
    assert result.num_products == 7 + 5  # the iteration, then one true residual per pair


# ---------------------------------------------------------------------------------------------- the tiny model
@pytest.fixture(scope="module")
def model_hessian():
    model = tiny_model("gpt2")
    batches = tiny_batches(pad=True)
    H = dense_hessian(model, batches)
    return hessian_operator(model, batches, method="rev-rev"), H


@pytest.mark.parametrize("which", WHICH)
def test_extreme_eigenpairs_of_model_hessian(model_hessian, which):
    """Top-5 / bottom-5 (and LM, BE) of a float64 model Hessian against eigh of the independent dense oracle.

    The oracle (:func:`tests.tiny.dense_hessian`) is ``jacrev(grad(L))`` of a loss written apart from the
    package. The wanted eigenvalues here are all at least 2.6 in magnitude (the spectrum spans about
    [-6, 11.5]), so each is checked to 1e-10 relative to itself, and eigenvectors whose eigenvalue is
    separated from the rest of the spectrum (gap above 1e-2 ||H||) to 1e-8 up to sign.
    """
    op, H = model_hessian
    values, vectors = torch.linalg.eigh(H)
    values_np = values.numpy()
    result = eigsh(op, k=5, which=which, tol=1e-10, progress=False)
    idx = reference_indices(values_np, which, 5)
    radius = float(values.abs().max())
    expected = values_np[idx]
    assert np.abs(expected).min() > 1.0  # relative errors of eigenvalues far from 0
    assert np.abs(result.eigenvalues - expected).max() <= 1e-10 * radius
    assert (np.abs(result.eigenvalues - expected) / np.abs(expected)).max() <= 1e-10
    assert result.converged.all()
    separated = 0
    for j, i in enumerate(idx):
        assert [tuple(b.shape) for b in result.eigenvectors[j]] == [tuple(s) for s in op.shapes]
        gap = np.min(np.abs(np.delete(values_np, i) - values_np[i]))
        if gap > 1e-2 * radius:
            separated += 1
            x, u = flat(result.eigenvectors[j]), vectors[:, i]
            assert min(float((x - u).norm()), float((x + u).norm())) < 1e-8
    assert separated >= 3  # the check is not vacuous: most of the wanted eigenvalues are separated


# ---------------------------------------------------------------------------------------------- checkpoints
class Interrupted(Exception):
    """Raised by a callback to stop a run, as a kill would (the checkpoint folder keeps its last state)."""


def _stop_after(restarts: int):
    def callback(state):
        if state.num_restarts >= restarts:
            raise Interrupted

    return callback


def _assert_same_result(a: EigshResult, b: EigshResult) -> None:
    """Bit for bit: same values, residuals, flags, counters and eigenvector entries."""
    assert np.array_equal(a.eigenvalues, b.eigenvalues)
    assert np.array_equal(a.residuals, b.residuals)
    assert np.array_equal(a.converged, b.converged)
    assert (a.scale, a.tol, a.which, a.num_products, a.num_restarts, a.num_multiplicity_checks, a.basis_size,
            a.seed) == (b.scale, b.tol, b.which, b.num_products, b.num_restarts, b.num_multiplicity_checks,
                        b.basis_size, b.seed)
    for x, y in zip(a.eigenvectors, b.eigenvectors, strict=True):
        assert all(torch.equal(bx, by) for bx, by in zip(x, y, strict=True))


def _products(op) -> int:
    return len(op.product_seconds)


@pytest.mark.parametrize(("which", "stops"), [("LA", (3,)), ("BE", (2, 9)), ("SA", (12,))])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, which, stops):
    """Repeated eigenvalues and a small basis: many restarts, a multiplicity check (locking, random draws).

    On a CPU dense operator the products are deterministic, and the saved state holds every bit the next
    iteration reads (basis rows, T, b, r, counters, draws), so the resumed result is bitwise equal; the
    stops fall before, inside and after the multiplicity checks.
    """
    A = symmetric_with_eigenvalues(SPECTRA["repeated"], seed=3)
    op = as_operator(A)
    kwargs = dict(k=5, which=which, tol=1e-10, num_extra=3, check_multiplicity=True, progress=False)
    reference = eigsh(op, **kwargs)
    assert reference.num_multiplicity_checks >= 1 and reference.num_restarts > max(stops)
    folder = tmp_path / "eigsh"
    for stop in stops:
        with pytest.raises(Interrupted):
            eigsh(op, **kwargs, checkpoint_dir=folder, callback=_stop_after(stop))
        pointer = json.loads((folder / "checkpoint.json").read_text())
        assert not pointer["finished"] and pointer["num_restarts"] == stop
        assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "config.json", pointer["folder"]]
    before = _products(op)
    resumed = eigsh(op, **kwargs, checkpoint_dir=folder)
    # Only the products after the last saved restart were computed again.
    assert _products(op) - before == reference.num_products - pointer["num_products"]
    _assert_same_result(resumed, reference)
    # Finished: the saved result, no product; the states are gone, only the result is kept.
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "config.json", "result"]
    before = _products(op)
    again = eigsh(op, **kwargs, checkpoint_dir=folder)
    assert _products(op) == before
    _assert_same_result(again, reference)
    assert again.eigenvectors[0][0].shape == (N,)


def test_checkpoint_every_and_an_uninterrupted_checkpointed_run(tmp_path):
    A = symmetric_with_eigenvalues(SPECTRA["separated"], seed=3)
    op = as_operator(A)
    kwargs = dict(k=4, which="LA", tol=1e-10, num_extra=3, progress=False)
    reference = eigsh(op, **kwargs)
    assert reference.converged.all() and reference.num_restarts > 10
    saved = []

    def record(state):
        pointer = tmp_path / "every3" / "checkpoint.json"
        if pointer.exists():
            saved.append(json.loads(pointer.read_text())["num_restarts"])
        if state.num_restarts >= 10:
            raise Interrupted

    with pytest.raises(Interrupted):
        eigsh(op, **kwargs, checkpoint_dir=tmp_path / "every3", checkpoint_every=3, callback=record)
    assert sorted(set(saved)) == [3, 6, 9]
    _assert_same_result(eigsh(op, **kwargs, checkpoint_dir=tmp_path / "every3", checkpoint_every=3), reference)
    _assert_same_result(eigsh(op, **kwargs, checkpoint_dir=tmp_path / "plain"), reference)
    # 0: only the result is saved, and it is returned on a re-run.
    _assert_same_result(eigsh(op, **kwargs, checkpoint_dir=tmp_path / "end", checkpoint_every=0), reference)
    assert not list((tmp_path / "end").glob("state-*"))


def test_model_hessian_resumes_bitwise(tmp_path, model_hessian):
    """The same on a model's exact (rev-rev) float64 Hessian, blocks of many shapes."""
    op, _ = model_hessian
    kwargs = dict(k=3, which="SA", tol=1e-10, num_extra=4, progress=False)
    reference = eigsh(op, **kwargs)
    assert reference.num_restarts > 4
    with pytest.raises(Interrupted):
        eigsh(op, **kwargs, checkpoint_dir=tmp_path, callback=_stop_after(4))
    _assert_same_result(eigsh(op, **kwargs, checkpoint_dir=tmp_path), reference)


def test_checkpoint_of_another_run_or_operator_is_refused(tmp_path):
    A = symmetric_with_eigenvalues(SPECTRA["separated"], seed=3)
    kwargs = dict(k=3, tol=1e-8, num_extra=2, progress=False)  # restarts before it converges
    folder = tmp_path / "run"
    with pytest.raises(Interrupted):
        eigsh(as_operator(A), **kwargs, checkpoint_dir=folder, callback=_stop_after(1))
    with pytest.raises(ValueError, match=rf"{folder} holds a different eigsh run: which: 'LA' \(saved\) != 'SA' "
                                         rf"\(now\).*delete {folder} to start over"):
        eigsh(as_operator(A), **{**kwargs, "which": "SA"}, checkpoint_dir=folder)
    with pytest.raises(ValueError, match=r"dtype: 'float64' \(saved\) != 'float32' \(now\)"):
        eigsh(as_operator(A.float()), **{**kwargs, "tol": 1e-5}, checkpoint_dir=folder)
    with pytest.raises(ValueError, match=r"dim: 300 \(saved\) != 299 \(now\)"):
        eigsh(as_operator(A[:-1, :-1].contiguous()), **kwargs, checkpoint_dir=folder)
    same_dim = SplitOperator(A, [(100,), (200,)])  # same dimension and dtype, other blocks (parameter names)
    with pytest.raises(ValueError, match="blocks_sha256"):
        eigsh(same_dim, **kwargs, checkpoint_dir=folder)
    with pytest.raises(ValueError, match="v0_sha256"):
        eigsh(as_operator(A), **kwargs, v0=[torch.ones(N, dtype=torch.float64)], checkpoint_dir=folder)
    with pytest.raises(Interrupted):
        eigsh(as_operator(A), **kwargs, checkpoint_dir=tmp_path / "cfg", checkpoint_config={"model": "a"},
              callback=_stop_after(1))
    with pytest.raises(ValueError, match=r"model: 'a' \(saved\) != 'b' \(now\)"):
        eigsh(as_operator(A), **kwargs, checkpoint_dir=tmp_path / "cfg", checkpoint_config={"model": "b"})
    with pytest.raises(ValueError, match="checkpoint_config gives run parameters other values"):
        eigsh(as_operator(A), **kwargs, checkpoint_dir=tmp_path / "x", checkpoint_config={"k": 4})
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "checkpoint.json").write_text("{}")
    with pytest.raises(ValueError, match="holds checkpoint.json but no config.json"):
        eigsh(as_operator(A), **kwargs, checkpoint_dir=stray)


def test_corrupt_checkpoint_is_refused_not_recomputed(tmp_path):
    from hess_utils.algorithms.eigsh import EigshCheckpointError

    A = symmetric_with_eigenvalues(SPECTRA["separated"], seed=3)
    op = as_operator(A)
    kwargs = dict(k=3, tol=1e-8, num_extra=2, progress=False)
    with pytest.raises(Interrupted):
        eigsh(op, **kwargs, checkpoint_dir=tmp_path, callback=_stop_after(2))
    state = tmp_path / json.loads((tmp_path / "checkpoint.json").read_text())["folder"]
    basis = state / "basis.bin"
    data = bytearray(basis.read_bytes())
    data[17] ^= 1
    basis.write_bytes(bytes(data))
    before = _products(op)
    with pytest.raises(EigshCheckpointError, match=r"basis.bin is corrupt.*delete"):
        eigsh(op, **kwargs, checkpoint_dir=tmp_path)
    basis.write_bytes(bytes(data[:-8]))
    with pytest.raises(EigshCheckpointError, match="truncated"):
        eigsh(op, **kwargs, checkpoint_dir=tmp_path)
    (state / "state.pt").write_bytes(b"garbage")
    with pytest.raises(EigshCheckpointError, match=r"state.pt is corrupt or truncated"):
        eigsh(op, **kwargs, checkpoint_dir=tmp_path)
    assert _products(op) == before


def test_a_reader_writes_nothing(tmp_path):
    """``is_writer=False`` (a rank other than 0): the same result, no file."""
    A = symmetric_with_eigenvalues(SPECTRA["separated"], seed=3)
    kwargs = dict(k=3, tol=1e-8, num_extra=2, progress=False)
    reference = eigsh(as_operator(A), **kwargs)
    _assert_same_result(eigsh(as_operator(A), **kwargs, checkpoint_dir=tmp_path / "r", is_writer=False), reference)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------- the result
def test_result_is_frozen_and_summarised():
    A = symmetric_with_eigenvalues(SPECTRA["separated"], seed=3)
    result = eigsh(as_operator(A), k=4, tol=1e-8, progress=False)
    assert isinstance(result, EigshResult)
    with pytest.raises(ValueError):
        result.eigenvalues[0] = 0.0
    with pytest.raises(AttributeError):
        result.tol = 1.0
    text = repr(result)
    assert "converged=4/4" in text and "basis_size=20" in text and "[" not in text
    frame = result.to_frame()
    assert list(frame.columns) == ["eigenvalue", "residual", "relative_residual", "converged"]
    assert np.array_equal(frame["eigenvalue"].to_numpy(), result.eigenvalues)
    assert frame["converged"].all()


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_the_fix():
    A = symmetric_with_eigenvalues(np.arange(1.0, 21.0), seed=0)
    op = as_operator(A)
    with pytest.raises(ValueError, match=r"k=20 .* k < dim.*eigh"):
        eigsh(op, k=20)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        eigsh(op, k=0)
    with pytest.raises(ValueError, match=r"unknown which='LR'.*'LA', 'SA', 'LM', 'BE'"):
        eigsh(op, which="LR")
    with pytest.raises(ValueError, match="num_extra must be an integer >= 1"):
        eigsh(op, num_extra=0)
    with pytest.raises(ValueError, match="max_products=3 is less than one cycle"):
        eigsh(op, k=2, num_extra=3, max_products=3)
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        eigsh(op, tol=0.0)
    with pytest.raises(ValueError, match="below the rounding unit"):
        eigsh(as_operator(A.float()), tol=1e-9)
    with pytest.raises(ValueError, match="start vector is zero"):
        eigsh(op, v0=[torch.zeros(20, dtype=torch.float64)], progress=False)
    with pytest.raises(ValueError, match=r"shape \(19,\) but expected \(20,\)"):
        eigsh(op, v0=[torch.ones(19, dtype=torch.float64)], progress=False)


# ---------------------------------------------------------------------------------------------- the eigs command
def test_eigs_command_resumes_an_interrupted_run(tmp_path, monkeypatch):
    """``python -m hess_utils eigs ... --out DIR`` killed mid-run (at its first restart), then re-run: the same
    eigenpairs.csv as a run never interrupted (the checkpoint in DIR/eigsh/), and a third run recomputes nothing."""
    import pandas as pd

    import hess_utils.algorithms.eigsh as eigsh_module
    from hess_utils.cli import main

    argv = ["eigs", "--model", "tiny-gpt2", "--data", "wiki", "--seq-len", "12", "--num-sequences", "2",
            "--batch-size", "2", "--dtype", "float64", "--seed", "1", "--params",
            "transformer.h.0.attn.c_proj.*,transformer.h.0.ln_*", "--no-progress", "--k", "3", "--tol", "1e-10"]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    real = eigsh_module.eigsh

    def killed_at_restart_1(*args, **kwargs):
        def callback(state):
            if state.num_restarts >= 1:
                raise KeyboardInterrupt  # what Ctrl-C raises
        return real(*args, **kwargs, callback=callback)

    out = tmp_path / "resumed"
    monkeypatch.setattr(eigsh_module, "eigsh", killed_at_restart_1)
    assert main([*argv, "--out", str(out)]) == 130
    assert not (out / "eigenpairs.csv").exists()
    assert json.loads((out / "eigsh" / "checkpoint.json").read_text())["num_restarts"] == 1
    monkeypatch.setattr(eigsh_module, "eigsh", real)
    assert main([*argv, "--out", str(out)]) == 0
    expected = pd.read_csv(tmp_path / "plain" / "eigenpairs.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out / "eigenpairs.csv"), expected, check_exact=True)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([*argv, "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
