"""Freed memory kept in the process while a driver runs its products (glibc's ``malloc`` only).

Why: glibc gives the free memory at the top of its heap back to the kernel as soon as more than its trim
threshold is free, a threshold its adaptive rule raises to at most 64 MiB. A product with the Hessian of a
model frees and allocates again hundreds of MiB of autograd temporaries, so every product gives pages back
and the next one faults them in again, each zeroed by the kernel (about 10^4 faults a product on the GPT-2
benchmark shape; ``benchmarks/RESULTS.md`` has the cost). :func:`holding_freed_memory` raises the trim
threshold for the time of a driver (an SLQ, a Lanczos run, a solve), so the heap keeps what it has and the
products reuse it; leaving, it puts the threshold back and returns what was kept (``malloc_trim``).

glibc freezes its adaptive thresholds once a program sets either of them (``mallopt``), and the freeze keeps
the mmap threshold at its initial 128 KiB unless it is set too (every block above it then mapped and faulted
afresh: a product twice as slow). So both are set, to the values the adaptive rule itself reaches in any
process that has freed a block of 32 MiB or more (a model's logits or gradient do): mmap threshold 32 MiB,
the largest glibc accepts; trim threshold 64 MiB after the scope, the largest ``int`` inside it.

Left alone: a process that is not on glibc, and one whose user tuned ``malloc`` through its environment
(``MALLOC_*_`` variables, ``GLIBC_TUNABLES``, or an allocator in ``LD_PRELOAD``). Scopes nest; the outermost
one restores. The thresholds are process-wide, so threads running drivers at once share one scope count.
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
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the adaptive rule's ceiling, glibc's limit
IDLE_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what the adaptive rule pairs with it
HELD_TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int
_USER_TUNING = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                "GLIBC_TUNABLES")

_lock = threading.Lock()
_depth = 0
_F = TypeVar("_F", bound=Callable)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None where this module must leave ``malloc`` alone (see the module docstring)."""
    if not sys.platform.startswith("linux") or any(os.environ.get(name) for name in _USER_TUNING):
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: not glibc's heap
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl has mallopt as a stub)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def holding() -> bool:
    """Whether a :func:`holding_freed_memory` scope is open and in effect now."""
    return _depth > 0 and _glibc() is not None


@contextlib.contextmanager
def holding_freed_memory() -> Iterator[None]:
    """Keep freed memory in the heap for reuse until the outermost such scope ends (module docstring)."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, HELD_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, IDLE_TRIM_THRESHOLD)
                libc.malloc_trim(0)


def holds_freed_memory(driver: _F) -> _F:
    """Run ``driver`` inside :func:`holding_freed_memory`."""

    @functools.wraps(driver)
    def run(*args, **kwargs):
        with holding_freed_memory():
            return driver(*args, **kwargs)

    return run  # type: ignore[return-value]
