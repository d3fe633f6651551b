"""Freed memory held for reuse while a driver runs its products (hess_utils._memory, glibc only)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest
import torch

import hess_utils._memory as M
from hess_utils.algorithms import (
    chebyshev_moments,
    estimate_bounds,
    hutchinson_diagonal,
    hutchinson_trace,
    kpm_density,
    lanczos,
    lanczos_init,
    lanczos_resume,
    slq,
)
from hess_utils.algorithms.eigsh import eigsh
from hess_utils.algorithms.solve import cg, influence, minres
from hess_utils.algorithms.subsets import subset_hessian
from hess_utils.operators.dense import DenseOperator

glibc = pytest.mark.skipif(M._glibc() is None, reason="glibc's malloc only")

# A fresh process (no torch, no numpy: numpy advises huge pages for large arrays) whose heap layout is known:
# a freed mapped block of 31 MiB lifts glibc's adaptive thresholds to 31 / 62 MiB; then 24 blocks of 4 MiB
# come from the top of the heap, and freeing them all leaves 96 MiB free there, which glibc trims unless a
# scope holds it; the child prints the minor faults of allocating and touching them again.
_CHILD = r"""
import ctypes, importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("memory", sys.argv[1])
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.restype, libc.memset.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
BLOCK = 4 << 20

def touched(size):
    p = libc.malloc(size)
    libc.memset(p, 1, size)
    return p

libc.free(touched(31 << 20))
def reallocate():
    for p in reversed([touched(BLOCK) for _ in range(24)]):
        libc.free(p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [touched(BLOCK) for _ in range(24)]
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

if sys.argv[2] == "held":
    with memory.holding_freed_memory():
        print(reallocate())
else:
    print(reallocate())
"""


def _child_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, M.__file__, mode], capture_output=True, text=True,
                         check=True, timeout=60)
    return int(out.stdout.split()[-1])


@glibc
def test_inside_a_scope_freed_pages_are_reused_without_faults():
    pages = 24 * (4 << 20) // resource.getpagesize()
    trimmed = _child_faults("plain")
    if trimmed < 0.25 * pages:  # 2/3 here (16 blocks trimmed); huge pages "always" would count per 2 MiB
        pytest.skip(f"glibc's trimming is not visible in page faults here ({trimmed} of {pages})")
    assert _child_faults("held") < 0.02 * pages


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


BLOCK, BLOCKS = 4 << 20, 24


@glibc
def test_leaving_the_outermost_scope_returns_the_kept_memory():
    with M.holding_freed_memory():
        with M.holding_freed_memory():
            blocks = [torch.ones(BLOCK // 4) for _ in range(BLOCKS)]
            del blocks
        assert M.holding()  # the inner scope's end does not restore
        assert M.held_bytes() > BLOCKS * BLOCK  # and free_memory counts it as available
        kept = _resident_bytes()
    assert not M.holding() and M.held_bytes() == 0
    assert kept - _resident_bytes() > 0.8 * BLOCKS * BLOCK


def test_a_user_tuned_malloc_is_left_alone(monkeypatch):
    for name, value in [("MALLOC_TRIM_THRESHOLD_", "1000000"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")]:
        M._glibc.cache_clear()
        try:
            monkeypatch.setenv(name, value)
            assert M._glibc() is None
            with M.holding_freed_memory():
                assert not M.holding()
        finally:
            monkeypatch.delenv(name)
            M._glibc.cache_clear()


class _FakeLibc:
    def __init__(self, refuse=()):
        self.calls, self.refuse = [], refuse

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return int(param not in self.refuse)

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_the_outermost_scope_sets_both_thresholds_and_lowers_the_trim_one_on_leaving(monkeypatch):
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


def test_a_refused_mmap_threshold_leaves_the_trim_threshold_alone(monkeypatch):
    fake = _FakeLibc(refuse=(-3,))
    monkeypatch.setattr(M, "_glibc", lambda: fake)
    with M.holding_freed_memory():
        assert not M.holding()
    assert fake.calls == [("mallopt", -3, 32 << 20)]


class _Recording(DenseOperator):
    """A dense operator that notes, at every product, whether freed memory is being held."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.seen = []
        self.reduction, self.num_tokens = "mean", 1  # what subset_hessian records of a loss's Hessian

    def _matvec(self, v):
        self.seen.append(M.holding())
        return super()._matvec(v)


@glibc
@pytest.mark.parametrize("driver", ["lanczos", "lanczos_resume", "slq", "eigsh", "cg", "minres", "influence",
                                    "hutchinson_trace", "hutchinson_diagonal", "kpm_density", "chebyshev_moments",
                                    "estimate_bounds", "subset_hessian"])
def test_every_driver_runs_its_products_inside_the_scope(driver):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 40, generator=g, dtype=torch.float64)
    op = _Recording(a @ a.T + 40 * torch.eye(40, dtype=torch.float64))
    b = [torch.randn(40, generator=g, dtype=torch.float64)]
    calls = {
        "lanczos": lambda: lanczos(op, 10, reorth="partial"),
        "lanczos_resume": lambda: lanczos_resume(op, lanczos_init(op, 10, reorth="partial"), progress=False),
        "slq": lambda: slq(op, 10, 2, progress=False),
        "eigsh": lambda: eigsh(op, k=2, progress=False),
        "cg": lambda: cg(op, b, progress=False),
        "minres": lambda: minres(op, b, progress=False),
        "influence": lambda: influence(op, b, b, progress=False),
        "hutchinson_trace": lambda: hutchinson_trace(op, 3, progress=False),
        "hutchinson_diagonal": lambda: hutchinson_diagonal(op, 3, progress=False),
        "kpm_density": lambda: kpm_density(op, num_moments=10, num_probes=2, progress=False),
        "chebyshev_moments": lambda: chebyshev_moments(op, 10, (0.0, 200.0), 2, progress=False),
        "estimate_bounds": lambda: estimate_bounds(op),
        "subset_hessian": lambda: subset_hessian(op, {"matrix": [0, 3, 5]}, progress=False),
    }
    assert not M.holding()
    calls[driver]()
    assert op.seen and all(op.seen), op.seen
    assert not M.holding()
