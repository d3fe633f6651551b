"""Freed memory held for reuse while a driver runs its products (hess_utils._memory, glibc only)."""

from __future__ import annotations

import resource

import pytest
import torch

import hess_utils._memory as M
from hess_utils.algorithms import hutchinson_trace, kpm_density, lanczos, slq
from hess_utils.algorithms.eigsh import eigsh
from hess_utils.algorithms.solve import cg, minres
from hess_utils.operators.dense import DenseOperator

glibc = pytest.mark.skipif(M._glibc() is None, reason="glibc's malloc only")

BLOCK = 4 << 20  # below the mmap threshold: served from the heap
BLOCKS = 24  # 96 MiB, above the 64 MiB trim threshold outside a scope


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _faults_to_reallocate() -> int:
    """Page faults taken to allocate and touch BLOCKS blocks again right after freeing as many."""
    blocks = [torch.ones(BLOCK // 4) for _ in range(BLOCKS)]
    del blocks
    before = _minor_faults()
    blocks = [torch.ones(BLOCK // 4) for _ in range(BLOCKS)]
    faults = _minor_faults() - before
    del blocks
    return faults


@glibc
def test_inside_a_scope_freed_pages_are_reused_without_faults():
    pages = BLOCKS * BLOCK // resource.getpagesize()
    with M.holding_freed_memory():
        faults = _faults_to_reallocate()
    assert faults < 0.05 * pages, (faults, pages)


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_the_outermost_scope_sets_both_thresholds_and_restores_the_adaptive_ceiling(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(M, "_glibc", lambda: fake)
    with M.holding_freed_memory():
        with M.holding_freed_memory():
            assert M.holding()
        assert M.holding()
        entered = list(fake.calls)
    assert not M.holding()
    # Both set on entry: setting the trim threshold alone freezes the mmap threshold at 128 KiB.
    assert entered == [("mallopt", -3, 32 << 20), ("mallopt", -1, (1 << 31) - 1)]
    assert fake.calls[2:] == [("mallopt", -1, 64 << 20), ("malloc_trim", 0)]
    with pytest.raises(RuntimeError), M.holding_freed_memory():  # an error in the driver still restores
        raise RuntimeError("driver failed")
    assert not M.holding() and fake.calls[-2:] == [("mallopt", -1, 64 << 20), ("malloc_trim", 0)]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@glibc
def test_leaving_the_outermost_scope_returns_the_kept_memory():
    with M.holding_freed_memory():
        with M.holding_freed_memory():
            blocks = [torch.ones(BLOCK // 4) for _ in range(BLOCKS)]
            del blocks
        assert M.holding()  # the inner scope's end does not restore
        kept = _resident_bytes()
    assert not M.holding()
    assert kept - _resident_bytes() > 0.8 * BLOCKS * BLOCK


def test_a_user_tuned_malloc_is_left_alone(monkeypatch):
    M._glibc.cache_clear()
    try:
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
        assert M._glibc() is None
        with M.holding_freed_memory():
            assert not M.holding()
    finally:
        monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
        M._glibc.cache_clear()


class _Recording(DenseOperator):
    """A dense operator that notes, at every product, whether freed memory is being held."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.seen = []

    def _matvec(self, v):
        self.seen.append(M.holding())
        return super()._matvec(v)


@glibc
@pytest.mark.parametrize("driver", ["lanczos", "slq", "eigsh", "cg", "minres", "hutchinson_trace", "kpm_density"])
def test_every_driver_runs_its_products_inside_the_scope(driver):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 40, generator=g, dtype=torch.float64)
    op = _Recording(a @ a.T + 40 * torch.eye(40, dtype=torch.float64))
    b = [torch.randn(40, generator=g, dtype=torch.float64)]
    calls = {
        "lanczos": lambda: lanczos(op, 10, reorth="partial"),
        "slq": lambda: slq(op, 10, 2, progress=False),
        "eigsh": lambda: eigsh(op, k=2, progress=False),
        "cg": lambda: cg(op, b, progress=False),
        "minres": lambda: minres(op, b, progress=False),
        "hutchinson_trace": lambda: hutchinson_trace(op, 3, progress=False),
        "kpm_density": lambda: kpm_density(op, num_moments=10, num_probes=2, progress=False),
    }
    assert not M.holding()
    calls[driver]()
    assert op.seen and all(op.seen), op.seen
    assert not M.holding()
