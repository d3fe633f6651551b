"""Freed memory kept in the process while a driver runs its products (glibc's ``malloc`` only).

Why: glibc gives the free memory at the top of its heap back to the kernel as soon as more than its trim
threshold is free, a threshold its adaptive rule sets to twice the largest mmapped block freed so far (at most
64 MiB). A product with the Hessian of a model frees and allocates again hundreds of MiB of autograd
temporaries, so every product gives pages back and the next one faults them in again, each zeroed by the kernel
(4 000-10 000 faults, 16-40 MiB, a product on the GPT-2 benchmark shape; ``benchmarks/RESULTS.md``).
:func:`holding_freed_memory` raises the trim threshold for the time of a driver (an SLQ, a Lanczos run, a
solve), so the heap keeps what it has and the products reuse it; leaving the outermost scope it lowers the
threshold again and returns what was kept (``malloc_trim``).

This is a lasting, process-wide choice, not a scoped one: glibc freezes its adaptive thresholds for good once a
program sets either of them (``mallopt``), and the freeze keeps the mmap threshold where it is (128 KiB at first;
every block above it then mapped and faulted afresh: a product twice as slow) unless it is set too. So both are
set, and after the first driver the process keeps an mmap threshold of 32 MiB and a trim threshold of 64 MiB:
the ceiling of the adaptive rule (reached after freeing a mapped block of 32 MiB), which a process running models
is at or near anyway. Inside a scope the trim threshold is the largest ``int``.

Left alone: a process that is not on glibc, and one whose user tuned ``malloc`` (``MALLOC_*_`` variables,
``glibc.malloc`` tunables, an allocator in ``LD_PRELOAD``). Scopes nest; the outermost one lowers the threshold.
The thresholds are process-wide, so threads running drivers at once share one scope count.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the adaptive rule's ceiling
IDLE_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what the adaptive rule pairs with it
HELD_TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int
_USER_TUNING = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_depth = 0
_held = False  # whether the outermost scope could set both thresholds


def _new_lock_in_child() -> None:
    # A child forked while another thread held the lock would wait for it forever. The child keeps the parent's
    # count and thresholds: they match the scopes on the stack it inherited.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)
_F = TypeVar("_F", bound=Callable)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _libc_malloc() -> ctypes.CDLL | None:
    """The process's glibc with its malloc controls typed, None elsewhere (musl has no
    ``gnu_get_libc_version``; its ``mallopt`` is a stub)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and later
        libc.mallinfo2.restype = _MallInfo2
    return libc


def return_freed_memory() -> None:
    """Give the free memory of glibc's heaps back to the kernel now (``malloc_trim(0)``); nothing elsewhere."""
    libc = _libc_malloc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None where this module must leave ``malloc`` alone (see the module docstring)."""
    if any(os.environ.get(name) for name in _USER_TUNING) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: not glibc's heap
        return None
    return _libc_malloc()


def holding() -> bool:
    """Whether a :func:`holding_freed_memory` scope is open and in effect now."""
    return _depth > 0 and _held


@contextlib.contextmanager
def holding_freed_memory() -> Iterator[None]:
    """Keep freed memory in the heap for reuse until the outermost such scope ends (module docstring)."""
    global _depth, _held
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            # The trim threshold only once the mmap one is in place: alone it would freeze the mmap threshold low.
            _held = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, HELD_TRIM_THRESHOLD))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _held:
                libc.mallopt(_M_TRIM_THRESHOLD, IDLE_TRIM_THRESHOLD)
                libc.malloc_trim(0)
                _held = False


def held_bytes() -> int:
    """Bytes free in glibc's heaps (``mallinfo2().fordblks``) while a scope holds them, else 0: memory the
    process can reuse at once, which ``MemAvailable`` no longer counts."""
    if not holding() or not hasattr(_glibc(), "mallinfo2"):
        return 0
    return int(_glibc().mallinfo2().fordblks)


def holds_freed_memory(driver: _F) -> _F:
    """Run ``driver`` inside :func:`holding_freed_memory`."""

    @functools.wraps(driver)
    def run(*args, **kwargs):
        with holding_freed_memory():
            return driver(*args, **kwargs)

    return run  # type: ignore[return-value]
